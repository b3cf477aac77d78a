"""What a worker process keeps between tasks: one database engine, each bundle's models once.

Loading a bundle costs seconds (a GPU worker: much more), a batch far less, so models are cached
per process by bundle path and id. Tasks carry only a run id and product keys; which bundle and
stacker a run uses is in the database (runs.bundle_id, model_versions.path), so a message stays
small and a requeue needs nothing but the run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache

from celery import current_app

from db import models as m
from db.engine import connect
from pipeline.manifest import BundleError, bundle_id, read_manifest
from workers.app import settings
from workers.retries import Transient


def factory():
    """The session factory of this process (db.engine.connect caches one per URL and process)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # each process checks the schema once: not news
    return connect(settings().database_url, pool_size=2)


@dataclass(frozen=True)
class RunInfo:
    id: int
    feed: str
    status: str
    bundle_id: str
    stacker: str
    registered_path: str | None  # where the bundle was when the run was submitted
    options: dict  # what classify was asked for (mmshap_budget, mmshap_mode, split): runs.options

    @property
    def bundle_path(self) -> str:
        """Where the bundle is on this machine; Transient when it is not (yet) here."""
        return locate_bundle(self.bundle_id, self.registered_path)


def run_info(run_id: int) -> RunInfo:
    with factory()() as s:
        run = s.get(m.Run, run_id)
        if run is None:
            raise LookupError(f"no run {run_id} in the database")
        if not run.bundle_id:
            raise LookupError(f"run {run_id} has no model bundle (ingested without --distributed?)")
        version = s.get(m.ModelVersion, run.bundle_id)
    return RunInfo(run.id, run.feed, run.status, run.bundle_id, run.stacker or "mmshap",
                   version.path if version else None, run.options or {})


def locate_bundle(wanted: str, registered: str | None) -> str:
    """SHAPSTACK_BUNDLE of this worker if it is that bundle, else the path the run was submitted with."""
    for path in dict.fromkeys(p for p in (settings().bundle, registered) if p):
        if _bundle_id_at(path, _mtime(path)) == wanted:
            return path
    raise Transient(f"bundle {wanted} is not on this worker (looked in {settings().bundle or '-'} and "
                    f"{registered or '-'}): set SHAPSTACK_BUNDLE to its folder")


def _mtime(path: str) -> float:
    try:
        return os.stat(os.path.join(path, "manifest.json")).st_mtime
    except OSError:
        return -1.0


@lru_cache(maxsize=32)
def _bundle_id_at(path: str, mtime: float) -> str | None:
    try:
        return bundle_id(read_manifest(path))
    except BundleError:
        return None


def manifest(path: str) -> dict:
    return _manifest(path, _mtime(path))


@lru_cache(maxsize=8)
def _manifest(path: str, mtime: float) -> dict:
    return read_manifest(path)


def _torch_threads() -> None:
    """Once per process, before the first model: several busy processes on one machine each
    running torch's default thread count slow each other down by an order of magnitude."""
    import torch

    torch.set_num_threads(int(current_app.conf.get("shapstack_torch_threads", 1)))


@lru_cache(maxsize=4)
def backend(path: str, bundle: str):
    """The three base models of the bundle at path: a Triton client, or loaded into this process.

    Keyed by bundle id too: a bundle retrained into the same folder is another bundle. torch and
    the models are imported here, in the pool's processes, never in a worker's main process
    before it forks.
    """
    from jobs.models import make_backend
    from pipeline.bundle import load_bundle

    _torch_threads()
    s = settings()
    return make_backend(load_bundle(path, device=s.device), triton_url=s.triton_url, device=s.device,
                        batch_size=s.batch_size, limits=s.limits)


@lru_cache(maxsize=16)
def stacker(path: str, bundle: str, name: str):
    from pipeline.stackers import load_stacker

    _torch_threads()
    return load_stacker(path, name)


def mmshap_config(path: str, options: dict | None = None):
    """MM-SHAP's configuration for a run: what `shapstack classify` asked for the run (options),
    else the worker's settings, else as the bundle's stackers were trained.

    The very rule `shapstack classify` applies, so that a run gives the same contributions in
    either mode.
    """
    from jobs.models import mmshap_for_run  # torch: see backend()

    return mmshap_for_run(manifest(path), settings(), options)


def collapse_reference(path: str) -> dict | None:
    return manifest(path).get("extra", {}).get("collapse_reference")
