"""Schema, idempotent writes and BI views, on SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import math

from sqlalchemy import func, inspect, select, text

from db import models as m
from db.engine import connect
from db.store import ingest_feed, register_model, run_progress, upsert
from pipeline.records import Limits

TABLES = {"runs", "products", "rejects", "model_versions", "base_logits", "predictions",
          "modality_contributions", "collapse_metrics", "dead_letters"}


def test_schema_ingest_upserts_and_views(db_url, catalogue):
    factory = connect(db_url)
    engine = factory.kw["bind"]
    assert TABLES <= set(inspect(engine).get_table_names())
    assert {"category_summary", "modality_by_category"} <= set(inspect(engine).get_view_names())

    batches = []
    run_id = ingest_feed(factory, catalogue, Limits(), batch_size=50, on_batch=lambda r, pks: batches.append(pks))
    assert [len(b) for b in batches] == [50, 50, 20]
    with factory() as s, s.begin():
        assert s.scalar(select(func.count()).select_from(m.Product)) == 120
        run = s.get(m.Run, run_id)
        assert (run.status, run.n_rows, run.n_products, run.n_rejects) == ("ingested", 120, 120, 0)
        version = register_model(s, {"bundle_id": "b1", "content_hash": "h", "labels": ["a", "b"]})
        pks = [pk for b in batches for pk in b]
        # the same prediction written twice (a redelivered task) leaves one row, updated
        for conf in (0.5, 0.75):
            upsert(s, m.Prediction, [
                {"product_pk": pk, "run_id": run_id, "category": "a" if i % 4 else "b", "confidence": conf,
                 "model_version": version, "stacker": "mmshap"} for i, pk in enumerate(pks)
            ], ["product_pk", "stacker"])
            upsert(s, m.ModalityContribution, [
                {"product_pk": pk, "run_id": run_id, "t_shap": (i % 10) / 9, "v_shap": 1 - (i % 10) / 9,
                 "n_evaluations": 64, "stderr": 0.01} for i, pk in enumerate(pks)
            ], ["product_pk"])
    with factory() as s:
        assert s.scalar(select(func.count()).select_from(m.Prediction)) == 120
        assert s.scalar(select(func.max(m.Prediction.confidence))) == 0.75
        summary = {r.category: r for r in s.execute(text("SELECT * FROM category_summary WHERE run_id = :r"), {"r": run_id})}
        assert summary["a"].n_products == 90 and math.isclose(summary["a"].share, 0.75)
        assert math.isclose(summary["b"].mean_confidence, 0.75)
        mod = {r.category: r for r in s.execute(text("SELECT * FROM modality_by_category WHERE run_id = :r"), {"r": run_id})}
        t = [(i % 10) / 9 for i in range(120) if i % 4 == 0]
        mean = sum(t) / len(t)
        assert math.isclose(mod["b"].mean_t_shap, mean, rel_tol=1e-9)
        assert math.isclose(mod["b"].std_t_shap, math.sqrt(sum((x - mean) ** 2 for x in t) / len(t)), rel_tol=1e-6)
        assert math.isclose(mod["b"].text_dominated_share, sum(x > 0.9 for x in t) / len(t))
        progress = run_progress(s, run_id)
        assert progress["predicted"] == 120 and progress["explained"] == 120 and progress["products"] == 120


def test_reingesting_a_feed_makes_a_new_run(db_url, catalogue):
    factory = connect(db_url)
    a = ingest_feed(factory, catalogue, Limits(verify_images=False))
    b = ingest_feed(factory, catalogue, Limits(verify_images=False))
    with factory() as s:
        counts = dict(s.execute(select(m.Product.run_id, func.count()).group_by(m.Product.run_id)).all())
    assert a != b and counts == {a: 120, b: 120}
