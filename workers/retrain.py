"""Retraining from the database: the labelled products of past runs become a feed for train_bundle.

train.train_bundle reads feeds, and a feed may only point at images inside its own folder (the feed
reader's rule against path escapes). Stored products hold absolute image paths, so the export
hard-links each image beside the feed (copying when the bundle is on another filesystem).
A product ingested in several runs is taken once, from its latest run.

Each retrain is a row of `retrains` (db.retrains), running, then done or failed, held by its
worker's id with a lease that the heartbeat renews: a retrain killed with its worker shows as
failed once the sweeper (or `shapstack retrain --list`) sees the worker dead.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

from db import models as m
from db.products import labelled_query
from db.retrains import end_retrain, start_retrain
from db.runs import register_model
from pipeline.errors import UserError
from pipeline.manifest import bundle_id
from train.data import TrainConfig
from train.train_bundle import train_bundle
from workers.retries import describe

log = logging.getLogger(__name__)


def _place_image(src: str, images: Path, n: int) -> str | None:
    if src.lower().startswith(("http://", "https://")):
        return src
    dst = images / f"{n}{Path(src).suffix.lower()}"
    try:
        os.link(src, dst)
    except FileExistsError:
        pass
    except OSError:
        try:
            shutil.copyfile(src, dst)
        except OSError as exc:
            log.warning("image %s unreadable, product exported without it: %s", src, exc)
            return None
    return f"images/{dst.name}"


def export_feed(factory, runs: Sequence[int], folder: str | Path) -> tuple[Path, int]:
    """Write folder/feed.jsonl (+ folder/images/); returns the feed and its number of products."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    feed, n, last = folder / "feed.jsonl", 0, None
    with factory() as s, open(feed, "w") as fh:
        for p in s.scalars(labelled_query(runs).execution_options(yield_per=1000)):
            if p.product_id == last:  # an older row of a product already written
                continue
            last = p.product_id
            image = _place_image(p.image, folder / "images", n) if p.image else None
            row = {**(p.attributes or {}), "product_id": p.product_id, "title": p.title,
                   "description": p.description, "image": image, "category": p.label, "group_id": p.group_id}
            fh.write(json.dumps(row) + "\n")
            n += 1
    return feed, n


def retrain(factory, settings, out: str, runs: Sequence[int], config: dict, log_fn=log.info) -> str:
    """Export, train a bundle into out, register it as a model version; returns its id."""
    feed, n = export_feed(factory, runs, Path(out) / ".export")
    if not n:
        raise UserError(f"no labelled products in {'runs ' + ', '.join(map(str, runs)) if runs else 'the database'}")
    log_fn(f"exported {n} labelled products to {feed}")
    manifest = train_bundle(feed, out, TrainConfig(**config, device=settings.device), settings.limits, log=log_fn)
    with factory() as s, s.begin():
        return register_model(s, bundle_id(manifest), manifest, str(Path(out).resolve()))


def recorded_retrain(factory, settings, out: str, runs: Sequence[int], config: dict, *, worker: str,
                     task_id: str | None = None, log_fn=log.info) -> str:
    """retrain(), recorded as a row of `retrains` held by worker (the same task_id again reuses it)."""
    with factory() as s, s.begin():
        row = start_retrain(s, task_id, worker, settings.lease_s, str(Path(out).resolve()), runs, config)
    try:
        made = retrain(factory, settings, out, runs, config, log_fn=log_fn)
    except BaseException as exc:
        _end(factory, row, error=describe(exc))
        raise
    _end(factory, row, bundle_id=made)
    return made


def _end(factory, row: int, **outcome) -> None:
    try:
        with factory() as s, s.begin():
            end_retrain(s, row, **outcome)
    except Exception as exc:  # noqa: BLE001 - the database may be away: then the lease runs out and it shows failed
        log.warning("retrain %d: could not record its end: %s", row, describe(exc))
