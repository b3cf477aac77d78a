"""K-fold cross-fitting: which products each fold model trains on, and a backend over fold models.

Leakage rule: a stacker never sees base-model outputs on products those base models were trained
on. Groups (colour variants of one product) never straddle folds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from pipeline.backend import InProcessBackend
from pipeline.bundle import Bundle
from pipeline.tokenizer import Tokenizer


def fold_indices(y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    if folds == 1:
        split = GroupShuffleSplit(n_splits=1, test_size=0.2, random_state=seed)
        return list(split.split(y, y, groups))
    return list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(y, y, groups))


def fold_backend(models: dict, tokenizer: Tokenizer, preset: dict, labels: list[str], device: str):
    """The in-process backend over models that are not in a bundle yet."""
    bundle = Bundle(Path("."), {"preset": preset, "labels": labels}, tokenizer, models, torch.device("cpu"))
    return InProcessBackend(bundle, device=device)
