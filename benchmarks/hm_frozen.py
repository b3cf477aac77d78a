"""H&M with the `pretrained` preset's frozen encoders and 5-fold cross-fitting, in minutes on a CPU.

With "freeze_text" and "freeze_image" the text and image models are heads on MiniLM's and
EfficientNet-Lite0's features, computed once; with TF-IDF as the fourth base model, all three are
cheap enough to cross-fit five times on a 2-core CPU, where fine-tuning MMBT five times is not
(docs/models.md, "What trains where"). This measures that stack: the same split and classes as
`shapstack train --test-fraction 0.2` (a hash of group_id; classes with >= 20 training products),
the product's own code (frozen_features, fit, TfidfModel, fit_stackers), out-of-fold outputs by
StratifiedGroupKFold, the final models on every training product, and every model's macro-F1 on
the test side with its paired-bootstrap interval against the TF-IDF + LR baseline. MMBT is left
out (see the full `shapstack train` table in docs/models.md for the four-model stack).

    python benchmarks/hm_frozen.py [--catalogue ../shared/data/hm/catalogue.csv] [--cache runs/hm-frozen]

The features are cached under --cache (about 8 minutes for 8,338 products on 2 cores, then seconds).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.metrics import bootstrap_scores, format_table_ci, scores
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


def features(products, preset, ckpt, tokenizer, path: Path, chunk: int = 512) -> dict[str, np.ndarray]:
    if path.exists():
        return dict(np.load(path))
    parts = [frozen_features(preset, ckpt, encode_products(products[i : i + chunk], tokenizer, preset), "cpu")
             for i in range(0, len(products), chunk)]
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("text", "image")}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--catalogue", type=Path, default=Path("../shared/data/hm/catalogue.csv"))
    ap.add_argument("--cache", type=Path, default=Path("runs/hm-frozen"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(2)
    cfg = TrainConfig(preset="pretrained", test_fraction=0.2, seed=a.seed)
    train = load_training_products(a.catalogue, cfg, Limits(), "train")
    labels, _ = select_classes(train, cfg)
    index = {c: i for i, c in enumerate(labels)}
    test = [p for p in load_training_products(a.catalogue, cfg, Limits(), "test") if label_of(p, "category") in index]
    train = [p for p in train if label_of(p, "category") in index]
    y, yt = (np.array([index[label_of(p, "category")] for p in ps]) for ps in (train, test))
    groups = np.array([group_of(p, "group_id") for p in train])
    print(f"train {len(train)}, test {len(test)}, {len(labels)} classes: {', '.join(labels)}")

    paths = resolve_all(get_preset("pretrained"))
    preset = apply_checkpoints(get_preset("pretrained"), paths)
    ckpt = model_checkpoints(preset, paths)
    tokenizer = checkpoint_tokenizer(paths["text"], preset["max_length"], preset["num_image_embeds"])
    t0 = time.perf_counter()
    f_train = features(train, preset, ckpt, tokenizer, a.cache / f"train-{a.seed}.npz")
    f_test = features(test, preset, ckpt, tokenizer, a.cache / f"test-{a.seed}.npz")
    print(f"frozen features: {time.perf_counter() - t0:.0f} s")

    def neural(kind):
        def train_on(rows):
            model, _ = fit(kind, preset, None, y[rows], len(labels), vocab_size=tokenizer.vocab_size, seed=a.seed,
                           device="cpu", checkpoint=ckpt[kind], groups=groups[rows], features=f_train[kind][rows])
            return lambda feats: model.forward_head(torch.from_numpy(feats)).detach().numpy()
        return train_on, lambda predict, rows: predict(f_train[kind][rows]), lambda predict: predict(f_test[kind])

    def sparse():
        texts = [p.text for p in train]
        return (lambda rows: TfidfModel.fit([texts[i] for i in rows], y[rows], len(labels), seed=a.seed),
                lambda model, rows: model.logits([texts[i] for i in rows]),
                lambda model: model.logits([p.text for p in test]))

    folds = fold_indices(y, groups, a.folds, a.seed)
    oof, held = {}, {}
    for kind, (train_on, on_rows, on_test) in {"text": neural("text"), "image": neural("image"), "tfidf": sparse()}.items():
        t0 = time.perf_counter()
        oof[kind] = np.zeros((len(y), len(labels)), np.float32)
        for tr, te in folds:
            oof[kind][te] = on_rows(train_on(tr), te)
        held[kind] = on_test(train_on(np.arange(len(y))))
        print(f"{kind}: {a.folds} folds + final {time.perf_counter() - t0:.0f} s, out-of-fold macro-F1 "
              f"{scores(y, oof[kind].argmax(1), range(len(labels)))['macro_f1']:.3f}")

    nan = np.full(len(y), np.nan)
    t0 = time.perf_counter()
    stackers = fit_stackers(StackInputs(oof, nan), y, STACKERS, seed=a.seed)
    print(f"stackers: {time.perf_counter() - t0:.0f} s")
    x_test = StackInputs(held, np.full(len(yt), np.nan))
    preds = {k: v.argmax(1) for k, v in held.items()}
    preds.update({name: s.predict_proba(x_test).argmax(1) for name, s in stackers.items()})
    present = sorted(set(yt.tolist()))
    intervals = bootstrap_scores(yt, preds, present, reference="tfidf")
    point = {name: scores(yt, p, present) for name, p in preds.items()}
    rows = {name: {**point[name], **{f"{k}_ci": v for k, v in intervals[name].items() if k != "diff_f1"},
                   "diff_f1": point[name]["macro_f1"] - point["tfidf"]["macro_f1"], "diff_f1_ci": intervals[name]["diff_f1"]}
            for name in preds}
    print(format_table_ci(rows, "tfidf"))


if __name__ == "__main__":
    main()
