"""Infer a batch: base-model logits and MM-SHAP for stored products, written back."""

from __future__ import annotations

import logging
from typing import Sequence

from db.products import dead_letter, load_products, to_record
from db.results import save_inferred
from pipeline.inference import infer
from pipeline.mmshap import MMShapConfig
from pipeline.preprocess import ImagesUnreadable

log = logging.getLogger(__name__)


def infer_batch(factory, backend, model_version: str, pks: Sequence[int], mmshap: MMShapConfig) -> int:
    """Base logits and MM-SHAP for products pks (sampling seeded by model_version and each product's
    content); returns how many were processed.

    A product whose image cannot be read now (its snapshot gone or changed) is dead-lettered with
    the reason, and the rest of the batch goes on: it is never classified as if it had no image.
    """
    with factory() as s:
        rows = load_products(s, pks)
    try:
        inferred = infer(backend, [to_record(r) for r in rows], mmshap, seed_key=model_version) if rows else None
    except ImagesUnreadable as exc:
        with factory() as s, s.begin():
            for r in rows:
                if r.product_id in exc.failures:
                    log.error("product %s (run %d): %s", r.product_id, r.run_id, exc.failures[r.product_id])
                    dead_letter(s, r.id, "infer", f"image unreadable at inference: {exc.failures[r.product_id]}", 1)
        rows = [r for r in rows if r.product_id not in exc.failures]
        inferred = infer(backend, [to_record(r) for r in rows], mmshap, seed_key=model_version) if rows else None
    if not rows:
        return 0
    with factory() as s, s.begin():
        save_inferred(s, rows, inferred, model_version, mmshap.mode)
    return len(rows)
