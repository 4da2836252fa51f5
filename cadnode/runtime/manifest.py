"""Model package manifest (``manifest.json``): what the node needs to know to run a package.

A package is one folder: ``model.onnx``, ``tokenizer.json``, ``manifest.json``, and optionally
``model.pt2`` (the same weights as a ``torch.export`` program, for the torch backend). The reader
refuses (ValueError naming the reason) any manifest it does not fully understand, rather than
guessing: unknown ``format_version``, a missing or mistyped key, a missing file, a checksum
mismatch, or a text template other than the one this node builds.

Image intensity contract (format 1): the engine is fed float32 images in [0, 1] (after VOI LUT and
MONOCHROME1 inversion); the graph itself applies ``(x - mean) / std`` from ``normalisation``, which
is recorded for other engines and for training.

Training domain (optional key ``domain``, parsed into :class:`TrainingDomain`): what the training
images were like, so that the worker can say when a view is unlike all of them (see
``cadnode.jobs.domain``, which both computes a domain from training views and checks a view
against it). A package without it has an unknown domain, and every view is flagged.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cadnode.dicom.enum import PixelPipeline

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.onnx"
TOKENIZER_NAME = "tokenizer.json"
TORCH_PROGRAM_NAME = "model.pt2"  # optional
#: A frozen pretrained text tower's float16 weights, ONNX external data of model.onnx (optional)
TEXT_TOWER_NAME = "text_tower.bin"
INPUT_NAMES: tuple[str, ...] = ("image", "input_ids", "attention_mask")
OUTPUT_NAMES: tuple[str, ...] = ("cancer", "calcification", "heatmap")
DEMO_NOTICE = "demonstration model - not for clinical use"

#: ``domain`` keys that list the header values seen in training ("" = the attribute was absent).
DOMAIN_VALUE_KEYS: tuple[str, ...] = (
    "manufacturers", "models", "conversion_types", "presentation_intents",
)
#: ``domain`` keys that hold a [min, max] range (null: not constrained).
DOMAIN_RANGE_KEYS: tuple[str, ...] = ("rows", "columns", "pixel_spacing_mm")
#: Statistics of the prepared model input that ``domain.image_statistics`` may bound.
IMAGE_STATISTICS: tuple[str, ...] = ("mean", "std", "median", "dark_fraction")

#: key -> accepted JSON types
REQUIRED_KEYS: dict[str, tuple[type, ...]] = {
    "format_version": (int,),
    "name": (str,),
    "version": (str,),
    "input_size": (list,),
    "normalisation": (dict,),
    "max_text_len": (int,),
    "text_template_version": (str,),
    "outputs": (list,),
    "thresholds": (dict,),
    "demo": (bool,),
    "training": (str,),
}


Range = tuple[float, float]


@dataclass(frozen=True)
class TrainingDomain:
    """The images a package was trained on, as the manifest's ``domain`` records them.

    Value lists hold what the training headers said ("" where an attribute was absent); None
    means "not constrained". Ranges are inclusive [min, max]; ``image_statistics`` bound the
    prepared model input (after cropping, windowing and resizing), so they describe what the
    model saw, whatever the header claims.
    """

    source: str  # where the domain was computed from, for a reader
    views: int = 0  # how many training views it summarises
    manufacturers: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None  # ManufacturerModelName
    conversion_types: tuple[str, ...] | None = None  # ("",): none converted or digitised
    presentation_intents: tuple[str, ...] | None = None  # "presentation" / "processing" / ""
    bits_stored: tuple[int, ...] | None = None
    rows: Range | None = None  # decoded image size in pixels
    columns: Range | None = None
    pixel_spacing_mm: Range | None = None
    image_statistics: dict[str, Range] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The manifest's ``domain`` object (what :func:`read_manifest` parses back)."""
        out: dict[str, Any] = {"source": self.source, "views": self.views}
        for key in DOMAIN_VALUE_KEYS + ("bits_stored",) + DOMAIN_RANGE_KEYS:
            value = getattr(self, key)
            whole = key in ("rows", "columns")  # pixel counts
            out[key] = None if value is None else [int(v) if whole else v for v in value]
        out["image_statistics"] = {k: list(v) for k, v in self.image_statistics.items()}
        return out


@dataclass(frozen=True)
class ModelManifest:
    """Parsed, validated manifest of one model package."""

    package: Path
    name: str
    version: str
    input_size: tuple[int, int]  # (H, W)
    normalisation: dict[str, Any]
    max_text_len: int
    text_template_version: str
    outputs: tuple[str, ...]
    thresholds: dict[str, float]
    demo: bool
    training: str
    notice: str | None = None
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> hex digest
    heatmap_size: tuple[int, int] | None = None
    format_version: int = FORMAT_VERSION
    domain: TrainingDomain | None = None  # None: the package records no training domain
    #: how images are prepared for this model; packages that name none used the first one
    pixel_pipeline: PixelPipeline = PixelPipeline.STRETCH_CLIP
    #: the external weights file of model.onnx and where its weights came from; None: none
    text_tower: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_path(self) -> Path:
        return self.package / MODEL_NAME

    @property
    def weight_files(self) -> tuple[Path, ...]:
        """model.onnx and the files it reads its external weights from: what a tool that
        copies the graph elsewhere (a Triton repository) must copy with it."""
        extra = (self.package / self.text_tower["file"],) if self.text_tower else ()
        return (self.model_path, *extra)

    @property
    def tokenizer_path(self) -> Path:
        return self.package / TOKENIZER_NAME

    @property
    def torch_program_path(self) -> Path:
        return self.package / TORCH_PROGRAM_NAME


def _refuse(where: Path, reason: str) -> ValueError:
    return ValueError(f"model package {where}: {reason}")


def sha256(path: Path) -> str:
    """Hex digest of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _size_pair(where: Path, key: str, value: Any) -> tuple[int, int]:
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise _refuse(where, f"{key} must be [H, W] positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def _number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _range(where: Path, key: str, value: Any) -> Range | None:
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2 or not all(map(_number, value))
            or value[0] > value[1]):
        raise _refuse(where, f"domain.{key} must be [min, max] numbers or null, got {value!r}")
    return float(value[0]), float(value[1])


def _domain(where: Path, data: Any) -> TrainingDomain:
    """Validate the ``domain`` object; refuses unknown keys, as the rest of the manifest does."""
    if not isinstance(data, dict) or not isinstance(data.get("source"), str):
        raise _refuse(where, "domain must be an object with a 'source' string")
    known = {"source", "views", "bits_stored", "image_statistics",
             *DOMAIN_VALUE_KEYS, *DOMAIN_RANGE_KEYS}
    unknown = sorted(set(data) - known)
    if unknown:
        raise _refuse(where, f"domain has unknown key(s): {', '.join(unknown)}")
    views = data.get("views", 0)
    if not isinstance(views, int) or isinstance(views, bool) or views < 0:
        raise _refuse(where, f"domain.views must be a count, got {views!r}")
    values: dict[str, tuple[str, ...] | None] = {}
    for key in DOMAIN_VALUE_KEYS:
        value = data.get(key)
        if value is not None and (not isinstance(value, list)
                                  or not all(isinstance(v, str) for v in value)):
            raise _refuse(where, f"domain.{key} must be a list of strings or null")
        values[key] = None if value is None else tuple(value)
    bits = data.get("bits_stored")
    if bits is not None and (not isinstance(bits, list) or not all(
            isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in bits)):
        raise _refuse(where, "domain.bits_stored must be a list of positive integers or null")
    stats = data.get("image_statistics") or {}
    if not isinstance(stats, dict) or not set(stats) <= set(IMAGE_STATISTICS):
        raise _refuse(where, "domain.image_statistics must map some of "
                             f"{', '.join(IMAGE_STATISTICS)} to [min, max]")
    ranges = {key: _range(where, key, data.get(key)) for key in DOMAIN_RANGE_KEYS}
    return TrainingDomain(
        source=data["source"], views=views,
        manufacturers=values["manufacturers"], models=values["models"],
        conversion_types=values["conversion_types"],
        presentation_intents=values["presentation_intents"],
        bits_stored=None if bits is None else tuple(bits),
        rows=ranges["rows"], columns=ranges["columns"],
        pixel_spacing_mm=ranges["pixel_spacing_mm"],
        image_statistics={k: r for k, v in stats.items()
                          if (r := _range(where, f"image_statistics.{k}", v)) is not None},
    )


def read_manifest(path: str | Path, *, verify_checksums: bool = True,
                  expected_text_template_version: str | None = None) -> ModelManifest:
    """Read and validate a package folder (or its manifest.json); ValueError says why it refuses.

    ``expected_text_template_version`` defaults to any template this node's text builder writes.
    """
    path = Path(path)
    package = path.parent if path.name == MANIFEST_NAME else path
    manifest_file = package / MANIFEST_NAME
    if not manifest_file.is_file():
        raise _refuse(package, f"missing file {MANIFEST_NAME}")
    try:
        data = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _refuse(package, f"{MANIFEST_NAME} is not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise _refuse(package, f"{MANIFEST_NAME} must hold a JSON object")

    fmt = data.get("format_version")
    if fmt != FORMAT_VERSION or isinstance(fmt, bool):
        raise _refuse(package, f"unsupported format_version {fmt!r} "
                               f"(this cadnode reads format_version {FORMAT_VERSION})")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise _refuse(package, f"manifest is missing required key(s): {', '.join(missing)}")
    for key, types in REQUIRED_KEYS.items():
        value = data[key]
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise _refuse(package, f"manifest key {key!r} has the wrong type "
                                   f"({type(value).__name__})")

    input_size = _size_pair(package, "input_size", data["input_size"])
    heatmap_size = (_size_pair(package, "heatmap_size", data["heatmap_size"])
                    if data.get("heatmap_size") is not None else None)
    if data["max_text_len"] < 3:
        raise _refuse(package, f"max_text_len {data['max_text_len']} is too small")
    outputs = tuple(data["outputs"])
    if set(outputs) != set(OUTPUT_NAMES):
        raise _refuse(package, f"outputs {list(outputs)} are not {list(OUTPUT_NAMES)}")
    thresholds: dict[str, float] = {}
    for name in ("cancer", "calcification"):
        value = data["thresholds"].get(name)
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or not 0.0 <= value <= 1.0):
            raise _refuse(package, f"thresholds.{name} must be a probability, got {value!r}")
        thresholds[name] = float(value)
    norm = data["normalisation"]
    for key in ("mean", "std"):
        if isinstance(norm.get(key), bool) or not isinstance(norm.get(key), (int, float)):
            raise _refuse(package, f"normalisation.{key} must be a number")
    if norm.get("input_range") != [0, 1] and norm.get("input_range") != [0.0, 1.0]:
        raise _refuse(package, f"normalisation.input_range {norm.get('input_range')!r} "
                               "is not [0, 1] (the only range format 1 defines)")

    from cadnode.text.clinical import TEXT_TEMPLATE_VERSIONS

    accepted = TEXT_TEMPLATE_VERSIONS if expected_text_template_version is None else (
        expected_text_template_version,)
    if data["text_template_version"] not in accepted:
        raise _refuse(package, f"text_template_version {data['text_template_version']!r} is "
                               f"not one this node's text builder writes ({', '.join(accepted)})")

    tower = data.get("text_tower")
    if tower is not None and (not isinstance(tower, dict) or tower.get("file") != TEXT_TOWER_NAME):
        raise _refuse(package, f"text_tower must be an object with file {TEXT_TOWER_NAME!r}")
    for name in (MODEL_NAME, TOKENIZER_NAME):
        if not (package / name).is_file():
            raise _refuse(package, f"missing file {name}")
    if tower is not None and not (package / TEXT_TOWER_NAME).is_file():
        source = tower.get("source") or {}
        raise _refuse(package, f"missing file {TEXT_TOWER_NAME} (the frozen text tower "
                               f"{source.get('name', '')} that model.onnx reads; copy it with "
                               "the package)")
    checksums = data.get("sha256") or {}
    if not isinstance(checksums, dict):
        raise _refuse(package, "sha256 must map file names to hex digests")
    if verify_checksums:
        for name, digest in sorted(checksums.items()):
            if name == TORCH_PROGRAM_NAME and not (package / name).is_file():
                raise _refuse(package, f"missing file {name} (listed in sha256)")
            if name not in (MODEL_NAME, TOKENIZER_NAME, TORCH_PROGRAM_NAME, TEXT_TOWER_NAME):
                continue
            if sha256(package / name) != digest:
                raise _refuse(package, f"checksum mismatch for {name} (file changed or corrupt)")

    domain = _domain(package, data["domain"]) if data.get("domain") is not None else None
    pipeline = data.get("pixel_pipeline", PixelPipeline.STRETCH_CLIP.value)
    if pipeline not in {p.value for p in PixelPipeline}:
        raise _refuse(package, f"pixel_pipeline {pipeline!r} is not one this node has "
                               f"({', '.join(p.value for p in PixelPipeline)})")
    known = set(REQUIRED_KEYS) | {"heatmap_size", "notice", "sha256", "domain", "pixel_pipeline",
                                  "text_tower"}
    return ModelManifest(
        package=package,
        name=data["name"],
        version=data["version"],
        input_size=input_size,
        normalisation=dict(norm),
        max_text_len=int(data["max_text_len"]),
        text_template_version=data["text_template_version"],
        outputs=outputs,
        thresholds=thresholds,
        demo=bool(data["demo"]),
        training=data["training"],
        notice=data.get("notice"),
        heatmap_size=heatmap_size,
        sha256={str(k): str(v) for k, v in checksums.items()},
        domain=domain,
        pixel_pipeline=PixelPipeline(pipeline),
        text_tower=dict(tower) if tower is not None else None,
        extra={k: v for k, v in data.items() if k not in known},
    )
