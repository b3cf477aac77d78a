"""SQLAlchemy 2 tables. Table names are part of the BI contract: change them only with a migration."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Run(Base):
    """One ingested feed. Counts are a cache; `db.progress.run_progress` derives the truth."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    feed: Mapped[str] = mapped_column(Text)
    mode: Mapped[str] = mapped_column(String(16), default="embedded")
    # ingesting | ingested | classifying | done | done_with_failures | failed
    status: Mapped[str] = mapped_column(String(32), default="ingesting")
    bundle_id: Mapped[str | None] = mapped_column(String(80))
    stacker: Mapped[str | None] = mapped_column(String(32))
    n_rows: Mapped[int] = mapped_column(Integer, default=0)
    n_products: Mapped[int] = mapped_column(Integer, default=0)
    n_rejects: Mapped[int] = mapped_column(Integer, default=0)
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # what classify was asked for: mmshap_budget, mmshap_mode, split (the workers of a distributed run read it)
    options: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # last change of the row, in the database's time (never a worker's clock)
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=func.now(),
                                                        onupdate=func.now())
    # the ingest worker holding the run, until when (db.claims); ingest starts not finished
    claimed_by: Mapped[str | None] = mapped_column(String(160))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    deliveries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # failures to load what the run needs (bundle, stacker, Triton), counted while identical
    setup_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    setup_error: Mapped[str | None] = mapped_column(Text)


class Product(Base):
    __tablename__ = "products"
    __table_args__ = (
        UniqueConstraint("run_id", "product_id", name="uq_products_run_product"),
        Index("ix_products_run_status", "run_id", "status"),
        Index("ix_products_run_updated", "run_id", "updated_at"),
        Index("ix_products_claimed_by", "claimed_by"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    product_id: Mapped[str] = mapped_column(String(128))
    row: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    title: Mapped[str] = mapped_column(Text, default="")
    description: Mapped[str] = mapped_column(Text, default="")
    image: Mapped[str | None] = mapped_column(Text)
    label: Mapped[str | None] = mapped_column(String(256))
    group_id: Mapped[str | None] = mapped_column(String(256))
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # pending -> done | failed (retryable) | dead (dead-lettered)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    # starts of the current stage that have not finished (workers/poison.py reads it to find poison)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=func.now(),
                                                        onupdate=func.now())
    # the worker process holding the product in its current stage, until when (db.claims)
    claimed_by: Mapped[str | None] = mapped_column(String(160))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # workers on which the product alone raised, space-separated (parked once two differ)
    failed_on: Mapped[str | None] = mapped_column(Text)


class RejectRow(Base):
    __tablename__ = "rejects"
    # one reject per feed row: a resumed ingest inserts nothing twice
    __table_args__ = (Index("uq_rejects_run_row", "run_id", "row", unique=True),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    row: Mapped[int] = mapped_column(Integer)
    raw_id: Mapped[str | None] = mapped_column(String(256))
    reason: Mapped[str] = mapped_column(Text)
    # the rule the row broke, a short stable name (pipeline.records.Reject.code; docs/ingest.md)
    code: Mapped[str | None] = mapped_column(String(48))


class ModelVersion(Base):
    __tablename__ = "model_versions"
    id: Mapped[str] = mapped_column(String(80), primary_key=True)  # bundle id
    content_hash: Mapped[str] = mapped_column(String(64))
    preset: Mapped[str | None] = mapped_column(String(32))
    path: Mapped[str | None] = mapped_column(Text)
    labels: Mapped[list[Any]] = mapped_column(default=list)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class BaseLogits(Base):
    __tablename__ = "base_logits"
    __table_args__ = (UniqueConstraint("product_pk", "model_kind", "model_version", name="uq_base_logits"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    product_pk: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"))
    model_kind: Mapped[str] = mapped_column(String(16))  # text | image | multimodal
    model_version: Mapped[str] = mapped_column(ForeignKey("model_versions.id"))
    logits: Mapped[list[Any]] = mapped_column()


class Prediction(Base):
    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("product_pk", "stacker", name="uq_predictions_product_stacker"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    product_pk: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"))
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    category: Mapped[str] = mapped_column(String(256))
    confidence: Mapped[float] = mapped_column(Float)
    model_version: Mapped[str] = mapped_column(ForeignKey("model_versions.id"))
    stacker: Mapped[str] = mapped_column(String(32))
    text_category: Mapped[str | None] = mapped_column(String(256))
    image_category: Mapped[str | None] = mapped_column(String(256))
    multimodal_category: Mapped[str | None] = mapped_column(String(256))
    missing: Mapped[str | None] = mapped_column(String(16))  # "image" | "text" | None
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModalityContribution(Base):
    __tablename__ = "modality_contributions"
    __table_args__ = (UniqueConstraint("product_pk", name="uq_contributions_product"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    product_pk: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"))
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    # NULL t_shap / v_shap / stderr: no estimate (a modality missing, or the budget too small): see reason
    t_shap: Mapped[float | None] = mapped_column(Float)
    v_shap: Mapped[float | None] = mapped_column(Float)
    n_evaluations: Mapped[int] = mapped_column(Integer)
    stderr: Mapped[float | None] = mapped_column(Float)
    mode: Mapped[str] = mapped_column(String(8), default="token")
    n_players: Mapped[int | None] = mapped_column(Integer)
    method: Mapped[str | None] = mapped_column(String(16))  # exact | antithetic | permutation | amortized | none
    met_target: Mapped[bool | None] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(Text)
    # the exact two-player modality game {text, image}: its Shapley values and text's |share|
    phi_text: Mapped[float | None] = mapped_column(Float)
    phi_image: Mapped[float | None] = mapped_column(Float)
    game_text_share: Mapped[float | None] = mapped_column(Float)
    # amortized products picked for the audit: their sampled T-SHAP and its stderr (else NULL)
    audit_t_shap: Mapped[float | None] = mapped_column(Float)
    audit_stderr: Mapped[float | None] = mapped_column(Float)


class CollapseMetric(Base):
    __tablename__ = "collapse_metrics"
    __table_args__ = (UniqueConstraint("run_id", "scope", "metric", name="uq_collapse_metric"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    scope: Mapped[str] = mapped_column(String(256))  # "all" or a category
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)


class DeadLetter(Base):
    """Products that kept failing: kept with their last error so the run can finish without them."""

    __tablename__ = "dead_letters"
    __table_args__ = (UniqueConstraint("product_pk", "stage", name="uq_dead_letters"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    product_pk: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"))
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    stage: Mapped[str] = mapped_column(String(16))
    error: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Worker(Base):
    """A worker process and its heartbeat (db.claims): claims of a silent one are freed."""

    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(160), primary_key=True)  # node name/pid
    queues: Mapped[str] = mapped_column(String(64), default="", server_default="")
    status: Mapped[str] = mapped_column(String(16), default="alive", server_default="alive")  # alive|stopped|fatal
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_seen: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Lock(Base):
    """A named lease (the beat's): held by one holder until a time of the database."""

    __tablename__ = "locks"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(160))
    until: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Retrain(Base):
    """One `shapstack retrain` task as a train worker runs it (db.retrains): a killed one shows as failed.

    The worker holds it with a lease its heartbeat renews, as it holds a batch (db.claims); a retrain
    whose holder died is marked failed by the sweeper, or by `shapstack retrain --list`.
    """

    __tablename__ = "retrains"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[str | None] = mapped_column(String(64), unique=True)  # a Celery retry keeps its row
    state: Mapped[str] = mapped_column(String(16), default="running")  # running | done | failed
    out: Mapped[str] = mapped_column(Text)  # the bundle folder it writes
    runs: Mapped[list[Any]] = mapped_column(default=list)  # the runs whose labelled products it uses; [] = all
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    bundle_id: Mapped[str | None] = mapped_column(String(80))  # the bundle it made (done)
    error: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(160))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
