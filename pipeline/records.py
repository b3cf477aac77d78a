"""The records that flow through every stage: a product, a reject, a feed's limits, and what the
infer stage hands to the stack stage and the database."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pipeline.manifest import KINDS  # noqa: F401  (re-exported: the records' readers use it)


# the database's column sizes (db/models.py): a value over them is never sent to the database
ID_COLUMN_CHARS = 128  # products.product_id
LABEL_COLUMN_CHARS = 256  # products.label, products.group_id


@dataclass(frozen=True)
class Limits:
    """Input limits of a feed (docs/ingest.md). Over-long title, description and attribute values
    are truncated (and marked in attributes["_truncated"]); everything else that breaks a limit
    rejects its row."""

    # images
    allow_image_urls: bool = False
    url_timeout_s: float = 10.0  # total deadline of one image fetch: connect, redirects, every byte
    url_allowed_hosts: tuple[str, ...] = ()  # when set, only these host names (exact, lower case) are fetched
    url_max_redirects: int = 3
    url_allow_networks: tuple[str, ...] = ()  # networks fetched although not global (an internal CDN)
    max_image_bytes: int = 20_000_000
    max_image_pixels: int = 40_000_000
    verify_images: bool = True
    image_store: str | None = None  # snapshot folder; None: next to the SQLite file, else ./shapstack-images
    # rows
    max_id_length: int = 128
    max_title_chars: int = 1_000
    max_description_chars: int = 10_000
    max_record_chars: int = 1_000_000  # one CSV record (characters) or JSONL line (bytes)
    max_record_lines: int = 1_000  # physical lines of one CSV record (quoted newlines)
    max_json_depth: int = 16
    max_attributes: int = 64  # extra columns kept per product
    max_attribute_chars: int = 1_000  # one extra column's value (longer: truncated)
    max_attributes_bytes: int = 64_000  # all extra columns of a product as JSON


@dataclass(frozen=True)
class Product:
    product_id: str
    title: str
    description: str
    image: str | None  # absolute path inside the feed folder, or an http(s) URL
    label: str | None = None
    group_id: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    row: int = 0
    content_hash: str = ""

    @property
    def text(self) -> str:
        """What the text models read: title and description joined."""
        if self.title and self.description:
            return f"{self.title}. {self.description}"
        return self.title or self.description

    @property
    def has_text(self) -> bool:
        return bool(self.title or self.description)

    @property
    def has_image(self) -> bool:
        return self.image is not None


@dataclass(frozen=True)
class Reject:
    """A feed row that is not a product. code: a short stable name of the rule the row broke
    (e.g. "csv_record_too_large", "url_not_global"); reason: the same in words, for people. Neither
    ever holds text a remote server sent."""

    row: int
    raw_id: str | None
    reason: str
    code: str = "invalid"


def content_hash(title: str, description: str, image_digest: str | None) -> str:
    h = hashlib.sha256()
    for part in (title, description, image_digest or ""):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def _nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def _none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


@dataclass
class Contributions:
    """Per-product MM-SHAP of a batch. NaN in a float array is NULL (no estimate; see reason).

    t_shap: debiased share of |Shapley| of the text players; stderr its error bar (+-2 stderr is
    a ~95% interval); method exact | antithetic | permutation | amortized | none; met_target: the
    target stderr was reached; phi_text, phi_image, game_text_share: the exact two-player modality
    game (amortized: game_text_share predicted, phi NULL); audit_t_shap, audit_stderr: the sampled
    estimate of an amortized product picked for the audit (pipeline.amortized), else NULL.
    """

    t_shap: np.ndarray
    stderr: np.ndarray
    n_players: np.ndarray
    n_evaluations: np.ndarray
    method: list[str]
    met_target: np.ndarray
    reason: list[str | None]
    phi_text: np.ndarray
    phi_image: np.ndarray
    game_text_share: np.ndarray
    audit_t_shap: np.ndarray | None = None
    audit_stderr: np.ndarray | None = None

    FIELDS = ("t_shap", "stderr", "n_players", "n_evaluations", "method", "met_target", "reason",
              "phi_text", "phi_image", "game_text_share", "audit_t_shap", "audit_stderr")

    def __post_init__(self) -> None:
        for name in ("audit_t_shap", "audit_stderr"):
            if getattr(self, name) is None:
                setattr(self, name, np.full(len(self.t_shap), np.nan))

    @property
    def v_shap(self) -> np.ndarray:
        return 1.0 - self.t_shap

    def __len__(self) -> int:
        return len(self.t_shap)

    @classmethod
    def of(cls, estimates: Sequence[Any]) -> "Contributions":
        """From pipeline.shapley.MMShapEstimate objects."""
        game = [e.modality_game or {} for e in estimates]
        return cls(np.array([_nan(e.t_shap) for e in estimates], float),
                   np.array([_nan(e.stderr) for e in estimates], float),
                   np.array([e.n_players for e in estimates], int), np.array([e.n_evaluations for e in estimates], int),
                   [e.method for e in estimates], np.array([e.met_target for e in estimates], bool),
                   [e.reason for e in estimates], np.array([_nan(g.get("phi_text")) for g in game], float),
                   np.array([_nan(g.get("phi_image")) for g in game], float),
                   np.array([_nan(g.get("text_share")) for g in game], float))

    @classmethod
    def unestimated(cls, b: int, reason: str) -> "Contributions":
        nan = np.full(b, np.nan)
        return cls(nan, nan.copy(), np.zeros(b, int), np.zeros(b, int), ["none"] * b, np.zeros(b, bool),
                   [reason] * b, nan.copy(), nan.copy(), nan.copy())

    @classmethod
    def concat(cls, parts: Sequence["Contributions"]) -> "Contributions":
        def join(name):
            values = [getattr(p, name) for p in parts]
            return sum(values, []) if isinstance(values[0], list) else np.concatenate(values)
        return cls(*(join(f) for f in cls.FIELDS))

    def row(self, i: int) -> dict[str, Any]:
        """Product i as database columns: NULL (None) where there is no value."""
        t = _none(self.t_shap[i])
        return {"t_shap": t, "v_shap": None if t is None else 1.0 - t, "stderr": _none(self.stderr[i]),
                "n_players": int(self.n_players[i]), "n_evaluations": int(self.n_evaluations[i]),
                "method": self.method[i], "met_target": bool(self.met_target[i]), "reason": self.reason[i],
                "phi_text": _none(self.phi_text[i]), "phi_image": _none(self.phi_image[i]),
                "game_text_share": _none(self.game_text_share[i]),
                "audit_t_shap": _none(self.audit_t_shap[i]), "audit_stderr": _none(self.audit_stderr[i])}

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]]) -> "Contributions":
        def floats(name):
            return np.array([_nan(r[name]) for r in rows], float)
        return cls(floats("t_shap"), floats("stderr"), np.array([r["n_players"] or 0 for r in rows], int),
                   np.array([r["n_evaluations"] for r in rows], int), [r["method"] for r in rows],
                   np.array([bool(r["met_target"]) for r in rows], bool), [r["reason"] for r in rows],
                   floats("phi_text"), floats("phi_image"), floats("game_text_share"),
                   floats("audit_t_shap"), floats("audit_stderr"))


@dataclass
class Inferred:
    """A batch after the infer stage: what the stack stage and the database need."""

    logits: dict[str, np.ndarray]  # kind -> (B, K)
    contributions: Contributions
    has_text: np.ndarray
    has_image: np.ndarray
