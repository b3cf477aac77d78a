"""Sending again what nobody will finish, and only that.

Runs every heartbeat_s (10 s by default) on the stack queue, with two sources of truth:

1. claims (db.claims): products and ingests held by a worker whose lease expired, whose heartbeat
   stopped for three beats, or which stopped on a worker-fatal error are freed and sent again.
   A worker killed mid-batch is thus replaced within about 30 s + one sweep, whatever the task
   time limit; a slow batch, whose worker keeps beating, is never sent twice.
2. the broker (workers.broker): a pending product that no worker holds, that nothing changed for
   LOST_AFTER_S, and that no message in the broker names has lost its message (Redis restarted
   without persistence, a send that failed): it is sent again. A run merely queued behind another
   is named by its messages and left alone.

Runs classifying with nothing pending are finished (their finisher may have died); retrains whose
worker died are marked failed (db.retrains). Every time is the database's (db.claims).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Iterable

from sqlalchemy import exists, select

from db import models as m
from db.claims import free_dead_claims, idle_unclaimed
from db.retrains import abandon_dead
from db.runs import touch
from workers.app import settings
from workers.broker import held
from workers.dispatch import send_batches, send_ingest
from workers.finishing import complete
from workers.heartbeat import dead_after_s
from workers.resources import factory

log = logging.getLogger(__name__)

LOST_AFTER_S = 30.0  # a product neither claimed nor in the broker for this long has lost its message


def sweep() -> dict[int, int]:
    """Re-send what dead workers held and what the broker lost; returns {run id: products re-sent}."""
    resent: dict[int, int] = defaultdict(int)
    with factory()() as s, s.begin():
        products, ingests = free_dead_claims(s, dead_after_s())
        abandoned = abandon_dead(s, dead_after_s())
    for retrain_id in abandoned:
        log.warning("retrain %d: its worker died, marked failed (send it again: it resumes)", retrain_id)
    _send(products, "held by a worker that died or whose lease expired", resent)
    for run_id in ingests:
        log.warning("run %d: its ingest worker died, sending the ingest again", run_id)
        send_ingest(run_id)
        resent[run_id] += 0
    in_broker = held(settings().broker_url)
    if in_broker is not None:
        with factory()() as s:
            products, ingests = idle_unclaimed(s, LOST_AFTER_S)
        lost = [(r, pk) for r, pk in products if pk not in in_broker.products and r not in in_broker.ingests]
        lost_ingests = [r for r in ingests if r not in in_broker.ingests]
        with factory()() as s, s.begin():
            for run_id, pks in _by_run(lost).items():
                touch(s, run_id, pks)
            for run_id in lost_ingests:
                touch(s, run_id)
        _send(lost, "in no message of the broker (lost)", resent)
        for run_id in lost_ingests:
            log.warning("run %d: no worker holds its ingest and no message names it, sending it again", run_id)
            send_ingest(run_id)
            resent[run_id] += 0
    _finish_complete_runs()
    return dict(resent)


def _by_run(pairs: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for run_id, pk in pairs:
        out[run_id].append(pk)
    return out


def _send(pairs: list[tuple[int, int]], why: str, resent: dict[int, int]) -> None:
    for run_id, pks in _by_run(pairs).items():
        log.warning("run %d: %d pending products %s, sending them again", run_id, len(pks), why)
        send_batches(run_id, pks)
        resent[run_id] += len(pks)


def _finish_complete_runs() -> None:
    pending = exists().where(m.Product.run_id == m.Run.id, m.Product.status == "pending")
    with factory()() as s:
        runs = list(s.scalars(select(m.Run.id).where(m.Run.mode == "distributed", m.Run.status == "classifying",
                                                     ~pending)))
    for run_id in runs:
        complete(run_id)
