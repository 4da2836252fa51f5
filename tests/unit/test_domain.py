"""The training-domain check: the manifest's ``domain``, the check itself, and how each result
object shows a view outside it (validators included)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from cadnode.dicom.pixels import PreparedImage, prepare_image
from cadnode.dicom.views import detect_view
from cadnode.jobs.domain import (
    NO_DOMAIN,
    domain_from_views,
    image_statistics,
    outside_domain,
)
from cadnode.results import BUILDERS
from cadnode.results.cad_sr.content import DOMAIN_NOTE
from cadnode.results.common import OUTSIDE_DOMAIN, clean_code
from cadnode.results.findings import StudyFindings
from cadnode.results.gsps import score_text
from cadnode.results.sc.content import domain_lines
from cadnode.runtime import DEFAULT_MODEL_PACKAGE
from cadnode.runtime.manifest import IMAGE_STATISTICS, read_manifest
from tests.unit.test_results import ROOT, _findings, _synthetic_headers, _write
from tests.unit.test_results_objects import DCIODVFY, DSRDUMP, _all_text, _dciodvfy, _need
from train.synthetic import SyntheticConfig, add_pixels, generate

DEMO = read_manifest(DEFAULT_MODEL_PACKAGE, verify_checksums=False)
SIZE = DEMO.input_size


def _prepared(path: Path) -> tuple[Dataset, PreparedImage]:
    ds = pydicom.dcmread(path)
    return ds, _prepare(ds)


def _prepare(ds: Dataset) -> PreparedImage:
    return prepare_image(ds, SIZE, detect_view(ds).laterality, pipeline=DEMO.pixel_pipeline)


@pytest.fixture(scope="module")
def synthetic() -> list[tuple[Dataset, PreparedImage]]:
    """Views of the benchmark the demo was trained on (version 2, at its native 2048 x 1024),
    from exams it did not train on, as DICOM datasets."""
    out = []
    for sample in generate(SyntheticConfig(n_exams=2, seed=1)):
        ds = sample.header
        add_pixels(ds, sample.image())
        out.append((ds, _prepare(ds)))
    return out


def test_demo_manifest_records_its_domain() -> None:
    d = DEMO.domain
    assert d is not None and d.views == 400 and d.source.startswith("400 of the")
    assert "synthetic benchmark v2" in d.source
    assert {m.split()[0].strip(",") for m in d.manufacturers or ()} == {
        "HOLOGIC", "GE", "SIEMENS", "FUJIFILM"}
    assert d.conversion_types == ("",) and d.bits_stored == (12,)
    assert d.rows == (2048, 2048) and d.columns == (1024, 1024)
    assert d.pixel_spacing_mm == (0.1, 0.1)
    assert set(d.image_statistics) == set(IMAGE_STATISTICS)


def test_real_film_exam_is_outside_and_says_why(demo_study: list[Path]) -> None:
    """CBIS-DDSM scanned film: no vendor, converted, 16 bits, ~4500 x 2900 px."""
    for path in demo_study:
        reasons = outside_domain(DEMO.domain, *_prepared(path))
        text = "; ".join(reasons)
        assert "manufacturer not recorded" in text, text
        assert "a converted or digitised image (conversion type WSD" in text
        assert "bits stored 16 (training: 12)" in text
        assert re.search(r"image size \d{4} x \d{4} px \(training: 2048 x 1024 px\)", text), text


def test_benchmark_views_are_inside(synthetic: list[tuple[Dataset, PreparedImage]]) -> None:
    assert [outside_domain(DEMO.domain, ds, p) for ds, p in synthetic] == [[]] * len(synthetic)


def test_ffdm_headers_at_another_size_are_outside(
        synthetic: list[tuple[Dataset, PreparedImage]]) -> None:
    """An FFDM header (Hologic, 0.1 mm, 3328 x 2560): its vendor is known, its size not."""
    header = _synthetic_headers()[0]
    header.Manufacturer, header.ManufacturerModelName = "HOLOGIC, Inc.", "Selenia Dimensions"
    ds, prepared = synthetic[0]
    big = replace(prepared, original_shape=(3328, 2560))
    assert outside_domain(DEMO.domain, header, big) == [
        "image size 3328 x 2560 px (training: 2048 x 1024 px)"]


def test_no_domain_flags_every_view(synthetic: list[tuple[Dataset, PreparedImage]]) -> None:
    assert all(outside_domain(None, ds, p) == [NO_DOMAIN] for ds, p in synthetic)


def test_vendor_and_model_matching_is_tolerant(
        synthetic: list[tuple[Dataset, PreparedImage]]) -> None:
    ds, prepared = synthetic[0]
    for maker, model, inside in (
            ("HOLOGIC", "SELENIA DIMENSIONS 3D", True),
            ("hologic inc.", "selenia dimensions", True),
            ("Philips", "Selenia Dimensions", False),
            ("HOLOGIC, Inc.", "Lorad M-IV", False)):
        header = copy.deepcopy(ds)
        header.Manufacturer, header.ManufacturerModelName = maker, model
        reasons = outside_domain(DEMO.domain, header, prepared)
        assert (reasons == []) is inside, (maker, model, reasons)


def test_pixel_spacing_and_statistics(synthetic: list[tuple[Dataset, PreparedImage]]) -> None:
    ds, prepared = synthetic[0]
    assert DEMO.domain is not None
    domain = replace(DEMO.domain, pixel_spacing_mm=(0.07, 0.1))
    assert outside_domain(domain, ds, prepared) == []  # 0.1 mm, inside
    header = copy.deepcopy(ds)
    del header.ImagerPixelSpacing
    assert outside_domain(domain, header, prepared) == [
        "pixel spacing not recorded (training: 0.070-0.100 mm)"]
    header.ImagerPixelSpacing = [0.2, 0.2]
    assert outside_domain(domain, header, prepared) == [
        "pixel spacing 0.200 x 0.200 mm (training: 0.070-0.100 mm)"]
    dark = replace(prepared, array=np.zeros_like(prepared.array))
    reasons = outside_domain(DEMO.domain, ds, dark)
    assert "prepared image dark fraction 1.000" in "; ".join(reasons)


def test_domain_round_trips_through_the_manifest(
        synthetic: list[tuple[Dataset, PreparedImage]], tmp_path: Path) -> None:
    domain = domain_from_views([d for d, _ in synthetic], [p for _, p in synthetic], "test")
    assert tuple(image_statistics(synthetic[0][1])) == IMAGE_STATISTICS
    assert domain.views == len(synthetic) and domain.bits_stored == (12,)
    package = tmp_path / "pkg"
    shutil.copytree(DEFAULT_MODEL_PACKAGE, package)
    data = json.loads((package / "manifest.json").read_text())
    data["domain"] = domain.as_json()
    (package / "manifest.json").write_text(json.dumps(data))
    assert read_manifest(package, verify_checksums=False).domain == domain
    for bad in ({"source": "x", "vendors": []}, {"source": "x", "rows": [9, 1]},
                {"manufacturers": []}, {"source": "x", "image_statistics": {"max": [0, 1]}}):
        data["domain"] = bad
        (package / "manifest.json").write_text(json.dumps(data))
        with pytest.raises(ValueError, match="domain"):
            read_manifest(package, verify_checksums=False)
    del data["domain"]
    (package / "manifest.json").write_text(json.dumps(data))
    assert read_manifest(package, verify_checksums=False).domain is None


# ---------------------------------------------------------------------------------------------
# The result objects.

FLAGS = ("manufacturer not recorded (training: HOLOGIC)", "bits stored 16 (training: 12)")


def _flagged(headers: list[Dataset], failed: str | None = None) -> StudyFindings:
    f = _findings(headers, failed=failed, with_pixels=True)
    for v in f.views:
        if not v.failed and v.laterality == "L":
            v.outside_domain = FLAGS
    return f


NOTE = f"{OUTSIDE_DOMAIN}: " + "; ".join(FLAGS)


def _single_image_findings(ds: Dataset) -> list[Dataset]:
    found: list[Dataset] = []

    def walk(items: list[Dataset]) -> None:
        for item in items:
            if item.get("ConceptNameCodeSequence") and \
                    item.ConceptNameCodeSequence[0].CodeValue == "111059":  # Single Image Finding
                found.append(item)
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return found


def test_cad_sr_says_it_next_to_each_flagged_score(tmp_path: Path) -> None:
    """Read back with pydicom: each flagged view's single image findings (cancer and
    calcification) carry the statement beside their scores; the others do not."""
    headers = _synthetic_headers(512, 256)
    f = _flagged(headers)
    ds = pydicom.dcmread(_write(BUILDERS["cad_sr"](f, headers, ROOT), tmp_path / "sr.dcm"))
    note = clean_code(DOMAIN_NOTE).value
    notes = []
    for finding in _single_image_findings(ds):
        names = [c.ConceptNameCodeSequence[0].CodeMeaning for c in finding.ContentSequence]
        assert "Certainty of Finding" in names
        notes.append([c.TextValue for c in finding.ContentSequence if c.ValueType == "TEXT"
                      and c.ConceptNameCodeSequence[0].CodeValue == note])
    flagged = [v for v in f.views if v.outside_domain]
    assert sorted(notes) == sorted([[NOTE]] * 2 * len(flagged)
                                   + [[]] * 2 * (len(f.views) - len(flagged)))
    text = _all_text(ds)
    assert f"{OUTSIDE_DOMAIN.upper()}: L-CC, L-MLO" in text  # exam level
    assert "built from L-CC, L-MLO, outside it" in text  # the left breast's composite features
    assert f"; {NOTE}" in text  # the view's own impression line


def test_each_object_shows_the_flag() -> None:
    headers = _synthetic_headers(512, 256)
    f = _flagged(headers)
    left = next(v for v in f.views if v.outside_domain)
    right = next(v for v in f.views if not v.outside_domain)
    assert score_text(left, f.thresholds).endswith(NOTE.upper())
    assert OUTSIDE_DOMAIN.upper() not in score_text(right, f.thresholds)
    assert domain_lines(left)[0] == f"{OUTSIDE_DOMAIN.upper()}:"
    assert " ".join(domain_lines(left)[1:]).replace("   ", " ") == " ".join(FLAGS)
    assert domain_lines(right) == []
    sc = BUILDERS["sc"](f, headers, ROOT)
    assert f"{left.view_key} {NOTE}" in sc.ImageComments
    tid = _all_text(BUILDERS["tid1500"](f, headers, ROOT))
    assert tid.count(NOTE) == 2 * 2  # cancer and calcification groups of two views
    assert "built from L-CC, L-MLO, outside it" in tid
    # the flags are content: a new flag is a new version of every object
    assert _findings(headers, with_pixels=True).content_key() != f.content_key()


@pytest.mark.parametrize("kind", ["cad_sr", "tid1500", "sc", "gsps"])
def test_flagged_objects_stay_valid(kind: str, tmp_path: Path) -> None:
    _need(DCIODVFY, "dicom3tools dciodvfy")
    headers = _synthetic_headers(512, 256)
    errors, _ = _dciodvfy(_write(BUILDERS[kind](_flagged(headers, "R-MLO"), headers, ROOT),
                                 tmp_path / kind))
    assert errors == [], errors
    if kind in ("cad_sr", "tid1500"):
        _need(DSRDUMP, "DCMTK dsrdump")
        run = subprocess.run([str(DSRDUMP), "+Pc", "+Pl", str(tmp_path / kind)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and not re.search(r"^E:", run.stderr, re.M), run.stderr
        assert OUTSIDE_DOMAIN in run.stdout

