"""Queues and routing by task name: one queue per kind of machine that serves it.

ingest  CPU, network and disk: parse feeds, verify images, store products
infer   GPU: base models and MM-SHAP (the expensive stage: scale this one)
stack   CPU, light: meta-model, predictions, run completion, the periodic sweeper and aggregation
train   GPU, long: retraining a bundle from the labelled products in the database
"""

from __future__ import annotations

from pipeline.errors import UserError

INGEST, INFER, STACK, TRAIN = "ingest", "infer", "stack", "train"
QUEUES = (INGEST, INFER, STACK, TRAIN)

ROUTES: dict[str, dict[str, str]] = {
    "shapstack.ingest": {"queue": INGEST},
    "shapstack.infer": {"queue": INFER},
    "shapstack.stack": {"queue": STACK},
    "shapstack.finish": {"queue": STACK},
    "shapstack.aggregate": {"queue": STACK},
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
