"""Ingest: stream a feed into the database in batches, every row a product or a reject."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import sqlalchemy.exc
from sqlalchemy.engine import make_url

from db.products import add_items, pks_of
from db.runs import create_run, finish_ingest, set_run
from pipeline.feed import batched, read_feed
from pipeline.records import Limits, Product, Reject

log = logging.getLogger(__name__)


def default_image_store(database_url) -> str:
    """Where snapshots go when image_store is not set: next to a SQLite file, else ./shapstack-images."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        db = Path(url.database).resolve()
        return str(db.parent / f"{db.stem}-images")
    return str(Path("shapstack-images").resolve())


def error_text(exc: BaseException, limit: int = 2000) -> str:
    """An error for runs.error: a database error without its SQL and parameters (they hold feed data)."""
    if isinstance(exc, sqlalchemy.exc.StatementError):
        exc = exc.orig if exc.orig is not None else exc
        text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:limit]


def _refused(exc: Exception) -> bool:
    """Whether the database refused the rows themselves (a value it does not take), not the world."""
    if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
        return False
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return False
    return isinstance(exc, sqlalchemy.exc.StatementError)


def _store(factory, run_id: int, items: Sequence[Product | Reject], resume: bool) -> list[int]:
    """Store a batch in one transaction; when the database refuses it, row by row, each refused row
    becoming a reject. Returns the product keys stored."""
    try:
        with factory() as session, session.begin():
            add_items(session, run_id, items, keep_existing=resume)
            return pks_of(session, run_id, [i.product_id for i in items if isinstance(i, Product)])
    except sqlalchemy.exc.StatementError as exc:
        if not _refused(exc):
            raise
        log.warning("run %d: the database refused a batch of %d rows (%s): storing them one by one",
                    run_id, len(items), type(getattr(exc, "orig", None) or exc).__name__)
    stored: list[str] = []
    for item in items:
        try:
            with factory() as session, session.begin():
                add_items(session, run_id, [item], keep_existing=resume)
        except sqlalchemy.exc.StatementError as exc:
            if not _refused(exc):
                raise
            kind = type(getattr(exc, "orig", None) or exc).__name__
            raw_id = item.product_id if isinstance(item, Product) else item.raw_id
            reject = Reject(item.row, raw_id[:200] if raw_id else None,
                            f"the database refused the row ({kind})", "db_refused")
            with factory() as session, session.begin():
                add_items(session, run_id, [reject], keep_existing=resume)
            continue
        if isinstance(item, Product):
            stored.append(item.product_id)
    with factory() as session:
        return pks_of(session, run_id, stored)


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
    if limits.image_store is None and limits.verify_images:
        bind = factory.kw["bind"]
        limits = dataclasses.replace(limits, image_store=default_image_store(bind.url))
    with factory() as session, session.begin():
        if run_id is None:
            run_id = create_run(session, str(Path(feed).resolve()), mode)
        else:
            set_run(session, run_id, status="ingesting", error=None)
    n_rows = 0
    rows = read_feed(feed, limits)
    if select_product is not None:
        rows = (i for i in rows if isinstance(i, Reject) or select_product(i))
    try:
        for items in batched(rows, batch_size):
            pks = _store(factory, run_id, items, resume)
            n_rows += len(items)
            if progress:
                progress(len(items))
            if on_batch and pks:
                on_batch(run_id, pks)
    except Exception as exc:
        with factory() as session, session.begin():
            set_run(session, run_id, status="failed", error=error_text(exc))
        raise
    with factory() as session, session.begin():
        finish_ingest(session, run_id, n_rows, time.perf_counter() - started)
    return run_id
