"""What the monitoring reads back after a stage: new rows of an ingest, a batch's MM-SHAP cost, a
finished run's collapse flags and failures. Counts come from the stored rows, so a redelivered
batch that wrote nothing new adds nothing."""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db import models as m


def ingest_mark(session: Session, run_id: int) -> tuple[int, int]:
    """(highest product key, highest reject key) of the run: rows above them are new."""
    product = session.scalar(select(func.max(m.Product.id)).where(m.Product.run_id == run_id))
    reject = session.scalar(select(func.max(m.RejectRow.id)).where(m.RejectRow.run_id == run_id))
    return product or 0, reject or 0


def ingested_since(session: Session, run_id: int, mark: tuple[int, int]) -> tuple[int, Counter]:
    """(products stored after mark, their rejects' reasons with counts)."""
    products = session.scalar(select(func.count()).select_from(m.Product)
                              .where(m.Product.run_id == run_id, m.Product.id > mark[0])) or 0
    reasons = session.execute(select(m.RejectRow.reason, func.count())
                              .where(m.RejectRow.run_id == run_id, m.RejectRow.id > mark[1])
                              .group_by(m.RejectRow.reason)).all()
    return products, Counter(dict(reasons))


def mmshap_cost(session: Session, pks: Sequence[int]) -> tuple[int, int]:
    """(coalition evaluations spent, products left without a T-SHAP) over the stored contributions of pks."""
    rows = session.execute(select(m.ModalityContribution.n_evaluations, m.ModalityContribution.t_shap)
                           .where(m.ModalityContribution.product_pk.in_(pks))).all()
    evaluations = sum(n or 0 for n, _ in rows)
    missing = sum(1 for _, t in rows if t is None or math.isnan(t))
    return evaluations, missing


def raised_flags(session: Session, run_id: int) -> list[tuple[str, str]]:
    """(scope, flag) of every collapse flag raised for the run (flag_* metrics at 1)."""
    q = select(m.CollapseMetric.scope, m.CollapseMetric.metric).where(
        m.CollapseMetric.run_id == run_id, m.CollapseMetric.metric.like("flag\\_%", escape="\\"),
        m.CollapseMetric.value >= 1.0).order_by(m.CollapseMetric.scope, m.CollapseMetric.metric)
    return [(scope, metric.removeprefix("flag_")) for scope, metric in session.execute(q).all()]


def t_shap_drift(session: Session, run_id: int) -> float | None:
    """The run's mean T-SHAP minus the bundle's training mean (scope all); None without a reference."""
    value = session.scalar(select(m.CollapseMetric.value).where(
        m.CollapseMetric.run_id == run_id, m.CollapseMetric.scope == "all", m.CollapseMetric.metric == "drift_t_shap"))
    return None if value is None or math.isnan(value) else float(value)


def failures(session: Session, run_id: int) -> tuple[int, int]:
    """(failed products, dead-lettered products) of the run."""
    failed = session.scalar(select(func.count()).select_from(m.Product)
                            .where(m.Product.run_id == run_id, m.Product.status == "failed")) or 0
    dead = session.scalar(select(func.count()).select_from(m.Product)
                          .where(m.Product.run_id == run_id, m.Product.status == "dead")) or 0
    return failed, dead
