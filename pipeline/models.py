"""The three base learners, built from a preset (no downloads), optionally from local checkpoints.

  text        BERT + linear head                       forward(input_ids, attention_mask) -> (B, K)
  image       torchvision ResNet or EfficientNet-Lite0 forward(pixel_values) -> (B, K)
  multimodal  MMBT: a BERT over [CLS] [img_1..img_N] [text tokens ... SEP], the image tokens
              being an image encoder's feature map average-pooled to N cells and projected to
              BERT's width; head on [CLS] (BERT's pooler) or on the mean of the present tokens.
              The image encoder is an open_clip visual tower, or (preset "mmbt_image": "cnn") the
              preset's image CNN, as MMBT's own paper fed it ResNet-152 feature maps
              forward(input_ids, text_mask, pixel_values, image_mask) -> (B, K)
              = fuse(input_ids, text_mask, encode_image(pixel_values), image_mask)

Every model carries `.arch`, a preset-shaped dict (architecture keys only, checkpoint-derived
values resolved), so that `create_model(kind, {**preset, **model.arch}, K)` rebuilds it exactly:
that is how a bundle is loaded without the original checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet
from transformers import BertConfig, BertForSequenceClassification, BertModel

from pipeline.efficientnet import EfficientNetLite0
from pipeline.errors import UserError
from pipeline.pretrained import read_state_dict
from pipeline.presets import get_preset
from pipeline.records import KINDS

BERT_ARCH = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
             "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id", "classifier_dropout")
# MMBT's pooling of a feature map to N image embeddings (rows x columns)
POOL_GRID = {1: (1, 1), 2: (2, 1), 3: (3, 1), 4: (2, 2), 5: (5, 1), 6: (3, 2), 7: (7, 1), 8: (4, 2), 9: (3, 3)}


# ---------------------------------------------------------------------------------- weights on disk

def load_backbone(module: nn.Module, path: str | Path, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """Load every weight of module except its head (names starting with skip) from a checkpoint
    (prefix stripped; other tensors under other prefixes ignored, e.g. CLIP's text tower). Strict
    for the backbone: a missing, mis-shaped or unexpected backbone weight fails with its name."""
    own = module.state_dict()
    sd = read_state_dict(path)
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    sd = {k: v for k, v in sd.items() if not k.startswith(skip)}
    need = [k for k in own if not k.startswith(skip)]
    missing = [k for k in need if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shaped = [k for k in need if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shaped:
        what = ", ".join(f"{n} {kind} e.g. {ks[:2]}" for kind, ks in
                         (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)) if ks for n in [len(ks)])
        raise UserError(f"{path}: checkpoint does not match the model: {what}")
    module.load_state_dict(sd, strict=False)


# ---------------------------------------------------------------------------------- text

def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the present tokens (sentence-transformers' pooling, all-MiniLM-L6-v2's)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def present_first(mask: torch.Tensor, *seqs: torch.Tensor) -> list[torch.Tensor]:
    """mask (B, T) and sequences (B, T, ...) with each row's present tokens first, in order, cut to
    the most any row holds.

    An absent token is out of attention, so leaving it out changes no present token's output (up to
    float rounding) as long as each token keeps its position id: it only saves its compute. MM-SHAP's
    coalitions hold about half their text tokens, and short texts are padded to the preset's length,
    so this about halves the fusion transformer's time there (docs/mmshap.md, "Cost per coalition").
    """
    keep = mask.bool()
    width = int(keep.sum(1).max())
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
    return [t.gather(1, order.view(*order.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:]))
            for t in (mask, *seqs)]


class BertClassifier(BertForSequenceClassification):
    """pooling: "pooler" (BERT's [CLS] pooler) or "mean" (over present tokens). tune_layers: with a
    frozen encoder, how many of its last layers still fine-tune. They train on the token states
    below them, computed once (frozen_states), so an epoch costs those layers alone: on H&M the
    last of MiniLM's six, tuned so, lifts the text model from 0.840 to 0.862 (TF-IDF: 0.865) at
    about half a minute per epoch on a 2-core CPU (docs/models.md, "The frozen-encoder stack")."""

    pooling = "pooler"
    tune_layers = 0

    def set_tuning(self, tune_layers: int) -> None:
        if tune_layers and self.pooling != "mean":
            raise ValueError('"text_tune_layers" needs "text_pooling": "mean"')
        if not 0 <= tune_layers <= self.config.num_hidden_layers:
            raise ValueError(f'"text_tune_layers" {tune_layers}: the encoder has '
                             f'{self.config.num_hidden_layers} layers')
        self.tune_layers = tune_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.forward_head(self.pool(input_ids, attention_mask))

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The encoder's pooled text vector (B, hidden): what the head reads, and what a frozen
        encoder's cached features are (train.base_models.frozen_features)."""
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        return out.pooler_output if self.pooling == "pooler" else mean_pool(out.last_hidden_state, attention_mask)

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(pooled))

    @property
    def tuned(self) -> nn.ModuleList:
        """The last `tune_layers` encoder layers: the ones that train on frozen_states (none at 0)."""
        layers = self.bert.encoder.layer
        return layers[len(layers) - self.tune_layers :]

    def frozen_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H + 1): the token states that enter the last `tune_layers` layers, with the
        attention mask as the last channel. What a partly frozen encoder caches: the layers below
        never change, so they run once per product (only they: the tuned ones are not run), and
        each epoch runs only the tuned ones."""
        layers = self.bert.encoder.layer
        frozen = layers[: len(layers) - self.tune_layers]
        states = _run_layers(frozen, self.bert.embeddings(input_ids=input_ids), attention_mask)
        return torch.cat([states, attention_mask.unsqueeze(-1).to(states.dtype)], -1)

    def from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from a frozen encoder's cached features: the pooled vector (pool), or with
        `tune_layers` the token states of frozen_states run through the tuned layers and pooled.
        Equal to forward on the token ids, which is what inference runs."""
        if not self.tune_layers:
            return self.forward_head(features)
        mask, states = present_first(features[..., -1], features[..., :-1].float())
        return self.forward_head(mean_pool(_run_layers(self.tuned, states, mask), mask))


def _run_layers(layers: nn.ModuleList, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token states through some of a BertModel's layers under a (B, T) attention mask, as the
    BertModel runs them all (an additive mask over the keys)."""
    additive = (1.0 - mask[:, None, None, :].to(states.dtype)) * torch.finfo(states.dtype).min
    for layer in layers:
        states = layer(states, attention_mask=additive)
        states = states[0] if isinstance(states, tuple) else states
    return states


def load_bert(cls: type, checkpoint: str | Path, config: BertConfig) -> nn.Module:
    """cls (BertModel or BertClassifier) from a Hugging Face BERT folder, strict like load_backbone:
    from_pretrained only warns about an encoder weight it lacks and initialises it at random, so a
    missing or mis-shaped one fails here with its name; only the new classifier may be missing, and
    other heads in the folder (an MLM head) are ignored. Transformers' load report and progress bar
    are silenced: they list the new head as MISSING on every load."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(checkpoint, config=config, local_files_only=True,
                                          ignore_mismatched_sizes=True, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("classifier."))
    shaped = sorted(k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"])
    if missing or shaped:
        what = ", ".join(f"{len(ks)} {kind} e.g. {ks[:2]}"
                         for kind, ks in (("missing", missing), ("mis-shaped", shaped)) if ks)
        raise UserError(f"{checkpoint}: checkpoint does not match its config.json: {what}")
    return model


def _bert_config(p: dict, vocab_size: int | None, checkpoint: str | None) -> BertConfig:
    if checkpoint:
        return BertConfig.from_pretrained(checkpoint, local_files_only=True)
    return BertConfig(**{**p["bert"], "vocab_size": vocab_size or p["bert"].get("vocab_size") or p["vocab_size"]})


def _bert_arch(config: BertConfig) -> dict:
    return {k: getattr(config, k) for k in BERT_ARCH}


# ---------------------------------------------------------------------------------- image

class ResNet(tv_resnet.ResNet):
    """torchvision's ResNet with a base width (64 = resnet18/50/152 exactly, same weight names)."""

    def __init__(self, block: str, layers: list[int], num_classes: int, width: int = 64, image_size: int = 224):
        nn.Module.__init__(self)
        blk = {"basic": tv_resnet.BasicBlock, "bottleneck": tv_resnet.Bottleneck}[block]
        self._norm_layer, self.dilation, self.groups, self.base_width, self.inplanes = nn.BatchNorm2d, 1, 1, 64, width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        for i, n in enumerate(layers):
            setattr(self, f"layer{i + 1}", self._make_layer(blk, width * 2**i, n, stride=1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 2 ** (len(layers) - 1) * blk.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
        for m in self.modules():  # zero-init the last BN of each residual branch
            if isinstance(m, tv_resnet.Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, tv_resnet.BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> the last stage's feature map, before pooling."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled)

    @property
    def feature_dim(self) -> int:
        return self.fc.in_features


HEADS = ("fc.", "_fc.")  # the image CNNs' classification heads (not loaded from a checkpoint)


def build_cnn(p: dict, num_classes: int, checkpoint: str | Path | None = None) -> nn.Module:
    """The preset's image CNN ("efficientnet" or "resnet" key), backbone loaded from a checkpoint."""
    if "efficientnet" in p:
        model = EfficientNetLite0(num_classes=num_classes, image_size=p["efficientnet"]["image_size"])
    else:
        model = ResNet(num_classes=num_classes, **p["resnet"])
    if checkpoint:
        load_backbone(model, checkpoint, skip=HEADS)
    return model


def image_arch(p: dict) -> dict:
    return {"efficientnet": dict(p["efficientnet"])} if "efficientnet" in p else {"resnet": dict(p["resnet"])}


# ---------------------------------------------------------------------------------- multimodal

def clip_vision_cfg(cfg: dict) -> dict:
    """Resolve {"model": "RN50x4", ...overrides} to open_clip CLIPVisionCfg kwargs."""
    cfg = dict(cfg)
    name = cfg.pop("model", None)
    if name:
        import open_clip
        base = open_clip.get_model_config(name)
        if base is None:
            raise UserError(f"open_clip has no model config {name!r}")
        cfg = {**{k: v for k, v in base["vision_cfg"].items() if v is not None}, **cfg}
    return cfg


def build_clip_visual(cfg: dict) -> tuple[nn.Module, int]:
    """An open_clip visual tower (ModifiedResNet or ViT) and its feature-map width."""
    from open_clip.model import _build_vision_tower

    visual = _build_vision_tower(embed_dim=64, vision_cfg=cfg)
    if hasattr(visual, "attnpool"):  # MMBT pools the feature map itself; drop CLIP's attention pool
        visual.attnpool = nn.Identity()
    layers = cfg.get("layers", 12)
    return visual, cfg["width"] * 32 if isinstance(layers, (list, tuple)) else cfg["width"]


class MMBT(nn.Module):
    def __init__(self, bert: BertModel, visual: nn.Module, feature_dim: int, num_image_embeds: int, num_classes: int,
                 pooling: str = "pooler"):
        super().__init__()
        cfg = bert.config
        self.bert, self.visual, self.num_image_embeds, self.pooling = bert, visual, num_image_embeds, pooling
        self.compact = True  # fuse drops absent tokens (present_first); off for a static-shape export
        self.pool = nn.AdaptiveAvgPool2d(POOL_GRID[num_image_embeds])
        self.proj = nn.Linear(feature_dim, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob)
        self.classifier = nn.Linear(cfg.hidden_size, num_classes)
        nn.init.normal_(self.classifier.weight, std=cfg.initializer_range), nn.init.zeros_(self.classifier.bias)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, C): the image encoder's feature map pooled to N cells, row-major."""
        if hasattr(self.visual, "forward_features"):  # a CNN of ours
            fmap = self.visual.forward_features(pixel_values)
        else:  # an open_clip tower
            fmap = self.visual.forward_intermediates(pixel_values, indices=1, intermediates_only=True)["image_intermediates"][-1]
        return self.pool(fmap).flatten(2).transpose(1, 2)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, H) image tokens (before BERT's position/segment embeddings)."""
        return self.proj(self.image_features(pixel_values))

    def fuse(self, input_ids: torch.Tensor, text_mask: torch.Tensor, image_embeds: torch.Tensor,
             image_mask: torch.Tensor) -> torch.Tensor:
        """Logits from token ids (B, L) laid out [CLS] t.. [SEP] [PAD].., image tokens (B, N, H) and
        player masks (1 = present; a removed token is excluded from attention). [CLS] is always kept."""
        words = self.bert.embeddings.word_embeddings(input_ids)
        x = torch.cat([words[:, :1], image_embeds.to(words.dtype), words[:, 1:]], dim=1)
        b, n = image_embeds.shape[:2]
        ones = torch.ones(b, 1, dtype=torch.long, device=x.device)
        mask = torch.cat([ones, image_mask.long(), text_mask[:, 1:].long()], dim=1)
        segment = torch.zeros_like(mask)
        segment[:, 1 : 1 + n] = 1  # image tokens: their own segment; positions continue after [CLS]
        positions = torch.arange(x.shape[1], device=x.device).expand(b, -1)
        if self.compact:
            mask, x, segment, positions = present_first(mask, x, segment, positions)
        out = self.bert(inputs_embeds=x, attention_mask=mask, token_type_ids=segment, position_ids=positions)
        pooled = out.pooler_output if self.pooling == "pooler" else mean_pool(out.last_hidden_state, mask)
        return self.classifier(self.dropout(pooled))

    def forward(self, input_ids, text_mask, pixel_values, image_mask) -> torch.Tensor:
        return self.fuse(input_ids, text_mask, self.encode_image(pixel_values), image_mask)


# ---------------------------------------------------------------------------------- the factory

def create_model(kind: str, preset: str | dict, num_classes: int, *, checkpoint: Any = None,
                 vocab_size: int | None = None) -> nn.Module:
    """kind: text | image | multimodal. checkpoint (all local, see pipeline.pretrained): text: a
    Hugging Face BERT folder; image: a torchvision ResNet or EfficientNet-Lite0 weight file (the
    preset's image keys must name that architecture: pretrained.apply_checkpoints does it);
    multimodal: {"text": BERT folder, "clip": open_clip weight file, "image": CNN weight file (with
    "mmbt_image": "cnn")}, each optional. vocab_size: the tokenizer's (ignored with a BERT checkpoint).
    Without a checkpoint the weights are random: that is how a bundle's models are rebuilt before
    their trained weights are loaded, so a bundle never needs the original checkpoint files."""
    p = get_preset(preset)
    pooling = p.get("text_pooling", "pooler")
    if kind == "text":
        config = _bert_config(p, vocab_size, checkpoint)
        config.num_labels = num_classes
        model = load_bert(BertClassifier, checkpoint, config) if checkpoint else BertClassifier(config)
        model.pooling = pooling
        model.set_tuning(p.get("text_tune_layers", 0) if p.get("freeze_text") else 0)
        model.arch = {"bert": _bert_arch(config), "text_pooling": pooling}
    elif kind == "image":
        model = build_cnn(p, num_classes, checkpoint)
        model.arch = image_arch(p)
    elif kind == "multimodal":
        ckpt = checkpoint or {}
        if not isinstance(ckpt, dict):
            raise TypeError('multimodal checkpoint must be a dict {"text": folder, "clip": file, "image": file}')
        config = _bert_config(p, vocab_size, ckpt.get("text"))
        bert = load_bert(BertModel, ckpt["text"], config) if ckpt.get("text") else BertModel(config)
        arch = {"bert": _bert_arch(config), "num_image_embeds": p["num_image_embeds"], "text_pooling": pooling}
        if p.get("mmbt_image") == "cnn":
            visual = build_cnn(p, 1, ckpt.get("image"))
            setattr(visual, "_fc" if isinstance(visual, EfficientNetLite0) else "fc", nn.Identity())  # not MMBT's head
            feature_dim = visual.feature_dim
            arch.update(image_arch(p), mmbt_image="cnn")
        else:
            clip_cfg = clip_vision_cfg(p["clip"])
            visual, feature_dim = build_clip_visual(clip_cfg)
            if ckpt.get("clip"):
                load_backbone(visual, ckpt["clip"], prefix="visual.", skip=("attnpool.", "proj", "head"))
            arch["clip"] = clip_cfg
        model = MMBT(bert, visual, feature_dim, p["num_image_embeds"], num_classes, pooling)
        model.arch = arch
    else:
        raise ValueError(f"unknown model kind {kind!r} (one of {', '.join(KINDS)})")
    model.arch["num_classes"] = num_classes
    return model
