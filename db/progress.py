"""How far a run is: per-stage counts derived from the rows themselves, never from counters."""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db import models as m
from db.reject_codes import reject_code
from pipeline.errors import UserError


def run_progress(session: Session, run_id: int) -> dict[str, Any]:
    """Per-stage progress derived from the rows themselves, never from counters."""
    run = session.get(m.Run, run_id)
    if run is None:
        raise UserError(f"no run {run_id}")

    def count(model, *where) -> int:
        return session.scalar(select(func.count()).select_from(model).where(*where)) or 0

    by_status = dict(
        session.execute(
            select(m.Product.status, func.count()).where(m.Product.run_id == run_id).group_by(m.Product.status)
        ).all()
    )
    products = sum(by_status.values())
    inferred = session.scalar(
        select(func.count(func.distinct(m.BaseLogits.product_pk)))
        .join(m.Product, m.Product.id == m.BaseLogits.product_pk)
        .where(m.Product.run_id == run_id)
    ) or 0
    return {
        "run": run.id,
        "feed": run.feed,
        "mode": run.mode,
        "status": run.status,
        "bundle": run.bundle_id,
        "stacker": run.stacker,
        "products": products,
        "rejects": count(m.RejectRow, m.RejectRow.run_id == run_id),
        "by_status": by_status,
        "inferred": inferred,
        "explained": count(m.ModalityContribution, m.ModalityContribution.run_id == run_id),
        "predicted": count(m.Prediction, m.Prediction.run_id == run_id),
        "failed": by_status.get("failed", 0),
        "dead": count(m.DeadLetter, m.DeadLetter.run_id == run_id),
        "error": run.error,
        "created": run.created_at,
        "finished": run.finished_at,
        "timings": run.timings or {},
        "options": run.options or {},
    }


def reject_reasons(session: Session, run_id: int) -> Counter:
    q = select(m.RejectRow.reason, func.count()).where(m.RejectRow.run_id == run_id).group_by(m.RejectRow.reason)
    return Counter(dict(session.execute(q).all()))


def dead_letters(session: Session, run_id: int) -> list[dict[str, Any]]:
    """The run's dead-lettered products with their stage, attempts and last error, oldest first."""
    if session.get(m.Run, run_id) is None:
        raise UserError(f"no run {run_id}")
    q = (select(m.Product.product_id, m.Product.row, m.DeadLetter.stage, m.DeadLetter.attempts,
                m.DeadLetter.error, m.DeadLetter.created_at)
         .join(m.Product, m.Product.id == m.DeadLetter.product_pk)
         .where(m.DeadLetter.run_id == run_id).order_by(m.DeadLetter.created_at, m.Product.row))
    return [{"product_id": pid, "row": row, "stage": stage, "attempts": attempts, "error": error, "at": at}
            for pid, row, stage, attempts, error, at in session.execute(q)]


def rejects_by_code(session: Session, run_id: int) -> list[dict[str, Any]]:
    """[{code, n, example}] of the run's rejects, most frequent code first (the reject_details view's codes)."""
    by: dict[str, dict[str, Any]] = {}
    for reason, n in sorted(reject_reasons(session, run_id).items()):
        entry = by.setdefault(reject_code(reason), {"code": reject_code(reason), "n": 0, "example": reason})
        entry["n"] += n
    return sorted(by.values(), key=lambda e: (-e["n"], e["code"]))
