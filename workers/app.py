"""The Celery app of the distributed mode, built by `create_app(settings)`; the tasks are in
workers.tasks and attach to whichever app is current.

Nothing is configured at import time: `shapstack worker` builds the app from its own settings
(so --config and --db apply), and `celery -A shapstack.celery_app worker|inspect|flower` finds
one built from the environment there.

Choices that matter and why:
- JSON only, in and out: a message is data, never code (pickle would run whatever a broker holds).
- acks_late + reject_on_worker_lost: a batch is acknowledged when it is finished, so a worker
  killed mid-batch gives its message back instead of losing it; every write is an upsert, so
  running a batch twice leaves one row per product.
- prefetch 1: batches are big, and a message waiting in a busy worker's buffer is one that an
  idle worker cannot take.
- the Redis visibility timeout outlives the hard time limit: a message is handed to a second
  worker only when no worker can still be running it.
- no result backend by default: progress and results are rows in the database (`shapstack status`).
- the visibility timeout is not how a dead worker's batch comes back: its claims stop being renewed
  and the sweeper sends the batch again within about a minute (workers.sweeper).
"""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlsplit

from celery import Celery, signals

from db.engine import DatabaseError, check_schema
from pipeline.errors import UserError
from workers import logs, metrics
from workers.queues import ROUTES, STACK

# settings: a shapstack.settings.Settings; workers only read its attributes
_settings = None


def settings():
    """The settings of the app this process built (inherited by a prefork worker's children)."""
    if _settings is None:
        raise RuntimeError("no Celery app built in this process: call workers.app.create_app(settings) first")
    return _settings


def beat_schedule(settings) -> dict:
    """No `expires`: it is stamped by the beat's clock and read by the workers', which may differ."""
    return {
        # work of dead workers and messages the broker lost (workers.sweeper), once per heartbeat
        "sweep": {"task": "shapstack.sweep", "schedule": timedelta(seconds=settings.heartbeat_s)},
        # collapse metrics of runs still classifying, for dashboards that watch a run fill up
        "aggregate": {"task": "shapstack.aggregate", "schedule": timedelta(seconds=120)},
    }


def create_app(settings, *, torch_threads: int = 1, allow_sqlite: bool = False) -> Celery:
    """A Celery app configured from settings; it becomes this process's current app."""
    global _settings
    _settings = settings
    limit = settings.task_time_limit_s
    app = Celery("shapstack", include=["workers.tasks"], set_as_current=True)
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        task_ignore_result=settings.result_backend is None,
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_routes=ROUTES,
        task_default_queue=STACK,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker outlives a broker restart
        broker_transport_options={
            "visibility_timeout": 2 * limit + 60,
            "unacked_restore_interval": max(5, limit // 4),
            "unacked_restore_throttle": 1,
        },
        # ride out a broker restart while sending the next stage, rather than fail the batch
        task_publish_retry_policy={"max_retries": 30, "interval_start": 0, "interval_step": 0.5, "interval_max": 2},
        worker_send_task_events=True,  # Flower and `celery events`
        task_send_sent_event=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,  # their results go to the database anyway
        # in memory (a lost schedule costs one early sweep), and only while it holds the beat lock
        beat_scheduler="workers.beat:LockedScheduler",
        beat_schedule=beat_schedule(settings),
        shapstack_torch_threads=torch_threads,
        shapstack_allow_sqlite=allow_sqlite,
    )
    signals.worker_init.connect(_check_worker, weak=False)
    logs.install(settings.log_format)  # task context on log lines; JSON lines if asked
    metrics.install()  # task timings, outcomes, retries (served by `shapstack worker --metrics-port`)
    return app


def check_deployment(settings, *, allow_sqlite: bool = False) -> None:
    """A broker, and a database every machine can reach: one line (UserError) when missing."""
    if not settings.broker_url:
        raise UserError("the distributed mode needs a broker: set SHAPSTACK_BROKER_URL (e.g. redis://host:6379/0)")
    scheme = urlsplit(settings.database_url).scheme
    if scheme.startswith("sqlite") and not allow_sqlite:
        raise UserError(f"workers need a database every machine can reach, not {settings.database_url}: "
                         "set SHAPSTACK_DATABASE_URL=postgresql://... (--allow-sqlite for one machine)")


def _check_worker(sender=None, **_) -> None:
    """`celery -A shapstack.celery_app worker` gets the same checks as `shapstack worker`: the
    deployment, and a database schema at this code's revision (never migrated by a worker)."""
    try:
        check_deployment(settings(), allow_sqlite=sender.app.conf.shapstack_allow_sqlite)
        check_schema(settings().database_url)
    except (UserError, DatabaseError) as exc:
        raise SystemExit(f"error: {exc}") from None
