"""The tasks: thin wrappers over db.runs' stage functions, the same ones the embedded mode runs.

ingest  feed -> products (db.store.ingest_feed); each stored batch is sent to infer
infer   base logits + MM-SHAP (db.runs.infer_batch); the batch is then sent to stack
stack   predictions (db.runs.stack_batch); the task that leaves nothing pending finishes the run
finish  the same check, sent by workers that need not hold the bundle (ingest, a failed infer)
sweep, aggregate   periodic (beat): lost messages (workers.sweeper), collapse metrics
train   a new bundle from the labelled products in the database (workers.retrain)

Heavy imports (torch, the models) happen inside the tasks, in the pool's processes, never in the
worker's main process before it forks.
"""

from __future__ import annotations

import logging

from celery import Task

from workers.app import app, settings
from workers.batches import run_batch
from workers.completion import aggregate as aggregate_run
from workers.completion import complete
from workers.context import backend, factory, manifest, mmshap_config, run_info, stacker
from workers.dispatch import send, send_batches_or_log
from workers.errors import BROKER, TRANSIENT, Transient, describe

log = logging.getLogger(__name__)


class Resilient(Task):
    """Errors of the world are retried with exponential backoff (1, 2, 4 ... s, jittered)."""

    autoretry_for = TRANSIENT
    retry_backoff = True
    retry_backoff_max = 300
    retry_jitter = True

    @property
    def max_retries(self) -> int:  # read when retrying, so settings from --config apply
        return settings().max_retries


class Bounded(Resilient):
    """A batch stage: a batch must finish within task_time_limit_s; past 80% of it the batch raises
    (SoftTimeLimitExceeded) and is split like any failing batch, at 100% its process is killed."""

    @property
    def time_limit(self) -> int:
        return settings().task_time_limit_s

    @property
    def soft_time_limit(self) -> float:
        return max(1.0, 0.8 * settings().task_time_limit_s)

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        """Retries exhausted: the products of the batch wait, as failed, for `shapstack requeue`.

        Anything else, a broker that could not take the retry included, leaves them pending: the
        sweeper sends them again.
        """
        if not isinstance(exc, TRANSIENT) or isinstance(exc, BROKER):
            return
        from db import models as m
        from db.store import fail_pending

        try:
            with factory()() as s, s.begin():
                n = fail_pending(s, args[1])
                s.get(m.Run, args[0]).error = f"{self.name.removeprefix('shapstack.')}: {describe(exc)}"
            log.error("run %s: %d products failed after %d retries: %s", args[0], n, self.max_retries, describe(exc))
        except Exception as again:  # noqa: BLE001 - the database may be what is away
            log.error("run %s: could not mark products failed: %s", args[0], describe(again))
            return
        send("shapstack.finish", args[0])  # failed is final until a requeue: the run may be over


def _resend(stage: str, run_id: int):
    return lambda pks, seen: send(f"shapstack.{stage}", run_id, pks, seen=seen)


@app.task(name="shapstack.ingest", base=Resilient, acks_late=False)
def ingest(run_id: int) -> int:
    """Store the run's feed and send its products to infer; a second delivery resumes.

    Acknowledged on receipt: a feed may take longer than any visibility timeout, and a lost
    ingest is found and sent again by the sweeper.
    """
    from db.runs import start_run
    from db.store import ingest_feed, touch

    info = run_info(run_id)
    s = settings()

    def on_batch(run_id: int, pks: list[int]) -> None:
        with factory()() as session, session.begin():
            touch(session, run_id)  # a resumed ingest changes no product row: the sweeper must see it move
        send_batches_or_log(run_id, pks)

    try:
        ingest_feed(factory(), info.feed, s.limits(), batch_size=s.ingest_batch_size, mode="distributed",
                    run_id=run_id, on_batch=on_batch)
    except TRANSIENT:
        _reopen(run_id)  # ingest_feed marked the run failed, but a retry is coming
        raise
    start_run(factory(), run_id, info.bundle_id, info.stacker)
    send("shapstack.finish", run_id)  # an empty feed, or a resumed one whose products were all done
    return run_id


def _reopen(run_id: int) -> None:
    from sqlalchemy import update

    from db import models as m

    try:
        with factory()() as s, s.begin():
            s.execute(update(m.Run).where(m.Run.id == run_id).values(status="ingesting"))
    except Exception as exc:  # noqa: BLE001 - the database may be what is away; the sweeper resumes it
        log.warning("run %d: could not reopen: %s", run_id, describe(exc))


@app.task(name="shapstack.infer", base=Bounded)
def infer(run_id: int, pks: list[int], seen: int = 0) -> int:
    """Base logits and MM-SHAP for a batch (skipping products a redelivery finds already inferred)."""
    from db.runs import infer_batch, uninferred

    info = run_info(run_id)
    path = info.bundle_path
    models = backend(path, info.bundle_id)
    budget, mode = mmshap_config(path)

    def work(todo: list[int]) -> None:
        with factory()() as s:
            missing = uninferred(s, info.bundle_id, todo)
        if missing:
            infer_batch(factory(), models, info.bundle_id, missing, budget=budget, mode=mode)

    outcome = run_batch("infer", factory(), pks, seen, work, _resend("infer", run_id))
    if outcome.done:
        send("shapstack.stack", run_id, outcome.done)
    elif outcome.parked:
        send("shapstack.finish", run_id)  # the poison may have been the last product pending
    return len(outcome.done)


@app.task(name="shapstack.stack", base=Bounded)
def stack(run_id: int, pks: list[int], seen: int = 0) -> int:
    """Predictions for a batch; the batch that leaves nothing pending finishes the run."""
    from db.runs import stack_batch

    info = run_info(run_id)
    path = info.bundle_path
    meta, labels = stacker(path, info.bundle_id, info.stacker), manifest(path)["labels"]
    outcome = run_batch("stack", factory(), pks, seen,
                        lambda todo: stack_batch(factory(), meta, labels, info.bundle_id, todo), _resend("stack", run_id))
    complete(run_id)
    return len(outcome.done)


@app.task(name="shapstack.finish")
def finish(run_id: int) -> bool:
    return complete(run_id)


@app.task(name="shapstack.aggregate")
def aggregate() -> list[int]:
    """Collapse metrics of every run still classifying (and finish any whose finisher died)."""
    from sqlalchemy import select

    from db import models as m

    with factory()() as s:
        runs = list(s.scalars(select(m.Run.id).where(m.Run.status == "classifying", m.Run.mode == "distributed")))
    for run_id in runs:
        try:
            if not complete(run_id):
                aggregate_run(run_id)
        except Transient as exc:  # this worker lacks the run's bundle: another one will do it
            log.warning("run %d: not aggregated here: %s", run_id, exc)
    return runs


@app.task(name="shapstack.sweep")
def sweep() -> dict[int, int]:
    from workers.sweeper import sweep as sweep_runs

    return sweep_runs(settings().task_time_limit_s)


@app.task(name="shapstack.train", base=Resilient, acks_late=False)
def train(out: str, runs: list[int], config: dict) -> str:
    """A bundle trained on the labelled products of runs (all runs when empty); returns its id.

    Acknowledged on receipt like ingest: training outlasts any visibility timeout, and it resumes
    from its checkpoints (OUT/.work) when sent again.
    """
    from workers.retrain import retrain

    manifest = retrain(factory(), settings(), out, runs, config, log_fn=log.info)
    return manifest["content_hash"][:16]
