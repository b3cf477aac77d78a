"""`shapstack train`: base models, out-of-fold outputs by K-fold cross-fitting, stackers, bundle.

Leakage rule: a stacker never sees base-model outputs on products those base models were trained
on. With --folds K > 1, each product's logits and MM-SHAP come from the fold models that did not
train on it (groups never straddle folds), and the bundle's base models are then retrained on
every training product. With --folds 1 (the paper's D_tr / D_v), 20% of the groups are held out:
the base models train on the other 80% and are the bundle's models, the stackers train on the
held-out 20%.

Resumable: every fold model and its out-of-fold outputs are saved under OUT/.work as they finish,
keyed by a hash of the data and settings, and a rerun skips what is there.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from pipeline.bundle import Bundle, save_bundle
from pipeline.collapse import reference_means
from pipeline.explain import DEFAULT_BUDGET, DEFAULT_MODE
from pipeline.feed import read_feed
from pipeline.models import KINDS, create_model
from pipeline.preprocess import encode_products
from pipeline.presets import get_preset
from pipeline.records import Limits, Product
from pipeline.runner import infer
from pipeline.split import keep
from pipeline.stacking import STACKERS, StackInputs, fit_stackers, save_stackers
from pipeline.tokenizer import Tokenizer, train_tokenizer
from train.evaluate import scores
from train.trainer import fit


@dataclass
class TrainConfig:
    preset: str = "small"
    label_column: str = "category"
    group_column: str = "group_id"
    min_class_size: int = 20
    folds: int = 5
    seed: int = 0
    epochs: int | None = None
    device: str = "auto"
    test_fraction: float = 0.0  # > 0: hold out this share of groups for evaluate/classify --split test
    mmshap_budget: int = DEFAULT_BUDGET
    mmshap_mode: str = DEFAULT_MODE
    tokenizer: str | None = None  # a local pretrained tokenizer; default: train WordPiece on the feed
    checkpoints: dict | None = None  # kind -> local checkpoint
    stackers: tuple[str, ...] = STACKERS


def label_of(p: Product, column: str) -> str | None:
    value = p.label if column == "category" else p.attributes.get(column)
    return str(value) if value not in (None, "") else None


def group_of(p: Product, column: str) -> str:
    value = p.group_id if column == "group_id" else p.attributes.get(column)
    return str(value) if value not in (None, "") else p.product_id


def load_training_products(feed, cfg: TrainConfig, limits: Limits, split: str | None) -> list[Product]:
    products = [p for p in read_feed(feed, limits) if isinstance(p, Product) and label_of(p, cfg.label_column)]
    return [p for p in products if keep(p, split, cfg.test_fraction, cfg.seed)] if cfg.test_fraction else products


def select_classes(products: list[Product], cfg: TrainConfig) -> tuple[list[str], dict[str, int]]:
    counts: dict[str, int] = {}
    for p in products:
        counts[label_of(p, cfg.label_column)] = counts.get(label_of(p, cfg.label_column), 0) + 1
    labels = sorted(c for c, n in counts.items() if n >= cfg.min_class_size)
    dropped = {c: n for c, n in counts.items() if n < cfg.min_class_size}
    if len(labels) < 2:
        raise ValueError(f"need at least 2 classes with >= {cfg.min_class_size} products, found {len(labels)}")
    return labels, dropped


def fold_indices(y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    if folds == 1:
        split = GroupShuffleSplit(n_splits=1, test_size=0.2, random_state=seed)
        return list(split.split(y, y, groups))
    return list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(y, y, groups))


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Work:
    """Checkpoints of fold models and out-of-fold outputs under OUT/.work, for resuming."""

    def __init__(self, root: Path, key: str):
        self.dir = root / ".work" / key
        self.dir.mkdir(parents=True, exist_ok=True)

    def model(self, name: str, build, train):
        path = self.dir / f"{name}.safetensors"
        stats_path = self.dir / f"{name}.json"
        model = build()
        if path.exists() and stats_path.exists():
            load_model(model, str(path))
            return model.eval(), json.loads(stats_path.read_text()) | {"resumed": True}
        model, stats = train()
        save_model(model, str(path))
        stats_path.write_text(json.dumps(stats))
        return model, stats

    def arrays(self, name: str, compute) -> dict[str, np.ndarray]:
        path = self.dir / f"{name}.npz"
        if path.exists():
            with np.load(path) as f:
                return dict(f)
        out = compute()
        np.savez(path, **out)
        return out


def fold_backend(models: dict, tokenizer: Tokenizer, preset: dict, labels: list[str], device: str):
    """The in-process backend over models that are not in a bundle yet."""
    from pipeline.backend import InProcessBackend

    bundle = Bundle(Path("."), {"preset": preset, "labels": labels}, tokenizer, models, torch.device("cpu"))
    return InProcessBackend(bundle, device=device)


def train_bundle(feed, out, cfg: TrainConfig, limits: Limits = Limits(), log=print) -> dict:
    started = time.perf_counter()
    out = Path(out)
    preset = get_preset(cfg.preset)
    products = load_training_products(feed, cfg, limits, "train")
    labels, dropped = select_classes(products, cfg)
    index = {c: i for i, c in enumerate(labels)}
    products = [p for p in products if label_of(p, cfg.label_column) in index]
    y = np.array([index[label_of(p, cfg.label_column)] for p in products])
    groups = np.array([group_of(p, cfg.group_column) for p in products])
    log(f"training on {len(products)} products, {len(labels)} classes ({len(dropped)} classes under "
        f"{cfg.min_class_size} products dropped), {len(set(groups))} groups, preset {preset['name']}")

    tokenizer = (Tokenizer.load(cfg.tokenizer) if cfg.tokenizer
                 else train_tokenizer((p.text for p in products), preset["vocab_size"]))
    t0 = time.perf_counter()
    enc = encode_products(products, tokenizer, preset, limits)
    encode_s = time.perf_counter() - t0
    key = _key(cfg.preset, cfg.seed, cfg.epochs, cfg.folds, cfg.mmshap_budget, cfg.mmshap_mode,
               [p.content_hash for p in products], labels, tokenizer.tok.to_str())
    work = _Work(out, key)
    ckpt = cfg.checkpoints or {}

    def train_models(rows: np.ndarray, tag: str) -> tuple[dict, dict]:
        models, stats = {}, {}
        for kind in KINDS:
            def build(kind=kind):
                return create_model(kind, preset, len(labels), vocab_size=tokenizer.vocab_size, checkpoint=ckpt.get(kind))

            def train(kind=kind):
                text_encoder = models["text"].bert if kind == "multimodal" and not ckpt.get(kind) else None
                return fit(kind, preset, enc[rows], y[rows], len(labels), vocab_size=tokenizer.vocab_size,
                           seed=cfg.seed, device=cfg.device, epochs=cfg.epochs, checkpoint=ckpt.get(kind),
                           desc=f"{tag} {kind}", text_encoder=text_encoder)

            models[kind], stats[kind] = work.model(f"{tag}-{kind}", build, train)
            log(f"  {tag} {kind}: {stats[kind]['train_s']} s" + (" (resumed)" if stats[kind].get("resumed") else ""))
        return models, stats

    # out-of-fold outputs
    oof = {k: np.zeros((len(y), len(labels)), np.float32) for k in KINDS}
    t_shap = np.full(len(y), np.nan)
    covered = np.zeros(len(y), bool)
    fold_stats = []
    for f, (tr, te) in enumerate(fold_indices(y, groups, cfg.folds, cfg.seed)):
        models, stats = train_models(tr, f"fold{f}")
        fold_stats.append(stats)

        def held_out(models=models, te=te, f=f):
            backend = fold_backend(models, tokenizer, preset, labels, cfg.device)
            res = infer(backend, [products[i] for i in te], budget=cfg.mmshap_budget, mode=cfg.mmshap_mode, seed=cfg.seed)
            return {**res.logits, "t_shap": res.contributions.t_shap}

        arrays = work.arrays(f"fold{f}-oof", held_out)
        for k in KINDS:
            oof[k][te] = arrays[k]
        t_shap[te] = arrays["t_shap"]
        covered[te] = True
        final_models = models

    if cfg.folds > 1:
        final_models, final_stats = train_models(np.arange(len(y)), "final")
    else:
        final_stats = fold_stats[0]

    # stackers on out-of-fold outputs only
    rows = np.nonzero(covered)[0]
    x = StackInputs({k: oof[k][rows] for k in KINDS}, t_shap[rows], enc.has_text[rows], enc.has_image[rows])
    stackers = fit_stackers(x, y[rows], cfg.stackers, seed=cfg.seed)
    present = sorted(set(y[rows].tolist()))
    oof_scores = {k: scores(y[rows], oof[k][rows].argmax(1), present) for k in KINDS}

    metrics = {
        "n_train": int(len(y)), "n_classes": len(labels), "folds": cfg.folds,
        "oof": oof_scores,
        "oof_mean_t_shap": float(np.mean(t_shap[rows])),
        "train_s": {k: final_stats[k]["train_s"] for k in KINDS},
        "fold_train_s": [{k: s[k]["train_s"] for k in KINDS} for s in fold_stats],
        "encode_s": round(encode_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
    }
    extra = {
        "label_column": cfg.label_column, "group_column": cfg.group_column, "min_class_size": cfg.min_class_size,
        "dropped_classes": dropped, "seed": cfg.seed, "test_fraction": cfg.test_fraction,
        "mmshap": {"budget": cfg.mmshap_budget, "mode": cfg.mmshap_mode},
        "t_shap_reference": reference_means(t_shap[rows], np.array(labels)[y[rows]]),
        "default_stacker": "mmshap" if "mmshap" in stackers else next(iter(stackers)),
    }
    manifest = save_bundle(out, preset=preset, labels=labels, tokenizer=tokenizer, models=final_models,
                           metrics=metrics, extra=extra, overwrite=True)
    save_stackers(out, stackers)
    log(f"bundle {manifest['content_hash'][:16]} written to {out} in {metrics['total_s']} s")
    return manifest
