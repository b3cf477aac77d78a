"""The stage functions every mode runs: infer (base logits + MM-SHAP) and stack (meta-model).

The embedded runner calls them in-process; the Celery tasks in workers/ call the very same
functions on batches they load from the database. Nothing here knows where products come from or
where results go.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.explain import Contributions, explain
from pipeline.records import Product
from pipeline.stacking import KINDS, StackInputs, Stacker


@dataclass
class Inferred:
    """A batch after the infer stage: what the stack stage and the database need."""

    logits: dict[str, np.ndarray]  # kind -> (B, K)
    contributions: Contributions
    has_text: np.ndarray
    has_image: np.ndarray

    def stack_inputs(self) -> StackInputs:
        return StackInputs(self.logits, self.contributions.t_shap, self.has_text, self.has_image)


def infer(backend, products: Sequence[Product], *, budget: int = 64, mode: str = "token", seed: int = 0,
          explain_chunk: int = 16) -> Inferred:
    """Base-model logits for a batch and, with budget > 0, sampled MM-SHAP of the multimodal model.

    Coalitions of explain_chunk products go to the model together (pixel mode copies the image per
    coalition, so the chunk bounds memory); budget 0 skips MM-SHAP and records T-SHAP 0.5.
    """
    enc = backend.encode(products)
    logits = backend.base_logits(enc)
    b = len(products)
    if budget > 0:
        predicted = logits["multimodal"].argmax(1)
        parts = [
            explain(backend, enc[i : i + explain_chunk], budget=budget, mode=mode, seed=seed + i,
                    predicted=predicted[i : i + explain_chunk])
            for i in range(0, b, explain_chunk)
        ]
        contrib = Contributions(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                                  ("t_shap", "v_shap", "n_evaluations", "stderr")))
    else:
        contrib = Contributions(np.full(b, 0.5), np.full(b, 0.5), np.zeros(b, int), np.zeros(b))
    return Inferred(logits, contrib, enc.has_text, enc.has_image)


def missing_modality(has_text: bool, has_image: bool) -> str | None:
    return None if has_text and has_image else ("image" if has_text else "text")


def stack(stacker: Stacker, inferred: Inferred, labels: Sequence[str]) -> list[dict]:
    """One prediction dict per product: category, confidence, each base model's own category."""
    proba = stacker.predict_proba(inferred.stack_inputs())
    best = proba.argmax(1)
    base = {k: inferred.logits[k].argmax(1) for k in KINDS}
    c = inferred.contributions
    return [
        {
            "category": labels[best[i]],
            "confidence": float(proba[i, best[i]]),
            "t_shap": float(c.t_shap[i]),
            "v_shap": float(c.v_shap[i]),
            "text_category": labels[base["text"][i]],
            "image_category": labels[base["image"][i]],
            "multimodal_category": labels[base["multimodal"][i]],
            "missing": missing_modality(bool(inferred.has_text[i]), bool(inferred.has_image[i])),
        }
        for i in range(len(best))
    ]

