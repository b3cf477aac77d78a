"""Retrains as rows: started, finished or failed, and held by a worker with a lease (db.claims).

A train task runs for hours and is acknowledged on receipt, so nothing in the broker remembers it:
the row does. Its worker's heartbeat renews the lease; a retrain whose worker died (silent for
three beats, stopped, or its lease run out) is marked failed by the sweeper, or when listed, so
that a killed retrain never shows as running forever. Every time is the database's.
"""

from __future__ import annotations

from typing import Sequence

from sqlalchemy import func, literal, or_, select, update
from sqlalchemy.orm import Session

from db import models as m
from db.claims import dead_holders, in_seconds
from db.upsert import upsert


def start_retrain(session: Session, task_id: str | None, worker: str, lease_s: float, out: str,
                  runs: Sequence[int], config: dict) -> int:
    """Record a retrain as running, held by worker; the same task again (a Celery retry) reuses its row."""
    row = {"task_id": task_id, "state": "running", "out": out, "runs": list(runs), "config": config,
           "claimed_by": worker, "lease_until": in_seconds(float(lease_s)), "error": None, "bundle_id": None,
           "started_at": in_seconds(0.0), "finished_at": None}
    if task_id is None:
        session.execute(m.Retrain.__table__.insert().values(**row))
    else:
        upsert(session, m.Retrain, [row], ["task_id"])
    q = select(m.Retrain.id).where(m.Retrain.task_id == task_id) if task_id else \
        select(m.Retrain.id).where(m.Retrain.claimed_by == worker).order_by(m.Retrain.id.desc()).limit(1)
    return session.scalar(q)


def end_retrain(session: Session, retrain_id: int, *, bundle_id: str | None = None, error: str | None = None) -> None:
    """done with the bundle it made, or failed with its error (claimed_by stays: who ran it)."""
    session.execute(update(m.Retrain).where(m.Retrain.id == retrain_id).values(
        state="failed" if error else "done", bundle_id=bundle_id, error=error, lease_until=None,
        finished_at=in_seconds(0.0)))


def abandon_dead(session: Session, dead_after_s: float) -> list[int]:
    """Mark failed the running retrains whose worker is dead or whose lease ran out; returns their ids."""
    dead = or_(m.Retrain.lease_until < in_seconds(0.0), m.Retrain.claimed_by.in_(dead_holders(dead_after_s)))
    error = (literal("abandoned: its worker ") + func.coalesce(m.Retrain.claimed_by, "?")
             + " died or stopped before it finished (killed, out of memory?); sent again, it resumes from its checkpoints")
    q = (update(m.Retrain).where(m.Retrain.state == "running", dead)
         .values(state="failed", finished_at=in_seconds(0.0), lease_until=None, error=error)
         .returning(m.Retrain.id))
    return sorted(session.scalars(q))


def list_retrains(session: Session, limit: int = 20) -> list[m.Retrain]:
    return list(session.scalars(select(m.Retrain).order_by(m.Retrain.id.desc()).limit(limit)))
