"""Triton backend: the model runs on a Triton Inference Server, or any KServe-v2 (Open Inference
Protocol) server, reached over HTTP or gRPC with ``tritonclient``; the node only sends the
preprocessed tensors.

Everything the node can check before the first study is checked at construction (server up and
ready, model ready, its tensors those of the package's manifest), so that ``cadnode serve``
refuses to start with one line saying what is missing instead of failing every study. Every
request carries the client's timeout: a slow or vanished server costs one job ``timeout_s``,
never a hung worker.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from cadnode.runtime.enum import Backend, BackendUnavailable
from cadnode.runtime.feeds import check_feeds, view_shapes
from cadnode.runtime.manifest import INPUT_NAMES, ModelManifest, read_manifest
from cadnode.runtime.types import ViewOutputs

log = logging.getLogger(__name__)

PROTOCOLS = ("http", "grpc")
_INPUT_TYPES = {"image": "FP32", "input_ids": "INT64", "attention_mask": "INT64"}
_NUMPY = {"FP32": np.float32, "INT64": np.int64}


def model_name(manifest: ModelManifest) -> str:
    """Triton model names are folder names: the package's name, made safe."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", manifest.name)


class TritonError(RuntimeError):
    """A request to the inference server failed (server lost, or it answered with an error)."""


class TritonTimeout(TritonError, TimeoutError):
    """The inference server did not answer within the engine's timeout."""


@dataclass(frozen=True)
class _Endpoint:
    protocol: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.protocol}://{self.host}:{self.port}"


def _endpoint(url: str, protocol: str | None) -> _Endpoint:
    """``url`` as protocol, host and port; the scheme, when given, decides the protocol."""
    parts = urlsplit(url if "://" in url else f"//{url}")
    chosen = parts.scheme or protocol or "http"
    if chosen not in PROTOCOLS:
        raise ValueError(f"triton url {url!r}: protocol {chosen!r} is not one of "
                         f"{', '.join(PROTOCOLS)}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ValueError(f"triton url {url!r} must be host:port, e.g. http://127.0.0.1:8000")
    return _Endpoint(chosen, parts.hostname, port)


def _shape_matches(served: list[int], expected: tuple[int, ...] | None) -> bool:
    """A served shape, batch dimension first, against a per-view shape; -1 matches any size,
    and a scalar per view may be served as (1,) (as Triton's config needs one dimension)."""
    if not served or served[0] != -1:
        return False
    if expected is None:
        return True
    rest = served[1:]
    if rest == [1] and expected == ():
        return True
    return len(rest) == len(expected) and all(s in (-1, e) for s, e in zip(rest, expected,
                                                                            strict=True))


class TritonEngine:
    """Runs a model package's model on a Triton / KServe-v2 server."""

    backend = Backend.TRITON.value

    def __init__(self, package: str | Path | ModelManifest, *, url: str,
                 protocol: str | None = None, model: str | None = None,
                 timeout_s: float = 30.0, verify_checksums: bool = True) -> None:
        """``url``: ``http://host:port`` or ``grpc://host:port`` (or ``host:port`` with
        ``protocol``); ``model`` defaults to :func:`model_name` of the manifest; ``timeout_s``
        bounds every request, connection included (it may be changed between requests).
        BackendUnavailable says what is missing."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.manifest = (package if isinstance(package, ModelManifest)
                         else read_manifest(package, verify_checksums=verify_checksums))
        self.endpoint = _endpoint(url, protocol)
        self.model = model or model_name(self.manifest)
        self.timeout_s = float(timeout_s)
        self._local = threading.local()
        try:
            if self.endpoint.protocol == "grpc":
                import tritonclient.grpc as client_module
            else:
                import tritonclient.http as client_module
            from tritonclient.utils import InferenceServerException
        except ImportError as exc:
            raise BackendUnavailable(
                f"the triton backend needs tritonclient ({exc}): pip install 'cadnode[triton]'"
            ) from None
        self._api: Any = client_module
        self._server_error: type[Exception] = InferenceServerException
        #: where the model runs, for the log and the job record
        self.providers: list[str] = [f"triton {self.endpoint} model {self.model}"]
        self._inputs: list[str] = []
        self.max_batch_size: int | None = None
        self._check_server()
        log.info("model %s %s on %s (max batch %s)", self.manifest.name, self.manifest.version,
                 self.providers[0], self.max_batch_size or "unbounded")

    # -- construction checks ---------------------------------------------------------------

    def _check_server(self) -> None:
        """Refuse, saying what is missing, unless the model can run as the manifest says."""
        try:
            ready = self._call("is_server_ready")
        except TritonError as exc:
            raise BackendUnavailable(f"Triton server at {self.endpoint} is unreachable: "
                                     f"{self._why(exc)}") from None
        if not ready:
            raise BackendUnavailable(f"Triton server at {self.endpoint} is not ready")
        try:
            model_ready = self._call("is_model_ready", self.model)
        except TritonError as exc:
            model_ready, why = False, f" ({self._why(exc)})"
        else:
            why = ""
        if not model_ready:
            raise BackendUnavailable(f"model {self.model!r} is not loaded or not ready on the "
                                     f"Triton server at {self.endpoint}{why}"
                                     f"{self._served_models()}")
        try:
            metadata = self._json("get_model_metadata", self.model)
        except TritonError as exc:
            raise BackendUnavailable(f"Triton server at {self.endpoint}: no metadata for model "
                                     f"{self.model!r} ({self._why(exc)})") from None
        self._check_metadata(metadata)
        self.max_batch_size = self._read_max_batch()

    def _why(self, exc: TritonError) -> str:
        """The transport's or the server's own words, without the engine's prefix."""
        if isinstance(exc, TritonTimeout):
            return f"no answer within {self.timeout_s:g} s"
        return _one_line(exc.__cause__ or exc)

    def _served_models(self) -> str:
        """``"; it has: a, b"`` from the repository index, or "" where the server has none."""
        try:
            index = self._json("get_model_repository_index")
        except TritonError:
            return ""
        if isinstance(index, dict):  # gRPC: {"models": [...]}
            index = index.get("models", [])
        names = sorted({str(m.get("name")) for m in index if isinstance(m, dict)})
        return f"; it has: {', '.join(names) or 'no models'}"

    def _check_metadata(self, metadata: dict[str, Any]) -> None:
        """The served tensors must be the package's: names, datatypes, per-view shapes."""
        expected = view_shapes(self.manifest)
        where = f"model {self.model!r} on {self.endpoint}"
        served_in = {t["name"]: t for t in metadata.get("inputs", [])}
        served_out = {t["name"]: t for t in metadata.get("outputs", [])}
        unknown = sorted(set(served_in) - set(INPUT_NAMES))
        if unknown:
            raise BackendUnavailable(f"{where} takes inputs {unknown} that the package "
                                     f"{self.manifest.name} does not make")
        missing = [n for n in self.manifest.outputs if n not in served_out]
        if missing:
            raise BackendUnavailable(f"{where} lacks output(s) {missing} of the package "
                                     f"{self.manifest.name}")
        checks = [(n, served_in[n], _INPUT_TYPES[n]) for n in INPUT_NAMES if n in served_in]
        checks += [(n, served_out[n], "FP32") for n in self.manifest.outputs]
        for name, tensor, datatype in checks:
            shape = [int(d) for d in tensor.get("shape", [])]
            want = expected[name]
            if tensor.get("datatype") != datatype:
                raise BackendUnavailable(f"{where}: tensor {name} is {tensor.get('datatype')}, "
                                         f"the package needs {datatype}")
            if not _shape_matches(shape, want):
                raise BackendUnavailable(
                    f"{where}: tensor {name} has shape {shape}, the package needs "
                    f"[-1{''.join(f', {d}' for d in want or ('...',))}] (batch of views first)")
        self._inputs = [n for n in INPUT_NAMES if n in served_in]

    def _read_max_batch(self) -> int | None:
        """``max_batch_size`` from the model configuration, where the server offers one (Triton
        does; plain KServe servers do not, and then a batch is sent whole)."""
        try:
            config = self._json("get_model_config", self.model)
        except TritonError:
            return None
        config = config.get("config", config)  # gRPC wraps it
        value = int(config.get("max_batch_size", 0) or 0)
        return value if value > 0 else None

    # -- requests --------------------------------------------------------------------------

    def _client(self) -> Any:
        """This thread's client (tritonclient's clients are not thread-safe); an HTTP client
        holds its timeouts, so a changed ``timeout_s`` makes a new one."""
        client = getattr(self._local, "client", None)
        if client is not None and self._local.timeout_s != self.timeout_s:
            self._drop_client()
            client = None
        if client is None:
            address = f"{self.endpoint.host}:{self.endpoint.port}"
            if self.endpoint.protocol == "grpc":
                client = self._api.InferenceServerClient(address)
            else:
                client = self._api.InferenceServerClient(
                    address, connection_timeout=self.timeout_s, network_timeout=self.timeout_s)
            self._local.client, self._local.timeout_s = client, self.timeout_s
        return client

    def _drop_client(self) -> None:
        """Forget this thread's client after a transport failure: an HTTP connection that
        timed out may still receive the late answer, so it must not serve the next request."""
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a broken connection may fail; it is gone either way
                log.debug("closing a failed Triton client", exc_info=True)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One client call under the timeout; TritonTimeout or TritonError say where."""
        if self.endpoint.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout_s
        try:
            return getattr(self._client(), method)(*args, **kwargs)
        except self._server_error as exc:
            error: Any = exc  # tritonclient's InferenceServerException
            status = str(error.status() or "")
            if "DEADLINE_EXCEEDED" in status:
                self._drop_client()
                raise self._timeout(method) from exc
            if "UNAVAILABLE" in status:
                self._drop_client()
            raise self._failed(method, error.message()) from exc
        except Exception as exc:  # the transport's own: refused, reset, DNS, socket timeout
            self._drop_client()
            if isinstance(exc, TimeoutError):
                raise self._timeout(method) from exc
            raise self._failed(method, f"{type(exc).__name__}: {exc}") from exc

    def _failed(self, method: str, why: str) -> TritonError:
        return TritonError(f"Triton server at {self.endpoint}, model {self.model!r}: {method} "
                           f"failed: {_one_line(why)}")

    def _timeout(self, method: str) -> TritonTimeout:
        return TritonTimeout(f"Triton server at {self.endpoint}, model {self.model!r}: no answer "
                             f"to {method} within the {self.timeout_s:g} s timeout")

    def _json(self, method: str, *args: Any) -> Any:
        """A metadata call as JSON on either protocol (gRPC answers protobufs by default)."""
        if self.endpoint.protocol == "grpc":
            return self._call(method, *args, as_json=True)
        return self._call(method, *args)

    def predict(self, images: np.ndarray, input_ids: np.ndarray,
                attention_mask: np.ndarray) -> ViewOutputs:
        """images float32 (B,1,H,W) in [0,1]; tokens int64 (B,L) -> probabilities per view,
        in requests of at most the server's max batch size."""
        feeds = check_feeds(self.manifest, images, input_ids, attention_mask)
        total = feeds["image"].shape[0]
        if not total:
            raise ValueError("predict needs at least one view")
        step = self.max_batch_size or total
        parts = [self._infer({n: a[i:i + step] for n, a in feeds.items()})
                 for i in range(0, total, step)]
        return ViewOutputs(cancer=np.concatenate([p[0] for p in parts]),
                           calcification=np.concatenate([p[1] for p in parts]),
                           heatmap=np.concatenate([p[2] for p in parts]))

    def _infer(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        inputs = []
        for name in self._inputs:
            array = feeds[name]
            tensor = self._api.InferInput(name, list(array.shape), _INPUT_TYPES[name])
            tensor.set_data_from_numpy(array.astype(_NUMPY[_INPUT_TYPES[name]], copy=False))
            inputs.append(tensor)
        names = ("cancer", "calcification", "heatmap")
        outputs = [self._api.InferRequestedOutput(n) for n in names]
        result = self._call("infer", self.model, inputs, outputs=outputs)
        b = feeds["image"].shape[0]
        cancer, calc, heat = (np.asarray(result.as_numpy(n), dtype=np.float32) for n in names)
        return cancer.reshape(b), calc.reshape(b), heat.reshape(b, *heat.shape[1:])


def _one_line(text: object) -> str:
    """gRPC error details may span lines; a refusal or job record wants one."""
    return " ".join(str(text).split())
