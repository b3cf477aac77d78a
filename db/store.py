"""Reads and idempotent writes used by the CLI, the embedded runner and the workers.

Every write of a result is an upsert keyed by a unique constraint, so a redelivered task or a
re-run of a batch replaces its row instead of adding a second one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db import models as m
from pipeline.feed import batched, read_feed
from pipeline.records import Limits, Product, Reject


def upsert(session: Session, table, rows: Sequence[dict[str, Any]], keys: Sequence[str], *,
           update: bool = True) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE (or, update=False, DO NOTHING), on PostgreSQL and SQLite alike."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(table.__table__).values(list(rows))
    columns = [c for c in rows[0] if c not in keys]
    if columns and update:
        stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_={c: stmt.excluded[c] for c in columns})
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
    session.execute(stmt)


def create_run(session: Session, feed: str, mode: str = "embedded", *, bundle_id: str | None = None,
               stacker: str | None = None) -> int:
    run = m.Run(feed=feed, mode=mode, status="ingesting", timings={}, bundle_id=bundle_id, stacker=stacker)
    session.add(run)
    session.flush()
    return run.id


def add_items(session: Session, run_id: int, items: Iterable[Product | Reject], *,
              keep_existing: bool = False) -> tuple[int, int]:
    """Store a batch of parsed rows; a reject is stored once per feed row.

    keep_existing (a resumed ingest): a product already stored for this run keeps its row, status
    and results; otherwise it is overwritten and pending again.
    """
    products, rejects = [], []
    for item in items:
        if isinstance(item, Reject):
            rejects.append({"run_id": run_id, "row": item.row, "raw_id": item.raw_id, "reason": item.reason})
        else:
            products.append({"run_id": run_id, "status": "pending", "attempts": 0, **asdict(item)})
    upsert(session, m.Product, products, ["run_id", "product_id"], update=not keep_existing)
    upsert(session, m.RejectRow, rejects, ["run_id", "row"], update=False)
    return len(products), len(rejects)


def to_record(row: m.Product) -> Product:
    return Product(
        product_id=row.product_id,
        title=row.title,
        description=row.description,
        image=row.image,
        label=row.label,
        group_id=row.group_id,
        attributes=row.attributes or {},
        row=row.row,
        content_hash=row.content_hash,
    )


def product_pks(session: Session, run_id: int, statuses: Sequence[str] = ("pending",)) -> list[int]:
    q = select(m.Product.id).where(m.Product.run_id == run_id, m.Product.status.in_(statuses)).order_by(m.Product.id)
    return list(session.scalars(q))


def load_products(session: Session, pks: Sequence[int]) -> list[m.Product]:
    rows = session.scalars(select(m.Product).where(m.Product.id.in_(pks))).all()
    order = {pk: i for i, pk in enumerate(pks)}
    return sorted(rows, key=lambda r: order[r.id])


def register_model(session: Session, manifest: dict[str, Any], path: str | None = None) -> str:
    upsert(
        session,
        m.ModelVersion,
        [
            {
                "id": manifest["bundle_id"],
                "content_hash": manifest["content_hash"],
                "preset": manifest.get("preset_name") or manifest.get("preset", {}).get("name"),
                "path": path,
                "labels": manifest["labels"],
                "metrics": manifest.get("metrics", {}),
            }
        ],
        ["id"],
    )
    return manifest["bundle_id"]


def set_status(session: Session, pks: Sequence[int], status: str) -> None:
    session.execute(update(m.Product).where(m.Product.id.in_(pks)).values(status=status))


def reject_reasons(session: Session, run_id: int) -> Counter:
    q = select(m.RejectRow.reason, func.count()).where(m.RejectRow.run_id == run_id).group_by(m.RejectRow.reason)
    return Counter(dict(session.execute(q).all()))


def run_progress(session: Session, run_id: int) -> dict[str, Any]:
    """Per-stage progress derived from the rows themselves, never from counters."""
    run = session.get(m.Run, run_id)
    if run is None:
        raise KeyError(run_id)

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
        "dead": count(m.DeadLetter, m.DeadLetter.run_id == run_id),
        "error": run.error,
        "created": run.created_at,
        "finished": run.finished_at,
        "timings": run.timings or {},
    }


def latest_runs(session: Session, limit: int = 20) -> list[m.Run]:
    return list(session.scalars(select(m.Run).order_by(m.Run.id.desc()).limit(limit)))


def ingest_feed(
    factory,
    feed: str,
    limits: Limits,
    *,
    batch_size: int = 256,
    mode: str = "embedded",
    on_batch: Callable[[int, list[int]], None] | None = None,
    progress: Callable[[int], None] | None = None,
    select_product: Callable[[Product], bool] | None = None,
    run_id: int | None = None,
) -> int:
    """Stream a feed into the database in batches; returns the run id.

    Each batch commits on its own, so a crash mid-feed keeps what was stored. on_batch receives
    the product primary keys of each batch (the distributed mode enqueues them there).
    select_product drops products silently (e.g. the train side of a split): they are not rows of
    this run, neither products nor rejects.
    run_id: fill an existing run (the distributed mode creates it first, to report its id at
    once). Reading the feed again into it is a resume: stored products keep their state, rejects
    are not duplicated, and on_batch sees every product of the feed again.
    """
    started = time.perf_counter()
    resume = run_id is not None
    with factory() as session, session.begin():
        if run_id is None:
            run_id = create_run(session, str(Path(feed).resolve()), mode)
        else:
            session.execute(update(m.Run).where(m.Run.id == run_id).values(status="ingesting", error=None))
    n_rows = 0
    rows = read_feed(feed, limits)
    if select_product is not None:
        rows = (i for i in rows if isinstance(i, Reject) or select_product(i))
    try:
        for items in batched(rows, batch_size):
            with factory() as session, session.begin():
                add_items(session, run_id, items, keep_existing=resume)
                ids = [i.product_id for i in items if isinstance(i, Product)]
                pks = list(session.scalars(
                    select(m.Product.id).where(m.Product.run_id == run_id, m.Product.product_id.in_(ids))))
            n_rows += len(items)
            if progress:
                progress(len(items))
            if on_batch and pks:
                on_batch(run_id, sorted(pks))
    except Exception as exc:
        with factory() as session, session.begin():
            session.execute(update(m.Run).where(m.Run.id == run_id).values(status="failed", error=str(exc)[:2000]))
        raise
    with factory() as session, session.begin():
        run = session.get(m.Run, run_id)
        run.n_rows = n_rows
        run.n_rejects = session.scalar(select(func.count()).select_from(m.RejectRow).where(m.RejectRow.run_id == run_id))
        run.n_products = n_rows - run.n_rejects
        run.status = "ingested"
        run.timings = {**(run.timings or {}), "ingest_s": round(time.perf_counter() - started, 3)}
    return run_id


# Product state for the distributed mode: claims, dead letters, requeues, stalled runs.
# `attempts` counts starts of a product's current stage that have not finished; a worker that
# dies mid-batch leaves it raised, which is how the next delivery knows to split the batch.


def pending_attempts(session: Session, pks: Sequence[int]) -> dict[int, int]:
    """{pk: attempts} of the products of pks that are still pending."""
    q = select(m.Product.id, m.Product.attempts).where(m.Product.id.in_(pks), m.Product.status == "pending")
    return dict(session.execute(q).all())


def add_attempts(session: Session, pks: Sequence[int], delta: int) -> None:
    session.execute(update(m.Product).where(m.Product.id.in_(pks)).values(attempts=m.Product.attempts + delta))


def reset_attempts(session: Session, pks: Sequence[int]) -> None:
    session.execute(update(m.Product).where(m.Product.id.in_(pks)).values(attempts=0))


def fail_pending(session: Session, pks: Sequence[int]) -> int:
    """Pending products of pks -> failed (left for `shapstack requeue`); returns how many."""
    q = update(m.Product).where(m.Product.id.in_(pks), m.Product.status == "pending").values(status="failed")
    return session.execute(q).rowcount


def dead_letter(session: Session, pk: int, stage: str, error: str, attempts: int) -> None:
    """Park one product with its last error, so that its run can finish without it."""
    run_id = session.scalar(select(m.Product.run_id).where(m.Product.id == pk))
    upsert(session, m.DeadLetter, [{"product_pk": pk, "run_id": run_id, "stage": stage, "error": error[:4000],
                                     "attempts": attempts, "created_at": m.utcnow()}], ["product_pk", "stage"])
    set_status(session, [pk], "dead")


def requeue(session: Session, run_id: int, statuses: Sequence[str]) -> list[int]:
    """Products of the run in statuses -> pending with a clean slate; returns their keys.

    Their dead letters go: the table lists what is parked now, not what once was.
    """
    run = session.get(m.Run, run_id)
    if run is None:
        raise KeyError(run_id)
    pks = product_pks(session, run_id, statuses)
    for i in range(0, len(pks), 10_000):
        chunk = pks[i : i + 10_000]
        session.execute(delete(m.DeadLetter).where(m.DeadLetter.product_pk.in_(chunk)))
        session.execute(update(m.Product).where(m.Product.id.in_(chunk)).values(status="pending", attempts=0))
    if pks and run.status in ("done", "ingested"):
        run.status, run.finished_at = "classifying", None
    run.mode = "distributed"
    return pks


def count_pending(session: Session, run_id: int) -> int:
    q = select(func.count()).select_from(m.Product).where(m.Product.run_id == run_id, m.Product.status == "pending")
    return session.scalar(q) or 0


def stalled_runs(session: Session, before) -> list[m.Run]:
    """Distributed runs not finished (nor failed) in which no row has changed since `before`."""
    last_product = (select(func.max(m.Product.updated_at)).where(m.Product.run_id == m.Run.id)
                    .correlate(m.Run).scalar_subquery())
    q = select(m.Run).where(
        m.Run.mode == "distributed",
        m.Run.status.in_(("ingesting", "ingested", "classifying")),
        func.coalesce(m.Run.updated_at, m.Run.created_at) < before,
        func.coalesce(last_product, m.Run.created_at) < before,
    )
    return list(session.scalars(q))


def touch(session: Session, run_id: int, pks: Sequence[int] = ()) -> None:
    """Restart the stall clock of a run (and of products re-sent for it)."""
    session.execute(update(m.Run).where(m.Run.id == run_id).values(updated_at=m.utcnow()))
    for i in range(0, len(pks), 10_000):
        session.execute(update(m.Product).where(m.Product.id.in_(pks[i : i + 10_000])).values(updated_at=m.utcnow()))
