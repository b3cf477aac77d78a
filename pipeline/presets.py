"""Model presets: plain data, one dict per size. `models.create_model` is the only reader of the
architecture keys, `preprocess` of the image keys, the trainers of `train`.

Keys:
  vocab_size      WordPiece vocabulary the tokenizer is trained to (a pretrained tokenizer wins)
  max_length      text tokens per product, [CLS] and [SEP] included
  bert            transformers.BertConfig kwargs (text model and the MMBT trunk; vocab_size is
                  filled in from the tokenizer)
  resnet          image model: block ("basic" | "bottleneck"), blocks per stage, base width
                  (64 = torchvision's networks), input size in pixels
  clip            MMBT image encoder, an open_clip ModifiedResNet: either {"model": <open_clip
                  model name>} or CLIPVisionCfg kwargs (layers, width, image_size)
  num_image_embeds  image tokens MMBT gets (the CLIP feature map average-pooled to this many)
  fit             "crop" (resize the short side, centre crop: CLIP's and torchvision's recipe) or
                  "pad" (resize the long side, pad to a square with white: keeps the whole
                  product of a portrait packshot in view)
  train_scale     RandomResizedCrop scale range for training-time augmentation
  train           per model kind: epochs, lr, batch_size, weight_decay, warmup (fraction of steps)
"""

from __future__ import annotations

import copy
from typing import Any


def _train(epochs: int, lr: float, batch_size: int, weight_decay: float = 0.01, warmup: float = 0.06) -> dict:
    return dict(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, warmup=warmup)


PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: everything trains in seconds on one CPU core
    "tiny": dict(
        name="tiny",
        vocab_size=600,
        max_length=32,
        bert=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=64),
        resnet=dict(block="basic", layers=[1, 1, 1, 1], width=8, image_size=32),
        clip=dict(layers=[1, 1, 1, 1], width=8, image_size=32),
        num_image_embeds=2,
        fit="pad",
        train_scale=[0.6, 1.0],
        train=dict(text=_train(12, 3e-3, 16, warmup=0.1),
                   image=_train(12, 3e-3, 16, warmup=0.1),
                   multimodal=_train(20, 3e-3, 16, warmup=0.1)),
    ),
    # demo and real-data runs: ~8k products on a 2-core CPU in minutes, trained from scratch
    "small": dict(
        name="small",
        vocab_size=8000,
        max_length=64,
        bert=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                  max_position_embeddings=128),
        resnet=dict(block="basic", layers=[2, 2, 2, 2], width=32, image_size=96),
        clip=dict(layers=[1, 1, 1, 1], width=16, image_size=96),
        num_image_embeds=4,
        fit="pad",
        train_scale=[0.6, 1.0],
        train=dict(text=_train(5, 1e-3, 32),
                   image=_train(6, 2e-3, 32, weight_decay=0.05),
                   multimodal=_train(5, 5e-4, 32)),
    ),
    # the paper's configuration (Table I); meant for a GPU and pretrained checkpoints on disk
    "paper": dict(
        name="paper",
        vocab_size=30522,
        max_length=120,
        bert=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                  max_position_embeddings=512),
        resnet=dict(block="bottleneck", layers=[3, 8, 36, 3], width=64, image_size=224),  # ResNet-152
        clip=dict(model="RN50x4"),  # open_clip RN50x4 visual tower, 288 px
        num_image_embeds=4,
        fit="crop",
        train_scale=[0.5, 1.0],
        train=dict(text=_train(4, 2e-5, 32, warmup=0.1),
                   image=_train(10, 1e-4, 32, weight_decay=1e-4, warmup=0.05),
                   multimodal=_train(4, 5e-5, 32, warmup=0.1)),
    ),
}


def get_preset(preset: str | dict) -> dict[str, Any]:
    """A private copy of a preset, by name or as a full config dict (what a bundle's manifest holds)."""
    if isinstance(preset, dict):
        return copy.deepcopy(preset)
    try:
        return copy.deepcopy(PRESETS[preset])
    except KeyError:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})") from None
