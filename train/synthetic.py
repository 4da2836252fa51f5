"""Synthetic screening benchmark (version 2) where header and image *interact*.

Why: image-only, text-only, late-fusion and co-attention models can only be compared on ground
truth if the truth is known, needs both modalities, and needs them *together*: a label that is an
AND of one image bit and one text bit is already ranked perfectly by the sum of two unimodal
logits (late fusion), so it cannot show what co-attention adds. Here the header changes *which
finding counts*, in opposite directions for two findings, which no sum of an image score and a
text score can rank (see "Why late fusion cannot reach the ceiling"). Everything is drawn from
``numpy.random.default_rng`` streams keyed by ``(seed, exam, ...)``, so a set is identical for a
given seed whatever ``n``, the order of access or the process.

How one exam (one patient, four views L-CC, L-MLO, R-CC, R-MLO) is drawn
-------------------------------------------------------------------------
Header (exam level, stream ``(seed, exam, 0)``):

* ``age`` uniform integer in [40, 79]; written as ``PatientAge`` ("065Y"), except in
  ``p_age_missing`` (15%) of exams, which carry only ``PatientBirthDate`` (the text builder
  falls back to StudyDate - birth date, as real headers need), and ``p_age_unknown`` (5%), which
  carry neither (the text says ``unknown``);
* ``implant`` YES with probability ``p_implant`` (0.5, enriched) -> ``BreastImplantPresent``.
  The views are implant-displaced (Eklund): the implant is pushed out of the field, so **the
  image does not show it**; only the header does;
* ``manufacturer`` uniform over HOLOGIC / GE / SIEMENS / FUJIFILM; ``density`` A/B/C/D
  (0.1/0.4/0.4/0.1; in the image only).

Per-view header fields that carry no label information (distractors, as in real headers):
``BodyPartThickness`` ~ N(55, 12) mm, ``CompressionForce`` ~ N(110, 30) N, ``KVP`` from
thickness, ``ExposureInuAs``, anode/filter and ``DetectorType`` by manufacturer,
``ImagerPixelSpacing`` (0.1 mm at 2048 rows), ``ViewPosition``, ``ImageLaterality``,
``PatientOrientation``, For Presentation.

Findings per breast (same stream, L then R): one mass ``kind`` from ``KINDS`` with
probabilities ``kind_p`` (none 0.3, circumscribed 0.3, dense 0.3, spiculated 0.1) and,
independently, a microcalcification ``cluster`` (``p_cluster`` 0.35). Both views of a breast
show its findings (at independent positions).

Labels per breast (copied to its views)::

    rule   = spiculated
             or (circumscribed and age >= 60)      # a fibroadenoma below 60: benign
             or (dense and not implant)            # with an implant: a silicone granuloma
    cancer = rule, else an image-occult cancer with log-odds -4 + 0.8 * [age >= 60]
    calcification = cluster
    (each label flipped with probability ``label_noise`` = 0.02)

The two exceptions are real clinical heuristics; the thresholds are the synthetic world's.
Age 60 is a bin edge of the clinical text ("fifties" / "sixties") and the implant word is in
it, so everything the rule needs is in the text the node builds, and the occult-cancer term is a
realistic text-only effect (0.8 log-odds, odds ratio 2.2).

Why late fusion cannot reach the ceiling: an additive score f(kind) + g(text) must rank
(circumscribed, 60+, implant) above (circumscribed, under 60, no implant), so
g(60+, implant) > g(under 60, no implant), and (dense, under 60, no implant) above
(dense, 60+, implant), so the reverse. With the defaults these four cases are 30% of breasts.
A model in which the text changes how the image is read can rank both. The calcification task
is image-only and resolution-bound: the cluster's specks are 1-2 px across at 2048 x 1024, so a
4x smaller read averages each into ~1/16 of its contrast.

Geometry (stream ``(seed, exam, 200 + view index)``: outline, pectoral muscle, finding
positions) is drawn apart from the texture (stream ``(seed, exam, 1 + view index)``), so every
sample knows its lesion boxes without rendering. Image ``shape`` (H, W) default 2048 x 1024,
every length proportional to H (so smaller renders are the same scene), chest wall on the left
for L and on the right for R: a half-ellipse breast with a wobbling outline, a thickness fall-off
and a brighter skin line, anatomical background with the power-law spectrum P(f) ~ f^-3 measured
for mammographic texture (Burgess et al. 2001) thresholded into fibroglandular tissue by
density, a pectoral muscle in MLO views, masses (at 0.1 mm per pixel: circumscribed, a smooth
oval 8-16 mm wide; dense, a very bright disc of 4-7 mm; spiculated, an irregular 5-9 mm core
with spicules 2-3 times as long), 5-15
microcalcifications of 1-2 px within ~50 px (150-270 grey levels above the tissue, against
quantum noise of ~24: clear at full size, near the noise once averaged over 4 x 4 pixels),
quantum noise, 12-bit values.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from cadnode.dicom.views import ViewInfo
from train.datasets.base import Lesion, Sample

#: Bumped whenever a seed would draw a different set.
BENCHMARK_VERSION = 2

MANUFACTURERS: tuple[tuple[str, str, str, str], ...] = (
    # (Manufacturer, ManufacturerModelName, AnodeTargetMaterial, FilterMaterial)
    ("HOLOGIC, Inc.", "Selenia Dimensions", "TUNGSTEN", "RHODIUM"),
    ("GE MEDICAL SYSTEMS", "Senographe Pristina", "RHODIUM", "SILVER"),
    ("SIEMENS", "Mammomat Inspiration", "TUNGSTEN", "RHODIUM"),
    ("FUJIFILM Corporation", "Amulet Innovality", "TUNGSTEN", "ALUMINUM"),
)
DENSITIES: tuple[str, ...] = ("A", "B", "C", "D")
DENSITY_P: tuple[float, ...] = (0.1, 0.4, 0.4, 0.1)
KINDS: tuple[str, ...] = ("none", "circumscribed", "dense", "spiculated")
VIEWS: tuple[tuple[str, str], ...] = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))
SOP_MG_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
STUDY_DATE = "20240101"
_UID_ROOT = "2.25."
#: The scene is drawn for this height; every length scales with shape[0] / REFERENCE_HEIGHT.
REFERENCE_HEIGHT = 2048

RULE = ("cancer = spiculated mass, or circumscribed mass at age >= 60, or dense mass without an "
        "implant (implant-displaced views: the implant is not in the image), else an "
        "image-occult cancer at log-odds -4 + 0.8*[age >= 60]; calcification = "
        "microcalcification cluster (1-2 px specks at 2048 x 1024); 2% label noise")


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the generator; the defaults are the documented benchmark."""

    n_exams: int = 400
    seed: int = 0
    shape: tuple[int, int] = (2048, 1024)
    kind_p: tuple[float, ...] = (0.3, 0.3, 0.3, 0.1)
    p_cluster: float = 0.35
    p_implant: float = 0.5
    p_age_missing: float = 0.15
    p_age_unknown: float = 0.05
    benign_below_age: int = 60
    occult_logit: float = -4.0
    occult_age_effect: float = 0.8  # added log-odds at age >= OCCULT_AGE
    label_noise: float = 0.02


OCCULT_AGE = 60


@dataclass
class ExamSpec:
    """Everything drawn for one exam before rendering (the ground truth)."""

    index: int
    age: int
    age_written: str  # "age" (PatientAge), "birth" (PatientBirthDate only) or "none"
    implant: bool
    manufacturer: int
    density: str
    kind: dict[str, str] = field(default_factory=dict)  # per side "L"/"R"
    cluster: dict[str, bool] = field(default_factory=dict)
    cancer: dict[str, int] = field(default_factory=dict)
    calcification: dict[str, int] = field(default_factory=dict)


def cancer_rule(kind: str, age: int, implant: bool, benign_below_age: int = 60) -> int:
    """Noise-free cancer label of a visible finding (the documented rule)."""
    if kind == "spiculated":
        return 1
    if kind == "circumscribed":
        return int(age >= benign_below_age)
    if kind == "dense":
        return int(not implant)
    return 0


def occult_probability(cfg: SyntheticConfig, age: int) -> float:
    """Probability of an image-occult cancer (the text-only effect)."""
    logit = cfg.occult_logit + cfg.occult_age_effect * (age >= OCCULT_AGE)
    return 1.0 / (1.0 + math.exp(-logit))


def age_band(age: float) -> str:
    low = int(age // 10 * 10)
    return f"{low}-{low + 9}"


def draw_exam(cfg: SyntheticConfig, index: int) -> ExamSpec:
    """Header facts, findings and labels of exam ``index`` (independent of rendering)."""
    rng = np.random.default_rng([cfg.seed, index, 0])
    age = int(rng.integers(40, 80))
    u = rng.random()
    written = "none" if u < cfg.p_age_unknown else \
        "birth" if u < cfg.p_age_unknown + cfg.p_age_missing else "age"
    spec = ExamSpec(index=index, age=age, age_written=written,
                    implant=bool(rng.random() < cfg.p_implant),
                    manufacturer=int(rng.integers(len(MANUFACTURERS))),
                    density=str(rng.choice(DENSITIES, p=DENSITY_P)))
    p = np.asarray(cfg.kind_p, dtype=np.float64)
    for side in ("L", "R"):
        kind = str(rng.choice(KINDS, p=p / p.sum()))
        cluster = bool(rng.random() < cfg.p_cluster)
        occult = bool(rng.random() < occult_probability(cfg, age))
        flip_cancer = bool(rng.random() < cfg.label_noise)
        flip_calc = bool(rng.random() < cfg.label_noise)
        rule = cancer_rule(kind, age, spec.implant, cfg.benign_below_age)
        spec.kind[side], spec.cluster[side] = kind, cluster
        spec.cancer[side] = int(rule or occult) ^ int(flip_cancer)
        spec.calcification[side] = int(cluster) ^ int(flip_calc)
    return spec


def power_law_noise(rng: np.random.Generator, shape: tuple[int, int],
                    beta: float = 3.0) -> np.ndarray:
    """Gaussian noise with power spectrum ~ f^-beta (standardised), the anatomical background."""
    h, w = shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fy * fy + fx * fx)
    f[0, 0] = 1.0
    amplitude = np.maximum(f, 1.0 / max(h, w)) ** (-beta / 2.0)
    amplitude[0, 0] = 0.0
    spectrum = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) * amplitude
    out = np.fft.irfft2(spectrum, s=shape)
    return (out - out.mean()) / (out.std() + 1e-12)


@dataclass(frozen=True)
class Finding:
    """One drawn finding: kind, centre (row, col), size (px), brightness, and for spiculated
    masses the spicules (angle, length)."""

    kind: str
    row: float
    col: float
    radius: float
    amplitude: float
    spicules: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class ViewGeometry:
    """Where things are in one view, drawn before any pixel (so lesions are known unrendered)."""

    cy: float  # breast half-ellipse centre row, vertical and horizontal radii
    ry: float
    rx: float
    wobble: tuple[tuple[float, float, float], ...]  # outline: (order, amplitude, phase)
    pectoral: tuple[float, float] | None  # MLO: (width at the top, height at the chest wall)
    mass: Finding | None
    specks: tuple[tuple[float, float, float, float], ...]  # (row, col, radius, gain)


def _point_inside(rng: np.random.Generator, cy: float, ry: float, rx: float,
                  limit: float = 0.5) -> tuple[float, float]:
    """A point well inside the half-ellipse (normalised radius below ``limit``)."""
    while True:
        y, x = rng.uniform(-1, 1), rng.uniform(0.12, 1)
        if y * y + x * x < limit:
            return cy + y * ry, x * rx


def _draw_mass(rng: np.random.Generator, kind: str, row: float, col: float,
               s: float) -> Finding:
    if kind == "circumscribed":
        return Finding(kind, row, col, rng.uniform(40, 80) * s, rng.uniform(0.14, 0.18))
    if kind == "dense":
        return Finding(kind, row, col, rng.uniform(20, 35) * s, rng.uniform(0.28, 0.36))
    radius = rng.uniform(25, 45) * s
    spicules = tuple((float(rng.uniform(0, 2 * math.pi)), float(radius * rng.uniform(1.8, 3.2)))
                     for _ in range(int(rng.integers(8, 15))))
    return Finding(kind, row, col, radius, rng.uniform(0.14, 0.17), spicules)


def draw_geometry(cfg: SyntheticConfig, spec: ExamSpec, view_index: int) -> ViewGeometry:
    """Breast outline and finding positions of one view (stream ``(seed, exam, 200 + view)``).

    Coordinates are on the chest-wall-left canvas that :func:`render_view` draws before it
    mirrors right breasts; :func:`view_lesions` gives them on the final image.
    """
    side, view = VIEWS[view_index]
    rng = np.random.default_rng([cfg.seed, spec.index, 200 + view_index])
    h, w = cfg.shape
    s = h / REFERENCE_HEIGHT
    cy = h * (0.5 + rng.uniform(-0.03, 0.03))
    ry, rx = h * rng.uniform(0.38, 0.46), w * rng.uniform(0.72, 0.9)
    wobble = tuple((float(k), float(rng.uniform(0.0, 0.025)), float(rng.uniform(0, 2 * math.pi)))
                   for k in (2, 3, 5))
    pectoral = (w * rng.uniform(0.25, 0.4), h * rng.uniform(0.35, 0.5)) if view == "MLO" else None
    mass = None
    if spec.kind[side] != "none":
        my, mx = _point_inside(rng, cy, ry, rx)
        mass = _draw_mass(rng, spec.kind[side], my, mx, s)
    specks: list[tuple[float, float, float, float]] = []
    if spec.cluster[side]:
        ccy, ccx = _point_inside(rng, cy, ry, rx)
        for _ in range(int(rng.integers(5, 16))):
            specks.append((ccy + rng.normal(0, 12.0 * s), ccx + rng.normal(0, 12.0 * s),
                           rng.uniform(0.5, 1.0) * s, rng.uniform(0.05, 0.09)))
    return ViewGeometry(cy, ry, rx, wobble, pectoral, mass, tuple(specks))


def view_lesions(cfg: SyntheticConfig, spec: ExamSpec, view_index: int) -> list[Lesion]:
    """Boxes of the drawn mass and cluster on the final image grid. A mass is ``malignant``
    when the noise-free rule makes it so; the cluster never is (it decides the calcification
    label, not the cancer label)."""
    side = VIEWS[view_index][0]
    geo = draw_geometry(cfg, spec, view_index)
    w = cfg.shape[1]
    out: list[Lesion] = []
    boxes: list[tuple[str, tuple[float, float, float, float], bool]] = []
    if geo.mass is not None:
        m = geo.mass
        reach = max([m.radius * 1.5, *(length for _, length in m.spicules)])
        malignant = bool(cancer_rule(m.kind, spec.age, spec.implant, cfg.benign_below_age))
        boxes.append(("mass", (m.col - reach, m.row - reach, m.col + reach, m.row + reach),
                      malignant))
    if geo.specks:
        xs = [c for _, c, _, _ in geo.specks]
        ys = [r for r, _, _, _ in geo.specks]
        boxes.append(("calcification", (min(xs) - 1, min(ys) - 1, max(xs) + 1, max(ys) + 1),
                      False))
    for kind, (x0, y0, x1, y1), malignant in boxes:
        if side == "R":  # the canvas is mirrored for right breasts
            x0, x1 = w - 1 - x1, w - 1 - x0
        out.append(Lesion(kind, (x0, y0, x1, y1), malignant))
    return out


def _window(img: np.ndarray, row: float, col: float,
            reach: float) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
    """The sub-array around (row, col) within ``reach`` and its row/col offsets from the centre."""
    h, w = img.shape
    r0, r1 = max(0, int(row - reach)), min(h, int(row + reach) + 2)
    c0, c1 = max(0, int(col - reach)), min(w, int(col + reach) + 2)
    if r0 >= r1 or c0 >= c1:
        return None
    dy = np.arange(r0, r1, dtype=np.float64)[:, None] - row
    dx = np.arange(c0, c1, dtype=np.float64)[None, :] - col
    return slice(r0, r1), slice(c0, c1), dy, dx


def _add_mass(img: np.ndarray, m: Finding, rng: np.random.Generator) -> None:
    reach = max([m.radius * 1.6, *(length + 3 for _, length in m.spicules)])
    win = _window(img, m.row, m.col, reach)
    if win is None:
        return
    rows, cols, dy, dx = win
    dist = np.sqrt(dy * dy + dx * dx)
    if m.kind == "circumscribed":  # smooth oval, soft edge
        aspect = 1.0 + 0.25 * math.sin(m.radius)
        r = np.sqrt((dy / aspect) ** 2 + (dx * aspect) ** 2) / m.radius
        img[rows, cols] += m.amplitude / (1.0 + np.exp((r - 1.0) * 8.0))
        return
    if m.kind == "dense":  # very radiopaque, sharp edge
        img[rows, cols] += m.amplitude / (1.0 + np.exp((dist / m.radius - 1.0) * 25.0))
        return
    angle = np.arctan2(dy, dx)  # spiculated: lumpy core + thin radiating lines
    lumps = 1.0 + 0.2 * np.sin(3 * angle + rng.uniform(0, 6)) + 0.1 * np.sin(7 * angle)
    img[rows, cols] += m.amplitude / (1.0 + np.exp((dist / (m.radius * lumps) - 1.0) * 6.0))
    width = max(0.8, m.radius * 0.08)
    for theta, length in m.spicules:
        along = dy * math.sin(theta) + dx * math.cos(theta)
        across = -dy * math.cos(theta) + dx * math.sin(theta)
        on = (along > 0) & (along < length)
        fade = np.clip(1.0 - along / length, 0.0, 1.0)
        img[rows, cols] += np.where(on, 0.07 * fade * np.exp(-(across / width) ** 2), 0.0)


def _add_speck(img: np.ndarray, row: float, col: float, radius: float, gain: float) -> None:
    """A microcalcification: a disc of ``radius``; below half a pixel, a Gaussian splat of the
    same integrated brightness (so small renders are the same scene, blurred)."""
    sigma = max(radius, 0.5)
    win = _window(img, row, col, 3.0 * sigma + 1.0)
    if win is None:
        return
    rows, cols, dy, dx = win
    d2 = dy * dy + dx * dx
    if radius >= 0.5:
        img[rows, cols] += np.where(d2 <= radius * radius + 0.25, gain, 0.0)
    else:
        area = math.pi * radius * radius
        img[rows, cols] += gain * area / (2 * math.pi * sigma * sigma) * np.exp(-d2 / (2 * sigma
                                                                                     * sigma))


def render_view(cfg: SyntheticConfig, spec: ExamSpec, view_index: int) -> np.ndarray:
    """uint16 (H, W) 12-bit image of one view (texture stream ``(seed, exam, 1 + view)``)."""
    side, _ = VIEWS[view_index]
    geo = draw_geometry(cfg, spec, view_index)
    rng = np.random.default_rng([cfg.seed, spec.index, 1 + view_index])
    h, w = cfg.shape
    s = h / REFERENCE_HEIGHT
    rows = np.arange(h, dtype=np.float64)[:, None]
    cols = np.arange(w, dtype=np.float64)[None, :]
    ny, nx = (rows - geo.cy) / geo.ry, cols / geo.rx
    angle = np.arctan2(ny, nx)
    outline = 1.0 + sum(a * np.sin(k * angle + p) for k, a, p in geo.wobble)
    r = np.sqrt(ny * ny + nx * nx) / outline
    inside = r < 1.0
    profile = np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0))  # compressed thickness towards the skin
    img = 0.30 + 0.18 * np.sqrt(profile)
    skin = max(2.0, 3.0 * s) / min(geo.ry, geo.rx)
    img += 0.05 * ((r > 1.0 - skin) & inside)

    d = DENSITIES.index(spec.density)
    tex = power_law_noise(rng, (h, w))
    gland = 1.0 / (1.0 + np.exp(-(tex - (1.0, 0.5, 0.0, -0.5)[d]) * 3.0))
    img += (0.04 + 0.03 * d) * gland * np.sqrt(profile) + 0.015 * tex * profile
    if geo.pectoral is not None:  # pectoral muscle: bright wedge in the upper chest-wall corner
        a, b = geo.pectoral
        edge = a * np.clip(1.0 - rows / b, 0.0, 1.0) ** 1.15
        img += (0.16 + 0.01 * tex) * ((cols < edge) & inside)
    if geo.mass is not None:
        _add_mass(img, geo.mass, rng)
    for row, col, radius, gain in geo.specks:
        _add_speck(img, row, col, radius, gain)

    img = np.where(inside, img, 0.02) + rng.normal(0.0, 0.008, (h, w))
    pix = np.clip(img * 3000.0 + 60.0, 0, 4095).astype(np.uint16)
    if side == "R":
        pix = np.ascontiguousarray(pix[:, ::-1])
    return pix


def _uid(*parts: int) -> str:
    value = 0
    for p in parts:
        value = value * 1_000_003 + int(p) + 1
    return _UID_ROOT + str(value)


def _birth_date(age: int, rng: np.random.Generator) -> str:
    """A birth date that makes the patient ``age`` on STUDY_DATE (1 January)."""
    year = int(STUDY_DATE[:4]) - age - 1
    day = int(rng.integers(0, 364))
    month_days = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
    month = 0
    while day >= month_days[month]:
        day -= month_days[month]
        month += 1
    return f"{year:04d}{month + 1:02d}{day + 1:02d}"


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
    if spec.age_written == "age":
        ds.PatientAge = f"{spec.age:03d}Y"
    elif spec.age_written == "birth":
        ds.PatientBirthDate = _birth_date(spec.age, np.random.default_rng([cfg.seed,
                                                                          spec.index, 99]))
    ds.StudyDate = STUDY_DATE
    ds.AccessionNumber = f"A{spec.index:06d}"
    ds.BreastImplantPresent = "YES" if spec.implant else "NO"
    ds.Manufacturer = maker
    ds.ManufacturerModelName = model
    ds.ViewPosition = view
    ds.ImageLaterality = side
    ds.PatientOrientation = ["A", "R" if view == "CC" else "FR"] if side == "L" else \
        ["P", "L" if view == "CC" else "FL"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    # how the pixels add_pixels writes are encoded: the domain check reads it from the header
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.BodyPartThickness = f"{thickness:.1f}"
    ds.CompressionForce = f"{float(np.clip(rng.normal(110.0, 30.0), 30.0, 250.0)):.1f}"
    ds.KVP = f"{25.0 + thickness / 10.0 + rng.normal(0.0, 0.7):.1f}"
    ds.ExposureInuAs = int(np.clip(rng.normal(90.0, 30.0), 20.0, 250.0) * 1000)
    ds.AnodeTargetMaterial = anode
    ds.FilterMaterial = filt
    spacing = 0.1 * REFERENCE_HEIGHT / cfg.shape[0]  # 0.1 mm at the reference size
    ds.ImagerPixelSpacing = [f"{spacing:.4g}", f"{spacing:.4g}"]
    ds.DetectorType = "SCINTILLATOR" if spec.manufacturer == 1 else "DIRECT"
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
                        "age_band": age_band(spec.age), "kind": spec.kind[side],
                        "implant": "yes" if spec.implant else "no"})


LABEL_FIELDS = ("file", "SOPInstanceUID", "StudyInstanceUID", "patient_id", "exam_id",
                "laterality", "view", "cancer", "calcification", "kind", "cluster", "age",
                "implant", "manufacturer", "density")


def write_dataset(cfg: SyntheticConfig, out: str | Path) -> Path:
    """Write every view as a DICOM file (uncompressed 12-bit MG) plus ``labels.csv``.

    ``labels.csv`` is keyed by SOPInstanceUID, so the ``dicom-folder`` adapter reads the set.
    """
    out = Path(out)
    (out / "dicom").mkdir(parents=True, exist_ok=True)
    label_path = out / "labels.csv"
    with label_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=LABEL_FIELDS)
        writer.writeheader()
        for index in range(cfg.n_exams):
            spec = draw_exam(cfg, index)
            for view_index, (side, view) in enumerate(VIEWS):
                ds = make_header(cfg, spec, view_index)
                add_pixels(ds, render_view(cfg, spec, view_index))
                rel = Path("dicom") / f"{ds.PatientID}_{side}_{view}.dcm"
                ds.save_as(out / rel, enforce_file_format=True)
                writer.writerow({
                    "file": rel.as_posix(), "SOPInstanceUID": ds.SOPInstanceUID,
                    "StudyInstanceUID": ds.StudyInstanceUID, "patient_id": ds.PatientID,
                    "exam_id": ds.StudyInstanceUID, "laterality": side, "view": view,
                    "cancer": spec.cancer[side], "calcification": spec.calcification[side],
                    "kind": spec.kind[side], "cluster": int(spec.cluster[side]),
                    "age": spec.age, "implant": "YES" if spec.implant else "NO",
                    "manufacturer": ds.Manufacturer, "density": spec.density})
    return label_path


def add_pixels(ds: Dataset, pix: np.ndarray) -> None:
    """Make ``ds`` a complete 12-bit MONOCHROME2 file dataset holding ``pix``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.Rows, ds.Columns = (int(v) for v in pix.shape)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelData = pix.astype("<u2").tobytes()
