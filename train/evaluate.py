"""Evaluation in the layout of the paper's Table II: precision, recall, F1 per model, plus
weighted averages and accuracy, a per-class CSV and a confusion-matrix PNG."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.metrics import precision_recall_fscore_support

from jobs.plots import confusion_png
from pipeline.backend import InProcessBackend
from pipeline.bundle import load_bundle
from pipeline.errors import UserError
from pipeline.feed import batched
from pipeline.inference import infer, stack_inputs
from pipeline.metrics import format_table_ci, score_table, scores
from pipeline.mmshap import mmshap_config
from pipeline.records import KINDS, Limits
from pipeline.stackers import SEEDED, StackInputs, load_oof, load_stackers, make_stacker
from pipeline.tfidf import TfidfModel
from train.data import TrainConfig, label_of, load_training_products


def per_class_csv(path: Path, y_true: np.ndarray, preds: dict[str, np.ndarray], classes: Sequence[str],
                  labels: Sequence[int]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "class", "support", "precision", "recall", "f1"])
        for name, y_pred in preds.items():
            p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=list(labels), zero_division=0)
            for i, c in enumerate(labels):
                w.writerow([name, classes[c], int(s[i]), f"{p[i]:.4f}", f"{r[i]:.4f}", f"{f[i]:.4f}"])


def concat_inputs(parts: list[StackInputs]) -> StackInputs:
    return StackInputs({k: np.concatenate([p.logits[k] for p in parts]) for k in parts[0].logits},
                       *(np.concatenate([getattr(p, f) for p in parts])
                         for f in ("t_shap", "has_text", "has_image", "t_stderr", "game_text_share")))


def seed_spread(bundle_path, stackers: dict, x: StackInputs, y: np.ndarray, present: list[int], seeds: int,
                log=print) -> dict[str, list[float]]:
    """Macro-F1 of every seeded stacker refitted with seeds 0..seeds-1 on the bundle's out-of-fold inputs."""
    oof = load_oof(bundle_path)
    if oof is None:
        raise UserError("the bundle keeps no out-of-fold inputs (trained before --seeds existed): retrain it")
    x_oof, y_oof = oof
    out: dict[str, list[float]] = {}
    for name, fitted in stackers.items():
        if name not in SEEDED:
            continue
        epochs = getattr(fitted, "cfg", {}).get("epochs")
        for seed in range(seeds):
            s = make_stacker(name, paper_epochs=epochs or 1).fit(x_oof, y_oof, seed=seed)
            out.setdefault(name, []).append(scores(y, s.predict_proba(x).argmax(1), present)["macro_f1"])
        log(f"  {name}: {seeds} seeds refitted")
    return out


def evaluate_bundle(feed, bundle_path, *, split: str | None = None, report: Path | None = None, limits=None,
                    budget: int | None = None, mode: str | None = None, device: str = "auto", batch_size: int = 64,
                    tfidf: bool = False, seeds: int = 1, n_boot: int = 1000, log=print,
                    progress=None) -> dict[str, dict]:
    """Every base model and every stacker of a bundle on a labelled feed (or its held-out split).

    budget, mode: MM-SHAP coalitions per product and image players, resolved as `classify` does
    (None: as the bundle was trained). progress(n, total) is called after each batch.
    Each row: P, R, F1 (macro and weighted), accuracy, 95% paired-bootstrap intervals of macro P,
    R, F1 (n_boot resamples of the test products, seed 0) and of the macro-F1 difference to the
    best base model (or the TF-IDF baseline, when asked for and better); with seeds > 1, the seeded stackers are refitted on the bundle's out-of-fold
    inputs with seeds 0..seeds-1 and each row gets the mean and spread of its macro-F1.
    """
    limits = limits or Limits()
    bundle = load_bundle(bundle_path, device=device)
    extra = bundle.manifest.get("extra", {})
    cfg = TrainConfig(label_column=extra.get("label_column", "category"), seed=extra.get("seed", 0),
                      test_fraction=extra.get("test_fraction", 0.0))
    if split == "test" and not cfg.test_fraction:
        raise UserError("the bundle was trained without --test-fraction: it has no held-out split")
    index = {c: i for i, c in enumerate(bundle.labels)}
    products = [p for p in load_training_products(feed, cfg, limits, split) if label_of(p, cfg.label_column) in index]
    if not products:
        raise UserError("no labelled products of the bundle's classes in this feed")
    y = np.array([index[label_of(p, cfg.label_column)] for p in products])
    config = mmshap_config(bundle.manifest, budget, mode)
    backend = InProcessBackend(bundle, device=device, batch_size=batch_size, limits=limits)
    started = time.perf_counter()
    parts = []
    for chunk in batched(products, batch_size):
        parts.append(infer(backend, chunk, config, seed_key=bundle.bundle_id))
        if progress:
            progress(len(chunk), len(products))
    elapsed = time.perf_counter() - started
    x = concat_inputs([stack_inputs(p) for p in parts])
    preds = {k: x.logits[k].argmax(1) for k in x.kinds}
    stackers = load_stackers(bundle.path)
    for name, stacker in stackers.items():
        if name not in KINDS:
            preds[name] = stacker.predict_proba(x).argmax(1)
    if tfidf:
        train = [p for p in load_training_products(feed, cfg, limits, "train" if cfg.test_fraction else None)
                 if label_of(p, cfg.label_column) in index]
        # the sanity anchor: the fourth base model's recipe, trained on every training product
        baseline = TfidfModel.fit([p.text for p in train], np.array([index[label_of(p, cfg.label_column)] for p in train]),
                                  len(bundle.labels))
        preds["tfidf+lr"] = baseline.logits([p.text for p in products]).argmax(1)
    present = sorted(set(y.tolist()))
    # the reference of every difference: the best single model, the TF-IDF baseline included when asked for
    best_base = max([*x.kinds, *(["tfidf+lr"] if tfidf else [])],
                    key=lambda k: scores(y, preds[k], present)["macro_f1"])
    table = score_table(y, preds, present, best_base, n=n_boot, seed=0)
    if seeds > 1:
        for name, values in seed_spread(bundle.path, stackers, x, y, present, seeds, log).items():
            table[name].update(macro_f1_seed_mean=float(np.mean(values)), macro_f1_seed_sd=float(np.std(values, ddof=1)),
                               macro_f1_seeds=values)
    log(f"{len(products)} products, {len(present)} classes, {elapsed:.1f} s inference incl. MM-SHAP "
        f"({f'budget {config.budget}' if config.budget is not None else config.describe()}, {config.mode} mode)")
    log(format_table_ci(table, best_base))
    if report is not None:
        report = Path(report)
        report.mkdir(parents=True, exist_ok=True)
        per_class_csv(report / "per_class.csv", y, preds, bundle.labels, present)
        best = max((n for n in table if n not in x.kinds and n != "tfidf+lr"), key=lambda n: table[n]["macro_f1"],
                   default="multimodal")
        for name in dict.fromkeys(["multimodal", best]):
            confusion_png(report / f"confusion_{name}.png", y, preds[name], bundle.labels, present, f"{name} (normalised by row)")
        (report / "metrics.json").write_text(json.dumps(
            {"table": table, "n_products": len(products), "classes": [bundle.labels[c] for c in present],
             "mean_t_shap": float(np.nanmean(x.t_shap)) if np.isfinite(x.t_shap).any() else None,
             "best_base_model": best_base, "bootstrap": {"resamples": n_boot, "seed": 0, "level": 0.95},
             "seeds": seeds, "inference_s": elapsed}, indent=2))
        (report / "table.txt").write_text(format_table_ci(table, best_base) + "\n")
    return table
