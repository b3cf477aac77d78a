"""The tasks: thin wrappers over the stage functions in jobs/, the same ones the embedded mode runs.

ingest  feed -> products (jobs.ingest); each stored batch is sent to infer
infer   base logits + MM-SHAP (jobs.infer); the batch is then sent to stack
stack   predictions (jobs.stack); the task that leaves nothing pending finishes the run
finish  the same check, sent by workers that need not hold the bundle (ingest, a failed infer)
sweep, aggregate   periodic (beat): work of dead workers and lost messages (workers.sweeper), collapse metrics
train   a new bundle from the labelled products in the database (workers.retrain)

Failures (workers.policy): the world's are retried for settings.retry_budget_s; a worker-fatal one
gives the message back and stops the worker; a failure to load what a run needs (bundle, stacker)
is counted on the run, which fails with that error after SETUP_LIMIT identical ones in a row.

Tasks are shared tasks: they attach to the app workers.app.create_app built in this process.
torch and the models load in the pool's processes (workers.resources), never in a worker's main
process before it forks.
"""

from __future__ import annotations

import logging

from celery import Task, shared_task
from celery.exceptions import Reject
from sqlalchemy import select

from db import models as m
from db.claims import claim_run, count_setup_failure, release_run
from db.products import fail_pending
from db.results import uninferred
from db.runs import set_run, start_run
from jobs.infer import infer_batch
from jobs.ingest import ingest_feed
from jobs.stack import stack_batch
from pipeline.manifest import base_kinds
from pipeline.split import split_selector
from workers import metrics
from workers import heartbeat
from workers.app import settings
from workers.dispatch import send, send_batches_or_log
from workers.finishing import aggregate as aggregate_run
from workers.finishing import complete
from workers.poison import Claimant, run_batch
from workers.policy import SetupFailed, WorkerFatal, inject_fault
from workers.resources import backend, factory, manifest, mmshap_config, run_info, stacker
from workers.retrain import recorded_retrain
from workers.retries import BROKER, TRANSIENT, Transient, backoff_s, describe, retries_for
from workers.sweeper import sweep as sweep_runs

log = logging.getLogger(__name__)

SETUP_LIMIT = 3  # identical failures to load a run's bundle or stacker, in a row, before the run fails
INGEST_LIMIT = 3  # ingest deliveries whose worker died before the run fails


class Resilient(Task):
    """Errors of the world are retried with capped exponential backoff (1, 2, 4 ... 30 s) for
    settings.retry_budget_s; a worker-fatal error stops this worker and gives the message back."""

    autoretry_for = TRANSIENT
    retry_backoff = True
    retry_backoff_max = 30
    retry_jitter = False

    @property
    def max_retries(self) -> int:  # read when retrying, so settings from --config apply
        s = settings()
        return s.max_retries if s.max_retries is not None else retries_for(s.retry_budget_s)

    def __call__(self, *args, **kwargs):
        heartbeat.ensure()
        try:
            return super().__call__(*args, **kwargs)
        except WorkerFatal as exc:
            heartbeat.stop_worker(str(exc))
            raise Reject(str(exc), requeue=True) from exc
        except SetupFailed as exc:
            return self._setup_failed(args[0], str(exc))

    def _setup_failed(self, run_id: int, error: str):
        """Count it on the run: the run fails after SETUP_LIMIT identical ones, else a retry later."""
        stage = self.name.removeprefix("shapstack.")
        with factory()() as s, s.begin():
            n = count_setup_failure(s, run_id, error)
            if n >= SETUP_LIMIT:
                set_run(s, run_id, status="failed", error=f"{stage}: {error} ({n} times)")
        if n == 0:  # no such run (deleted): nothing to retry
            return None
        if n >= SETUP_LIMIT:
            log.error("run %d failed: %s could not set up %d times: %s", run_id, stage, n, error)
            return None
        log.warning("run %d: %s could not set up (%d of %d): %s", run_id, stage, n, SETUP_LIMIT, error)
        raise self.retry(countdown=backoff_s(n + 2), max_retries=None)


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
        """Retry budget spent: the products of the batch wait, as failed, for `shapstack requeue`.

        Anything else, a broker that could not take the retry included, leaves them pending: the
        sweeper sends them again.
        """
        if not isinstance(exc, TRANSIENT) or isinstance(exc, BROKER):
            return
        stage = self.name.removeprefix("shapstack.")
        try:
            with factory()() as s, s.begin():
                n = fail_pending(s, args[1])
                s.get(m.Run, args[0]).error = f"{stage}: {describe(exc)}"
            metrics.failed(stage, n)
            log.error("run %s: %d products failed after %d retries: %s", args[0], n, self.max_retries, describe(exc))
        except Exception as again:  # noqa: BLE001 - the database may be what is away
            log.error("run %s: could not mark products failed: %s", args[0], describe(again))
            return
        send("shapstack.finish", args[0])  # failed is final until a requeue: the run may be over


def _claimant() -> Claimant:
    s = settings()
    return Claimant(heartbeat.worker_id(), s.lease_s, heartbeat.dead_after_s())


def _resend(stage: str, run_id: int):
    return lambda pks, seen: send(f"shapstack.{stage}", run_id, pks, seen=seen)


@shared_task(name="shapstack.ingest", base=Resilient, acks_late=False)
def ingest(run_id: int) -> int:
    """Store the run's feed and send its products to infer; a second delivery resumes.

    Acknowledged on receipt: a feed may take longer than any visibility timeout. The run is claimed
    while it is read (its lease renewed by the heartbeat): a worker that dies is noticed by the
    sweeper, which sends the ingest again; a delivery while another worker holds it does nothing.
    """
    s, me = settings(), heartbeat.worker_id()
    with factory()() as session, session.begin():
        deliveries = claim_run(session, run_id, me, s.lease_s)
        if deliveries is not None and deliveries > INGEST_LIMIT:
            set_run(session, run_id, status="failed", claimed_by=None, lease_until=None,
                    error=f"ingest: its worker died {deliveries - 1} times while reading the feed "
                          "(killed, out of memory?)")
    if deliveries is None or deliveries > INGEST_LIMIT:
        log.warning("run %d: ingest not started (%s)", run_id, "held by another worker or no longer ingesting"
                    if deliveries is None else f"{deliveries - 1} ingest workers died: run failed")
        return run_id
    finished = False
    mark = metrics.ingest_started(factory(), run_id)
    try:
        info = run_info(run_id)
        split = info.options.get("split", "all")  # only a split needs the bundle (its test_fraction and seed)
        select = split_selector(manifest(info.bundle_path), split) if split != "all" else None
        ingest_feed(factory(), info.feed, s.limits, batch_size=s.ingest_batch_size, mode="distributed",
                    run_id=run_id, on_batch=lambda run_id, pks: send_batches_or_log(run_id, pks),
                    select_product=select)
        with factory()() as session, session.begin():
            start_run(session, run_id, info.bundle_id, info.stacker)
            release_run(session, run_id, me, finished=True)
        finished = True
    except TRANSIENT:
        _reopen(run_id)  # ingest_feed marked the run failed, but a retry is coming
        raise
    finally:
        metrics.ingest_ended(factory(), run_id, mark)
        if not finished:
            _give_back(run_id, me)
    send("shapstack.finish", run_id)  # an empty feed, or a resumed one whose products were all done
    return run_id


def _reopen(run_id: int) -> None:
    try:
        with factory()() as s, s.begin():
            set_run(s, run_id, status="ingesting")
    except Exception as exc:  # noqa: BLE001 - the database may be what is away; the sweeper resumes it
        log.warning("run %d: could not reopen: %s", run_id, describe(exc))


def _give_back(run_id: int, me: str) -> None:
    try:
        with factory()() as s, s.begin():
            release_run(s, run_id, me, finished=False)
    except Exception as exc:  # noqa: BLE001 - then its lease runs out
        log.warning("run %d: could not release its ingest: %s", run_id, describe(exc))


@shared_task(name="shapstack.infer", base=Bounded)
def infer(run_id: int, pks: list[int], seen: int = 0) -> int:
    """Base logits and MM-SHAP for a batch (skipping products a redelivery finds already inferred)."""

    def prepare():
        info = run_info(run_id)
        path = info.bundle_path
        return info, backend(path, info.bundle_id), mmshap_config(path, info.options)

    def work(todo: list[int], ready) -> None:
        info, models, config = ready
        inject_fault("infer")
        with factory()() as s:
            missing = uninferred(s, info.bundle_id, todo, base_kinds(models.bundle.manifest))
        if missing:
            infer_batch(factory(), models, info.bundle_id, missing, config)
            metrics.mmshap(factory(), missing)

    outcome = run_batch("infer", factory(), pks, seen, work, _resend("infer", run_id), _claimant(), prepare)
    metrics.batch_done("infer", len(outcome.done), outcome.parked)
    if outcome.done:
        send("shapstack.stack", run_id, outcome.done)
    elif outcome.parked:
        send("shapstack.finish", run_id)  # the poison may have been the last product pending
    return len(outcome.done)


@shared_task(name="shapstack.stack", base=Bounded)
def stack(run_id: int, pks: list[int], seen: int = 0) -> int:
    """Predictions for a batch; the batch that leaves nothing pending finishes the run."""

    def prepare():
        info = run_info(run_id)
        path = info.bundle_path
        return info, stacker(path, info.bundle_id, info.stacker), manifest(path)

    def work(todo: list[int], ready) -> None:
        info, meta, bundle_manifest = ready
        stack_batch(factory(), meta, bundle_manifest, info.bundle_id, todo)

    outcome = run_batch("stack", factory(), pks, seen, work, _resend("stack", run_id), _claimant(), prepare)
    metrics.batch_done("stack", len(outcome.done), outcome.parked)
    complete(run_id)
    return len(outcome.done)


@shared_task(name="shapstack.finish")
def finish(run_id: int) -> bool:
    return complete(run_id)


@shared_task(name="shapstack.aggregate")
def aggregate() -> list[int]:
    """Collapse metrics of every run still classifying (and finish any whose finisher died)."""
    with factory()() as s:
        runs = list(s.scalars(select(m.Run.id).where(m.Run.status == "classifying", m.Run.mode == "distributed")))
    for run_id in runs:
        try:
            if not complete(run_id):
                aggregate_run(run_id)
        except Transient as exc:  # this worker lacks the run's bundle: another one will do it
            log.warning("run %d: not aggregated here: %s", run_id, exc)
    return runs


@shared_task(name="shapstack.sweep")
def sweep() -> dict[int, int]:
    return sweep_runs()


@shared_task(name="shapstack.train", base=Resilient, acks_late=False, bind=True)
def train(self, out: str, runs: list[int], config: dict) -> str:
    """A bundle trained on the labelled products of runs (all runs when empty); returns its id.

    Acknowledged on receipt like ingest: training outlasts any visibility timeout, and it resumes
    from its checkpoints (OUT/.work) when sent again. Recorded in `retrains` (one row per task).
    """
    return recorded_retrain(factory(), settings(), out, runs, config, worker=heartbeat.worker_id(),
                            task_id=self.request.id, log_fn=log.info)
