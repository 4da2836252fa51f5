"""Synthetic benchmark: deterministic per seed, labels follow the documented rule, DICOM export."""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from train.synthetic import (  # noqa: E402
    SyntheticConfig,
    calcification_rule,
    cancer_rule,
    draw_exam,
    generate,
    render_view,
    write_dataset,
)

CFG = SyntheticConfig(n_exams=3, seed=7)


def test_same_seed_same_set_other_seed_differs() -> None:
    a, b = list(generate(CFG)), list(generate(CFG))
    c = list(generate(replace(CFG, seed=8)))
    assert len(a) == 12
    for x, y in zip(a, b, strict=True):
        assert (x.cancer, x.calcification, x.patient_id) == (y.cancer, y.calcification,
                                                              y.patient_id)
        assert x.header == y.header
        assert np.array_equal(x.image(), y.image())
    assert not np.array_equal(a[0].image(), c[0].image())
    # an exam does not depend on how many exams are drawn
    more = list(generate(replace(CFG, n_exams=5)))
    assert np.array_equal(more[5].image(), a[5].image())


def test_labels_follow_the_documented_rule() -> None:
    clean = SyntheticConfig(n_exams=300, seed=1, label_noise=0.0)
    for i in range(clean.n_exams):
        spec = draw_exam(clean, i)
        for side in ("L", "R"):
            assert spec.cancer[side] == int(spec.mass[side] and spec.age >= 60)
            assert spec.calcification[side] == int(spec.cluster[side] and not spec.implant)
    # with the default noise, about 3% of labels differ from the rule
    noisy = SyntheticConfig(n_exams=400, seed=1)
    flips = total = 0
    for i in range(noisy.n_exams):
        spec = draw_exam(noisy, i)
        for side in ("L", "R"):
            flips += spec.cancer[side] != cancer_rule(spec.mass[side], spec.age)
            flips += spec.calcification[side] != calcification_rule(spec.cluster[side],
                                                                    spec.implant)
            total += 2
    assert 0.01 < flips / total < 0.06
    # the header carries the condition the image cannot show
    sample = next(iter(generate(CFG)))
    spec = draw_exam(CFG, 0)
    assert sample.header.PatientAge == f"{spec.age:03d}Y"
    assert sample.header.BreastImplantPresent == ("YES" if spec.implant else "NO")


def test_a_mass_and_a_cluster_are_visible_in_the_image() -> None:
    spec = draw_exam(CFG, 0)
    spec.mass, spec.cluster = {"L": False, "R": False}, {"L": False, "R": False}
    plain = render_view(CFG, spec, 0).astype(np.float64)
    spec.mass["L"] = True
    with_mass = render_view(CFG, spec, 0).astype(np.float64)
    assert (with_mass - plain).max() > 400  # a bright blob well above quantum noise
    spec.mass["L"], spec.cluster["L"] = False, True
    with_dots = render_view(CFG, spec, 0).astype(np.float64)
    bright = (with_dots - plain) > 600
    assert 5 <= bright.sum() <= 400  # a few small dots, not a large region


def test_write_dataset_dicom_and_labels(tmp_path) -> None:
    import pydicom

    from cadnode.dicom.pixels import decode_pixels

    labels = write_dataset(SyntheticConfig(n_exams=1, seed=3), tmp_path)
    rows = list(csv.DictReader(labels.open()))
    assert len(rows) == 4
    samples = list(generate(SyntheticConfig(n_exams=1, seed=3)))
    for row, sample in zip(rows, samples, strict=True):
        ds = pydicom.dcmread(tmp_path / row["file"])
        assert ds.ViewPosition == row["view"] and ds.ImageLaterality == row["laterality"]
        assert int(row["cancer"]) == sample.cancer
        assert np.array_equal(decode_pixels(ds), sample.image().astype(np.float32))


@pytest.mark.parametrize("view_index", [0, 3])  # a left CC and a mirrored right MLO
def test_lesion_boxes_lie_where_the_findings_are_drawn(view_index: int) -> None:
    from train.synthetic import VIEWS, view_lesions

    spec = draw_exam(CFG, 1)
    side = VIEWS[view_index][0]
    spec.age = 70  # the mass is malignant under the rule
    for drawn in ("mass", "cluster"):
        spec.mass, spec.cluster = {"L": False, "R": False}, {"L": False, "R": False}
        plain = render_view(CFG, spec, view_index).astype(np.float64)
        getattr(spec, drawn)[side] = True
        diff = render_view(CFG, spec, view_index).astype(np.float64) - plain
        (lesion,) = view_lesions(CFG, spec, view_index)
        assert lesion.kind == ("mass" if drawn == "mass" else "calcification")
        assert lesion.malignant == (drawn == "mass")
        x0, y0, x1, y1 = lesion.box
        rows, cols = np.nonzero(diff > 0.5 * diff.max())
        assert (x0 <= cols).all() and (cols <= x1).all(), (lesion.box, cols.min(), cols.max())
        assert (y0 <= rows).all() and (rows <= y1).all(), (lesion.box, rows.min(), rows.max())
        assert (x1 - x0) < CFG.shape[1] / 2 and (y1 - y0) < CFG.shape[0] / 3  # a local box
    spec.age = 45  # the same mass in a younger woman is not the cause of a cancer label
    spec.mass[side], spec.cluster[side] = True, False
    assert not view_lesions(CFG, spec, view_index)[0].malignant
    assert [s.lesions for s in generate(CFG)][view_index] == view_lesions(
        CFG, draw_exam(CFG, 0), view_index)
