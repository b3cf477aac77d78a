"""The docs a user reads: the settings reference matches the code, the example config loads, every
page is linked from the README, and the README's usage block runs as written on a fresh folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shapstack.settings import Settings, _names, load_settings

ROOT = Path(__file__).parent.parent


def _shown(value) -> str:
    if value is None:
        return "none"
    if value == ():
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def test_settings_reference_matches_the_code():
    doc = (ROOT / "docs" / "settings.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| [^|]+ \| ([^|]+) \|", doc, re.M))
    defaults = Settings()
    expected = {name: _shown(getattr(getattr(defaults, section) if section else defaults, name))
                for name, (section, _) in _names().items()}
    assert {k: v.strip() for k, v in rows.items()} == expected


def test_example_config_is_every_default():
    example = ROOT / "examples" / "shapstack.toml"
    assert load_settings(example, env={}) == Settings()
    text = example.read_text()
    for name in _names():
        assert re.search(rf"^#? ?{name} = ", text, re.M), name


def test_every_docs_page_is_linked_from_the_readme_and_written_for_users():
    readme = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, page.name
        text = page.read_text().lower()
        for phrase in ("this machine", "this session"):
            assert phrase not in text, (page.name, phrase)
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


def usage_block() -> list[str]:
    """The ```bash block under "## Usage" of the README, one command per line (comments kept)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Usage\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


# sizes for a test: only values of flags the README block already uses, or documented flags added
SMALL = [("--products 2000", "--products 120"), ("--classes 8", "--classes 4"), ("--preset small", "--preset tiny"),
         ("--test-fraction 0.2", "--test-fraction 0.25 --folds 1 --epochs 1 --min-class-size 5 --mmshap-budget 8")]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_readme_usage_block_runs_on_a_fresh_folder(tmp_path):
    lines = usage_block()
    assert any(line.startswith("shapstack classify --run") for line in lines)
    script = []
    for line in lines:
        for big, small in SMALL:
            line = line.replace(big, small)
        script.append(line)
    # `shapstack` as a user's installed command runs this checkout's code
    prelude = f'shapstack() {{ "{sys.executable}" -m shapstack "$@"; }}\nset -euo pipefail\n'
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in [k for k in env if k.startswith("SHAPSTACK_")]:
        env.pop(key)
    r = subprocess.run(["bash", "-c", prelude + "\n".join(script)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=1700)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "report" / "index.html").is_file() and (tmp_path / "predictions.csv").is_file()
    assert "run 2:" in r.stdout and "classified" in r.stdout
