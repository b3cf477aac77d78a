"""What a worker process keeps between tasks: one database engine, each bundle's models once.

Loading a bundle costs seconds (a GPU worker: much more), a batch far less, so models are cached
per process by bundle path. Tasks carry only a run id and product keys; which bundle and stacker
a run uses is in the database (runs.bundle_id, model_versions.path), so a message stays small and
a requeue needs nothing but the run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache

from workers.app import app, settings
from workers.errors import Transient


def factory():
    """The session factory of this process (db.engine.connect caches one per URL and process)."""
    from db.engine import connect

    logging.getLogger("alembic").setLevel(logging.WARNING)  # each process checks the schema once: not news
    return connect(settings().database_url)


@dataclass(frozen=True)
class RunInfo:
    id: int
    feed: str
    status: str
    bundle_id: str
    stacker: str
    registered_path: str | None  # where the bundle was when the run was submitted

    @property
    def bundle_path(self) -> str:
        """Where the bundle is on this machine; Transient when it is not (yet) here."""
        return locate_bundle(self.bundle_id, self.registered_path)


def run_info(run_id: int) -> RunInfo:
    from db import models as m

    with factory()() as s:
        run = s.get(m.Run, run_id)
        if run is None:
            raise LookupError(f"no run {run_id} in the database")
        if not run.bundle_id:
            raise LookupError(f"run {run_id} has no model bundle (ingested without --distributed?)")
        version = s.get(m.ModelVersion, run.bundle_id)
    return RunInfo(run.id, run.feed, run.status, run.bundle_id, run.stacker or "mmshap",
                   version.path if version else None)


def locate_bundle(bundle_id: str, registered: str | None) -> str:
    """SHAPSTACK_BUNDLE of this worker if it is that bundle, else the path the run was submitted with."""
    for path in dict.fromkeys(p for p in (settings().bundle, registered) if p):
        if _bundle_id_at(path, _mtime(path)) == bundle_id:
            return path
    raise Transient(f"bundle {bundle_id} is not on this worker (looked in {settings().bundle or '-'} and "
                    f"{registered or '-'}): set SHAPSTACK_BUNDLE to its folder")


def _mtime(path: str) -> float:
    try:
        return os.stat(os.path.join(path, "manifest.json")).st_mtime
    except OSError:
        return -1.0


@lru_cache(maxsize=32)
def _bundle_id_at(path: str, mtime: float) -> str | None:
    from pipeline.bundle import BundleError, read_manifest

    try:
        return read_manifest(path)["content_hash"][:16]
    except BundleError:
        return None


def manifest(path: str) -> dict:
    return _manifest(path, _mtime(path))


@lru_cache(maxsize=8)
def _manifest(path: str, mtime: float) -> dict:
    from pipeline.bundle import read_manifest

    return read_manifest(path)


def _torch_threads() -> None:
    """Once per process, before the first model: several busy processes on one machine each
    running torch's default thread count slow each other down by an order of magnitude."""
    import torch

    torch.set_num_threads(int(app.conf.get("shapstack_torch_threads", 1)))


@lru_cache(maxsize=4)
def backend(path: str, bundle_id: str):
    """The three base models of the bundle at path: a Triton client, or loaded into this process.

    Keyed by bundle id too: a bundle retrained into the same folder is another bundle.
    """
    from pipeline.bundle import load_bundle

    _torch_threads()
    s = settings()
    bundle = load_bundle(path, device=s.device)
    if s.triton_url:
        from serving.client import TritonBackend

        return TritonBackend(s.triton_url, bundle, batch_size=s.batch_size, limits=s.limits())
    from pipeline.backend import InProcessBackend

    return InProcessBackend(bundle, device=s.device, batch_size=s.batch_size, limits=s.limits())


@lru_cache(maxsize=16)
def stacker(path: str, bundle_id: str, name: str):
    from pipeline.stacking import KINDS, load_stackers, make_stacker

    _torch_threads()
    if name in KINDS or name == "mean":
        return make_stacker(name)
    found = load_stackers(path, [name])
    if name not in found:
        raise LookupError(f"bundle {path} has no stacker {name!r}")
    return found[name]


def stacker_names(path: str) -> set[str]:
    """Stackers a run on this bundle may name: the fitted ones it holds, and those needing no fit."""
    from pipeline.bundle import load_artifact
    from pipeline.stacking import KINDS

    fitted = set(load_artifact(path, "stackers")) if "stackers" in manifest(path)["artifacts"] else set()
    return fitted | set(KINDS) | {"mean"}


def mmshap_config(path: str) -> tuple[int, str]:
    """(budget, image mode) of MM-SHAP: the settings', else as the bundle's stackers were trained.

    The very rule `shapstack classify` applies, so that a run gives the same contributions in
    either mode.
    """
    from pipeline.explain import mmshap_config as resolve

    s = settings()
    return resolve(manifest(path), s.mmshap_budget, s.mmshap_image_mode)


def t_shap_reference(path: str) -> dict | None:
    return manifest(path).get("extra", {}).get("t_shap_reference")
