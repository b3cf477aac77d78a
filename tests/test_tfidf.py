"""The sparse text base learner: the baseline's predictions from pure-data files, inside a bundle,
stacked as a fourth base model, and evaluated beside the others."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.bundle import load_bundle
from pipeline.manifest import BundleError, base_kinds, bundle_id, read_manifest
from pipeline.stackers import load_stackers
from pipeline.tfidf import NEVER, TfidfModel

WORDS = ["red dress", "blue shirt", "black boots", "gold ring", "green hat"]


def texts_and_labels(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    filler = ["soft", "cotton", "wool", "slim", "long", "warm"]
    y = rng.integers(0, len(WORDS), n)
    return [f"{WORDS[c]} {' '.join(rng.choice(filler, 3))}" for c in y], y


def test_saved_model_predicts_what_scikit_learn_fitted(tmp_path):
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from pipeline.tfidf import C, VECTORIZERS

    texts, y = texts_and_labels(120)
    model = TfidfModel.fit(texts, y, n_classes=6)  # class 5 never seen
    files = model.save(tmp_path)
    loaded = TfidfModel.load(tmp_path / files["file"], tmp_path / files["vocab"])
    test, _ = texts_and_labels(30, seed=1)
    test.append("a title with no known word")

    vecs = [TfidfVectorizer(**kw) for kw in VECTORIZERS.values()]
    clf = LogisticRegression(C=C, max_iter=2000).fit(hstack([v.fit_transform(texts) for v in vecs]).tocsr(), y)
    expected = clf.predict_proba(hstack([v.transform(test) for v in vecs]).tocsr())
    z = loaded.logits(test)
    assert z.shape == (31, 6) and z.dtype == np.float32
    assert np.allclose(z, model.logits(test), atol=1e-6)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert np.allclose(p[:, :5], expected, atol=1e-4) and (z[:, 5] == NEVER).all()
    assert json.loads((tmp_path / files["vocab"]).read_text())["word"][:2]  # terms are stored as text
    assert loaded.logits([]).shape == (0, 6)


def test_two_classes_keep_scikit_learns_probabilities():
    texts, y = texts_and_labels(80)
    y = (y % 2) * 2  # classes 0 and 2 of 3
    model = TfidfModel.fit(texts, y, n_classes=3)
    z = model.logits(texts[:10])
    assert np.allclose(z[:, 0], -z[:, 2]) and (z[:, 1] == NEVER).all()


@pytest.fixture(scope="module")
def tfidf_bundle(tmp_path_factory):
    from pipeline.synthetic import make_catalogue
    from train.data import TrainConfig
    from train.train_bundle import train_bundle

    root = tmp_path_factory.mktemp("tfidf")
    feed = make_catalogue(root / "cat", 160, 4, seed=5, image_size=32, drop_image=0.05, drop_text=0.05)
    cfg = TrainConfig(preset="tiny", folds=2, min_class_size=5, mmshap_budget=0, epochs=1, test_fraction=0.25,
                      seed=0, stackers=("mmshap", "ffn", "mmshap-paper-sum"), tfidf=True)
    train_bundle(feed, root / "bundle", cfg, log=lambda *a: None)
    return feed, root / "bundle"


def test_bundle_holds_and_stacks_the_sparse_model(tfidf_bundle):
    feed, path = tfidf_bundle
    manifest = read_manifest(path)
    assert base_kinds(manifest) == ["text", "image", "multimodal", "tfidf"]
    assert set(manifest["metrics"]["oof"]) == {"text", "image", "multimodal", "tfidf"}
    bundle = load_bundle(path)
    assert bundle.kinds == base_kinds(manifest) and bundle.sparse["tfidf"].n_classes == len(bundle.labels)
    for name, stacker in load_stackers(path).items():
        assert stacker.kinds == ["text", "image", "multimodal", "tfidf"], name
    gated = load_stackers(path, ["mmshap"])["mmshap"]
    assert gated.state()[0]["a"].shape[0] == 4  # one gate per base model


def test_sparse_model_is_part_of_the_bundle_id_and_checked(tfidf_bundle, tmp_path):
    import shutil

    from pipeline.manifest import content_hash

    _, path = tfidf_bundle
    copy = tmp_path / "b"
    shutil.copytree(path, copy)
    manifest = read_manifest(copy)
    changed = {**manifest, "sparse": {"tfidf": {**manifest["sparse"]["tfidf"], "sha256": "0" * 64}}}
    assert content_hash(changed) != manifest["content_hash"]  # other weights: another bundle id
    vocab = copy / manifest["sparse"]["tfidf"]["vocab"]
    vocab.write_text(vocab.read_text().replace('"', "'", 2))
    with pytest.raises(BundleError, match="does not match its hash"):
        load_bundle(copy)
    assert bundle_id(manifest) == bundle_id(read_manifest(path))


def test_evaluate_and_classify_read_the_fourth_model(tfidf_bundle, tmp_path):
    from db.engine import connect
    from db.results import load_inferred
    from jobs.classify import classify_feed
    from shapstack.settings import Settings
    from sqlalchemy import select
    from db import models as m
    from train.evaluate import evaluate_bundle

    feed, path = tfidf_bundle
    table = evaluate_bundle(feed, path, split="test", budget=0, n_boot=100, log=lambda *a: None)
    assert {"text", "image", "multimodal", "tfidf", "mmshap", "ffn"} <= set(table)
    assert 0 <= table["tfidf"]["macro_f1"] <= 1

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    settings = Settings(database_url=url, bundle=str(path), mmshap_budget=0, device="cpu")
    factory = connect(url)
    classify_feed(factory, settings, str(feed), split="test")
    with factory() as s:
        pks = list(s.scalars(select(m.Product.id)))
        kinds = set(s.scalars(select(m.BaseLogits.model_kind)))
        ready, inferred = load_inferred(s, bundle_id(read_manifest(path)), pks, base_kinds(read_manifest(path)))
        n_predicted = s.scalar(select(m.Prediction.id).limit(1))
    assert kinds == {"text", "image", "multimodal", "tfidf"} and len(ready) == len(pks) > 0
    assert set(inferred.logits) == kinds and n_predicted is not None
