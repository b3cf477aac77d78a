"""One batch of a stage, run so that neither a poison product nor a broken worker holds up its run.

The worker first claims the batch's pending products (db.claims: one conditional statement, so a
second delivery of the same batch gets none of them while this one runs), then loads what the run
needs (`prepare`), then counts an attempt on each product and works.

A batch that raises is split in halves and both are sent again: the half without the poison
finishes, the half with it splits again, until the poison is alone; alone, it is sent again until
it has raised on two different workers (or, with no other worker serving the stage, FAIL_LIMIT
times), then dead-lettered (table dead_letters) and its run finishes without it.

A worker that dies mid-batch (killed, out of memory, over the hard time limit) runs no handler,
so the database remembers instead: each start of the work raises the products' `attempts`, each
finish resets it, and the sweeper frees the dead worker's claims. A message carries `seen`, the
attempts it was sent with; a delivery that finds more knows that an earlier run of these products
died with its worker, and splits likewise. A product alone that has killed LOST_LIMIT workers is
dead-lettered.

Failures that are not the products' (workers.policy) charge nothing: the world's are retried with
the batch whole, a worker-fatal one gives the batch back and stops the worker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

from db.claims import begin_work, claim, live_workers, note_failure, release
from db.products import dead_letter, reset_attempts
from workers.policy import BREAKER, FATAL, PRODUCT, TRANSIENT, SetupFailed, WorkerFatal, kind
from workers.retries import Transient, describe

log = logging.getLogger(__name__)

LOST_LIMIT = 3  # a product alone whose worker died this many times is parked
FAIL_LIMIT = 2  # a product alone that raised on this many different workers is parked
ALONE_LIMIT = 4  # ... or this many times in all, when no other worker serves its stage

Resend = Callable[[list[int], int], None]  # (product keys, seen)


@dataclass
class Outcome:
    done: list[int] = field(default_factory=list)  # finished by this run
    parked: int = 0  # dead-lettered by this run: the run may be complete now


@dataclass(frozen=True)
class Claimant:
    worker: str  # workers.heartbeat.worker_id()
    lease_s: float
    dead_after_s: float


def halves(pks: Sequence[int]) -> list[list[int]]:
    mid = len(pks) // 2
    return [list(pks[:mid]), list(pks[mid:])]


def run_batch(stage: str, factory, pks: Sequence[int], seen: int, work: Callable[[list[int], object], object],
              resend: Resend, me: Claimant, prepare: Callable[[], object] = lambda: None) -> Outcome:
    """work(todo, prepare()) on the products of pks still pending that this worker could claim.

    The others are finished, held by another worker, re-sent in smaller batches, or dead-lettered.
    Raises Transient (retry), WorkerFatal (stop this worker) or SetupFailed (prepare failed on its own).
    """
    with factory() as s, s.begin():
        attempts = claim(s, pks, me.worker, me.lease_s)
    todo = [pk for pk in pks if pk in attempts]
    if not todo:
        return Outcome()
    worst = max(attempts.values())
    if worst > seen:  # an earlier run of these products died with its worker
        if len(todo) > 1:
            log.warning("%s: %d products whose last run died with its worker: splitting", stage, len(todo))
            _release(factory, todo, me)
            for half in halves(todo):
                resend(half, worst)
            return Outcome()
        if worst >= LOST_LIMIT:
            park(factory, todo[0], stage, f"worker lost {worst} times while processing this product "
                                          "(killed, out of memory or over the time limit)", worst)
            return Outcome(parked=1)
    try:
        ready = prepare()
    except Exception as exc:
        _release(factory, todo, me)
        raise _not_the_products(exc, SetupFailed) from exc
    with factory() as s, s.begin():
        started = begin_work(s, todo, me.worker)
    todo = [pk for pk in todo if pk in started]  # a claim lost meanwhile (lease expired) is another's now
    try:
        work(todo, ready)
    except Exception as exc:
        error = describe(exc)
        if kind(exc) != PRODUCT or BREAKER.failed(error, todo):
            _release(factory, todo, me, uncount=True)
            raise _not_the_products(exc, WorkerFatal) from exc
        log.warning("%s: batch of %d failed: %s", stage, len(todo), error)
        return _product_failed(stage, factory, todo, worst + 1, error, resend, me)
    BREAKER.succeeded()
    with factory() as s, s.begin():
        reset_attempts(s, todo)
    return Outcome(done=todo)


def _not_the_products(exc: Exception, otherwise: type[Exception]) -> Exception:
    """Transient for the world's errors, WorkerFatal for the machine's, else otherwise(exc)."""
    what = kind(exc)
    if what == TRANSIENT:
        return Transient(describe(exc))
    if what == FATAL or otherwise is WorkerFatal:
        return WorkerFatal(describe(exc) if what == FATAL else f"the same error on unrelated batches: {describe(exc)}")
    return otherwise(describe(exc))


def _product_failed(stage: str, factory, todo: list[int], attempts: int, error: str, resend: Resend,
                    me: Claimant) -> Outcome:
    if len(todo) > 1:
        _release(factory, todo, me)
        for half in halves(todo):
            resend(half, attempts)
        return Outcome()
    pk = todo[0]
    with factory() as s, s.begin():
        workers = note_failure(s, pk, me.worker)
        others = live_workers(s, stage, me.dead_after_s, besides=me.worker)
    if len(workers) >= FAIL_LIMIT or attempts >= ALONE_LIMIT or (attempts >= FAIL_LIMIT and not others):
        park(factory, pk, stage, error, attempts)
        return Outcome(parked=1)
    _release(factory, todo, me)
    resend(todo, attempts)
    return Outcome()


def park(factory, pk: int, stage: str, error: str, attempts: int) -> None:
    log.error("%s: product %d dead-lettered after %d attempts: %s", stage, pk, attempts, error)
    with factory() as s, s.begin():
        dead_letter(s, pk, stage, error, attempts)


def _release(factory, pks: list[int], me: Claimant, *, uncount: bool = False) -> None:
    """Give the claims back (uncount: and the attempt; best effort: the world may still be away,
    and then the lease runs out instead)."""
    try:
        with factory() as s, s.begin():
            release(s, pks, me.worker, uncount=uncount)
    except Exception as exc:  # noqa: BLE001 - the retry matters more than the claim
        log.warning("could not release %d products: %s", len(pks), describe(exc))
