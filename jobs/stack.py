"""Stack a batch: the meta-model's predictions from stored base logits and contributions."""

from __future__ import annotations

from typing import Sequence

from db.products import set_status
from db.results import load_inferred, runs_of, save_predictions
from pipeline.inference import stack
from pipeline.manifest import base_kinds


def stack_batch(factory, stacker, manifest: dict, model_version: str, pks: Sequence[int]) -> int:
    """Predictions for products pks from their stored logits (of every base model of the bundle
    whose manifest is given); marks them done."""
    with factory() as s:
        ready, inferred = load_inferred(s, model_version, pks, base_kinds(manifest))
        run_of = runs_of(s, ready)
    if not ready:
        return 0
    preds = stack(stacker, inferred, manifest["labels"])
    rows = [{"product_pk": pk, "run_id": run_of[pk], **{k: v for k, v in p.items() if k not in ("t_shap", "v_shap")}}
            for pk, p in zip(ready, preds)]
    with factory() as s, s.begin():
        save_predictions(s, rows, model_version, stacker.name)
        set_status(s, ready, "done")
    return len(ready)
