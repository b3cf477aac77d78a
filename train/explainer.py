"""Fitting the bundle's MM-SHAP explainer (amortized MM-SHAP, pipeline.amortized).

The explainer must learn the T-SHAP of the models it will explain: the bundle's final models. With
--folds 1 they are the fold models, and the held-out products' sampled MM-SHAP (what the stackers
learn from) are its targets, out of sample. With K > 1 folds the final models are retrained on
every product and rely on the modalities differently from the fold models (measured in
docs/amortized.md: the fold models' out-of-fold T-SHAP is no target for them), so the final models'
sampled MM-SHAP of up to cfg.explainer_products training products is computed for it (cached
like the folds): that is the explainer's training cost.
"""

from __future__ import annotations

import numpy as np

from pipeline.amortized import HIDDEN, FEATURES_VERSION, cross_validated, features, fit_explainer, player_counts, rmse
from pipeline.bundle import save_artifact
from pipeline.inference import infer, stack_inputs
from pipeline.mmshap import EXPLAINER, MMShapConfig
from pipeline.preprocess import Encoded
from pipeline.records import KINDS
from pipeline.stackers import StackInputs

MIN_TARGETS = 10  # products with a sampled T-SHAP below which no explainer is fitted


def explainer_targets(work, backend, products: list, rows: np.ndarray, oof: StackInputs, cfg) -> tuple[np.ndarray, StackInputs]:
    """(product rows, their logits and sampled MM-SHAP under the final models)."""
    if cfg.folds == 1:
        return rows, oof
    rng = np.random.default_rng(cfg.seed)
    chosen = np.sort(rng.permutation(len(products))[: cfg.explainer_products])

    def compute():
        res = stack_inputs(infer(backend, [products[i] for i in chosen], cfg.mmshap, seed_key=f"train-seed-{cfg.seed}"))
        return {**res.logits, "t_shap": res.t_shap, "t_stderr": res.t_stderr, "game_text_share": res.game_text_share}

    a = work.mmshap_arrays(f"final-{len(chosen)}", compute)
    return chosen, StackInputs({k: a[k] for k in KINDS}, a["t_shap"], None, None, a["t_stderr"], a["game_text_share"])


def explainer_inputs(backend, enc: Encoded, x: StackInputs, mmshap: MMShapConfig) -> np.ndarray:
    n_text, n_image = player_counts(backend, enc, mmshap.mode, mmshap.players)
    return features(x.logits, n_text, n_image)


def fit_bundle_explainer(inputs: np.ndarray, x: StackInputs, mmshap: MMShapConfig, seed: int) -> tuple[dict, dict]:
    """(weights, manifest entry). The entry records what the explainer predicts (mode, players,
    target policy) and its 5-fold cross-validated RMSE against the sampled targets (which include
    their own sampling noise, mean stderr beside it)."""
    explainer = fit_explainer(inputs, x.t_shap, x.t_stderr, x.game_text_share, seed=seed)
    error, n = rmse(cross_validated(inputs, x.t_shap, x.t_stderr, x.game_text_share, seed=seed), x.t_shap)
    se = x.t_stderr[np.isfinite(x.t_shap) & np.isfinite(x.t_stderr)]
    meta = {"features_version": FEATURES_VERSION, "hidden": HIDDEN, "inputs": int(inputs.shape[1]),
            "n_train": n, "cv_rmse_vs_sampled": error, "targets_mean_stderr": float(se.mean()) if len(se) else None,
            "mode": mmshap.mode, "players": mmshap.players,
            "targets": MMShapConfig(**{**mmshap.__dict__, "method": "sampled"}).describe()}
    return explainer.state(), meta


def save_explainer(path, weights: dict) -> None:
    save_artifact(path, EXPLAINER, weights)
