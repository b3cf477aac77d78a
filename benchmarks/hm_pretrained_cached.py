"""H&M with the `pretrained` preset's frozen image model, on cached EfficientNet-Lite0 features.

The image model of `--preset pretrained` is the ImageNet EfficientNet-Lite0, frozen, with a linear
head trained by train.base_models.fit on the CNN's pooled features (that is what `shapstack train`
does with "freeze_image": true). Here fit() runs on features cached by an earlier pass of the same
CNN (same preprocessing: pad to a white square, 224 px, mean = std = 0.5), so that the measurement
takes seconds instead of a 7-minute CNN pass on a loaded 2-core CPU. Other rows of the table come
from probabilities cached by the scripts named in docs/models.md; every row gets macro-F1 over the
kept classes and a paired-bootstrap 95% interval of its difference to TF-IDF + LR.

    python benchmarks/hm_pretrained_cached.py CACHE_DIR [--catalogue ../shared/data/hm/catalogue.csv]

Split: GroupShuffleSplit(test_size=0.2, random_state=0) over group_id; classes with >= 20 products
on the training side kept (41 of H&M's); test products of other classes left out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import f1_score
from sklearn.model_selection import GroupShuffleSplit

from pipeline.presets import get_preset
from pipeline.pretrained import apply_checkpoints, model_checkpoints, resolve_all
from train.base_models import fit

MIN_CLASS = 20


def split(catalogue: Path):
    df = pd.read_csv(catalogue, dtype=str, keep_default_na=False)
    tr, te = next(GroupShuffleSplit(n_splits=1, test_size=0.2, random_state=0).split(df, groups=df.group_id))
    counts = df.iloc[tr].category.value_counts()
    classes = sorted(counts[counts >= MIN_CLASS].index)
    cid = {c: i for i, c in enumerate(classes)}
    y = np.array([cid.get(c, -1) for c in df.category])
    return df, classes, y, np.sort(tr[y[tr] >= 0]), np.sort(te[y[te] >= 0])


def macro_f1(y, pred, k):
    return f1_score(y, pred, labels=np.arange(k), average="macro", zero_division=0)


def bootstrap_diff(y, a, b, k, n=1000, seed=0):
    rng = np.random.RandomState(seed)
    d = [macro_f1(y[s], a[s], k) - macro_f1(y[s], b[s], k) for s in (rng.randint(0, len(y), len(y)) for _ in range(n))]
    return macro_f1(y, a, k) - macro_f1(y, b, k), np.percentile(d, [2.5, 97.5])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cache", type=Path)
    ap.add_argument("--catalogue", type=Path, default=Path("../shared/data/hm/catalogue.csv"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    df, classes, y, tr, te = split(a.catalogue)
    k = len(classes)
    print(f"{len(df)} products; train {len(tr)}, test {len(te)} (kept classes: {k}): {', '.join(classes)}")

    preset = get_preset("pretrained")
    paths = resolve_all(preset)
    preset = apply_checkpoints(preset, paths)
    feats = np.load(a.cache / "img_lite_pooled.npy").astype(np.float32)
    groups = df.group_id.values
    t0 = time.perf_counter()
    model, stats = fit("image", preset, None, y[tr], k, vocab_size=0, checkpoint=model_checkpoints(preset, paths)["image"],
                       groups=groups[tr], features=feats[tr], device="cpu")
    with torch.no_grad():
        img_head = torch.softmax(model.forward_head(torch.from_numpy(feats[te])), 1).numpy()
    print(f"image model (frozen EfficientNet-Lite0 + head, fit): {time.perf_counter() - t0:.0f} s, "
          f"best epoch {stats.get('best_epoch')}, validation macro-F1 by epoch {stats.get('val_macro_f1')}")

    probs = {name: np.load(a.cache / f"probs_{name}_test.npy") for name in ("tfidf", "minilm_lr", "img_lr", "concat_lr")}
    probs["image_head"] = img_head
    rows = {
        "TF-IDF + LR": probs["tfidf"],
        "MiniLM frozen, mean-pooled + LR": probs["minilm_lr"],
        "EfficientNet-Lite0 frozen + LR": probs["img_lr"],
        "EfficientNet-Lite0 frozen + head (preset's image model)": probs["image_head"],
        "concat MiniLM + Lite0 features + LR": probs["concat_lr"],
        "mean of probabilities: MiniLM, Lite0 head": (probs["minilm_lr"] + probs["image_head"]) / 2,
        "mean of probabilities: TF-IDF, MiniLM, Lite0 head": (probs["tfidf"] + probs["minilm_lr"] + probs["image_head"]) / 3,
        "LR stacker on OOF log-probs: TF-IDF, MiniLM, Lite0": np.load(a.cache / "probs_stack_frozen_test.npy"),
        "weighted log-prob sum (OOF weights .65/.25/.10): TF-IDF, MiniLM, Lite0": np.load(a.cache / "probs_stack_frozen_w_test.npy"),
    }
    base = probs["tfidf"].argmax(1)
    yt = y[te]
    print(f"\n| model | macro-F1 | difference to TF-IDF [95% CI] |\n|---|---|---|")
    for name, p in rows.items():
        f1 = macro_f1(yt, p.argmax(1), k)
        if p is probs["tfidf"]:
            print(f"| {name} | {f1:.3f} | - |")
            continue
        d, (lo, hi) = bootstrap_diff(yt, p.argmax(1), base, k)
        print(f"| {name} | {f1:.3f} | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] |")


if __name__ == "__main__":
    main()
