"""Fitting the bundle's MM-SHAP explainer (amortized MM-SHAP, pipeline.amortized).

The explainer must learn the T-SHAP of the models it will explain: the bundle's final models. With
--folds 1 they are the fold models, and the held-out products' sampled MM-SHAP (what the stackers
learn from) are its targets, out of sample. With K > 1 folds the final models are retrained on
every product and rely on the modalities differently from the fold models (measured in
docs/amortized.md: the fold models' out-of-fold T-SHAP is no target for them), so the final models'
sampled MM-SHAP of up to cfg.explainer_products training products is computed for it (cached
like the folds): that is the explainer's training cost. It samples at the audit's looser target
(MMShapConfig.audit, stderr 0.1): a regression averages its targets' noise away, so many cheap
targets teach it as much as a few precise ones (measured in docs/amortized.md), and the weights
1 / (stderr^2 + FLOOR^2) still favour the sharper ones.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from pipeline.amortized import HIDDEN, FEATURES_VERSION, cross_validated, features, fit_explainer, player_counts, rmse
from pipeline.bundle import save_artifact
from pipeline.inference import infer, stack_inputs
from pipeline.metrics import rmse_net_of_noise
from pipeline.mmshap import EXPLAINER, MMShapConfig
from pipeline.preprocess import Encoded
from pipeline.records import KINDS
from pipeline.stackers import StackInputs

MIN_TARGETS = 10  # products with a sampled T-SHAP below which no explainer is fitted


def explainer_targets(work, backend, products: list, rows: np.ndarray, oof: StackInputs, cfg
                      ) -> tuple[np.ndarray, StackInputs, MMShapConfig]:
    """(product rows, their logits and sampled MM-SHAP under the final models, its sampling policy)."""
    if cfg.folds == 1:
        return rows, oof, replace(cfg.mmshap, method="sampled")
    rng, policy = np.random.default_rng(cfg.seed), cfg.mmshap.audit()
    chosen = np.sort(rng.permutation(len(products))[: cfg.explainer_products])

    def compute():
        res = stack_inputs(infer(backend, [products[i] for i in chosen], policy, seed_key=f"train-seed-{cfg.seed}"))
        return {**res.logits, "t_shap": res.t_shap, "t_stderr": res.t_stderr, "game_text_share": res.game_text_share}

    a = work.mmshap_arrays(f"final-{len(chosen)}-audit", compute)
    has = {m: np.array([getattr(products[i], f"has_{m}") for i in chosen], bool) for m in ("text", "image")}
    return chosen, StackInputs({k: a[k] for k in KINDS}, a["t_shap"], has["text"], has["image"], a["t_stderr"],
                               a["game_text_share"]), policy


def explainer_inputs(backend, enc: Encoded, x: StackInputs, mmshap: MMShapConfig) -> np.ndarray:
    n_text, n_image = player_counts(backend, enc, mmshap.mode, mmshap.players)
    return features(x.logits, n_text, n_image)


def fit_bundle_explainer(inputs: np.ndarray, x: StackInputs, targets: MMShapConfig, seed: int) -> tuple[dict, dict]:
    """(weights, manifest entry). The entry records what the explainer predicts (the mode and players
    of its targets' policy, that policy) and its 5-fold cross-validated RMSE against the sampled
    targets, raw (their own sampling noise included) and net of that noise, as the audit reports it."""
    explainer = fit_explainer(inputs, x.t_shap, x.t_stderr, x.game_text_share, seed=seed)
    predicted = cross_validated(inputs, x.t_shap, x.t_stderr, x.game_text_share, seed=seed)
    error, n = rmse(predicted, x.t_shap)
    both = np.isfinite(predicted) & np.isfinite(x.t_shap)
    se = x.t_stderr[np.isfinite(x.t_shap) & np.isfinite(x.t_stderr)]
    meta = {"features_version": FEATURES_VERSION, "hidden": HIDDEN, "inputs": int(inputs.shape[1]),
            "n_train": n, "cv_rmse_vs_sampled": error, "targets_mean_stderr": float(se.mean()) if len(se) else None,
            "cv_rmse_net": rmse_net_of_noise(predicted[both] - x.t_shap[both], x.t_stderr[both]),
            "mode": targets.mode, "players": targets.players, "targets": targets.describe()}
    return explainer.state(), meta


def save_explainer(path, weights: dict) -> None:
    save_artifact(path, EXPLAINER, weights)
