"""Schema, idempotent writes and BI views, on SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import math

from sqlalchemy import func, inspect, select, text

from db import models as m
from db.engine import connect
from db.progress import run_progress
from db.runs import register_model
from db.upsert import upsert
from jobs.ingest import ingest_feed
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
        version = register_model(s, "b1", {"content_hash": "h", "labels": ["a", "b"]})
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


def test_contributions_null_first_writer_wins_and_left_out_of_views(db_url, catalogue):
    """NULL T-SHAP is stored with its reason, read back as NaN, kept out of the view's T-SHAP
    aggregates; a second write of a product's contributions changes nothing."""
    import numpy as np

    from db.results import load_inferred, save_inferred, unestimated
    from pipeline.records import KINDS, Contributions, Inferred

    factory = connect(db_url)
    run_id = ingest_feed(factory, catalogue, Limits(verify_images=False))
    with factory() as s, s.begin():
        version = register_model(s, "b1", {"content_hash": "h", "labels": ["a", "b"]})
        rows = list(s.scalars(select(m.Product).where(m.Product.run_id == run_id).order_by(m.Product.row).limit(4)))

    def inferred(t_shap):
        c = Contributions.unestimated(4, "missing modality: no image players")
        c.t_shap = np.array(t_shap, float)
        c.stderr = np.where(np.isnan(c.t_shap), np.nan, 0.02)
        c.reason = [None if not np.isnan(t) else r for t, r in zip(t_shap, ["budget 10 < minimum 42 coalitions for 20 players",
                                                                           "missing modality: no image players"] * 2)]
        c.game_text_share = np.array([0.7, np.nan, 0.2, np.nan])
        return Inferred({k: np.zeros((4, 2), np.float32) for k in KINDS}, c, np.ones(4, bool), np.ones(4, bool))

    with factory() as s, s.begin():
        save_inferred(s, rows, inferred([0.95, np.nan, np.nan, np.nan]), version, "pixel")
    with factory() as s, s.begin():  # a redelivered batch with other numbers: the first write stays
        save_inferred(s, rows, inferred([0.1, 0.2, 0.3, 0.4]), version, "pixel")
        upsert(s, m.Prediction, [{"product_pk": r.id, "run_id": run_id, "category": "a", "confidence": 0.9,
                                  "model_version": version, "stacker": "mmshap"} for r in rows], ["product_pk", "stacker"])
    with factory() as s:
        ready, got = load_inferred(s, version, [r.id for r in rows], KINDS)
        assert ready == [r.id for r in rows]
        assert load_inferred(s, version, [r.id for r in rows], (*KINDS, "tfidf"))[0] == []  # a base model's logits missing
        assert got.contributions.t_shap[0] == 0.95 and np.isnan(got.contributions.t_shap[1:]).all()
        assert got.contributions.reason[1] == "missing modality: no image players"
        assert got.contributions.reason[2] == "budget 10 < minimum 42 coalitions for 20 players"
        assert s.scalar(select(m.ModalityContribution.v_shap).where(m.ModalityContribution.product_pk == rows[1].id)) is None
        [view] = s.execute(text("SELECT * FROM modality_by_category WHERE run_id = :r"), {"r": run_id}).all()
        assert view.n_products == 4 and view.n_t_shap == 1 and math.isclose(view.mean_t_shap, 0.95)
        assert view.text_dominated_share == 1.0 and view.image_dominated_share == 0.0
        assert math.isclose(view.mean_game_text_share, 0.45)
        assert unestimated(s, run_id) == (4, 1, {"budget 10 < minimum 42 coalitions for 20 players": 1})
