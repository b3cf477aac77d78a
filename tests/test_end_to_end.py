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
                "--mmshap-budget", "160", cwd=tmp_path)
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
        assert abs(float(row["confidence"]) - confidence) < 1e-5
        if t_shap is None:  # NULL (a modality missing, or not estimated) is an empty cell
            assert row["t_shap"] == row["v_shap"] == ""
            continue
        assert abs(float(row["t_shap"]) - t_shap) < 1e-5 and abs(float(row["t_shap"]) + float(row["v_shap"]) - 1) < 1e-5
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
                          (["classify", str(feed), "--bundle", str(bundle), "--out", "x.txt"], ".csv, .jsonl, .parquet"),
                          (["classify", "missing.csv", "--bundle", str(bundle)], "feed not found")):
        r = run(*args, cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_ingest_then_classify_run_export_status_json(quick_bundle, tmp_path: Path):
    """`ingest` stores a run that `classify --run` classifies; export in three formats, status,
    dead-letters and evaluate as a script reads them (--json)."""
    import json

    import pyarrow.parquet as pq

    feed, bundle = quick_bundle
    rows = list(csv.DictReader(open(feed)))[:40]
    rows[0]["title"], rows[1]["title"], rows[2]["title"] = "=HYPERLINK(\"http://x\")", "@SUM(A1)", "+1-2"
    mine = feed.parent / f"e2e-{tmp_path.name}.csv"
    with open(mine, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    try:
        r = run("ingest", str(mine), "--json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"run": 1, "products": 40, "rejects": 0, "reject_reasons": {}}
        r = run("classify", "--run", "1", "--bundle", str(bundle), "--mmshap-budget", "8", "--mmshap-mode", "token",
                "--json", "--out", "p.jsonl", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    finally:
        mine.unlink()
    result = json.loads(r.stdout)
    assert (result["run"], result["predicted"], result["failed"], result["dead"]) == (1, 40, 0, 0)
    assert result["options"] == {"split": "all", "mmshap_budget": 8, "mmshap_mode": "token"}
    assert result["evaluation"]["stacked"]["accuracy"] > 0 and "classified 40 products" in r.stderr
    r = run("classify", "--run", "1", "--bundle", str(bundle), cwd=tmp_path)
    assert r.returncode == 2 and "no product left to classify" in r.stderr

    for name in ("p.csv", "p.parquet"):
        r = run("export", "1", "--out", name, cwd=tmp_path)
        assert r.returncode == 0 and "wrote 40 rows" in r.stdout, r.stderr
    as_jsonl = [json.loads(line) for line in open(tmp_path / "p.jsonl")]
    as_csv = list(csv.DictReader(open(tmp_path / "p.csv")))
    as_parquet = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert [r["product_id"] for r in as_jsonl] == [r["product_id"] for r in as_csv] == \
        [r["product_id"] for r in as_parquet] == [r["product_id"] for r in rows]
    assert as_jsonl[0]["title"] == as_parquet[0]["title"] == rows[0]["title"]  # only CSV is neutralised
    assert [r["title"] for r in as_csv[:3]] == ["'" + rows[i]["title"] for i in range(3)]
    assert as_csv[3]["title"] == rows[3]["title"]
    assert all(r["category"] == p["category"] and abs(float(r["confidence"]) - p["confidence"]) < 1e-9
               for r, p in zip(as_csv, as_parquet))
    assert {r["mmshap_mode"] for r in as_parquet} == {"token"}

    r = run("status", "1", cwd=tmp_path)
    assert r.returncode == 0
    assert "created 20" in r.stdout and "failed" in r.stdout and "dead" in r.stdout and "timings: ingest" in r.stdout
    r = run("status", cwd=tmp_path)
    assert "predicted failed  dead" in r.stdout and "done" in r.stdout
    r = run("dead-letters", "1", "--json", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout) == []


def test_read_only_commands_never_create_or_migrate(tmp_path: Path):
    for args in (["status"], ["status", "1"], ["report", "1"], ["export", "1", "--out", "x.csv"],
                 ["dead-letters", "1"]):
        r = run(*args, cwd=tmp_path)
        assert r.returncode == 2 and "no database at sqlite:///shapstack.db" in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "shapstack.db").exists()
    (tmp_path / "shapstack.db").touch()  # an empty file: no schema, and it stays so
    r = run("status", cwd=tmp_path)
    assert r.returncode == 2 and "shapstack db upgrade" in r.stderr
    assert (tmp_path / "shapstack.db").stat().st_size == 0
    assert run("db", "upgrade", cwd=tmp_path).returncode == 0
    r = run("status", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "no runs yet"
    r = run("export", "7", "--out", "x.csv", cwd=tmp_path)
    assert r.returncode == 2 and "no run 7" in r.stderr and not (tmp_path / "x.csv").exists()


def test_evaluate_json_with_classify_mmshap_settings(quick_bundle, tmp_path: Path):
    import json

    feed, bundle = quick_bundle
    r = run("evaluate", str(feed), "--bundle", str(bundle), "--split", "test", "--mmshap-budget", "4",
            "--mmshap-mode", "token", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    table = json.loads(r.stdout)
    assert {"text", "image", "multimodal", "mmshap"} <= set(table) and 0 < table["mmshap"]["accuracy"] <= 1
    assert "(budget 4, token mode)" in r.stderr and not (tmp_path / "shapstack.db").exists()


def test_csv_cells_never_run_as_formulas(tmp_path: Path):
    from db.results import OUTPUT_COLUMNS
    from jobs.export import write_rows

    values = ["=1+1", "+1", "-1", "@A1", "\tx", "\rx", "ok", "a=b"]
    rows = [{**dict.fromkeys(OUTPUT_COLUMNS, ""), "product_id": v, "title": v, "confidence": -0.5} for v in values]
    assert write_rows(iter(rows), tmp_path / "x.csv") == len(values)
    got = list(csv.DictReader(open(tmp_path / "x.csv", newline="")))
    assert [g["title"] for g in got] == ["'=1+1", "'+1", "'-1", "'@A1", "'\tx", "'\rx", "ok", "a=b"]
    assert got[0]["confidence"] == "-0.5"  # numbers stay numbers
    assert not list(tmp_path.glob("*.partial"))
