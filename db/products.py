"""Products of a run: store a parsed batch, load one back, and move products between states.

`attempts` counts starts of a product's current stage that have not finished; a worker that dies
mid-batch leaves it raised, which is how the next delivery knows to split the batch
(workers/poison.py). Claims on products (who holds them, until when) are db.claims'.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Iterable, Sequence

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from db import models as m
from db.upsert import upsert
from pipeline.errors import UserError
from pipeline.records import Product, Reject


PRODUCT_FIELDS = tuple(f.name for f in fields(Product))


def add_items(session: Session, run_id: int, items: Iterable[Product | Reject], *,
              keep_existing: bool = False) -> tuple[int, int]:
    """Store a batch of parsed rows; a reject is stored once per feed row.

    keep_existing (a resumed ingest): a product already stored for this run keeps its row, status
    and results; otherwise it is overwritten and pending again.
    """
    products, rejects = [], []
    for item in items:
        if isinstance(item, Reject):
            rejects.append({"run_id": run_id, "row": item.row, "raw_id": item.raw_id, "reason": item.reason,
                            "code": item.code})
        else:
            # not dataclasses.asdict: it deep-copies every attribute dict, a third of an ingest's time
            products.append({"run_id": run_id, "status": "pending", "attempts": 0,
                             **{name: getattr(item, name) for name in PRODUCT_FIELDS}})
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


def set_status(session: Session, pks: Sequence[int], status: str) -> None:
    session.execute(update(m.Product).where(m.Product.id.in_(pks)).values(status=status))


def reset_attempts(session: Session, pks: Sequence[int]) -> None:
    """A stage finished for pks: no attempt pending, nobody holds them."""
    session.execute(update(m.Product).where(m.Product.id.in_(pks))
                    .values(attempts=0, claimed_by=None, lease_until=None))


def fail_pending(session: Session, pks: Sequence[int]) -> int:
    """Pending products of pks -> failed (left for `shapstack requeue`); returns how many."""
    q = update(m.Product).where(m.Product.id.in_(pks), m.Product.status == "pending").values(status="failed")
    return session.execute(q).rowcount


def dead_letter(session: Session, pk: int, stage: str, error: str, attempts: int) -> bool:
    """Park one pending product with its last error, so that its run can finish without it.

    A product no longer pending (finished meanwhile by another delivery) stays as it is: returns False.
    """
    q = (update(m.Product).where(m.Product.id == pk, m.Product.status == "pending")
         .values(status="dead", claimed_by=None, lease_until=None).returning(m.Product.run_id))
    run_id = session.execute(q).scalar()
    if run_id is None:
        return False
    upsert(session, m.DeadLetter, [{"product_pk": pk, "run_id": run_id, "stage": stage, "error": error[:4000],
                                     "attempts": attempts, "created_at": func.now()}], ["product_pk", "stage"])
    return True


def requeue(session: Session, run_id: int, statuses: Sequence[str]) -> list[int]:
    """Products of the run in statuses -> pending with a clean slate; returns their keys.

    Their dead letters go: the table lists what is parked now, not what once was.
    """
    run = session.get(m.Run, run_id)
    if run is None:
        raise UserError(f"no run {run_id}")
    pks = product_pks(session, run_id, statuses)
    for i in range(0, len(pks), 10_000):
        chunk = pks[i : i + 10_000]
        session.execute(delete(m.DeadLetter).where(m.DeadLetter.product_pk.in_(chunk)))
        session.execute(update(m.Product).where(m.Product.id.in_(chunk))
                        .values(status="pending", attempts=0, claimed_by=None, lease_until=None, failed_on=None))
    if pks and run.status in ("done", "done_with_failures", "ingested"):
        run.status, run.finished_at = "classifying", None
    run.mode = "distributed"
    return pks


def count_pending(session: Session, run_id: int) -> int:
    q = select(func.count()).select_from(m.Product).where(m.Product.run_id == run_id, m.Product.status == "pending")
    return session.scalar(q) or 0


def pks_of(session: Session, run_id: int, product_ids: Sequence[str]) -> list[int]:
    """Primary keys of the run's products with these feed ids, sorted."""
    q = select(m.Product.id).where(m.Product.run_id == run_id, m.Product.product_id.in_(product_ids))
    return sorted(session.scalars(q))


def labelled_query(runs: Sequence[int]):
    """Labelled products of runs (all runs when empty), newest row of a product id first."""
    q = select(m.Product).where(m.Product.label.is_not(None), m.Product.label != "")
    if runs:
        q = q.where(m.Product.run_id.in_(runs))
    return q.order_by(m.Product.product_id, m.Product.id.desc())


def count_labelled(factory, runs: Sequence[int]) -> int:
    with factory() as s:
        return s.scalar(select(func.count()).select_from(labelled_query(runs).order_by(None).subquery())) or 0
