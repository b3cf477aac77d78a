"""Synthetic coalition games with exact Shapley values, at MM-SHAP sizes (60-240 players).

Used by tests/test_shapley.py and benchmarks/bench_estimator.py.

A game is an additive part plus "symmetric group" terms: v(S) = sum_j a_j [j in S]
+ sum_k w_k g_k(|A_k & S|), with g_k(0) = 0. Each group term is symmetric in its members, so by
symmetry and efficiency its Shapley value is w_k g_k(|A_k|) / |A_k| for each member of A_k and 0
for everyone else. Kinds of g used (all of them interactions that make sampling noisy):

- unanimity  g(m) = [m = |A|]   (all of a phrase's tokens needed; the last one gets the credit)
- redundancy g(m) = [m >= 1]    (any of several patches shows the object; the first one gets it)
- threshold  g(m) = [m >= q]    (enough context needed)
- saturating g(m) = 1 - exp(-c m)

Sums of weighted unanimity games are the brief's family; redundancy, threshold and saturating
terms are also sums of unanimity games (their Moebius transforms), written in closed form.
Most players are near-null: tiny additive effects plus membership in small low-weight triples,
so that their sampled contributions are noisy around a small true value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Game:
    n: int
    is_text: np.ndarray  # (n,) bool
    additive: np.ndarray  # (n,)
    groups: np.ndarray  # (K, n) bool membership
    kinds: list  # per group: ("unanimity",) | ("redundancy",) | ("threshold", q) | ("saturating", c)
    weights: np.ndarray  # (K,)
    name: str = ""

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks, bool)
        x = masks.astype(np.float64)
        out = x @ self.additive
        if len(self.weights):
            counts = x @ self.groups.T.astype(np.float64)  # (B, K)
            out = out + self._g(counts) @ self.weights
        return out

    def _g(self, counts: np.ndarray) -> np.ndarray:
        size = self.groups.sum(1)
        g = np.empty_like(counts)
        for k, kind in enumerate(self.kinds):
            m = counts[:, k]
            if kind[0] == "unanimity":
                g[:, k] = m >= size[k]
            elif kind[0] == "redundancy":
                g[:, k] = m >= 1
            elif kind[0] == "threshold":
                g[:, k] = m >= kind[1]
            else:
                g[:, k] = 1.0 - np.exp(-kind[1] * m)
        return g

    def shapley(self) -> np.ndarray:
        size = self.groups.sum(1)
        full = self._g(size[None, :].astype(np.float64))[0]
        per_member = self.weights * full / size
        return self.additive + self.groups.T.astype(np.float64) @ per_member

    def t_shap(self) -> float:
        a = np.abs(self.shapley())
        return float(a[self.is_text].sum() / a.sum())


def make_game(n: int, seed: int, text_frac: float = 0.6, family: str = "mixed") -> Game:
    """A random game of n players, ~text_frac of them text (text first, as in the pipeline).

    family: "mixed" (all term kinds), "lowrank" (mostly additive + triples: the easy case),
    "redundant" (large redundancy/threshold groups dominate: the hard case for sampling).
    """
    rng = np.random.default_rng(seed)
    n_text = int(round(text_frac * n))
    is_text = np.arange(n) < n_text
    text_idx, img_idx = np.arange(n_text), np.arange(n_text, n)

    # additive: log-normal magnitudes (most tiny), mixed signs, plus a few strong players
    additive = rng.choice([-1.0, 1.0], n, p=[0.35, 0.65]) * np.exp(rng.normal(np.log(0.01), 1.0, n))
    strong = rng.choice(n, size=max(2, n // 40), replace=False)
    additive[strong] = rng.choice([-1.0, 1.0], len(strong), p=[0.25, 0.75]) * rng.uniform(0.2, 1.0, len(strong))
    # modality scale: make the true T-SHAP vary across games
    additive[is_text] *= rng.uniform(0.4, 1.6)

    groups, kinds, weights = [], [], []

    def add(members, kind, w):
        m = np.zeros(n, bool)
        m[np.asarray(members)] = True
        groups.append(m)
        kinds.append(kind)
        weights.append(w)

    scale = {"mixed": 1.0, "lowrank": 0.3, "redundant": 2.0, "noisytext": 1.0}[family]
    # many small, low-weight triples and quadruples over random players: the near-null noise
    for _ in range(n // 2):
        size = rng.choice([3, 4])
        add(rng.choice(n, size, replace=False), ("unanimity",), rng.normal(0, 0.04))
    # a few phrases (text unanimity) with real weight
    for _ in range(max(1, n // 40)):
        size = min(len(text_idx), rng.integers(2, 6))
        add(rng.choice(text_idx, size, replace=False), ("unanimity",), rng.choice([-1, 1], p=[0.3, 0.7]) * rng.uniform(0.2, 0.8) * scale)
    # objects in the image: redundancy groups of patches
    for _ in range(max(1, int(rng.integers(1, 4) * scale))):
        size = min(len(img_idx), rng.integers(4, max(5, len(img_idx) // 4)))
        add(rng.choice(img_idx, size, replace=False), ("redundancy",), rng.uniform(0.3, 1.2) * scale)
    # synonyms in the text: small redundancy groups
    for _ in range(max(1, n // 60)):
        size = min(len(text_idx), rng.integers(2, 5))
        add(rng.choice(text_idx, size, replace=False), ("redundancy",), rng.uniform(0.1, 0.6) * scale)
    # cross-modal agreement: a word and a few patches, all needed
    for _ in range(2):
        members = np.concatenate([rng.choice(text_idx, rng.integers(1, 3), replace=False),
                                  rng.choice(img_idx, rng.integers(1, 4), replace=False)])
        add(members, ("unanimity",), rng.choice([-1, 1], p=[0.3, 0.7]) * rng.uniform(0.2, 0.7) * scale)
    # enough context: a threshold over many text tokens, and a saturating image term
    if family != "lowrank":
        size = min(len(text_idx), rng.integers(10, max(11, len(text_idx) // 2)))
        add(rng.choice(text_idx, size, replace=False), ("threshold", max(1, int(size * rng.uniform(0.3, 0.7)))), rng.uniform(0.3, 1.0) * scale)
        size = min(len(img_idx), rng.integers(10, max(11, len(img_idx) // 2)))
        add(rng.choice(img_idx, size, replace=False), ("saturating", rng.uniform(0.05, 0.3)), rng.uniform(0.3, 1.0) * scale)

    # context effects: each modality's players sit in zero-mean higher-order terms (sizes 5-16),
    # so many players are near-null on average but have large marginal contributions in any one
    # coalition. The two modalities get independent noise scales (log-uniform over 0.03-1), which
    # is what biases the plug-in T-SHAP: the noisier modality's near-null players inflate it.
    if family != "lowrank":
        for idx, hi in ((text_idx, family == "noisytext"), (img_idx, False)):
            sigma = 1.0 if hi else math.exp(rng.uniform(math.log(0.03), math.log(1.0)))
            for _ in range(len(idx) // 2):
                size = min(len(idx), int(rng.integers(5, 17)))
                kind = ("unanimity",) if rng.random() < 0.5 else ("redundancy",)
                add(rng.choice(idx, size, replace=False), kind, rng.normal(0, sigma))

    return Game(n, is_text, additive, np.array(groups), kinds, np.array(weights, float),
                name=f"{family}-n{n}-s{seed}")
