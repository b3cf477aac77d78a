"""Stackers on base-model outputs with a known structure, and the bootstrap intervals of evaluate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.metrics import bootstrap_scores, paired_bootstrap, scores, wilson
from pipeline.stackers import (STACKERS, StackInputs, _full_batch_sgd, fit_stackers, load_state, make_stacker,
                               paper_weights, save_state)

FEW_EPOCHS = 100  # mmshap-paper's 50,000 full-batch epochs, shortened for a unit test


def collapsed_problem(n: int, k: int = 6, seed: int = 0, extra_kind: bool = False):
    """Text knows classes 0-2, image knows 3-5, the multimodal model collapsed onto text.

    Reliance as issue 11 delivers it: T-SHAP NULL on a tenth (not estimated) and wherever a
    modality is missing (a twentieth lacks the image, whose model then says nothing useful).
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    onehot = np.eye(k)[y]
    has_image = rng.random(n) > 0.05
    text = rng.normal(0, 1, (n, k)) + 4 * onehot * (y < 3)[:, None]
    image = rng.normal(0, 1, (n, k)) + 4 * onehot * ((y >= 3) & has_image)[:, None]
    mm = text + rng.normal(0, 0.3, (n, k))
    t_shap = np.clip(0.95 - 0.05 * rng.random(n), 0, 1)
    t_shap[(rng.random(n) < 0.1) | ~has_image] = np.nan
    stderr = np.where(np.isfinite(t_shap), 0.02, np.nan)
    game = np.where(has_image, 0.9, np.nan)
    logits = {"text": text, "image": image, "multimodal": mm}
    if extra_kind:  # a fourth base learner (a sparse text model): a noisier copy of the text model
        logits["tfidf"] = text + rng.normal(0, 1.0, (n, k))
    return StackInputs(logits, t_shap, None, has_image, stderr, game), y


def accuracy(p, y):
    return float((p.argmax(1) == y).mean())


@pytest.mark.parametrize("extra_kind", [False, True])
def test_every_stacker_fits_predicts_and_round_trips_with_null_reliance(extra_kind):
    x, y = collapsed_problem(600, extra_kind=extra_kind)
    xt, yt = collapsed_problem(400, seed=1, extra_kind=extra_kind)
    stackers = fit_stackers(x, y, paper_epochs=FEW_EPOCHS)
    assert set(stackers) == set(STACKERS)
    acc = {}
    for name, s in stackers.items():
        p = s.predict_proba(xt)
        assert p.shape == (400, 6) and np.isfinite(p).all() and np.allclose(p.sum(1), 1, atol=1e-5), name
        tensors, meta = save_state(s)
        assert np.allclose(load_state(tensors, meta).predict_proba(xt), p, atol=1e-6), name
        acc[name] = accuracy(p, yt)
    # the collapsed multimodal model is right on half the classes; fitted stackers recover the image half
    assert acc["multimodal"] < 0.7
    for name in ("mmshap", "mmshap-pool", "lightgbm", "ffn"):
        assert acc[name] > acc["multimodal"] + 0.2, acc


def test_paper_weights_favour_the_modality_the_multimodal_model_neglects():
    x, _ = collapsed_problem(300)
    w = paper_weights(x, x.kinds)
    t = np.nanmean(np.where(x.has_image, x.t_shap, np.nan))
    assert np.allclose(w, [1 - t, t, 1.0], atol=1e-6)  # text, image, multimodal
    assert w[1] > w[0]  # collapsed onto text: the image model gets the larger say
    x.t_shap[:] = np.nan  # nothing estimated: no preference
    assert np.allclose(paper_weights(x, x.kinds), [0.5, 0.5, 1.0])


def test_paper_stacker_trains_full_batch_and_early_stopping_keeps_the_best_epoch():
    x, y = collapsed_problem(300)
    full = make_stacker("mmshap-paper", paper_epochs=100).fit(x, y)
    es = make_stacker("mmshap-paper-es", paper_epochs=100).fit(x, y)
    assert full.epochs_run == 100 and es.epochs_run <= 100 and es.cfg["early_stopping"]
    # a validation set that punishes fitting the training labels: stopped early, at its best state
    torch.manual_seed(0)
    xs = torch.randn(200, 6)
    ys = xs[:, :3].argmax(1)
    val = (xs, (ys + 1) % 3)
    net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    losses = []
    start = nn.functional.cross_entropy(net(val[0]), val[1]).item()
    epochs = _full_batch_sgd(net, xs, ys, lr=0.5, epochs=5_000, val=val, check_every=10, patience=5)
    losses.append(nn.functional.cross_entropy(net(val[0]), val[1]).item())
    assert epochs < 500 and losses[0] <= start + 1e-6


def test_reliance_gates_pick_the_model_the_product_needs():
    """Per product either the text or the image model knows the class, and T-SHAP says which;
    only the gated stacker that reads T-SHAP can use that, a plain pool cannot."""
    rng = np.random.default_rng(3)

    def problem(n):
        k = 5
        y = rng.integers(0, k, n)
        text_knows = rng.random(n) < 0.5
        onehot = np.eye(k)[y]
        text = rng.normal(0, 1, (n, k)) + 3 * onehot * text_knows[:, None]
        image = rng.normal(0, 1, (n, k)) + 3 * onehot * ~text_knows[:, None]
        t = np.clip(np.where(text_knows, 0.8, 0.2) + rng.normal(0, 0.05, n), 0, 1)
        return StackInputs({"text": text, "image": image, "multimodal": (text + image) / 2}, t), y

    (x, y), (xt, yt) = problem(1500), problem(1500)
    acc = {n: accuracy(s.predict_proba(xt), yt) for n, s in fit_stackers(x, y, ["mmshap", "mmshap-pool",
                                                                             "mmshap-no-tshap"]).items()}
    assert acc["mmshap"] > acc["mmshap-pool"] + 0.03 and acc["mmshap"] > acc["mmshap-no-tshap"] + 0.03, acc


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


def test_bootstrap_intervals_have_the_known_answer():
    rng = np.random.default_rng(0)
    n = 4000
    y = rng.integers(0, 2, n)
    # identical predictors: the difference is exactly 0 in every resample
    same = paired_bootstrap(y, y, y, [0, 1], n=200)
    assert same["diff_ci"] == (0.0, 0.0) and same["f1_a_ci"] == (1.0, 1.0)
    # right with probability 0.8 on balanced classes: macro-F1 ~ accuracy, whose standard error is
    # sqrt(p (1 - p) / n), so the 95% interval is about 2 * 1.96 * 0.0063 = 0.025 wide around the point
    pred = np.where(rng.random(n) < 0.8, y, 1 - y)
    r = paired_bootstrap(y, pred, y, [0, 1], n=1000)
    lo, hi = r["f1_a_ci"]
    width = 2 * 1.959964 * np.sqrt(0.8 * 0.2 / n)
    assert lo < r["f1_a"] < hi and abs((hi - lo) - width) < 0.15 * width
    lo, hi = r["diff_ci"]  # against a perfect predictor the difference is the same quantity minus 1
    assert abs(lo - (r["f1_a_ci"][0] - 1)) < 0.004 and abs(hi - (r["f1_a_ci"][1] - 1)) < 0.004
    # the point estimate of every resampled score is the sklearn one when nothing is resampled
    b = bootstrap_scores(y, {"p": pred}, [0, 1], n=1000)
    assert b["p"]["macro_f1"][0] < scores(y, pred, [0, 1])["macro_f1"] < b["p"]["macro_f1"][1]


def test_wilson_interval():
    assert wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(8, 10)  # the textbook example: 0.490 to 0.943
    assert abs(lo - 0.4902) < 1e-3 and abs(hi - 0.9433) < 1e-3
