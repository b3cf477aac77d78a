"""Finishing a run: whichever task sees nothing left pending aggregates and marks it done, then
alerts (jobs.alerts: collapse flags, failed products) and counts it in the metrics.

Any stack worker may hold a run's last batch, so each one checks after its batch; the periodic
aggregation checks too, in case that worker died in between. Aggregation is idempotent and
db.runs.finish_run(if_complete=True) marks a run once, so several finishers at once are harmless.
"""

from __future__ import annotations

import logging
from datetime import timezone

from db import models as m
from db.claims import seconds_since
from db.products import count_pending
from db.runs import finish_run
from jobs.aggregate import aggregate_collapse
from jobs.alerts import run_finished
from workers import metrics
from workers.app import settings
from workers.resources import factory, run_info, collapse_reference
from workers.retries import describe

log = logging.getLogger(__name__)


def complete(run_id: int) -> bool:
    """Aggregate the run's collapse metrics and mark it done if nothing is pending; returns whether it was."""
    with factory()() as s:
        run = s.get(m.Run, run_id)
        if run is None or run.status != "classifying" or count_pending(s, run_id):
            return False
        wall = seconds_since(s, run.created_at)
    aggregate(run_id)
    with factory()() as s, s.begin():
        finished = finish_run(s, run_id, {"wall_s": round(wall, 3)}, if_complete=True)
    if finished:  # once per run: warnings, the webhook, and the run's metrics
        try:
            metrics.run_finished(run_finished(factory(), run_id, settings()))
        except Exception as exc:  # noqa: BLE001 - the run is done; a report that failed is logged, not retried
            log.warning("run %d: finished, but not reported: %s", run_id, describe(exc))
    return finished


def aggregate(run_id: int) -> None:
    aggregate_collapse(factory(), run_id, settings().collapse, collapse_reference(run_info(run_id).bundle_path))
