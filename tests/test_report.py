"""The HTML report as a reader sees it: rendered in a real headless Chromium, every image loaded,
no console error, every section there; a screenshot is saved (SHAPSTACK_TEST_SCREENSHOTS=DIR keeps a copy)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select, update

from browser import chromium, render
from conftest import REQUIRE_SERVICES, classify_with_rejects
from db import models as m
from db.engine import connect
from db.products import dead_letter


def shapstack(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shapstack", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_report_renders_in_chromium(quick_bundle, tmp_path: Path):
    if chromium() is None:
        if REQUIRE_SERVICES:
            pytest.fail("chromium is not installed (.ci/install installs it)")
        pytest.skip("chromium is not installed")
    feed, bundle = quick_bundle
    db = f"sqlite:///{tmp_path / 'r.db'}"
    classify_with_rejects(feed, bundle, db, tmp_path)
    factory = connect(db)
    with factory() as s, s.begin():  # one product parked as a worker parks it
        pk, product_id = s.execute(select(m.Product.id, m.Product.product_id).order_by(m.Product.id)).first()
        s.execute(update(m.Product).where(m.Product.id == pk).values(status="pending"))  # only pending ones park
        dead_letter(s, pk, "infer", "InvalidURL: a test error", 3)

    r = shapstack("--db", db, "report", "1", "--out", str(tmp_path / "rep"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "rep" / "index.html").read_text()
    for section in ("Per class (stacked)", "Most confused pairs", "Lowest confidence", "Most disagreeing models",
                    "MM-SHAP reliability", "products without T-SHAP (NULL)", "Rejected rows by reason",
                    "image_missing", "no_content", "Dead letters", "InvalidURL: a test error", "Stage timings"):
        assert section in page, section
    assert product_id in page

    shot = tmp_path / "report.png"
    rendered = render(tmp_path / "rep" / "index.html", shot)
    assert rendered.title == "shapstack run 1"
    assert rendered.errors == []
    thumbs = [i for i in rendered.images if i["src"].startswith("thumbs/")]
    plots = [i for i in rendered.images if i["src"].endswith(".png") and "/" not in i["src"]]
    assert len(thumbs) >= 10 and len(plots) >= 6, rendered.images
    assert all(i["complete"] and i["width"] > 0 for i in rendered.images), rendered.images
    assert shot.stat().st_size > 50_000
    if os.environ.get("SHAPSTACK_TEST_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["SHAPSTACK_TEST_SCREENSHOTS"]) / "report.png")
