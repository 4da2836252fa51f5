"""Version 1 of the synthetic benchmark, kept only to test the 0.3.0 default package on the
images it was trained on (``tests/unit/test_demo_localisation.py``); delete it with that package.

Rule: cancer = mass AND age >= 60; calcification = microcalcification cluster AND no implant
(an AND of one image bit and one text bit, which the sum of two unimodal logits already ranks
perfectly: the reason for version 2 in :mod:`train.synthetic`). Images 384 x 192 by default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from pydicom.dataset import Dataset

from cadnode.dicom.views import ViewInfo
from train.datasets.base import Lesion, Sample
from train.synthetic import (
    DENSITIES,
    DENSITY_P,
    MANUFACTURERS,
    SOP_MG_PRESENTATION,
    VIEWS,
    _uid,
    age_band,
)


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the generator; the defaults are the documented benchmark."""

    n_exams: int = 600
    seed: int = 0
    shape: tuple[int, int] = (384, 192)
    p_mass: float = 0.5
    p_cluster: float = 0.5
    p_implant: float = 0.5
    cancer_min_age: int = 60
    label_noise: float = 0.03


@dataclass
class ExamSpec:
    """Everything drawn for one exam before rendering (the ground truth)."""

    index: int
    age: int
    implant: bool
    manufacturer: int
    density: str
    mass: dict[str, bool] = field(default_factory=dict)  # per side "L"/"R"
    cluster: dict[str, bool] = field(default_factory=dict)
    cancer: dict[str, int] = field(default_factory=dict)
    calcification: dict[str, int] = field(default_factory=dict)


def cancer_rule(mass: bool, age: int, min_age: int = 60) -> int:
    """Noise-free cancer label (the documented rule)."""
    return int(mass and age >= min_age)


def calcification_rule(cluster: bool, implant: bool) -> int:
    """Noise-free calcification label (the documented rule)."""
    return int(cluster and not implant)


def draw_exam(cfg: SyntheticConfig, index: int) -> ExamSpec:
    """Header facts, findings and labels of exam ``index`` (independent of rendering)."""
    rng = np.random.default_rng([cfg.seed, index, 0])
    spec = ExamSpec(index=index, age=int(rng.integers(40, 80)),
                    implant=bool(rng.random() < cfg.p_implant),
                    manufacturer=int(rng.integers(len(MANUFACTURERS))),
                    density=str(rng.choice(DENSITIES, p=DENSITY_P)))
    for side in ("L", "R"):
        mass = bool(rng.random() < cfg.p_mass)
        cluster = bool(rng.random() < cfg.p_cluster)
        flip_cancer = bool(rng.random() < cfg.label_noise)
        flip_calc = bool(rng.random() < cfg.label_noise)
        spec.mass[side], spec.cluster[side] = mass, cluster
        spec.cancer[side] = cancer_rule(mass, spec.age, cfg.cancer_min_age) ^ int(flip_cancer)
        spec.calcification[side] = calcification_rule(cluster, spec.implant) ^ int(flip_calc)
    return spec


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise (FFT), standardised to zero mean and unit variance."""
    h, w = shape
    white = rng.standard_normal(shape)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    kernel = np.exp(-2.0 * (math.pi * sigma) ** 2 * (fy**2 + fx**2))
    out = np.fft.irfft2(np.fft.rfft2(white) * kernel, s=shape)
    return (out - out.mean()) / (out.std() + 1e-8)


def _point_inside(rng: np.random.Generator, cy: float, ry: float, rx: float,
                  limit: float = 0.55) -> tuple[float, float]:
    """A point well inside the half-ellipse (normalised radius below ``limit``)."""
    while True:
        y, x = rng.uniform(-1, 1), rng.uniform(0.1, 1)
        if y * y + x * x < limit:
            return cy + y * ry, x * rx


def _add_local(img: np.ndarray, y: float, x: float, reach: float,
               fn: Callable[[np.ndarray], np.ndarray]) -> None:
    """img += fn(squared distance to (y, x)) inside a window of half-size ``reach`` (fast)."""
    h, w = img.shape
    r0, r1 = max(0, int(y - reach)), min(h, int(y + reach) + 2)
    c0, c1 = max(0, int(x - reach)), min(w, int(x + reach) + 2)
    if r0 >= r1 or c0 >= c1:
        return
    yy = np.arange(r0, r1, dtype=np.float64)[:, None] - y
    xx = np.arange(c0, c1, dtype=np.float64)[None, :] - x
    img[r0:r1, c0:c1] += fn(yy * yy + xx * xx)


@dataclass(frozen=True)
class ViewGeometry:
    """Where things are in one view, drawn before any pixel (so lesions are known unrendered)."""

    cy: float  # breast half-ellipse centre row, vertical and horizontal radii
    ry: float
    rx: float
    pectoral: tuple[float, float] | None  # MLO: (width at the top, height at the chest wall)
    mass: tuple[tuple[float, float, float, float], ...]  # blobs: (row, col, sigma, amplitude)
    dots: tuple[tuple[float, float, float, float], ...]  # (row, col, radius, gain)


def draw_geometry(cfg: SyntheticConfig, spec: ExamSpec, view_index: int) -> ViewGeometry:
    """Breast outline and finding positions of one view (stream ``(seed, exam, 200 + view)``).

    Coordinates are on the chest-wall-left canvas that :func:`render_view` draws before it
    mirrors right breasts; :func:`view_lesions` gives them on the final image.
    """
    side, view = VIEWS[view_index]
    rng = np.random.default_rng([cfg.seed, spec.index, 200 + view_index])
    h, w = cfg.shape
    cy = h * (0.5 + rng.uniform(-0.04, 0.04))
    ry, rx = h * rng.uniform(0.36, 0.46), w * rng.uniform(0.7, 0.9)
    pectoral = (w * rng.uniform(0.25, 0.4), h * rng.uniform(0.35, 0.5)) if view == "MLO" else None
    mass: list[tuple[float, float, float, float]] = []
    if spec.mass[side]:
        my, mx = _point_inside(rng, cy, ry, rx)
        sigma = rng.uniform(5.0, 8.0)
        amp = rng.uniform(0.25, 0.35)
        for _ in range(3):  # lobulated: a few overlapping blobs
            oy, ox = rng.normal(0, sigma * 0.4, 2)
            mass.append((my + oy, mx + ox, sigma * rng.uniform(0.7, 1.0), amp))
    dots: list[tuple[float, float, float, float]] = []
    if spec.cluster[side]:
        ccy, ccx = _point_inside(rng, cy, ry, rx)
        for _ in range(int(rng.integers(6, 13))):
            py, px = ccy + rng.normal(0, 5.0), ccx + rng.normal(0, 5.0)
            dots.append((py, px, rng.uniform(1.5, 2.5), rng.uniform(0.35, 0.5)))
    return ViewGeometry(cy, ry, rx, pectoral, tuple(mass), tuple(dots))


def view_lesions(cfg: SyntheticConfig, spec: ExamSpec, view_index: int) -> list[Lesion]:
    """Boxes of the drawn mass (blob centres +- 2 sigma) and cluster (dot extents), on the final
    image grid. A mass is ``malignant`` when the noise-free cancer rule makes it so (age >= 60);
    the cluster never is (it decides the calcification label, not the cancer label)."""
    side = VIEWS[view_index][0]
    geo = draw_geometry(cfg, spec, view_index)
    w = cfg.shape[1]
    out: list[Lesion] = []
    parts = (("mass", [(r, c, 2.0 * s) for r, c, s, _ in geo.mass],
              bool(cancer_rule(spec.mass[side], spec.age, cfg.cancer_min_age))),
             ("calcification", [(r, c, rad) for r, c, rad, _ in geo.dots], False))
    for kind, blobs, malignant in parts:
        if not blobs:
            continue
        x0 = min(c - e for _, c, e in blobs)
        x1 = max(c + e for _, c, e in blobs)
        y0 = min(r - e for r, _, e in blobs)
        y1 = max(r + e for r, _, e in blobs)
        if side == "R":  # the canvas is mirrored for right breasts
            x0, x1 = w - 1 - x1, w - 1 - x0
        out.append(Lesion(kind, (x0, y0, x1, y1), malignant))
    return out


def _gaussian(d2: np.ndarray, sigma: float, amp: float) -> np.ndarray:
    return amp * np.exp(-d2 / (2 * sigma * sigma))


def _disc(d2: np.ndarray, radius: float, gain: float) -> np.ndarray:
    return np.where(d2 <= radius * radius, gain, 0.0)


def render_view(cfg: SyntheticConfig, spec: ExamSpec, view_index: int) -> np.ndarray:
    """uint16 (H, W) 12-bit image of one view (texture stream ``(seed, exam, 1 + view)``)."""
    side, _ = VIEWS[view_index]
    geo = draw_geometry(cfg, spec, view_index)
    rng = np.random.default_rng([cfg.seed, spec.index, 1 + view_index])
    h, w = cfg.shape
    rows = np.arange(h, dtype=np.float64)[:, None]
    cols = np.arange(w, dtype=np.float64)[None, :]
    r2 = ((rows - geo.cy) / geo.ry) ** 2 + (cols / geo.rx) ** 2
    inside = r2 < 1.0
    profile = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
    img = 0.35 + 0.2 * np.sqrt(profile)

    d = DENSITIES.index(spec.density)  # 0..3
    tex = _smooth_noise(rng, cfg.shape, 5.0) + 0.5 * _smooth_noise(rng, cfg.shape, 1.5)
    threshold = (1.2, 0.6, 0.0, -0.6)[d]
    gland = 1.0 / (1.0 + np.exp(-(tex - threshold) * 2.5))
    img += (0.08 + 0.04 * d) * gland * np.sqrt(profile)
    if geo.pectoral is not None:  # pectoral muscle: bright triangle in the upper chest-wall corner
        a, b = geo.pectoral
        img += 0.15 * ((cols < a * (1.0 - rows / b)) & inside)
    for my, mx, s, amp in geo.mass:
        _add_local(img, my, mx, 4.0 * s, partial(_gaussian, sigma=s, amp=amp / 2))
    for py, px, rad, gain in geo.dots:
        _add_local(img, py, px, rad + 1.0, partial(_disc, radius=rad, gain=gain))

    img = np.where(inside, img, 0.02) + rng.normal(0.0, 0.008, cfg.shape)
    pix = np.clip(img * 3000.0 + 60.0, 0, 4095).astype(np.uint16)
    if side == "R":
        pix = np.ascontiguousarray(pix[:, ::-1])
    return pix


def make_header(cfg: SyntheticConfig, spec: ExamSpec, view_index: int) -> Dataset:
    """The DICOM header of one view (no pixels), with the documented label-bearing fields."""
    side, view = VIEWS[view_index]
    rng = np.random.default_rng([cfg.seed, spec.index, 100 + view_index])
    maker, model, anode, filt = MANUFACTURERS[spec.manufacturer]
    thickness = float(np.clip(rng.normal(55.0, 12.0), 20.0, 95.0))
    ds = Dataset()
    ds.SOPClassUID = SOP_MG_PRESENTATION
    ds.SOPInstanceUID = _uid(cfg.seed, spec.index, 3, view_index)
    ds.StudyInstanceUID = _uid(cfg.seed, spec.index, 1)
    ds.SeriesInstanceUID = _uid(cfg.seed, spec.index, 2)
    ds.Modality = "MG"
    ds.PatientID = f"SYN{cfg.seed}-{spec.index:06d}"
    ds.PatientName = f"SYNTHETIC^{spec.index:06d}"
    ds.PatientSex = "F"
    ds.PatientAge = f"{spec.age:03d}Y"
    ds.StudyDate = "20240101"
    ds.AccessionNumber = f"A{spec.index:06d}"
    ds.BreastImplantPresent = "YES" if spec.implant else "NO"
    ds.Manufacturer = maker
    ds.ManufacturerModelName = model
    ds.ViewPosition = view
    ds.ImageLaterality = side
    ds.PatientOrientation = ["A", "R" if view == "CC" else "FR"] if side == "L" else \
        ["P", "L" if view == "CC" else "FL"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartThickness = f"{thickness:.1f}"
    ds.CompressionForce = f"{float(np.clip(rng.normal(110.0, 30.0), 30.0, 250.0)):.1f}"
    ds.KVP = f"{25.0 + thickness / 10.0 + rng.normal(0.0, 0.7):.1f}"
    ds.ExposureInuAs = int(np.clip(rng.normal(90.0, 30.0), 20.0, 250.0) * 1000)
    ds.AnodeTargetMaterial = anode
    ds.FilterMaterial = filt
    ds.InstanceNumber = view_index + 1
    return ds


def _loader(cfg: SyntheticConfig, spec: ExamSpec, view_index: int):  # noqa: ANN202
    return lambda: render_view(cfg, spec, view_index)


def generate(cfg: SyntheticConfig) -> Iterator[Sample]:
    """Yield the 4 * ``n_exams`` view samples; images are rendered lazily by their loaders."""
    for index in range(cfg.n_exams):
        spec = draw_exam(cfg, index)
        for view_index, (side, view) in enumerate(VIEWS):
            header = make_header(cfg, spec, view_index)
            yield Sample(
                image=_loader(cfg, spec, view_index), header=header,
                view=ViewInfo(side, view, True, "ViewPosition+ImageLaterality"),
                cancer=spec.cancer[side], calcification=spec.calcification[side],
                patient_id=str(header.PatientID), exam_id=str(header.StudyInstanceUID),
                density=spec.density, lesions=view_lesions(cfg, spec, view_index),
                groups={"manufacturer": MANUFACTURERS[spec.manufacturer][0].split()[0].strip(","),
                        "age_band": age_band(spec.age)})
