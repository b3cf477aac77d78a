"""In-process inference over a bundle: numpy in, float32 numpy out.

The Triton backend (serving/) implements the same methods, so stages and MM-SHAP are written
against this interface only. Everything runs in eval mode under torch.inference_mode, in chunks
of batch_size rows, with autocast (bf16 where supported, else fp16) on a GPU.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline.bundle import Bundle, resolve_device
from pipeline.preprocess import Encoded, encode_products
from pipeline.records import Limits, Product


class InProcessBackend:
    def __init__(self, bundle: Bundle, device: str | torch.device = "auto", batch_size: int = 64,
                 limits: Limits = Limits()):
        self.bundle, self.batch_size, self.limits = bundle, batch_size, limits
        self.device = resolve_device(device)
        self.models = {k: m.to(self.device).eval() for k, m in bundle.models.items()}
        self.num_image_embeds = bundle.preset["num_image_embeds"]
        self.labels = bundle.labels

    def _autocast(self):
        if self.device.type != "cuda":
            return nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def _run(self, fn: Callable[..., torch.Tensor], *arrays: np.ndarray) -> np.ndarray:
        """fn over row chunks of the arrays, results concatenated as float32 numpy."""
        arrays = tuple(a.astype(np.float32, copy=False) if a.dtype.kind == "f" else a for a in arrays)
        n = len(arrays[0])
        if n == 0:  # run one dummy row to learn the output shape
            return self._run(fn, *(np.zeros((1, *a.shape[1:]), a.dtype) for a in arrays))[:0]
        out = []
        with torch.inference_mode(), self._autocast():
            for i in range(0, n, self.batch_size):
                xs = [torch.from_numpy(np.ascontiguousarray(a[i : i + self.batch_size])).to(self.device) for a in arrays]
                out.append(fn(*xs).float().cpu().numpy())
        return np.concatenate(out)

    def encode(self, products: Sequence[Product]) -> Encoded:
        return encode_products(products, self.bundle.tokenizer, self.bundle.preset, self.limits)

    def base_logits(self, enc: Encoded) -> dict[str, np.ndarray]:
        """{"text", "image", "multimodal"} -> (B, K) logits, for the models the bundle holds."""
        calls = {
            "text": lambda: self._run(self.models["text"], enc.input_ids, enc.text_mask),
            "image": lambda: self._run(self.models["image"], enc.pixel_values),
            "multimodal": lambda: self.multimodal_logits(enc.input_ids, enc.text_mask, enc.clip_pixels,
                                                         enc.image_mask(self.num_image_embeds)),
        }
        return {k: calls[k]() for k in calls if k in self.models}

    def image_embeddings(self, x: Encoded | np.ndarray) -> np.ndarray:
        """CLIP pixels (B, 3, S, S) or an Encoded -> MMBT image tokens (B, N, H)."""
        pixels = x.clip_pixels if isinstance(x, Encoded) else x
        return self._run(self.models["multimodal"].encode_image, pixels)

    def fusion_logits(self, input_ids: np.ndarray, text_mask: np.ndarray, image_embeds: np.ndarray,
                      image_mask: np.ndarray) -> np.ndarray:
        """MM-SHAP token mode: (B, K) from precomputed image tokens and player masks."""
        return self._run(self.models["multimodal"].fuse, input_ids, text_mask, image_embeds, image_mask)

    def multimodal_logits(self, input_ids: np.ndarray, text_mask: np.ndarray, pixels: np.ndarray,
                          image_mask: np.ndarray) -> np.ndarray:
        """MM-SHAP pixel mode (and plain inference): (B, K) from CLIP pixels (patches zeroed by the caller)."""
        return self._run(self.models["multimodal"], input_ids, text_mask, pixels, image_mask)
