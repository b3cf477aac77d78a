"""TritonBackend: pipeline.backend.Backend's interface, with the models behind a Triton server.

Preprocessing stays local (pipeline.preprocess with the bundle's tokenizer and preset); only
tensors travel. The server may be `shapstack serve` (PyTriton, torch) or the NGC tritonserver
image on an exported repository (ONNX): both serve the models of serving.signatures under the
same names, and the construction-time check compares what the server declares with what this
bundle needs, so a server holding another bundle's models fails there and not with odd logits.
Each model also carries the id of the bundle it was made from (serving.signatures.BUNDLE_PARAMETER):
another bundle of the same shape is refused on connect, and again after any reconnect (a server
restarted with another repository), before a result of it is used.

Large calls (MM-SHAP sends thousands of coalitions at once) go in chunks of at most batch_size
rows, and never more than the model's max_batch_size. Connection failures are retried with
exponential backoff, then raised as TritonUnavailable (a ConnectionError) with one line.

A server that answers but does not (or not yet) serve a model is one starting or stopping, as
often as one deployed with other models: PyTriton loads its models after its endpoints are up and
unloads them before they close. So a missing model is TritonUnavailable (retried, as the server
being away) until it has been missing for MISSING_GRACE_S, and only then TritonMismatch (this
server does not serve the bundle: the worker stops).
"""

from __future__ import annotations

import time
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

import numpy as np

from pipeline.backend import Backend
from pipeline.bundle import Bundle
from pipeline.errors import UserError
from pipeline.records import Limits
from serving.signatures import BUNDLE_PARAMETER, WIRE_DTYPES, Signature, signatures

T = TypeVar("T")
SCHEMES = {"http": 8000, "https": 8000, "grpc": 8001}
CONNECT_TIMEOUT_S = 5.0  # health and metadata calls: a reachable server answers these at once
MISSING_GRACE_S = 120.0  # a model missing for longer is not a server starting or stopping


class TritonUnavailable(ConnectionError):
    """The server cannot be reached (down, wrong address, timing out) after every retry."""


class NotReady(OSError):
    """Answering but not ready (starting, loading models, or not a Triton server): retried."""


class TritonMismatch(UserError):
    """The server is up but does not serve this bundle's models (names, shapes or label count)."""


def _transient(exc: BaseException) -> bool:
    """Worth retrying: the connection, not the request, failed."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        return any(s in status for s in ("UNAVAILABLE", "DEADLINE_EXCEEDED")) or "Connection" in str(exc.message())
    return isinstance(exc, OSError)  # ConnectionRefusedError, TimeoutError, socket errors (http)


def _missing_model(exc: BaseException) -> bool:
    """The server answered that it has no such model (or no version of it loaded)."""
    from tritonclient.utils import InferenceServerException

    if not isinstance(exc, InferenceServerException):
        return False
    text = f"{exc.status() or ''} {exc.message()}".lower()
    return "unknown model" in text or "no available versions" in text or "not_found" in text


def _reason(exc: BaseException) -> str:
    from tritonclient.utils import InferenceServerException

    text = exc.message() if isinstance(exc, InferenceServerException) else str(exc)
    return " ".join(f"{type(exc).__name__}: {text}".split())[:200]


class TritonBackend(Backend):
    def __init__(self, url: str, bundle: Bundle, batch_size: int = 64, limits: Limits = Limits(),
                 timeout_s: float = 120.0, retries: int = 3, backoff_s: float = 0.25):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise UserError(f"Triton URL must be http://host:port or grpc://host:port, not {url!r}")
        super().__init__(bundle, batch_size, limits)
        self.url = url
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.grpc = parts.scheme == "grpc"
        address = f"{parts.hostname}:{parts.port or SCHEMES[parts.scheme]}"
        if self.grpc:
            import tritonclient.grpc as tc
            self._client = tc.InferenceServerClient(address)
        else:
            import tritonclient.http as tc
            self._client = tc.InferenceServerClient(address, ssl=parts.scheme == "https",
                                                    connection_timeout=min(CONNECT_TIMEOUT_S, timeout_s),
                                                    network_timeout=timeout_s)
        self._tc = tc
        self.signatures = signatures(bundle)
        self._max_rows: dict[str, int] = {}
        self._suspect = False  # a connection failed since the bundle was last checked
        self._missing_since: float | None = None  # when a model was first found missing (monotonic)
        try:
            self._check()
        except BaseException:
            self._client.close()
            raise

    # ------------------------------------------------------------------------------ transport

    def _retrying(self, fn: Callable[..., T], *args: Any, timeout_s: float | None = None, **kwargs: Any) -> T:
        if self.grpc:
            kwargs["client_timeout"] = timeout_s or self.timeout_s
        for attempt in range(self.retries + 1):
            missing = False
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - classified right below
                missing = _missing_model(exc)
                if not missing and not _transient(exc):
                    raise
                self._suspect = True
                reason = _reason(exc)
            if missing:  # raised outside the except block: its cause's words do not make it fatal
                raise self._model_missing(str(args[0]) if args else "?")
            if attempt == self.retries:
                raise TritonUnavailable(f"Triton server at {self.url} unavailable after {self.retries + 1} "
                                        f"attempts: {reason}")
            time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _model_missing(self, name: str) -> Exception:
        """TritonUnavailable while the model has been missing for less than MISSING_GRACE_S, then TritonMismatch."""
        now = time.monotonic()
        if self._missing_since is None:
            self._missing_since = now
        if now - self._missing_since < MISSING_GRACE_S:
            return TritonUnavailable(f"Triton server at {self.url} does not serve model {name!r} at the moment "
                                     f"(starting, stopping or loading its models?): retried for {MISSING_GRACE_S:.0f} s")
        return TritonMismatch(f"Triton server at {self.url} has had no ready model {name!r} for "
                              f"{now - self._missing_since:.0f} s (bundle {self.bundle.bundle_id})")

    def _json(self, fn: Callable[..., dict], name: str) -> dict:
        kwargs = {"as_json": True} if self.grpc else {}
        out = self._retrying(fn, name, timeout_s=CONNECT_TIMEOUT_S, **kwargs)
        return out.get("config", out) if self.grpc else out

    def _check(self) -> None:
        """Server ready, every model ready, and declaring exactly the tensors this bundle needs."""
        def ready(**kwargs: Any) -> None:
            if not self._client.is_server_ready(**kwargs):
                raise NotReady("not ready (starting up, or not a Triton server)")

        self._retrying(ready, timeout_s=CONNECT_TIMEOUT_S)
        for sig in self.signatures.values():
            if not self._retrying(self._client.is_model_ready, sig.name, timeout_s=CONNECT_TIMEOUT_S):
                raise self._model_missing(sig.name)
            meta = self._json(self._client.get_model_metadata, sig.name)
            served = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]])  # gRPC's JSON: dims as strings
                      for t in meta["inputs"] + meta["outputs"]}
            wanted = {t.name: (WIRE_DTYPES[t.dtype], [-1, *t.dims]) for t in (*sig.inputs, sig.output)}
            if served != wanted:
                raise TritonMismatch(f"Triton model {sig.name!r} at {self.url} does not fit bundle "
                                     f"{self.bundle.bundle_id}: serves {served}, bundle needs {wanted}")
            config = self._json(self._client.get_model_config, sig.name)
            self._check_bundle(sig.name, config)
            max_batch = int(config.get("max_batch_size", 0))
            self._max_rows[sig.name] = min(self.batch_size, max_batch) if max_batch > 0 else self.batch_size
        self._suspect = False
        self._missing_since = None

    def _check_bundle(self, name: str, config: dict) -> None:
        """The model serves this bundle: its config says so (TritonMismatch otherwise)."""
        value = config.get("parameters", {}).get(BUNDLE_PARAMETER, {})
        served = value.get("string_value", value.get("stringValue")) if isinstance(value, dict) else None
        if served != self.bundle.bundle_id:
            raise TritonMismatch(f"Triton model {name!r} at {self.url} serves bundle {served or 'unknown'}, "
                                 f"not {self.bundle.bundle_id}: serve or export this bundle")

    def _recheck(self) -> None:
        """After a reconnect: the server may have come back with other models."""
        for sig in self.signatures.values():
            self._check_bundle(sig.name, self._json(self._client.get_model_config, sig.name))
        self._suspect = False

    def _serves(self, kind: str) -> bool:
        return kind in self.signatures

    def _call(self, name: str, *arrays: np.ndarray) -> np.ndarray:
        """One model over row chunks of the arrays; float32 (B, *output dims)."""
        sig: Signature = self.signatures[name]
        arrays = tuple(np.asarray(a, dtype=t.dtype) for a, t in zip(arrays, sig.inputs))
        step, out = self._max_rows[name], []
        for i in range(0, len(arrays[0]), step):
            inputs = []
            for t, a in zip(sig.inputs, arrays):
                chunk = np.ascontiguousarray(a[i : i + step])
                x = self._tc.InferInput(t.name, list(chunk.shape), WIRE_DTYPES[t.dtype])
                x.set_data_from_numpy(chunk)
                inputs.append(x)
            result = self._retrying(self._client.infer, name, inputs,
                                outputs=[self._tc.InferRequestedOutput(sig.output.name)])
            if self._suspect:
                self._recheck()
            self._missing_since = None
            out.append(result.as_numpy(sig.output.name))
        if not out:
            return np.zeros((0, *sig.output.dims), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "TritonBackend":
        return self

    def __exit__(self, *_) -> None:
        self.close()
