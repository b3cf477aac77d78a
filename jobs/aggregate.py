"""Aggregate: a run's collapse metrics, recomputed from its stored rows (idempotent)."""

from __future__ import annotations

import numpy as np

from db.results import collapse_inputs, replace_collapse_metrics
from pipeline.collapse import Thresholds, collapse_metrics


def aggregate_collapse(factory, run_id: int, thresholds: Thresholds, reference: dict | None = None) -> list[tuple]:
    """Recompute the run's collapse metrics and replace the stored ones; returns them.

    reference: the bundle's extra["collapse_reference"]; the counts of the run's stacker are used,
    so that the reference is grouped as the run is (by that stacker's predicted category).
    """
    with factory() as s:
        rows = collapse_inputs(s, run_id)
    if not rows:
        return []
    t, cat, text, image, mm, missing, label, stacker = zip(*rows)
    by_stacker = (reference or {}).get("stackers", {})
    metrics = collapse_metrics(
        np.array([np.nan if v is None else v for v in t], float), np.array(cat),
        {"text": np.array(text), "image": np.array(image), "multimodal": np.array(mm)},
        thresholds, by_stacker.get(stacker[0]),
        has_text=np.array([m != "text" for m in missing]), has_image=np.array([m != "image" for m in missing]),
        label=np.array(label, object) if any(v for v in label) else None)
    with factory() as s, s.begin():
        replace_collapse_metrics(s, run_id, metrics)
    return metrics
