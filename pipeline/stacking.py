"""Stackers: turn the three base models' outputs (and MM-SHAP) into one category.

Every stacker is fitted on out-of-fold base-model outputs only (see train/crossfit.py): a stacker
that saw outputs on products its base models were trained on would learn to trust over-confident
training-set logits.

- text, image, multimodal: one base model alone (baselines)
- mean: mean of the three probability vectors (baseline, nothing fitted)
- ffn: unweighted stacking, feed-forward 3K -> hidden -> K on the concatenated logits
- mmshap-paper: Obayemi & Nguyen as published: base logits scaled by dataset-level MM-SHAP
  weights (text model by mean T-SHAP, image model by mean V-SHAP, multimodal by 1), FFN
  3K -> 512 -> K, cross-entropy, plain SGD at lr 1e-4
- mmshap: ours. Per-product MM-SHAP gates instead of one dataset-level weight, so a product on
  which the multimodal model ignored its image hands the image model a larger say: inputs are the
  three log-probability vectors, each unimodal one also multiplied by the share of its modality
  the multimodal model did NOT use (V-SHAP for text, T-SHAP for image), plus T-SHAP itself and
  missing-modality flags; multinomial logistic regression with L2, fitted by L-BFGS (convex, so
  deterministic and well-behaved on the few thousand out-of-fold rows a catalogue gives)
- lightgbm: the SIGIR eCom'20 late fusion: LightGBM on the three probability vectors; its
  per-feature SHAP contributions (LightGBM's pred_contrib) say which base model drove a decision
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

KINDS = ("text", "image", "multimodal")


@dataclass
class StackInputs:
    """Base-model logits (n, K) per kind, T-SHAP per product, and which modality is missing."""

    logits: dict[str, np.ndarray]
    t_shap: np.ndarray
    has_text: np.ndarray | None = None
    has_image: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.t_shap)
        self.has_text = np.ones(n, bool) if self.has_text is None else np.asarray(self.has_text, bool)
        self.has_image = np.ones(n, bool) if self.has_image is None else np.asarray(self.has_image, bool)

    def __len__(self) -> int:
        return len(self.t_shap)

    def subset(self, idx: np.ndarray) -> "StackInputs":
        return StackInputs({k: v[idx] for k, v in self.logits.items()}, self.t_shap[idx],
                           self.has_text[idx], self.has_image[idx])


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(z))


class Stacker:
    name = "base"
    fitted_on = 0

    def fit(self, x: StackInputs, y: np.ndarray, *, seed: int = 0) -> "Stacker":
        self.fitted_on = len(y)
        return self

    def predict_proba(self, x: StackInputs) -> np.ndarray:
        raise NotImplementedError

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Weights as named arrays (stored as safetensors) and plain metadata (stored as JSON)."""
        return {}, {}

    def load_state(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> "Stacker":
        return self


class Single(Stacker):
    def __init__(self, kind: str):
        self.kind = self.name = kind

    def predict_proba(self, x: StackInputs) -> np.ndarray:
        return softmax(x.logits[self.kind])


class Mean(Stacker):
    name = "mean"

    def predict_proba(self, x: StackInputs) -> np.ndarray:
        return np.mean([softmax(x.logits[k]) for k in KINDS], axis=0)


def _train_torch(model: nn.Module, feats: np.ndarray, y: np.ndarray, *, optimiser: str, lr: float,
                 epochs: int, batch_size: int, weight_decay: float, seed: int) -> None:
    torch.manual_seed(seed)
    xs = torch.as_tensor(feats, dtype=torch.float32)
    ys = torch.as_tensor(y, dtype=torch.long)
    if optimiser == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xs), generator=gen).split(batch_size):
            loss = nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


class FFN(Stacker):
    """Feed-forward meta-model over (optionally weighted) concatenated base logits."""

    def __init__(self, name: str = "ffn", *, hidden: int = 512, optimiser: str = "adamw", lr: float = 1e-3,
                 epochs: int = 60, batch_size: int = 64, weight_decay: float = 1e-4, mmshap_weights: bool = False):
        self.name = name
        self.cfg = dict(hidden=hidden, optimiser=optimiser, lr=lr, epochs=epochs, batch_size=batch_size,
                        weight_decay=weight_decay, mmshap_weights=mmshap_weights)
        self.weights = np.ones(3, np.float32)
        self.net: nn.Module | None = None

    def _build(self, k: int) -> nn.Module:
        return nn.Sequential(nn.Linear(3 * k, self.cfg["hidden"]), nn.ReLU(), nn.Linear(self.cfg["hidden"], k))

    def _features(self, x: StackInputs) -> np.ndarray:
        return np.concatenate([w * x.logits[k] for w, k in zip(self.weights, KINDS)], axis=1).astype(np.float32)

    def fit(self, x: StackInputs, y: np.ndarray, *, seed: int = 0) -> "FFN":
        if self.cfg["mmshap_weights"]:
            t = float(np.mean(x.t_shap))
            self.weights = np.array([t, 1.0 - t, 1.0], np.float32)
        k = x.logits["text"].shape[1]
        torch.manual_seed(seed)
        self.net = self._build(k)
        c = self.cfg
        _train_torch(self.net, self._features(x), y, optimiser=c["optimiser"], lr=c["lr"], epochs=c["epochs"],
                     batch_size=c["batch_size"], weight_decay=c["weight_decay"], seed=seed)
        return super().fit(x, y)

    @torch.inference_mode()
    def predict_proba(self, x: StackInputs) -> np.ndarray:
        return torch.softmax(self.net(torch.as_tensor(self._features(x))), dim=1).numpy()

    def state(self):
        tensors = {k: v.detach().cpu().numpy() for k, v in self.net.state_dict().items()}
        return {**tensors, "mmshap_weights": self.weights}, {"cfg": self.cfg, "k": int(tensors["2.bias"].shape[0])}

    def load_state(self, tensors, meta):
        self.cfg = meta["cfg"]
        self.weights = np.asarray(tensors.pop("mmshap_weights"), np.float32)
        self.net = self._build(meta["k"])
        self.net.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()})
        self.net.eval()
        return self


class MMShapGated(Stacker):
    """Our default; see the module docstring for why per-product gates and a convex fit."""

    name = "mmshap"

    def __init__(self, l2: float = 1e-3, max_iter: int = 300):
        self.l2, self.max_iter = l2, max_iter
        self.w: np.ndarray | None = None
        self.mu: np.ndarray | None = None
        self.sd: np.ndarray | None = None

    @staticmethod
    def features(x: StackInputs) -> np.ndarray:
        lp = {k: log_softmax(x.logits[k]) for k in KINDS}
        t = x.t_shap[:, None].astype(np.float64)
        return np.concatenate(
            [lp["text"], lp["image"], lp["multimodal"], (1 - t) * lp["text"], t * lp["image"], t,
             x.has_text[:, None].astype(np.float64), x.has_image[:, None].astype(np.float64)],
            axis=1,
        )

    def _design(self, x: StackInputs) -> np.ndarray:
        f = (self.features(x) - self.mu) / self.sd
        return np.concatenate([f, np.ones((len(f), 1))], axis=1)

    def fit(self, x: StackInputs, y: np.ndarray, *, seed: int = 0) -> "MMShapGated":
        f = self.features(x)
        self.mu, self.sd = f.mean(0), f.std(0) + 1e-6
        xd = torch.as_tensor(self._design(x))
        yt = torch.as_tensor(y, dtype=torch.long)
        k = x.logits["text"].shape[1]
        w = torch.zeros(xd.shape[1], k, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(xd @ w, yt) + self.l2 * (w[:-1] ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.w = w.detach().numpy()
        return super().fit(x, y)

    def predict_proba(self, x: StackInputs) -> np.ndarray:
        return softmax(self._design(x) @ self.w)

    def state(self):
        return {"w": self.w, "mu": self.mu, "sd": self.sd}, {"l2": self.l2}

    def load_state(self, tensors, meta):
        self.w, self.mu, self.sd, self.l2 = tensors["w"], tensors["mu"], tensors["sd"], meta["l2"]
        return self


class LightGBMFusion(Stacker):
    """Late fusion of the SIGIR eCom'20 paper: gradient-boosted trees on base-model probabilities."""

    name = "lightgbm"

    def __init__(self, n_estimators: int = 200, learning_rate: float = 0.05, num_leaves: int = 15):
        self.params = dict(n_estimators=n_estimators, learning_rate=learning_rate, num_leaves=num_leaves)
        self.booster = None
        self.classes: np.ndarray | None = None
        self.k = 0

    @staticmethod
    def features(x: StackInputs) -> np.ndarray:
        return np.concatenate([softmax(x.logits[k]) for k in KINDS], axis=1)

    def fit(self, x: StackInputs, y: np.ndarray, *, seed: int = 0) -> "LightGBMFusion":
        import lightgbm as lgb

        self.k = x.logits["text"].shape[1]
        self.classes = np.unique(y)
        model = lgb.LGBMClassifier(**self.params, min_child_samples=5, subsample=0.8, subsample_freq=1,
                                   colsample_bytree=0.8, random_state=seed, n_jobs=2, verbose=-1)
        model.fit(self.features(x), y)
        self.booster = model.booster_
        return super().fit(x, y)

    def _expand(self, p: np.ndarray) -> np.ndarray:
        """LightGBM only knows the classes it saw; give the others probability 0."""
        out = np.zeros((len(p), self.k))
        out[:, self.classes] = p if p.ndim == 2 else np.stack([1 - p, p], 1)
        return out

    def predict_proba(self, x: StackInputs) -> np.ndarray:
        return self._expand(self.booster.predict(self.features(x)))

    def model_contributions(self, x: StackInputs) -> np.ndarray:
        """(n, 3): the summed |SHAP| of each base model's inputs for the predicted class."""
        f = self.features(x)
        contrib = self.booster.predict(f, pred_contrib=True)  # (n, n_cls * (3K + 1))
        n_cls = len(self.classes)
        contrib = contrib.reshape(len(f), n_cls, -1)[:, :, :-1] if n_cls > 2 else contrib[:, None, :-1]
        pred = self.booster.predict(f)
        cls = pred.argmax(1) if n_cls > 2 else np.zeros(len(f), int)
        c = np.abs(contrib[np.arange(len(f)), cls]).reshape(len(f), 3, self.k).sum(2)
        return c / np.maximum(c.sum(1, keepdims=True), 1e-12)

    def state(self):
        return {"classes": self.classes}, {"model": self.booster.model_to_string(), "k": self.k, "params": self.params}

    def load_state(self, tensors, meta):
        import lightgbm as lgb

        self.classes, self.k, self.params = tensors["classes"], meta["k"], meta["params"]
        self.booster = lgb.Booster(model_str=meta["model"])
        return self


def make_stacker(name: str) -> Stacker:
    if name in KINDS:
        return Single(name)
    factories = {
        "mean": Mean,
        "ffn": lambda: FFN("ffn"),
        "mmshap-paper": lambda: FFN("mmshap-paper", hidden=512, optimiser="sgd", lr=1e-4, epochs=60,
                                    weight_decay=0.0, mmshap_weights=True),
        "mmshap": MMShapGated,
        "lightgbm": LightGBMFusion,
    }
    if name not in factories:
        raise ValueError(f"unknown stacker {name!r} (choose from {', '.join(STACKERS)})")
    return factories[name]()


STACKERS = ("mmshap", "mmshap-paper", "lightgbm", "ffn", "mean", *KINDS)


def fit_stackers(x: StackInputs, y: np.ndarray, names=STACKERS, *, seed: int = 0) -> dict[str, Stacker]:
    return {name: make_stacker(name).fit(x, y, seed=seed) for name in names}


def save_state(stacker: Stacker) -> tuple[dict[str, np.ndarray], str]:
    tensors, meta = stacker.state()
    return tensors, json.dumps({"name": stacker.name, "fitted_on": stacker.fitted_on, **meta})


def load_state(tensors: dict[str, np.ndarray], meta_json: str) -> Stacker:
    meta = json.loads(meta_json)
    stacker = make_stacker(meta["name"]).load_state(dict(tensors), meta)
    stacker.fitted_on = meta.get("fitted_on", 0)
    return stacker


def save_stackers(bundle_path, stackers: dict[str, Stacker]) -> None:
    """Into a bundle: weights as safetensors artefacts, the rest in one JSON artefact."""
    from pipeline.bundle import save_artifact

    metas = {}
    for name, s in stackers.items():
        tensors, metas[name] = save_state(s)
        if tensors:
            save_artifact(bundle_path, f"stacker-{name}", tensors)
    save_artifact(bundle_path, "stackers", metas)


def load_stackers(bundle_path, names=None) -> dict[str, Stacker]:
    from pipeline.bundle import load_artifact, read_manifest

    artefacts = read_manifest(bundle_path)["artifacts"]
    if "stackers" not in artefacts:
        return {}
    out = {}
    for name, meta in load_artifact(bundle_path, "stackers").items():
        if names is None or name in names:
            tensors = load_artifact(bundle_path, f"stacker-{name}") if f"stacker-{name}" in artefacts else {}
            out[name] = load_state({k: v.numpy() for k, v in tensors.items()}, meta)
    return out
