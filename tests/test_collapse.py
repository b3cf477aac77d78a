"""Collapse flags mean collapse: a multimodal model that ignores a modality carrying signal, with
the unimodal models' evidence and intervals; healthy reliance and absent modalities raise nothing."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from pipeline.collapse import Thresholds, collapse_metrics, reference_counts
from pipeline.feed import read_feed
from pipeline.records import Product


def as_dict(rows):
    return {(scope, metric): value for scope, metric, value in rows}


def image_class_products(n: int, mm_follows: str, seed: int = 0):
    """n products of one class that only the image tells apart: the image model is right on 90%,
    the text model guesses among 4 classes; the multimodal model follows `mm_follows`."""
    rng = np.random.default_rng(seed)
    label = np.zeros(n, int)
    image = np.where(rng.random(n) < 0.9, 0, rng.integers(1, 4, n))
    text = rng.integers(0, 4, n)
    mm = {"image": image, "text": text}[mm_follows].copy()
    t_shap = np.clip(rng.normal(0.2 if mm_follows == "image" else 0.85, 0.1, n), 0, 1)
    return t_shap, label, {"text": text, "image": image, "multimodal": mm}


def test_healthy_reliance_on_the_image_raises_no_flag():
    """The demo's false alarm: classes only the image can tell apart, a model that leans on the image."""
    t, label, preds = image_class_products(200, "image")
    rows = as_dict(collapse_metrics(t, np.array(["image_00"] * 200), preds, label=label))
    assert rows[("image_00", "flag_image_collapse")] == 0.0 and rows[("image_00", "flag_text_collapse")] == 0.0
    assert rows[("image_00", "evidence_image_signal_ci_low")] > 0.5  # the image carries the signal ...
    assert rows[("image_00", "evidence_image_ignored_ci_high")] < 0.5  # ... and the model uses it
    assert rows[("image_00", "mean_t_shap")] < 0.3  # strongly image-dominated: no longer a flag by itself


def test_ignoring_the_image_where_it_carries_signal_is_flagged_with_evidence():
    t, label, preds = image_class_products(200, "text")
    rows = as_dict(collapse_metrics(t, np.array(["image_00"] * 200), preds, label=label))
    assert rows[("image_00", "flag_image_collapse")] == 1.0 and rows[("image_00", "flag_text_collapse")] == 0.0
    for evidence in ("evidence_image_signal", "evidence_image_ignored", "evidence_image_share"):
        lo, hi = rows[("image_00", f"{evidence}_ci_low")], rows[("image_00", f"{evidence}_ci_high")]
        assert lo <= rows[("image_00", evidence)] <= hi and rows[("image_00", f"{evidence}_n")] > 0
    assert rows[("image_00", "evidence_image_signal_from_labels")] == 1.0
    assert rows[("image_00", "evidence_image_ignored")] > 0.9

    # unlabelled: the signal comes from the training reference of the same scope, or nothing is flagged
    reference = reference_counts(t, np.array(["image_00"] * 200), preds, label, np.ones(200, bool), np.ones(200, bool))
    rows = as_dict(collapse_metrics(t, np.array(["image_00"] * 200), preds, Thresholds(), reference))
    assert rows[("image_00", "flag_image_collapse")] == 1.0
    assert rows[("image_00", "evidence_image_signal_from_labels")] == 0.0
    rows = as_dict(collapse_metrics(t, np.array(["image_00"] * 200), preds))
    assert ("image_00", "flag_image_collapse") not in rows and ("image_00", "evidence_image_ignored") in rows


def test_products_lacking_a_modality_raise_no_flag_and_leave_reliance():
    """Without an image the multimodal model can only follow the text: absence, not collapse."""
    n = 100
    rng = np.random.default_rng(1)
    label = rng.integers(0, 4, n)
    text = label.copy()
    image = rng.integers(0, 4, n)  # the image model on a blank picture
    preds = {"text": text, "image": image, "multimodal": text.copy()}
    t_shap = np.ones(n)  # what the sampler records for a text-only product
    rows = as_dict(collapse_metrics(t_shap, np.array(["a"] * n), preds, label=label,
                                    has_image=np.zeros(n, bool)))
    assert rows[("a", "n_disagree")] == 0 and rows[("a", "n_reliance")] == 0
    assert ("a", "mean_t_shap") not in rows and ("a", "text_dominated_share") not in rows
    assert rows.get(("a", "flag_text_collapse"), 0.0) == 0.0 and rows.get(("a", "flag_image_collapse"), 0.0) == 0.0
    # and the mirror image: products lacking text
    rows = as_dict(collapse_metrics(np.zeros(n), np.array(["a"] * n), {**preds, "multimodal": image}, label=label,
                                    has_text=np.zeros(n, bool)))
    assert rows.get(("a", "flag_text_collapse"), 0.0) == 0.0 and rows[("a", "n_disagree")] == 0


def test_null_t_shap_is_left_out_and_drift_has_an_interval():
    n = 200
    rng = np.random.default_rng(2)
    t = rng.uniform(0.55, 0.65, n)
    t[:50] = np.nan  # not estimated
    preds = {k: rng.integers(0, 3, n) for k in ("text", "image", "multimodal")}
    cats = np.array(["a"] * 100 + ["b"] * 100)
    ones = np.ones(n, bool)
    ref = reference_counts(np.full(n, 0.3), cats, preds, rng.integers(0, 3, n), ones, ones)
    rows = as_dict(collapse_metrics(t, cats, preds, Thresholds(), ref))
    assert rows[("all", "n_reliance")] == 150 and abs(rows[("all", "mean_t_shap")] - np.nanmean(t)) < 1e-12
    assert rows[("a", "flag_drift")] == 1.0 and rows[("a", "drift_t_shap_ci_low")] > 0.15
    near = reference_counts(np.full(n, 0.58), cats, preds, rng.integers(0, 3, n), ones, ones)
    assert as_dict(collapse_metrics(t, cats, preds, Thresholds(), near))[("b", "flag_drift")] == 0.0
    assert ("c", "n") not in rows


def _products(feed) -> list[Product]:
    return [p for p in read_feed(feed) if isinstance(p, Product)]


def _trained(tmp_path, name: str, kinds: list[str], model_kinds: tuple[str, ...]):
    """Tiny models of model_kinds trained on a catalogue whose classes all carry one modality."""
    from pipeline.presets import get_preset
    from pipeline.preprocess import encode_products
    from pipeline.synthetic import make_catalogue
    from pipeline.tokenizer import train_tokenizer
    from train.base_models import fit
    from train.crossfit import fold_backend

    products = _products(make_catalogue(tmp_path / name, 160, len(kinds), seed=5, image_size=32, kinds=kinds))
    labels = sorted({p.label for p in products})
    preset = get_preset("tiny")
    tok = train_tokenizer([p.text for p in products], preset["vocab_size"])
    enc = encode_products(products, tok, preset)
    y = np.array([labels.index(p.label) for p in products])
    models = {k: fit(k, preset, enc, y, len(labels), vocab_size=tok.vocab_size, seed=0)[0] for k in model_kinds}
    return fold_backend(models, tok, preset, labels, "cpu")


def test_planted_collapse_is_flagged_and_a_healthy_model_is_not(tmp_path, tiny_bundle):
    """A multimodal model trained where only words matter, fed products where the image decides and
    the words mislead, follows the words: flagged. The healthy tiny bundle is not flagged anywhere."""
    from pipeline.backend import InProcessBackend
    from pipeline.bundle import load_bundle
    from pipeline.synthetic import make_catalogue

    words = _trained(tmp_path, "words", ["text"] * 4, ("text", "multimodal"))
    pictures = _trained(tmp_path, "pictures", ["image"] * 4, ("image",))
    # fresh products of the same classes (class_seed): class i's picture with class i+1's words
    by_pictures = _products(make_catalogue(tmp_path / "t-pictures", 80, 4, seed=9, class_seed=5, image_size=32,
                                           kinds=["image"] * 4))
    words_of = {}
    for p in _products(make_catalogue(tmp_path / "t-words", 80, 4, seed=9, class_seed=5, image_size=32,
                                      kinds=["text"] * 4)):
        words_of.setdefault(int(p.label[-2:]), p)
    planted = [replace(p, title=words_of[(int(p.label[-2:]) + 1) % 4].title,
                       description=words_of[(int(p.label[-2:]) + 1) % 4].description) for p in by_pictures]
    y = np.array([int(p.label[-2:]) for p in planted])
    logits = {**words.base_logits(words.encode(planted)), **pictures.base_logits(pictures.encode(planted))}
    preds = {k: v.argmax(1) for k, v in logits.items()}
    assert (preds["image"] == y).mean() > 0.8 and (preds["text"] == (y + 1) % 4).mean() > 0.8
    rows = as_dict(collapse_metrics(np.full(len(y), np.nan), np.array(["all"] * len(y)), preds, label=y))
    # out of its depth on these pictures it sides with the words or with neither, never the picture
    assert rows[("all", "flag_image_collapse")] == 1.0 and rows[("all", "flag_text_collapse")] == 0.0
    assert rows[("all", "evidence_image_ignored")] > 0.9 and rows[("all", "evidence_image_signal")] > 0.9

    feed, path = tiny_bundle
    backend = InProcessBackend(load_bundle(path))
    products = _products(feed)
    enc = backend.encode(products)
    logits = backend.base_logits(enc)
    labels = backend.bundle.labels
    y = np.array([labels.index(p.label) for p in products])
    preds = {k: v.argmax(1) for k, v in logits.items()}
    rows = collapse_metrics(np.full(len(y), np.nan), np.array(labels)[preds["multimodal"]], preds, label=y,
                            has_text=enc.has_text, has_image=enc.has_image)
    raised = [(scope, m) for scope, m, v in rows if m.startswith("flag_") and v]
    assert raised == [] and any(m == "flag_image_collapse" for _, m, _ in rows)


def test_drift_reference_of_a_k_fold_bundle_comes_from_its_final_models(tiny_bundle):
    """With 2 folds the final models are retrained on everything and rely on the modalities
    otherwise than the fold models: the reference's T-SHAP comes from the final models' MM-SHAP of
    training products, so held-out products of the same catalogue, classified at the bundle's
    policy and grouped by the default stacker's prediction, raise no drift flag."""
    from pipeline.backend import InProcessBackend
    from pipeline.bundle import load_bundle
    from pipeline.inference import infer, stack_inputs
    from pipeline.mmshap import mmshap_config
    from pipeline.split import split_selector
    from pipeline.stackers import load_stackers

    feed, path = tiny_bundle
    bundle = load_bundle(path)
    reference = bundle.manifest["extra"]["collapse_reference"]
    assert "T-SHAP: the final models on" in reference["source"]
    test = split_selector(bundle.manifest, "test")
    products = [p for p in _products(feed) if test(p)]
    x = stack_inputs(infer(InProcessBackend(bundle), products, mmshap_config(bundle.manifest), seed_key="drift"))
    name = bundle.manifest["extra"]["default_stacker"]
    labels = np.array(bundle.labels)
    category = labels[load_stackers(path)[name].predict_proba(x).argmax(1)]
    preds = {k: labels[x.logits[k].argmax(1)] for k in ("text", "image", "multimodal")}
    rows = collapse_metrics(x.t_shap, category, preds, reference=reference["stackers"][name],
                            has_text=x.has_text, has_image=x.has_image)
    drift = {scope: v for scope, m, v in rows if m == "drift_t_shap"}
    assert drift and not [scope for scope, m, v in rows if m == "flag_drift" and v], drift
