"""Runs and the model versions they use: create, start, finish, list, and find stalled ones."""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, exists, func, select, update
from sqlalchemy.orm import Session

from db import models as m
from db.upsert import upsert


def create_run(session: Session, feed: str, mode: str = "embedded", *, bundle_id: str | None = None,
               stacker: str | None = None) -> int:
    run = m.Run(feed=feed, mode=mode, status="ingesting", timings={}, bundle_id=bundle_id, stacker=stacker)
    session.add(run)
    session.flush()
    return run.id


def register_model(session: Session, bundle_id: str, manifest: dict[str, Any], path: str | None = None) -> str:
    """A bundle as a row of model_versions (idempotent); returns its id."""
    upsert(session, m.ModelVersion, [{
        "id": bundle_id,
        "content_hash": manifest["content_hash"],
        "preset": manifest.get("preset_name") or manifest.get("preset", {}).get("name"),
        "path": path,
        "labels": manifest["labels"],
        "metrics": manifest.get("metrics", {}),
    }], ["id"])
    return bundle_id


def set_run(session: Session, run_id: int, **values: Any) -> None:
    session.execute(update(m.Run).where(m.Run.id == run_id).values(**values))


def start_run(session: Session, run_id: int, model_version: str, stacker: str) -> None:
    set_run(session, run_id, status="classifying", bundle_id=model_version, stacker=stacker)


def finish_run(session: Session, run_id: int, timings: dict | None = None, *, if_complete: bool = False) -> bool:
    """Mark the run done; returns whether it was marked.

    if_complete (the distributed mode, where any worker may be the last): only a run still
    classifying with no pending product, checked and changed in one statement, so that a run
    requeued meanwhile stays open; a run with failed or dead-lettered products ends
    "done_with_failures".
    """
    q = update(m.Run).where(m.Run.id == run_id)
    status = "done"
    if if_complete:
        pending = exists().where(m.Product.run_id == run_id, m.Product.status == "pending")
        q = q.where(m.Run.status == "classifying", ~pending)
        failures = exists().where(m.Product.run_id == run_id, m.Product.status.in_(("failed", "dead")))
        status = case((failures, "done_with_failures"), else_="done")
    if not session.execute(q.values(status=status, finished_at=func.now())).rowcount:
        return False
    run = session.get(m.Run, run_id)
    run.timings = {**(run.timings or {}), **(timings or {})}
    return True


def latest_runs(session: Session, limit: int = 20) -> list[m.Run]:
    return list(session.scalars(select(m.Run).order_by(m.Run.id.desc()).limit(limit)))


def touch(session: Session, run_id: int, pks=()) -> None:
    """Mark a run (and products re-sent for it) as just moved, in the database's time."""
    set_run(session, run_id, updated_at=func.now())
    for i in range(0, len(pks), 10_000):
        session.execute(update(m.Product).where(m.Product.id.in_(pks[i : i + 10_000])).values(updated_at=func.now()))


def finish_ingest(session: Session, run_id: int, n_rows: int, ingest_s: float) -> None:
    """Counts of an ingested run (a cache: db.progress derives the truth) and its status."""
    run = session.get(m.Run, run_id)
    run.n_rows = n_rows
    run.n_rejects = session.scalar(select(func.count()).select_from(m.RejectRow).where(m.RejectRow.run_id == run_id))
    run.n_products = n_rows - run.n_rejects
    run.status = "ingested"
    run.timings = {**(run.timings or {}), "ingest_s": round(ingest_s, 3)}
