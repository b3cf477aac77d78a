"""Triton serving with real components: ONNX export checked by onnxruntime, a real Triton server
(PyTriton, in a subprocess through `shapstack serve`), and TritonBackend against the in-process
backend over HTTP and gRPC, MM-SHAP coalition batches included.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.backend import InProcessBackend
from pipeline.bundle import load_bundle, save_bundle
from pipeline.feed import read_feed
from pipeline.models import KINDS, create_model
from pipeline.records import Limits, Product
from pipeline.inference import infer, stack
from pipeline.mmshap import MMShapConfig
from pipeline.stackers import make_stacker
from pipeline.synthetic import make_catalogue
from pipeline.tokenizer import train_tokenizer
from serving.client import TritonBackend, TritonMismatch, TritonUnavailable
from serving.export import SIDECAR, max_abs_diff, vocab_size
from serving.local import free_port, http_ok, serve_subprocess
from serving.signatures import BUNDLE_PARAMETER, TRITON_DTYPES, signatures
from jobs.models import make_backend
from shapstack.cli import cli

ATOL = 1e-4

try:
    import pytriton.triton  # noqa: F401

    PYTRITON = None
except Exception as exc:  # noqa: BLE001 - any import failure means no local server
    PYTRITON = f"nvidia-pytriton cannot be imported: {exc}"
needs_pytriton = pytest.mark.skipif(PYTRITON is not None, reason=PYTRITON or "")


def make_bundle(path: Path, labels: list[str], texts: list[str], kinds=KINDS) -> Path:
    """Untrained tiny models: the comparisons need identical weights on both sides, not accuracy."""
    torch.manual_seed(0)
    tok = train_tokenizer(texts, vocab_size=600, min_frequency=1)
    models = {k: create_model(k, "tiny", len(labels), vocab_size=tok.vocab_size).eval() for k in kinds}
    save_bundle(path, preset="tiny", labels=labels, tokenizer=tok, models=models)
    return path


@pytest.fixture(scope="module")
def feed(tmp_path_factory) -> Path:
    # some products without an image or without text: their masks take the other paths
    return make_catalogue(tmp_path_factory.mktemp("feed"), 40, 6, seed=3, image_size=48, drop_image=0.15,
                          drop_text=0.15)


@pytest.fixture(scope="module")
def products(feed) -> list[Product]:
    return [p for p in read_feed(feed) if isinstance(p, Product)]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, products) -> Path:
    labels = sorted({p.label for p in products})
    return make_bundle(tmp_path_factory.mktemp("bundle") / "b", labels, [p.text for p in products] * 3)


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir, device="cpu")


@pytest.fixture(scope="module")
def repo(tmp_path_factory, bundle_dir) -> Path:
    out = tmp_path_factory.mktemp("repo") / "models"
    res = CliRunner().invoke(cli, ["export-triton", "--bundle", str(bundle_dir), "--out", str(out),
                                                 "--max-batch-size", "64", "--cpu"])
    assert res.exit_code == 0, res.output
    assert "wrote 5 models" in res.output
    return out


@contextmanager
def triton_server(source: list[str], log: Path):
    """`shapstack serve` in a subprocess on free ports, ready; always stopped at the end."""
    try:
        with serve_subprocess([*source, "--max-batch-size", "64", "--device", "cpu"], log) as urls:
            yield urls
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundle_dir):
    """The bundle's torch models behind Triton."""
    with triton_server(["--bundle", str(bundle_dir)], tmp_path_factory.mktemp("server") / "serve.log") as urls:
        yield urls


# ---------------------------------------------------------------------------------- export


def test_export_writes_a_checked_onnx_repository(repo, bundle, bundle_dir):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    record = json.loads((repo / SIDECAR).read_text())
    sigs = signatures(bundle)
    assert record["bundle_id"] == bundle.bundle_id and sorted(record["models"]) == sorted(sigs)
    assert record["instance_kind"] == "KIND_CPU"
    for name, sig in sigs.items():
        assert record["max_abs_diff"][name] <= ATOL
        # an independent check: other random inputs, another batch size than the export's
        fn = sig.torch_fn(bundle.models)
        diff = max_abs_diff(sig, fn, repo / name / "1" / "model.onnx", vocab_size(bundle, sig), rows=9, seed=7)
        assert diff <= ATOL, name
        cfg = text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())  # Triton's own schema
        assert cfg.name == name and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 64
        assert [(t.name, mc.DataType.Name(t.data_type), tuple(t.dims)) for t in cfg.input] == \
            [(t.name, TRITON_DTYPES[t.dtype], t.dims) for t in sig.inputs]
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
        assert mc.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind) == "KIND_CPU"
        assert cfg.parameters[BUNDLE_PARAMETER].string_value == bundle.bundle_id

    # a re-export replaces the models in place; a folder that is something else is refused
    other = repo.parent / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    res = CliRunner().invoke(cli, ["export-triton", "--bundle", str(bundle_dir), "--out", str(other)])
    assert res.exit_code == 2 and "not a shapstack model repository" in res.output


# ---------------------------------------------------------------------------------- server and client


@needs_pytriton
@pytest.mark.triton
def test_server_health_and_models_match_export(server, repo, bundle):
    import tritonclient.http as tc

    for path in ("/v2/health/live", "/v2/health/ready"):
        assert http_ok(server["http"] + path)
    assert http_ok(server["metrics"] + "/metrics")
    # bound to loopback only (no --host): every socket listening on the server's ports is a loopback one
    ports = {int(url.rsplit(":", 1)[1]) for url in server.values()}
    listening = [line.split()[3] for line in subprocess.run(["ss", "-Hltn"], capture_output=True, text=True,
                                                             check=True).stdout.splitlines()]
    addresses = {ipaddress.ip_address(a.rsplit(":", 1)[0].strip("[]")) for a in listening
                 if int(a.rsplit(":", 1)[1]) in ports}
    assert addresses and all((getattr(a, "ipv4_mapped", None) or a).is_loopback for a in addresses), listening
    client = tc.InferenceServerClient(server["http"].removeprefix("http://"))
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    for name in signatures(bundle):  # the same names, tensors and batch limit as the ONNX repository
        served = client.get_model_config(name)
        exported = text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())
        assert served["max_batch_size"] == exported.max_batch_size
        for key, tensors in (("input", exported.input), ("output", exported.output)):
            assert [(t["name"], t["data_type"], t["dims"]) for t in served[key]] == \
                [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in tensors]
    client.close()


BATCH, BUDGET, MODES = 16, 160, ("token", "pixel")


class Recorder:
    """A backend that keeps what MM-SHAP's coalition batches returned (the runner passes the
    predicted classes, so these two methods see nothing else)."""

    def __init__(self, backend):
        self.backend, self.coalitions = backend, []

    def __getattr__(self, name: str):
        attr = getattr(self.backend, name)
        if name not in ("fusion_logits", "multimodal_logits"):
            return attr

        def record(*args):
            self.coalitions.append(attr(*args))
            return self.coalitions[-1]

        return record


def run_modes(backend, products: list[Product]) -> dict[str, tuple]:
    """Per image mode: the infer stage's result and every coalition batch's logits."""
    out = {}
    for mode in MODES:
        rec = Recorder(backend)
        out[mode] = (infer(rec, products, MMShapConfig(mode=mode, budget=BUDGET), seed_key="serving-test"),
                     np.concatenate(rec.coalitions))
    return out


@pytest.fixture(scope="module")
def in_process(bundle, products):
    """The reference: base logits and MM-SHAP in this process, per image mode.

    The Triton side uses the same batch size, so the server's torch runs the very same batches: on
    these untrained models pixel-mode T-SHAP moves by ~1e-3 with the batch size alone, in process
    too (near-uniform logits: coalition values differ by ~1e-5 and float32 log-probabilities
    resolve ~1e-7 of them).
    """
    backend = InProcessBackend(bundle, device="cpu", batch_size=BATCH)
    return backend, run_modes(backend, products)


@needs_pytriton
@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_triton_backend_matches_in_process(server, bundle, products, in_process, protocol):
    local, reference = in_process
    remote = make_backend(bundle, triton_url=server[protocol], device="cpu", batch_size=BATCH, limits=Limits())
    assert isinstance(remote, TritonBackend)
    assert remote.labels == local.labels and remote.num_image_embeds == local.num_image_embeds
    stacker = make_stacker("mean")
    for mode, (got, got_coalitions) in run_modes(remote, products).items():
        want, want_coalitions = reference[mode]
        for k in KINDS:
            np.testing.assert_allclose(got.logits[k], want.logits[k], atol=ATOL, rtol=0)
            assert got.logits[k].dtype == np.float32
        assert len(want_coalitions) > 20 * BATCH  # coalitions really went through, many requests' worth
        np.testing.assert_allclose(got_coalitions, want_coalitions, atol=ATOL, rtol=0)
        np.testing.assert_array_equal(got.contributions.n_evaluations, want.contributions.n_evaluations)
        np.testing.assert_allclose(got.contributions.t_shap, want.contributions.t_shap, atol=ATOL, rtol=0)
        for a, b in zip(stack(stacker, got, bundle.labels), stack(stacker, want, bundle.labels)):
            assert a == {**b, "confidence": pytest.approx(b["confidence"], abs=ATOL),
                         "t_shap": pytest.approx(b["t_shap"], abs=ATOL), "v_shap": pytest.approx(b["v_shap"], abs=ATOL)}
    enc = local.encode(products[:5])
    np.testing.assert_allclose(remote.image_embeddings(enc), local.image_embeddings(enc), atol=ATOL, rtol=0)
    empty = enc[:0]
    assert remote.fusion_logits(empty.input_ids, empty.text_mask, np.zeros((0, 2, 32), np.float32),
                                empty.image_mask(2)).shape == (0, len(bundle.labels))
    remote.close()


@needs_pytriton
@pytest.mark.triton
def test_classify_cli_through_triton_matches_in_process(server, bundle_dir, feed, tmp_path, monkeypatch):
    """The embedded CLI with SHAPSTACK_TRITON_URL set: ingest, infer over gRPC, stack, persist, export."""
    monkeypatch.chdir(tmp_path)
    outputs = {}
    for name, url in (("local", None), ("triton", server["grpc"])):
        if url:
            monkeypatch.setenv("SHAPSTACK_TRITON_URL", url)
        out = tmp_path / f"{name}.jsonl"
        res = CliRunner().invoke(cli, [
            "--db", f"sqlite:///{tmp_path / name}.db", "classify", str(feed), "--bundle", str(bundle_dir),
            "--stacker", "mean", "--mmshap-budget", "160", "--out", str(out), "--device", "cpu"])
        assert res.exit_code == 0, res.output
        outputs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(outputs["local"]) == len(outputs["triton"]) > 30
    for a, b in zip(outputs["local"], outputs["triton"]):
        assert {k: v for k, v in a.items() if k not in ("t_shap", "v_shap", "confidence")} == \
            {k: v for k, v in b.items() if k not in ("t_shap", "v_shap", "confidence")}
        assert a["t_shap"] == pytest.approx(b["t_shap"], abs=ATOL)
        assert a["confidence"] == pytest.approx(b["confidence"], abs=ATOL)


@needs_pytriton
@pytest.mark.triton
def test_server_with_another_bundle_is_refused(server, tmp_path, products):
    other = load_bundle(make_bundle(tmp_path / "other", ["a", "b", "c"], [p.text for p in products],
                                    kinds=("text",)), device="cpu")
    with pytest.raises(TritonMismatch, match="does not fit bundle"):
        TritonBackend(server["http"], other)


@needs_pytriton
@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_server_with_another_bundle_of_the_same_shape_is_refused(server, bundle, tmp_path, protocol):
    """Same preset, labels and tokenizer, other weights: every tensor fits, only the bundle id tells."""
    twin_dir = tmp_path / "twin"
    torch.manual_seed(1)
    models = {k: create_model(k, "tiny", len(bundle.labels), vocab_size=bundle.tokenizer.vocab_size).eval()
              for k in KINDS}
    save_bundle(twin_dir, preset="tiny", labels=bundle.labels, tokenizer=bundle.tokenizer, models=models)
    twin = load_bundle(twin_dir, device="cpu")
    assert twin.bundle_id != bundle.bundle_id
    with pytest.raises(TritonMismatch, match=f"serves bundle {bundle.bundle_id}, not {twin.bundle_id}"):
        TritonBackend(server[protocol], twin)
    TritonBackend(server[protocol], bundle).close()  # its own bundle is served


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_down_server_fails_fast_with_one_line(bundle, scheme):
    url = f"{scheme}://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TritonUnavailable) as info:
        TritonBackend(url, bundle, retries=2, backoff_s=0.1)
    assert time.monotonic() - start < 5
    assert isinstance(info.value, ConnectionError)
    message = str(info.value)
    assert "\n" not in message and url in message and "unavailable after 3 attempts" in message
    with pytest.raises(ValueError, match="http://host:port or grpc://host:port"):
        TritonBackend("ftp://127.0.0.1:1", bundle)


@needs_pytriton
@pytest.mark.triton
def test_exported_repository_served_matches_in_process(repo, bundle, products, in_process, tmp_path):
    """The ONNX export behind Triton (onnxruntime in PyTriton, as the NGC image would run it):
    the same client, the same model names, the torch results within 1e-4."""
    local, reference = in_process
    with triton_server(["--repository", str(repo)], tmp_path / "serve.log") as urls:
        remote = TritonBackend(urls["grpc"], bundle, batch_size=BATCH)
        for mode, (got, got_coalitions) in run_modes(remote, products).items():
            want, want_coalitions = reference[mode]
            for k in KINDS:
                np.testing.assert_allclose(got.logits[k], want.logits[k], atol=ATOL, rtol=0)
            np.testing.assert_allclose(got_coalitions, want_coalitions, atol=ATOL, rtol=0)
            for k in KINDS:
                assert (got.logits[k].argmax(1) == want.logits[k].argmax(1)).all()
            # other kernels than torch's: T-SHAP inherits the float32 log-probability noise the
            # in_process fixture describes, so it is held to what that noise allows
            np.testing.assert_allclose(got.contributions.t_shap, want.contributions.t_shap, atol=5e-3, rtol=0)
        remote.close()
