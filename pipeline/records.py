"""The records that flow through every stage: a product, a reject, a run's limits."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Limits:
    """Input limits of a feed. Over-long text is truncated (and marked); everything else rejects."""

    allow_image_urls: bool = False
    url_timeout_s: float = 10.0
    max_image_bytes: int = 20_000_000
    max_image_pixels: int = 40_000_000
    max_id_length: int = 128
    max_title_chars: int = 1_000
    max_description_chars: int = 10_000
    verify_images: bool = True


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
    row: int
    raw_id: str | None
    reason: str


def content_hash(title: str, description: str, image_digest: str | None) -> str:
    h = hashlib.sha256()
    for part in (title, description, image_digest or ""):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()
