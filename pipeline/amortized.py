"""Amortized MM-SHAP: a small explainer that predicts a product's T-SHAP (and the modality-game
text share) from what classifying it already computed, at no extra forward pass.

Sampled MM-SHAP costs hundreds to thousands of multimodal passes per product. Like FastSHAP
(Jethani et al., ICLR 2022) the explainer is fitted once, with the bundle, on the sampled
estimates of the training products (the out-of-fold ones cross-fitting computes for the
stackers), and then costs a few small matrix products per product.

Its inputs are the three base models' logits and the product's player counts, nothing else: the
multimodal model's predicted class, how sure each model is, how much the text model and the image
model back that class, whether they agree, and how many text and image players the product has.
Because these are outputs every backend already returns (in-process torch or a Triton server),
the explainer runs in numpy in the process that calls the backend and needs no serving model of
its own. docs/amortized.md measures what it gets right and what it costs.

The explainer is a two-layer MLP (tanh) with two sigmoid outputs, fitted by weighted least squares:
each target weighs 1 / (stderr^2 + FLOOR^2), so noisy sampled targets count less and exact ones
do not count infinitely much. Products without a sampled value (a modality missing, or no
estimate) are left out; a product missing a modality never gets an amortized value either.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from pipeline.bundle import load_artifact
from pipeline.errors import UserError
from pipeline.mmshap import EXPLAINER as ARTIFACT, MMShapConfig, explain_product, players_of
from pipeline.preprocess import Encoded
from pipeline.records import Contributions
from pipeline.stackers import log_softmax

FEATURES_VERSION = 1
FLOOR = 0.02  # stderr floor of the sample weights: an exact target weighs as one with stderr 0.02
HIDDEN = 32
OUTPUTS = ("t_shap", "game_text_share")


def features(logits: dict[str, np.ndarray], n_text: np.ndarray, n_image: np.ndarray) -> np.ndarray:
    """(n, d) explainer inputs from base logits {text, image, multimodal: (n, K)} and player counts.

    Per product: the multimodal prediction c (one-hot), each model's max probability and
    normalised entropy, the log-probability the text and the image model give c and their
    difference, three agreement flags, and the player counts (log and text share).
    """
    lp = {k: log_softmax(np.asarray(v, np.float64)) for k, v in logits.items()}
    n, k = lp["multimodal"].shape
    c = lp["multimodal"].argmax(1)
    rows = np.arange(n)
    cols = [np.eye(k)[c]]
    for kind in ("text", "image", "multimodal"):
        p = np.exp(lp[kind])
        cols += [p.max(1, keepdims=True), (-(p * lp[kind]).sum(1) / np.log(k))[:, None]]
    at_c = {kind: lp[kind][rows, c] for kind in ("text", "image")}
    cols += [at_c["text"][:, None], at_c["image"][:, None], (at_c["text"] - at_c["image"])[:, None]]
    best = {kind: lp[kind].argmax(1) for kind in ("text", "image")}
    cols += [(best["text"] == c)[:, None], (best["image"] == c)[:, None], (best["text"] == best["image"])[:, None]]
    nt, ni = np.asarray(n_text, np.float64), np.asarray(n_image, np.float64)
    cols += [np.log1p(nt)[:, None], np.log1p(ni)[:, None], (nt / np.maximum(nt + ni, 1))[:, None]]
    return np.concatenate([np.asarray(col, np.float64) for col in cols], axis=1)


def _net(d: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, len(OUTPUTS)))


@dataclass
class Explainer:
    """Standardisation and MLP weights; predict maps features to (t_shap, game_text_share) in [0, 1]."""

    mean: np.ndarray
    scale: np.ndarray
    weights: dict[str, np.ndarray]
    hidden: int = HIDDEN

    def _module(self) -> nn.Module:
        net = _net(len(self.mean), self.hidden)
        net.load_state_dict({k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in self.weights.items()})
        return net.eval()

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not len(x):
            return np.zeros(0), np.zeros(0)
        z = torch.as_tensor(((x - self.mean) / self.scale).astype(np.float32))
        with torch.inference_mode():
            out = torch.sigmoid(self._module()(z)).double().numpy()
        return out[:, 0], out[:, 1]

    def state(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "scale": self.scale, **{f"net.{k}": v for k, v in self.weights.items()}}

    @classmethod
    def from_state(cls, tensors: dict, hidden: int = HIDDEN) -> "Explainer":
        t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
        return cls(t["mean"], t["scale"], {k[4:]: v for k, v in t.items() if k.startswith("net.")}, hidden)


def sample_weights(stderr: np.ndarray) -> np.ndarray:
    se = np.where(np.isfinite(stderr), stderr, 0.0)
    return 1.0 / (se**2 + FLOOR**2)


def _targets(t: np.ndarray, game: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 2) targets and (n, 2) availability; a missing game share is imputed and weighs 0."""
    y = np.stack([t, game], 1)
    ok = np.isfinite(y)
    return np.where(ok, y, 0.5), ok.astype(np.float64)


def fit_explainer(x: np.ndarray, t_shap: np.ndarray, stderr: np.ndarray, game: np.ndarray, *, seed: int = 0,
                  hidden: int = HIDDEN, epochs: int = 400, weight_decay: float = 1e-3) -> Explainer:
    """Weighted least squares on the rows with a sampled T-SHAP (full batch Adam, fixed epochs)."""
    keep = np.isfinite(t_shap)
    if keep.sum() < 2:
        raise ValueError(f"the explainer needs sampled T-SHAP for at least 2 products, got {int(keep.sum())}")
    x, y, ok = x[keep], *_targets(t_shap[keep], game[keep])
    w = sample_weights(stderr[keep])[:, None] * ok
    w = w / w[:, 0].mean()
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    torch.manual_seed(seed)
    net = _net(x.shape[1], hidden)
    xs = torch.as_tensor(((x - mean) / scale).astype(np.float32))
    ys, ws = torch.as_tensor(y, dtype=torch.float32), torch.as_tensor(w, dtype=torch.float32)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(epochs):
        loss = (ws * (torch.sigmoid(net(xs)) - ys) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return Explainer(mean, scale, {k: v.detach().numpy().astype(np.float64) for k, v in net.state_dict().items()}, hidden)


def cross_validated(x: np.ndarray, t_shap: np.ndarray, stderr: np.ndarray, game: np.ndarray, *, folds: int = 5,
                    seed: int = 0, **kw) -> np.ndarray:
    """Out-of-fold explainer predictions of T-SHAP (NaN where no sampled target): its honest error,
    and what a stacker sees when it is trained on amortized values."""
    rng = np.random.default_rng(seed)
    fold = rng.integers(0, folds, len(x))
    out = np.full(len(x), np.nan)
    for f in range(folds):
        train, test = fold != f, fold == f
        if np.isfinite(t_shap[train]).sum() >= 2 and test.any():
            out[test] = fit_explainer(x[train], t_shap[train], stderr[train], game[train], seed=seed, **kw).predict(x[test])[0]
    return out


def rmse(a: np.ndarray, b: np.ndarray) -> tuple[float | None, int]:
    """RMSE over the rows where both are finite, and their count."""
    ok = np.isfinite(a) & np.isfinite(b)
    n = int(ok.sum())
    return (float(np.sqrt(np.mean((a[ok] - b[ok]) ** 2))) if n else None), n


# ---------------------------------------------------------------------------------- at inference

def audited(seeds: np.ndarray, fraction: float) -> np.ndarray:
    """Which products the audit samples: a fixed share of them picked by a hash of their seed, so the
    same product is audited (or not) in every batch, mode and rerun."""
    digest = [int.from_bytes(hashlib.sha256(b"audit\x00" + int(s).to_bytes(8, "little")).digest()[:8], "little")
              for s in seeds]
    return np.array([d / 2.0**64 < fraction for d in digest], bool)


@lru_cache(maxsize=8)
def _load(path: str, sha256: str, hidden: int) -> Explainer:
    return Explainer.from_state({k: v.numpy() for k, v in load_artifact(path, ARTIFACT).items()}, hidden)


def load_explainer(bundle) -> Explainer:
    """The bundle's explainer (cached per bundle folder and artefact hash)."""
    entry = bundle.manifest["artifacts"].get(ARTIFACT)
    if entry is None:
        raise UserError(f"{bundle.path}: no MM-SHAP explainer (train the bundle with MM-SHAP on)")
    meta = bundle.manifest.get("extra", {}).get("mmshap_explainer", {})
    return _load(str(bundle.path), entry["sha256"], int(meta.get("hidden", HIDDEN)))


def player_counts(backend, enc: Encoded, mode: str, players: str) -> tuple[np.ndarray, np.ndarray]:
    """(n_text, n_image) players of every product of enc, as sampled MM-SHAP would play them."""
    counted = [players_of(backend, enc, i, mode, players) for i in range(len(enc))]
    return np.array([p.n_text for p in counted], int), np.array([p.n_image for p in counted], int)


def explain_amortized(backend, enc: Encoded, config: MMShapConfig, seeds: np.ndarray,
                      logits: dict[str, np.ndarray]) -> Contributions:
    """Predicted T-SHAP and game share for every product with both modalities (method "amortized",
    no coalition evaluated); the audited ones also get a sampled estimate (at config.audit()) as
    audit_t_shap."""
    n = len(enc)
    n_text, n_image = player_counts(backend, enc, config.mode, config.players)
    t, game = load_explainer(backend.bundle).predict(features(logits, n_text, n_image))
    both = (n_text > 0) & (n_image > 0)
    c = Contributions.unestimated(n, "")
    c.t_shap, c.game_text_share = np.where(both, t, np.nan), np.where(both, game, np.nan)
    c.n_players = n_text + n_image
    c.method = ["amortized" if b else "none" for b in both]
    c.reason = [None if b else "missing modality: " + ("no image players" if nt else "no text players")
                for b, nt in zip(both, n_text)]
    audit = np.nonzero(audited(seeds, config.audit_fraction) & both)[0]
    if len(audit):
        sampled = config.audit()
        predicted = logits["multimodal"].argmax(1)
        for i in audit:
            est = explain_product(backend, enc, int(i), sampled, int(seeds[i]), predicted)
            c.audit_t_shap[i] = np.nan if est.t_shap is None else est.t_shap
            c.audit_stderr[i] = np.nan if est.stderr is None else est.stderr
            c.n_evaluations[i] = est.n_evaluations
    return c
