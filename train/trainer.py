"""One training loop for all three base models, read top to bottom.

AdamW without decay on biases and norms, linear warm-up then cosine decay, label smoothing 0.1,
gradient clipping at 1.0: the standard recipe for fine-tuning BERT-style and ResNet models alike.
Images are decoded once (pre-encoded arrays) and augmented on tensors each step (random resized
crop + horizontal flip), which on a CPU is much cheaper than decoding JPEGs every epoch. The
multimodal model also gets modality dropout (each modality removed from 10% of the training
products), so it has seen products without an image or without text before it meets them, and an
image warm-up: its first quarter of epochs sees images only, and its transformer starts from the
text model's BERT (MMBT starts from a pretrained BERT too). Trained from scratch in one go, the
multimodal model learned the easy text cue and its image path barely moved (synthetic catalogue,
tiny preset: image-only classes 0.59-0.64 accuracy); with the warm-up alone it learned images and
lost the text classes (0.51); with both, text 1.00 and image 0.99. This is the unimodal-first,
staged training that the modality-imbalance literature recommends.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2
from tqdm.auto import tqdm

from pipeline.bundle import resolve_device
from pipeline.models import create_model
from pipeline.presets import get_preset
from pipeline.preprocess import Encoded

MODALITY_DROPOUT = 0.1
IMAGE_WARMUP = 0.25  # share of the multimodal model's epochs trained on images alone
LABEL_SMOOTHING = 0.1


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class Augment:
    def __init__(self, preset: dict, size: int):
        self.crop = v2.RandomResizedCrop(size, scale=tuple(preset.get("train_scale", (0.5, 1.0))), antialias=True)
        self.flip = v2.RandomHorizontalFlip()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.flip(self.crop(img)) for img in x])


def batch_inputs(kind: str, enc: Encoded, idx: np.ndarray, n_image_embeds: int, device: torch.device,
                 augment: Augment | None = None, gen: np.random.Generator | None = None,
                 text_dropout: float = MODALITY_DROPOUT) -> list[torch.Tensor]:
    """The model's positional inputs for rows idx; with gen, modality dropout for the multimodal model."""
    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    if kind == "text":
        return [t(enc.input_ids[idx]), t(enc.text_mask[idx])]
    if kind == "image":
        x = t(enc.pixel_values[idx])
        return [augment(x) if augment else x]
    text_mask = enc.text_mask[idx].copy()
    image_mask = enc.image_mask(n_image_embeds)[idx]
    if gen is not None:
        drop_text = (gen.random(len(idx)) < text_dropout) & enc.has_text[idx] & enc.has_image[idx]
        drop_image = (gen.random(len(idx)) < MODALITY_DROPOUT) & ~drop_text & enc.has_text[idx]
        lengths = text_mask.sum(1)
        for r in np.nonzero(drop_text)[0]:  # keep [CLS] and [SEP]
            text_mask[r, 1 : lengths[r] - 1] = 0
        image_mask = image_mask * ~drop_image[:, None]
    x = t(enc.clip_pixels[idx])
    return [t(enc.input_ids[idx]), t(text_mask), augment(x) if augment else x, t(image_mask)]


def fit(kind: str, preset: str | dict, enc: Encoded, y: np.ndarray, num_classes: int, *, vocab_size: int,
        seed: int = 0, device: str = "auto", epochs: int | None = None, checkpoint=None, desc: str = "",
        text_encoder: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Train one base model on encoded products; returns the model (eval mode) and its training stats.

    text_encoder: a trained BertModel whose weights start the multimodal model's transformer, as
    MMBT starts from a pretrained BERT (here: the text model just trained on the same products).
    """
    p = get_preset(preset)
    hp = dict(p["train"][kind])
    if epochs is not None:
        hp["epochs"] = epochs
    dev = resolve_device(device)
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    model = create_model(kind, p, num_classes, vocab_size=vocab_size, checkpoint=checkpoint)
    if kind == "multimodal" and text_encoder is not None:
        model.bert.load_state_dict(text_encoder.state_dict())
    model = model.to(dev)
    opt = torch.optim.AdamW(_param_groups(model, hp["weight_decay"]), lr=hp["lr"])
    steps_per_epoch = math.ceil(len(y) / hp["batch_size"])
    total = hp["epochs"] * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, total, max(1, int(hp["warmup"] * total))))
    augment = None
    if kind != "text":
        augment = Augment(p, enc.pixel_values.shape[-1] if kind == "image" else enc.clip_pixels.shape[-1])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    yt = torch.as_tensor(y, dtype=torch.long)
    started = time.perf_counter()
    model.train()
    bar = tqdm(total=total, desc=desc or kind, leave=False, mininterval=1.0)
    losses = []
    warmup_epochs = round(IMAGE_WARMUP * hp["epochs"]) if kind == "multimodal" else 0
    for epoch in range(hp["epochs"]):
        text_dropout = 1.0 if epoch < warmup_epochs else MODALITY_DROPOUT
        for idx in np.array_split(gen.permutation(len(y)), steps_per_epoch):
            inputs = batch_inputs(kind, enc, idx, p["num_image_embeds"], dev, augment,
                                  gen if kind == "multimodal" else None, text_dropout)
            with autocast:
                logits = model(*inputs)
            loss = nn.functional.cross_entropy(logits.float(), yt[idx].to(dev), label_smoothing=LABEL_SMOOTHING)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", refresh=False)
    bar.close()
    model.eval()
    return model.cpu(), {"train_s": round(time.perf_counter() - started, 1), "epochs": hp["epochs"],
                         "final_loss": float(np.mean(losses[-steps_per_epoch:]))}
