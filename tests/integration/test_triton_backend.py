"""The triton backend against a real KServe-v2 server (tests/kserve_onnx.py) on loopback, over
HTTP and gRPC: the same numbers as ONNX Runtime in this process, clear refusals at start-up,
and a bounded wait when the server is slow or gone."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cadnode.demo import free_port, stop_process
from cadnode.jobs.inputs import ModelInputs, file_inputs
from cadnode.runtime import DEFAULT_MODEL_PACKAGE, BackendUnavailable, read_manifest
from cadnode.runtime.onnx import OnnxEngine
from cadnode.runtime.triton import TritonEngine, TritonError, TritonTimeout, model_name
from cadnode.text.tokenizer import ClinicalTokenizer
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[2]
MANIFEST = read_manifest(DEFAULT_MODEL_PACKAGE)
MODEL = model_name(MANIFEST)
DELAY_S = 2.0  # the slow model's answer time
PROTOCOLS = ("http", "grpc")


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    http: int
    grpc: int

    def url(self, protocol: str) -> str:
        return f"{protocol}://127.0.0.1:{self.http if protocol == 'http' else self.grpc}"


def _start_server(log: Path, *args: str) -> Server:
    """tests/kserve_onnx.py as a process; returns once both protocols answer ready."""
    if importlib.util.find_spec("kserve") is None:
        if os.environ.get("CI"):
            pytest.fail("kserve is not installed (pip install -e '.[dev]')")
        pytest.skip("kserve is not installed (pip install -e '.[dev]')")
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    fh = log.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "tests.kserve_onnx", "--threads", "1", *args],
                            cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    fh.close()
    ports: list[int] = []

    def listening() -> bool:
        text = log.read_text("utf-8", "replace")
        m = re.search(r"kserve_onnx listening http=(\d+) grpc=(\d+)", text)
        if m:
            ports[:] = [int(m.group(1)), int(m.group(2))]
        return bool(m) or proc.poll() is not None

    def ready() -> bool:
        try:
            return bool(httpclient.InferenceServerClient(f"127.0.0.1:{ports[0]}").is_server_ready()
                        and grpcclient.InferenceServerClient(f"127.0.0.1:{ports[1]}")
                        .is_server_ready(client_timeout=1))
        except Exception:
            return proc.poll() is not None

    if not (wait_until(listening, 60, 0.05) and ports and wait_until(ready, 30, 0.05)
            and proc.poll() is None):
        stop_process(proc)
        pytest.fail(f"the KServe server did not start:\n{log.read_text('utf-8', 'replace')}")
    return Server(proc, *ports)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The package's model, and a twin that answers DELAY_S late."""
    s = _start_server(tmp_path_factory.mktemp("kserve") / "server.log",
                      "--delay-s", str(DELAY_S), "--max-batch", "8")
    yield s
    stop_process(s.proc, timeout=10)


@pytest.fixture(scope="module")
def reference() -> OnnxEngine:
    return OnnxEngine(DEFAULT_MODEL_PACKAGE, intra_op_threads=1)


@pytest.fixture(scope="module")
def exam(demo_study: list[Path]) -> ModelInputs:
    """The demo study's four real views, through the node's own pipeline."""
    return file_inputs(demo_study, MANIFEST, ClinicalTokenizer.from_file(MANIFEST.tokenizer_path))


def _random_views(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, w = MANIFEST.input_size
    length = MANIFEST.max_text_len
    mask = (np.arange(length) < rng.integers(5, length, (n, 1))).astype(np.int64)
    return (rng.random((n, 1, h, w), dtype=np.float32),
            rng.integers(4, 500, (n, length)) * mask, mask)


def _assert_same(got, want) -> None:  # type: ignore[no-untyped-def]
    for name in ("cancer", "calcification", "heatmap"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == np.float32 and a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_parity_with_onnx_runtime(server: Server, reference: OnnxEngine, exam: ModelInputs,
                                  protocol: str) -> None:
    """Real exam views and a batch of 9 (split into 8 + 1 by the server's max batch) give the
    scores and heatmaps ONNX Runtime gives here."""
    engine = TritonEngine(DEFAULT_MODEL_PACKAGE, url=server.url(protocol))
    assert engine.backend == "triton" and engine.max_batch_size == 8
    assert engine.providers == [f"triton {server.url(protocol)} model {MODEL}"]
    assert len(exam) == 4
    batch = (exam.images, exam.input_ids, exam.attention_mask)
    _assert_same(engine.predict(*batch), reference.predict(*batch))
    nine = _random_views(9, seed=1)
    out = engine.predict(*nine)
    assert len(out) == 9
    _assert_same(out, reference.predict(*nine))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_down_is_refused_naming_the_url(protocol: str) -> None:
    url = f"{protocol}://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(BackendUnavailable, match=re.escape(f"{url} is unreachable")):
        TritonEngine(DEFAULT_MODEL_PACKAGE, url=url, timeout_s=5)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_missing_model_is_refused_naming_it(server: Server, protocol: str) -> None:
    with pytest.raises(BackendUnavailable) as caught:
        TritonEngine(DEFAULT_MODEL_PACKAGE, url=server.url(protocol), model="no-such-model")
    message = str(caught.value)
    assert "'no-such-model' is not loaded or not ready" in message
    assert f"it has: {MODEL}, {MODEL}-slow" in message and "\n" not in message


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_metadata_unlike_the_manifest_is_refused(server: Server, tmp_path: Path,
                                                 protocol: str) -> None:
    """A package whose manifest says 32 tokens, against the served model's own length."""
    package = tmp_path / "pkg"
    package.mkdir()
    for path in DEFAULT_MODEL_PACKAGE.iterdir():
        if path.name != "manifest.json":
            (package / path.name).symlink_to(path)
    length = MANIFEST.max_text_len
    text = (DEFAULT_MODEL_PACKAGE / "manifest.json").read_text()
    (package / "manifest.json").write_text(text.replace(f'"max_text_len": {length}',
                                                        '"max_text_len": 32'))
    with pytest.raises(BackendUnavailable, match=rf"tensor input_ids has shape \[-1, {length}\], "
                                                 r"the package needs \[-1, 32\]"):
        TritonEngine(package, url=server.url(protocol), model=MODEL, verify_checksums=False)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_slow_server_times_out_then_engine_recovers(server: Server, reference: OnnxEngine,
                                                    protocol: str) -> None:
    engine = TritonEngine(DEFAULT_MODEL_PACKAGE, url=server.url(protocol), model=f"{MODEL}-slow",
                          timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(TritonTimeout) as caught:
        engine.predict(*_random_views(1, seed=2))
    assert time.monotonic() - start < 0.5 + 1.5
    assert isinstance(caught.value, TimeoutError)
    assert str(caught.value) == (f"Triton server at {server.url(protocol)}, model '{MODEL}-slow': "
                                 "no answer to infer within the 0.5 s timeout")
    # A longer timeout: the next answer is this request's, not the late one of the first.
    engine.timeout_s = DELAY_S + 10
    views = _random_views(2, seed=3)
    _assert_same(engine.predict(*views), reference.predict(*views))


def test_wrong_shapes_are_refused_before_sending(server: Server) -> None:
    engine = TritonEngine(DEFAULT_MODEL_PACKAGE, url=server.url("http"))
    ids = np.zeros((1, MANIFEST.max_text_len), np.int64)
    with pytest.raises(ValueError, match="images must be"):
        engine.predict(np.zeros((1, 1, 64, 64), np.float32), ids, ids)
    with pytest.raises(ValueError, match="input_ids must be"):
        engine.predict(np.zeros((1, 1, *MANIFEST.input_size), np.float32),
                       np.zeros((1, 32), np.int64), ids)


def test_lost_server_fails_the_request_quickly(tmp_path: Path) -> None:
    """A server killed after start-up: predict raises, on both protocols, within seconds."""
    lost = _start_server(tmp_path / "lost.log")
    engines = [TritonEngine(DEFAULT_MODEL_PACKAGE, url=lost.url(p), timeout_s=5)
               for p in PROTOCOLS]
    lost.proc.kill()
    lost.proc.wait()
    for engine in engines:
        start = time.monotonic()
        with pytest.raises(TritonError, match=re.escape(f"Triton server at {engine.endpoint}, "
                                                        f"model '{MODEL}': infer failed")):
            engine.predict(*_random_views(1, seed=4))
        assert time.monotonic() - start < 5
