"""The model options `train` and `retrain` share: --text-checkpoint / --image-checkpoint /
--clip-checkpoint, and --tfidf/--no-tfidf."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

from pipeline.pretrained import REGISTRY

_NAMES = ", ".join(REGISTRY)
OPTIONS = (
    ("text", "--text-checkpoint", "DIR", "A Hugging Face BertModel folder (its tokenizer comes with it)"),
    ("image", "--image-checkpoint", "FILE", "A torchvision ResNet or EfficientNet-Lite0 state dict (.pth/.safetensors)"),
    ("clip", "--clip-checkpoint", "FILE", "An open_clip CLIP state dict: its visual tower gives MMBT's image tokens"),
)


def checkpoint_options(command: Callable) -> Callable:
    for slot, flag, metavar, text in reversed(OPTIONS):
        command = click.option(flag, f"{slot}_checkpoint", metavar=metavar,
                               help=f"{text}; or a registry name ({_NAMES}). Overrides the preset's.")(command)
    return command


def checkpoints_of(text_checkpoint: str | None, image_checkpoint: str | None, clip_checkpoint: str | None) -> dict:
    """slot -> registry name or absolute path (a worker elsewhere reads the same path)."""
    given = {"text": text_checkpoint, "image": image_checkpoint, "clip": clip_checkpoint}
    return {slot: ref if ref in REGISTRY else str(Path(ref).resolve()) for slot, ref in given.items() if ref}


tfidf_option = click.option(
    "--tfidf/--no-tfidf", default=None,
    help="Stack a fourth base model, TF-IDF + logistic regression (default: as the preset says).")
