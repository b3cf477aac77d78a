"""Claims with leases, worker heartbeats and named locks, all timed by the database's clock.

A worker process holds what it works on: a batch's products (products.claimed_by, lease_until),
an ingest's run (runs.claimed_by, lease_until). Its heartbeat renews the leases of all it holds
and its row in `workers` (last_seen); the sweeper frees, and sends again, what is held by a
worker whose lease expired, whose heartbeat stopped, or which stopped on a worker-fatal error.

Every time here is the database's `now()`, compared in SQL: a worker whose clock is off by minutes
reads and writes the same times as every other.
"""

from __future__ import annotations

from datetime import datetime
from typing import Sequence

from sqlalchemy import DateTime, and_, case, delete, func, or_, select, update
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import FunctionElement

from db import models as m
from db.upsert import upsert


class in_seconds(FunctionElement):
    """now() + seconds (negative: ago), in SQL, on PostgreSQL and SQLite."""

    type = DateTime(timezone=True)
    inherit_cache = True
    name = "in_seconds"


@compiles(in_seconds, "postgresql")
def _pg_in_seconds(element, compiler, **kw) -> str:
    return f"(now() + make_interval(secs => {compiler.process(element.clauses, **kw)}))"


@compiles(in_seconds)
def _sqlite_in_seconds(element, compiler, **kw) -> str:
    return f"strftime('%Y-%m-%d %H:%M:%f', 'now', ({compiler.process(element.clauses, **kw)}) || ' seconds')"


def db_now(session: Session) -> datetime:
    return session.scalar(select(in_seconds(0.0)))


def seconds_since(session: Session, then: datetime) -> float:
    """Seconds from then (a time the database wrote) to the database's now."""
    now, then = db_now(session), then
    if isinstance(now, str):  # SQLite hands back text for an expression
        now = datetime.fromisoformat(now)
    return (now.replace(tzinfo=None) - then.replace(tzinfo=None)).total_seconds()


def _free(model, worker: str):
    """The row is free for worker: unclaimed, its lease expired, or already worker's."""
    return or_(model.claimed_by.is_(None), model.lease_until < in_seconds(0.0), model.claimed_by == worker)


# --- products -----------------------------------------------------------------------------------


def claim(session: Session, pks: Sequence[int], worker: str, lease_s: float) -> dict[int, int]:
    """Claim the pending products of pks that nobody else holds, in one statement.

    Returns {pk: attempts} of those claimed: a concurrent delivery of the same products gets none
    of them, so it neither runs them twice nor mistakes the other run for a lost one.
    """
    if not pks:
        return {}
    q = (update(m.Product)
         .where(m.Product.id.in_(pks), m.Product.status == "pending", _free(m.Product, worker))
         .values(claimed_by=worker, lease_until=in_seconds(float(lease_s)))
         .returning(m.Product.id, m.Product.attempts))
    return dict(session.execute(q).all())


def begin_work(session: Session, pks: Sequence[int], worker: str) -> dict[int, int]:
    """attempts + 1 for the products of pks worker still holds (one statement); {pk: attempts before}.

    Counted only once the work itself starts: a worker that dies loading its models charges nothing.
    """
    q = (update(m.Product).where(m.Product.id.in_(pks), m.Product.claimed_by == worker)
         .values(attempts=m.Product.attempts + 1).returning(m.Product.id, m.Product.attempts))
    return {pk: n - 1 for pk, n in session.execute(q).all()}


def release(session: Session, pks: Sequence[int], worker: str, *, uncount: bool = False) -> int:
    """Give back worker's claims on pks (uncount: and the attempt begin_work counted)."""
    values = {"claimed_by": None, "lease_until": None}
    if uncount:
        values["attempts"] = case((m.Product.attempts > 0, m.Product.attempts - 1), else_=0)
    q = update(m.Product).where(m.Product.id.in_(pks), m.Product.claimed_by == worker).values(**values)
    return session.execute(q).rowcount


def note_failure(session: Session, pk: int, worker: str) -> set[str]:
    """Record that pk alone raised on worker; returns the workers it has raised on."""
    failed = session.scalar(select(m.Product.failed_on).where(m.Product.id == pk)) or ""
    names = failed.split()
    if worker not in names:
        names.append(worker)
    session.execute(update(m.Product).where(m.Product.id == pk).values(failed_on=" ".join(names[-8:])))
    return set(names)


# --- runs (ingest) ------------------------------------------------------------------------------


def claim_run(session: Session, run_id: int, worker: str, lease_s: float) -> int | None:
    """Claim a run's ingest and count the delivery (one statement); returns the deliveries so far,
    None when another live worker holds it or the run is past ingesting."""
    q = (update(m.Run)
         .where(m.Run.id == run_id, m.Run.status.in_(("ingesting", "ingested", "failed")), _free(m.Run, worker))
         .values(claimed_by=worker, lease_until=in_seconds(float(lease_s)), deliveries=m.Run.deliveries + 1)
         .returning(m.Run.deliveries))
    return session.execute(q).scalar()


def release_run(session: Session, run_id: int, worker: str, *, finished: bool) -> None:
    """Give the run back: finished (its ingest is over) resets the delivery count, else uncounts one."""
    deliveries = 0 if finished else case((m.Run.deliveries > 0, m.Run.deliveries - 1), else_=0)
    session.execute(update(m.Run).where(m.Run.id == run_id, m.Run.claimed_by == worker)
                    .values(claimed_by=None, lease_until=None, deliveries=deliveries))


def count_setup_failure(session: Session, run_id: int, error: str) -> int:
    """Count a failure to set up the run's work (one statement): identical ones in a row add up."""
    q = (update(m.Run).where(m.Run.id == run_id)
         .values(setup_failures=case((m.Run.setup_error == error, m.Run.setup_failures + 1), else_=1),
                 setup_error=error)
         .returning(m.Run.setup_failures))
    return session.execute(q).scalar() or 0


# --- workers ------------------------------------------------------------------------------------


def heartbeat(session: Session, worker: str, queues: str, lease_s: float) -> int:
    """The worker is alive: its row's last_seen and the leases of all it holds (batches, ingests,
    retrains) move on; returns
    how many products it holds."""
    upsert(session, m.Worker, [{"id": worker, "queues": queues, "status": "alive", "last_seen": in_seconds(0.0)}],
           ["id"])
    until = in_seconds(float(lease_s))
    n = session.execute(update(m.Product).where(m.Product.claimed_by == worker, m.Product.status == "pending")
                        .values(lease_until=until)).rowcount
    session.execute(update(m.Run).where(m.Run.claimed_by == worker).values(lease_until=until))
    session.execute(update(m.Retrain).where(m.Retrain.claimed_by == worker, m.Retrain.state == "running")
                    .values(lease_until=until))
    return n


def mark_worker(session: Session, worker: str, status: str, error: str | None = None) -> None:
    """stopped (it exits cleanly) or fatal (it stops on an error of its machine): its claims are free at once."""
    upsert(session, m.Worker, [{"id": worker, "status": status, "error": error, "last_seen": in_seconds(0.0)}], ["id"])


def dead_holders(dead_after_s: float):
    """Holders whose claims nobody will finish: silent for dead_after_s, or stopped."""
    return select(m.Worker.id).where(or_(m.Worker.last_seen < in_seconds(-float(dead_after_s)),
                                         m.Worker.status.in_(("stopped", "fatal"))))


def free_dead_claims(session: Session, dead_after_s: float) -> tuple[list[tuple[int, int]], list[int]]:
    """Free the claims of dead workers and expired leases: ([(run id, pk)], [run ids of ingests])."""
    lost = or_(m.Product.lease_until < in_seconds(0.0), m.Product.claimed_by.in_(dead_holders(dead_after_s)))
    q = (update(m.Product).where(m.Product.claimed_by.is_not(None), m.Product.status == "pending", lost)
         .values(claimed_by=None, lease_until=None).returning(m.Product.run_id, m.Product.id))
    products = sorted(session.execute(q).all())
    lost_run = or_(m.Run.lease_until < in_seconds(0.0), m.Run.claimed_by.in_(dead_holders(dead_after_s)))
    q = (update(m.Run).where(m.Run.claimed_by.is_not(None), lost_run)
         .values(claimed_by=None, lease_until=None).returning(m.Run.id, m.Run.status))
    runs = sorted(run_id for run_id, status in session.execute(q).all() if status in ("ingesting", "ingested"))
    return [tuple(r) for r in products], runs


def idle_unclaimed(session: Session, idle_s: float) -> tuple[list[tuple[int, int]], list[int]]:
    """What no worker holds and nothing has touched for idle_s: ([(run id, pk)] pending products of
    distributed runs classifying or ingesting, [run ids] of ingests)."""
    before = in_seconds(-float(idle_s))
    active = select(m.Run.id).where(m.Run.mode == "distributed",
                                    m.Run.status.in_(("ingesting", "ingested", "classifying")))
    q = (select(m.Product.run_id, m.Product.id)
         .where(m.Product.run_id.in_(active), m.Product.status == "pending", m.Product.claimed_by.is_(None),
                m.Product.updated_at < before)
         .order_by(m.Product.run_id, m.Product.id))
    products = [tuple(r) for r in session.execute(q).all()]
    q = select(m.Run.id).where(m.Run.mode == "distributed", m.Run.status.in_(("ingesting", "ingested")),
                               m.Run.claimed_by.is_(None), func.coalesce(m.Run.updated_at, m.Run.created_at) < before)
    return products, list(session.scalars(q))


def live_workers(session: Session, queue: str, dead_after_s: float, *, besides: str) -> int:
    """Workers other than besides that serve queue and are alive."""
    q = select(func.count()).select_from(m.Worker).where(
        m.Worker.id != besides, m.Worker.status == "alive", m.Worker.last_seen >= in_seconds(-float(dead_after_s)),
        m.Worker.queues.contains(queue))
    return session.scalar(q) or 0


# --- named locks --------------------------------------------------------------------------------


def take_lock(session: Session, name: str, holder: str, ttl_s: float) -> bool:
    """Take or renew the lock name for holder until now() + ttl_s; False while another holds it."""
    session.execute(delete(m.Lock).where(m.Lock.name == name, m.Lock.until < in_seconds(0.0)))
    upsert(session, m.Lock, [{"name": name, "holder": holder, "until": in_seconds(float(ttl_s))}], ["name"],
           update=False)
    q = (update(m.Lock).where(m.Lock.name == name, m.Lock.holder == holder)
         .values(until=in_seconds(float(ttl_s))))
    return bool(session.execute(q).rowcount)


def drop_lock(session: Session, name: str, holder: str) -> None:
    session.execute(delete(m.Lock).where(and_(m.Lock.name == name, m.Lock.holder == holder)))
