"""Every message of the distributed mode leaves through here, by task name (routing: workers.queues).

Senders need not import the tasks (the CLI does not load torch to enqueue a feed), and a message
holds ids only: the run, product keys, and `seen` (workers.poison).
"""

from __future__ import annotations

import logging
from typing import Sequence

from celery import current_app

from workers.app import settings
from workers.retries import describe, is_transient

log = logging.getLogger(__name__)


def send(name: str, *args, **kwargs) -> str:
    return current_app.send_task(name, args=args, kwargs=kwargs).id


def send_batches(run_id: int, pks: Sequence[int], *, seen: int = 0, stage: str = "infer") -> int:
    """pks in batches of settings.infer_batch_size; returns how many messages were sent."""
    size = max(1, settings().infer_batch_size)
    chunks = [list(pks[i : i + size]) for i in range(0, len(pks), size)]
    for chunk in chunks:
        send(f"shapstack.{stage}", run_id, chunk, seen=seen)
    return len(chunks)


def send_batches_or_log(run_id: int, pks: Sequence[int]) -> None:
    """For ingest: a batch that cannot be sent now stays pending, and the sweeper sends it later."""
    try:
        send_batches(run_id, pks)
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning("run %d: %d products not sent (%s); the sweeper will send them", run_id, len(pks), describe(exc))


def send_ingest(run_id: int) -> str:
    return send("shapstack.ingest", run_id)


def send_train(out: str, runs: Sequence[int], config: dict) -> str:
    return send("shapstack.train", out, list(runs), config)
