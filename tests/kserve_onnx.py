"""A real KServe-v2 (Open Inference Protocol) server hosting a model package's model.onnx.

The peer the ``triton`` backend's tests talk to: KServe's own REST and gRPC v2 data plane
(``kserve`` 0.21: :class:`kserve.Model`, its ``DataPlane``, ``RESTServer`` and gRPC
``InferenceServicer``), running the graph with ONNX Runtime on the CPU. Two Triton extensions
that plain KServe lacks are added, as Triton serves them: the model configuration
(``max_batch_size``, so clients split large batches) and the repository index (so a client can
say which models a server has). Both listeners bind to loopback only; port 0 takes free ports,
and one line ``kserve_onnx listening http=PORT grpc=PORT`` on stdout says which.

    python -m tests.kserve_onnx [--package DIR] [--http-port 0] [--grpc-port 0]
                                [--max-batch 8] [--delay-s 0]

The model is served as ``model_name(manifest)``; with ``--delay-s`` a second one,
``<name>-slow``, answers each request that much later (for client timeouts). A batch larger than
``--max-batch`` is refused, as Triton refuses one.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from concurrent import futures
from typing import Any

import numpy as np
import onnxruntime as ort

from cadnode.runtime import DEFAULT_MODEL_PACKAGE, read_manifest
from cadnode.runtime.manifest import ModelManifest
from cadnode.runtime.onnx import session_options
from cadnode.runtime.triton import model_name

_DATATYPES = {"tensor(float)": "FP32", "tensor(int64)": "INT64"}
_SERVICE = "inference.GRPCInferenceService"


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default=str(DEFAULT_MODEL_PACKAGE))
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--delay-s", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    return parser.parse_args(argv)


def _tensors(items: list[Any]) -> list[dict[str, Any]]:
    """ONNX graph inputs or outputs as KServe metadata; the batch dimension is -1."""
    return [{"name": t.name, "datatype": _DATATYPES[t.type],
             "shape": [-1, *(d if isinstance(d, int) else -1 for d in t.shape[1:])]}
            for t in items]


def build_models(manifest: ModelManifest, options: argparse.Namespace) -> list[Any]:
    """The package's model, and its slow twin when ``--delay-s`` is given."""
    import kserve
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    session = ort.InferenceSession(str(manifest.model_path),
                                   sess_options=session_options(options.threads),
                                   providers=["CPUExecutionProvider"])
    inputs, outputs = _tensors(session.get_inputs()), _tensors(session.get_outputs())

    class OnnxModel(kserve.Model):  # type: ignore[misc]
        """One ONNX Runtime session behind KServe's v2 data plane."""

        def __init__(self, name: str, delay_s: float) -> None:
            super().__init__(name)
            self.delay_s = delay_s
            self.ready = True

        def get_input_types(self) -> list[dict[str, Any]]:
            return inputs

        def get_output_types(self) -> list[dict[str, Any]]:
            return outputs

        async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                          response_headers: dict[str, str] | None = None) -> InferResponse:
            feeds = {i.name: i.as_numpy() for i in payload.inputs}
            batch = {a.shape[0] for a in feeds.values()}
            if len(batch) != 1 or max(batch) > options.max_batch:
                raise InvalidInput(f"batch sizes {sorted(batch)}: one size, at most "
                                   f"{options.max_batch}, expected")
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            wanted = ([o.name for o in payload.request_outputs] if payload.request_outputs
                      else [o["name"] for o in outputs])
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(None, session.run, wanted, feeds)
            binary = payload.use_binary_outputs
            tensors = []
            for name, array in zip(wanted, results, strict=True):
                out = InferOutput(name, list(array.shape), "FP32")
                out.set_data_from_numpy(np.asarray(array, np.float32), binary_data=binary)
                tensors.append(out)
            return InferResponse(payload.id, self.name, tensors, use_binary_outputs=binary,
                                 requested_outputs=payload.request_outputs)

    name = model_name(manifest)
    models = [OnnxModel(name, 0.0)]
    if options.delay_s > 0:
        models.append(OnnxModel(f"{name}-slow", options.delay_s))
    return models


def _config(model: Any, max_batch: int) -> dict[str, Any]:
    """The part of a Triton model configuration that clients read: the name, the platform and
    ``max_batch_size``."""
    return {"name": model.name, "platform": "onnxruntime_onnx", "max_batch_size": max_batch}


def _add_rest_extensions(app: Any, models: dict[str, Any], max_batch: int) -> None:
    from fastapi.responses import JSONResponse

    async def config(model_name: str) -> JSONResponse:
        if model_name not in models:
            return JSONResponse({"error": f"model {model_name} not found"}, status_code=404)
        return JSONResponse(_config(models[model_name], max_batch))

    async def index() -> JSONResponse:
        return JSONResponse([{"name": n, "version": "1", "state": "READY"} for n in models])

    app.add_api_route("/v2/models/{model_name}/config", config, methods=["GET"])
    app.add_api_route("/v2/repository/index", index, methods=["POST"])


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value: bytes | str | int) -> bytes:
    """One protobuf field: a varint for an int, length-delimited otherwise."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _grpc_extensions(models: dict[str, Any], max_batch: int) -> Any:
    """Triton's ModelConfig and RepositoryIndex RPCs. tritonclient's protos cannot be loaded
    beside KServe's (both define package ``inference``), so the few fields are encoded here:
    ModelConfigResponse.config (1) = ModelConfig{name 1, platform 2, max_batch_size 4};
    RepositoryIndexResponse.models (1) = ModelIndex{name 1, version 2, state 3}."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    async def config(request: Any, context: Any) -> bytes:
        # ModelConfigRequest{name 1, version 2} has ModelMetadataRequest's layout
        if request.name not in models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.name} not found")
        c = _config(models[request.name], max_batch)
        return _field(1, _field(1, c["name"]) + _field(2, c["platform"])
                      + _field(4, c["max_batch_size"]))

    async def index(request: bytes, context: Any) -> bytes:
        return b"".join(_field(1, _field(1, n) + _field(2, "1") + _field(3, "READY"))
                        for n in models)

    return grpc.method_handlers_generic_handler(_SERVICE, {
        "ModelConfig": grpc.unary_unary_rpc_method_handler(
            config, request_deserializer=pb.ModelMetadataRequest.FromString),
        "RepositoryIndex": grpc.unary_unary_rpc_method_handler(index),
    })


async def serve(models: list[Any], http_port: int, grpc_port: int, max_batch: int) -> None:
    """KServe's REST and gRPC v2 servers for ``models`` on loopback, until SIGTERM/SIGINT."""
    import uvicorn
    from grpc import aio
    from kserve.model_repository import ModelRepository
    from kserve.model_server import FASTAPI_APP_IMPORT_STRING, app
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
    from kserve.protocol.grpc.servicer import InferenceServicer
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.server import RESTServer

    repository = ModelRepository()
    for model in models:
        repository.update(model)
    dataplane = DataPlane(model_registry=repository)
    extension = ModelRepositoryExtension(model_registry=repository)
    by_name = {m.name: m for m in models}

    rest = RESTServer(FASTAPI_APP_IMPORT_STRING, dataplane, extension, http_port)
    rest.create_application()
    _add_rest_extensions(app, by_name, max_batch)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", http_port))

    unbounded = 2**31 - 1  # as Triton: a batch of 8 views is more than gRPC's default 4 MiB
    server = aio.server(futures.ThreadPoolExecutor(max_workers=4),
                        interceptors=(ExceptionToStatusInterceptor(),),
                        options=[("grpc.max_receive_message_length", unbounded),
                                 ("grpc.max_send_message_length", unbounded)])
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(dataplane, extension), server)
    server.add_generic_rpc_handlers([_grpc_extensions(by_name, max_batch)])
    bound_grpc = server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    await server.start()
    print(f"kserve_onnx listening http={sock.getsockname()[1]} grpc={bound_grpc}", flush=True)
    try:
        await uvicorn.Server(rest.config).serve(sockets=[sock])
    finally:
        await server.stop(grace=1)


def main(argv: list[str] | None = None) -> None:
    options = _arguments(sys.argv[1:] if argv is None else argv)
    sys.argv = sys.argv[:1]  # kserve parses the command line when imported
    manifest = read_manifest(options.package)
    asyncio.run(serve(build_models(manifest, options), options.http_port, options.grpc_port,
                      options.max_batch))


if __name__ == "__main__":
    main()
