"""A product's MM-SHAP: T-SHAP of the multimodal model with an error bar, and the modality game.

Players are a product's text tokens ([CLS] and [SEP] never removed), or its words (the WordPieces
of one word are one player, `players="word"`), and its image players:
- token mode: the N image embeddings MMBT receives; the CLIP tower runs once per product and
  only the fusion transformer runs per coalition;
- pixel mode: a p x p grid of patches of the CLIP input, p = ceil(sqrt(#text tokens)) as in the
  reference implementation, set to 0 (the normalised mean colour) when absent; the image encoder
  runs once per distinct image coalition and the fusion transformer once per coalition.
An absent text player is masked out of attention (the reference replaces it by a pad id instead);
an absent image embedding is masked out of attention the same way.

The value of a coalition is the log-probability of the class the full model predicts: softmax
logits carry an arbitrary per-input offset that the players would share out among themselves,
the log-probability is offset-free. Coalitions are evaluated in float32 whatever precision
inference uses (`Backend.float32`), product by product, in row chunks that start at the product,
and each product's sampling is seeded from (bundle id, product content hash): a product gets the
same T-SHAP in any batch, at any position, embedded or distributed.

Budget policy (MMShapConfig): by default each product adds antithetic draws until the stderr of
its T-SHAP is at most `target_stderr` or it has spent `cap` coalitions; a fixed `budget` per
product is the alternative. A product that cannot be estimated (budget under two permutations,
or a modality missing) gets T-SHAP None with the reason, never a made-up value. docs/mmshap.md
explains the numbers and measures cost and accuracy.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from pipeline.errors import UserError
from pipeline.preprocess import Encoded
from pipeline.records import Contributions, Product, content_hash
from pipeline.shapley import MMShapEstimate, estimate_mm_shap
from pipeline.stackers import log_softmax

DEFAULT_MODE = "pixel"  # the reference's players; token mode is cheaper but under-counts the image
DEFAULT_TARGET_STDERR = 0.03
DEFAULT_CAP = 4000  # coalitions per product at most, in target mode
DEFAULT_AUDIT = 0.05  # share of amortized products that also get sampled MM-SHAP
# The audit samples each audited product to this looser stderr (or the run's target if looser, within
# the run's cap; a fixed-budget run audits at its budget). It estimates the explainer's RMSE over many
# products, not one product's truth, and for a fixed cost that estimate is most precise when the
# audit's noise is about the error it measures (~0.1); the reported error subtracts the audit's own
# noise (db.results.audit_error).
AUDIT_TARGET_STDERR = 0.1
PLAYERS = ("token", "word")
METHODS = ("sampled", "amortized")
EXPLAINER = "mmshap-explainer"  # the bundle artefact of amortized MM-SHAP (pipeline.amortized)
MMSHAP_ESTIMATOR = 2  # bump when the estimator changes what it returns (training caches key on it)
ROWS_PER_CALL = 512  # coalitions (pixel mode: distinct image masks, a copy of the image each) per model call


@dataclass(frozen=True)
class MMShapConfig:
    """How each product's MM-SHAP is estimated.

    budget None: target mode (draws until stderr <= target_stderr, at most cap coalitions);
    budget > 0: that many coalitions per product; budget 0: MM-SHAP off (T-SHAP None).
    method "amortized": the bundle's explainer predicts T-SHAP (pipeline.amortized), and a share
    audit_fraction of the products, picked by their seed, also gets the sampled estimate.
    """

    mode: str = DEFAULT_MODE
    budget: int | None = None
    target_stderr: float = DEFAULT_TARGET_STDERR
    cap: int = DEFAULT_CAP
    players: str = "token"
    method: str = "sampled"
    audit_fraction: float = DEFAULT_AUDIT

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"MM-SHAP method must be one of {METHODS}, not {self.method!r}")
        if not 0 <= self.audit_fraction <= 1:
            raise ValueError(f"audit fraction must lie in [0, 1], not {self.audit_fraction}")
        if self.mode not in ("token", "pixel"):
            raise ValueError(f"image mode must be token or pixel, not {self.mode!r}")
        if self.players not in PLAYERS:
            raise ValueError(f"text players must be one of {PLAYERS}, not {self.players!r}")

    @property
    def off(self) -> bool:
        return self.budget == 0

    def audit(self) -> "MMShapConfig":
        """The sampled policy of the audited products of an amortized run: target mode at the looser of
        the run's target and AUDIT_TARGET_STDERR; a fixed budget stays that budget."""
        return replace(self, method="sampled", target_stderr=max(self.target_stderr, AUDIT_TARGET_STDERR))

    def limits(self) -> tuple[int, float | None]:
        """(coalitions at most, target stderr or None) for estimate_mm_shap."""
        return (self.cap, self.target_stderr) if self.budget is None else (self.budget, None)

    def options(self) -> dict:
        """As a run's recorded options (mmshap_budget, mmshap_mode, ...): what the report and BI show."""
        out = ({"mmshap_budget": self.budget} if self.budget is not None
               else {"mmshap_target_stderr": self.target_stderr, "mmshap_cap": self.cap})
        amortized = ({"mmshap_method": self.method, "mmshap_audit_fraction": self.audit_fraction}
                     if self.method == "amortized" else {})
        return {**out, "mmshap_mode": self.mode, **({"mmshap_players": self.players} if self.players != "token" else {}),
                **amortized}

    def describe(self) -> str:
        if self.method == "amortized" and not self.off:
            return f"amortized, {self.audit_fraction:.0%} audited at " + self.audit().describe()
        if self.budget is not None:
            return f"budget {self.budget} coalitions per product"
        return f"target stderr {self.target_stderr:g}, cap {self.cap} coalitions per product"


def mmshap_config(manifest: dict, budget: int | None = None, mode: str | None = None, *,
                  target_stderr: float | None = None, cap: int | None = None,
                  players: str | None = None, method: str | None = None,
                  audit_fraction: float | None = None) -> MMShapConfig:
    """As the bundle's stackers were trained, with the caller's non-None choices on top.

    The stackers take T-SHAP as an input, so classifying as they were trained keeps that input's
    distribution (its noise level) the same. A budget asks for fixed-budget mode; a target or a
    cap without a budget asks for target mode.
    """
    trained = dict(manifest.get("extra", {}).get("mmshap", {}))
    if budget is not None:
        trained["budget"] = budget
    elif target_stderr is not None or cap is not None:
        trained["budget"] = None
    learned = {k: trained.get(k) for k in ("mode", "players")}
    chosen = {"mode": mode, "target_stderr": target_stderr, "cap": cap, "players": players, "method": method,
              "audit_fraction": audit_fraction}
    trained.update({k: v for k, v in chosen.items() if v is not None})
    defaults = asdict(MMShapConfig())
    config = MMShapConfig(**{k: trained.get(k, defaults[k]) for k in defaults})
    if config.method == "amortized" and not config.off:
        if EXPLAINER not in manifest.get("artifacts", {}):
            raise UserError("this bundle has no MM-SHAP explainer for --mmshap-method amortized "
                            "(train it with MM-SHAP on: `shapstack train` without --mmshap-budget 0)")
        if any(learned[k] not in (None, getattr(config, k)) for k in learned):
            raise UserError(f"the bundle's MM-SHAP explainer predicts {learned['mode']}-mode T-SHAP with "
                            f"{learned['players']} text players: amortized MM-SHAP cannot use another mode or players")
    return config


def mmshap_config_for(manifest: dict, settings) -> MMShapConfig:
    """mmshap_config with the choices of a shapstack Settings (mmshap_budget, _image_mode, _target_stderr,
    _cap, _players, _method, _audit_fraction)."""
    return mmshap_config(manifest, settings.mmshap_budget, settings.mmshap_image_mode,
                         target_stderr=settings.mmshap_target_stderr, cap=settings.mmshap_cap,
                         players=settings.mmshap_players, method=settings.mmshap_method,
                         audit_fraction=settings.mmshap_audit_fraction)


def product_seed(seed_key: str, product: Product) -> int:
    """The sampling seed of a product: a hash of (bundle id or other key, product content)."""
    digest = product.content_hash or content_hash(product.title, product.description, product.image)
    return int.from_bytes(hashlib.sha256(f"{seed_key}\x00{digest}".encode()).digest()[:8], "little")


@dataclass(frozen=True)
class Players:
    """A product's players: text_pos its removable token positions, word[k] the text player of token k."""

    text_pos: np.ndarray
    word: np.ndarray
    n_image: int

    @property
    def n_text(self) -> int:
        return int(self.word.max()) + 1 if len(self.word) else 0

    @property
    def is_text(self) -> np.ndarray:
        return np.arange(self.n_text + self.n_image) < self.n_text


def players_of(backend, enc: Encoded, i: int, mode: str, players: str = "token") -> Players:
    length = int(enc.text_mask[i].sum())
    text_pos = np.arange(1, length - 1) if enc.has_text[i] else np.zeros(0, int)
    word = np.arange(len(text_pos))
    if players == "word" and len(text_pos):
        starts = backend.bundle.tokenizer.word_starts(enc.input_ids[i, text_pos])
        starts[0] = True
        word = np.cumsum(starts) - 1
    if not enc.has_image[i]:
        n_image = 0
    elif mode == "token":
        n_image = backend.num_image_embeds
    else:
        n_image = max(1, math.ceil(math.sqrt(max(len(text_pos), 1)))) ** 2
    return Players(text_pos, word, n_image)


def _patch_masks(image_players: np.ndarray, size: int) -> np.ndarray:
    """(m, p*p) player masks -> (m, 1, size, size) pixel keep-masks on a p x p grid."""
    p = math.isqrt(image_players.shape[1])
    edges = np.linspace(0, size, p + 1).round().astype(int)
    cell = np.searchsorted(edges, np.arange(size), side="right") - 1
    grid = image_players.reshape(-1, p, p)
    return grid[:, cell][:, :, cell][:, None].astype(np.float32)


def coalition_values(backend, enc: Encoded, i: int, pl: Players, masks: np.ndarray, mode: str, predicted: int,
                     embeds: np.ndarray | None = None) -> np.ndarray:
    """Log-probability of class `predicted` for each coalition (m, n players) of product i, float32 model.

    Both modes run MMBT as its two halves, the fusion transformer over the present tokens only
    (MMBT.compact). Token mode: the product's image tokens `embeds`, absent ones left out. Pixel
    mode: the image encoder runs once per distinct image coalition, not once per coalition: a
    permutation walk changes the image only at its image players' steps, so its n + 1 coalitions
    hold n_image + 1 image masks, and the encoder is most of MMBT's cost (docs/mmshap.md, "Cost per
    coalition"). The values are those of the whole model on the masked pixels, as the reference
    computes them.
    """
    masks = np.asarray(masks, bool)
    rows = np.full(len(masks), i)
    tmask = enc.text_mask[rows].copy()
    tmask[:, pl.text_pos] = masks[:, : pl.n_text][:, pl.word]
    imask = enc.image_mask(backend.num_image_embeds)[rows]
    image = masks[:, pl.n_text :]
    if mode == "token":
        imask[:, : image.shape[1]] = image
        image_rows = np.zeros(len(masks), int)
    else:
        embeds, image_rows = _masked_image_embeddings(backend, enc.clip_pixels[i], image)
    # sent in order of sequence length, so that each model batch holds coalitions of about one
    # length: the fusion transformer computes the present tokens up to the longest row of its batch
    order = np.argsort(tmask.sum(1) + imask.sum(1), kind="stable")
    values = np.zeros(len(masks))
    for start in range(0, len(masks), ROWS_PER_CALL):
        r = order[start : start + ROWS_PER_CALL]
        with backend.float32():
            logits = backend.fusion_logits(enc.input_ids[rows[r]], tmask[r], embeds[image_rows[r]], imask[r])
        values[r] = log_softmax(logits.astype(np.float64))[:, predicted]
    return values


def _masked_image_embeddings(backend, pixels: np.ndarray, image_players: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image tokens of each distinct image coalition, its row per coalition), float32 encoder.

    pixels (3, S, S) of one product; image_players (m, p*p) its coalitions' patch masks."""
    if image_players.shape[1] == 0:  # no image players: the image as it is
        distinct, row = np.zeros((1, 0), bool), np.zeros(len(image_players), int)
    else:
        distinct, row = np.unique(image_players, axis=0, return_inverse=True)
    out = []
    with backend.float32():
        for start in range(0, len(distinct), ROWS_PER_CALL):
            d = distinct[start : start + ROWS_PER_CALL]
            keep = _patch_masks(d, pixels.shape[-1]) if d.shape[1] else np.ones((1, 1, 1, 1), np.float32)
            out.append(backend.image_embeddings(pixels[None] * keep))
    return np.concatenate(out), np.asarray(row).reshape(-1)


def product_game(backend, enc: Encoded, i: int, mode: str, predicted: np.ndarray, players: str = "token"):
    """(value_fn, text player flags) of product i: what explain estimates, for checks and benchmarks."""
    pl = players_of(backend, enc, i, mode, players)
    embeds = None
    if mode == "token" and pl.n_image:
        with backend.float32():
            embeds = backend.image_embeddings(enc.clip_pixels[i : i + 1])

    def value_fn(masks: np.ndarray) -> np.ndarray:
        return coalition_values(backend, enc, i, pl, masks, mode, int(predicted[i]), embeds)

    return value_fn, pl.is_text


def predicted_classes(backend, enc: Encoded) -> np.ndarray:
    return backend.multimodal_logits(enc.input_ids, enc.text_mask, enc.clip_pixels,
                                     enc.image_mask(backend.num_image_embeds)).argmax(1)


def explain_product(backend, enc: Encoded, i: int, config: MMShapConfig, seed: int, predicted: np.ndarray) -> MMShapEstimate:
    value_fn, is_text = product_game(backend, enc, i, config.mode, predicted, config.players)
    budget, target = config.limits()
    return estimate_mm_shap(value_fn, is_text, budget, seed, target_stderr=target)


def explain(backend, enc: Encoded, config: MMShapConfig, seeds: np.ndarray,
            predicted: np.ndarray | None = None) -> Contributions:
    """MM-SHAP of every product of `enc`, product i sampled with seeds[i]."""
    b = len(enc)
    if config.off:
        return Contributions.unestimated(b, "MM-SHAP off (budget 0)")
    predicted = predicted_classes(backend, enc) if predicted is None else predicted
    return Contributions.of([explain_product(backend, enc, i, config, int(seeds[i]), predicted) for i in range(b)])
