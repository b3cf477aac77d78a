"""Training: the base models learn the modality that carries each class; bundles, resume, evaluate."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from pipeline.backend import InProcessBackend
from pipeline.bundle import load_bundle
from pipeline.records import Product
from pipeline.feed import read_feed
from pipeline.split import keep
from train.data import TrainConfig
from train.train_bundle import train_bundle
from train.evaluate import evaluate_bundle


def held_out(feed, bundle):
    extra = bundle.manifest["extra"]
    return [p for p in read_feed(feed) if isinstance(p, Product) and keep(p, "test", extra["test_fraction"], extra["seed"])]


def test_each_base_model_learns_its_modality(tiny_bundle):
    feed, path = tiny_bundle
    bundle = load_bundle(path)
    kinds = json.loads((feed.parent / "classes.json").read_text())
    products = [p for p in held_out(feed, bundle) if p.has_text and p.has_image]
    backend = InProcessBackend(bundle)
    logits = backend.base_logits(backend.encode(products))
    y = np.array([bundle.labels.index(p.label) for p in products])
    kind = np.array([kinds[p.label] for p in products])

    def acc(model, k):
        return float((logits[model].argmax(1)[kind == k] == y[kind == k]).mean())

    # text-only classes: told apart by words; the image model can only guess among them
    assert acc("text", "text") >= 0.85 and acc("text", "text") > acc("image", "text") + 0.2
    # image-only classes: the mirror image
    assert acc("image", "image") >= 0.85 and acc("image", "image") > acc("text", "image") + 0.2
    assert bundle.manifest["metrics"]["folds"] == 2 and "all" in bundle.manifest["extra"]["collapse_reference"]["stackers"]["mmshap"]


def test_missing_modality_products_get_finite_logits(tiny_bundle):
    feed, path = tiny_bundle
    bundle = load_bundle(path)
    products = [p for p in read_feed(feed) if isinstance(p, Product)]
    odd = [p for p in products if not p.has_image][:3] + [p for p in products if not p.has_text][:3]
    assert len(odd) == 6
    backend = InProcessBackend(bundle)
    enc = backend.encode(odd)
    assert enc.has_image.tolist() == [False] * 3 + [True] * 3
    for v in backend.base_logits(enc).values():
        assert np.isfinite(v).all()


def test_training_resumes_and_is_deterministic(tmp_path):
    from pipeline.synthetic import make_catalogue

    feed = make_catalogue(tmp_path / "c", 60, 4, seed=2, image_size=32)
    cfg = TrainConfig(preset="tiny", folds=2, min_class_size=3, mmshap_budget=8, epochs=1, seed=3, paper_epochs=50)
    logs: list[str] = []
    first = train_bundle(feed, tmp_path / "b", cfg, log=logs.append)
    assert not any("resumed" in line for line in logs)
    logs.clear()
    again = train_bundle(feed, tmp_path / "b", cfg, log=logs.append)
    assert sum("resumed" in line for line in logs) == 9  # 2 folds + final, 3 models each
    assert again["content_hash"] == first["content_hash"]
    fresh = train_bundle(feed, tmp_path / "b2", cfg, log=lambda *_: None)
    assert fresh["content_hash"] == first["content_hash"]  # same seed, same weights
    logs.clear()
    other = train_bundle(feed, tmp_path / "b", replace(cfg, mmshap_budget=12), log=logs.append)
    assert sum("resumed" in line for line in logs) == 9  # another MM-SHAP budget reuses the trained models
    assert other["content_hash"] == first["content_hash"] and other["extra"]["mmshap"]["budget"] == 12


def test_too_few_classes_is_a_clear_error(tmp_path):
    from pipeline.synthetic import make_catalogue

    feed = make_catalogue(tmp_path / "c", 20, 4, seed=2, image_size=32)
    with pytest.raises(ValueError, match="at least 2 classes"):
        train_bundle(feed, tmp_path / "b", TrainConfig(preset="tiny", min_class_size=100))


def test_evaluate_reports_every_model_and_stacker(tiny_bundle, tmp_path):
    feed, path = tiny_bundle
    table = evaluate_bundle(feed, path, split="test", report=tmp_path / "r", budget=16, tfidf=True, log=lambda *_: None)
    assert {"text", "image", "multimodal", "mmshap", "mmshap-paper", "lightgbm", "ffn", "mean", "tfidf+lr"} <= set(table)
    for row in table.values():
        assert 0 <= row["macro_f1"] <= 1 and 0 <= row["accuracy"] <= 1
    files = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"per_class.csv", "metrics.json", "table.txt", "confusion_multimodal.png"} <= files


def test_evaluate_gives_intervals_and_refits_seeded_stackers(tiny_bundle):
    feed, path = tiny_bundle
    table = evaluate_bundle(feed, path, split="test", budget=16, seeds=2, n_boot=200, log=lambda *_: None)
    best_base = max(("text", "image", "multimodal"), key=lambda k: table[k]["macro_f1"])
    assert table[best_base]["diff_f1"] == 0 and table[best_base]["diff_f1_ci"] == [0.0, 0.0]
    for name, row in table.items():
        lo, hi = row["macro_f1_ci"]
        assert lo <= row["macro_f1"] <= hi, name
        lo, hi = row["diff_f1_ci"]
        assert lo <= row["diff_f1"] + 1e-9 and row["diff_f1"] - 1e-9 <= hi, name
    assert len(table["ffn"]["macro_f1_seeds"]) == 2 and table["ffn"]["macro_f1_seed_sd"] >= 0
    assert "macro_f1_seeds" not in table["mmshap"]  # deterministic: nothing to repeat
