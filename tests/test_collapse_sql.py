"""The collapse counts computed by SQL GROUP BY (db.collapse) are pipeline.collapse.counts() of the
same rows, on SQLite and PostgreSQL: NULL T-SHAP, missing modalities, unknown labels, NULL unimodal
categories, products predicted by another stacker or not explained included."""

from __future__ import annotations

import numpy as np
import pytest

from db import models as m
from db.collapse import collapse_counts, run_stacker
from db.engine import connect
from db.runs import create_run, register_model, start_run
from jobs.aggregate import aggregate_collapse
from pipeline.collapse import Thresholds, category_counts, collapse_metrics

CATS = ["a", "b", "c"]


def store_run(factory, n: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    with factory() as s, s.begin():
        register_model(s, "bundle-1", {"content_hash": "0" * 64, "labels": CATS})
        run = create_run(s, "feed.csv", bundle_id="bundle-1")
        start_run(s, run, "bundle-1", "mmshap")
        for i in range(n):
            label = [None, "", *CATS][rng.integers(0, 5)]
            product = m.Product(run_id=run, product_id=f"p{i}", row=i, content_hash=f"{i:064d}", label=label)
            s.add(product)
            s.flush()
            cat = lambda: CATS[rng.integers(0, 3)] if rng.random() > 0.25 else None  # noqa: E731
            missing = [None, None, None, "text", "image"][rng.integers(0, 5)]
            s.add(m.Prediction(product_pk=product.id, run_id=run, category=CATS[rng.integers(0, 3)], confidence=0.5,
                               model_version="bundle-1", stacker="mmshap", text_category=cat(),
                               image_category=cat(), multimodal_category=cat(), missing=missing))
            if i % 7 == 0:  # the same product under another stacker: not the run's
                s.add(m.Prediction(product_pk=product.id, run_id=run, category="a", confidence=0.9,
                                   model_version="bundle-1", stacker="mean", text_category="a",
                                   image_category="b", multimodal_category="a"))
            if i % 11 == 5:
                continue  # predicted, not explained: in neither computation
            t = None if missing or rng.random() < 0.2 else float(rng.random())
            s.add(m.ModalityContribution(product_pk=product.id, run_id=run, t_shap=t, n_evaluations=4))
    return run


def rows_of(factory, run: int) -> list[tuple]:
    """What the aggregation used to load: one row per explained product, predicted by the run's stacker."""
    c, p, pr = m.ModalityContribution, m.Prediction, m.Product
    with factory() as s:
        return [tuple(r) for r in s.query(c.t_shap, p.category, p.text_category, p.image_category,
                                          p.multimodal_category, p.missing, pr.label)
                .join(p, p.product_pk == c.product_pk).join(pr, pr.id == c.product_pk)
                .filter(c.run_id == run, p.stacker == "mmshap")]


def numpy_inputs(rows):
    t, cat, text, image, mm, missing, label = zip(*rows)
    return (np.array([np.nan if v is None else v for v in t], float), np.array(cat, object),
            {"text": np.array(text, object), "image": np.array(image, object), "multimodal": np.array(mm, object)},
            np.array([v != "text" for v in missing]), np.array([v != "image" for v in missing]), np.array(label, object))


def test_sql_counts_are_the_pipelines(db_url):
    factory = connect(db_url)
    run = store_run(factory, 300, seed=4)
    with factory() as s:
        assert run_stacker(s, run) == "mmshap"
        sql = collapse_counts(s, run, "mmshap")
    t, cat, preds, has_text, has_image, label = numpy_inputs(rows_of(factory, run))
    expected = category_counts(t, cat, preds, has_text, has_image, label)
    assert sorted(sql) == sorted(expected) == CATS
    for c in CATS:
        assert sql[c].keys() == expected[c].keys()
        for key, value in expected[c].items():
            assert sql[c][key] == pytest.approx(value, rel=1e-12, abs=1e-12), (c, key)
    # the cases the data must cover for the comparison to mean anything
    assert sum(v["n"] - v["n_both"] for v in sql.values()) > 0  # missing modalities
    assert sum(v["n_both"] - v["n_reliance"] for v in sql.values()) > 0  # NULL T-SHAP
    assert sum(v["n_labelled_disagree"] for v in sql.values()) < sum(v["n_disagree"] for v in sql.values())


def test_aggregate_from_sql_gives_the_metrics_of_the_rows(db_url):
    factory = connect(db_url)
    run = store_run(factory, 400, seed=5)
    th = Thresholds(min_products=50, min_disagreements=5)
    stored = {(sc, k): v for sc, k, v in aggregate_collapse(factory, run, th)}
    t, cat, preds, has_text, has_image, label = numpy_inputs(rows_of(factory, run))
    expected = {(sc, k): v for sc, k, v in collapse_metrics(t, cat, preds, th, has_text=has_text,
                                                             has_image=has_image, label=label)}
    assert stored.keys() == expected.keys()
    assert {("all", "agree_text"), ("a", "mean_t_shap"), ("all", "evidence_image_ignored")} <= stored.keys()
    for key, value in expected.items():
        assert stored[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    with factory() as s:
        assert s.query(m.CollapseMetric).filter_by(run_id=run).count() == len(stored)
