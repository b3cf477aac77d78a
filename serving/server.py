"""A local Triton Inference Server (PyTriton) running a bundle's models in this process.

PyTriton ships a real Triton binary: clients speak Triton's HTTP/gRPC protocol, requests go
through Triton's dynamic batcher, and health is Triton's own /v2/health/live and /v2/health/ready.
Each model of serving.signatures is bound to one callable: the bundle's torch models (default),
or an exported repository's ONNX models on onnxruntime.
"""

from __future__ import annotations

import os
import signal
import socket
import sysconfig
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.backend import InProcessBackend
from pipeline.bundle import load_bundle, resolve_device
from pipeline.errors import UserError
from serving.export import read_config_bundle
from serving.signatures import BUNDLE_PARAMETER, Signature, signatures


def python_backend_env() -> None:
    """Put this interpreter's libpython first on LD_LIBRARY_PATH, for the tritonserver process.

    PyTriton's python-backend stub links against a system libpython3.x; when the running
    interpreter is another build of the same version the stub dies with "'_thread.RLock' object has
    no attribute '_recursion_count'". Triton inherits this process's environment when it starts.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir:
        return
    rest = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p and p != libdir]
    os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *rest])


def check_ports(host: str, *ports: int) -> None:
    """Triton exits when a port is taken, and PyTriton then waits minutes for it: fail first, in one line."""
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
            try:
                s.bind((host, port))
            except OSError as exc:
                raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


@dataclass(frozen=True)
class Served:
    sig: Signature
    run: Callable[..., np.ndarray]  # the input arrays in signature order -> the output array
    max_batch_size: int
    bundle_id: str | None  # what the client checks (serving.signatures.BUNDLE_PARAMETER)


def torch_models(bundle_path: str, device: str, max_batch_size: int) -> list[Served]:
    """The bundle's models through the InProcessBackend's own runner (chunks, inference mode,
    autocast on a GPU), so that served logits are the in-process ones."""
    backend = InProcessBackend(load_bundle(bundle_path, device=device), device=device, batch_size=max_batch_size)
    return [Served(sig, partial(backend._call, sig.name), max_batch_size, backend.bundle.bundle_id)
            for sig in signatures(backend.bundle).values()]


def onnx_models(repository: str | Path, device: str) -> list[Served]:
    """An exported repository through onnxruntime: what the NGC image would run, on a machine
    without it (and a check that the export serves what the client expects)."""
    import onnxruntime as ort

    gpu = resolve_device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", 0))  # 0: onnxruntime's default
    out = []
    for config in sorted(Path(repository).glob("*/config.pbtxt")):
        sig, max_batch_size, bundle_id = read_config_bundle(config)
        session = ort.InferenceSession(str(config.parent / "1" / "model.onnx"), options, providers=providers)

        def run(*xs: np.ndarray, sig=sig, session=session) -> np.ndarray:
            return session.run([sig.output.name], {t.name: x for t, x in zip(sig.inputs, xs)})[0]

        out.append(Served(sig, run, max_batch_size, bundle_id))
    if not out:
        raise UserError(f"{repository}: no <model>/config.pbtxt (not a model repository)")
    return out


def bind(triton, models: list[Served], queue_delay_us: int) -> None:
    """One PyTriton @batch callable per model, named and typed as serving.signatures says."""
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    def callable_of(m: Served) -> Callable:
        @batch
        def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
            return {m.sig.output.name: m.run(*(inputs[t.name] for t in m.sig.inputs))}

        return infer

    for m in models:
        triton.bind(model_name=m.sig.name, infer_func=callable_of(m),
                    inputs=[Tensor(name=t.name, dtype=t.dtype.type, shape=t.dims) for t in m.sig.inputs],
                    outputs=[Tensor(name=m.sig.output.name, dtype=m.sig.output.dtype.type, shape=m.sig.output.dims)],
                    config=ModelConfig(max_batch_size=m.max_batch_size,
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=queue_delay_us)),
                    strict=True)
    # PyTriton's ModelConfig has no parameters of its own: the bundle id goes into the Triton model
    # config it generated (cached per model), written again to its local model store
    bundles = {m.sig.name: m.bundle_id for m in models}
    manager = triton._model_manager
    for model in manager.models:
        if bundles.get(model.model_name):
            model._get_triton_model_config().backend_parameters[BUNDLE_PARAMETER] = bundles[model.model_name]
            if manager._model_store_path is not None:
                model.generate_model(manager._model_store_path)


def serve(bundle_path: str | None = None, repository: str | None = None, *, host: str = "127.0.0.1", http_port: int = 8000,
          grpc_port: int = 8001, metrics_port: int = 8002, device: str = "auto", max_batch_size: int = 256,
          queue_delay_us: int = 500, on_ready: Callable[[list[str]], None] | None = None) -> bool:
    """Serve a bundle (torch) or an exported repository (onnxruntime) until SIGINT / SIGTERM (True)
    or until Triton dies (False). Every endpoint listens on host only: loopback unless told otherwise."""
    if (bundle_path is None) == (repository is None):
        raise UserError("serve a bundle or an exported repository, not both or neither")
    from pytriton.client.exceptions import PyTritonClientError
    from pytriton.triton import Triton, TritonConfig, TritonLifecyclePolicy

    stopped = False

    def interrupt(*_) -> None:
        nonlocal stopped
        stopped = True
        raise KeyboardInterrupt  # PyTriton's serve loop shuts Triton down cleanly on this

    check_ports(host, http_port, grpc_port, metrics_port)
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    python_backend_env()
    models = (torch_models(bundle_path, device, max_batch_size) if bundle_path
              else onnx_models(repository, device))
    config = TritonConfig(http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
                          metrics_address=host, metrics_port=metrics_port, exit_timeout_secs=5)
    # models written to the model store before Triton starts: it loads them at startup, so its own
    # /v2/health/ready (strict readiness) means every model is ready, not just the server
    policy = TritonLifecyclePolicy(launch_triton_on_startup=False, local_model_store=True)
    triton = Triton(config=config, triton_lifecycle_policy=policy)
    try:
        bind(triton, models, queue_delay_us)
        triton.run()  # starts Triton, connects the models' proxies, returns when all are ready
        if on_ready:
            on_ready([m.sig.name for m in models])
        triton.serve()  # returns on a signal, or when Triton or a model's proxy has died
    except KeyboardInterrupt:
        pass
    except (TimeoutError, PyTritonClientError):  # Triton died while starting: PyTriton waited for it
        return False
    finally:
        triton.stop()
    return stopped
