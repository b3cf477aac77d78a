"""The stage functions every mode runs: infer (base logits + MM-SHAP) and stack (meta-model).

The embedded runner calls them in-process; the Celery tasks in workers/ call the very same
functions on batches they load from the database. Nothing here knows where products come from or
where results go.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.amortized import explain_amortized
from pipeline.mmshap import MMShapConfig, explain, product_seed
from pipeline.records import KINDS, Inferred, Product
from pipeline.stackers import StackInputs, Stacker


def infer(backend, products: Sequence[Product], config: MMShapConfig, seed_key: str) -> Inferred:
    """Base-model logits for a batch (the sparse text model's too) and the MM-SHAP of the multimodal model (pipeline.mmshap).

    Each product's sampling is seeded from (seed_key, its content), seed_key the bundle id, so its
    contributions do not depend on the batch it is in. The amortized method predicts them from the
    logits instead (pipeline.amortized), sampling only the audited products.
    """
    enc = backend.encode(products)
    logits = {**backend.base_logits(enc), **backend.sparse_logits(products)}
    seeds = np.array([product_seed(seed_key, p) for p in products], np.uint64)
    if config.method == "amortized" and not config.off:
        contrib = explain_amortized(backend, enc, config, seeds, logits)
    else:
        contrib = explain(backend, enc, config, seeds, predicted=logits["multimodal"].argmax(1))
    return Inferred(logits, contrib, enc.has_text, enc.has_image)


def stack_inputs(inferred: Inferred) -> StackInputs:
    """What a stacker sees of a batch; reliance fields a Contributions lacks are NULL (NaN)."""
    c = inferred.contributions
    nan = np.full(len(c.t_shap), np.nan)
    return StackInputs(inferred.logits, c.t_shap, inferred.has_text, inferred.has_image,
                       getattr(c, "stderr", nan), getattr(c, "game_text_share", nan))


def missing_modality(has_text: bool, has_image: bool) -> str | None:
    return None if has_text and has_image else ("image" if has_text else "text")


def stack(stacker: Stacker, inferred: Inferred, labels: Sequence[str]) -> list[dict]:
    """One prediction dict per product: category, confidence, each base model's own category."""
    proba = stacker.predict_proba(stack_inputs(inferred))
    best = proba.argmax(1)
    base = {k: inferred.logits[k].argmax(1) for k in KINDS}
    c = inferred.contributions
    return [
        {
            "category": labels[best[i]],
            "confidence": float(proba[i, best[i]]),
            "t_shap": c.row(i)["t_shap"],
            "v_shap": c.row(i)["v_shap"],
            "text_category": labels[base["text"][i]],
            "image_category": labels[base["image"][i]],
            "multimodal_category": labels[base["multimodal"][i]],
            "missing": missing_modality(bool(inferred.has_text[i]), bool(inferred.has_image[i])),
        }
        for i in range(len(best))
    ]

