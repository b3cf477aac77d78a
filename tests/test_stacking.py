"""Stackers and collapse metrics on base-model outputs with a known structure."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.collapse import Thresholds, collapse_metrics, reference_means
from pipeline.stacking import STACKERS, StackInputs, fit_stackers, load_state, save_state


def collapsed_problem(n: int, k: int = 6, seed: int = 0):
    """Text knows classes 0-2, image knows 3-5, the multimodal model collapsed onto text."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    onehot = np.eye(k)[y]
    text = rng.normal(0, 1, (n, k)) + 4 * onehot * (y < 3)[:, None]
    image = rng.normal(0, 1, (n, k)) + 4 * onehot * (y >= 3)[:, None]
    mm = text + rng.normal(0, 0.3, (n, k))
    t_shap = np.clip(0.95 - 0.05 * rng.random(n), 0, 1)
    return StackInputs({"text": text, "image": image, "multimodal": mm}, t_shap), y


def accuracy(p, y):
    return float((p.argmax(1) == y).mean())


def test_every_stacker_fits_predicts_and_round_trips():
    x, y = collapsed_problem(600)
    xt, yt = collapsed_problem(400, seed=1)
    stackers = fit_stackers(x, y)
    assert set(stackers) == set(STACKERS)
    acc = {}
    for name, s in stackers.items():
        p = s.predict_proba(xt)
        assert p.shape == (400, 6) and np.allclose(p.sum(1), 1, atol=1e-5), name
        tensors, meta = save_state(s)
        assert np.allclose(load_state(tensors, meta).predict_proba(xt), p, atol=1e-6), name
        acc[name] = accuracy(p, yt)
    # the collapsed multimodal model is right on half the classes; fitted stackers recover the image half
    assert acc["multimodal"] < 0.7
    for name in ("mmshap", "lightgbm", "ffn"):
        assert acc[name] > acc["multimodal"] + 0.2, acc


def test_lightgbm_contributions_point_at_the_model_that_knows():
    x, y = collapsed_problem(600)
    s = fit_stackers(x, y, ["lightgbm"])["lightgbm"]
    c = s.model_contributions(x)
    assert c.shape == (600, 3) and np.allclose(c.sum(1), 1)
    assert c[y >= 3, 1].mean() > c[y >= 3, 0].mean()  # the image model drives image-class decisions


def test_unknown_stacker_is_a_clear_error():
    x, y = collapsed_problem(50)
    with pytest.raises(ValueError, match="unknown stacker"):
        fit_stackers(x, y, ["nope"])


def test_collapse_flags():
    rng = np.random.default_rng(0)
    cats = np.array(["a"] * 50 + ["b"] * 50 + ["c"] * 5)
    t = np.concatenate([rng.uniform(0.92, 1, 50), rng.uniform(0.3, 0.6, 50), rng.uniform(0, 1, 5)])
    preds = {k: rng.integers(0, 3, 105) for k in ("text", "image", "multimodal")}
    preds["multimodal"] = preds["text"].copy()
    rows = {(s, m): v for s, m, v in collapse_metrics(t, cats, preds, Thresholds(), {"all": 0.5, "b": 0.45})}
    assert rows[("a", "flag_text_collapse")] == 1.0 and rows[("b", "flag_text_collapse")] == 0.0
    assert rows[("all", "agree_text")] == 1.0
    assert ("c", "n") not in rows  # below min_products
    assert rows[("all", "flag_image_collapse")] == 0.0
    assert rows[("b", "flag_drift")] == 0.0 and ("a", "flag_drift") not in rows
    ref = reference_means(t, cats)
    assert abs(ref["a"] - t[:50].mean()) < 1e-12
