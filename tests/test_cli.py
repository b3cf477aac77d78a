"""The CLI as a user runs it: real subprocesses, exit statuses, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def shapstack(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shapstack", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def test_make_catalogue_ingest_and_status(tmp_path: Path):
    r = shapstack("make-catalogue", "cat", "--products", "40", "--classes", "4", "--drop-image", "0.2",
                  "--image-size", "32", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    classes = json.loads((tmp_path / "cat" / "classes.json").read_text())
    assert sorted(classes.values()) == ["both", "both", "image", "text"]
    feed = tmp_path / "cat" / "catalogue.csv"
    with open(feed, "a") as fh:  # two bad rows: the feed still succeeds, they are reported
        fh.write("P000001,G,dup,,,text_01,text,0\n,G,no id,,,text_01,text,0\n")
    r = shapstack("ingest", str(feed), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "40 products accepted, 2 rejected" in r.stdout
    assert "duplicate product_id within the feed" in r.stdout and "missing product_id" in r.stdout
    assert (tmp_path / "shapstack.db").exists()  # embedded default: SQLite in the working directory

    r = shapstack("status", "1", "--json", cwd=tmp_path)
    status = json.loads(r.stdout)
    assert status["products"] == 40 and status["rejects"] == 2 and status["by_status"] == {"pending": 40}


def test_user_errors_are_one_line_without_traceback(tmp_path: Path):
    for args in (["ingest", "missing.csv"], ["status", "99"], ["--db", "postgresql://nobody@127.0.0.1:1/x", "status"]):
        r = shapstack(*args, cwd=tmp_path)
        assert r.returncode != 0, args
        assert "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    (tmp_path / "bad.toml").write_text("nonsense_key = 1\n")
    r = shapstack("--config", "bad.toml", "status", cwd=tmp_path)
    assert r.returncode == 2 and "unknown setting" in r.stderr


def test_settings_precedence(tmp_path: Path):
    from shapstack.settings import load_settings

    cfg = tmp_path / "s.toml"
    cfg.write_text('batch_size = 7\nbroker_url = "redis://file"\nmmshap_budget = 10\n')
    s = load_settings(cfg, env={"SHAPSTACK_BROKER_URL": "redis://env", "SHAPSTACK_ALLOW_IMAGE_URLS": "yes"},
                      mmshap_budget=99)
    assert (s.batch_size, s.broker_url, s.limits.allow_image_urls, s.mmshap_budget) == (7, "redis://env", True, 99)
    assert s.distributed and not load_settings(env={}).distributed
    assert load_settings(env={}).database_url.startswith("sqlite")
