"""Shapley values of a coalition game at a fixed evaluation budget, and MM-SHAP on top of them.

Two entry points:

- `estimate_mm_shap` (what pipeline/mmshap.py uses): a product's T-SHAP with debiased magnitudes,
  an error bar from independent draws, the exact two-player modality game, a budget it never
  exceeds and an optional target error; None with a reason where it cannot estimate. Its design
  and measurements are in the section "MM-SHAP" below and in docs/mmshap.md.
- `estimate_shapley`: per-player Shapley values at a budget (the generic estimator, kept for
  per-player attributions and as the baseline).

The cost of MM-SHAP is forward passes of the multimodal model, one per coalition, so the unit of
`budget` is a coalition evaluated. Everything here is pure numpy; the game is `value_fn(masks)`,
masks a bool array (m, n) with True = player present, returning m floats. All coalitions of a
call are handed to `value_fn` at once: chunk inside it to fit device memory.

`estimate_shapley` picks one of two unbiased estimators by budget, by per-player error:

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
from dataclasses import dataclass, field
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
    budget < n + 1 cannot pay for one permutation: nothing is evaluated and phi is NaN (no
    estimate; never an equal split), stderr inf; budget < 2n buys one permutation (unbiased,
    stderr inf). Otherwise see the module docstring.
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
    if budget < n + 1:
        return np.full(n, np.nan), np.full(n, np.inf)
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


def mm_shap(phi: np.ndarray, text_players: np.ndarray) -> tuple[float | None, float | None]:
    """T-SHAP and V-SHAP: each modality's share of total absolute contribution (plug-in |phi|).

    Absolute values, as in Parcalabescu & Frank: a modality that pushes the prediction down still
    contributes. When every phi is zero (or phi is NaN) there is no share: (None, None).
    """
    phi = np.asarray(phi, dtype=np.float64)
    text = np.asarray(text_players, dtype=bool)
    if phi.ndim != 1 or text.shape != phi.shape:
        raise ValueError(f"phi and text_players must be 1-d of one length, got {phi.shape} and {text.shape}")
    total = np.abs(phi).sum()
    if not total > 0.0:
        return None, None
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



# ---------------------------------------------------------------- MM-SHAP
#
# Players are a product's text tokens (or words) and image patches (or image tokens); value_fn maps
# a (B, n) bool array (True = present) to B floats (the log-probability of the predicted class).
# T-SHAP = sum_text |phi_j| / sum_all |phi_j|. Measurements behind each choice: docs/mmshap.md.
#
# * Draws. One independent draw is an antithetic pair of permutations (a uniform permutation and
#   its reverse); each player's draw is the mean of its two marginal contributions. v(empty) and
#   v(all) are shared by every permutation, so a pair costs 2(n - 1) coalitions. When the budget
#   pays for fewer than two pairs but for two single permutations, the draws are single
#   permutations (n - 1 each). Which kind is used depends on the budget only, never on the data.
#   Fewer than two draws: no T-SHAP (None, with the reason): one draw has no error bar. There is
#   no regression branch: chosen by T-SHAP error it lost at every budget measured (the old switch
#   was chosen by per-player error), and neither a modality-count control variate nor
#   position-stratified (rotated) permutations lowered the T-SHAP error (docs/mmshap.md).
# * Debiased magnitudes. |mean of draws| is biased up by noise (about 0.8 se for a null player),
#   which pulls T-SHAP towards the modality with more noisy near-null players. Each magnitude is
#   corrected by its normal-theory bias at the estimate: |m_j| - b(|m_j|, se_j),
#   b(mu, s) = E|N(mu, s^2)| - |mu|.
# * Error bar. To first order T-SHAP = A / (A + B), A and B means over draws of
#   a_r = sum_text sign(m_j) draw_rj and b_r likewise; its stderr is the delta-method (linearised
#   jackknife) spread of (B a_r - A b_r) / (A + B)^2 over the R draws / sqrt(R), widened by
#   t_{R-1}(0.977) / 2 so that +-2 stderr is a ~95% interval with few draws.
# * The exact Shapley values of the two-player game {text, image} (2 extra coalitions: text only,
#   image only) come with every estimate as a zero-variance companion (Hu et al. 2022, SHAPE).
# * Exact enumeration when n <= MAX_EXACT_PLAYERS and 2^n <= budget (stderr 0).

MIN_DRAWS = 2
FIRST_ROUND_DRAWS = 6  # target mode: draws before the first stop check, then sized from the stderr.
# Fewer is optimistic: player marginals are heavy-tailed (a rare large contribution), and 4 draws
# that miss it give both a low stderr and a wrong T-SHAP, so stopping there covered 0.76-0.87 at
# +-2 stderr even when the stderr was far under the target; from 6 draws on it covers 0.93-0.95
# (docs/mmshap.md).


@dataclass
class MMShapEstimate:
    t_shap: float | None  # debiased T-SHAP; None when it cannot be estimated (see reason)
    stderr: float | None  # of t_shap; +-2 stderr is a ~95% interval (small-sample widened)
    n_evaluations: int  # coalitions evaluated: every row passed to value_fn
    n_players: int
    phi: np.ndarray  # (n,) unbiased Shapley estimates (mean over draws); NaN without an estimate
    phi_stderr: np.ndarray  # (n,) their standard errors
    method: str  # "exact" | "antithetic" | "permutation" | "none"
    met_target: bool  # target_stderr given and reached (exact: always True)
    reason: str | None  # why t_shap is None, or None
    modality_game: dict | None  # exact Shapley of the 2-player game {text, image}; None if a modality is missing
    n_draws: int = 0  # independent draws behind the estimate
    t_shap_plugin: float | None = None  # sum_text |phi| / sum |phi| (biased; the reference's)
    n_calls: int = 0  # value_fn calls
    magnitudes: np.ndarray | None = field(default=None, repr=False)  # (n,) debiased |phi_j|

    @property
    def v_shap(self) -> float | None:
        return None if self.t_shap is None else 1.0 - self.t_shap


def min_mm_shap_budget(n_players: int) -> int:
    """The fewest coalitions estimate_mm_shap can estimate n players from: two permutations + 4."""
    return 4 + MIN_DRAWS * (n_players - 1)


def estimate_mm_shap(value_fn: ValueFn, is_text, budget: int, seed: int,
                     target_stderr: float | None = None) -> MMShapEstimate:
    """T-SHAP of one product from at most `budget` coalitions (design: the section comment above).

    target_stderr None: spend the budget, value_fn called once with every coalition. Otherwise:
    add rounds of independent draws (first FIRST_ROUND_DRAWS, then sized from the observed stderr,
    at most doubling) until stderr <= target_stderr or the budget is spent; value_fn
    is called once per round. Deterministic for a seed; both modes draw the same sequence.
    """
    text = np.asarray(is_text, dtype=bool)
    if text.ndim != 1:
        raise ValueError(f"is_text must be 1-d, got shape {text.shape}")
    n, budget = len(text), int(budget)
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if target_stderr is not None and not target_stderr > 0:
        raise ValueError(f"target_stderr must be > 0, got {target_stderr}")
    n_text = int(text.sum())
    if n_text == 0 or n_text == n:
        return _no_estimate(n, "missing modality: " + ("no image players" if n_text else "no text players"))

    counter = _Counted(value_fn)
    if n <= MAX_EXACT_PLAYERS and 2**n <= budget:
        return _exact_mm_shap(counter, text)
    minimum = min_mm_shap_budget(n)
    if budget < minimum:
        return _no_estimate(n, f"budget {budget} < minimum {minimum} coalitions for {n} players "
                               f"(two permutations are needed for an error bar)")
    pair_cost, single_cost = 2 * (n - 1), n - 1
    antithetic = budget >= 4 + MIN_DRAWS * pair_cost
    max_draws = (budget - 4) // (pair_cost if antithetic else single_cost)
    rng = np.random.default_rng(seed)

    ends = np.zeros((4, n), bool)
    ends[1], ends[2, text], ends[3, ~text] = True, True, True
    first = max_draws if target_stderr is None else min(max_draws, FIRST_ROUND_DRAWS)
    perms = _draw_perms(rng, first, n, antithetic)
    v = counter(np.concatenate([ends, _prefixes(perms, np.arange(1, n)).reshape(-1, n)]))
    v0, vn, vt, vi = v[:4]
    draws = _permutation_draws(v[4:], perms, v0, vn, antithetic)
    est = _summarise(draws, text)
    while target_stderr is not None and est[1] > target_stderr and len(draws) < max_draws:
        r = len(draws)
        wanted = math.ceil(r * (est[1] / target_stderr) ** 2 * 1.1)
        more = int(min(max_draws - r, max(1, min(wanted - r, r))))
        perms = _draw_perms(rng, more, n, antithetic)
        inner = counter(_prefixes(perms, np.arange(1, n)).reshape(-1, n))
        draws = np.concatenate([draws, _permutation_draws(inner, perms, v0, vn, antithetic)])
        est = _summarise(draws, text)

    t, se, mags, t_plug = est
    return MMShapEstimate(
        t_shap=t, stderr=se if t is not None else None, n_evaluations=counter.rows, n_players=n,
        phi=draws.mean(0), phi_stderr=_stderr(draws), method="antithetic" if antithetic else "permutation",
        met_target=t is not None and target_stderr is not None and se <= target_stderr,
        reason=None if t is not None else "no player's contribution is distinguishable from noise",
        modality_game=modality_game(v0, vn, vt, vi), n_draws=len(draws), t_shap_plugin=t_plug,
        n_calls=counter.calls, magnitudes=mags)


def modality_game(v_empty: float, v_full: float, v_text: float, v_image: float) -> dict:
    """Exact Shapley values of the two-player game {text, image}, and text's share of |phi|."""
    phi_t = 0.5 * ((v_text - v_empty) + (v_full - v_image))
    phi_i = 0.5 * ((v_image - v_empty) + (v_full - v_text))
    total = abs(phi_t) + abs(phi_i)
    return {"phi_text": float(phi_t), "phi_image": float(phi_i),
            "text_share": float(abs(phi_t) / total) if total > 0 else None,
            "v_empty": float(v_empty), "v_full": float(v_full), "v_text": float(v_text), "v_image": float(v_image)}


def t_shap_from_draws(draws: np.ndarray, is_text) -> tuple[float | None, float]:
    """(debiased T-SHAP, stderr) from an (R, n) array of independent unbiased draws, R >= 2."""
    t, se, _, _ = _summarise(np.asarray(draws, float), np.asarray(is_text, bool))
    return t, se


def noise_corrected_magnitudes(draws: np.ndarray) -> np.ndarray:
    """(n,) per-player |phi_j| estimates: |m_j| - b(|m_j|, s_j), m = mean of draws, s its stderr.

    b(mu, s) = E|N(mu, s^2)| - |mu| = s sqrt(2/pi) exp(-mu^2 / 2s^2) - 2 |mu| Phi(-|mu|/s) is the
    upward bias of |m| under a normal approximation: about 0.8 s for a null player, ~0 once
    |phi_j| >> s. A corrected magnitude may be negative: that is what keeps the sum over many
    null players near-unbiased. A player without sampling noise (s = 0) gets |m_j|.
    """
    m = np.abs(draws.mean(0))
    s = _stderr(draws)
    out = m.copy()
    ok = s > 0
    z = m[ok] / s[ok]
    out[ok] -= s[ok] * (math.sqrt(2 / math.pi) * np.exp(-0.5 * z * z) - z * _erfc(z / math.sqrt(2)))
    return out


def _erfc(x: np.ndarray) -> np.ndarray:
    """Complementary error function (numpy has none); |error| < 1.2e-7 (Numerical Recipes erfcc)."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    ans = t * np.exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277)))))))))
    return np.where(x >= 0, ans, 2.0 - ans)


def _summarise(draws: np.ndarray, text: np.ndarray):
    """(t_shap, stderr, magnitudes, plug-in t_shap) from (R, n) independent draws."""
    r = len(draws)
    phi = draws.mean(0)
    mags = noise_corrected_magnitudes(draws)
    t_plug = mm_shap(phi, text)[0]
    a, b = mags[text].sum(), mags[~text].sum()
    if not a + b > 0:  # nothing distinguishable from noise: no defensible share
        return None, math.inf, mags, t_plug
    t = float(np.clip(a / (a + b), 0.0, 1.0))
    signed = np.sign(phi) * draws
    infl = (b * signed[:, text].sum(1) - a * signed[:, ~text].sum(1)) / (a + b) ** 2
    return t, float(infl.std(ddof=1) / math.sqrt(r)) * _t_widen(r - 1), mags, t_plug


# t_df quantiles at 0.9772 (the normal's 2-sigma level)
_T977 = {1: 13.97, 2: 4.53, 3: 3.31, 4: 2.87, 5: 2.65, 6: 2.52, 7: 2.43, 8: 2.37, 9: 2.32, 10: 2.28,
         12: 2.23, 15: 2.18, 20: 2.13, 30: 2.09, 60: 2.04}


def _t_widen(df: int) -> float:
    """t_df(0.977) / 2: the factor that makes +-2 stderr a ~95% interval with df degrees of freedom."""
    if df >= 120:
        return 1.0
    return _T977[max(k for k in _T977 if k <= df)] / 2.0


class _Counted:
    """value_fn with its rows and calls counted and its output checked."""

    def __init__(self, fn: ValueFn):
        self.fn, self.rows, self.calls = fn, 0, 0

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        v = _evaluate(self.fn, masks)
        self.rows += len(masks)
        self.calls += 1
        return v


def _no_estimate(n: int, reason: str) -> MMShapEstimate:
    nan = np.full(n, np.nan)
    return MMShapEstimate(None, None, 0, n, nan, nan.copy(), "none", False, reason, None)


def _exact_mm_shap(counter: _Counted, text: np.ndarray) -> MMShapEstimate:
    n = len(text)
    seen: list[np.ndarray] = []

    def recorded(masks: np.ndarray) -> np.ndarray:
        seen.append(counter(masks))
        return seen[-1]

    phi = exact_shapley(recorded, n)  # coalition k is the bit pattern k: player j present iff bit j
    bits = 1 << np.arange(n)
    v = seen[0]
    t = mm_shap(phi, text)[0]
    return MMShapEstimate(
        t, 0.0 if t is not None else None, counter.rows, n, phi, np.zeros(n), "exact", t is not None,
        None if t is not None else "every Shapley value is zero",
        modality_game(v[0], v[-1], v[int(bits[text].sum())], v[int(bits[~text].sum())]),
        t_shap_plugin=t, n_calls=counter.calls, magnitudes=np.abs(phi))


def _draw_perms(rng: np.random.Generator, k: int, n: int, antithetic: bool) -> np.ndarray:
    """k uniform permutations, each followed by its reverse when antithetic."""
    base = _random_permutations(rng, k, n)
    if not antithetic:
        return base
    out = np.empty((2 * k, n), base.dtype)
    out[0::2], out[1::2] = base, base[:, ::-1]
    return out


def _permutation_draws(inner_v: np.ndarray, perms: np.ndarray, v0: float, vn: float, antithetic: bool) -> np.ndarray:
    """Values of the inner prefixes (sizes 1..n-1) of each permutation -> (draws, n) marginals."""
    k, n = perms.shape
    walk = np.empty((k, n + 1))
    walk[:, 0], walk[:, -1] = v0, vn
    walk[:, 1:-1] = inner_v.reshape(k, n - 1)
    m = _marginals(walk, perms)
    return 0.5 * (m[0::2] + m[1::2]) if antithetic else m


def _antithetic_permutations(value_fn: ValueFn, n: int, budget: int,
                             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    pairs = (budget - 2) // (2 * (n - 1))
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
