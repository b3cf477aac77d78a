"""Who this worker process is, and the thread that says it is alive.

Each process that runs tasks (a prefork pool's child, or a solo worker's main process) has an id,
`<node name>/<pid>`, under which it claims batches (db.claims). A daemon thread beats every
heartbeat_s: the process's row in `workers` (last_seen, in the database's time) and the leases of
everything it holds move on. A process killed stops beating: after three silent beats, or when its
lease runs out, the sweeper frees what it held and sends it again. A process that stops on a
worker-fatal error marks its row `fatal`, and what it held is free at once, and the worker exits
with EXIT_WORKER_FATAL (not 0), so that a supervisor restarting "on-failure" sees a failure.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from multiprocessing.sharedctypes import RawValue

from celery import signals

from db.claims import heartbeat as beat_row
from db.claims import mark_worker
from workers.app import settings
from workers.resources import factory
from workers.retries import describe

log = logging.getLogger(__name__)

_node = {"name": None, "queues": "", "main_pid": None}
_beating: dict[int, threading.Event] = {}  # pid -> the stop event of its thread
# set by whichever process stops on a worker-fatal error; shared memory made before the pool forks,
# so the worker's main process, which exits, sees what a pool process decided
_fatal = RawValue("b", 0)
EXIT_WORKER_FATAL = 4


@signals.worker_init.connect(weak=False)
def _remember_node(sender=None, **_) -> None:
    """In the worker's main process, before the pool forks: its node name, queues and pid."""
    _node["name"] = getattr(sender, "hostname", None)
    try:
        _node["queues"] = ",".join(sorted(sender.app.amqp.queues.consume_from))
    except AttributeError:
        _node["queues"] = ""
    _node["main_pid"] = os.getpid()


@signals.worker_process_init.connect(weak=False)
def _child_started(**_) -> None:
    ensure()


@signals.worker_process_shutdown.connect(weak=False)
def _child_stopping(**_) -> None:
    stop("stopped")


def worker_id() -> str:
    return f"{_node['name'] or socket.gethostname()}/{os.getpid()}"


def dead_after_s(of=None) -> float:
    """Silence after which a worker is taken for dead: three missed beats (of: settings, default the app's)."""
    return 3 * (of or settings()).heartbeat_s


def ensure() -> str:
    """Start this process's heartbeat if it has none (after a fork too); returns its id."""
    pid = os.getpid()
    if pid not in _beating:
        stop_event = threading.Event()
        _beating[pid] = stop_event
        beat()
        threading.Thread(target=_loop, args=(stop_event,), name="shapstack-heartbeat", daemon=True).start()
    return worker_id()


def beat() -> bool:
    try:
        with factory()() as s, s.begin():
            beat_row(s, worker_id(), _node["queues"], settings().lease_s)
        return True
    except Exception as exc:  # noqa: BLE001 - the database may be away; the next beat tries again
        log.warning("heartbeat of %s failed: %s", worker_id(), describe(exc))
        return False


def _loop(stop_event: threading.Event) -> None:
    every = settings().heartbeat_s
    next_at = time.monotonic() + every
    while not stop_event.wait(max(0.0, next_at - time.monotonic())):
        next_at += every
        beat()


def stop(status: str, error: str | None = None) -> None:
    """Stop beating and mark this process stopped or fatal (best effort: the database may be away)."""
    event = _beating.pop(os.getpid(), None)
    if event is None:  # not beating, or stopped already (a fatal stop stays fatal)
        return
    event.set()
    try:
        with factory()() as s, s.begin():
            mark_worker(s, worker_id(), status, error)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not mark %s %s: %s", worker_id(), status, describe(exc))


def stop_worker(reason: str) -> None:
    """A worker-fatal error: this worker takes no more work and exits (warm shutdown of its main process)."""
    log.critical("worker %s stops: %s", worker_id(), reason)
    _fatal.value = 1
    stop("fatal", reason)
    os.kill(_node["main_pid"] or os.getpid(), signal.SIGTERM)


def stopped_fatally() -> bool:
    """Whether a process of this worker stopped on a worker-fatal error (read after the worker returns)."""
    return bool(_fatal.value)
