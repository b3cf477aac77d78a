"""Products -> model inputs (numpy), the same for training, in-process inference and Triton.

The image CNN and MMBT's image encoder are fed separately: `pixel_values` at the CNN's size with
its normalisation (ImageNet for a ResNet, 0.5/0.5 for EfficientNet-Lite), `clip_pixels` at the CLIP
tower's size with CLIP's normalisation (the paper runs ResNet-152 at 224 px and RN50x4 at 288 px).
When MMBT's image encoder is the CNN itself ("mmbt_image": "cnn"), both are the same array. A
product without an image gets zeros (the normalised mean colour) and has_image False; a product
without text gets [CLS] [SEP]. A product whose image cannot be read is an error (ImagesUnreadable),
never a silent text-only product. Encode in chunks: a paper-preset product is ~1.6 MB of pixels.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from pipeline.efficientnet import NORM as LITE_NORM
from pipeline.images import ImageError, load_image
from pipeline.presets import get_preset
from pipeline.records import Limits, Product
from pipeline.tokenizer import Tokenizer


class ImagesUnreadable(ImageError):
    """Products of a batch whose images cannot be read: failures maps product id -> its ImageError."""

    def __init__(self, failures: dict[str, ImageError]):
        first, err = next(iter(failures.items()))
        super().__init__(err.code, f"{len(failures)} product image(s) unreadable, e.g. product {first}: {err}")
        self.failures = failures

NORM = {"resnet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet (torchvision's ResNets)
        "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))}  # OpenAI CLIP


@dataclass
class Encoded:
    input_ids: np.ndarray     # (B, L) int64  [CLS] tokens [SEP] [PAD]...
    text_mask: np.ndarray     # (B, L) int64  1 = real token
    pixel_values: np.ndarray  # (B, 3, S, S) float32, ResNet input
    clip_pixels: np.ndarray   # (B, 3, S', S') float32, CLIP tower (MMBT) input
    has_text: np.ndarray      # (B,) bool
    has_image: np.ndarray     # (B,) bool

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, idx) -> "Encoded":
        """Rows by slice, index array or boolean mask."""
        return Encoded(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def image_mask(self, n: int) -> np.ndarray:
        """(B, n) int64 mask of a product's n image tokens: all 1 with an image, all 0 without."""
        return np.repeat(self.has_image[:, None], n, axis=1).astype(np.int64)


def pad_square(im: Image.Image, fill=(255, 255, 255)) -> Image.Image:
    side = max(im.size)
    return ImageOps.pad(im, (side, side), color=fill) if im.size[0] != im.size[1] else im


def image_transform(preset: str | dict, model: str, train: bool = False) -> T.Compose:
    """PIL RGB -> normalised float tensor for model "resnet" or "clip"; train adds augmentation."""
    p = get_preset(preset)
    size = image_size(p, model)
    steps = [T.Lambda(pad_square)] if p.get("fit", "crop") == "pad" else []
    if train:
        steps += [T.RandomResizedCrop(size, scale=tuple(p.get("train_scale", (0.5, 1.0))),
                                      interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                  T.RandomHorizontalFlip()]
    else:
        steps += [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(*image_norm(p, model))])


def _cnn_input(p: dict, model: str) -> bool:
    return model == "resnet" or p.get("mmbt_image") == "cnn"


def image_size(preset: str | dict, model: str) -> int:
    """Input size of the image CNN ("resnet") or of MMBT's image encoder ("clip")."""
    p = get_preset(preset)
    if _cnn_input(p, model):
        return p["efficientnet"]["image_size"] if "efficientnet" in p else p["resnet"]["image_size"]
    from pipeline.models import clip_vision_cfg  # resolves {"model": "RN50x4"}

    return clip_vision_cfg(p["clip"])["image_size"]


def image_norm(preset: str | dict, model: str) -> tuple[tuple, tuple]:
    """(mean, std) of the image CNN's ("resnet") or MMBT's image encoder's ("clip") input."""
    p = get_preset(preset)
    if _cnn_input(p, model):
        return LITE_NORM if "efficientnet" in p else NORM["resnet"]
    return NORM["clip"]


def encode_products(products: Sequence[Product], tokenizer: Tokenizer, preset: str | dict, limits: Limits = Limits(),
                    train: bool = False, workers: int = 4) -> Encoded:
    p = get_preset(preset)
    input_ids, text_mask = tokenizer.encode([x.text for x in products], p["max_length"])
    tf = {m: image_transform(p, m, train) for m in NORM if not (m == "clip" and p.get("mmbt_image") == "cnn")}

    def load(x: Product) -> dict[str, torch.Tensor] | ImageError | None:
        if not x.has_image:
            return None
        try:
            im = load_image(x.image, limits)
        except ImageError as exc:
            return exc
        return {m: t(im) for m, t in tf.items()}

    with ThreadPoolExecutor(max(1, min(workers, len(products)))) as pool:
        images = list(pool.map(load, products))
    failures = {x.product_id: im for x, im in zip(products, images) if isinstance(im, ImageError)}
    if failures:
        raise ImagesUnreadable(failures)
    pixels = {}
    for m in NORM:
        if m == "clip" and p.get("mmbt_image") == "cnn":  # the same input as the CNN's
            pixels[m] = pixels["resnet"]
            continue
        size = image_size(p, m)
        pixels[m] = np.zeros((len(products), 3, size, size), dtype=np.float32)
        for i, im in enumerate(images):
            if im is not None:
                pixels[m][i] = im[m].numpy()
    return Encoded(
        input_ids=input_ids,
        text_mask=text_mask,
        pixel_values=pixels["resnet"],
        clip_pixels=pixels["clip"],
        has_text=np.array([x.has_text for x in products], dtype=bool),
        has_image=np.array([im is not None for im in images], dtype=bool),
    )
