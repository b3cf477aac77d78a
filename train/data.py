"""What a training run learns from: its configuration, the labelled products of a feed, the classes kept."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import UserError
from pipeline.feed import read_feed
from pipeline.mmshap import DEFAULT_CAP, DEFAULT_MODE, DEFAULT_TARGET_STDERR, MMShapConfig
from pipeline.records import Limits, Product
from pipeline.split import keep
from pipeline.stackers import PAPER_EPOCHS, STACKERS


@dataclass
class TrainConfig:
    preset: str = "small"
    label_column: str = "category"
    group_column: str = "group_id"
    min_class_size: int = 20
    folds: int = 5
    seed: int = 0
    epochs: int | None = None
    device: str = "auto"
    test_fraction: float = 0.0  # > 0: hold out this share of groups for evaluate/classify --split test
    mmshap_budget: int | None = None  # fixed coalitions per product; None: target stderr with a cap
    mmshap_mode: str = DEFAULT_MODE
    mmshap_target_stderr: float = DEFAULT_TARGET_STDERR
    mmshap_cap: int = DEFAULT_CAP
    mmshap_players: str = "token"
    explainer: bool = True  # fit amortized MM-SHAP's explainer (when MM-SHAP is on; train/explainer.py)
    explainer_products: int = 2000  # with folds > 1: products whose final-model MM-SHAP it learns from
    tokenizer: str | None = None  # a local pretrained tokenizer; default: train WordPiece on the feed
    checkpoints: dict | None = None  # text | image | clip -> registry name or local path (over the preset's)
    stackers: tuple[str, ...] = STACKERS
    paper_epochs: int = PAPER_EPOCHS  # mmshap-paper's full-batch SGD epochs (the paper's 50,000)
    tfidf: bool | None = None  # the sparse text base learner (pipeline.tfidf); None: as the preset says

    @property
    def mmshap(self) -> MMShapConfig:
        return MMShapConfig(mode=self.mmshap_mode, budget=self.mmshap_budget, target_stderr=self.mmshap_target_stderr,
                            cap=self.mmshap_cap, players=self.mmshap_players)


def label_of(p: Product, column: str) -> str | None:
    value = p.label if column == "category" else p.attributes.get(column)
    return str(value) if value not in (None, "") else None


def group_of(p: Product, column: str) -> str:
    value = p.group_id if column == "group_id" else p.attributes.get(column)
    return str(value) if value not in (None, "") else p.product_id


def load_training_products(feed, cfg: TrainConfig, limits: Limits, split: str | None) -> list[Product]:
    products = [p for p in read_feed(feed, limits) if isinstance(p, Product) and label_of(p, cfg.label_column)]
    return [p for p in products if keep(p, split, cfg.test_fraction, cfg.seed)] if cfg.test_fraction else products


def select_classes(products: list[Product], cfg: TrainConfig) -> tuple[list[str], dict[str, int]]:
    counts: dict[str, int] = {}
    for p in products:
        counts[label_of(p, cfg.label_column)] = counts.get(label_of(p, cfg.label_column), 0) + 1
    labels = sorted(c for c, n in counts.items() if n >= cfg.min_class_size)
    dropped = {c: n for c, n in counts.items() if n < cfg.min_class_size}
    if len(labels) < 2:
        raise UserError(f"need at least 2 classes with >= {cfg.min_class_size} products, found {len(labels)}")
    return labels, dropped
