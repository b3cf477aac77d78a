"""Model bundle: one folder, pure data (JSON + safetensors); loading never executes code from it.

  manifest.json        format, preset (name and full config), labels, tokenizer file, preprocessing,
                       models {kind: file, arch, sha256}, artifacts {name: file, type, sha256},
                       checkpoints {text|image|clip: path, sha256} the pretrained weights started from
                       (for provenance only: the trained weights are in the bundle),
                       library versions, training metrics, extra, created, content_hash
  tokenizer.json       the WordPiece tokenizer
  text.safetensors  image.safetensors  multimodal.safetensors
  tfidf.safetensors  tfidf.vocab.json   the sparse text learner, when trained (pipeline.tfidf;
                       manifest "sparse" {name: files, num_classes, sha256s})
  <name>.safetensors | <name>.json   artefacts added later (a stacker's weights, its config ...)

content_hash is a SHA-256 over everything that determines the base models' outputs (preset,
labels, tokenizer, each model's architecture and weights); the bundle_id is its first 16 hex
digits. Artefacts carry their own hashes and do not change the bundle_id, so base logits cached
under a bundle_id stay valid when a stacker is added.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from pipeline.manifest import (FORMAT, FORMAT_VERSION, MANIFEST, NAME, TOKENIZER, BundleError, base_kinds, bundle_id,
                               checked_file, content_hash, read_manifest, sha256_file, write_manifest)
from pipeline.models import create_model
from pipeline.presets import get_preset
from pipeline.preprocess import NORM, image_norm, image_size
from pipeline.records import KINDS
from pipeline.tfidf import TfidfModel
from pipeline.tokenizer import Tokenizer

def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def versions() -> dict[str, str]:
    import open_clip
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "open_clip": open_clip.__version__}


def preprocessing(preset: dict) -> dict:
    """What a client (e.g. a Triton caller) must reproduce outside Python's pipeline.preprocess."""
    images = {m: {"size": image_size(preset, m), "mean": list(image_norm(preset, m)[0]),
                  "std": list(image_norm(preset, m)[1])} for m in NORM}
    return {"max_length": preset["max_length"], "fit": preset.get("fit", "crop"), "resample": "bicubic",
            "text_layout": "[CLS] tokens [SEP] [PAD]...", "num_image_embeds": preset["num_image_embeds"], **images}


def save_bundle(path: str | Path, *, preset: str | dict, labels: list[str], tokenizer: Tokenizer,
                models: dict[str, nn.Module], metrics: dict | None = None, extra: dict | None = None,
                checkpoints: dict | None = None, sparse: dict[str, TfidfModel] | None = None,
                overwrite: bool = False) -> dict:
    path, preset = Path(path), get_preset(preset)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise BundleError(f"{path} exists and is not empty (pass overwrite=True)")
    if len(set(labels)) != len(labels):
        raise BundleError("labels must be unique")
    path.mkdir(parents=True, exist_ok=True)
    for old in [*path.glob("*.safetensors"), *path.glob("*.vocab.json")]:  # an overwritten bundle keeps no stale weights or artefacts
        old.unlink()
    entries = {}
    for kind, model in models.items():
        if kind not in KINDS or getattr(model, "arch", {}).get("num_classes") != len(labels):
            raise BundleError(f"model {kind!r}: unknown kind, or not built by create_model for {len(labels)} labels")
        save_model(model, str(path / f"{kind}.safetensors"))
        entries[kind] = {"file": f"{kind}.safetensors", "arch": model.arch,
                         "sha256": sha256_file(path / f"{kind}.safetensors")}
    sparse_entries = {}
    for name, model in (sparse or {}).items():
        if model.n_classes != len(labels):
            raise BundleError(f"sparse model {name!r} has {model.n_classes} classes, not {len(labels)}")
        files = model.save(path, name)
        sparse_entries[name] = {**files, "num_classes": model.n_classes, "sha256": sha256_file(path / files["file"]),
                                "vocab_sha256": sha256_file(path / files["vocab"])}
    tokenizer.save(path / TOKENIZER)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "preset_name": preset.get("name"), "preset": preset, "labels": list(labels),
        "tokenizer": TOKENIZER, "tokenizer_sha256": sha256_file(path / TOKENIZER),
        "preprocessing": preprocessing(preset), "models": entries,
        **({"sparse": sparse_entries} if sparse_entries else {}), "artifacts": {},
        "versions": versions(), "metrics": metrics or {}, "extra": extra or {}, "checkpoints": checkpoints or {},
    }
    manifest["content_hash"] = content_hash(manifest)
    write_manifest(path, manifest)
    return manifest


@dataclass
class Bundle:
    path: Path
    manifest: dict
    tokenizer: Tokenizer
    models: dict[str, nn.Module]
    device: torch.device
    sparse: dict[str, TfidfModel] = field(default_factory=dict)  # base models run on the CPU beside the backend
    preset: dict = field(init=False)
    labels: list[str] = field(init=False)

    def __post_init__(self):
        self.preset, self.labels = self.manifest["preset"], self.manifest["labels"]

    @property
    def kinds(self) -> list[str]:
        """Every base model, in the order stackers use."""
        return base_kinds(self.manifest)

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    @property
    def bundle_id(self) -> str:
        return bundle_id(self.manifest)

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
    tokenizer = Tokenizer.load(checked_file(path, manifest["tokenizer"], manifest["tokenizer_sha256"]))
    models = {}
    for kind, entry in manifest["models"].items():
        if kinds is not None and kind not in kinds:
            continue
        arch = entry["arch"]
        model = create_model(kind, {**manifest["preset"], **arch}, arch["num_classes"])
        load_model(model, str(checked_file(path, entry["file"], entry["sha256"])), strict=True)
        models[kind] = model.to(device).eval()
    sparse = {name: TfidfModel.load(checked_file(path, e["file"], e["sha256"]), checked_file(path, e["vocab"], e["vocab_sha256"]))
              for name, e in manifest.get("sparse", {}).items()}
    return Bundle(path, manifest, tokenizer, models, device, sparse)


def save_artifact(path: str | Path, name: str, obj: dict) -> dict:
    """A dict of tensors/arrays -> <name>.safetensors; any other JSON-able dict -> <name>.json."""
    path = Path(path)
    manifest = read_manifest(path)
    if not NAME.match(name) or name in KINDS or name in manifest.get("sparse", {}) or name in ("manifest", "tokenizer"):
        raise BundleError(f"bad artefact name {name!r}")
    tensors = bool(obj) and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in obj.values())
    file = f"{name}.safetensors" if tensors else f"{name}.json"
    if tensors:
        save_file({k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in obj.items()}, str(path / file))
    else:
        (path / file).write_text(json.dumps(obj, indent=2, sort_keys=True))
    manifest["artifacts"][name] = {"file": file, "type": "tensors" if tensors else "json",
                                   "sha256": sha256_file(path / file)}
    write_manifest(path, manifest)
    return manifest


def load_artifact(path: str | Path, name: str) -> Any:
    path = Path(path)
    entry = read_manifest(path)["artifacts"].get(name)
    if entry is None:
        raise BundleError(f"{path}: no artefact {name!r}")
    full = checked_file(path, entry["file"], entry["sha256"])
    return load_file(str(full)) if entry["type"] == "tensors" else json.loads(full.read_text())
