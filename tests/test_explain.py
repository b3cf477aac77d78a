"""Sampled MM-SHAP of the multimodal model: batching is exact, and it sees what each class relies on."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np

from pipeline.backend import InProcessBackend
from pipeline.bundle import load_bundle
from pipeline.explain import _players, explain, predicted_classes, product_game
from pipeline.feed import read_feed
from pipeline.mmshap import exact_shapley, mm_shap
from pipeline.records import Product


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
    sizes = [len(_players(enc, i, "token", backend.num_image_embeds)[0]) + backend.num_image_embeds for i in range(3)]
    budget = 2 ** max(sizes)
    assert max(sizes) <= 16
    got = explain(backend, enc, budget=budget, mode="token")
    pred = predicted_classes(backend, enc)
    for i in range(3):
        value, text = product_game(backend, enc, i, "token", pred)
        t, v = mm_shap(exact_shapley(value, len(text)), text)
        assert abs(got.t_shap[i] - t) < 1e-6 and abs(got.v_shap[i] - v) < 1e-6
        assert got.n_evaluations[i] == 2 ** len(text) and got.stderr[i] == 0


def test_image_classes_get_higher_v_shap_than_text_classes(tiny_bundle):
    """Pixel mode, the reference's players: p x p patches, p = ceil(sqrt(#text tokens))."""
    feed, path = tiny_bundle
    kinds = json.loads((feed.parent / "classes.json").read_text())
    backend = InProcessBackend(load_bundle(path))
    products = [p for p in products_of(feed) if p.has_text and p.has_image][:60]
    res = explain(backend, backend.encode(products), budget=256, mode="pixel", seed=0)
    kind = np.array([kinds[p.label] for p in products])
    v_image, v_text = res.v_shap[kind == "image"].mean(), res.v_shap[kind == "text"].mean()
    assert v_image > v_text + 0.3, (v_image, v_text)
    assert (res.n_evaluations <= 256).all() and np.isfinite(res.stderr).all()


def test_pixel_mode_and_missing_modalities(tiny_bundle):
    feed, path = tiny_bundle
    backend = InProcessBackend(load_bundle(path))
    items = products_of(feed)
    products = [p for p in items if p.has_text and p.has_image][:2] + [p for p in items if not p.has_image][:1] \
        + [p for p in items if not p.has_text][:1]
    res = explain(backend, backend.encode(products), budget=64, mode="pixel")
    assert ((res.t_shap >= 0) & (res.t_shap <= 1)).all() and np.allclose(res.t_shap + res.v_shap, 1)
    assert res.t_shap[2] == 1.0 and res.t_shap[3] == 0.0  # only one modality: all of it
    assert res.n_evaluations[2] == res.n_evaluations[3] == 0 and (res.n_evaluations[:2] > 0).all()


def _multimodal_on(tmp_path, name: str, kinds: list[str]):
    """A tiny multimodal model trained on a catalogue whose classes all carry one modality."""
    from pipeline.presets import get_preset
    from pipeline.preprocess import encode_products
    from pipeline.synthetic import make_catalogue
    from pipeline.tokenizer import train_tokenizer
    from train.crossfit import fold_backend
    from train.trainer import fit

    feed = make_catalogue(tmp_path / name, 160, len(kinds), seed=5, image_size=32, kinds=kinds)
    products = products_of(feed)
    labels = sorted({p.label for p in products})
    preset = get_preset("tiny")
    tok = train_tokenizer([p.text for p in products], preset["vocab_size"])
    enc = encode_products(products, tok, preset)
    y = np.array([labels.index(p.label) for p in products])
    model, _ = fit("multimodal", preset, enc, y, len(labels), vocab_size=tok.vocab_size, seed=0)
    return fold_backend({"multimodal": model}, tok, preset, labels, "cpu")


def test_text_collapse_raises_the_flag(tmp_path):
    """Trained where words decide every class, the multimodal model ignores images; fed products
    with planted misleading text it follows the words, and the collapse flag goes up."""
    from pipeline.collapse import collapse_metrics
    from pipeline.synthetic import make_catalogue

    def flags(backend, kinds, name, misleading):
        feed = make_catalogue(tmp_path / name, 60, len(kinds), seed=9, class_seed=5, image_size=32, kinds=kinds,
                              misleading_text=misleading)
        products = products_of(feed)
        enc = backend.encode(products)
        res = explain(backend, enc, budget=96, mode="pixel")
        pred = predicted_classes(backend, enc)
        rows = collapse_metrics(res.t_shap, pred, {"text": pred, "image": pred, "multimodal": pred})
        return {m: v for scope, m, v in rows if scope == "all"}

    text_model = _multimodal_on(tmp_path, "words", ["text"] * 4)
    collapsed = flags(text_model, ["text"] * 4, "planted", 0.5)
    assert collapsed["flag_text_collapse"] == 1.0 and collapsed["text_dominated_share"] > 0.5

    image_model = _multimodal_on(tmp_path, "pictures", ["image"] * 4)
    healthy = flags(image_model, ["image"] * 4, "pictures-test", 0.5)
    assert healthy["flag_text_collapse"] == 0.0 and healthy["mean_t_shap"] < collapsed["mean_t_shap"] - 0.3
