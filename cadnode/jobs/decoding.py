"""Decoding in a child process with a memory limit, so that a decoder bomb fails one view.

A codestream can pass every header check and still make a decoder allocate gigabytes, and the
native decoders (OpenJPEG, libjpeg, the RLE plugin) abort the whole process when an allocation
fails. The worker therefore decodes and prepares each image in long-lived child processes
whose data segments are capped (``RLIMIT_DATA``, ``CADNODE_DECODE_MEMORY_MB`` each): whatever
one image does, its child fails or dies, the view is reported with a one-line reason, new
children are started for the next image, and the node goes on. A study's views are decoded in
parallel, one per child (``CADNODE_DECODE_PROCESSES``; the decode is most of the pixel stage).
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import pydicom

from cadnode.dicom.enum import PixelPipeline
from cadnode.dicom.pixels import PixelDecodeError, PreparedImage, prepare_image

#: Seconds one image may take to decode and prepare before its child is replaced.
DECODE_TIMEOUT = 300.0


def _start_child(limit_bytes: int, node_pid: int) -> None:
    """In the child: cap its data segment, and exit when the node is gone (the child's parent
    is the forkserver, and it holds its own call pipe, so nothing else would end it after a
    SIGKILL of the node)."""
    resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, limit_bytes))

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(node_pid, 0)
            except (ProcessLookupError, PermissionError):  # gone, or its pid reused by another
                os._exit(0)

    threading.Thread(target=watch, name="node-watch", daemon=True).start()


def prepare_file(path: str, size: tuple[int, int], laterality: str | None,
                 pipeline: PixelPipeline, reduce_j2k: bool = False) -> PreparedImage:
    """Read ``path`` and prepare it for the model (what runs in the child)."""
    return prepare_image(pydicom.dcmread(path), size, laterality, pipeline=pipeline,
                         reduce_j2k=reduce_j2k)


def default_processes() -> int:
    """Decoding children when the setting says 0: one per core, at most one per standard
    view (a screening study has four)."""
    return max(1, min(4, os.cpu_count() or 1))


class DecodePool:
    """``processes`` children, started on first use and replaced after one dies.

    The views of a study are decoded in parallel, one per child; a child that dies takes the
    pool with it (``BrokenProcessPool`` for every view in flight), so each view caught in that
    is decoded again alone, which names the one that killed it and loses no other.
    """

    def __init__(self, memory_mb: int, processes: int = 1, reduce_j2k: bool = False) -> None:
        self.memory_mb = memory_mb
        self.processes = max(1, processes)
        self.reduce_j2k = reduce_j2k
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def prepare(self, path: str, size: tuple[int, int], laterality: str | None,
                pipeline: PixelPipeline) -> PreparedImage:
        """``prepare_file`` in a child; PixelDecodeError when it fails, dies or hangs."""
        if self.memory_mb <= 0:
            return prepare_file(path, size, laterality, pipeline, self.reduce_j2k)
        return self._result(path, self._submit(path, size, laterality, pipeline),
                            time.monotonic() + DECODE_TIMEOUT)

    def prepare_all(self, views: Sequence[tuple[str, str | None]], size: tuple[int, int],
                    pipeline: PixelPipeline) -> list[PreparedImage | Exception]:
        """Each (path, laterality) prepared, in parallel children; per view its image or the
        exception that stopped it (PixelDecodeError, or what reading the file raised)."""
        if self.memory_mb <= 0 or self.processes == 1 or len(views) < 2:
            return [_outcome(self.prepare, path, size, lat, pipeline) for path, lat in views]
        futures = [self._submit(path, size, lat, pipeline) for path, lat in views]
        rounds = -(-len(views) // self.processes)
        deadline = time.monotonic() + DECODE_TIMEOUT * rounds
        out = [_outcome(self._result, path, future, deadline)
               for (path, _lat), future in zip(views, futures, strict=True)]
        for n, (path, lat) in enumerate(views):
            if isinstance(out[n], _Broken):  # caught in another view's crash: alone, again
                out[n] = _outcome(self.prepare, path, size, lat, pipeline)
        return out

    def _submit(self, path: str, size: tuple[int, int], laterality: str | None,
                pipeline: PixelPipeline) -> Future[PreparedImage]:
        with self._lock:
            return self._pool().submit(prepare_file, path, size, laterality, pipeline,
                                       self.reduce_j2k)

    def _result(self, path: str, future: Future[PreparedImage],
                deadline: float) -> PreparedImage:
        """The future's image by ``deadline`` (``time.monotonic``); its failure as
        PixelDecodeError (``_Broken`` when the pool broke: the caller may retry it alone)."""
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except (BrokenProcessPool, CancelledError):  # a child died, or another view's timed out
            self.close()
            raise _Broken(
                f"the decoder process died while decoding {path} (memory limit "
                f"CADNODE_DECODE_MEMORY_MB={self.memory_mb}, or a decoder crash)",
                f"the image could not be decoded within the decoding memory limit "
                f"({self.memory_mb} MB)") from None
        except TimeoutError:
            self.close(kill=True)
            raise PixelDecodeError(
                f"decoding {path} took more than {DECODE_TIMEOUT:.0f} s; the decoder process "
                "was replaced", "decoding took too long; not analysed") from None
        except MemoryError:
            raise PixelDecodeError(
                f"decoding {path} needs more memory than CADNODE_DECODE_MEMORY_MB="
                f"{self.memory_mb}", f"the image could not be decoded within the decoding "
                f"memory limit ({self.memory_mb} MB)") from None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            # forkserver: the child starts from a clean process, not a fork of a threaded one
            self._executor = ProcessPoolExecutor(
                max_workers=self.processes, mp_context=multiprocessing.get_context("forkserver"),
                initializer=_start_child, initargs=(self.memory_mb * 2**20, os.getpid()))
        return self._executor

    def close(self, kill: bool = False) -> None:
        """Stop the children (the next ``prepare`` starts new ones)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is None:
            return
        if kill:
            for proc in list(getattr(executor, "_processes", {}).values()):
                proc.kill()
        executor.shutdown(wait=not kill, cancel_futures=True)


class _Broken(PixelDecodeError):
    """The pool broke while this view was in it: it may not be this view's fault."""


def _outcome(call: Callable[..., PreparedImage], *args: Any) -> PreparedImage | Exception:
    """``call(*args)``, or the exception it raised."""
    try:
        return call(*args)
    except Exception as exc:  # noqa: BLE001 - the caller reports each view's failure
        return exc
