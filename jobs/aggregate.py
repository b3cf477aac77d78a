"""Aggregate: a run's collapse metrics, recomputed from its stored rows (idempotent).

The counts come from one GROUP BY query (db.collapse), never from the rows themselves: the
periodic aggregation of a large run in progress reads one row per category.
"""

from __future__ import annotations

from db.collapse import collapse_counts, run_stacker
from db.results import replace_collapse_metrics
from pipeline.collapse import Thresholds, metrics_from_counts


def aggregate_collapse(factory, run_id: int, thresholds: Thresholds, reference: dict | None = None) -> list[tuple]:
    """Recompute the run's collapse metrics and replace the stored ones; returns them.

    reference: the bundle's extra["collapse_reference"]; the counts of the run's stacker are used,
    so that the reference is grouped as the run is (by that stacker's predicted category).
    """
    with factory() as s:
        stacker = run_stacker(s, run_id)
        by_category = collapse_counts(s, run_id, stacker)
    if not by_category:
        return []
    metrics = metrics_from_counts(by_category, thresholds, (reference or {}).get("stackers", {}).get(stacker))
    with factory() as s, s.begin():
        replace_collapse_metrics(s, run_id, metrics)
    return metrics
