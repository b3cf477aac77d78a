"""Collapse metrics: is the multimodal model quietly ignoring one modality?

Computed per run over all products and per predicted category. Agreement of the multimodal model
with each unimodal model is reported beside them but raises no flag: a multimodal model that agrees
with an accurate text model is not collapsed for that alone. Flags are metrics too (value 1.0
= raised) so BI tools read them from the same table:
- text_collapse: the share of text-dominated products (T-SHAP > 0.9) exceeds a threshold;
- image_collapse: the share of image-dominated products (T-SHAP < 0.1) exceeds a threshold;
- drift: mean T-SHAP moved away from the training-time mean stored in the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TEXT_DOMINATED = 0.9
IMAGE_DOMINATED = 0.1


@dataclass(frozen=True)
class Thresholds:
    text_share: float = 0.5
    image_share: float = 0.5
    drift: float = 0.15
    min_products: int = 20


def summarise(t_shap: np.ndarray, mm_pred: np.ndarray | None = None, text_pred: np.ndarray | None = None,
              image_pred: np.ndarray | None = None) -> dict[str, float]:
    """The distribution of T-SHAP and the agreement of the multimodal model with each unimodal one."""
    t = np.asarray(t_shap, dtype=np.float64)
    out = {
        "n": float(len(t)),
        "mean_t_shap": float(t.mean()) if len(t) else float("nan"),
        "std_t_shap": float(t.std()) if len(t) else float("nan"),
        "text_dominated_share": float((t > TEXT_DOMINATED).mean()) if len(t) else float("nan"),
        "image_dominated_share": float((t < IMAGE_DOMINATED).mean()) if len(t) else float("nan"),
    }
    if mm_pred is not None and len(t):
        out["agree_text"] = float(np.mean(mm_pred == text_pred))
        out["agree_image"] = float(np.mean(mm_pred == image_pred))
    return out


def flags(s: dict[str, float], th: Thresholds, reference_mean: float | None = None) -> dict[str, float]:
    out = {
        "flag_text_collapse": float(s["text_dominated_share"] > th.text_share),
        "flag_image_collapse": float(s["image_dominated_share"] > th.image_share),
    }
    if reference_mean is not None:
        out["drift_t_shap"] = s["mean_t_shap"] - reference_mean
        out["flag_drift"] = float(abs(out["drift_t_shap"]) > th.drift)
    return out


def collapse_metrics(
    t_shap: np.ndarray,
    category: np.ndarray,
    preds: dict[str, np.ndarray],
    thresholds: Thresholds = Thresholds(),
    reference: dict[str, float] | None = None,
) -> list[tuple[str, str, float]]:
    """(scope, metric, value) rows: scope "all" plus every predicted category with enough products.

    reference maps scope -> training-time mean T-SHAP (from the bundle) for the drift metric.
    """
    reference = reference or {}
    category = np.asarray(category)
    rows: list[tuple[str, str, float]] = []
    scopes = [("all", np.ones(len(category), bool))]
    for c in sorted(set(category.tolist())):
        mask = category == c
        if mask.sum() >= thresholds.min_products:
            scopes.append((str(c), mask))
    for scope, mask in scopes:
        s = summarise(t_shap[mask], preds["multimodal"][mask], preds["text"][mask], preds["image"][mask])
        s.update(flags(s, thresholds, reference.get(scope)))
        rows.extend((scope, metric, value) for metric, value in s.items())
    return rows


def reference_means(t_shap: np.ndarray, category: np.ndarray, min_products: int = 20) -> dict[str, float]:
    """Training-time mean T-SHAP per scope, stored in the bundle for drift."""
    category = np.asarray(category)
    out = {"all": float(np.mean(t_shap))}
    for c in sorted(set(category.tolist())):
        mask = category == c
        if mask.sum() >= min_products:
            out[str(c)] = float(np.mean(t_shap[mask]))
    return out
