"""One batch of a stage, run so that a poison product cannot hold up its run.

A batch that raises is split in halves and both are sent again: the half without the poison
finishes, the half with it splits again, until the poison is alone; alone and still failing, it
is dead-lettered (table dead_letters) and its run finishes without it.

A worker that dies mid-batch (killed, out of memory, over the hard time limit) runs no handler,
so the database remembers instead: each start of a stage raises the products' `attempts`, each
finish resets it. A message carries `seen`, the attempts it was sent with; a delivery that finds
more knows that an earlier run of these products died with its worker, and splits likewise. A
product alone that has killed LOST_LIMIT workers is dead-lettered.

Errors of the world (workers.errors) are not the products' fault: the task is retried with
backoff and the batch keeps its size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

from workers.errors import Transient, describe, is_transient

log = logging.getLogger(__name__)

LOST_LIMIT = 3  # a product alone whose worker died this many times is parked
FAIL_LIMIT = 2  # a product alone that raised this many times is parked

Resend = Callable[[list[int], int], None]  # (product keys, seen)


@dataclass
class Outcome:
    done: list[int] = field(default_factory=list)  # finished by this run
    parked: int = 0  # dead-lettered by this run: the run may be complete now


def halves(pks: Sequence[int]) -> list[list[int]]:
    mid = len(pks) // 2
    return [list(pks[:mid]), list(pks[mid:])]


def run_batch(stage: str, factory, pks: Sequence[int], seen: int, work: Callable[[list[int]], object],
              resend: Resend) -> Outcome:
    """work() on the products of pks still pending.

    The others were finished already, or are re-sent in smaller batches, or dead-lettered.
    """
    from db.store import add_attempts, pending_attempts, reset_attempts

    with factory() as s:
        attempts = pending_attempts(s, pks)
    todo = [pk for pk in pks if pk in attempts]
    if not todo:
        return Outcome()
    worst = max(attempts.values())
    if worst > seen:  # an earlier run of these products died with its worker
        if len(todo) > 1:
            log.warning("%s: %d products whose last run died with its worker: splitting", stage, len(todo))
            for half in halves(todo):
                resend(half, worst)
            return Outcome()
        if worst >= LOST_LIMIT:
            park(factory, todo[0], stage, f"worker lost {worst} times while processing this product "
                                          "(killed, out of memory or over the time limit)", worst)
            return Outcome(parked=1)
    with factory() as s, s.begin():
        add_attempts(s, todo, 1)
    try:
        work(todo)
    except Exception as exc:
        if is_transient(exc):
            _release(factory, todo)
            raise Transient(describe(exc)) from exc
        log.warning("%s: batch of %d failed: %s", stage, len(todo), describe(exc))
        if len(todo) > 1:
            for half in halves(todo):
                resend(half, worst + 1)
        elif worst + 1 >= FAIL_LIMIT:
            park(factory, todo[0], stage, describe(exc), worst + 1)
            return Outcome(parked=1)
        else:
            resend(todo, worst + 1)
        return Outcome()
    with factory() as s, s.begin():
        reset_attempts(s, todo)
    return Outcome(done=todo)


def park(factory, pk: int, stage: str, error: str, attempts: int) -> None:
    from db.store import dead_letter

    log.error("%s: product %d dead-lettered after %d attempts: %s", stage, pk, attempts, error)
    with factory() as s, s.begin():
        dead_letter(s, pk, stage, error, attempts)


def _release(factory, pks: list[int]) -> None:
    """Undo a start that the world, not the batch, cut short (best effort: the world may still be away)."""
    from db.store import add_attempts

    try:
        with factory() as s, s.begin():
            add_attempts(s, pks, -1)
    except Exception as exc:  # noqa: BLE001 - the retry matters more than the count
        log.warning("could not release %d products: %s", len(pks), describe(exc))
