"""A bundle's manifest on disk: reading it, its content hash and id, checked file references.

Light on purpose (json and hashlib only): the CLI and the workers check a bundle folder, and
name a bundle by its id, without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

FORMAT, FORMAT_VERSION = "shapstack-bundle", 1
MANIFEST, TOKENIZER = "manifest.json", "tokenizer.json"
# the neural base learners, in the order every table, stacker and bundle uses (others follow by name)
KINDS = ("text", "image", "multimodal")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class BundleError(UserError):
    """A bundle folder that is missing, incomplete or altered."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def content_hash(manifest: dict) -> str:
    core = {k: manifest[k] for k in ("preset", "labels", "tokenizer_sha256")}
    core["models"] = {k: {"arch": v["arch"], "sha256": v["sha256"]} for k, v in manifest["models"].items()}
    if manifest.get("sparse"):  # absent from bundles without one, whose ids stay what they were
        core["sparse"] = {k: {"sha256": v["sha256"], "vocab_sha256": v["vocab_sha256"]} for k, v in manifest["sparse"].items()}
    return hashlib.sha256(_canonical(core)).hexdigest()


def ordered_kinds(names) -> list[str]:
    """Base model names in the order stackers use: KINDS' order first, then any others by name."""
    names = set(names)
    return [k for k in KINDS if k in names] + sorted(names - set(KINDS))


def base_kinds(manifest: dict) -> list[str]:
    """A bundle's base models (neural and sparse) in the order stackers use."""
    return ordered_kinds([*manifest["models"], *manifest.get("sparse", {})])


def bundle_id(manifest: dict) -> str:
    """A bundle's short id: what runs, model_versions rows and Triton repositories name it by."""
    return manifest["content_hash"][:16]


def write_manifest(path: Path, manifest: dict) -> None:
    tmp = path / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, path / MANIFEST)


def read_manifest(path: str | Path) -> dict:
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: no readable {MANIFEST}: {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version", 99) > FORMAT_VERSION:
        raise BundleError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} bundle")
    return manifest


def checked_file(path: Path, file: str, sha: str) -> Path:
    full = path / file
    if Path(file).name != file or not full.is_file():
        raise BundleError(f"{path}: missing file {file!r}")
    if sha256_file(full) != sha:
        raise BundleError(f"{path}: {file} does not match its hash in the manifest")
    return full


def require_bundle(path: str | os.PathLike | None) -> str:
    """The bundle folder a command was given, checked to hold a readable manifest (UserError if not)."""
    if not path:
        raise UserError("no model bundle: pass --bundle or set SHAPSTACK_BUNDLE")
    read_manifest(path)
    return str(path)
