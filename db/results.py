"""What the stages produce, written and read back: base logits, modality contributions,
predictions, collapse metrics, and the output rows of a run.

Writes are upserts keyed by unique constraints, so a batch run twice (a redelivered message, a
requeue) leaves exactly one row per product and kind. Contributions are first-writer-wins: the
stored T-SHAP is the one the stacker read for the product's prediction.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
from sqlalchemy import delete, func, select

from db import models as m
from db.products import load_products
from db.upsert import upsert
from pipeline.metrics import rmse_net_of_noise
from pipeline.records import Contributions, Inferred

CONTRIBUTION_COLUMNS = ("t_shap", "stderr", "n_players", "n_evaluations", "method", "met_target", "reason",
                        "phi_text", "phi_image", "game_text_share", "audit_t_shap", "audit_stderr")
OUTPUT_COLUMNS = ("product_id", "category", "confidence", "t_shap", "v_shap", "text_category", "image_category",
                  "multimodal_category", "missing", "label", "t_shap_stderr", "mmshap_evaluations", "mmshap_mode",
                  "title")


def save_inferred(session, rows: Sequence[m.Product], inferred: Inferred, model_version: str, mode: str) -> None:
    """Base logits of every kind and the MM-SHAP contributions of products rows (in inferred's order)."""
    c = inferred.contributions
    upsert(session, m.BaseLogits, [
        {"product_pk": r.id, "model_kind": k, "model_version": model_version,
         "logits": [round(float(v), 5) for v in inferred.logits[k][i]]}
        for i, r in enumerate(rows) for k in inferred.logits
    ], ["product_pk", "model_kind", "model_version"])
    upsert(session, m.ModalityContribution, [
        {"product_pk": r.id, "run_id": r.run_id, "mode": mode, **c.row(i)} for i, r in enumerate(rows)
    ], ["product_pk"], update=False)


def uninferred(session, model_version: str, pks: Sequence[int], kinds: Sequence[str]) -> list[int]:
    """The products of pks that lack some of save_inferred's rows, in pks order (a redelivered batch skips the rest)."""
    n_logits = dict(session.execute(
        select(m.BaseLogits.product_pk, func.count())
        .where(m.BaseLogits.product_pk.in_(pks), m.BaseLogits.model_version == model_version)
        .group_by(m.BaseLogits.product_pk)).all())
    explained = set(session.scalars(
        select(m.ModalityContribution.product_pk).where(m.ModalityContribution.product_pk.in_(pks))))
    return [pk for pk in pks if n_logits.get(pk, 0) < len(kinds) or pk not in explained]


def load_inferred(session, model_version: str, pks: Sequence[int], kinds: Sequence[str]) -> tuple[list[int], Inferred]:
    """What save_inferred stored, for the products that have all of it (logits of every one of the
    bundle's base models, kinds), in pks order."""
    logits: dict[int, dict[str, list[float]]] = {}
    q = select(m.BaseLogits).where(m.BaseLogits.product_pk.in_(pks), m.BaseLogits.model_version == model_version)
    for row in session.scalars(q):
        logits.setdefault(row.product_pk, {})[row.model_kind] = row.logits
    contrib = {c.product_pk: c for c in session.scalars(
        select(m.ModalityContribution).where(m.ModalityContribution.product_pk.in_(pks)))}
    products = {p.id: p for p in load_products(session, pks)}
    ready = [pk for pk in pks if set(kinds) <= set(logits.get(pk, {})) and pk in contrib]
    has_text = np.array([bool(products[pk].title or products[pk].description) for pk in ready], bool)
    has_image = np.array([products[pk].image is not None for pk in ready], bool)
    return ready, Inferred(
        {k: np.array([logits[pk][k] for pk in ready], np.float32).reshape(len(ready), -1 if ready else 0) for k in kinds},
        Contributions.from_rows([{f: getattr(contrib[pk], f) for f in CONTRIBUTION_COLUMNS} for pk in ready]),
        has_text, has_image,
    )


def runs_of(session, pks: Sequence[int]) -> dict[int, int]:
    return dict(session.execute(select(m.Product.id, m.Product.run_id).where(m.Product.id.in_(pks))).all())


def save_predictions(session, rows: list[dict], model_version: str, stacker: str) -> None:
    """rows: {product_pk, run_id, category, confidence, text/image/multimodal_category, missing}."""
    upsert(session, m.Prediction, [{**r, "model_version": model_version, "stacker": stacker} for r in rows],
           ["product_pk", "stacker"])


def unestimated(session, run_id: int) -> tuple[int, int, dict[str, int]]:
    """(products explained, of them with T-SHAP NULL for another reason than a missing modality,
    {reason: count}) of a run: what classify warns about."""
    total = session.scalar(select(func.count()).select_from(m.ModalityContribution)
                           .where(m.ModalityContribution.run_id == run_id))
    reasons = dict(session.execute(
        select(m.ModalityContribution.reason, func.count())
        .where(m.ModalityContribution.run_id == run_id, m.ModalityContribution.t_shap.is_(None),
               ~m.ModalityContribution.reason.like("missing modality%"))
        .group_by(m.ModalityContribution.reason)).all())
    return int(total or 0), sum(reasons.values()), reasons


def audit_error(session, run_id: int) -> dict | None:
    """How far the run's amortized T-SHAP lies from the sampled T-SHAP of its audited products:
    {n, rmse, mean_abs_diff, mean_diff (amortized - sampled), mean_audit_stderr, rmse_net, rmse_net_ci};
    None without audited products.

    The audit's own estimate is noisy (its stderr is stored), so rmse overstates the explainer's error
    against the exact T-SHAP: rmse_net subtracts the audit's noise (pipeline.metrics.rmse_net_of_noise),
    with a 95% bootstrap interval over the audited products."""
    c = m.ModalityContribution
    pairs = session.execute(select(c.t_shap, c.audit_t_shap, c.audit_stderr).where(
        c.run_id == run_id, c.method == "amortized", c.t_shap.is_not(None), c.audit_t_shap.is_not(None))).all()
    if not pairs:
        return None
    a, s, se = (np.array([p[k] for p in pairs], float) for k in range(3))
    d = a - s
    boot = [rmse_net_of_noise(d[i], se[i]) for i in np.random.default_rng(0).integers(0, len(d), (1000, len(d)))]
    return {"n": len(d), "rmse": float(np.sqrt(np.mean(d**2))), "mean_abs_diff": float(np.mean(np.abs(d))),
            "mean_diff": float(np.mean(d)), "mean_audit_stderr": float(np.nanmean(se)) if np.isfinite(se).any() else None,
            "rmse_net": rmse_net_of_noise(d, se),
            "rmse_net_ci": [float(x) for x in np.percentile(boot, [2.5, 97.5])]}


def replace_collapse_metrics(session, run_id: int, metrics: list[tuple]) -> None:
    """The run's collapse metrics become metrics [(scope, metric, value)]."""
    # concurrent aggregations of one run (a worker's and the periodic one) take turns on the run row
    session.get(m.Run, run_id, with_for_update=True)
    session.execute(delete(m.CollapseMetric).where(m.CollapseMetric.run_id == run_id))
    if metrics:
        session.execute(m.CollapseMetric.__table__.insert(),
                        [{"run_id": run_id, "scope": sc, "metric": k, "value": float(v)} for sc, k, v in metrics])


def collapse_metrics_of(session, run_id: int) -> list[m.CollapseMetric]:
    return list(session.scalars(select(m.CollapseMetric).where(m.CollapseMetric.run_id == run_id)))


def iter_output_rows(session, run_id: int, *, chunk: int = 1000) -> Iterator[dict]:
    """One dict per predicted product of the run, with OUTPUT_COLUMNS, in feed order, streamed
    (`yield_per`: a server-side cursor on PostgreSQL), so memory stays flat for any run size."""
    q, c = m.Prediction, m.ModalityContribution
    query = (select(m.Product.product_id, q.category, q.confidence, c.t_shap, c.v_shap, q.text_category,
                    q.image_category, q.multimodal_category, q.missing, m.Product.label, c.stderr, c.n_evaluations,
                    c.mode, m.Product.title)
             .join(q, q.product_pk == m.Product.id)
             .outerjoin(c, c.product_pk == m.Product.id)
             .where(m.Product.run_id == run_id).order_by(m.Product.row).execution_options(yield_per=chunk))
    for row in session.execute(query):
        out = dict(zip(OUTPUT_COLUMNS, row))
        for key in ("confidence", "t_shap", "v_shap", "t_shap_stderr"):
            if out[key] is not None:  # a value that could not be computed (an infinite error bar) is NULL
                out[key] = round(out[key], 6) if math.isfinite(out[key]) else None
        out["missing"], out["label"] = out["missing"] or "", out["label"] or ""
        yield out


def output_rows(session, run_id: int) -> list[dict]:
    """iter_output_rows as a list (for summaries and the report, which need every row)."""
    return list(iter_output_rows(session, run_id))


def images_of(session, run_id: int, product_ids: Sequence[str]) -> dict[str, str | None]:
    """{product_id: image reference} of some of the run's products."""
    q = select(m.Product.product_id, m.Product.image).where(m.Product.run_id == run_id,
                                                            m.Product.product_id.in_(list(product_ids)))
    return dict(session.execute(q).all())
