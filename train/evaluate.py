"""Evaluation in the layout of the paper's Table II: precision, recall, F1 per model, plus
weighted averages and accuracy, a per-class CSV and a confusion-matrix PNG."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

COLUMNS = ("macro_p", "macro_r", "macro_f1", "weighted_p", "weighted_r", "weighted_f1", "accuracy")


def scores(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[int]) -> dict[str, float]:
    """Macro averages over `labels` only (the classes evaluated), so absent classes do not count as 0."""
    out = {}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=list(labels), average=avg, zero_division=0)
        out.update({f"{avg}_p": float(p), f"{avg}_r": float(r), f"{avg}_f1": float(f)})
    out["accuracy"] = float(accuracy_score(y_true, y_pred))
    return out


def format_table(rows: dict[str, dict[str, float]], extra: dict[str, str] | None = None) -> str:
    """Table II style: one line per model, P / R / F1 (macro), then weighted F1 and accuracy."""
    head = f"{'model':<14} {'P':>6} {'R':>6} {'F1':>6}   {'wF1':>6} {'acc':>6}"
    lines = [head, "-" * len(head)]
    for name, s in rows.items():
        lines.append(f"{name:<14} {s['macro_p']:6.3f} {s['macro_r']:6.3f} {s['macro_f1']:6.3f}   "
                     f"{s['weighted_f1']:6.3f} {s['accuracy']:6.3f}" + (f"  {extra[name]}" if extra and name in extra else ""))
    return "\n".join(lines)


def per_class_csv(path: Path, y_true: np.ndarray, preds: dict[str, np.ndarray], classes: Sequence[str],
                  labels: Sequence[int]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "class", "support", "precision", "recall", "f1"])
        for name, y_pred in preds.items():
            p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=list(labels), zero_division=0)
            for i, c in enumerate(labels):
                w.writerow([name, classes[c], int(s[i]), f"{p[i]:.4f}", f"{r[i]:.4f}", f"{f[i]:.4f}"])


def confusion_png(path: Path, y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str],
                  labels: Sequence[int], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = confusion_matrix(y_true, y_pred, labels=list(labels)).astype(float)
    cm /= np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(labels)
    size = min(4 + 0.25 * n, 16)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    names = [classes[c][:24] for c in labels]
    ax.set_xticks(range(n), names, rotation=90, fontsize=max(4, 10 - n // 10))
    ax.set_yticks(range(n), names, fontsize=max(4, 10 - n // 10))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tfidf_baseline(train_texts: list[str], y_train: np.ndarray, test_texts: list[str]) -> np.ndarray:
    """TF-IDF (word 1-2 grams + char 3-5 grams) + logistic regression: the sanity anchor."""
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    word = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), min_df=2, sublinear_tf=True, max_features=200_000)
    xtr = hstack([word.fit_transform(train_texts), char.fit_transform(train_texts)]).tocsr()
    xte = hstack([word.transform(test_texts), char.transform(test_texts)]).tocsr()
    clf = LogisticRegression(C=10.0, max_iter=2000)
    clf.fit(xtr, y_train)
    return clf.classes_[clf.decision_function(xte).argmax(1)]


def evaluate_bundle(feed, bundle_path, *, split: str | None = None, report: Path | None = None, limits=None,
                    budget: int | None = None, device: str = "auto", batch_size: int = 64, tfidf: bool = False,
                    log=print) -> dict[str, dict[str, float]]:
    """Every base model and every stacker of a bundle on a labelled feed (or its held-out split)."""
    import json
    import time

    from pipeline.backend import InProcessBackend
    from pipeline.bundle import load_bundle
    from pipeline.explain import mmshap_config
    from pipeline.feed import batched
    from pipeline.records import Limits
    from pipeline.runner import infer
    from pipeline.stacking import KINDS, StackInputs, load_stackers
    from train.crossfit import TrainConfig, label_of, load_training_products

    limits = limits or Limits()
    bundle = load_bundle(bundle_path, device=device)
    extra = bundle.manifest.get("extra", {})
    cfg = TrainConfig(label_column=extra.get("label_column", "category"), seed=extra.get("seed", 0),
                      test_fraction=extra.get("test_fraction", 0.0))
    if split == "test" and not cfg.test_fraction:
        raise ValueError("the bundle was trained without --test-fraction: it has no held-out split")
    index = {c: i for i, c in enumerate(bundle.labels)}
    products = [p for p in load_training_products(feed, cfg, limits, split) if label_of(p, cfg.label_column) in index]
    if not products:
        raise ValueError("no labelled products of the bundle's classes in this feed")
    y = np.array([index[label_of(p, cfg.label_column)] for p in products])
    budget, mode = mmshap_config(bundle.manifest, budget)
    backend = InProcessBackend(bundle, device=device, batch_size=batch_size, limits=limits)
    started = time.perf_counter()
    parts = [infer(backend, chunk, budget=budget, mode=mode) for chunk in batched(products, batch_size)]
    elapsed = time.perf_counter() - started
    x = StackInputs({k: np.concatenate([p.logits[k] for p in parts]) for k in KINDS},
                    np.concatenate([p.contributions.t_shap for p in parts]),
                    np.concatenate([p.has_text for p in parts]), np.concatenate([p.has_image for p in parts]))
    preds = {k: x.logits[k].argmax(1) for k in KINDS}
    for name, stacker in load_stackers(bundle.path).items():
        if name not in KINDS:
            preds[name] = stacker.predict_proba(x).argmax(1)
    if tfidf:
        train = [p for p in load_training_products(feed, cfg, limits, "train" if cfg.test_fraction else None)
                 if label_of(p, cfg.label_column) in index]
        preds["tfidf+lr"] = tfidf_baseline([p.text for p in train],
                                           np.array([index[label_of(p, cfg.label_column)] for p in train]),
                                           [p.text for p in products])
    present = sorted(set(y.tolist()))
    table = {name: scores(y, pred, present) for name, pred in preds.items()}
    log(f"{len(products)} products, {len(present)} classes, {elapsed:.1f} s inference incl. MM-SHAP (budget {budget})")
    log(format_table(table))
    if report is not None:
        report = Path(report)
        report.mkdir(parents=True, exist_ok=True)
        per_class_csv(report / "per_class.csv", y, preds, bundle.labels, present)
        best = max((n for n in table if n not in KINDS and n != "tfidf+lr"), key=lambda n: table[n]["macro_f1"],
                   default="multimodal")
        for name in dict.fromkeys(["multimodal", best]):
            confusion_png(report / f"confusion_{name}.png", y, preds[name], bundle.labels, present, f"{name} (normalised by row)")
        (report / "metrics.json").write_text(json.dumps(
            {"table": table, "n_products": len(products), "classes": [bundle.labels[c] for c in present],
             "mean_t_shap": float(x.t_shap.mean()), "inference_s": elapsed}, indent=2))
        (report / "table.txt").write_text(format_table(table) + "\n")
    return table
