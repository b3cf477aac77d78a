"""Log lines an operator can search: text (Celery's format, the default) or one JSON object per line.

`log_format = "json"` (SHAPSTACK_LOG_FORMAT=json) makes every log record of a worker, its pool
processes and the CLI one line of JSON:

    {"ts": "2026-11-30T10:12:03.120Z", "level": "INFO", "logger": "celery.app.trace",
     "msg": "Task shapstack.infer[5f0c...] succeeded in 1.2s: 25", "worker": "infer@host", "pid": 4242,
     "stage": "infer", "run_id": 12, "batch": "5f0c...", "products": 25}

While a task runs, its stage, run id, batch (the task id: Flower and `celery inspect` show the
same id) and batch size are on every line it logs (Celery's task signals set them); code that
knows a run id outside a task passes it with `extra={"run_id": ...}`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

import celery.apps.worker
from celery import signals

FIELDS = ("worker", "pid", "stage", "run_id", "batch", "products", "task")
# tasks whose first argument is a run id; the second, for batch stages, the batch's product keys
RUN_TASKS = {"ingest", "infer", "stack", "finish"}
BATCH_TASKS = {"infer", "stack"}

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("shapstack_log_context", default={})
_worker: str | None = None  # this worker's node name (pool processes inherit it)


def _line(created: float, level: str, logger: str, msg: str, pid: int | None) -> dict[str, Any]:
    return {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created * 1000) % 1000:03d}Z",
            "level": level, "logger": logger, "msg": msg, "worker": _worker, "pid": pid}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback is a field, its newlines escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        out = _line(record.created, record.levelname, record.name, record.getMessage(), record.process)
        out.update(_context.get())
        out.update({k: getattr(record, k) for k in FIELDS if getattr(record, k, None) is not None})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps({k: v for k, v in out.items() if v is not None}, default=str)


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Add fields (run_id=..., stage=...) to every line logged inside the block."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def task_fields(task_name: str, args: Any, task_id: str | None) -> dict[str, Any]:
    """The log context of a shapstack task from its name and arguments."""
    stage = task_name.removeprefix("shapstack.")
    fields: dict[str, Any] = {"stage": stage, "batch": task_id}
    args = list(args or ())
    if stage in RUN_TASKS and args and isinstance(args[0], int):
        fields["run_id"] = args[0]
    if stage in BATCH_TASKS and len(args) > 1 and isinstance(args[1], list):
        fields["products"] = len(args[1])
    return fields


def configure_cli(log_format: str) -> None:
    """The CLI's logging: text leaves Python's default (warnings on stderr); json writes every INFO+ record."""
    if log_format != "json":
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def install(log_format: str) -> None:
    """Hook a worker's logging (call before it starts): task context always, JSON lines if asked."""
    signals.celeryd_init.connect(_named, weak=False)
    signals.task_prerun.connect(_task_started, weak=False)
    signals.task_postrun.connect(_task_ended, weak=False)
    if log_format == "json":
        logging.captureWarnings(True)  # Python warnings (Celery's SecurityWarning...) as records, not free text
        signals.after_setup_logger.connect(_json_handlers, weak=False)
        signals.after_setup_task_logger.connect(_json_handlers, weak=False)
        # the few lines Celery writes straight to the terminal ("worker: Warm shutdown"), from signal
        # handlers: written as JSON with one os.write, as Celery does, taking no logging lock
        celery.apps.worker.safe_say = _say_json


def _say_json(msg: str, f=sys.__stderr__) -> None:
    line = json.dumps({k: v for k, v in _line(time.time(), "INFO", "celery.apps.worker", str(msg).strip(),
                                              os.getpid()).items() if v is not None})
    os.write(f.fileno(), (line + "\n").encode())


def _named(sender=None, **_) -> None:
    global _worker
    _worker = str(sender) if sender else f"pid-{os.getpid()}"


_tokens: dict[str, contextvars.Token] = {}


def _task_started(task_id=None, task=None, args=None, **_) -> None:
    _tokens[task_id] = _context.set(task_fields(task.name, args, task_id))


def _task_ended(task_id=None, **_) -> None:
    token = _tokens.pop(task_id, None)
    if token is not None:
        _context.reset(token)


def _json_handlers(logger=None, **_) -> None:
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())
