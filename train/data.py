"""Samples -> tensors through the node's own serving code (pixels, clinical text, tokenizer).

Training must see exactly what serving sees, so images go through
:func:`cadnode.dicom.pixels.prepare_image` and text through
:func:`cadnode.text.clinical.build_clinical_text` and the packaged :class:`ClinicalTokenizer`.
Augmentation never changes those functions: :class:`TextAugment` removes header fields (the
builder then says ``unknown``, as it does at a site that omits them), may shuffle the fields
within each level of the text, and may append report-style sentences written from the same
header (:func:`header_report`; never from a label, which would leak it). Inference
(``augment=None``) is deterministic.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from PIL import Image
from torch.utils.data import Dataset as TorchDataset

from cadnode.dicom.enum import NEWEST_PIXEL_PIPELINE, PixelPipeline
from cadnode.dicom.pixels import PreparedImage, prepare_image
from cadnode.text.clinical import (
    OTHER,
    UNKNOWN,
    Level,
    build_clinical_text,
    clinical_fields,
    render,
)
from cadnode.text.tokenizer import ClinicalTokenizer
from train.datasets.base import Sample

#: Header keywords that field dropout may remove (grouped: dropping age removes both sources).
DROPPABLE_FIELDS: tuple[tuple[str, ...], ...] = (
    ("PatientAge", "PatientBirthDate"),
    ("BreastImplantPresent",),
    ("Manufacturer",),
    ("ManufacturerModelName",),
    ("BodyPartThickness",),
    ("CompressionForce",),
    ("KVP",),
    ("ExposureInuAs", "Exposure"),
    ("AnodeTargetMaterial",),
    ("FilterMaterial",),
    ("ViewModifierCodeSequence",),
    ("DetectorType",),
    ("ImagerPixelSpacing", "PixelSpacing"),
)
#: Age words of the text -> how a report says it.
_AGE_PHRASES: dict[str, str] = {"under forty": "under forty", "forties": "in her forties",
                                "fifties": "in her fifties", "sixties": "in her sixties",
                                "seventies": "in her seventies", "eighty plus": "eighty plus"}


def header_report(levels: list[Level], rng: np.random.Generator) -> str:
    """One to three report-style sentences, in random order, from the text's own fields (so
    from the header only); fields the header does not have are not mentioned."""
    f = {k: v for _, fields in levels for k, v in fields}
    known = {k: v for k, v in f.items() if v not in (UNKNOWN, OTHER)}
    options: list[str] = []
    if "side" in known and "projection" in known:
        options.append(f"screening mammogram of the {known['side']} breast, "
                       f"{known['projection']} view.")
    if "age" in known:
        options.append(f"patient {_AGE_PHRASES.get(known['age'], known['age'])}.")
    if "implant" in known:
        options.append("breast implant present." if known["implant"] == "yes"
                       else "without breast implants.")
    if "manufacturer" in known:
        model = f" {known['model']}" if "model" in known else ""
        options.append(f"image acquired on a {known['manufacturer']}{model} unit.")
    if "thickness" in known and "force" in known:
        options.append(f"{known['thickness']} compressed thickness, {known['force']} "
                       "compression force.")
    if not options:
        return ""
    k = int(rng.integers(1, min(3, len(options)) + 1))
    chosen = rng.choice(len(options), size=k, replace=False)
    return " ".join(options[int(i)] for i in chosen)


def make_tokenizer(max_len: int = 64) -> ClinicalTokenizer:
    """The tokenizer of a model with its own text encoder (``tokenizer_for`` of its config)."""
    return ClinicalTokenizer.for_template(max_len)


@dataclass(frozen=True)
class TextAugment:
    """Training-time text augmentation applied to the header, not to the builder."""

    field_dropout: float = 0.0  # probability of removing each field group
    report_sentence: float = 0.0  # probability of appending report-style sentences
    reorder: float = 0.0  # probability of shuffling the fields within each level

    def header(self, ds: pydicom.Dataset, rng: np.random.Generator) -> pydicom.Dataset:
        if self.field_dropout <= 0:
            return ds
        drop = [g for g in DROPPABLE_FIELDS if rng.random() < self.field_dropout]
        if not drop:
            return ds
        gone = {keyword for group in drop for keyword in group}
        out = pydicom.Dataset()  # new top level sharing the kept elements; ``ds`` is untouched
        for elem in ds:
            if elem.keyword not in gone:
                out.add(elem)
        return out

    def text(self, levels: list[Level], rng: np.random.Generator) -> str:
        if self.reorder > 0 and rng.random() < self.reorder:
            levels = [(name, [fields[int(i)] for i in rng.permutation(len(fields))])
                      for name, fields in levels]
        text = render(levels)
        if self.report_sentence > 0 and rng.random() < self.report_sentence:
            report = header_report(levels, rng)
            return f"{text} {report}" if report else text
        return text


def sample_text(sample: Sample, augment: TextAugment | None = None,
                rng: np.random.Generator | None = None) -> str:
    """Clinical text of a sample; deterministic without ``augment``."""
    if augment is None or rng is None:
        return build_clinical_text(sample.header, sample.view)
    return augment.text(clinical_fields(augment.header(sample.header, rng), sample.view), rng)


@dataclass(frozen=True)
class LoadedImage:
    """A sample's image as read once: the dataset that describes it and, for images that are
    not DICOM files (PNG exports, rendered arrays), its pixels."""

    dataset: pydicom.Dataset
    pixels: np.ndarray | None = None


def load_image(sample: Sample) -> LoadedImage:
    """Read a sample's image (a DICOM path, a PNG path, or a loader)."""
    source: Any = sample.image
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
            with Image.open(path) as im:
                arr = np.asarray(im.convert("I") if im.mode not in ("L", "I;16", "I") else im)
            return LoadedImage(sample.header, arr.astype(np.float32))
        return LoadedImage(pydicom.dcmread(path))
    loaded = source()
    if isinstance(loaded, pydicom.Dataset):
        return LoadedImage(loaded)
    return LoadedImage(sample.header, np.asarray(loaded, dtype=np.float32))


#: What an image is prepared to: the model's input size and pixel pipeline.
InputSpec = tuple[tuple[int, int], PixelPipeline]


def input_spec(size: Sequence[int], pipeline: PixelPipeline | str) -> InputSpec:
    return (int(size[0]), int(size[1])), PixelPipeline(pipeline)


def prepare_sample(sample: Sample, size: tuple[int, int],
                   pipeline: PixelPipeline | str = NEWEST_PIXEL_PIPELINE,
                   loaded: LoadedImage | None = None) -> PreparedImage:
    """The node's model input of a sample, with the mapping back to the source grid that
    heatmap scoring needs (``loaded``: the image already read, to prepare several sizes)."""
    image = loaded or load_image(sample)
    return prepare_image(image.dataset, size, sample.view.laterality, pixels=image.pixels,
                         pipeline=pipeline)


#: Lesion boxes a training item carries (rows beyond a sample's count are padding).
MAX_LESIONS = 4


def lesion_fractions(sample: Sample, prepared: PreparedImage) -> np.ndarray:
    """(K, 4) float32 boxes (u0, v0, u1, v1) of the lesions that make a sample cancer-positive,
    as fractions of the model input (edges), so any heatmap grid can be scored or trained."""
    if sample.cancer != 1:
        return np.zeros((0, 4), dtype=np.float32)
    h, w = prepared.array.shape
    out = []
    for lesion in sample.lesions[:MAX_LESIONS]:
        if not lesion.malignant:
            continue
        x0, y0, x1, y1 = lesion.box
        (a, b), (c, d) = prepared.to_model(x0, y0), prepared.to_model(x1, y1)
        box = (min(a, c) + 0.5) / w, (min(b, d) + 0.5) / h, (max(a, c) + 0.5) / w, \
            (max(b, d) + 0.5) / h
        out.append(np.clip(box, 0.0, 1.0))
    return np.array(out, dtype=np.float32).reshape(-1, 4)


@dataclass(frozen=True)
class CachedItem:
    """A sample's model input (float16), its malignant lesion boxes (model fractions), and the
    preparation itself (holding that same array, and no display image): the mapping back to the
    source grid that scoring a heatmap needs, so evaluation never prepares a view twice."""

    image: np.ndarray
    lesions: np.ndarray
    prepared: PreparedImage


class ImageCache:
    """Prepared images per (input spec, sample key), float16, shared by every dataset over the
    same sample list (the models of an ablation, and the same views read at several sizes).

    A miss reads the sample once and prepares it for every registered spec, so an ablation that
    compares 512, 1024 and 2048 reads decodes (or renders) each view once.
    """

    def __init__(self, specs: Sequence[InputSpec] = ()) -> None:
        self.specs: list[InputSpec] = []
        self.items: dict[tuple[InputSpec, int], CachedItem] = {}
        for spec in specs:
            self.register(spec)

    def register(self, spec: InputSpec) -> None:
        spec = input_spec(*spec)
        if spec not in self.specs:
            self.specs.append(spec)

    def get(self, key: int, sample: Sample, spec: InputSpec) -> CachedItem:
        spec = input_spec(*spec)
        if (spec, key) not in self.items:
            self.register(spec)
            loaded = load_image(sample)
            for each in self.specs:
                if (each, key) not in self.items:
                    self.items[(each, key)] = cached_item(sample, each, loaded)
        return self.items[(spec, key)]


def cached_item(sample: Sample, spec: InputSpec,
                loaded: LoadedImage | None = None) -> CachedItem:
    # float16 always (cached or not), so a fresh process and a warm cache feed the model
    # identical values (exact resume); its ~5e-4 step is far below the image noise.
    prepared = prepare_sample(sample, spec[0], spec[1], loaded)
    image = prepared.array.astype(np.float16)
    geometry = replace(prepared, array=image, display=np.zeros((0, 0), np.uint8))
    return CachedItem(image, lesion_fractions(sample, prepared), geometry)


@dataclass(frozen=True)
class ImageAugment:
    """Training-time image augmentation on the prepared model input (and its lesion boxes).

    Only transforms that keep the input convention: a vertical flip (the chest wall stays on
    the left; a horizontal flip would put it on the right, which the node never feeds), a small
    affine (rotation, scale, shift; the uncovered border is background, 0), gamma and
    contrast, and Gaussian noise.
    """

    vflip: float = 0.5
    rotate_deg: float = 5.0
    scale: float = 0.05
    shift: float = 0.03
    gamma: float = 0.2  # gamma drawn from [1 / (1 + g), 1 + g]
    contrast: float = 0.05
    noise: float = 0.01  # noise standard deviation drawn from [0, noise]

    def __call__(self, image: np.ndarray, boxes: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(H, W) float32 in [0, 1] and (K, 4) box fractions -> both transformed."""
        h, w = image.shape
        boxes = boxes.copy()
        if rng.random() < self.vflip:
            image = image[::-1].copy()
            boxes[:, [1, 3]] = 1.0 - boxes[:, [3, 1]]
        angle = math.radians(rng.uniform(-self.rotate_deg, self.rotate_deg))
        zoom = 1.0 + rng.uniform(-self.scale, self.scale)
        dx, dy = rng.uniform(-self.shift, self.shift, 2) * (w, h)
        if angle or zoom != 1.0 or dx or dy:
            image, boxes = _affine(image, boxes, angle, zoom, float(dx), float(dy))
        g = 1.0 + self.gamma
        gamma = math.exp(rng.uniform(-math.log(g), math.log(g)))
        image = np.clip(image, 0.0, 1.0) ** gamma
        image = image * (1.0 + rng.uniform(-self.contrast, self.contrast))
        image = image + rng.normal(0.0, rng.uniform(0.0, self.noise), image.shape)
        return np.clip(image, 0.0, 1.0).astype(np.float32), boxes


def _affine(image: np.ndarray, boxes: np.ndarray, angle: float, zoom: float, dx: float,
            dy: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate by ``angle`` and scale by ``zoom`` about the centre, then shift by (dx, dy) px."""
    h, w = image.shape
    cx, cy = w / 2.0, h / 2.0
    cos, sin = math.cos(angle) * zoom, math.sin(angle) * zoom
    forward = np.array([[cos, -sin, cx + dx - cos * cx + sin * cy],
                        [sin, cos, cy + dy - sin * cx - cos * cy], [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(forward)  # PIL maps each output pixel back to the input
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
    out = pil.transform((w, h), Image.Transform.AFFINE, tuple(inverse[:2].ravel()),
                        resample=Image.Resampling.BILINEAR, fillcolor=0.0)
    moved = boxes.copy()
    for k, (u0, v0, u1, v1) in enumerate(boxes):
        corners = np.array([[u0 * w, v0 * h, 1], [u1 * w, v0 * h, 1], [u0 * w, v1 * h, 1],
                            [u1 * w, v1 * h, 1]]) @ forward.T
        moved[k] = (corners[:, 0].min() / w, corners[:, 1].min() / h, corners[:, 0].max() / w,
                    corners[:, 1].max() / h)
    return np.asarray(out, dtype=np.float32), np.clip(moved, 0.0, 1.0)


def _label(value: int | None) -> tuple[float, float]:
    return (0.0, 0.0) if value is None else (float(value), 1.0)


class SampleDataset(TorchDataset):
    """Map-style dataset of view samples -> dict of tensors.

    ``cache`` (an :class:`ImageCache` shared between datasets over the same sample list, e.g.
    the ablation's models) keeps prepared images as float16 (and their lesion boxes) so each
    image is decoded once per process. ``text_from`` (a control): item i reads the text of
    sample ``text_from[i]`` instead of its own.
    Augmentation randomness is keyed by (seed, epoch, index), so a resumed run draws the same.
    """

    def __init__(self, samples: Sequence[Sample], size: tuple[int, int],
                 tokenizer: ClinicalTokenizer, augment: TextAugment | None = None,
                 seed: int = 0, cache: ImageCache | None = None,
                 keys: Sequence[int] | None = None,
                 image_augment: ImageAugment | None = None,
                 text_from: Sequence[int] | None = None,
                 pipeline: PixelPipeline | str = NEWEST_PIXEL_PIPELINE) -> None:
        self.samples = list(samples)
        self.size = (int(size[0]), int(size[1]))
        self.pipeline = PixelPipeline(pipeline)
        self.tokenizer = tokenizer
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.cache = cache
        self.keys = list(keys) if keys is not None else list(range(len(self.samples)))
        self.image_augment = image_augment
        self.text_from = list(text_from) if text_from is not None else None
        self._text_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def item(self, index: int) -> CachedItem:
        spec = (self.size, self.pipeline)
        if self.cache is not None:
            return self.cache.get(self.keys[index], self.samples[index], spec)
        return cached_item(self.samples[index], spec)

    def tokens(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        source = self.samples[index if self.text_from is None else self.text_from[index]]
        if self.augment is None:
            if index not in self._text_cache:
                self._text_cache[index] = self.tokenizer.encode(sample_text(source))
            return self._text_cache[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return self.tokenizer.encode(sample_text(source, self.augment, rng))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        ids, mask = self.tokens(index)
        cancer, cancer_known = _label(sample.cancer)
        calc, calc_known = _label(sample.calcification)
        item = self.item(index)
        image, lesions = item.image.astype(np.float32), item.lesions
        if self.image_augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index, 1])
            image, lesions = self.image_augment(image, lesions, rng)
        boxes = np.full((MAX_LESIONS, 4), -1.0, dtype=np.float32)
        boxes[: len(lesions)] = lesions
        return {
            "image": torch.from_numpy(image)[None],
            "lesion_boxes": torch.from_numpy(boxes),
            "lesion_count": torch.tensor(len(lesions), dtype=torch.int64),
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask),
            "targets": torch.tensor([cancer, calc], dtype=torch.float32),
            "known": torch.tensor([cancer_known, calc_known], dtype=torch.float32),
            "index": torch.tensor(index, dtype=torch.int64),
        }


def _patient_hash(patient_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def patient_split(samples: Sequence[Sample], fractions: Sequence[float] = (0.7, 0.15, 0.15),
                  seed: int = 0, official: bool = True) -> dict[str, list[int]]:
    """Indices of train / val / test; all views of a patient land in one split.

    A patient's split depends only on (seed, patient id), so adding patients never moves others.
    Where the dataset publishes a split (``Sample.official_split``, and ``official``), it is
    used so figures compare with published ones: a patient with any official test view is test
    (no patient on both sides), the others are train, and validation is carved from them by
    patient with the share ``fractions[1] / (fractions[0] + fractions[1])``. Patients without an
    official split follow ``fractions``.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError("fractions must be three numbers summing to 1")
    edges = (fractions[0], fractions[0] + fractions[1])
    val_share = fractions[1] / max(edges[1], 1e-12)
    published: dict[str, str] = {}
    if official:
        for s in samples:
            if s.official_split is not None and published.get(s.patient_id) != "test":
                published[s.patient_id] = "test" if s.official_split == "test" else "train"
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, s in enumerate(samples):
        u = _patient_hash(s.patient_id, seed)
        given = published.get(s.patient_id)
        if given == "test":
            name = "test"
        elif given == "train":
            name = "val" if u < val_share else "train"
        else:
            name = "train" if u < edges[0] else "val" if u < edges[1] else "test"
        out[name].append(i)
    return out


def pos_weights(samples: Sequence[Sample]) -> torch.Tensor:
    """negatives / positives per task (cancer, calcification) for BCE ``pos_weight``."""
    weights = []
    for task in ("cancer", "calcification"):
        labels = [getattr(s, task) for s in samples if getattr(s, task) is not None]
        pos = sum(1 for v in labels if v)
        neg = len(labels) - pos
        weights.append(neg / pos if pos and neg else 1.0)
    return torch.tensor(weights, dtype=torch.float32)


def sample_weights(samples: Sequence[Sample]) -> np.ndarray:
    """Per-sample weights that balance positives of either task against negatives."""
    pos = np.array([bool(s.cancer) or bool(s.calcification) for s in samples])
    n_pos = max(int(pos.sum()), 1)
    n_neg = max(int((~pos).sum()), 1)
    return np.where(pos, 0.5 / n_pos, 0.5 / n_neg).astype(np.float64)


def shuffled_text_sources(samples: Sequence[Sample], seed: int = 0) -> list[int]:
    """For each sample, the index of the same view (laterality and projection) of another
    patient, whose text it is to read: the text-shuffle control. Patients are paired by a
    seeded rotation of a shuffled order, so no patient keeps their own text."""
    patients = sorted({s.patient_id for s in samples})
    if len(patients) < 2:
        raise ValueError("the text-shuffle control needs at least two patients")
    order = np.random.default_rng(seed).permutation(len(patients))
    donor = {patients[order[k]]: patients[order[(k + 1) % len(patients)]]
             for k in range(len(patients))}
    same_view: dict[tuple[str, str | None, str | None], int] = {}
    first_view: dict[str, int] = {}
    for i, s in enumerate(samples):
        same_view.setdefault((s.patient_id, s.view.laterality, s.view.view), i)
        first_view.setdefault(s.patient_id, i)
    return [same_view.get((donor[s.patient_id], s.view.laterality, s.view.view),
                          first_view[donor[s.patient_id]]) for s in samples]
