"""H&M with the `pretrained` preset's frozen encoders and 5-fold cross-fitting, on a CPU.

With "freeze_text" and "freeze_image" the image model is a head on EfficientNet-Lite0's features
and the text model MiniLM's last layer ("text_tune_layers": 1) and a head on the token states of
the five frozen layers below, all computed once; with TF-IDF as the fourth base model, all three
are cheap enough to cross-fit five times on a 2-core CPU, where fine-tuning MMBT five times is not
(docs/models.md, "What trains where"). This measures that stack with
the product's own code (frozen_features, fit, TfidfModel, fit_stackers): the classes with >= 20
products on the training side of `shapstack train --test-fraction 0.2` (a hash of group_id), the
stackers fitted on 5-fold out-of-fold outputs (StratifiedGroupKFold), the base models refitted on
all their training products, and every model's macro-F1 with its paired-bootstrap interval against
the TF-IDF + LR baseline. MMBT is left out (docs/models.md has the four-model `shapstack train` table).

    python benchmarks/hm_frozen.py [--catalogue ../shared/data/hm/catalogue.csv] [--cache runs/hm-frozen]
                                   [--outer 5 [--stop-after N]] [--folds 0]

Without --outer it trains on the training side and scores the 1,600 test products. With --outer 5
both sides are pooled and every product is scored once by models that never saw its group: five
times the training, and intervals about half as wide, with no single split to be lucky on. Each
outer fold is saved when it ends and a rerun resumes from it; --stop-after N scores the products
of the first N folds only (each still by models that never saw its group). With
stackers a second table gives every difference to the better neural base model; the predictions
are saved beside the features (predictions-*.npz: one array per model, `y` and the product rows).
--folds 0 trains and scores the base models alone (no stackers, no inner cross-fitting): a sixth
of the training. The features are cached under --cache (about 8 minutes for 7,986 products on a
2-core CPU, then seconds); the text model is what the training time goes to (3 to 6 minutes per
fit, six per stack).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.metrics import format_table_ci, score_table, scores
from pipeline.preprocess import encode_products
from pipeline.presets import get_preset
from pipeline.pretrained import apply_checkpoints, model_checkpoints, resolve_all
from pipeline.records import Limits
from pipeline.stackers import StackInputs, fit_stackers
from pipeline.tfidf import TfidfModel
from pipeline.tokenizer import checkpoint_tokenizer
from train.base_models import fit, frozen_features
from train.crossfit import fold_indices
from train.data import TrainConfig, group_of, label_of, load_training_products, select_classes

STACKERS = ("mmshap-pool", "mmshap-paper-sum", "lightgbm", "ffn", "mean")


def features(products, preset, ckpt, tokenizer, cache: Path, chunk: int = 512) -> dict[str, np.ndarray]:
    """The frozen text and image features, each cached on its own (text per "text_tune_layers")."""
    out = {}
    for kind, name in (("text", f"text-tune{preset.get('text_tune_layers', 0)}"), ("image", "image")):
        path = cache.with_name(f"{cache.name}-{name}.npz")
        if not path.exists():
            only = {**preset, "freeze_text": kind == "text", "freeze_image": kind == "image"}
            rows = products if kind == "image" else [replace(p, image=None) for p in products]  # no decoding
            parts = [frozen_features(only, ckpt, encode_products(rows[i : i + chunk], tokenizer, preset), "cpu")[kind]
                     for i in range(0, len(rows), chunk)]
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, features=np.concatenate(parts))
        out[kind] = np.load(path)["features"]
    return out


def stack(train_rows, test_rows, y, groups, texts, feats, preset, ckpt, vocab_size, n_classes, folds, seed):
    """Every base model and stacker trained on train_rows (the stackers on `folds`-fold out-of-fold
    outputs), each one's class predictions for test_rows."""

    def neural(kind):
        def train_on(rows):
            model, _ = fit(kind, preset, None, y[rows], n_classes, vocab_size=vocab_size, seed=seed, device="cpu",
                           checkpoint=ckpt[kind], groups=groups[rows], features=feats[kind][rows])
            read = model.from_features if kind == "text" else model.forward_head

            def predict(rs):
                with torch.inference_mode():
                    return np.concatenate([read(torch.from_numpy(feats[kind][rs[i : i + 256]])).numpy()
                                           for i in range(0, len(rs), 256)])
            return predict
        return train_on

    def sparse(rows):
        model = TfidfModel.fit([texts[i] for i in rows], y[rows], n_classes, seed=seed)
        return lambda rs: model.logits([texts[i] for i in rs])

    oof, held = {}, {}
    for kind, train_on in {"text": neural("text"), "image": neural("image"), "tfidf": sparse}.items():
        t0 = time.perf_counter()
        held[kind] = train_on(train_rows)(test_rows)
        if not folds:
            print(f"  {kind}: {time.perf_counter() - t0:.0f} s", flush=True)
            continue
        oof[kind] = np.zeros((len(train_rows), n_classes), np.float32)
        for tr, te in fold_indices(y[train_rows], groups[train_rows], folds, seed):
            oof[kind][te] = train_on(train_rows[tr])(train_rows[te])
        print(f"  {kind}: final + {folds} folds {time.perf_counter() - t0:.0f} s, out-of-fold macro-F1 "
              f"{scores(y[train_rows], oof[kind].argmax(1), range(n_classes))['macro_f1']:.3f}", flush=True)
    if not folds:
        return {k: v.argmax(1) for k, v in held.items()}
    stackers = fit_stackers(StackInputs(oof, np.full(len(train_rows), np.nan)), y[train_rows], STACKERS, seed=seed)
    x_test = StackInputs(held, np.full(len(test_rows), np.nan))
    preds = {k: v.argmax(1) for k, v in held.items()}
    preds.update({name: s.predict_proba(x_test).argmax(1) for name, s in stackers.items()})
    return preds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--catalogue", type=Path, default=Path("../shared/data/hm/catalogue.csv"))
    ap.add_argument("--cache", type=Path, default=Path("runs/hm-frozen"))
    ap.add_argument("--folds", type=int, default=5,
                    help="cross-fitting folds for the stackers' inputs (0: the base models alone, no stackers)")
    ap.add_argument("--outer", type=int, default=0,
                    help="0: train on the training side, score the test side; K: pool both sides and score "
                         "every product once, from K group-disjoint outer folds")
    ap.add_argument("--stop-after", type=int, default=0,
                    help="with --outer: score the products of the first N outer folds only (each finished "
                         "fold is saved under --cache, and a rerun resumes from it)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(2)
    cfg = TrainConfig(preset="pretrained", test_fraction=0.2, seed=a.seed)
    train = load_training_products(a.catalogue, cfg, Limits(), "train")
    labels, _ = select_classes(train, cfg)
    index = {c: i for i, c in enumerate(labels)}
    test = [p for p in load_training_products(a.catalogue, cfg, Limits(), "test") if label_of(p, "category") in index]
    train = [p for p in train if label_of(p, "category") in index]
    print(f"train {len(train)}, test {len(test)}, {len(labels)} classes: {', '.join(labels)}")

    paths = resolve_all(get_preset("pretrained"))
    preset = apply_checkpoints(get_preset("pretrained"), paths)
    ckpt = model_checkpoints(preset, paths)
    tokenizer = checkpoint_tokenizer(paths["text"], preset["max_length"], preset["num_image_embeds"])
    t0 = time.perf_counter()
    f_train = features(train, preset, ckpt, tokenizer, a.cache / f"train-{a.seed}")
    f_test = features(test, preset, ckpt, tokenizer, a.cache / f"test-{a.seed}")
    print(f"frozen features: {time.perf_counter() - t0:.0f} s")

    products = train + test
    y = np.array([index[label_of(p, "category")] for p in products])
    groups = np.array([group_of(p, "group_id") for p in products])
    feats = {k: np.concatenate([f_train[k], f_test[k]]) for k in ("text", "image")}
    common = dict(y=y, groups=groups, texts=[p.text for p in products], feats=feats, preset=preset, ckpt=ckpt,
                  vocab_size=tokenizer.vocab_size, n_classes=len(labels), folds=a.folds, seed=a.seed)
    tag = f"outer{a.outer}-folds{a.folds}-tune{preset.get('text_tune_layers', 0)}-{a.seed}"
    if a.outer:
        parts = []
        for i, (tr, te) in enumerate(fold_indices(y, groups, a.outer, a.seed + 1)):
            if len(parts) == (a.stop_after or a.outer):
                break
            done = a.cache / f"{tag}-fold{i + 1}.npz"
            if done.exists():
                print(f"outer fold {i + 1}/{a.outer}: resumed from {done}", flush=True)
            else:
                print(f"outer fold {i + 1}/{a.outer}: {len(tr)} train, {len(te)} scored", flush=True)
                fold = stack(tr, te, **common)
                present = sorted(set(y[te].tolist()))
                print("  macro-F1 " + ", ".join(f"{k} {scores(y[te], p, present)['macro_f1']:.3f}"
                                                for k, p in fold.items()))
                np.savez(done, rows=te, **fold)
            parts.append(dict(np.load(done)))
        scored = np.concatenate([part["rows"] for part in parts])
        preds = {name: np.concatenate([part[name] for part in parts]) for name in parts[0] if name != "rows"}
    else:
        scored = np.arange(len(train), len(products))
        preds = stack(np.arange(len(train)), scored, **common)
    yt = y[scored]
    present = sorted(set(yt.tolist()))
    np.savez(a.cache / f"predictions-{tag}.npz", y=yt, rows=scored, **preds)
    rows = score_table(yt, preds, present, "tfidf")
    print(f"scored {len(yt)} products over {len(present)} classes")
    print(format_table_ci(rows, "tfidf"))
    best = max(("text", "image"), key=lambda k: rows[k]["macro_f1"])  # the better neural base model
    if len(preds) > 3:
        print(format_table_ci(score_table(yt, preds, present, best), best))


if __name__ == "__main__":
    main()
