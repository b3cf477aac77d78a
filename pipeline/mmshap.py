"""Shapley values of a coalition game at a fixed evaluation budget, and MM-SHAP on top of them.

The cost of MM-SHAP is forward passes of the multimodal model, one per coalition, so the unit of
`budget` is a coalition evaluated. Everything here is pure numpy; the game is `value_fn(masks)`,
masks a bool array (m, n) with True = player present, returning m floats. All coalitions of a
call are handed to `value_fn` at once: chunk inside it to fit device memory.

`estimate_shapley` picks one of two unbiased estimators by budget (docs/estimator.md has the
measurements behind the choice and the switch point):

- few evaluations per player: antithetic permutation sampling. A permutation's n + 1 prefix
  coalitions give every player one marginal contribution; the empty and full coalitions are the
  same for every permutation, so each permutation costs n - 1 evaluations. Its reverse is sampled
  with it (antithetic pair): that halves the error on the smooth games measured, though it
  doubles it on self-dual voting games, where the regression estimator below is far better.
- enough evaluations to fit n parameters: regression-adjusted maximum-sample-reuse. Coalition
  pairs (A, complement of A) are drawn with |A| from the Shapley kernel. An additive-plus-size
  model f is fitted to them; its Shapley values are known exactly (its coefficients), and only
  the residual game v - f is estimated by Monte Carlo, where every evaluated coalition informs
  every player. f is cross-fitted (fitted on the other folds), so the estimate stays unbiased.
  This is the estimator of Witter et al., "Regression-adjusted Monte Carlo estimators for
  Shapley values and probabilistic values" (2025), specialised to paired kernel sampling.

Both satisfy efficiency, sum(phi) = v(N) - v(empty), exactly on every draw, so no projection is
needed: permutation contributions telescope, and the residual weights sum to zero over players.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

ValueFn = Callable[[np.ndarray], np.ndarray]

MAX_EXACT_PLAYERS = 16
FOLDS = 8


def exact_shapley(value_fn: ValueFn, n_players: int) -> np.ndarray:
    """All 2^n coalitions in one call; the ground truth the estimators are measured against."""
    n = _check_players(n_players)
    if n > MAX_EXACT_PLAYERS:
        raise ValueError(f"exact_shapley enumerates 2^n coalitions; n_players={n} > {MAX_EXACT_PLAYERS}")
    if n == 0:
        return np.zeros(0)
    masks = (np.arange(2**n)[:, None] >> np.arange(n)) & 1 == 1
    v = _evaluate(value_fn, masks)
    size = masks.sum(1)
    # phi_i = sum_S v(S) * (w(|S|-1) if i in S else -w(|S|)), w(s) = s!(n-1-s)!/n! = 1/(n C(n-1, s))
    w = np.array([1.0 / (n * math.comb(n - 1, s)) for s in range(n)] + [0.0])
    present = v * w[np.maximum(size - 1, 0)]
    absent = v * w[size]
    return masks.T @ present - (~masks).T @ absent


def estimate_shapley(value_fn: ValueFn, n_players: int, *, budget: int,
                     seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unbiased Shapley estimates and their standard errors from at most `budget` evaluations.

    Edge cases, in order: n = 0 gives empty arrays; budget >= 2^n enumerates (exact, stderr 0);
    budget < 2 evaluates nothing (zeros, stderr inf); budget < n + 1 cannot pay for one
    permutation and returns the equal split (v(N) - v(empty)) / n, which is biased, stderr inf;
    budget < 2n buys one permutation (unbiased, stderr inf). Otherwise see the module docstring.
    value_fn is called once, with every coalition. stderr is the standard error of each phi_j
    from the spread of independent draws (antithetic pairs, or residual terms per fold); with
    few draws it is itself noisy, and a player never pivotal in the draws gets 0.
    """
    n = _check_players(n_players)
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if n == 0:
        return np.zeros(0), np.zeros(0)
    if budget >= 2**n:
        return exact_shapley(value_fn, n), np.zeros(n)
    if budget < 2:
        return np.zeros(n), np.full(n, np.inf)
    rng = np.random.default_rng(seed)
    if budget >= regression_threshold(n):
        return _regression_adjusted(value_fn, n, budget, rng)
    return _antithetic_permutations(value_fn, n, budget, rng)


def regression_threshold(n_players: int) -> int:
    """Budget from which the regression-adjusted estimator beats permutations (measured).

    Its fitted model has about 1.5n parameters, and the fit's own noise only pays off once there
    are enough coalition pairs per parameter. On smooth games the crossover grows from under 8n
    evaluations at n = 12 to about 30n at n = 128..240; 2.5 n^1.5 tracks it (8.8n at n = 12,
    20n at n = 64, 28n at n = 128). Threshold games favour regression at any budget.
    """
    return 2 + math.ceil(2.5 * n_players**1.5)


def mm_shap(phi: np.ndarray, text_players: np.ndarray) -> tuple[float, float]:
    """T-SHAP and V-SHAP: each modality's share of total absolute contribution.

    Absolute values, as in Parcalabescu & Frank: a modality that pushes the prediction down still
    contributes. When every phi is zero neither modality contributes anything, and (0.5, 0.5)
    is returned so that downstream weights stay finite and neutral.
    """
    phi = np.asarray(phi, dtype=np.float64)
    text = np.asarray(text_players, dtype=bool)
    if phi.ndim != 1 or text.shape != phi.shape:
        raise ValueError(f"phi and text_players must be 1-d of one length, got {phi.shape} and {text.shape}")
    total = np.abs(phi).sum()
    if total == 0.0:
        return 0.5, 0.5
    t_shap = float(np.abs(phi[text]).sum() / total)
    return t_shap, 1.0 - t_shap


def reference_permutation_shapley(value_fn: ValueFn, n_players: int, *, n_permutations: int = 10,
                                  seed: int | None = None) -> tuple[np.ndarray, int]:
    """The reference MM-SHAP sampler, kept to measure ours against.

    Like shap's PermutationExplainer as the MM-SHAP code uses it: each permutation is walked
    forward and in reverse, each of its n + 1 coalitions costs one forward pass, nothing is
    shared, so it pays 2 * n_permutations * (n + 1) evaluations.
    """
    n = _check_players(n_players)
    if n == 0 or n_permutations <= 0:
        return np.zeros(n), 0
    rng = np.random.default_rng(seed)
    base = _random_permutations(rng, n_permutations, n)
    perms = np.concatenate([base, base[:, ::-1]])
    masks = _prefixes(perms, np.arange(n + 1))
    v = _evaluate(value_fn, masks.reshape(-1, n)).reshape(len(perms), n + 1)
    phi = _marginals(v, perms).mean(0)
    return phi, masks.shape[0] * masks.shape[1]


def _antithetic_permutations(value_fn: ValueFn, n: int, budget: int,
                             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    pairs = (budget - 2) // (2 * (n - 1))
    if budget < n + 1:
        v0, vn = _evaluate(value_fn, np.stack([np.zeros(n, bool), np.ones(n, bool)]))
        return np.full(n, (vn - v0) / n), np.full(n, np.inf)
    base = _random_permutations(rng, max(pairs, 1), n)
    perms = np.concatenate([base, base[:, ::-1]]) if pairs else base
    inner = _prefixes(perms, np.arange(1, n)).reshape(-1, n)
    ends = np.stack([np.zeros(n, bool), np.ones(n, bool)])
    v = _evaluate(value_fn, np.concatenate([ends, inner]))
    v0, vn, inner_v = v[0], v[1], v[2:].reshape(len(perms), n - 1)
    walk = np.concatenate([np.full((len(perms), 1), v0), inner_v, np.full((len(perms), 1), vn)], 1)
    marginal = _marginals(walk, perms)
    if pairs == 0:
        return marginal[0], _stderr(marginal)
    per_pair = (marginal[:pairs] + marginal[pairs:]) / 2  # the pairs are the independent draws
    return per_pair.mean(0), _stderr(per_pair)


def _regression_adjusted(value_fn: ValueFn, n: int, budget: int,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """phi(v) = phi(f) + phi(v - f): exact for the fitted f, Monte Carlo for the residual only.

    With |A| = s drawn with probability q(s) = 1 / (Z s (n - s)), Z = sum_s 1 / (s (n - s)), and A
    uniform of that size, phi_i(r) = (r(N) - r(empty)) / n + E[(r(A) - r(A^c)) (n [i in A] - s)] Z/2
    for any game r. f(S) = sum_{j in S} beta_j + g(|S|) with g(0) = g(n) = 0 has phi(f) = beta,
    and only its pair differences f(A) - f(A^c) enter, so it is fitted to v(A) - v(A^c).
    """
    pairs = (budget - 2) // 2
    sizes = np.arange(1, n)
    kernel = 1.0 / (sizes * (n - sizes))
    z = kernel.sum()
    s = rng.choice(sizes, size=pairs, p=kernel / z)
    a = np.argsort(rng.random((pairs, n)), 1).argsort(1) < s[:, None]  # uniform subset of size s
    ends = np.stack([np.zeros(n, bool), np.ones(n, bool)])
    v = _evaluate(value_fn, np.concatenate([ends, a, ~a]))
    v0, vn = v[0], v[1]
    dy = v[2:2 + pairs] - v[2 + pairs:]

    # features of f(A) - f(A^c): +-1 per player, and g(s) - g(n - s), antisymmetric in s
    half = (n - 1) // 2
    size_cols = np.zeros((pairs, half))
    small = np.minimum(s, n - s)
    rows = np.nonzero(small <= half)[0]  # s == n - s has g(s) - g(n - s) = 0
    size_cols[rows, small[rows] - 1] = np.sign(n - 2 * s[rows])
    x = np.concatenate([2.0 * a - 1.0, size_cols], 1)
    weight = (n * a - s[:, None]) * (z / 2)  # per pair and player; sums to 0 over players

    folds = min(FOLDS, pairs // 2)
    fold = np.arange(pairs) % folds
    phi = np.zeros(n)
    var = np.zeros(n)
    for g in range(folds):
        train, test = fold != g, fold == g
        coef = _ridge(x[train], dy[train])
        beta = coef[:n]
        terms = (dy[test] - x[test] @ coef)[:, None] * weight[test]
        k = test.sum()
        phi += k * (beta + (vn - v0 - beta.sum()) / n + terms.mean(0))
        var += k * terms.var(0, ddof=1)
    return phi / pairs, np.sqrt(var) / pairs


def _ridge(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with a scale-free touch of ridge, only so that a rank-deficient fold solves."""
    gram = x.T @ x
    gram[np.diag_indices_from(gram)] += 1e-8 * np.trace(gram) / len(gram)
    return np.linalg.solve(gram, x.T @ y)


def _random_permutations(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    return np.argsort(rng.random((k, n)), 1)


def _prefixes(perms: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """masks[p, j] = the first sizes[j] players of perms[p] present."""
    rank = np.empty_like(perms)
    rank[np.arange(len(perms))[:, None], perms] = np.arange(perms.shape[1])
    return rank[:, None, :] < sizes[None, :, None]


def _marginals(walk: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """Values along each permutation's walk (k, n + 1) -> each player's marginal contribution (k, n)."""
    step = np.diff(walk, axis=1)  # step[p, j] belongs to player perms[p, j]
    out = np.empty_like(step)
    np.put_along_axis(out, perms, step, axis=1)
    return out


def _stderr(draws: np.ndarray) -> np.ndarray:
    """Across independent draws; one draw says nothing about spread, hence inf."""
    if len(draws) < 2:
        return np.full(draws.shape[1], np.inf)
    return draws.std(0, ddof=1) / math.sqrt(len(draws))


def _evaluate(value_fn: ValueFn, masks: np.ndarray) -> np.ndarray:
    v = np.asarray(value_fn(masks), dtype=np.float64)
    if v.shape != (len(masks),):
        raise ValueError(f"value_fn must return shape ({len(masks)},), got {v.shape}")
    return v


def _check_players(n_players: int) -> int:
    n = int(n_players)
    if n < 0:
        raise ValueError(f"n_players must be >= 0, got {n_players}")
    return n
