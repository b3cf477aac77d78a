"""Resumable training: fold models and out-of-fold outputs saved under OUT/.work as they finish,
keyed by a hash of the data and settings, so that a rerun skips what is there.

Two keys: the models' (data, preset, seeds, checkpoints) names the folder, and the MM-SHAP
settings' names the arrays computed with MM-SHAP, so that a rerun with another MM-SHAP budget or
mode reuses the trained models and recomputes only the contributions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_model, save_model


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class WorkDir:
    """Checkpoints of fold models and out-of-fold outputs under OUT/.work, for resuming."""

    def __init__(self, root: Path, key: str, mmshap_key: str):
        self.dir = root / ".work" / key
        self.mmshap_key = mmshap_key
        self.dir.mkdir(parents=True, exist_ok=True)

    def model(self, name: str, build, train):
        path = self.dir / f"{name}.safetensors"
        stats_path = self.dir / f"{name}.json"
        model = build()
        if path.exists() and stats_path.exists():
            load_model(model, str(path))
            return model.eval(), json.loads(stats_path.read_text()) | {"resumed": True}
        model, stats = train()
        save_model(model, str(path))
        stats_path.write_text(json.dumps(stats))
        return model, stats

    def mmshap_arrays(self, name: str, compute) -> dict[str, np.ndarray]:
        """arrays() for outputs that depend on the MM-SHAP settings too."""
        return self.arrays(f"{name}-mmshap-{self.mmshap_key}", compute)

    def arrays(self, name: str, compute) -> dict[str, np.ndarray]:
        path = self.dir / f"{name}.npz"
        if path.exists():
            with np.load(path) as f:
                return dict(f)
        out = compute()
        np.savez(path, **out)
        return out
