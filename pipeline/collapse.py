"""Collapse metrics: is the multimodal model ignoring a modality that carries signal?

A multimodal model that leans on the image for classes only the image can tell apart is healthy.
Collapse is ignoring a modality that carries signal, and the evidence for it comes from the
unimodal models, per scope ("all" and every predicted category with enough products):

- where the text and image models disagree (products with both modalities) and the multimodal
  model sides with one of them, whom it follows: `evidence_image_ignored` = the share of those
  products on which it follows the text model (and symmetrically `evidence_text_ignored`);
- whether the ignored modality carries signal there: `evidence_image_signal` = the share of
  decisive disagreements (one of the two unimodal models right) that the image model wins;
  measured on the run when it is labelled, else taken from the bundle's reference (the
  out-of-fold outputs at training time, same grouping and same stacker);
- the reliance measures: mean T-SHAP over the products that have one (`evidence_text_share`,
  `evidence_image_share` = 1 - it); NULL T-SHAP and products missing a modality are left out.

`flag_image_collapse` is raised (1.0) when the lower ends of both 95% Wilson intervals clear
their thresholds: the image model wins the decisive disagreements (signal) and the multimodal
model follows the text model on them (ignored). Symmetric for text. Every evidence metric has
`_ci_low`, `_ci_high` and `_n` beside it. A product missing a modality never enters a
disagreement or a reliance aggregate, so absence cannot raise a flag.

Drift: mean T-SHAP against the reference of the same scope (grouped by the run's stacker's
predicted category, as at run time), flagged when the difference exceeds a threshold and its
interval excludes 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from pipeline.metrics import Z95, wilson

TEXT_DOMINATED = 0.9
IMAGE_DOMINATED = 0.1
MODALITIES = ("text", "image")


@dataclass(frozen=True)
class Thresholds:
    signal: float = 0.5  # the ignored modality's model wins more than this share of decisive disagreements
    follow: float = 0.5  # the multimodal model follows the other model on more than this share of disagreements
    min_disagreements: int = 10  # fewer disagreements in a scope: no flag (not enough evidence)
    drift: float = 0.15
    min_products: int = 20


# per scope, what the reference stores and a run recomputes: counts and sums, so intervals can be derived
COUNTS = ("n", "n_reliance", "sum_t", "sumsq_t", "n_disagree", "follow_text", "follow_image", "text_right",
          "image_right")
# per scope, what a run's descriptive metrics need besides (summary())
SUMMARY_COUNTS = ("n_both", "n_text_dominated", "n_image_dominated", "agree_text", "agree_image")
LABEL_COUNTS = ("n_labelled_disagree", "text_right", "image_right")
T_SHAP_COUNTS = ("n_reliance", "sum_t", "sumsq_t")  # what drift reads of a scope (_mean_t)


def counts(t_shap: np.ndarray, text: np.ndarray, image: np.ndarray, mm: np.ndarray, has_text: np.ndarray,
           has_image: np.ndarray, label: np.ndarray | None = None) -> dict[str, float]:
    """The sufficient statistics of one scope; label entries that are None/'' are unknown.

    This is the definition: db.collapse computes the same counts with GROUP BY, and every count
    adds up over disjoint sets of products (a scope "all" is the sum of its categories').
    """
    both = np.asarray(has_text, bool) & np.asarray(has_image, bool)
    t = np.where(both, np.asarray(t_shap, np.float64), np.nan)
    valid = np.isfinite(t)
    d = both & (text != image)
    out = {"n": len(t), "n_reliance": int(valid.sum()), "sum_t": float(t[valid].sum()),
           "sumsq_t": float((t[valid] ** 2).sum()), "n_disagree": int(d.sum()),
           "follow_text": int((d & (mm == text)).sum()), "follow_image": int((d & (mm == image)).sum()),
           "n_both": int(both.sum()), "n_text_dominated": int((t[valid] > TEXT_DOMINATED).sum()),
           "n_image_dominated": int((t[valid] < IMAGE_DOMINATED).sum()),
           "agree_text": int((both & (mm == text)).sum()), "agree_image": int((both & (mm == image)).sum())}
    if label is not None:
        known = d & np.array([v not in (None, "") for v in label], bool)
        out["n_labelled_disagree"] = int(known.sum())
        out["text_right"] = int((known & (text == label)).sum())
        out["image_right"] = int((known & (image == label)).sum())
    return out


def add(a: dict, b: dict) -> dict:
    """The counts of two disjoint sets of products together."""
    return {k: a.get(k, 0) + b.get(k, 0) for k in dict.fromkeys([*a, *b])}


def scope_counts(by_category: dict, min_products: int) -> list[tuple[str, dict]]:
    """(scope, counts): "all", then every category with at least min_products products (sorted)."""
    out = [("all", functools.reduce(add, by_category.values(), {}))]
    out += [(str(c), by_category[c]) for c in sorted(by_category) if by_category[c]["n"] >= min_products]
    return out


def _mean_t(c: dict) -> tuple[float, float] | None:
    """Mean T-SHAP and its standard error from a scope's counts; None without reliance."""
    n = c["n_reliance"]
    if not n:
        return None
    mean = c["sum_t"] / n
    var = max(0.0, c["sumsq_t"] / n - mean * mean)
    return mean, float(np.sqrt(var / max(1, n - 1)))


def _share(prefix: str, k: float, n: float) -> dict[str, float]:
    lo, hi = wilson(k, n)
    return {prefix: k / n, f"{prefix}_ci_low": lo, f"{prefix}_ci_high": hi, f"{prefix}_n": float(n)}


def evidence(c: dict, th: Thresholds, reference: dict | None = None) -> dict[str, float]:
    """Metrics and flags of one scope from its counts (and the reference's counts of the same scope)."""
    out: dict[str, float] = {"n": float(c["n"]), "n_reliance": float(c["n_reliance"]),
                             "n_disagree": float(c["n_disagree"])}
    mt = _mean_t(c)
    if mt is not None:
        mean, se = mt
        out.update(mean_t_shap=mean, mean_t_shap_ci_low=mean - Z95 * se, mean_t_shap_ci_high=mean + Z95 * se,
                   std_t_shap=se * np.sqrt(max(1, c["n_reliance"] - 1)))
        for m, share in (("text", mean), ("image", 1 - mean)):
            out.update({f"evidence_{m}_share": share, f"evidence_{m}_share_ci_low": share - Z95 * se,
                        f"evidence_{m}_share_ci_high": share + Z95 * se, f"evidence_{m}_share_n": float(c["n_reliance"])})
    labelled = c.get("n_labelled_disagree", 0) >= th.min_disagreements
    for m, other in (("image", "text"), ("text", "image")):
        followed = c["follow_text"] + c["follow_image"]
        if followed:
            out.update(_share(f"evidence_{m}_ignored", c[f"follow_{other}"], followed))
        source = c if labelled else reference
        signal_ok = False
        if source is not None and source.get(f"{m}_right", 0) + source.get(f"{other}_right", 0) > 0:
            decisive = source[f"{m}_right"] + source[f"{other}_right"]
            out.update(_share(f"evidence_{m}_signal", source[f"{m}_right"], decisive))
            out[f"evidence_{m}_signal_from_labels"] = float(labelled)
            signal_ok = decisive >= th.min_disagreements and out[f"evidence_{m}_signal_ci_low"] > th.signal
            if labelled and reference is not None and reference.get(f"{m}_right", 0) + reference.get(f"{other}_right", 0):
                out[f"evidence_{m}_signal_reference"] = reference[f"{m}_right"] / (
                    reference[f"{m}_right"] + reference[f"{other}_right"])
        elif source is None:
            continue  # no labels, no reference: whether the modality carries signal is unknown, no flag
        ignored = followed >= th.min_disagreements and out[f"evidence_{m}_ignored_ci_low"] > th.follow
        out[f"flag_{m}_collapse"] = float(signal_ok and ignored)
    ref_t = _mean_t(reference) if reference else None
    if mt is not None and ref_t is not None:
        diff = mt[0] - ref_t[0]
        half = Z95 * float(np.hypot(mt[1], ref_t[1]))
        out.update(drift_t_shap=diff, drift_t_shap_ci_low=diff - half, drift_t_shap_ci_high=diff + half)
        out["flag_drift"] = float(abs(diff) > th.drift and (diff - half > 0 or diff + half < 0))
    return out


def summary(c: dict) -> dict[str, float]:
    """Descriptive reliance of one scope (NULLs and missing modalities left out) and agreement, from its counts."""
    out = {}
    if c["n_reliance"]:
        out.update(text_dominated_share=c["n_text_dominated"] / c["n_reliance"],
                   image_dominated_share=c["n_image_dominated"] / c["n_reliance"])
    if c["n_both"]:
        out.update(agree_text=c["agree_text"] / c["n_both"], agree_image=c["agree_image"] / c["n_both"])
    return out


def metrics_from_counts(by_category: dict, thresholds: Thresholds = Thresholds(),
                        reference: dict[str, dict] | None = None) -> list[tuple[str, str, float]]:
    """(scope, metric, value) rows from counts() per predicted category (db.collapse computes them in SQL)."""
    reference = reference or {}
    rows: list[tuple[str, str, float]] = []
    for scope, c in scope_counts(by_category, thresholds.min_products):
        metrics = {**evidence(c, thresholds, reference.get(scope)), **summary(c)}
        rows.extend((scope, metric, float(value)) for metric, value in metrics.items())
    return rows


def collapse_metrics(
    t_shap: np.ndarray,
    category: np.ndarray,
    preds: dict[str, np.ndarray],
    thresholds: Thresholds = Thresholds(),
    reference: dict[str, dict] | None = None,
    *,
    has_text: np.ndarray | None = None,
    has_image: np.ndarray | None = None,
    label: np.ndarray | None = None,
) -> list[tuple[str, str, float]]:
    """(scope, metric, value) rows: scope "all" plus every predicted category with enough products.

    preds: kind -> predicted class of the text, image and multimodal models; reference: scope ->
    counts() from the bundle, grouped as category is (the run's stacker's prediction); label: the
    true category where known (a labelled run). A metric that cannot be computed has no row.
    """
    n = len(category)
    has_text = np.ones(n, bool) if has_text is None else np.asarray(has_text, bool)
    has_image = np.ones(n, bool) if has_image is None else np.asarray(has_image, bool)
    return metrics_from_counts(category_counts(t_shap, category, preds, has_text, has_image, label), thresholds,
                               reference)


def category_counts(t_shap, category, preds, has_text, has_image, label=None) -> dict:
    """counts() of the products of each predicted category."""
    category = np.asarray(category)
    t_shap = np.asarray(t_shap, np.float64)
    label_arr = None if label is None else np.asarray(label, object)
    out = {}
    for c in set(category.tolist()):
        mask = category == c
        out[c] = counts(t_shap[mask], np.asarray(preds["text"])[mask], np.asarray(preds["image"])[mask],
                        np.asarray(preds["multimodal"])[mask], np.asarray(has_text, bool)[mask],
                        np.asarray(has_image, bool)[mask], None if label_arr is None else label_arr[mask])
    return out


def reference_counts(t_shap: np.ndarray, category: np.ndarray, preds: dict[str, np.ndarray], label: np.ndarray,
                     has_text: np.ndarray, has_image: np.ndarray, min_products: int = 20) -> dict[str, dict]:
    """Training-time counts per scope (out-of-fold outputs, grouped by a stacker's predicted
    category), stored in the bundle as the reference for drift and for the unimodal models' signal;
    label None: no signal counts."""
    by_category = category_counts(t_shap, category, preds, has_text, has_image, label)
    return {scope: {k: c[k] for k in COUNTS if k in c} for scope, c in scope_counts(by_category, min_products)}
