"""A product's MM-SHAP on a trained model: exact where it can be, the same at any batch position,
NULL with a reason where it cannot be estimated, and it sees what each class relies on."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.backend import InProcessBackend
from pipeline.bundle import load_bundle
from pipeline.mmshap import MMShapConfig, explain, players_of, predicted_classes, product_game, product_seed
from pipeline.feed import read_feed
from pipeline.shapley import exact_shapley, mm_shap
from pipeline.records import Product


def seeds_of(products, key="test-bundle"):
    return np.array([product_seed(key, p) for p in products], np.uint64)


def products_of(feed, n=None):
    items = [p for p in read_feed(feed) if isinstance(p, Product)]
    return items[:n] if n else items


def test_batched_explain_equals_a_direct_computation(tiny_bundle):
    """Across products, coalitions share batches; the result must equal one product at a time."""
    feed, path = tiny_bundle
    backend = InProcessBackend(load_bundle(path))
    products = [replace(p, description="") for p in products_of(feed) if p.has_text and p.has_image][:3]
    enc = backend.encode(products)
    # budget 2^n: explain becomes exact, so it can be checked against exact_shapley per product
    sizes = [len(players_of(backend, enc, i, "token").is_text) for i in range(3)]
    budget = 2 ** max(sizes)
    assert max(sizes) <= 16
    got = explain(backend, enc, MMShapConfig(mode="token", budget=budget), seeds_of(products))
    pred = predicted_classes(backend, enc)
    for i in range(3):
        value, text = product_game(backend, enc, i, "token", pred)
        t, v = mm_shap(exact_shapley(value, len(text)), text)
        assert abs(got.t_shap[i] - t) < 1e-6 and abs(got.v_shap[i] - v) < 1e-6
        assert got.n_evaluations[i] == 2 ** len(text) and got.stderr[i] == 0 and got.method[i] == "exact"
        assert got.n_players[i] == len(text) and got.met_target[i]
        full, empty = value(np.ones((1, len(text)), bool))[0], value(np.zeros((1, len(text)), bool))[0]
        assert abs(got.phi_text[i] + got.phi_image[i] - (full - empty)) < 1e-6  # the modality game is efficient (float32 passes)


def test_image_classes_get_higher_v_shap_than_text_classes(tiny_bundle):
    """Pixel mode, the reference's players: p x p patches, p = ceil(sqrt(#text tokens))."""
    feed, path = tiny_bundle
    kinds = json.loads((feed.parent / "classes.json").read_text())
    backend = InProcessBackend(load_bundle(path))
    products = [p for p in products_of(feed) if p.has_text and p.has_image][:60]
    res = explain(backend, backend.encode(products), MMShapConfig(mode="pixel", budget=256), seeds_of(products))
    kind = np.array([kinds[p.label] for p in products])
    estimated = ~np.isnan(res.t_shap)
    assert estimated.mean() > 0.8
    v_image, v_text = (np.nanmean(res.v_shap[kind == k]) for k in ("image", "text"))
    assert v_image > v_text + 0.3, (v_image, v_text)
    assert (res.n_evaluations <= 256).all() and np.isfinite(res.stderr[estimated]).all()
    assert all(r.startswith("budget 256 < minimum") for r, e in zip(res.reason, estimated) if not e)


def test_pixel_mode_and_missing_modalities(tiny_bundle):
    feed, path = tiny_bundle
    backend = InProcessBackend(load_bundle(path))
    items = products_of(feed)
    products = [p for p in items if p.has_text and p.has_image][:2] + [p for p in items if not p.has_image][:1] \
        + [p for p in items if not p.has_text][:1]
    res = explain(backend, backend.encode(products), MMShapConfig(mode="pixel", target_stderr=0.05, cap=400),
                  seeds_of(products))
    assert ((res.t_shap[:2] >= 0) & (res.t_shap[:2] <= 1)).all() and np.allclose(res.t_shap[:2] + res.v_shap[:2], 1)
    assert (res.n_evaluations[:2] > 0).all() and (res.n_evaluations <= 400).all()
    assert all(res.met_target[i] == (res.stderr[i] <= 0.05) for i in range(2))
    # only one modality: no reliance to measure, NULL (never 1 or 0), nothing evaluated
    assert np.isnan(res.t_shap[2:]).all() and np.isnan(res.game_text_share[2:]).all()
    assert res.reason[2:] == ["missing modality: no image players", "missing modality: no text players"]
    assert (res.n_evaluations[2:] == 0).all() and res.method[2:] == ["none", "none"]


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """(backend, products): tiny-preset models as initialised, over a small generated catalogue:
    for what does not need a trained model (players, seeding, batching)."""
    from pipeline.models import KINDS, create_model
    from pipeline.presets import get_preset
    from pipeline.synthetic import make_catalogue
    from pipeline.tokenizer import train_tokenizer
    from train.crossfit import fold_backend

    feed = make_catalogue(tmp_path_factory.mktemp("untrained"), 24, 3, seed=11, image_size=32)
    products = products_of(feed)
    labels = sorted({p.label for p in products})
    preset = get_preset("tiny")
    tok = train_tokenizer([p.text for p in products], 120)  # a small vocabulary: words of several pieces
    torch.manual_seed(0)
    models = {k: create_model(k, preset, len(labels), vocab_size=tok.vocab_size).eval() for k in KINDS}
    backend = fold_backend(models, tok, preset, labels, "cpu")
    backend.batch_size = 16
    return backend, products


def test_same_t_shap_at_any_batch_position(untrained):
    """Seeded by product content, evaluated product by product: a product's T-SHAP does not depend
    on the batch it is in or its place there."""
    backend, products = untrained
    products = [p for p in products if p.has_text and p.has_image][:6]
    config = MMShapConfig(mode="pixel", target_stderr=0.05, cap=300)
    first = explain(backend, backend.encode(products), config, seeds_of(products))
    moved = products[3:] + products[:3]
    second = explain(backend, backend.encode(moved), config, seeds_of(moved))
    np.testing.assert_array_equal(np.r_[first.t_shap[3:], first.t_shap[:3]], second.t_shap)
    np.testing.assert_array_equal(np.r_[first.stderr[3:], first.stderr[:3]], second.stderr)
    alone = explain(backend, backend.encode(products[4:5]), config, seeds_of(products[4:5]))
    assert alone.t_shap[0] == first.t_shap[4]
    other = explain(backend, backend.encode(products), config, seeds_of(products, "another-bundle"))
    assert not np.array_equal(other.t_shap, first.t_shap)  # the seed key matters


def test_word_players_group_word_pieces(untrained):
    backend, products = untrained
    products = [p for p in products if p.has_text and p.has_image][:20]
    enc = backend.encode(products)
    tokens = [players_of(backend, enc, i, "token", "token") for i in range(len(products))]
    words = [players_of(backend, enc, i, "token", "word") for i in range(len(products))]
    assert all(w.n_text <= t.n_text for t, w in zip(tokens, words))
    assert any(w.n_text < t.n_text for t, w in zip(tokens, words))  # some word has several pieces
    for t, w in zip(tokens, words):
        assert np.array_equal(w.text_pos, t.text_pos) and (np.diff(w.word) >= 0).all()
    res = explain(backend, enc, MMShapConfig(mode="token", budget=2000, players="word"), seeds_of(products))
    assert (res.n_players == [len(w.is_text) for w in words]).all()


def test_pixel_mode_encodes_each_distinct_image_coalition_once(untrained):
    """Pixel-mode coalition values are the whole model's on the masked pixels, while the image
    encoder sees each distinct image coalition once (a permutation walk has n_image + 1 of them)."""
    from pipeline.mmshap import _patch_masks, coalition_values
    from pipeline.stackers import log_softmax

    backend, products = untrained
    product = next(p for p in products if p.has_text and p.has_image)
    enc = backend.encode([product])
    pl = players_of(backend, enc, 0, "pixel")
    n = len(pl.is_text)
    walk = np.arange(n + 1)[:, None] > np.random.default_rng(0).permutation(n)[None, :]  # one permutation's prefixes
    masks = np.concatenate([walk, walk[::-1]])  # repeated coalitions too
    encoded = []
    real = backend.image_embeddings
    backend.image_embeddings = lambda px: (encoded.append(len(px)), real(px))[1]
    try:
        values = coalition_values(backend, enc, 0, pl, masks, "pixel", predicted=1)
    finally:
        del backend.image_embeddings
    assert sum(encoded) == pl.n_image + 1 < len(masks)

    tmask = np.repeat(enc.text_mask, len(masks), 0)
    tmask[:, pl.text_pos] = masks[:, : pl.n_text]
    pixels = enc.clip_pixels[[0] * len(masks)] * _patch_masks(masks[:, pl.n_text :], enc.clip_pixels.shape[-1])
    whole = backend.multimodal_logits(np.repeat(enc.input_ids, len(masks), 0), tmask, pixels,
                                      np.repeat(enc.image_mask(backend.num_image_embeds), len(masks), 0))
    np.testing.assert_allclose(values, log_softmax(whole.astype(np.float64))[:, 1], atol=1e-5)
