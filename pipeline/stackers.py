"""Stackers: turn the base models' outputs (and MM-SHAP) into one category.

Every stacker is fitted on out-of-fold base-model outputs only (see train/crossfit.py): a stacker
that saw outputs on products its base models were trained on would learn to trust over-confident
training-set logits. Stackers are generic over the base models present (StackInputs.logits: text,
image, multimodal, and any further kind such as a sparse text model); L is their number.

- text, image, multimodal: one base model alone (baselines)
- mean: mean of the L probability vectors (baseline, nothing fitted)
- ffn: unweighted stacking, feed-forward LK -> 512 -> K on the concatenated logits (AdamW)
- mmshap-paper: Obayemi & Nguyen as published (docs/stacking.md says which reading): weights w_l
  from dataset-level MM-SHAP, the meta FFN LK -> 512 -> K on the weighted logits [w_l z_l],
  cross-entropy, SGD lr 1e-4, 50,000 full-batch epochs; mmshap-paper-es: the same, stopped early
  on a held-out tenth; mmshap-paper-sum: the bare weighted combination z_hat = sum_l w_l z_l
- mmshap: ours. Class-tied gates over the base models' log-probabilities,
  z_k(x) = sum_l g_l(x) log p_lk(x) + b_k,  g_l(x) = softplus(a_l + c_l . r(x)),
  r(x) = [T-SHAP (imputed), T-SHAP is NULL, its standard error, the two-player game's text share,
  missing text, missing image]: L(1 + 6) + K parameters, fitted by L-BFGS with L2 on c.
  Ablations: mmshap-no-<group> drops one reliance group, mmshap-pool drops them all (a plain
  gated log-linear pool)
- lightgbm: the SIGIR eCom'20 late fusion: LightGBM on the L probability vectors; its
  per-feature SHAP contributions (LightGBM's pred_contrib) say which base model drove a decision
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.bundle import load_artifact, read_manifest, save_artifact
from pipeline.errors import UserError
from pipeline.manifest import KINDS, ordered_kinds

NAN = float("nan")


def _column(v, n: int, fill: float = NAN) -> np.ndarray:
    return np.full(n, fill) if v is None else np.asarray(v, np.float64).reshape(n)


@dataclass
class StackInputs:
    """What a stacker sees per product: base-model logits (n, K) per kind, and reliance.

    t_shap, t_stderr, game_text_share may be NaN (NULL: not estimated, or a modality missing);
    has_text / has_image say which modalities the product has.
    """

    logits: dict[str, np.ndarray]
    t_shap: np.ndarray
    has_text: np.ndarray | None = None
    has_image: np.ndarray | None = None
    t_stderr: np.ndarray | None = None
    game_text_share: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(next(iter(self.logits.values())))
        self.t_shap = _column(self.t_shap, n)
        self.t_stderr = _column(self.t_stderr, n)
        self.game_text_share = _column(self.game_text_share, n)
        self.has_text = np.ones(n, bool) if self.has_text is None else np.asarray(self.has_text, bool)
        self.has_image = np.ones(n, bool) if self.has_image is None else np.asarray(self.has_image, bool)

    def __len__(self) -> int:
        return len(self.t_shap)

    @property
    def kinds(self) -> list[str]:
        """The base models present, in the order stackers use (pipeline.manifest.ordered_kinds)."""
        return ordered_kinds(self.logits)

    @property
    def n_classes(self) -> int:
        return next(iter(self.logits.values())).shape[1]

    def subset(self, idx: np.ndarray) -> "StackInputs":
        return StackInputs({k: v[idx] for k, v in self.logits.items()}, self.t_shap[idx], self.has_text[idx],
                           self.has_image[idx], self.t_stderr[idx], self.game_text_share[idx])


def modality_of(kind: str) -> str | None:
    """The modality a base model reads: text, image, or None for a model that reads both."""
    if kind == "multimodal" or "fusion" in kind:
        return None
    return "image" if "image" in kind else "text"


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(z))


# reliance inputs of the gates, in groups that the ablations remove one at a time
RELIANCE_GROUPS = {
    "tshap": ("t_shap", "t_null"),
    "stderr": ("t_stderr",),
    "game": ("game_text_share",),
    "missing": ("no_text", "no_image"),
}


def reliance(x: StackInputs) -> dict[str, np.ndarray]:
    """Raw reliance columns, NaN where not defined: T-SHAP only for products with both modalities."""
    both = x.has_text & x.has_image
    t = np.where(both, x.t_shap, NAN)
    return {
        "t_shap": t,
        "t_null": (both & ~np.isfinite(t)).astype(np.float64),
        "t_stderr": np.where(np.isfinite(t) & np.isfinite(x.t_stderr), x.t_stderr, NAN),  # an infinite error bar: none
        "game_text_share": np.where(both, x.game_text_share, NAN),
        "no_text": (~x.has_text).astype(np.float64),
        "no_image": (~x.has_image).astype(np.float64),
    }


def mean_t_shap(x: StackInputs) -> float:
    """Dataset-level T-SHAP of the multimodal model, NULLs (and missing modalities) left out."""
    t = reliance(x)["t_shap"]
    return float(np.nanmean(t)) if np.isfinite(t).any() else 0.5


class Stacker:
    name = "base"
    fitted_on = 0
    fit_s = 0.0

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
        return np.mean([softmax(x.logits[k]) for k in x.kinds], axis=0)


def paper_weights(x: StackInputs, kinds: list[str]) -> np.ndarray:
    """w_l from dataset-level MM-SHAP: the multimodal model speaks with weight 1, each unimodal model
    with the share of its modality that the multimodal model did NOT use (text model 1 - T-SHAP,
    image model T-SHAP), so the modality the multimodal model neglects gets the larger say."""
    t = mean_t_shap(x)
    share = {"text": 1.0 - t, "image": t, None: 1.0}
    return np.array([share[modality_of(k)] for k in kinds], np.float32)


def _minibatch_train(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, *, lr: float, epochs: int,
                     batch_size: int, weight_decay: float, seed: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xs), generator=gen).split(batch_size):
            loss = nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def _full_batch_sgd(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, *, lr: float, epochs: int,
                    val: tuple[torch.Tensor, torch.Tensor] | None = None, check_every: int = 250,
                    patience: int = 20) -> int:
    """Plain SGD on the whole set per step; with val, keep the best validation loss and stop after
    `patience` checks without improvement. Returns the epochs run."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def val_loss() -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(val[0]), val[1]))

    best, best_state, since = (val_loss(), copy.deepcopy(model.state_dict()), 0) if val is not None else (0, None, 0)
    epoch = 0
    for epoch in range(1, epochs + 1):
        loss = nn.functional.cross_entropy(model(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if val is not None and (epoch % check_every == 0 or epoch == epochs):
            v = val_loss()
            if v < best - 1e-6:
                best, best_state, since = v, copy.deepcopy(model.state_dict()), 0
            else:
                since += 1
                if since >= patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    return epoch


class FFN(Stacker):
    """Feed-forward meta-model LK -> hidden -> K over (optionally MM-SHAP-weighted) concatenated logits.

    optimiser "adamw": mini-batches (our unweighted baseline); "sgd-full": the paper's plain SGD,
    one full-batch step per epoch (vectorised: 50,000 epochs take minutes on a CPU), with
    early_stopping a tenth of the products held out to pick the epoch.
    """

    def __init__(self, name: str = "ffn", *, hidden: int = 512, optimiser: str = "adamw", lr: float = 1e-3,
                 epochs: int = 60, batch_size: int = 64, weight_decay: float = 1e-4, mmshap_weights: bool = False,
                 early_stopping: bool = False, check_every: int = 250, patience: int = 20):
        self.name = name
        self.cfg = dict(hidden=hidden, optimiser=optimiser, lr=lr, epochs=epochs, batch_size=batch_size,
                        weight_decay=weight_decay, mmshap_weights=mmshap_weights, early_stopping=early_stopping,
                        check_every=check_every, patience=patience)
        self.kinds: list[str] = list(KINDS)
        self.weights = np.ones(len(self.kinds), np.float32)
        self.epochs_run = 0
        self.net: nn.Module | None = None

    def _build(self, k: int) -> nn.Module:
        return nn.Sequential(nn.Linear(len(self.kinds) * k, self.cfg["hidden"]), nn.ReLU(),
                             nn.Linear(self.cfg["hidden"], k))

    def _features(self, x: StackInputs) -> torch.Tensor:
        f = np.concatenate([w * x.logits[k] for w, k in zip(self.weights, self.kinds)], axis=1)
        return torch.as_tensor(f, dtype=torch.float32)

    def fit(self, x: StackInputs, y: np.ndarray, *, seed: int = 0) -> "FFN":
        c = self.cfg
        self.kinds = x.kinds
        self.weights = paper_weights(x, self.kinds) if c["mmshap_weights"] else np.ones(len(self.kinds), np.float32)
        torch.manual_seed(seed)
        self.net = self._build(x.n_classes)
        xs, ys = self._features(x), torch.as_tensor(y, dtype=torch.long)
        self.net.train()
        if c["optimiser"] == "sgd-full":
            val = None
            if c["early_stopping"]:
                order = np.random.default_rng(seed).permutation(len(y))
                n_val = max(1, len(y) // 10)
                val = (xs[order[:n_val]], ys[order[:n_val]])
                xs, ys = xs[order[n_val:]], ys[order[n_val:]]
            self.epochs_run = _full_batch_sgd(self.net, xs, ys, lr=c["lr"], epochs=c["epochs"], val=val,
                                              check_every=c["check_every"], patience=c["patience"])
        else:
            _minibatch_train(self.net, xs, ys, lr=c["lr"], epochs=c["epochs"], batch_size=c["batch_size"],
                             weight_decay=c["weight_decay"], seed=seed)
            self.epochs_run = c["epochs"]
        self.net.eval()
        return super().fit(x, y)

    @torch.inference_mode()
    def predict_proba(self, x: StackInputs) -> np.ndarray:
        return torch.softmax(self.net(self._features(x)), dim=1).numpy()

    def state(self):
        tensors = {k: v.detach().cpu().numpy() for k, v in self.net.state_dict().items()}
        meta = {"cfg": self.cfg, "k": int(tensors["2.bias"].shape[0]), "kinds": self.kinds,
                "epochs_run": self.epochs_run}
        return {**tensors, "mmshap_weights": self.weights}, meta

    def load_state(self, tensors, meta):
        self.cfg, self.kinds, self.epochs_run = meta["cfg"], meta["kinds"], meta.get("epochs_run", 0)
        self.weights = np.asarray(tensors.pop("mmshap_weights"), np.float32)
        self.net = self._build(meta["k"])
        self.net.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()})
        self.net.eval()
        return self


class WeightedSum(Stacker):
    """The paper's weighted combination on its own: z_hat = sum_l w_l z_l, y_hat = argmax softmax(z_hat)."""

    name = "mmshap-paper-sum"

    def __init__(self):
        self.kinds: list[str] = list(KINDS)
        self.weights = np.ones(len(self.kinds), np.float32)

    def fit(self, x: StackInputs, y: np.ndarray, *, seed: int = 0) -> "WeightedSum":
        self.kinds = x.kinds
        self.weights = paper_weights(x, self.kinds)
        return super().fit(x, y)

    def predict_proba(self, x: StackInputs) -> np.ndarray:
        return softmax(sum(w * x.logits[k] for w, k in zip(self.weights, self.kinds)))

    def state(self):
        return {"weights": self.weights}, {"kinds": self.kinds}

    def load_state(self, tensors, meta):
        self.weights, self.kinds = np.asarray(tensors["weights"], np.float32), meta["kinds"]
        return self


SOFTPLUS_ONE = float(np.log(np.expm1(1.0)))  # softplus(SOFTPLUS_ONE) = 1: gates start as a plain product of experts


class GatedPool(Stacker):
    """Class-tied gates over the base models' log-probabilities, driven by per-product reliance.

    z_k(x) = sum_l g_l(x) log p_lk(x) + b_k, g_l(x) = softplus(a_l + c_l . r(x)); r(x) standardised,
    NULL entries imputed with the training mean (0 after standardising) beside their NULL flags.
    Few parameters (L(1 + |r|) + K), so a few thousand out-of-fold products fit it without
    overfitting; L-BFGS in float64 from g = 1 is deterministic.
    """

    def __init__(self, name: str = "mmshap", groups: tuple[str, ...] = tuple(RELIANCE_GROUPS), l2: float = 1e-2,
                 max_iter: int = 200):
        self.name, self.groups, self.l2, self.max_iter = name, tuple(groups), l2, max_iter
        self.columns = [c for g in self.groups for c in RELIANCE_GROUPS[g]]
        self.kinds: list[str] = list(KINDS)
        self.mu = np.zeros(len(self.columns))
        self.sd = np.ones(len(self.columns))
        self.a = np.full(len(self.kinds), SOFTPLUS_ONE)
        self.c = np.zeros((len(self.kinds), len(self.columns)))
        self.b = np.zeros(0)

    def _r(self, x: StackInputs) -> np.ndarray:
        cols = reliance(x)
        r = np.stack([cols[c] for c in self.columns], 1) if self.columns else np.zeros((len(x), 0))
        r = (r - self.mu) / self.sd
        return np.where(np.isfinite(r), r, 0.0)

    def _logp(self, x: StackInputs) -> np.ndarray:
        return np.stack([log_softmax(np.asarray(x.logits[k], np.float64)) for k in self.kinds], 1)  # (n, L, K)

    def gates(self, x: StackInputs) -> np.ndarray:
        """(n, L): each base model's weight per product."""
        return np.logaddexp(0.0, self.a + self._r(x) @ self.c.T)

    def fit(self, x: StackInputs, y: np.ndarray, *, seed: int = 0) -> "GatedPool":
        self.kinds = x.kinds
        cols = reliance(x)
        raw = np.stack([cols[c] for c in self.columns], 1) if self.columns else np.zeros((len(x), 0))
        finite = np.isfinite(raw)
        count = finite.sum(0)
        self.mu = np.where(count > 0, np.nansum(np.where(finite, raw, 0), 0) / np.maximum(count, 1), 0.0)
        var = np.where(finite, (raw - self.mu) ** 2, 0).sum(0) / np.maximum(count, 1)
        self.sd = np.where(var > 1e-12, np.sqrt(var), 1.0)
        r = torch.as_tensor(self._r(x))
        lp = torch.as_tensor(self._logp(x))
        yt = torch.as_tensor(y, dtype=torch.long)
        n_kinds, k = len(self.kinds), x.n_classes
        a = torch.full((n_kinds,), SOFTPLUS_ONE, dtype=torch.float64, requires_grad=True)
        c = torch.zeros((n_kinds, len(self.columns)), dtype=torch.float64, requires_grad=True)
        b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([a, c, b], max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            g = nn.functional.softplus(a + r @ c.T)  # (n, L)
            z = (g[:, :, None] * lp).sum(1) + b
            loss = nn.functional.cross_entropy(z, yt) + self.l2 * (c**2).sum() + 1e-4 * (b**2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.a, self.c, self.b = (t.detach().numpy().copy() for t in (a, c, b))
        return super().fit(x, y)

    def predict_proba(self, x: StackInputs) -> np.ndarray:
        return softmax((self.gates(x)[:, :, None] * self._logp(x)).sum(1) + self.b)

    def state(self):
        return ({"a": self.a, "c": self.c, "b": self.b, "mu": self.mu, "sd": self.sd},
                {"groups": list(self.groups), "l2": self.l2, "kinds": self.kinds})

    def load_state(self, tensors, meta):
        self.l2, self.kinds = meta["l2"], meta["kinds"]
        self.a, self.c, self.b, self.mu, self.sd = (np.asarray(tensors[n], np.float64) for n in ("a", "c", "b", "mu", "sd"))
        self.c = self.c.reshape(len(self.kinds), len(self.columns))
        return self


class LightGBMFusion(Stacker):
    """Late fusion of the SIGIR eCom'20 paper: gradient-boosted trees on base-model probabilities."""

    name = "lightgbm"

    def __init__(self, n_estimators: int = 200, learning_rate: float = 0.05, num_leaves: int = 15):
        self.params = dict(n_estimators=n_estimators, learning_rate=learning_rate, num_leaves=num_leaves)
        self.booster = None
        self.classes: np.ndarray | None = None
        self.kinds: list[str] = list(KINDS)
        self.k = 0

    def features(self, x: StackInputs) -> np.ndarray:
        return np.concatenate([softmax(x.logits[k]) for k in self.kinds], axis=1)

    def fit(self, x: StackInputs, y: np.ndarray, *, seed: int = 0) -> "LightGBMFusion":
        import lightgbm as lgb

        self.kinds, self.k = x.kinds, x.n_classes
        self.classes = np.unique(y)
        model = lgb.LGBMClassifier(**self.params, min_child_samples=5, subsample=0.8, subsample_freq=1,
                                   colsample_bytree=0.8, random_state=seed, n_jobs=1, verbose=-1)
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
        """(n, L): the summed |SHAP| of each base model's inputs for the predicted class."""
        f = self.features(x)
        contrib = self.booster.predict(f, pred_contrib=True)  # (n, n_cls * (LK + 1))
        n_cls = len(self.classes)
        contrib = contrib.reshape(len(f), n_cls, -1)[:, :, :-1] if n_cls > 2 else contrib[:, None, :-1]
        pred = self.booster.predict(f)
        cls = pred.argmax(1) if n_cls > 2 else np.zeros(len(f), int)
        c = np.abs(contrib[np.arange(len(f)), cls]).reshape(len(f), len(self.kinds), self.k).sum(2)
        return c / np.maximum(c.sum(1, keepdims=True), 1e-12)

    def state(self):
        return {"classes": self.classes}, {"model": self.booster.model_to_string(), "k": self.k,
                                           "params": self.params, "kinds": self.kinds}

    def load_state(self, tensors, meta):
        import lightgbm as lgb

        self.classes, self.k, self.params = tensors["classes"], meta["k"], meta["params"]
        self.kinds = meta.get("kinds", list(KINDS))
        self.booster = lgb.Booster(model_str=meta["model"])
        return self


PAPER_EPOCHS = 50_000  # the paper's Table I


def make_stacker(name: str, *, paper_epochs: int = PAPER_EPOCHS) -> Stacker:
    """A new, unfitted stacker by name (those in UNFITTED need no fit)."""
    if name in KINDS:
        return Single(name)
    paper = dict(hidden=512, optimiser="sgd-full", lr=1e-4, epochs=paper_epochs, mmshap_weights=True)
    factories = {
        "mmshap": lambda: GatedPool("mmshap"),
        **{f"mmshap-no-{g}": (lambda g=g: GatedPool(f"mmshap-no-{g}", tuple(x for x in RELIANCE_GROUPS if x != g)))
           for g in RELIANCE_GROUPS},
        "mmshap-pool": lambda: GatedPool("mmshap-pool", ()),
        "mmshap-paper": lambda: FFN("mmshap-paper", **paper),
        "mmshap-paper-es": lambda: FFN("mmshap-paper-es", **paper, early_stopping=True),
        "mmshap-paper-sum": WeightedSum,
        "lightgbm": LightGBMFusion,
        "ffn": lambda: FFN("ffn"),
        "mean": Mean,
    }
    if name not in factories:
        raise UserError(f"unknown stacker {name!r} (choose from {', '.join(STACKERS)})")
    return factories[name]()


ABLATIONS = tuple(f"mmshap-no-{g}" for g in RELIANCE_GROUPS) + ("mmshap-pool",)
STACKERS = ("mmshap", *ABLATIONS, "mmshap-paper", "mmshap-paper-es", "mmshap-paper-sum", "lightgbm", "ffn",
            "mean", *KINDS)
UNFITTED = ("mean", *KINDS)  # usable with any bundle: nothing to fit
SEEDED = ("mmshap-paper", "mmshap-paper-es", "lightgbm", "ffn")  # the others' fits do not depend on the seed


def fit_stackers(x: StackInputs, y: np.ndarray, names=STACKERS, *, seed: int = 0,
                 paper_epochs: int = PAPER_EPOCHS) -> dict[str, Stacker]:
    """Every named stacker fitted on (x, y); each records its fitting time in fit_s."""
    out = {}
    for name in names:
        started = time.perf_counter()
        out[name] = make_stacker(name, paper_epochs=paper_epochs).fit(x, y, seed=seed)
        out[name].fit_s = round(time.perf_counter() - started, 2)
    return out


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
    metas = {}
    for name, s in stackers.items():
        tensors, metas[name] = save_state(s)
        if tensors:
            save_artifact(bundle_path, f"stacker-{name}", tensors)
    save_artifact(bundle_path, "stackers", metas)


def load_stackers(bundle_path, names=None) -> dict[str, Stacker]:
    artefacts = read_manifest(bundle_path)["artifacts"]
    if "stackers" not in artefacts:
        return {}
    out = {}
    for name, meta in load_artifact(bundle_path, "stackers").items():
        if names is None or name in names:
            tensors = load_artifact(bundle_path, f"stacker-{name}") if f"stacker-{name}" in artefacts else {}
            out[name] = load_state({k: v.numpy() for k, v in tensors.items()}, meta)
    return out


def stacker_names(bundle_path) -> set[str]:
    """Stackers a run on this bundle may name: the fitted ones it holds, and those needing no fit."""
    fitted = set(load_artifact(bundle_path, "stackers")) if "stackers" in read_manifest(bundle_path)["artifacts"] else set()
    return fitted | set(UNFITTED)


def load_stacker(bundle_path, name: str) -> Stacker:
    """The stacker a run names: fitted from the bundle, or one that needs no fit."""
    if name in UNFITTED:
        return make_stacker(name)
    found = load_stackers(bundle_path, [name])
    if name not in found:
        raise UserError(f"bundle {bundle_path} has no stacker {name!r}")
    return found[name]


# the out-of-fold stack inputs a bundle keeps, so that `evaluate --seeds` can refit its stackers
OOF_ARTIFACT = "oof-inputs"


def save_oof(bundle_path, x: StackInputs, y: np.ndarray) -> None:
    tensors = {f"logits.{k}": np.asarray(v, np.float32) for k, v in x.logits.items()}
    tensors.update({"t_shap": x.t_shap, "t_stderr": x.t_stderr, "game_text_share": x.game_text_share,
                    "has_text": x.has_text.astype(np.uint8), "has_image": x.has_image.astype(np.uint8),
                    "y": np.asarray(y, np.int64)})
    save_artifact(bundle_path, OOF_ARTIFACT, tensors)


def load_oof(bundle_path) -> tuple[StackInputs, np.ndarray] | None:
    if OOF_ARTIFACT not in read_manifest(bundle_path)["artifacts"]:
        return None
    t = {k: v.numpy() for k, v in load_artifact(bundle_path, OOF_ARTIFACT).items()}
    logits = {k.removeprefix("logits."): v for k, v in t.items() if k.startswith("logits.")}
    x = StackInputs(logits, t["t_shap"], t["has_text"].astype(bool), t["has_image"].astype(bool),
                    t["t_stderr"], t["game_text_share"])
    return x, t["y"]
