"""Recovering messages the broker lost.

Redis here keeps nothing on disk, and a worker machine that dies takes its unacknowledged
message with it until the visibility timeout: either way products stay pending with no message
to move them. The database knows better than the broker what is left, so the sweeper asks it.

A run is stalled when none of its rows (the run, its products) has changed for stall_s seconds;
stall_s is the task time limit, since no batch can run longer than that without being killed.
A stalled run still ingesting (or ingested, its ingest worker gone before handing the run on)
gets its ingest task again (ingest resumes: stored products keep their state); a stalled run
classifying gets its pending products again, in fresh batches
(`seen` 0, so products whose last run died are split out as workers.batches does), and is
touched so that the next sweep waits another stall_s. A run with nothing pending is finished.
A product already done when its duplicate message arrives is skipped, so a false alarm (a queue
merely long) costs a few cheap no-op tasks, never a second result.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from workers.completion import complete
from workers.context import factory
from workers.dispatch import send_batches, send_ingest

log = logging.getLogger(__name__)


def sweep(stall_s: float) -> dict[int, int]:
    """Re-send the work of stalled runs; returns {run id: products re-sent}."""
    from db import models as m
    from db.store import product_pks, stalled_runs, touch

    resent: dict[int, int] = {}
    with factory()() as s:
        runs = [(r.id, r.status) for r in stalled_runs(s, m.utcnow() - timedelta(seconds=stall_s))]
    for run_id, status in runs:
        with factory()() as s, s.begin():
            pks = product_pks(s, run_id, ("pending",)) if status == "classifying" else []
            touch(s, run_id, pks)
        if status in ("ingesting", "ingested"):
            log.warning("run %d: ingest stalled for %.0f s, sending it again", run_id, stall_s)
            send_ingest(run_id)
        elif pks:
            log.warning("run %d: %d pending products stalled for %.0f s, sending them again", run_id, len(pks), stall_s)
            send_batches(run_id, pks)
        else:
            complete(run_id)
        resent[run_id] = len(pks)
    return resent
