"""int8 calibration from the user's own DICOM images.

TensorRT's entropy calibrator (``IInt8EntropyCalibrator2``) asks for batches of all the
network's inputs in device memory and measures each tensor's range on them. The batches are
made exactly as the node makes its inputs when serving (:func:`cadnode.jobs.inputs.file_inputs`:
the node's pixel pipeline, clinical text and tokenizer), so the ranges are those the engine
will see. The resulting calibration cache is written next to the engines and reused by later
builds with the same model, TensorRT version and calibration files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.misc import is_dicom

from cadnode.jobs.inputs import file_inputs
from cadnode.runtime.cuda import CudaLayer, DeviceBuffer
from cadnode.runtime.engine_cache import EngineKey, engines_dir, write_atomically
from cadnode.runtime.manifest import ModelManifest
from cadnode.text.tokenizer import ClinicalTokenizer


def calibration_files(folder: Path) -> list[Path]:
    """Every DICOM file (with the 'DICM' preamble) under ``folder``, in a stable order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"calibration folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_dicom(p))
    if not files:
        raise ValueError(f"calibration folder {folder} holds no DICOM files")
    return files


def calibration_cache_path(key: EngineKey, home: Path, files: Sequence[Path],
                           batch_size: int) -> Path:
    """The cache of one model, TensorRT version and set of calibration files (by name and
    size): another folder gets another cache instead of a stale one."""
    digest = hashlib.sha256(str(batch_size).encode())
    for path in files:
        digest.update(f"{path.name}\0{path.stat().st_size}\n".encode())
    return engines_dir(home) / (f"{key.model_prefix()}trt{key.tensorrt_version}-int8-"
                                f"{digest.hexdigest()[:12]}.calibration")


def entropy_calibrator(trt: Any, cuda: CudaLayer, manifest: ModelManifest,
                       files: Sequence[Path], cache_path: Path, batch_size: int) -> Any:
    """A ``trt.IInt8EntropyCalibrator2`` feeding ``files`` in batches of ``batch_size`` views
    (the last batch filled up from the first files: the calibration profile has one shape)."""

    class DicomCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        """Batches of the user's DICOM views in device memory, one buffer per input."""

        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.files = list(files)
            self.cache_path = cache_path
            self.batches_served = 0
            self._tokenizer = ClinicalTokenizer.from_file(manifest.tokenizer_path)
            self._next = 0
            self._buffers: dict[str, DeviceBuffer] = {}
            self._staged: list[np.ndarray] = []

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self._next >= len(self.files):
                return None
            paths = [self.files[(self._next + i) % len(self.files)] for i in range(batch_size)]
            self._next += batch_size
            inputs = file_inputs(paths, manifest, self._tokenizer)
            arrays = {"image": inputs.images, "input_ids": inputs.input_ids,
                      "attention_mask": inputs.attention_mask}
            self._staged = [np.ascontiguousarray(arrays[name]) for name in names]
            for name, array in zip(names, self._staged, strict=True):
                if name not in self._buffers:
                    self._buffers[name] = cuda.allocate(array.nbytes)
                cuda.to_device(self._buffers[name], array)
            cuda.synchronize()
            self.batches_served += 1
            return [self._buffers[name].ptr for name in names]

        def read_calibration_cache(self) -> bytes | None:
            return self.cache_path.read_bytes() if self.cache_path.is_file() else None

        def write_calibration_cache(self, cache: Any) -> None:
            write_atomically(self.cache_path, memoryview(cache))

        def close(self) -> None:
            """Give the device buffers back once the engine is built."""
            for buffer in self._buffers.values():
                cuda.free(buffer)
            self._buffers.clear()

    return DicomCalibrator()
