"""Embedded mode end to end, as a user runs it: classify a feed, then read the database and files."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from sqlalchemy import func, select

from db import models as m
from db.engine import connect


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shapstack", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_classify_feed_database_output_and_report_agree(tiny_bundle, tmp_path: Path):
    feed, bundle = tiny_bundle
    with open(feed, "a") as fh:  # one reject, to check that rejects get no prediction
        fh.write("P999999,G,,,,text_01,text,0\n")
    try:
        db = f"sqlite:///{tmp_path / 'e2e.db'}"
        out = tmp_path / "pred.csv"
        r = run("--db", db, "classify", str(feed), "--bundle", str(bundle), "--out", str(out),
                "--mmshap-budget", "24", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "1 rejected" in r.stdout and "evaluation on" in r.stdout and "collapse flags:" in r.stdout
    finally:
        lines = feed.read_text().splitlines(keepends=True)
        feed.write_text("".join(lines[:-1]))

    rows = list(csv.DictReader(open(out)))
    factory = connect(db)
    with factory() as s:
        n_products = s.scalar(select(func.count()).select_from(m.Product))
        n_rejects = s.scalar(select(func.count()).select_from(m.RejectRow))
        per_product = s.execute(select(m.Prediction.product_pk, func.count()).group_by(m.Prediction.product_pk)).all()
        db_pred = {p.product_id: (pred.category, pred.confidence, c.t_shap) for p, pred, c in s.execute(
            select(m.Product, m.Prediction, m.ModalityContribution)
            .join(m.Prediction, m.Prediction.product_pk == m.Product.id)
            .join(m.ModalityContribution, m.ModalityContribution.product_pk == m.Product.id))}
        run_row = s.scalars(select(m.Run)).one()
        metrics = s.scalar(select(func.count()).select_from(m.CollapseMetric))
    assert n_rejects == 1 and n_products == 320 == len(rows) == len(per_product)
    assert all(count == 1 for _, count in per_product)  # exactly one prediction per accepted product
    assert run_row.status == "done" and metrics > 0
    for row in rows:
        category, confidence, t_shap = db_pred[row["product_id"]]
        assert row["category"] == category
        assert abs(float(row["confidence"]) - confidence) < 1e-5 and abs(float(row["t_shap"]) - t_shap) < 1e-5
        assert abs(float(row["t_shap"]) + float(row["v_shap"]) - 1) < 1e-5
        assert row["label"] and row["text_category"] and row["image_category"] and row["multimodal_category"]
    missing = {row["missing"] for row in rows}
    assert {"", "image", "text"} <= missing  # products lacking a modality are classified and marked

    r = run("--db", db, "report", str(run_row.id), "--out", str(tmp_path / "rep"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    files = {p.name for p in (tmp_path / "rep").iterdir()}
    assert {"index.html", "categories.png", "confidence.png", "t_shap.png", "t_shap_by_category.png",
            "confusion.png"} <= files
    assert "Collapse" in (tmp_path / "rep" / "index.html").read_text()


def test_classify_user_errors(tiny_bundle, tmp_path: Path):
    feed, bundle = tiny_bundle
    for args, message in ((["classify", str(feed)], "no model bundle"),
                          (["classify", str(feed), "--bundle", str(bundle), "--stacker", "nope"], "no stacker"),
                          (["classify", str(feed), "--bundle", str(bundle), "--out", "x.txt"], ".csv or .jsonl"),
                          (["classify", "missing.csv", "--bundle", str(bundle)], "feed not found")):
        r = run(*args, cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
