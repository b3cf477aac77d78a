"""Sampled MM-SHAP of the multimodal model, per product, with coalitions of many products batched.

Players are a product's text tokens ([CLS] and [SEP] never removed) and its image players:
- token mode: the N image embeddings MMBT receives; the CLIP tower runs once per product and
  only the fusion transformer runs per coalition;
- pixel mode: a p x p grid of patches of the CLIP input, p = ceil(sqrt(#text tokens)) as in the
  reference implementation, zeroed (the normalised mean colour) when absent; every coalition runs
  the whole model.

The value of a coalition is the log-probability of the class the full model predicts. A logit
would do for one product, but softmax logits carry an arbitrary per-input offset that the
players would share out among themselves; the log-probability is offset-free, so its Shapley
values measure evidence for the predicted class against the others.

Batching across products: `estimate_shapley` calls its value function once with every coalition
it needs, and is deterministic given its seed. So each product's coalitions are first collected
(a value function that records the masks and stops), all products' coalitions are evaluated in
large model batches, and each estimate is then replayed with the stored values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.mmshap import estimate_shapley, mm_shap
from pipeline.preprocess import Encoded
from pipeline.stacking import log_softmax


DEFAULT_BUDGET = 128
DEFAULT_MODE = "pixel"  # the reference's players; token mode is cheaper but under-counts the image (docs/mmshap.md)


def mmshap_config(manifest: dict, budget: int | None = None, mode: str | None = None) -> tuple[int, str]:
    """(budget, image mode): as the bundle's stackers were trained, unless the caller asks otherwise.

    The stackers take T-SHAP as an input, so classifying with the budget and mode they were
    trained with keeps that input's distribution (its noise level) the same.
    """
    trained = manifest.get("extra", {}).get("mmshap", {})
    return (trained.get("budget", DEFAULT_BUDGET) if budget is None else budget,
            mode or trained.get("mode", DEFAULT_MODE))


@dataclass
class Contributions:
    t_shap: np.ndarray  # (B,)
    v_shap: np.ndarray
    n_evaluations: np.ndarray  # (B,) coalitions evaluated per product
    stderr: np.ndarray  # (B,) approximate standard error of t_shap (delta method)


class _Collected(Exception):
    pass


def coalitions(n_players: int, budget: int, seed: int) -> np.ndarray:
    """The masks estimate_shapley will ask for, without evaluating anything."""
    box: list[np.ndarray] = []

    def record(masks: np.ndarray) -> np.ndarray:
        box.append(np.asarray(masks, bool))
        raise _Collected

    try:
        estimate_shapley(record, n_players, budget=budget, seed=seed)
    except _Collected:
        pass
    return box[0] if box else np.zeros((0, n_players), bool)


def replay(values: np.ndarray, n_players: int, budget: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    calls = 0

    def stored(masks: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls > 1 or len(masks) != len(values):
            raise RuntimeError("estimate_shapley asked for coalitions it did not announce")
        return values

    return estimate_shapley(stored, n_players, budget=budget, seed=seed)


def t_shap_stderr(phi: np.ndarray, stderr: np.ndarray, text: np.ndarray) -> float:
    """Delta method on T = A / (A + B), A = sum |phi_text|, treating players as independent."""
    a, b = np.abs(phi[text]).sum(), np.abs(phi[~text]).sum()
    if a + b == 0:
        return 0.0
    var_a, var_b = (stderr[text] ** 2).sum(), (stderr[~text] ** 2).sum()
    return float(math.sqrt(b * b * var_a + a * a * var_b) / (a + b) ** 2)


def _players(enc: Encoded, i: int, mode: str, num_image_embeds: int) -> tuple[np.ndarray, int]:
    """Positions of product i's removable text tokens, and its number of image players."""
    length = int(enc.text_mask[i].sum())
    text_pos = np.arange(1, length - 1) if enc.has_text[i] else np.zeros(0, int)
    if not enc.has_image[i]:
        return text_pos, 0
    if mode == "token":
        return text_pos, num_image_embeds
    p = max(1, math.ceil(math.sqrt(max(len(text_pos), 1))))
    return text_pos, p * p


def _patch_masks(image_players: np.ndarray, size: int) -> np.ndarray:
    """(m, p*p) player masks -> (m, 1, size, size) pixel keep-masks on a p x p grid."""
    p = math.isqrt(image_players.shape[1])
    edges = np.linspace(0, size, p + 1).round().astype(int)
    cell = np.searchsorted(edges, np.arange(size), side="right") - 1
    grid = image_players.reshape(-1, p, p)
    return grid[:, cell][:, :, cell][:, None].astype(np.float32)


def evaluate_coalitions(backend, enc: Encoded, games: list[tuple[int, np.ndarray, np.ndarray]], mode: str,
                        predicted: np.ndarray, embeds: np.ndarray | None = None) -> np.ndarray:
    """Log-probability of the predicted class for every coalition of every game, in one model batch.

    games: (product index, its removable text positions, its masks (m, n_text + n_image)).
    """
    owner = np.concatenate([np.full(len(m), i) for i, _, m in games]) if games else np.zeros(0, int)
    if len(owner) == 0:
        return np.zeros(0)
    ids = enc.input_ids[owner]
    tmask = enc.text_mask[owner].copy()
    imask = enc.image_mask(backend.num_image_embeds)[owner]
    pixel_keep = []
    start = 0
    for i, text_pos, masks in games:
        stop = start + len(masks)
        tmask[start:stop][:, text_pos] = masks[:, : len(text_pos)]
        if mode == "token":
            imask[start:stop] = masks[:, len(text_pos):]
        else:
            pixel_keep.append(_patch_masks(masks[:, len(text_pos):], enc.clip_pixels.shape[-1]))
        start = stop
    if mode == "token":
        embeds = backend.image_embeddings(enc) if embeds is None else embeds
        logits = backend.fusion_logits(ids, tmask, embeds[owner], imask)
    else:
        logits = backend.multimodal_logits(ids, tmask, enc.clip_pixels[owner] * np.concatenate(pixel_keep), imask)
    # float64: in float32 the log-probabilities of near-certain predictions lose the small
    # differences between coalitions, and T-SHAP moved by 1e-3 with the batch size alone
    return log_softmax(logits.astype(np.float64))[np.arange(len(owner)), predicted[owner]]


def product_game(backend, enc: Encoded, i: int, mode: str, predicted: np.ndarray, embeds: np.ndarray | None = None):
    """(value_fn, text player flags) of product i alone: for exact checks and the reference sampler."""
    text_pos, n_img = _players(enc, i, mode, backend.num_image_embeds)

    def value_fn(masks: np.ndarray) -> np.ndarray:
        return evaluate_coalitions(backend, enc, [(i, text_pos, np.asarray(masks, bool))], mode, predicted, embeds)

    return value_fn, np.arange(len(text_pos) + n_img) < len(text_pos)


def predicted_classes(backend, enc: Encoded) -> np.ndarray:
    return backend.multimodal_logits(enc.input_ids, enc.text_mask, enc.clip_pixels,
                                     enc.image_mask(backend.num_image_embeds)).argmax(1)


def explain(backend, enc: Encoded, *, budget: int = 64, mode: str = "pixel", seed: int = 0,
            predicted: np.ndarray | None = None) -> Contributions:
    """MM-SHAP for every product of `enc` in one pass of batched coalitions."""
    if mode not in ("token", "pixel"):
        raise ValueError(f"image mode must be token or pixel, not {mode!r}")
    b = len(enc)
    predicted = predicted_classes(backend, enc) if predicted is None else predicted
    plans = []
    for i in range(b):
        text_pos, n_img = _players(enc, i, mode, backend.num_image_embeds)
        n = len(text_pos) + n_img
        masks = coalitions(n, budget, seed + i) if len(text_pos) and n_img else np.zeros((0, n), bool)
        plans.append((text_pos, n_img, masks))
    games = [(i, text_pos, masks) for i, (text_pos, _, masks) in enumerate(plans) if len(masks)]
    values = evaluate_coalitions(backend, enc, games, mode, predicted)

    out = Contributions(np.zeros(b), np.zeros(b), np.zeros(b, int), np.zeros(b))
    start = 0
    for i, (text_pos, n_img, masks) in enumerate(plans):
        stop = start + len(masks)
        if not len(masks):  # one modality missing: all of the contribution is the other's
            out.t_shap[i] = 1.0 if len(text_pos) else 0.0
        else:
            n = masks.shape[1]
            phi, se = replay(values[start:stop], n, budget, seed + i)
            text = np.arange(n) < len(text_pos)
            out.t_shap[i] = mm_shap(phi, text)[0]
            out.stderr[i] = t_shap_stderr(phi, se, text)
            out.n_evaluations[i] = len(masks)
        start = stop
    out.v_shap = 1.0 - out.t_shap
    return out
