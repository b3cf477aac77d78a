"""The Celery app of the distributed mode. Configuration only; the tasks are in workers.tasks.

`celery -A workers.app worker|inspect|flower` finds `app` here, configured from the environment
(SHAPSTACK_* variables, SHAPSTACK_CONFIG or ./shapstack.toml) like every shapstack command;
`shapstack worker` configures it from its own settings (so --config and --db apply) first.

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
"""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlsplit

from celery import Celery

from shapstack.settings import Settings, load_settings
from workers.queues import ROUTES, STACK

app = Celery("shapstack", include=["workers.tasks"])
_settings: Settings | None = None


def settings() -> Settings:
    """The settings the app was configured with (the same in every process of a worker)."""
    assert _settings is not None
    return _settings


def sweep_interval(settings: Settings) -> float:
    """How often the sweeper looks for stalled runs: a few times per stall period."""
    return max(2.0, settings.task_time_limit_s / 4)


def beat_schedule(settings: Settings) -> dict:
    every = sweep_interval(settings)
    return {
        # a run none of whose rows changed for longer than a task may run has lost messages
        "sweep": {"task": "shapstack.sweep", "schedule": timedelta(seconds=every),
                  "options": {"expires": every}},
        # collapse metrics of runs still classifying, for dashboards that watch a run fill up
        "aggregate": {"task": "shapstack.aggregate", "schedule": timedelta(seconds=120), "options": {"expires": 120}},
    }


def configure(settings: Settings, *, torch_threads: int = 1, allow_sqlite: bool = False) -> Celery:
    global _settings
    _settings = settings
    limit = settings.task_time_limit_s
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
        beat_scheduler="celery.beat:Scheduler",  # in memory: a lost schedule costs one early sweep
        beat_schedule=beat_schedule(settings),
        shapstack_torch_threads=torch_threads,
        shapstack_allow_sqlite=allow_sqlite,
    )
    return app


def check_deployment(settings: Settings, *, allow_sqlite: bool = False) -> None:
    """A broker, and a database every machine can reach: one line (ValueError) when missing."""
    if not settings.broker_url:
        raise ValueError("the distributed mode needs a broker: set SHAPSTACK_BROKER_URL (e.g. redis://host:6379/0)")
    scheme = urlsplit(settings.database_url).scheme
    if scheme.startswith("sqlite") and not allow_sqlite:
        raise ValueError(f"workers need a database every machine can reach, not {settings.database_url}: "
                         "set SHAPSTACK_DATABASE_URL=postgresql://... (--allow-sqlite for one machine)")


def _refuse_sqlite(**_) -> None:
    """`celery -A workers.app worker` gets the same check as `shapstack worker`."""
    try:
        check_deployment(settings(), allow_sqlite=app.conf.shapstack_allow_sqlite)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def _connect_signals() -> None:
    from celery import signals

    signals.worker_init.connect(_refuse_sqlite, weak=False)


configure(load_settings())
_connect_signals()
