"""Queues and routing by task name: one queue per kind of machine that serves it.

ingest  CPU, network and disk: parse feeds, verify images, store products
infer   GPU: base models and MM-SHAP (the expensive stage: scale this one)
stack   CPU, light: meta-model, predictions, run completion, the periodic sweeper
aggregate  CPU, light: the periodic collapse aggregation of runs in progress (SQL GROUP BY, db.collapse),
        on a queue of its own so that it never waits behind, nor delays, a backlog of stack batches
train   GPU, long: retraining a bundle from the labelled products in the database

A worker started with --beat serves `aggregate` too (see with_beat): the README's two workers, and
any deployment that runs the beat inside a worker, keep aggregating without naming the queue.
"""

from __future__ import annotations

from pipeline.errors import UserError

INGEST, INFER, STACK, AGGREGATE, TRAIN = "ingest", "infer", "stack", "aggregate", "train"
QUEUES = (INGEST, INFER, STACK, AGGREGATE, TRAIN)
DEFAULT = ",".join((INGEST, INFER, STACK, AGGREGATE))

ROUTES: dict[str, dict[str, str]] = {
    "shapstack.ingest": {"queue": INGEST},
    "shapstack.infer": {"queue": INFER},
    "shapstack.stack": {"queue": STACK},
    "shapstack.finish": {"queue": STACK},
    "shapstack.aggregate": {"queue": AGGREGATE},
    "shapstack.sweep": {"queue": STACK},
    "shapstack.train": {"queue": TRAIN},
}


def parse_queues(text: str) -> list[str]:
    """"infer,stack" -> ["infer", "stack"]; a name that is not a queue is a user error."""
    names = [q.strip() for q in text.split(",") if q.strip()]
    unknown = [q for q in names if q not in QUEUES]
    if unknown or not names:
        raise UserError(f"unknown queue(s) {', '.join(unknown) or repr(text)}: choose from {', '.join(QUEUES)}")
    return list(dict.fromkeys(names))


def with_beat(names: list[str]) -> list[str]:
    """The queues of a worker that also runs the beat: it serves the aggregation it schedules."""
    return names if AGGREGATE in names else [*names, AGGREGATE]
