"""Deterministic grouped train/test split by hashing the group id.

A hash, not a shuffle: every command (train, evaluate, classify) and every machine puts a product
on the same side without sharing state, a streamed feed can be split row by row, and colour
variants of one product (one group_id) never straddle the split.
"""

from __future__ import annotations

import hashlib
from typing import Callable

from pipeline.errors import UserError

from pipeline.records import Product


def side(product: Product, test_fraction: float, seed: int = 0) -> str:
    key = f"{seed}:{product.group_id or product.product_id}".encode()
    u = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64
    return "test" if u < test_fraction else "train"


def keep(product: Product, split: str | None, test_fraction: float, seed: int = 0) -> bool:
    return split in (None, "all") or side(product, test_fraction, seed) == split


def split_selector(manifest: dict, split: str | None) -> Callable[[Product], bool] | None:
    """The products of one side of a bundle's --test-fraction split (None: keep all of them)."""
    if split in (None, "all"):
        return None
    extra = manifest.get("extra", {})
    if not extra.get("test_fraction"):
        raise UserError("the bundle was trained without --test-fraction: it has no held-out split")
    return lambda p: keep(p, split, extra["test_fraction"], extra.get("seed", 0))
