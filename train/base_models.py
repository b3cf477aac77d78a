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

Pretrained encoders (preset keys under "train", per kind): "encoder_lr" (the encoders' rate; "lr" is
the heads' and MMBT's image projection's: a pretrained encoder moves less than a new head),
"early_stopping" (patience in epochs: a group-disjoint "val_fraction" of the training rows is held
out, macro-F1 measured after every epoch, the best epoch's weights kept). Preset key "freeze_image":
the image CNN and MMBT's image encoder keep their pretrained weights; their features are computed
once (`frozen_features`, no augmentation: it would change the cached features) and only the
heads, MMBT's projection and its transformer train. "freeze_text": the text model's BERT keeps its
pretrained weights and only its head trains, on the cached pooled vectors (MMBT's transformer, which
starts from the same checkpoint, still fine-tunes); with "text_tune_layers": K its last K layers
fine-tune too, on the cached token states below them. On H&M MiniLM's last layer tuned so scores
above both a head on the frozen MiniLM and two epochs of fine-tuning all of it on a CPU
(docs/models.md), at about 3 minutes instead of half an hour, which is what makes the `pretrained`
preset fit a 2-core CPU; on a GPU set both to false to fine-tune the encoders whole.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
from sklearn.model_selection import GroupShuffleSplit
from torch import nn
from torchvision.transforms import v2
from tqdm.auto import tqdm

from pipeline.bundle import resolve_device
from pipeline.metrics import scores
from pipeline.models import POOL_GRID, create_model
from pipeline.presets import get_preset
from pipeline.preprocess import Encoded

MODALITY_DROPOUT = 0.1
IMAGE_WARMUP = 0.25  # share of the multimodal model's epochs trained on images alone
LABEL_SMOOTHING = 0.1


HEADS = ("classifier.", "fc.", "_fc.", "proj.")  # new layers on top of the (pretrained) encoders


def _param_groups(model: nn.Module, weight_decay: float, lr: float, encoder_lr: float) -> list[dict]:
    groups: dict[tuple[bool, bool], list] = {(h, d): [] for h in (True, False) for d in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[(name.startswith(HEADS), not (p.ndim < 2 or "norm" in name.lower()))].append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": lr if head else encoder_lr}
            for (head, decay), ps in groups.items() if ps]


def frozen_features(preset: dict, checkpoints: dict, enc: Encoded, device: str = "auto",
                    batch_size: int = 32) -> dict[str, np.ndarray]:
    """The frozen encoders' features of every product, for fit(features=...), as the preset freezes
    them: "text" (B, H) the text model's pooled vector, or with "text_tune_layers" (B, T, H + 1) the
    token states below the tuned layers (BertClassifier.frozen_states, in float16); "image" (B, C)
    the CNN's globally pooled feature map and "multimodal" (B, N, C) MMBT's pooled image cells. With
    "mmbt_image": "cnn" and one checkpoint for both, one forward pass gives both image features."""
    dev = resolve_device(device)
    out: dict[str, list] = {}
    with torch.inference_mode():
        if preset.get("freeze_text"):
            text = create_model("text", preset, 1, checkpoint=checkpoints.get("text")).to(dev).eval()
            read = text.frozen_states if text.tune_layers else text.pool
            dtype = np.float16 if text.tune_layers else np.float32  # token states: float16 halves them
            out["text"] = [read(torch.from_numpy(enc.input_ids[i : i + batch_size]).to(dev),
                                torch.from_numpy(enc.text_mask[i : i + batch_size]).to(dev)).cpu().numpy().astype(dtype)
                           for i in range(0, len(enc), batch_size)]
        if preset.get("freeze_image"):
            out.update(_frozen_image_features(preset, checkpoints, enc, dev, batch_size))
    return {k: np.concatenate(v) for k, v in out.items()}


def _frozen_image_features(preset: dict, checkpoints: dict, enc: Encoded, dev: torch.device,
                           batch_size: int) -> dict[str, list]:
    cnn = create_model("image", preset, 1, checkpoint=checkpoints.get("image")).to(dev).eval()
    shared = preset.get("mmbt_image") == "cnn" and checkpoints["multimodal"].get("image") == checkpoints.get("image")
    mm = None if shared else create_model("multimodal", preset, 1, checkpoint=checkpoints["multimodal"]).to(dev).eval()
    grid = POOL_GRID[preset["num_image_embeds"]]
    out: dict[str, list] = {"image": [], "multimodal": []}
    for i in range(0, len(enc), batch_size):
        fmap = cnn.forward_features(torch.from_numpy(enc.pixel_values[i : i + batch_size]).to(dev))
        out["image"].append(fmap.mean((2, 3)).cpu().numpy())
        if shared:
            cells = nn.functional.adaptive_avg_pool2d(fmap, grid).flatten(2).transpose(1, 2)
        else:
            cells = mm.image_features(torch.from_numpy(enc.clip_pixels[i : i + batch_size]).to(dev))
        out["multimodal"].append(cells.cpu().numpy())
    return out


def _frozen_forward(kind: str, model: nn.Module):
    """The trainable part of a model whose encoder is frozen, on cached features."""
    for p in (model.visual if kind == "multimodal" else model).parameters():
        p.requires_grad_(False)
    if kind == "text":
        for module in (model.classifier, *model.tuned):
            for p in module.parameters():
                p.requires_grad_(True)
        return model.from_features
    if kind == "image":
        for p in (model._fc if hasattr(model, "_fc") else model.fc).parameters():
            p.requires_grad_(True)
        return model.forward_head
    return lambda ids, tmask, feats, imask: model.fuse(ids, tmask, model.proj(feats), imask)


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
                 text_dropout: float = MODALITY_DROPOUT, features: np.ndarray | None = None) -> list[torch.Tensor]:
    """The model's positional inputs for rows idx; with gen, modality dropout for the multimodal model;
    with features, the frozen image encoder's cached features instead of pixels."""
    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    if kind == "text":
        return [t(enc.input_ids[idx]), t(enc.text_mask[idx])] if features is None else [t(features[idx])]
    if kind == "image":
        x = t(enc.pixel_values[idx] if features is None else features[idx])
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
    x = t(enc.clip_pixels[idx] if features is None else features[idx])
    return [t(enc.input_ids[idx]), t(text_mask), augment(x) if augment else x, t(image_mask)]


def _validation_split(y: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int):
    """Group-disjoint (train, validation) positions; no validation when it cannot be had."""
    if not fraction or groups is None or len(set(groups)) < 10:
        return np.arange(len(y)), None
    tr, va = next(GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed).split(y, y, groups))
    return tr, va


def _macro_f1(forward, kind, enc, y, rows, p, dev, autocast, features, batch_size=64) -> float:
    preds = []
    with torch.inference_mode(), autocast:
        for i in range(0, len(rows), batch_size):
            idx = rows[i : i + batch_size]
            preds.append(forward(*batch_inputs(kind, enc, idx, p["num_image_embeds"], dev, features=features))
                         .float().argmax(1).cpu().numpy())
    return scores(y[rows], np.concatenate(preds), sorted(set(y.tolist())))["macro_f1"]


def fit(kind: str, preset: str | dict, enc: Encoded, y: np.ndarray, num_classes: int, *, vocab_size: int,
        seed: int = 0, device: str = "auto", epochs: int | None = None, checkpoint=None, desc: str = "",
        text_encoder: nn.Module | None = None, groups: np.ndarray | None = None,
        features: np.ndarray | None = None) -> tuple[nn.Module, dict]:
    """Train one base model on encoded products; returns the model (eval mode) and its training stats.

    text_encoder: a trained BertModel whose weights start the multimodal model's transformer, as
    MMBT starts from a pretrained BERT (here: the text model just trained on the same products).
    groups: the products' groups, for a group-disjoint validation part (early stopping).
    features: the frozen encoder's features of these products (frozen_features).
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
    forward = model if features is None else _frozen_forward(kind, model)
    opt = torch.optim.AdamW(_param_groups(model, hp["weight_decay"], hp["lr"], hp.get("encoder_lr", hp["lr"])))
    patience = hp.get("early_stopping")
    train_rows, val_rows = _validation_split(y, groups, hp.get("val_fraction", 0.1) if patience else 0, seed)
    steps_per_epoch = math.ceil(len(train_rows) / hp["batch_size"])
    total = hp["epochs"] * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, total, max(1, int(hp["warmup"] * total))))
    augment = None
    if kind != "text" and features is None:
        augment = Augment(p, enc.pixel_values.shape[-1] if kind == "image" else enc.clip_pixels.shape[-1])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    yt = torch.as_tensor(y, dtype=torch.long)
    started = time.perf_counter()
    bar = tqdm(total=total, desc=desc or kind, leave=False, mininterval=1.0)
    losses, history, best = [], [], (-1.0, None, 0)
    warmup_epochs = round(IMAGE_WARMUP * hp["epochs"]) if kind == "multimodal" else 0
    for epoch in range(hp["epochs"]):
        model.train()
        if features is not None and kind == "multimodal":
            model.visual.eval()  # frozen: its batch norms keep their statistics
        text_dropout = 1.0 if epoch < warmup_epochs else MODALITY_DROPOUT
        for idx in np.array_split(train_rows[gen.permutation(len(train_rows))], steps_per_epoch):
            inputs = batch_inputs(kind, enc, idx, p["num_image_embeds"], dev, augment,
                                  gen if kind == "multimodal" else None, text_dropout, features)
            with autocast:
                logits = forward(*inputs)
            loss = nn.functional.cross_entropy(logits.float(), yt[idx].to(dev), label_smoothing=LABEL_SMOOTHING)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", refresh=False)
        if val_rows is not None:
            model.eval()
            f1 = _macro_f1(forward, kind, enc, y, val_rows, p, dev, autocast, features)
            history.append(round(f1, 4))
            if f1 > best[0]:
                best = (f1, copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()}), epoch)
            elif epoch - best[2] >= patience:
                break
    bar.close()
    if best[1] is not None:
        model.load_state_dict(best[1])
    model.eval()
    stats = {"train_s": round(time.perf_counter() - started, 1), "epochs": hp["epochs"],
             "final_loss": float(np.mean(losses[-steps_per_epoch:])), "frozen_encoder": features is not None}
    if history:
        stats.update(val_macro_f1=history, best_epoch=best[2] + 1, n_val=int(len(val_rows)))
    return model.cpu(), stats
