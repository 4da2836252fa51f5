"""Where TensorRT engines live under the node's home, and how one is known to fit.

A TensorRT plan runs only with the TensorRT version that built it, on the GPU model (and
compute capability) it was built for, and holds one precision and one range of batch sizes.
:class:`EngineKey` is all of that plus the ONNX file's sha256; it names the plan file
``<home>/engines/<model>-<sha12>-trt<version>-<gpu>-sm<cc>-<precision>-v<max views>.plan``
and is recorded, with the build settings and the plan's own sha256, in a JSON sidecar next to
it. Serving (``cadnode.runtime.tensorrt``) and building (``trt_engines.build``) both read this
module, so the two can never disagree about which file is whose.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cadnode.runtime.cuda import DeviceInfo
from cadnode.runtime.enum import PRECISIONS, Backend
from cadnode.runtime.manifest import ModelManifest, sha256

#: What a TensorRT engine can compute in, the default first (defined in cadnode.runtime.enum).
TRT_PRECISIONS: tuple[str, ...] = tuple(p.value for p in PRECISIONS[Backend.TENSORRT])
ENGINE_DIR = "engines"
TIMING_CACHE_NAME = "timing.cache"
SIDECAR_FORMAT = 1


def file_slug(text: str) -> str:
    """``text`` as a piece of a file name under the engines folder (lower case, no spaces)."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "x"


def engines_dir(home: Path) -> Path:
    """``<home>/engines``: plans, sidecars, the timing cache and int8 calibration caches."""
    return Path(home) / ENGINE_DIR


def check_precision(precision: str) -> str:
    """``precision`` when TensorRT offers it, else ValueError listing what it offers."""
    if precision not in TRT_PRECISIONS:
        raise ValueError(f"TensorRT precision must be one of {', '.join(TRT_PRECISIONS)}, "
                         f"not {precision!r}")
    return str(precision)  # a Precision (StrEnum) member becomes its plain value


@dataclass(frozen=True)
class EngineKey:
    """Everything a plan depends on; two plans with equal keys are interchangeable."""

    model: str
    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    capability: tuple[int, int]
    precision: str
    max_views: int

    @classmethod
    def for_package(cls, manifest: ModelManifest, tensorrt_version: str, device: DeviceInfo,
                    precision: str, max_views: int) -> EngineKey:
        """The key of ``manifest``'s ONNX file (its bytes hashed now, not the manifest's word)
        built with this TensorRT for this GPU."""
        if max_views < 1:
            raise ValueError(f"max views must be at least 1, got {max_views}")
        return cls(model=manifest.name, onnx_sha256=sha256(manifest.model_path),
                   tensorrt_version=str(tensorrt_version), gpu_name=device.name,
                   capability=device.capability, precision=check_precision(precision),
                   max_views=int(max_views))

    @property
    def device(self) -> DeviceInfo:
        return DeviceInfo(self.gpu_name, self.capability)

    @property
    def stem(self) -> str:
        """The file name without suffix; every field of the key is in it."""
        return (f"{file_slug(self.model)}-{self.onnx_sha256[:12]}"
                f"-trt{file_slug(self.tensorrt_version)}-{self.device.slug}-sm{self.device.sm}-{self.precision}-v{self.max_views}")

    def plan_path(self, home: Path) -> Path:
        return engines_dir(home) / f"{self.stem}.plan"

    def sidecar_path(self, home: Path) -> Path:
        return engines_dir(home) / f"{self.stem}.json"

    def model_prefix(self) -> str:
        """What every plan of this ONNX file starts with, whatever GPU or TensorRT built it."""
        return f"{file_slug(self.model)}-{self.onnx_sha256[:12]}-"

    def describe(self) -> str:
        """One phrase for messages: GPU, compute capability, TensorRT version, precision."""
        return (f"{self.gpu_name} (sm_{self.device.sm}), TensorRT {self.tensorrt_version}, "
                f"{self.precision}, up to {self.max_views} views")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["capability"] = list(self.capability)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineKey:
        major, minor = data["capability"]
        return cls(model=str(data["model"]), onnx_sha256=str(data["onnx_sha256"]),
                   tensorrt_version=str(data["tensorrt_version"]),
                   gpu_name=str(data["gpu_name"]), capability=(int(major), int(minor)),
                   precision=str(data["precision"]), max_views=int(data["max_views"]))


def differences(wanted: EngineKey, recorded: EngineKey) -> list[str]:
    """``field: recorded (engine) != wanted (here)`` for each field that differs."""
    a, b = recorded.to_json(), wanted.to_json()
    return [f"{name} {a[name]} (engine) != {b[name]} (here)" for name in b if a[name] != b[name]]


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar's JSON object, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def sidecar_problem(key: EngineKey, home: Path) -> str | None:
    """Why the plan at ``key.plan_path(home)`` may not be used for ``key``, or None when its
    sidecar records exactly this key and the plan's bytes are the ones it records."""
    plan, sidecar = key.plan_path(home), key.sidecar_path(home)
    if not plan.is_file():
        return f"no engine {plan}"
    data = read_sidecar(sidecar)
    if data is None or data.get("format") != SIDECAR_FORMAT or "key" not in data:
        return f"engine {plan} has no readable sidecar {sidecar.name}"
    try:
        recorded = EngineKey.from_json(data["key"])
    except (KeyError, TypeError, ValueError):
        return f"sidecar {sidecar} does not hold an engine key"
    diff = differences(key, recorded)
    if diff:
        return f"engine {plan.name} was built for another setup: {'; '.join(diff)}"
    if data.get("plan_sha256") != sha256(plan):
        return f"engine {plan} is not the file its sidecar records (changed or corrupt)"
    return None


def other_plans(key: EngineKey, home: Path) -> list[EngineKey]:
    """Keys recorded next to other plans of the same ONNX file (another GPU, TensorRT version,
    precision or profile): what to name when the one wanted is missing."""
    found = []
    for sidecar in sorted(engines_dir(home).glob(f"{key.model_prefix()}*.json")):
        data = read_sidecar(sidecar)
        if data is None or "key" not in data or not sidecar.with_suffix(".plan").is_file():
            continue
        try:
            found.append(EngineKey.from_json(data["key"]))
        except (KeyError, TypeError, ValueError):
            continue
    return [k for k in found if k != key]


def write_atomically(path: Path, data: bytes | memoryview) -> None:
    """Write ``path`` so that a reader sees the old file or the whole new one, never part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
