"""Amortized MM-SHAP: the bundle's explainer trains, saves, loads and predicts; it sees which
classes rely on the image and which on the text; audited products keep their sampled T-SHAP beside
the amortized one; classify runs end to end with --mmshap-method amortized."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from db import models as m
from db.engine import connect
from pipeline.amortized import Explainer, audited, features, fit_explainer, load_explainer
from pipeline.backend import InProcessBackend
from pipeline.bundle import load_bundle
from pipeline.errors import UserError
from pipeline.feed import read_feed
from pipeline.inference import infer
from pipeline.manifest import read_manifest
from pipeline.mmshap import EXPLAINER, MMShapConfig, mmshap_config
from pipeline.records import Product
from pipeline.split import split_selector
from pipeline.stackers import log_softmax


def held_out(feed, bundle_path) -> list[Product]:
    """The bundle's --split test products: neither the models nor the explainer saw them."""
    select_product = split_selector(read_manifest(bundle_path), "test")
    return [p for p in read_feed(feed) if isinstance(p, Product) and select_product(p)]


def amortized(bundle_path, audit: float = 0.0) -> MMShapConfig:
    return mmshap_config(read_manifest(bundle_path), method="amortized", audit_fraction=audit)


def test_explainer_trains_saves_loads_and_predicts(tiny_bundle):
    feed, path = tiny_bundle
    manifest = read_manifest(path)
    meta = manifest["extra"]["mmshap_explainer"]
    assert EXPLAINER in manifest["artifacts"] and manifest["artifacts"][EXPLAINER]["type"] == "tensors"
    assert meta["n_train"] >= 10 and meta["mode"] == manifest["extra"]["mmshap"]["mode"]
    assert 0 <= meta["cv_rmse_net"] <= meta["cv_rmse_vs_sampled"] < 0.5
    assert meta["targets"] == "budget 160 coalitions per product"  # 2 folds: the final models' MM-SHAP, audit policy
    bundle = load_bundle(path)
    explainer = load_explainer(bundle)
    x = np.random.default_rng(0).normal(size=(7, meta["inputs"]))
    t, game = explainer.predict(x)
    assert t.shape == game.shape == (7,) and ((t > 0) & (t < 1)).all() and ((game > 0) & (game < 1)).all()
    again = Explainer.from_state(explainer.state(), meta["hidden"]).predict(x)
    assert np.array_equal(again[0], t) and np.array_equal(again[1], game)


def test_explainer_learns_a_planted_relation():
    """Fitted on targets that follow how much more the text model than the image model backs the
    predicted class, it predicts them on new rows; wrong targets that say they are noisy (large
    stderr) barely move it."""
    rng = np.random.default_rng(0)
    n, k = 400, 4

    def rows(n):
        logits = {kind: rng.normal(size=(n, k)) * 3 for kind in ("text", "image", "multimodal")}
        x = features(logits, rng.integers(5, 30, n), np.full(n, 16))
        c, i = logits["multimodal"].argmax(1), np.arange(n)
        margin = log_softmax(logits["text"])[i, c] - log_softmax(logits["image"])[i, c]
        return x, 1 / (1 + np.exp(-margin / 2))

    x, t = rows(n)
    stderr = np.full(n, 0.02)
    noisy = rng.random(n) < 0.1
    y = np.where(noisy, 1 - t, t)  # a tenth of the targets are wrong ...
    stderr[noisy] = 1.0  # ... and say so
    explainer = fit_explainer(x, y, stderr, np.full(n, np.nan), seed=0)
    x_new, t_new = rows(200)
    pred = explainer.predict(x_new)[0]
    assert np.sqrt(np.mean((pred - t_new) ** 2)) < 0.05 < 0.2 * np.std(t_new)


def test_amortized_ranks_image_classes_below_text_classes(tiny_bundle):
    feed, path = tiny_bundle
    kinds = json.loads((feed.parent / "classes.json").read_text())
    backend = InProcessBackend(load_bundle(path))
    products = [p for p in held_out(feed, path) if p.has_text and p.has_image]
    res = infer(backend, products, amortized(path), seed_key="test").contributions
    kind = np.array([kinds[p.label] for p in products])
    assert set(res.method) == {"amortized"} and (res.n_evaluations == 0).all() and np.isnan(res.stderr).all()
    t_image, t_text = (np.mean(res.t_shap[kind == k]) for k in ("image", "text"))
    assert t_image < t_text - 0.2, (t_image, t_text)


def test_audit_stores_sampled_beside_amortized_and_missing_modalities_stay_null(tiny_bundle):
    feed, path = tiny_bundle
    backend = InProcessBackend(load_bundle(path))
    products = [p for p in read_feed(feed) if isinstance(p, Product)]
    products = [p for p in products if not p.has_image][:2] + [p for p in products if p.has_text and p.has_image][:6]
    full = infer(backend, products, amortized(path, audit=1.0), seed_key="test").contributions
    none = infer(backend, products, amortized(path, audit=0.0), seed_key="test").contributions
    assert np.isnan(full.t_shap[:2]).all() and np.isnan(full.audit_t_shap[:2]).all()
    assert full.method[:2] == ["none", "none"] and full.reason[0].startswith("missing modality")
    assert np.isfinite(full.audit_t_shap[2:]).all() and np.isfinite(full.audit_stderr[2:]).all()
    assert (full.n_evaluations[2:] > 0).all() and full.method[2:] == ["amortized"] * 6
    np.testing.assert_array_equal(full.t_shap, none.t_shap)  # auditing never changes the amortized value
    assert np.isnan(none.audit_t_shap).all() and (none.n_evaluations == 0).all()
    audit = amortized(path).audit()  # the run's policy at the audit's looser target
    assert audit.method == "sampled" and audit.target_stderr >= amortized(path).target_stderr
    assert audit.budget == amortized(path).budget  # a fixed budget (the fixture's 160) stays that budget
    assert replace(amortized(path), budget=None).audit().describe().startswith("target stderr 0.1,")
    sampled = infer(backend, products[2:], audit, seed_key="test").contributions
    np.testing.assert_array_equal(full.audit_t_shap[2:], sampled.t_shap)  # the audit is the sampled estimate


def test_audit_picks_the_same_products_in_any_order():
    seeds = np.random.default_rng(1).integers(0, 2**63, 4000, dtype=np.uint64)
    picked = audited(seeds, 0.05)
    assert 0.03 < picked.mean() < 0.07
    order = np.random.default_rng(2).permutation(len(seeds))
    np.testing.assert_array_equal(audited(seeds[order], 0.05), picked[order])
    assert not audited(seeds, 0.0).any() and audited(seeds, 1.0).all()


def test_amortized_needs_the_explainer_and_its_mode(tiny_bundle):
    _, path = tiny_bundle
    manifest = read_manifest(path)
    other = "token" if manifest["extra"]["mmshap"]["mode"] == "pixel" else "pixel"
    with pytest.raises(UserError, match="cannot use another mode"):
        mmshap_config(manifest, mode=other, method="amortized")
    without = {**manifest, "artifacts": {}}
    with pytest.raises(UserError, match="no MM-SHAP explainer"):
        mmshap_config(without, method="amortized")
    assert mmshap_config(without, budget=0, method="amortized").off  # MM-SHAP off needs no explainer


def test_classify_amortized_end_to_end(quick_bundle, db_url, tmp_path: Path):
    feed, bundle = quick_bundle
    r = subprocess.run([sys.executable, "-m", "shapstack", "--db", db_url, "classify", str(feed), "--bundle",
                        str(bundle), "--mmshap-method", "amortized", "--mmshap-audit", "0.3", "--json"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["options"]["mmshap_method"] == "amortized" and summary["options"]["mmshap_audit_fraction"] == 0.3
    audit = summary["mmshap_audit"]
    with connect(db_url)() as s:
        rows = s.execute(select(m.ModalityContribution, m.Prediction.missing).join(
            m.Prediction, m.Prediction.product_pk == m.ModalityContribution.product_pk)).all()
    both = [c for c, missing in rows if missing is None]
    assert len(both) > 50 and {c.method for c in both} == {"amortized"}
    assert all(c.t_shap is None and c.method == "none" for c, missing in rows if missing is not None)
    checked = [c for c in both if c.audit_t_shap is not None]
    assert 0.15 * len(both) < len(checked) < 0.45 * len(both) and audit["n"] == len(checked)
    diff = np.array([c.t_shap - c.audit_t_shap for c in checked])
    assert abs(audit["rmse"] - np.sqrt(np.mean(diff**2))) < 1e-9
    se = np.array([c.audit_stderr for c in checked])
    net = np.sqrt(max(0.0, np.mean(diff**2 - se**2)))  # net of the audit's own sampling noise
    assert abs(audit["rmse_net"] - net) < 1e-9 and audit["rmse_net"] < audit["rmse"]
    assert audit["rmse_net_ci"][0] <= audit["rmse_net"] <= audit["rmse_net_ci"][1]
    assert all(c.n_evaluations == 0 for c in both if c.audit_t_shap is None)
