"""Decoding in a child process with a memory limit, so that a decoder bomb fails one view.

A codestream can pass every header check and still make a decoder allocate gigabytes, and the
native decoders (OpenJPEG, libjpeg, the RLE plugin) abort the whole process when an allocation
fails. The worker therefore decodes and prepares each image in one long-lived child process
whose data segment is capped (``RLIMIT_DATA``, ``CADNODE_DECODE_MEMORY_MB``): whatever one image
does, the child fails or dies, the view is reported with a one-line reason, a new child is
started for the next image, and the node goes on.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

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
                 pipeline: PixelPipeline) -> PreparedImage:
    """Read ``path`` and prepare it for the model (what runs in the child)."""
    return prepare_image(pydicom.dcmread(path), size, laterality, pipeline=pipeline)


class DecodePool:
    """One child process, started on first use and replaced after it dies."""

    def __init__(self, memory_mb: int) -> None:
        self.memory_mb = memory_mb
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def prepare(self, path: str, size: tuple[int, int], laterality: str | None,
                pipeline: PixelPipeline) -> PreparedImage:
        """``prepare_file`` in the child; PixelDecodeError when it fails, dies or hangs."""
        if self.memory_mb <= 0:
            return prepare_file(path, size, laterality, pipeline)
        with self._lock:
            future: Future[PreparedImage] = self._pool().submit(prepare_file, path, size,
                                                                laterality, pipeline)
        try:
            return future.result(timeout=DECODE_TIMEOUT)
        except BrokenProcessPool:
            self.close()
            raise PixelDecodeError(
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
                max_workers=1, mp_context=multiprocessing.get_context("forkserver"),
                initializer=_start_child, initargs=(self.memory_mb * 2**20, os.getpid()))
        return self._executor

    def close(self, kill: bool = False) -> None:
        """Stop the child (the next ``prepare`` starts a new one)."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        if kill:
            for proc in list(getattr(executor, "_processes", {}).values()):
                proc.kill()
        executor.shutdown(wait=not kill, cancel_futures=True)
