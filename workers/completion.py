"""Finishing a run: whichever task sees nothing left pending aggregates and marks it done.

Any stack worker may hold a run's last batch, so each one checks after its batch; the periodic
aggregation checks too, in case that worker died in between. Aggregation is idempotent and
db.runs.finish_run(if_complete=True) marks a run once, so several finishers at once are harmless.
"""

from __future__ import annotations

from datetime import timezone

from workers.app import settings
from workers.context import factory, run_info, t_shap_reference


def complete(run_id: int) -> bool:
    """Aggregate the run's collapse metrics and mark it done if nothing is pending; returns whether it was."""
    from db import models as m
    from db.runs import finish_run
    from db.store import count_pending

    with factory()() as s:
        run = s.get(m.Run, run_id)
        if run is None or run.status != "classifying" or count_pending(s, run_id):
            return False
        started = run.created_at
    aggregate(run_id)
    wall = (m.utcnow() - started.replace(tzinfo=started.tzinfo or timezone.utc)).total_seconds()
    return finish_run(factory(), run_id, {"wall_s": round(wall, 3)}, if_complete=True)


def aggregate(run_id: int) -> None:
    from db.runs import aggregate_collapse

    aggregate_collapse(factory(), run_id, settings().thresholds(), t_shap_reference(run_info(run_id).bundle_path))
