"""The report's and the evaluation's plots, as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 100) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path.name


def bar(path: Path, counts: Counter, title: str) -> str:
    plt = _plt()
    items = counts.most_common(40)
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.25 * len(items))))
    ax.barh([k[:30] for k, _ in items][::-1], [v for _, v in items][::-1], color="#4c72b0")
    ax.set_title(title)
    ax.set_xlabel("products")
    return _save(fig, path)


def hist(path: Path, values: np.ndarray, title: str, xlabel: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(values, bins=20, range=(0, 1), color="#55a868")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("products")
    return _save(fig, path)


def tshap_by_category(path: Path, rows: list[dict]) -> str:
    plt = _plt()
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["category"], []).append(r["t_shap"])
    cats = sorted(by, key=lambda c: -len(by[c]))[:30]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.3 * len(cats))))
    ax.boxplot([by[c] for c in cats][::-1], orientation="horizontal", tick_labels=[c[:30] for c in cats][::-1])
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, 1)
    ax.set_title("T-SHAP per predicted category (1 = text only, 0 = image only)")
    return _save(fig, path)


def confusion_png(path: Path, y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str],
                  labels: Sequence[int], title: str) -> None:
    plt = _plt()
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
    _save(fig, path, dpi=110)


def tshap_error_bars(path: Path, rows: list[dict], most: int = 150) -> str:
    """T-SHAP of up to `most` products (evenly spaced after sorting) with 95% error bars (1.96 x stderr);
    products without a finite error bar are drawn as points."""
    plt = _plt()
    ordered = sorted(rows, key=lambda r: r["t_shap"])
    if len(ordered) > most:
        ordered = [ordered[i] for i in np.linspace(0, len(ordered) - 1, most).round().astype(int)]
    x = np.arange(len(ordered))
    t = np.array([r["t_shap"] for r in ordered], float)
    err = np.array([np.nan if r["t_shap_stderr"] is None else 1.96 * r["t_shap_stderr"] for r in ordered], float)
    fig, ax = plt.subplots(figsize=(8, 3))
    ok = np.isfinite(err)
    ax.errorbar(x[ok], t[ok], yerr=err[ok], fmt="o", ms=2, lw=0.6, color="#4c72b0", label="T-SHAP ± 1.96 SE")
    if (~ok).any():
        ax.plot(x[~ok], t[~ok], "x", ms=3, color="#c44e52", label="no finite error bar")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(f"products, sorted by T-SHAP ({len(ordered)} of {len(rows)})")
    ax.set_ylabel("T-SHAP")
    ax.set_title("Per-product T-SHAP and its sampling error")
    ax.legend(loc="upper left", fontsize=7)
    return _save(fig, path)
