"""Classification scores in the layout of the paper's Table II: P, R, F1 (macro and weighted), accuracy."""

from __future__ import annotations

from typing import Sequence

import numpy as np

COLUMNS = ("macro_p", "macro_r", "macro_f1", "weighted_p", "weighted_r", "weighted_f1", "accuracy")



def rmse_net_of_noise(d: np.ndarray, stderr: np.ndarray) -> float:
    """RMSE of differences d to a sampled estimate, net of that estimate's own noise:
    sqrt(max(0, mean(d^2 - stderr^2))), a NaN stderr counting as 0 (an exact value). It estimates
    the RMSE to the exact value when the stderr is right (the audit of amortized MM-SHAP, the
    explainer's cross-validation, the benchmarks against a yardstick)."""
    d, se = np.asarray(d, np.float64), np.asarray(stderr, np.float64)
    return float(np.sqrt(max(0.0, np.mean(d**2 - np.where(np.isfinite(se), se, 0.0) ** 2))))


def scores(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[int]) -> dict[str, float]:
    """Macro averages over `labels` only (the classes evaluated), so absent classes do not count as 0."""
    # imported here: collapse thresholds (and so every CLI command) import this module, sklearn costs seconds
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    out = {}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=list(labels), average=avg, zero_division=0)
        out.update({f"{avg}_p": float(p), f"{avg}_r": float(r), f"{avg}_f1": float(f)})
    out["accuracy"] = float(accuracy_score(y_true, y_pred))
    return out


def format_table_ci(rows: dict[str, dict], reference: str) -> str:
    """Table II with intervals: P, R, F1 (macro) each with its 95% bootstrap interval, and the
    macro-F1 difference to the reference model with its paired interval; with seeds, their spread."""
    seeds = any("macro_f1_seed_mean" in s for s in rows.values())
    head = (f"{'model':<18} {'P [95% CI]':>19} {'R [95% CI]':>19} {'F1 [95% CI]':>19} "
            f"{'F1 - ' + reference[:10] + ' [95% CI]':>27}" + (f" {'F1 over seeds':>16}" if seeds else ""))
    lines = [head, "-" * len(head)]

    def cell(s, key):
        lo, hi = s[f"{key}_ci"]
        return f"{s[key]:.3f} [{lo:.3f},{hi:.3f}]"

    for name, s in rows.items():
        lo, hi = s["diff_f1_ci"]
        line = (f"{name:<18} {cell(s, 'macro_p'):>19} {cell(s, 'macro_r'):>19} {cell(s, 'macro_f1'):>19} "
                f"{s['diff_f1']:+.3f} [{lo:+.3f},{hi:+.3f}]".ljust(18 + 3 * 20 + 28))
        if seeds and "macro_f1_seed_mean" in s:
            line += f" {s['macro_f1_seed_mean']:.3f} ± {s['macro_f1_seed_sd']:.3f}"
        lines.append(line.rstrip())
    return "\n".join(lines)


def format_table(rows: dict[str, dict[str, float]], extra: dict[str, str] | None = None) -> str:
    """Table II style: one line per model, P / R / F1 (macro), then weighted F1 and accuracy."""
    head = f"{'model':<14} {'P':>6} {'R':>6} {'F1':>6}   {'wF1':>6} {'acc':>6}"
    lines = [head, "-" * len(head)]
    for name, s in rows.items():
        lines.append(f"{name:<14} {s['macro_p']:6.3f} {s['macro_r']:6.3f} {s['macro_f1']:6.3f}   "
                     f"{s['weighted_f1']:6.3f} {s['accuracy']:6.3f}" + (f"  {extra[name]}" if extra and name in extra else ""))
    return "\n".join(lines)


Z95 = 1.959963984540054


def wilson(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (95% by default); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _resample_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n): how often each product is drawn in each resample (with replacement)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, (n_boot, n)) + (np.arange(n_boot) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def _macro(w: np.ndarray, y: np.ndarray, pred: np.ndarray, labels: Sequence[int]) -> dict[str, np.ndarray]:
    """Macro P, R, F1 under product weights w (n_boot, n), over the classes each resample contains."""
    labels = np.asarray(list(labels))
    truth = (y[:, None] == labels[None, :]).astype(np.float64)  # (n, L)
    said = (pred[:, None] == labels[None, :]).astype(np.float64)
    tp, support, predicted = w @ (truth * said), w @ truth, w @ said
    present = support > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(predicted > 0, tp / predicted, 0.0)
        r = np.where(present, tp / support, 0.0)
        f = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
    k = present.sum(1)
    return {name: (v * present).sum(1) / k for name, v in (("macro_p", p), ("macro_r", r), ("macro_f1", f))}


def bootstrap_scores(y: np.ndarray, preds: dict[str, np.ndarray], labels: Sequence[int], *,
                     reference: str | None = None, n: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict[str, dict[str, tuple[float, float]]]:
    """Paired-bootstrap percentile intervals of macro P, R and F1 for every predictor.

    Every predictor is scored on the same n resamples of the products (a fixed seed), so the
    intervals of differences are paired; with reference, also "diff_f1" = macro-F1 minus the
    reference's. A resample's macro average runs over the classes it contains.
    """
    y = np.asarray(y)
    w = _resample_weights(len(y), n, seed)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    boot = {name: _macro(w, y, np.asarray(p), labels) for name, p in preds.items()}
    out = {}
    for name, b in boot.items():
        out[name] = {k: (float(np.percentile(v, lo)), float(np.percentile(v, hi))) for k, v in b.items()}
        if reference is not None:
            d = b["macro_f1"] - boot[reference]["macro_f1"]
            out[name]["diff_f1"] = (float(np.percentile(d, lo)), float(np.percentile(d, hi)))
    return out


def score_table(y: np.ndarray, preds: dict[str, np.ndarray], labels: Sequence[int], reference: str, *,
                n: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Every predictor's macro P / R / F1 with their intervals ("<metric>_ci"), and its macro-F1
    difference to the reference ("diff_f1", paired interval "diff_f1_ci"): format_table_ci's rows."""
    table = {name: scores(y, pred, labels) for name, pred in preds.items()}
    intervals = bootstrap_scores(y, preds, labels, reference=reference, n=n, seed=seed)
    for name, row in table.items():
        row.update({f"{k}_ci": list(v) for k, v in intervals[name].items()})
        row["diff_f1"] = row["macro_f1"] - table[reference]["macro_f1"]
    return table


def paired_bootstrap(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, labels: Sequence[int], n: int = 1000,
                     seed: int = 0) -> dict[str, float]:
    """Macro-F1 of a and b, a - b, and the 95% paired-bootstrap interval of each."""
    b = bootstrap_scores(y, {"a": pred_a, "b": pred_b}, labels, reference="b", n=n, seed=seed)
    f_a = scores(y, pred_a, labels)["macro_f1"]
    f_b = scores(y, pred_b, labels)["macro_f1"]
    return {"f1_a": f_a, "f1_b": f_b, "diff": f_a - f_b,
            "f1_a_ci": b["a"]["macro_f1"], "f1_b_ci": b["b"]["macro_f1"], "diff_ci": b["a"]["diff_f1"]}
