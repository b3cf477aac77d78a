"""The Triton models a bundle becomes: names, inputs, outputs. One table for export, serve and client.

The ONNX repository (serving.export), the PyTriton server (serving.server) and the client
(serving.client) all read this table, so a TritonBackend talks to either without knowing which.
Beyond one model per base learner, MMBT is also split into its two halves: MM-SHAP token mode
evaluates thousands of coalitions per batch that differ only in their masks, and must not rerun
the CLIP tower for each of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from torch import nn

from pipeline.backend import ENCODE_IMAGE, FUSE, IMAGE, MULTIMODAL, TEXT
from pipeline.bundle import Bundle
from pipeline.preprocess import image_size

# every served model carries the id of the bundle it came from (a model config parameter), which
# the client checks on connect and after every reconnect
BUNDLE_PARAMETER = "shapstack_bundle_id"

INT, FLOAT = np.dtype(np.int64), np.dtype(np.float32)
TRITON_DTYPES = {INT: "TYPE_INT64", FLOAT: "TYPE_FP32"}
WIRE_DTYPES = {INT: "INT64", FLOAT: "FP32"}  # tritonclient's names


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: np.dtype
    dims: tuple[int, ...]  # per row: the batch dimension is Triton's (max_batch_size > 0)


@dataclass(frozen=True)
class Signature:
    name: str  # the Triton model name
    kind: str  # the bundle model it runs
    method: str | None  # None: the model's forward; else one of its methods (MMBT's halves)
    inputs: tuple[Tensor, ...]  # in the order the torch callable takes them
    output: Tensor

    def torch_fn(self, models: dict[str, nn.Module]) -> Callable:
        model = models[self.kind]
        return getattr(model, self.method) if self.method else model




def signatures(bundle: Bundle) -> dict[str, Signature]:
    """The models this bundle serves (the multimodal three only when it holds an MMBT)."""
    p, k = bundle.preset, (len(bundle.labels),)
    length, n = (p["max_length"],), p["num_image_embeds"]
    logits = Tensor("logits", FLOAT, k)
    ids, text_mask = Tensor("input_ids", INT, length), Tensor("text_mask", INT, length)
    clip = Tensor("pixel_values", FLOAT, (3, image_size(p, "clip"), image_size(p, "clip")))
    image_mask = Tensor("image_mask", INT, (n,))
    out: dict[str, Signature] = {}
    kinds = set(bundle.manifest["models"])
    if "text" in kinds:
        out[TEXT] = Signature(TEXT, "text", None, (ids, Tensor("attention_mask", INT, length)), logits)
    if "image" in kinds:
        size = image_size(p, "resnet")
        out[IMAGE] = Signature(IMAGE, "image", None, (Tensor("pixel_values", FLOAT, (3, size, size)),), logits)
    if "multimodal" in kinds:
        hidden = bundle.manifest["models"]["multimodal"]["arch"]["bert"]["hidden_size"]
        embeds = Tensor("image_embeds", FLOAT, (n, hidden))
        out[MULTIMODAL] = Signature(MULTIMODAL, "multimodal", None, (ids, text_mask, clip, image_mask), logits)
        out[ENCODE_IMAGE] = Signature(ENCODE_IMAGE, "multimodal", "encode_image", (clip,), embeds)
        out[FUSE] = Signature(FUSE, "multimodal", "fuse", (ids, text_mask, embeds, image_mask), logits)
    return out
