"""Classify: a feed, or an ingested run, through infer and stack in batches, then aggregate.

This is the embedded mode end to end; the distributed mode runs the same stage functions, one
Celery task per batch (workers/tasks.py).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from db.products import product_pks
from db.models import Run
from db.results import unestimated
from db.runs import finish_run, register_model, set_run, start_run
from jobs.aggregate import aggregate_collapse
from jobs.alerts import run_finished
from jobs.infer import infer_batch
from jobs.ingest import ingest_feed
from jobs.models import make_backend, mmshap_for_run
from jobs.stack import stack_batch
from pipeline.bundle import load_bundle
from pipeline.collapse import Thresholds
from pipeline.errors import UserError
from pipeline.feed import check_feed
from pipeline.manifest import require_bundle
from pipeline.mmshap import MMShapConfig
from pipeline.split import split_selector
from pipeline.stackers import load_stacker

log = logging.getLogger(__name__)


def classify_run(factory, backend, stacker, manifest: dict, model_version: str, run_id: int, *, batch_size: int,
                 mmshap: MMShapConfig, thresholds: Thresholds, reference: dict | None = None,
                 progress: Callable[[int], None] | None = None, options: dict | None = None) -> dict:
    """The embedded runner: every pending product of a run through infer and stack, in batches."""
    with factory() as s, s.begin():
        start_run(s, run_id, model_version, stacker.name)
        set_run(s, run_id, options={**(options or {}), **mmshap.options()})
    with factory() as s:
        pks = product_pks(s, run_id, ("pending", "failed"))
    timings = {"infer_s": 0.0, "stack_s": 0.0}
    for i in range(0, len(pks), batch_size):
        batch = pks[i : i + batch_size]
        t0 = time.perf_counter()
        infer_batch(factory, backend, model_version, batch, mmshap)
        t1 = time.perf_counter()
        stack_batch(factory, stacker, manifest, model_version, batch)
        timings["infer_s"] += t1 - t0
        timings["stack_s"] += time.perf_counter() - t1
        if progress:
            progress(len(batch))
    with factory() as s:
        explained, missing, reasons = unestimated(s, run_id)
    if missing:
        common = "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
        log.warning("MM-SHAP: %d of %d products have no T-SHAP (stored as NULL with the reason) at %s: %s",
                    missing, explained, mmshap.describe(), common)
    t0 = time.perf_counter()
    aggregate_collapse(factory, run_id, thresholds, reference)
    timings["collapse_s"] = time.perf_counter() - t0
    timings = {k: round(v, 3) for k, v in timings.items()}
    with factory() as s, s.begin():
        finish_run(s, run_id, timings)
    return timings


class Classifier:
    """What classifying needs, loaded once from the settings: bundle, stacker, models, MM-SHAP budget and mode."""

    def __init__(self, factory, settings):
        self.factory, self.settings = factory, settings
        self.bundle = load_bundle(require_bundle(settings.bundle), device=settings.device)
        self.stacker = load_stacker(self.bundle.path, settings.stacker)
        self.backend = make_backend(self.bundle, triton_url=settings.triton_url, device=settings.device,
                                    batch_size=settings.batch_size, limits=settings.limits)
        with factory() as s, s.begin():
            self.version = register_model(s, self.bundle.bundle_id, self.bundle.manifest, str(self.bundle.path))
        self.mmshap = mmshap_for_run(self.bundle.manifest, settings)

    def run(self, run_id: int, progress=None, options: dict | None = None) -> dict:
        extra = self.bundle.manifest.get("extra", {})
        timings = classify_run(self.factory, self.backend, self.stacker, self.bundle.manifest, self.version, run_id,
                               batch_size=self.settings.batch_size, mmshap=self.mmshap,
                               thresholds=self.settings.collapse, reference=extra.get("collapse_reference"),
                               progress=progress, options=options)
        run_finished(self.factory, run_id, self.settings)  # collapse flags, failures: warnings and the webhook
        return timings


def classify_feed(factory, settings, feed: str, *, split: str = "all",
                  on_ingested: Callable[[int], None] | None = None,
                  ingest_progress: Callable[[int], None] | None = None,
                  progress: Callable[[int], None] | None = None) -> tuple[int, dict]:
    """Embedded mode end to end: ingest -> infer (base models + MM-SHAP) -> stack -> persist.

    settings: a shapstack.settings.Settings (bundle, stacker, device, batch sizes, limits,
    collapse thresholds, MM-SHAP budget and mode, Triton URL). split: "all", or one side of the
    bundle's --test-fraction split. Returns (run id, stage timings).
    """
    check_feed(feed)
    classifier = Classifier(factory, settings)
    select = split_selector(classifier.bundle.manifest, split)
    run_id = ingest_feed(factory, feed, settings.limits, batch_size=settings.ingest_batch_size,
                         progress=ingest_progress, select_product=select)
    if on_ingested:
        on_ingested(run_id)
    return run_id, classifier.run(run_id, progress, {"split": split})


def classify_ingested(factory, settings, run_id: int, progress: Callable[[int], None] | None = None) -> dict:
    """Embedded mode for a run `shapstack ingest` stored: its pending (and failed) products; returns timings."""
    with factory() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise UserError(f"no run {run_id}")
        if run.status in ("ingesting", "classifying") and run.mode == "distributed":
            raise UserError(f"run {run_id} is {run.status} on the workers: follow it with `shapstack status {run_id}`")
        if not product_pks(s, run_id, ("pending", "failed")):
            raise UserError(f"run {run_id} has no product left to classify (status {run.status})")
    return Classifier(factory, settings).run(run_id, progress, {"split": "all"})
