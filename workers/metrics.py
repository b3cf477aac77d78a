"""Prometheus metrics of the workers, served by `shapstack worker --metrics-port N`.

Every series is named shapstack_* (docs/operations.md lists them):

    shapstack_products_total{stage,status}    products that left a stage: ingest accepted; infer/stack
                                              done, dead (dead-lettered) or failed (retries exhausted)
    shapstack_rejects_total{reason}           feed rows rejected at ingest, by reason code (reason_code)
    shapstack_retries_total{stage}            task retries (errors of the world: database, broker, Triton)
    shapstack_dead_letters_total{stage}       products dead-lettered
    shapstack_tasks_total{stage,state}        tasks finished: SUCCESS, FAILURE, RETRY
    shapstack_batch_seconds{stage}            histogram of a task's wall time (a batch for infer/stack)
    shapstack_mmshap_evaluations_total        coalition evaluations spent, from the stored contributions
    shapstack_mmshap_errors_total             products whose MM-SHAP could not be estimated (no T-SHAP)
    shapstack_collapse_flags_total{flag}      collapse flags raised by finished runs (text_collapse, ...)
    shapstack_runs_finished_total{outcome}    runs finished: clean, or with_failures
    shapstack_tshap_drift                     last finished run's mean T-SHAP minus the bundle's training mean

Celery's default pool forks processes that run the tasks; their counts reach the parent's HTTP
server through prometheus_client's multiprocess mode: `serve` gives the worker a fresh directory
(PROMETHEUS_MULTIPROC_DIR) before the pool forks, each process writes its values there, and the
parent sums them on each scrape. The solo and threads pools run tasks in the parent: same path.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from functools import lru_cache
from types import SimpleNamespace

from celery import signals
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server, values

from db.stats import ingest_mark, ingested_since, mmshap_cost

log = logging.getLogger(__name__)

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

# reject reason (its start) -> code; a reason not listed gets a slug of its first words
REASON_CODES = (
    ("missing product_id", "missing_id"), ("product_id longer", "id_too_long"),
    ("duplicate product_id", "duplicate_id"), ("nothing usable", "empty_row"),
    ("NUL byte", "nul_byte"), ("undecodable text", "not_utf8"),
    ("image URL not allowed", "image_url_not_allowed"), ("unsupported image URL scheme", "image_url_scheme"),
    ("image URL unreadable", "image_url_unreadable"), ("image path is absolute", "image_path_absolute"),
    ("image path escapes", "image_path_escapes"), ("image file not found", "image_not_found"),
    ("image file over", "image_too_large"), ("image over", "image_too_large"),
    ("image has", "image_too_many_pixels"), ("image is a decompression bomb", "image_bomb"),
    ("image corrupt", "image_corrupt"), ("image file unreadable", "image_unreadable"),
    ("image unreadable", "image_unreadable"),
)


def reason_code(reason: str) -> str:
    """A short, bounded label for a reject reason: 'image file over 20000000 bytes' -> image_too_large."""
    for prefix, code in REASON_CODES:
        if reason.startswith(prefix):
            return code
    words = re.findall(r"[a-z_]+", reason.split(":", 1)[0].lower())
    return "_".join(words[:3])[:40] or "other"


@lru_cache(maxsize=1)
def metrics() -> SimpleNamespace:
    """The metric objects of this process, made on first use (after `serve` chose the multiprocess mode)."""
    return SimpleNamespace(
        products=Counter("shapstack_products", "Products that left a stage, by outcome", ["stage", "status"]),
        rejects=Counter("shapstack_rejects", "Feed rows rejected at ingest, by reason code", ["reason"]),
        retries=Counter("shapstack_retries", "Task retries after errors of the world", ["stage"]),
        dead_letters=Counter("shapstack_dead_letters", "Products dead-lettered", ["stage"]),
        tasks=Counter("shapstack_tasks", "Tasks finished, by Celery state", ["stage", "state"]),
        batch_seconds=Histogram("shapstack_batch_seconds", "Wall time of a task (a batch for infer and stack)",
                                ["stage"], buckets=BUCKETS),
        mmshap_evaluations=Counter("shapstack_mmshap_evaluations", "MM-SHAP coalition evaluations spent"),
        mmshap_errors=Counter("shapstack_mmshap_errors", "Products whose MM-SHAP could not be estimated"),
        collapse_flags=Counter("shapstack_collapse_flags", "Collapse flags raised by finished runs", ["flag"]),
        runs_finished=Counter("shapstack_runs_finished", "Runs finished, clean or with failures", ["outcome"]),
        t_shap_drift=Gauge("shapstack_tshap_drift", "Mean T-SHAP of the last finished run minus the bundle's "
                           "training mean", multiprocess_mode="mostrecent"),
    )


# -- recording (called by the tasks) --------------------------------------------------------------

def batch_done(stage: str, done: int, dead: int) -> None:
    m = metrics()
    if done:
        m.products.labels(stage, "done").inc(done)
    if dead:
        m.products.labels(stage, "dead").inc(dead)
        m.dead_letters.labels(stage).inc(dead)


def failed(stage: str, n: int) -> None:
    if n:
        metrics().products.labels(stage, "failed").inc(n)


def _quietly(fn):
    """A metric read back from the database must never fail the batch it counts: logged instead."""
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the database may be away; the task goes on
            log.warning("metrics: %s not counted: %s: %s", fn.__name__, type(exc).__name__, exc)
            return None
    return wrapper


@_quietly
def mmshap(factory, pks: list[int]) -> None:
    """Count the evaluations and the products without T-SHAP of contributions just stored for pks."""
    with factory() as s:
        evaluations, missing = mmshap_cost(s, pks)
    m = metrics()
    m.mmshap_evaluations.inc(evaluations)
    if missing:
        m.mmshap_errors.inc(missing)


def ingest_started(factory, run_id: int) -> tuple[int, int]:
    with factory() as s:
        return ingest_mark(s, run_id)


@_quietly
def ingest_ended(factory, run_id: int, mark: tuple[int, int]) -> None:
    """Count the products and rejects the ingest stored since mark (a resumed ingest: only new ones)."""
    with factory() as s:
        accepted, reasons = ingested_since(s, run_id, mark)
    m = metrics()
    if accepted:
        m.products.labels("ingest", "accepted").inc(accepted)
    for reason, n in reasons.items():
        m.rejects.labels(reason_code(reason)).inc(n)


def run_finished(report) -> None:
    """From a jobs.alerts.RunReport: flags raised, the run's outcome, its T-SHAP drift."""
    m = metrics()
    for _, flag in report.flags:
        m.collapse_flags.labels(flag).inc()
    m.runs_finished.labels("with_failures" if report.failed or report.dead else "clean").inc()
    if report.t_shap_drift is not None:
        m.t_shap_drift.set(report.t_shap_drift)


# -- task timing, retries, outcomes (Celery signals) -----------------------------------------------

_started: dict[str, float] = {}


def _stage(task) -> str | None:
    name = getattr(task, "name", None) or ""
    return name.removeprefix("shapstack.") if name.startswith("shapstack.") else None


def _task_started(task_id=None, task=None, **_) -> None:
    if _stage(task):
        _started[task_id] = time.perf_counter()


def _task_ended(task_id=None, task=None, state=None, **_) -> None:
    stage, t0 = _stage(task), _started.pop(task_id, None)
    if stage is None:
        return
    m = metrics()
    m.tasks.labels(stage, state or "UNKNOWN").inc()
    if t0 is not None:
        m.batch_seconds.labels(stage).observe(time.perf_counter() - t0)


def _task_retried(sender=None, **_) -> None:
    stage = _stage(sender)
    if stage:
        metrics().retries.labels(stage).inc()


def _process_ended(pid=None, **_) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid or os.getpid())


def install() -> None:
    """Record task timings, outcomes and retries in this worker (with or without a metrics server)."""
    signals.task_prerun.connect(_task_started, weak=False)
    signals.task_postrun.connect(_task_ended, weak=False)
    signals.task_retry.connect(_task_retried, weak=False)
    signals.worker_process_shutdown.connect(_process_ended, weak=False)


# -- serving (the worker's parent process) ---------------------------------------------------------

def serve(port: int, host: str = "127.0.0.1") -> str:
    """Start the HTTP server for /metrics on host:port, in multiprocess mode; returns the directory
    the processes write to (the caller removes it when the worker stops: `cleanup`).

    Call before the pool forks and before any metric is recorded in this process.
    """
    path = tempfile.mkdtemp(prefix="shapstack-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    values.ValueClass = values.get_value_class()  # prometheus_client reads the variable when imported
    metrics.cache_clear()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path)
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError:
        cleanup(path)
        raise
    return path


def cleanup(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
