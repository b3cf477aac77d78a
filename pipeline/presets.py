"""Model presets: plain data, one JSON file per preset in pipeline/model_configs/ (as open_clip's
model_configs). `models.create_model` is the only reader of the architecture keys, `preprocess` of
the image keys, the trainers of `train`. A new preset is a new JSON file; nothing else changes.

Keys:
  vocab_size      WordPiece vocabulary the tokenizer is trained to (a pretrained tokenizer wins)
  max_length      text tokens per product, [CLS] and [SEP] included
  bert            transformers.BertConfig kwargs (text model and the MMBT trunk; vocab_size is
                  filled in from the tokenizer)
  resnet          image model: block ("basic" | "bottleneck"), blocks per stage, base width
                  (64 = torchvision's networks), input size in pixels
  efficientnet    image model instead of resnet: {"variant": "lite0", "image_size": 224}
  clip            MMBT image encoder, an open_clip ModifiedResNet: either {"model": <open_clip
                  model name>} or CLIPVisionCfg kwargs (layers, width, image_size)
  mmbt_image      "clip" (default: the clip tower) or "cnn": MMBT's image tokens come from the image
                  model's architecture and checkpoint (its feature map, pooled), as in MMBT's paper
  num_image_embeds  image tokens MMBT gets (the image encoder's feature map average-pooled to this many)
  checkpoints     optional {"text" | "image" | "clip": registry name or path} (pipeline.pretrained);
                  the CLI's --text-checkpoint & co. override them
  text_pooling    "pooler" (BERT's [CLS] pooler, default) or "mean" (over present tokens: what
                  sentence-transformers checkpoints such as all-MiniLM-L6-v2 were trained with)
  freeze_image    true: the image CNN and MMBT's image encoder keep their pretrained weights and
                  their features are computed once (what makes the pretrained preset fit a CPU)
  freeze_text     true: the text model's BERT keeps its pretrained weights, its pooled vectors are
                  computed once and only its head trains (MMBT's transformer still fine-tunes)
  text_tune_layers  with "freeze_text" (and "text_pooling": "mean"): the text BERT's last this many
                  layers fine-tune as well, on the token states below them, computed once
  fit             "crop" (resize the short side, centre crop: CLIP's and torchvision's recipe) or
                  "pad" (resize the long side, pad to a square with white: keeps the whole
                  product of a portrait packshot in view)
  train_scale     RandomResizedCrop scale range for training-time augmentation
  train           per model kind: epochs, lr, batch_size, weight_decay, warmup (fraction of steps);
                  optional encoder_lr (the pretrained encoders' rate, lr being the heads'),
                  early_stopping (patience in epochs) and val_fraction (group-disjoint validation part)
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

CONFIG_DIR = Path(__file__).parent / "model_configs"


@cache
def _presets() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(CONFIG_DIR.glob("*.json"))}


def preset_names() -> list[str]:
    """The presets shipped with shapstack (for click choices and error messages)."""
    return list(_presets())


def get_preset(preset: str | dict) -> dict[str, Any]:
    """A private copy of a preset, by name or as a full config dict (what a bundle's manifest holds)."""
    if isinstance(preset, dict):
        return copy.deepcopy(preset)
    try:
        return copy.deepcopy(_presets()[preset])
    except KeyError:
        raise UserError(f"unknown preset {preset!r} (choose from {', '.join(preset_names())})") from None
