"""The pure stages bound to the database: load a batch, run a stage, upsert its results.

The embedded runner (`classify_run`) loops over these; each Celery task in workers/ calls one of
them for one batch. Results are upserts keyed by unique constraints, so running a batch twice
(a redelivered message, a requeue) leaves exactly one row per product and kind.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from sqlalchemy import delete, exists, func, select, update

from db import models as m
from db.store import load_products, product_pks, set_status, to_record, upsert
from db.models import utcnow
from pipeline.collapse import Thresholds, collapse_metrics
from pipeline.explain import Contributions
from pipeline.runner import Inferred, infer, stack
from pipeline.stacking import KINDS

OUTPUT_COLUMNS = ("product_id", "category", "confidence", "t_shap", "v_shap", "text_category", "image_category",
                  "multimodal_category", "missing", "label")


def infer_batch(factory, backend, model_version: str, pks: Sequence[int], *, budget: int, mode: str,
                seed: int = 0) -> int:
    """Base logits and MM-SHAP for products pks; returns how many were processed."""
    with factory() as s:
        rows = load_products(s, pks)
    if not rows:
        return 0
    res = infer(backend, [to_record(r) for r in rows], budget=budget, mode=mode, seed=seed)
    c = res.contributions
    with factory() as s, s.begin():
        upsert(s, m.BaseLogits, [
            {"product_pk": r.id, "model_kind": k, "model_version": model_version,
             "logits": [round(float(v), 5) for v in res.logits[k][i]]}
            for i, r in enumerate(rows) for k in KINDS
        ], ["product_pk", "model_kind", "model_version"])
        upsert(s, m.ModalityContribution, [
            {"product_pk": r.id, "run_id": r.run_id, "t_shap": float(c.t_shap[i]), "v_shap": float(c.v_shap[i]),
             "n_evaluations": int(c.n_evaluations[i]), "stderr": float(c.stderr[i]), "mode": mode}
            for i, r in enumerate(rows)
        ], ["product_pk"])
    return len(rows)


def uninferred(session, model_version: str, pks: Sequence[int]) -> list[int]:
    """The products of pks that lack some of infer_batch's rows, in pks order (a redelivered batch skips the rest)."""
    n_logits = dict(session.execute(
        select(m.BaseLogits.product_pk, func.count())
        .where(m.BaseLogits.product_pk.in_(pks), m.BaseLogits.model_version == model_version)
        .group_by(m.BaseLogits.product_pk)).all())
    explained = set(session.scalars(
        select(m.ModalityContribution.product_pk).where(m.ModalityContribution.product_pk.in_(pks))))
    return [pk for pk in pks if n_logits.get(pk, 0) < len(KINDS) or pk not in explained]


def load_inferred(session, model_version: str, pks: Sequence[int]) -> tuple[list[int], Inferred]:
    """What infer_batch stored, for the products that have all of it, in pks order."""
    logits: dict[int, dict[str, list[float]]] = {}
    q = select(m.BaseLogits).where(m.BaseLogits.product_pk.in_(pks), m.BaseLogits.model_version == model_version)
    for row in session.scalars(q):
        logits.setdefault(row.product_pk, {})[row.model_kind] = row.logits
    contrib = {c.product_pk: c for c in session.scalars(
        select(m.ModalityContribution).where(m.ModalityContribution.product_pk.in_(pks)))}
    products = {p.id: p for p in load_products(session, pks)}
    ready = [pk for pk in pks if len(logits.get(pk, {})) == len(KINDS) and pk in contrib]
    has_text = np.array([bool(products[pk].title or products[pk].description) for pk in ready], bool)
    has_image = np.array([products[pk].image is not None for pk in ready], bool)
    return ready, Inferred(
        {k: np.array([logits[pk][k] for pk in ready], np.float32).reshape(len(ready), -1) for k in KINDS},
        Contributions(np.array([contrib[pk].t_shap for pk in ready]), np.array([contrib[pk].v_shap for pk in ready]),
                      np.array([contrib[pk].n_evaluations for pk in ready]), np.array([contrib[pk].stderr for pk in ready])),
        has_text, has_image,
    )


def stack_batch(factory, stacker, labels: Sequence[str], model_version: str, pks: Sequence[int]) -> int:
    """Predictions for products pks from their stored logits; marks them done."""
    with factory() as s:
        ready, inferred = load_inferred(s, model_version, pks)
        run_of = dict(s.execute(select(m.Product.id, m.Product.run_id).where(m.Product.id.in_(ready))).all())
    if not ready:
        return 0
    preds = stack(stacker, inferred, labels)
    with factory() as s, s.begin():
        upsert(s, m.Prediction, [
            {"product_pk": pk, "run_id": run_of[pk], "model_version": model_version, "stacker": stacker.name,
             **{k: v for k, v in p.items() if k not in ("t_shap", "v_shap")}}
            for pk, p in zip(ready, preds)
        ], ["product_pk", "stacker"])
        set_status(s, ready, "done")
    return len(ready)


def aggregate_collapse(factory, run_id: int, thresholds: Thresholds, reference: dict | None = None) -> list[tuple]:
    """Recompute the run's collapse metrics from its stored rows (idempotent: replaces them)."""
    with factory() as s:
        rows = s.execute(
            select(m.ModalityContribution.t_shap, m.Prediction.category, m.Prediction.text_category,
                   m.Prediction.image_category, m.Prediction.multimodal_category)
            .join(m.Prediction, m.Prediction.product_pk == m.ModalityContribution.product_pk)
            .where(m.ModalityContribution.run_id == run_id)
        ).all()
    if not rows:
        return []
    t, cat, text, image, mm = (np.array(col) for col in zip(*rows))
    metrics = collapse_metrics(t.astype(float), cat, {"text": text, "image": image, "multimodal": mm},
                               thresholds, reference)
    with factory() as s, s.begin():
        # concurrent aggregations of one run (a worker's and the periodic one) take turns on the run row
        s.get(m.Run, run_id, with_for_update=True)
        s.execute(delete(m.CollapseMetric).where(m.CollapseMetric.run_id == run_id))
        s.execute(m.CollapseMetric.__table__.insert(),
                  [{"run_id": run_id, "scope": sc, "metric": k, "value": float(v)} for sc, k, v in metrics])
    return metrics


def output_rows(session, run_id: int) -> list[dict]:
    q = (select(m.Product, m.Prediction, m.ModalityContribution)
         .join(m.Prediction, m.Prediction.product_pk == m.Product.id)
         .outerjoin(m.ModalityContribution, m.ModalityContribution.product_pk == m.Product.id)
         .where(m.Product.run_id == run_id).order_by(m.Product.row))
    out = []
    for p, pred, c in session.execute(q).all():
        out.append({
            "product_id": p.product_id, "category": pred.category, "confidence": round(pred.confidence, 6),
            "t_shap": round(c.t_shap, 6) if c else None, "v_shap": round(c.v_shap, 6) if c else None,
            "text_category": pred.text_category, "image_category": pred.image_category,
            "multimodal_category": pred.multimodal_category, "missing": pred.missing or "", "label": p.label or "",
        })
    return out


def export(factory, run_id: int, path: str | Path) -> int:
    path = Path(path)
    with factory() as s:
        rows = output_rows(s, run_id)
    if path.suffix.lower() == ".jsonl":
        with open(path, "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    elif path.suffix.lower() == ".csv":
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=OUTPUT_COLUMNS)
            w.writeheader()
            w.writerows(rows)
    else:
        raise ValueError(f"output must be .csv or .jsonl, not {path.suffix!r}")
    return len(rows)


def start_run(factory, run_id: int, model_version: str, stacker: str) -> None:
    with factory() as s, s.begin():
        s.execute(update(m.Run).where(m.Run.id == run_id).values(status="classifying", bundle_id=model_version,
                                                                 stacker=stacker))


def finish_run(factory, run_id: int, timings: dict | None = None, *, if_complete: bool = False) -> bool:
    """Mark the run done; returns whether it was marked.

    if_complete (the distributed mode, where any worker may be the last): only a run still
    classifying with no pending product, checked and changed in one statement, so that a run
    requeued meanwhile stays open.
    """
    with factory() as s, s.begin():
        q = update(m.Run).where(m.Run.id == run_id)
        if if_complete:
            pending = exists().where(m.Product.run_id == run_id, m.Product.status == "pending")
            q = q.where(m.Run.status == "classifying", ~pending)
        if not s.execute(q.values(status="done", finished_at=utcnow())).rowcount:
            return False
        run = s.get(m.Run, run_id)
        run.timings = {**(run.timings or {}), **(timings or {})}
    return True


def classify_run(factory, backend, stacker, labels, model_version: str, run_id: int, *, batch_size: int,
                 budget: int, mode: str, thresholds: Thresholds, reference: dict | None = None,
                 progress: Callable[[int], None] | None = None) -> dict:
    """The embedded runner: every pending product of a run through infer and stack, in batches."""
    start_run(factory, run_id, model_version, stacker.name)
    with factory() as s:
        pks = product_pks(s, run_id, ("pending", "failed"))
    timings = {"infer_s": 0.0, "stack_s": 0.0}
    for i in range(0, len(pks), batch_size):
        batch = pks[i : i + batch_size]
        t0 = time.perf_counter()
        infer_batch(factory, backend, model_version, batch, budget=budget, mode=mode)
        t1 = time.perf_counter()
        stack_batch(factory, stacker, labels, model_version, batch)
        timings["infer_s"] += t1 - t0
        timings["stack_s"] += time.perf_counter() - t1
        if progress:
            progress(len(batch))
    t0 = time.perf_counter()
    aggregate_collapse(factory, run_id, thresholds, reference)
    timings["collapse_s"] = time.perf_counter() - t0
    timings = {k: round(v, 3) for k, v in timings.items()}
    finish_run(factory, run_id, timings)
    return timings
