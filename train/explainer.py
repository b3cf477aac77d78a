"""Fitting the bundle's MM-SHAP explainer (amortized MM-SHAP, pipeline.amortized) on the sampled
out-of-fold MM-SHAP of the training products, the same rows the stackers learn from."""

from __future__ import annotations

import numpy as np

from pipeline.amortized import HIDDEN, FEATURES_VERSION, cross_validated, features, fit_explainer, player_counts, rmse
from pipeline.bundle import save_artifact
from pipeline.mmshap import EXPLAINER, MMShapConfig
from pipeline.preprocess import Encoded


def explainer_inputs(backend, enc: Encoded, logits: dict[str, np.ndarray], mmshap: MMShapConfig) -> np.ndarray:
    n_text, n_image = player_counts(backend, enc, mmshap.mode, mmshap.players)
    return features(logits, n_text, n_image)


def fit_bundle_explainer(x: np.ndarray, t_shap: np.ndarray, stderr: np.ndarray, game: np.ndarray,
                         mmshap: MMShapConfig, seed: int) -> tuple[dict, dict, np.ndarray]:
    """(weights, manifest entry, cross-validated amortized T-SHAP of the rows).

    The manifest entry records what the explainer predicts (mode, players, target policy) and its
    5-fold cross-validated RMSE against the sampled targets, which include their sampling noise.
    """
    explainer = fit_explainer(x, t_shap, stderr, game, seed=seed)
    oof = cross_validated(x, t_shap, stderr, game, seed=seed)
    error, n = rmse(oof, t_shap)
    meta = {"features_version": FEATURES_VERSION, "hidden": HIDDEN, "inputs": int(x.shape[1]),
            "n_train": int(np.isfinite(t_shap).sum()), "cv_rmse_vs_sampled": error, "cv_n": n,
            "mode": mmshap.mode, "players": mmshap.players,
            "targets": MMShapConfig(**{**mmshap.__dict__, "method": "sampled"}).describe()}
    return explainer.state(), meta, oof


def save_explainer(path, weights: dict) -> None:
    save_artifact(path, EXPLAINER, weights)
