"""The backend interface every stage and MM-SHAP is written against, and its in-process torch form.

A backend runs five named calls on numpy arrays and returns float32 numpy: the three base models,
and MMBT's two halves (MM-SHAP token mode evaluates thousands of coalitions that differ only in
their masks, and must not rerun the image encoder for each). `Backend` holds the interface once;
`InProcessBackend` runs the calls on the bundle's torch models, serving.client.TritonBackend on a
Triton server. Everything runs in eval mode under torch.inference_mode, in chunks of batch_size
rows, with autocast (bf16 where supported, else fp16) on a GPU, except inside `with
backend.float32():`, where MM-SHAP evaluates its coalitions (bf16 spacing at |logit| 10 is 0.06,
larger than many token effects). A Triton backend runs at the server's precision.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline.bundle import Bundle, resolve_device
from pipeline.preprocess import Encoded, encode_products
from pipeline.records import Limits, Product

# the calls a backend runs (and the Triton model names they are served under)
TEXT, IMAGE, MULTIMODAL = "text", "image", "multimodal"
ENCODE_IMAGE, FUSE = "multimodal_encode_image", "multimodal_fuse"


class Backend:
    """Base-model logits and MM-SHAP's model calls over a bundle; subclasses implement `_call`."""

    def __init__(self, bundle: Bundle, batch_size: int, limits: Limits):
        self.bundle, self.batch_size, self.limits = bundle, batch_size, limits
        self.num_image_embeds = bundle.preset["num_image_embeds"]
        self.labels = bundle.labels

    def _call(self, name: str, *arrays: np.ndarray) -> np.ndarray:
        """Run the named call over row chunks of arrays; float32 (B, *output dims)."""
        raise NotImplementedError

    def _serves(self, kind: str) -> bool:
        return kind in self.bundle.manifest["models"]

    @contextmanager
    def float32(self):
        """Calls inside run in float32 where the backend can choose (in-process: no autocast)."""
        yield

    def encode(self, products: Sequence[Product]) -> Encoded:
        return encode_products(products, self.bundle.tokenizer, self.bundle.preset, self.limits)

    def base_logits(self, enc: Encoded) -> dict[str, np.ndarray]:
        """{"text", "image", "multimodal"} -> (B, K) logits, for the models the bundle holds."""
        calls = {
            "text": lambda: self._call(TEXT, enc.input_ids, enc.text_mask),
            "image": lambda: self._call(IMAGE, enc.pixel_values),
            "multimodal": lambda: self.multimodal_logits(enc.input_ids, enc.text_mask, enc.clip_pixels,
                                                         enc.image_mask(self.num_image_embeds)),
        }
        return {k: call() for k, call in calls.items() if self._serves(k)}

    def sparse_logits(self, products: Sequence[Product]) -> dict[str, np.ndarray]:
        """The bundle's sparse text models (pipeline.tfidf), always on this machine's CPU."""
        return {name: m.logits([p.text for p in products]) for name, m in self.bundle.sparse.items()}

    def image_embeddings(self, x: Encoded | np.ndarray) -> np.ndarray:
        """CLIP pixels (B, 3, S, S) or an Encoded -> MMBT image tokens (B, N, H)."""
        return self._call(ENCODE_IMAGE, x.clip_pixels if isinstance(x, Encoded) else x)

    def fusion_logits(self, input_ids: np.ndarray, text_mask: np.ndarray, image_embeds: np.ndarray,
                      image_mask: np.ndarray) -> np.ndarray:
        """MM-SHAP token mode: (B, K) from precomputed image tokens and player masks."""
        return self._call(FUSE, input_ids, text_mask, image_embeds, image_mask)

    def multimodal_logits(self, input_ids: np.ndarray, text_mask: np.ndarray, pixels: np.ndarray,
                          image_mask: np.ndarray) -> np.ndarray:
        """MM-SHAP pixel mode (and plain inference): (B, K) from CLIP pixels (patches zeroed by the caller)."""
        return self._call(MULTIMODAL, input_ids, text_mask, pixels, image_mask)


class InProcessBackend(Backend):
    def __init__(self, bundle: Bundle, device: str | torch.device = "auto", batch_size: int = 64,
                 limits: Limits = Limits()):
        super().__init__(bundle, batch_size, limits)
        self.device = resolve_device(device)
        self.models = {k: m.to(self.device).eval() for k, m in bundle.models.items()}
        self._float32 = False

    def _serves(self, kind: str) -> bool:
        return kind in self.models

    @contextmanager
    def float32(self):
        """No autocast, and no TF32 in cuDNN convolutions or matmuls (its 10-bit mantissa is bf16's problem)."""
        flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        before, self._float32 = self._float32, True
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            self._float32 = before
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags

    def _autocast(self):
        if self.device.type != "cuda" or self._float32:
            return nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def _fn(self, name: str) -> Callable[..., torch.Tensor]:
        if name in (ENCODE_IMAGE, FUSE):
            return getattr(self.models[MULTIMODAL], "encode_image" if name == ENCODE_IMAGE else "fuse")
        return self.models[name]

    def _call(self, name: str, *arrays: np.ndarray) -> np.ndarray:
        fn = self._fn(name)
        arrays = tuple(a.astype(np.float32, copy=False) if a.dtype.kind == "f" else a for a in arrays)
        n = len(arrays[0])
        if n == 0:  # run one dummy row to learn the output shape
            return self._call(name, *(np.zeros((1, *a.shape[1:]), a.dtype) for a in arrays))[:0]
        out = []
        with torch.inference_mode(), self._autocast():
            for i in range(0, n, self.batch_size):
                xs = [torch.from_numpy(np.ascontiguousarray(a[i : i + self.batch_size])).to(self.device) for a in arrays]
                out.append(fn(*xs).float().cpu().numpy())
        return np.concatenate(out)
