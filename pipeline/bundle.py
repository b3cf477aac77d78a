"""Model bundle: one folder, pure data (JSON + safetensors); loading never executes code from it.

  manifest.json        format, preset (name and full config), labels, tokenizer file, preprocessing,
                       models {kind: file, arch, sha256}, artifacts {name: file, type, sha256},
                       library versions, training metrics, extra, created, content_hash
  tokenizer.json       the WordPiece tokenizer
  text.safetensors  image.safetensors  multimodal.safetensors
  <name>.safetensors | <name>.json   artefacts added later (a stacker's weights, its config ...)

content_hash is a SHA-256 over everything that determines the base models' outputs (preset,
labels, tokenizer, each model's architecture and weights); the bundle_id is its first 16 hex
digits. Artefacts carry their own hashes and do not change the bundle_id, so base logits cached
under a bundle_id stay valid when a stacker is added.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from pipeline.models import KINDS, create_model
from pipeline.presets import get_preset
from pipeline.preprocess import NORM, image_size
from pipeline.tokenizer import Tokenizer

FORMAT, FORMAT_VERSION = "shapstack-bundle", 1
MANIFEST, TOKENIZER = "manifest.json", "tokenizer.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class BundleError(ValueError):
    pass


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
    return hashlib.sha256(_canonical(core)).hexdigest()


def _write_manifest(path: Path, manifest: dict) -> None:
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


def _checked(path: Path, file: str, sha: str) -> Path:
    full = path / file
    if Path(file).name != file or not full.is_file():
        raise BundleError(f"{path}: missing file {file!r}")
    if sha256_file(full) != sha:
        raise BundleError(f"{path}: {file} does not match its hash in the manifest")
    return full


def versions() -> dict[str, str]:
    import open_clip
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "open_clip": open_clip.__version__}


def preprocessing(preset: dict) -> dict:
    """What a client (e.g. a Triton caller) must reproduce outside Python's pipeline.preprocess."""
    images = {m: {"size": image_size(preset, m), "mean": list(NORM[m][0]), "std": list(NORM[m][1])} for m in NORM}
    return {"max_length": preset["max_length"], "fit": preset.get("fit", "crop"), "resample": "bicubic",
            "text_layout": "[CLS] tokens [SEP] [PAD]...", "num_image_embeds": preset["num_image_embeds"], **images}


def save_bundle(path: str | Path, *, preset: str | dict, labels: list[str], tokenizer: Tokenizer,
                models: dict[str, nn.Module], metrics: dict | None = None, extra: dict | None = None,
                overwrite: bool = False) -> dict:
    path, preset = Path(path), get_preset(preset)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise BundleError(f"{path} exists and is not empty (pass overwrite=True)")
    if len(set(labels)) != len(labels):
        raise BundleError("labels must be unique")
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.safetensors"):  # an overwritten bundle keeps no stale weights or artefacts
        old.unlink()
    entries = {}
    for kind, model in models.items():
        if kind not in KINDS or getattr(model, "arch", {}).get("num_classes") != len(labels):
            raise BundleError(f"model {kind!r}: unknown kind, or not built by create_model for {len(labels)} labels")
        save_model(model, str(path / f"{kind}.safetensors"))
        entries[kind] = {"file": f"{kind}.safetensors", "arch": model.arch,
                         "sha256": sha256_file(path / f"{kind}.safetensors")}
    tokenizer.save(path / TOKENIZER)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "preset_name": preset.get("name"), "preset": preset, "labels": list(labels),
        "tokenizer": TOKENIZER, "tokenizer_sha256": sha256_file(path / TOKENIZER),
        "preprocessing": preprocessing(preset), "models": entries, "artifacts": {},
        "versions": versions(), "metrics": metrics or {}, "extra": extra or {},
    }
    manifest["content_hash"] = content_hash(manifest)
    _write_manifest(path, manifest)
    return manifest


@dataclass
class Bundle:
    path: Path
    manifest: dict
    tokenizer: Tokenizer
    models: dict[str, nn.Module]
    device: torch.device
    preset: dict = field(init=False)
    labels: list[str] = field(init=False)

    def __post_init__(self):
        self.preset, self.labels = self.manifest["preset"], self.manifest["labels"]

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    @property
    def bundle_id(self) -> str:
        return self.content_hash[:16]

    def save_artifact(self, name: str, obj: Any) -> None:
        self.manifest = save_artifact(self.path, name, obj)

    def load_artifact(self, name: str) -> Any:
        return load_artifact(self.path, name)


def load_bundle(path: str | Path, device: str | torch.device = "auto", kinds: Iterable[str] | None = None) -> Bundle:
    """Rebuild each model from its recorded architecture and load its checked safetensors weights."""
    path, device = Path(path), resolve_device(device)
    manifest = read_manifest(path)
    if content_hash(manifest) != manifest["content_hash"]:
        raise BundleError(f"{path}: manifest content does not match its content_hash")
    tokenizer = Tokenizer.load(_checked(path, manifest["tokenizer"], manifest["tokenizer_sha256"]))
    models = {}
    for kind, entry in manifest["models"].items():
        if kinds is not None and kind not in kinds:
            continue
        arch = entry["arch"]
        model = create_model(kind, {**manifest["preset"], **arch}, arch["num_classes"])
        load_model(model, str(_checked(path, entry["file"], entry["sha256"])), strict=True)
        models[kind] = model.to(device).eval()
    return Bundle(path, manifest, tokenizer, models, device)


def save_artifact(path: str | Path, name: str, obj: dict) -> dict:
    """A dict of tensors/arrays -> <name>.safetensors; any other JSON-able dict -> <name>.json."""
    path = Path(path)
    manifest = read_manifest(path)
    if not NAME.match(name) or name in KINDS or name in ("manifest", "tokenizer"):
        raise BundleError(f"bad artefact name {name!r}")
    tensors = bool(obj) and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in obj.values())
    file = f"{name}.safetensors" if tensors else f"{name}.json"
    if tensors:
        save_file({k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in obj.items()}, str(path / file))
    else:
        (path / file).write_text(json.dumps(obj, indent=2, sort_keys=True))
    manifest["artifacts"][name] = {"file": file, "type": "tensors" if tensors else "json",
                                   "sha256": sha256_file(path / file)}
    _write_manifest(path, manifest)
    return manifest


def load_artifact(path: str | Path, name: str) -> Any:
    path = Path(path)
    entry = read_manifest(path)["artifacts"].get(name)
    if entry is None:
        raise BundleError(f"{path}: no artefact {name!r}")
    full = _checked(path, entry["file"], entry["sha256"])
    return load_file(str(full)) if entry["type"] == "tensors" else json.loads(full.read_text())
