"""Bundle -> Triton model repository: ONNX models on onnxruntime, each checked against torch.

    REPO/<model>/config.pbtxt     platform onnxruntime_onnx, max_batch_size, dynamic batching,
                                  instance_group (KIND_GPU or KIND_CPU)
    REPO/<model>/1/model.onnx     dynamic batch dimension, inputs/outputs named as serving.signatures
    REPO/shapstack.json           which bundle this is (Triton lists only folders, and ignores it)

Every model is exported on the CPU in float32 and compared with the torch model on random inputs
through onnxruntime before the repository is reported as written: a wrong export would otherwise
surface only as drifted predictions on a server with no torch to compare against.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline.bundle import Bundle, load_bundle
from serving.signatures import BUNDLE_PARAMETER, INT, TRITON_DTYPES, Signature, Tensor, signatures

SIDECAR = "shapstack.json"
EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf's 2 GB limit: larger models keep weights beside the graph


class ExportError(RuntimeError):
    pass


class _Method(nn.Module):
    """A module whose forward is one method of another (MMBT's encode_image or fuse)."""

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        self.module, self.method = module, method

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return getattr(self.module, self.method)(*args)


def random_inputs(sig: Signature, rows: int, vocab_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Token ids within the vocabulary, 0/1 masks that keep [CLS] / the first token, normal floats."""
    out = []
    for t in sig.inputs:
        shape = (rows, *t.dims)
        if t.dtype != INT:
            out.append(rng.standard_normal(shape).astype(np.float32))
        elif t.name == "input_ids":
            out.append(rng.integers(0, vocab_size, shape, dtype=np.int64))
        else:
            mask = rng.integers(0, 2, shape, dtype=np.int64)
            mask[:, 0] = 1
            out.append(mask)
    return out


def max_abs_diff(sig: Signature, fn: Callable, onnx_path: Path, vocab_size: int, rows: int = 5,
                 seed: int = 0) -> float:
    """Largest |onnxruntime - torch| over random inputs (an odd batch size, not the traced one)."""
    import onnxruntime as ort

    xs = random_inputs(sig, rows, vocab_size, np.random.default_rng(seed))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run([sig.output.name], {t.name: x for t, x in zip(sig.inputs, xs)})[0]
    with torch.inference_mode():
        want = fn(*(torch.from_numpy(x) for x in xs)).float().numpy()
    return float(np.abs(got - want).max())


def config_pbtxt(sig: Signature, max_batch_size: int, kind: str, queue_delay_us: int, count: int = 1,
                 bundle_id: str = "") -> str:
    def tensor(t) -> str:
        return f'  {{ name: "{t.name}" data_type: {TRITON_DTYPES[t.dtype]} dims: [ {", ".join(map(str, t.dims))} ] }}'

    return "\n".join([
        f'name: "{sig.name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        "input [", ",\n".join(tensor(t) for t in sig.inputs), "]",
        "output [", tensor(sig.output), "]",
        f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}",
        f"instance_group [ {{ count: {count} kind: {kind} }} ]",
        f'parameters {{ key: "{BUNDLE_PARAMETER}" value: {{ string_value: "{bundle_id}" }} }}',
        "",
    ])


def read_config(path: str | Path) -> tuple[Signature, int]:
    """A config.pbtxt (ours, or edited by hand) -> its signature and max_batch_size, parsed with
    Triton's own ModelConfig schema."""
    sig, max_batch_size, _ = read_config_bundle(path)
    return sig, max_batch_size


def read_config_bundle(path: str | Path) -> tuple[Signature, int, str | None]:
    """read_config, and the bundle id the model carries (None: exported before models carried it)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    cfg = text_format.Parse(Path(path).read_text(), mc.ModelConfig())
    dtypes = {v: k for k, v in TRITON_DTYPES.items()}

    def tensor(t) -> Tensor:
        return Tensor(t.name, dtypes[mc.DataType.Name(t.data_type)], tuple(t.dims))

    if len(cfg.output) != 1:
        raise ValueError(f"{path}: shapstack models have exactly one output")
    sig = Signature(cfg.name, cfg.name, None, tuple(tensor(t) for t in cfg.input), tensor(cfg.output[0]))
    bundle = cfg.parameters[BUNDLE_PARAMETER].string_value if BUNDLE_PARAMETER in cfg.parameters else None
    return sig, cfg.max_batch_size, bundle


def export_onnx(sig: Signature, models: dict[str, nn.Module], path: Path) -> None:
    """torch.export (dynamo) with one symbolic batch dimension shared by every input and the output."""
    module = _Method(models[sig.kind], sig.method).eval() if sig.method else models[sig.kind]
    compacting = [m for m in module.modules() if getattr(m, "compact", False)]
    for m in compacting:  # a data-dependent sequence length (MMBT.compact) has no static graph
        m.compact = False
    example = tuple(torch.from_numpy(x) for x in random_inputs(sig, 2, 2, np.random.default_rng(0)))
    batch = torch.export.Dim("batch")
    shapes = tuple({0: batch} for _ in sig.inputs)
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
            torch.onnx.export(module, example, str(path), input_names=[t.name for t in sig.inputs],
                              output_names=[sig.output.name], dynamic_shapes=(shapes,) if sig.method else shapes,
                              dynamo=True, external_data=size > EXTERNAL_DATA_BYTES)
    finally:
        for m in compacting:
            m.compact = True


def vocab_size(bundle: Bundle, sig: Signature) -> int:
    bert = bundle.manifest["models"][sig.kind]["arch"].get("bert")
    return bert["vocab_size"] if bert else bundle.tokenizer.vocab_size


def export_repository(bundle_path: str | Path, out: str | Path, *, max_batch_size: int = 256,
                      gpu: bool | None = None, queue_delay_us: int = 500, instances: int = 1, check: bool = True,
                      atol: float = 1e-4, log: Callable[[str], None] = print) -> dict:
    """Write the repository; returns what shapstack.json records (with each model's checked error).

    gpu None: KIND_GPU when this machine has a GPU, else KIND_CPU (the NGC image runs either).
    OUT must be empty or an earlier export, whose models are replaced (none of them left stale).
    """
    out = Path(out)
    if (out / SIDECAR).is_file():
        for name in json.loads((out / SIDECAR).read_text()).get("models", []):
            shutil.rmtree(out / Path(name).name, ignore_errors=True)
    elif out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty and not a shapstack model repository")
    bundle = load_bundle(bundle_path, device="cpu")
    sigs = signatures(bundle)
    kind = "KIND_GPU" if (torch.cuda.is_available() if gpu is None else gpu) else "KIND_CPU"
    errors: dict[str, float] = {}
    for sig in sigs.values():
        folder = out / sig.name
        fn = sig.torch_fn(bundle.models)
        export_onnx(sig, bundle.models, folder / "1" / "model.onnx")
        (folder / "config.pbtxt").write_text(config_pbtxt(sig, max_batch_size, kind, queue_delay_us, instances,
                                                                bundle.bundle_id))
        if check:
            errors[sig.name] = max_abs_diff(sig, fn, folder / "1" / "model.onnx", vocab_size(bundle, sig))
            if errors[sig.name] > atol:
                raise ExportError(f"{sig.name}: ONNX differs from torch by {errors[sig.name]:.2e} > {atol:g}")
        log(f"exported {sig.name}" + (f" (max |onnx - torch| {errors[sig.name]:.1e})" if check else ""))
    record = {"bundle_id": bundle.bundle_id, "content_hash": bundle.content_hash, "bundle": str(bundle.path),
              "labels": bundle.labels, "models": sorted(sigs), "max_batch_size": max_batch_size,
              "instance_kind": kind, "max_abs_diff": errors}
    (out / SIDECAR).write_text(json.dumps(record, indent=2))
    return record
