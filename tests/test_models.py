"""Models, tokenizer, preprocessing, bundle and in-process backend on the tiny preset (CPU, seconds)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipeline.backend import InProcessBackend
from pipeline.bundle import Bundle, BundleError, load_bundle, save_bundle
from pipeline.models import KINDS, create_model
from pipeline.preprocess import ImagesUnreadable, encode_products
from pipeline.presets import get_preset, preset_names
from pipeline.records import Product
from pipeline.tokenizer import Tokenizer, train_tokenizer

LABELS = ["dress", "shoe", "bag"]
TEXTS = {"dress": "Red summer dress in light cotton with short sleeves",
         "shoe": "Leather running shoe with rubber sole and laces",
         "bag": "Canvas tote bag with two handles and inner pocket"}
COLOURS = {"dress": (200, 30, 30), "shoe": (30, 30, 200), "bag": (30, 160, 30)}


@pytest.fixture(scope="module")
def products(tmp_path_factory) -> list[Product]:
    root = tmp_path_factory.mktemp("imgs")
    out = []
    for i in range(12):
        label = LABELS[i % 3]
        path = root / f"{i}.jpg"
        im = Image.new("RGB", (60 + 7 * i, 90), (240, 240, 240))  # portrait and landscape packshots
        ImageDraw.Draw(im).ellipse((5, 10 + i, 50, 80), fill=COLOURS[label])
        im.save(path)
        title, desc = (TEXTS[label].split(" with ") + [""])[:2]
        out.append(Product(f"p{i}", title, desc, str(path), label))
    out.append(Product("no-image", "Blue shoe", "", None, "shoe"))
    out.append(Product("no-text", "", "", str(root / "0.jpg"), "dress"))
    out.append(Product("nothing", "", "", None, "bag"))
    return out


@pytest.fixture(scope="module")
def tokenizer(products) -> Tokenizer:
    return train_tokenizer([p.text for p in products] * 5, vocab_size=get_preset("tiny")["vocab_size"], min_frequency=1)


@pytest.fixture(scope="module")
def models(tokenizer) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {k: create_model(k, "tiny", len(LABELS), vocab_size=tokenizer.vocab_size).eval() for k in KINDS}


@pytest.fixture(scope="module")
def enc(products, tokenizer):
    return encode_products(products, tokenizer, "tiny")


def t(a):
    return torch.from_numpy(a)


def test_presets_are_plain_data():
    for name, p in ((n, get_preset(n)) for n in preset_names()):
        assert p["name"] == name and set(p["train"]) == set(KINDS)
        json.dumps(p)
    assert get_preset("paper")["max_length"] == 120 and get_preset("paper")["num_image_embeds"] == 4
    with pytest.raises(ValueError):
        get_preset("huge")


def test_tokenizer_layout_and_roundtrip(tokenizer, tmp_path):
    ids, mask = tokenizer.encode(["red dress", "", "word " * 100], max_length=32)
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == (3, 32)
    assert ids[0, 0] == tokenizer.cls_id and mask[0].sum() == 4 and ids[0, 3] == tokenizer.sep_id
    assert list(ids[1, :3]) == [tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id] and mask[1].sum() == 2
    assert mask[2].all() and ids[2, -1] == tokenizer.sep_id  # truncated, still closed by [SEP]
    tokenizer.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path)
    assert np.array_equal(again.encode(["red dress"], 32)[0], ids[:1])


def test_encode_products(enc, products, tokenizer):
    p = get_preset("tiny")
    assert enc.input_ids.shape == (len(products), p["max_length"])
    assert enc.pixel_values.shape[1:] == (3, p["resnet"]["image_size"], p["resnet"]["image_size"])
    assert enc.clip_pixels.shape[1:] == (3, p["clip"]["image_size"], p["clip"]["image_size"])
    assert enc.pixel_values.dtype == enc.clip_pixels.dtype == np.float32
    ix = {x.product_id: i for i, x in enumerate(products)}
    assert not enc.has_image[[ix["no-image"], ix["nothing"]]].any() and enc.has_image[ix["no-text"]]
    assert not enc.has_text[[ix["no-text"], ix["nothing"]]].any() and enc.text_mask[ix["no-text"]].sum() == 2
    assert not enc.pixel_values[ix["no-image"]].any() and enc.pixel_values[0].any()
    broken = Product("broken", "Bag", "", str(Path(products[0].image).parent / "missing.jpg"), "bag")
    with pytest.raises(ImagesUnreadable, match="broken"):  # never a silent text-only product
        encode_products([products[0], broken], tokenizer, "tiny")
    aug = encode_products(products[:3], tokenizer, "tiny", train=True)
    assert aug.pixel_values.shape == (3, *enc.pixel_values.shape[1:]) and aug.has_image.all()


def test_every_kind_gives_finite_logits_and_trains(models, enc):
    n, k = len(enc), len(LABELS)
    im = t(enc.image_mask(get_preset("tiny")["num_image_embeds"]))
    inputs = {"text": (t(enc.input_ids), t(enc.text_mask)), "image": (t(enc.pixel_values),),
              "multimodal": (t(enc.input_ids), t(enc.text_mask), t(enc.clip_pixels), im)}
    for kind, model in models.items():
        model.train()
        logits = model(*inputs[kind])
        assert logits.shape == (n, k) and torch.isfinite(logits).all(), kind
        torch.nn.functional.cross_entropy(logits, torch.zeros(n, dtype=torch.long)).backward()
        assert not [name for name, p in model.named_parameters() if p.grad is None], kind
        model.zero_grad(set_to_none=True)
        model.eval()


def test_multimodal_masks_and_fuse(models, enc):
    mm = models["multimodal"]
    n_img = get_preset("tiny")["num_image_embeds"]
    ids, tm, px = t(enc.input_ids[:4]), t(enc.text_mask[:4]), t(enc.clip_pixels[:4])
    full = torch.ones(4, n_img, dtype=torch.long)
    with torch.no_grad():
        emb = mm.encode_image(px)
        assert emb.shape == (4, n_img, mm.bert.config.hidden_size)
        ref = mm(ids, tm, px, full)
        torch.testing.assert_close(mm.fuse(ids, tm, emb, full), ref, atol=1e-6, rtol=0)
        no_image = mm.fuse(ids, tm, emb, torch.zeros_like(full))
        no_text = tm.clone()
        no_text[:, 2:] = 0  # keep [CLS] and the first word
        assert not torch.allclose(no_image, ref) and not torch.allclose(mm.fuse(ids, no_text, emb, full), ref)
        # a removed player has no influence: other pixels under a zero image mask give the same logits
        torch.testing.assert_close(mm(ids, tm, torch.randn_like(px), torch.zeros_like(full)), no_image, atol=1e-5, rtol=0)


def test_fuse_over_present_tokens_only_equals_every_position(models, enc):
    """MMBT.compact leaves absent tokens out of the fusion transformer (each token keeps its
    position id): the logits and gradients are those of the masked full-length sequence."""
    from pipeline.models import present_first

    mm = models["multimodal"]
    rng = np.random.default_rng(0)
    n_img = get_preset("tiny")["num_image_embeds"]
    ids, tm = t(enc.input_ids[:6]), t(enc.text_mask[:6]).clone()
    tm[1:] *= t(rng.random(tm[1:].shape) < 0.5).long()  # row 0 keeps its text, the others about half
    tm[:, 0] = 1
    im = t(rng.random((6, n_img)) < 0.5).long()
    emb = mm.encode_image(t(enc.clip_pixels[:6])).detach()
    out = {}
    for compact in (True, False):
        mm.compact = compact
        e = emb.clone().requires_grad_(True)
        z = mm.fuse(ids, tm, e, im)
        z.sum().backward()
        out[compact] = z.detach(), e.grad
    mm.compact = True
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-5, rtol=0)
    mask = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0]])
    kept, pos = present_first(mask, torch.arange(4).expand(2, -1))
    assert kept.tolist() == [[1, 1], [1, 1]] and pos.tolist() == [[0, 2], [0, 1]]


def _backend(models, tokenizer, manifest, tmp_path):
    return InProcessBackend(Bundle(tmp_path, manifest, tokenizer, models, torch.device("cpu")), device="cpu")


def test_backend_missing_modalities_and_modes(models, tokenizer, enc, products, tmp_path):
    manifest = save_bundle(tmp_path / "b", preset="tiny", labels=LABELS, tokenizer=tokenizer, models=models)
    be = InProcessBackend(load_bundle(tmp_path / "b", device="auto"), batch_size=5)
    out = be.base_logits(be.encode(products))
    assert set(out) == set(KINDS)
    for kind, z in out.items():
        assert z.shape == (len(products), len(LABELS)) and z.dtype == np.float32 and np.isfinite(z).all(), kind
    emb = be.image_embeddings(enc)
    im = enc.image_mask(get_preset("tiny")["num_image_embeds"])
    np.testing.assert_allclose(be.fusion_logits(enc.input_ids, enc.text_mask, emb, im), out["multimodal"], atol=1e-5)
    np.testing.assert_allclose(be.multimodal_logits(enc.input_ids, enc.text_mask, enc.clip_pixels, im),
                               out["multimodal"], atol=1e-6)
    assert be.base_logits(enc[:0])["text"].shape == (0, len(LABELS)) and be.image_embeddings(enc[:0]).shape[0] == 0
    assert manifest["models"]["multimodal"]["arch"]["num_image_embeds"] == 2


def test_bundle_roundtrip_hash_and_artifacts(models, tokenizer, enc, tmp_path, monkeypatch):
    path = tmp_path / "bundle"
    manifest = save_bundle(path, preset="tiny", labels=LABELS, tokenizer=tokenizer, models=models,
                           metrics={"text": {"f1": 0.5}})
    assert len(manifest["content_hash"]) == 64 and manifest["versions"]["torch"] == torch.__version__
    before = _backend(models, tokenizer, manifest, path).base_logits(enc)

    def no_network(*a, **k):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    bundle = load_bundle(path, device="cpu")
    assert bundle.labels == LABELS and bundle.preset["name"] == "tiny" and bundle.bundle_id == manifest["content_hash"][:16]
    after = InProcessBackend(bundle, device="cpu").base_logits(enc)
    for kind in KINDS:
        np.testing.assert_allclose(after[kind], before[kind], atol=1e-6, rtol=0)

    bundle.save_artifact("stacker", {"w": torch.arange(6.0).reshape(2, 3)})
    bundle.save_artifact("stacker_config", {"hidden": 512, "weights": [0.2, 0.3, 0.5]})
    assert torch.equal(bundle.load_artifact("stacker")["w"], torch.arange(6.0).reshape(2, 3))
    assert load_bundle(path, device="cpu").load_artifact("stacker_config")["hidden"] == 512
    assert load_bundle(path, device="cpu").bundle_id == bundle.bundle_id  # artefacts do not change it

    with torch.no_grad():
        models["image"].fc.bias[0] += 1.0
    try:
        other = save_bundle(tmp_path / "other", preset="tiny", labels=LABELS, tokenizer=tokenizer, models=models)
    finally:
        with torch.no_grad():
            models["image"].fc.bias[0] -= 1.0
    assert other["content_hash"] != manifest["content_hash"]
    assert other["models"]["text"]["sha256"] == manifest["models"]["text"]["sha256"]

    with pytest.raises(BundleError):
        save_bundle(path, preset="tiny", labels=LABELS, tokenizer=tokenizer, models=models)  # not empty
    (path / "image.safetensors").write_bytes((tmp_path / "other" / "image.safetensors").read_bytes())
    with pytest.raises(BundleError, match="hash"):
        load_bundle(path, device="cpu")


def test_local_checkpoints(tmp_path):
    """Pretrained weights come from local files only: HF BERT folder, torchvision and open_clip weights."""
    import open_clip
    import torchvision
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64))
    bert.save_pretrained(tmp_path / "bert")
    text = create_model("text", "tiny", 4, checkpoint=str(tmp_path / "bert"))
    assert torch.equal(text.bert.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    assert text.arch["bert"]["vocab_size"] == 50

    r18 = torchvision.models.resnet18()
    torch.save(r18.state_dict(), tmp_path / "r18.pth")
    preset = {**get_preset("tiny"), "resnet": dict(block="basic", layers=[2, 2, 2, 2], width=64, image_size=32)}
    image = create_model("image", preset, 4, checkpoint=tmp_path / "r18.pth")
    assert torch.equal(image.layer4[1].conv2.weight, r18.layer4[1].conv2.weight) and image.fc.out_features == 4

    vision = get_preset("tiny")["clip"]
    clip = open_clip.model.CLIP(embed_dim=16, vision_cfg=vision,
                                text_cfg=dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    mm = create_model("multimodal", "tiny", 4, checkpoint={"text": str(tmp_path / "bert"), "clip": str(tmp_path / "clip.safetensors")})
    assert torch.equal(mm.visual.layer3[0].conv2.weight, clip.visual.layer3[0].conv2.weight)
    assert torch.equal(mm.bert.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
