"""Evaluation metrics against hand-computed values; breast/exam aggregation uses the node's rule."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from train.evaluate import (  # noqa: E402
    aggregate_levels,
    auroc,
    bootstrap_auroc,
    probabilistic_f1,
    roc_curve,
    sensitivity_at_specificity,
    write_report,
)


def test_auroc_of_known_rankings() -> None:
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    # pairs (pos, neg): (0.35>0.1), (0.35>0.4 no), (0.8>0.1), (0.8>0.4) -> 3/4
    assert auroc([0, 1, 0, 1], [0.1, 0.35, 0.4, 0.8]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half: (1 + 0.5) / 2
    assert auroc([0, 1, 1], [0.5, 0.5, 0.9]) == pytest.approx(0.75)
    assert np.isnan(auroc([1, 1], [0.2, 0.3]))


def test_bootstrap_interval_contains_the_point_estimate() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = y + rng.normal(0, 1.0, 300)
    point = auroc(y, s)
    lo, hi = bootstrap_auroc(y, s, n_boot=300, seed=1)
    assert lo < point < hi
    assert 0.02 < hi - lo < 0.25
    assert bootstrap_auroc(y, s, n_boot=300, seed=1) == (lo, hi)  # seeded


def test_sensitivity_at_specificity_by_hand() -> None:
    neg = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    pos = [0.55, 0.85, 0.95, 1.5]
    y = np.r_[np.zeros(10), np.ones(4)]
    s = np.r_[neg, pos]
    # spec >= 0.8 needs threshold > 0.8 (8 of 10 negatives below): positives >= 0.85 -> 3/4
    assert sensitivity_at_specificity(y, s, 0.8) == pytest.approx(0.75)
    # spec >= 0.9 needs threshold > 0.9: 0.95 and 1.5 -> 2/4
    assert sensitivity_at_specificity(y, s, 0.9) == pytest.approx(0.5)
    # spec 1.0: threshold > 1.0 -> only 1.5
    assert sensitivity_at_specificity(y, s, 1.0) == pytest.approx(0.25)


def test_probabilistic_f1_formula() -> None:
    y = np.array([1, 0, 1, 0])
    p = np.array([0.8, 0.4, 0.6, 0.2])
    tp, fp = 0.8 + 0.6, 0.4 + 0.2
    precision, recall = tp / (tp + fp), tp / 2
    assert probabilistic_f1(y, p) == pytest.approx(2 * precision * recall / (precision + recall))
    assert probabilistic_f1(y, y.astype(float)) == pytest.approx(1.0)


def test_roc_curve_ends() -> None:
    fpr, tpr = roc_curve(np.array([0, 1, 0, 1]), np.array([0.1, 0.35, 0.4, 0.8]))
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def _rows() -> list[dict]:
    rows = []
    for e, (lcc, lmlo, rcc, rmlo, lab) in enumerate([(0.9, 0.2, 0.1, 0.3, "L"),
                                                     (0.1, 0.2, 0.15, 0.05, None),
                                                     (0.3, 0.1, 0.2, 0.7, "R")]):
        for side, view, p in (("L", "CC", lcc), ("L", "MLO", lmlo), ("R", "CC", rcc),
                              ("R", "MLO", rmlo)):
            rows.append({"exam_id": f"e{e}", "laterality": side, "view": view,
                         "group_manufacturer": "HOLOGIC" if e < 2 else "GE",
                         "cancer": p, "cancer_label": int(side == lab),
                         "calcification": 1 - p, "calcification_label": int(e == 1)})
    return rows


def test_breast_and_exam_scores_are_the_node_max_rule(tmp_path) -> None:
    levels = aggregate_levels(_rows())
    breasts = {(b["exam_id"], b["laterality"]): b for b in levels["breast"]}
    assert breasts[("e0", "L")]["cancer"] == 0.9 and breasts[("e0", "L")]["cancer_label"] == 1
    assert breasts[("e0", "R")]["cancer"] == 0.3 and breasts[("e0", "R")]["cancer_label"] == 0
    exams = {e["exam_id"]: e for e in levels["exam"]}
    assert exams["e2"]["cancer"] == 0.7 and exams["e1"]["cancer_label"] == 0
    report = write_report(_rows(), tmp_path, "t", n_boot=50)
    assert report["levels"]["breast"]["cancer"]["auroc"] == pytest.approx(1.0)
    assert set(report["subgroups"]["manufacturer"]) == {"HOLOGIC", "GE"}
    for name in ("report.json", "report.md", "roc_view.png", "roc_breast.png"):
        assert (tmp_path / name).stat().st_size > 100
    assert json.loads((tmp_path / "report.json").read_text())["levels"]["view"]["cancer"]["n"] \
        == 12
    assert (tmp_path / "roc_view.png").read_bytes()[:4] == b"\x89PNG"


def test_heatmap_pointing_game_on_the_source_grid() -> None:
    """A peak over the lesion hits, one elsewhere misses, mapped through crop and mirror."""
    from pydicom import Dataset

    from cadnode.dicom.pixels import prepare_image
    from train.evaluate import heatmap_hit, localisation_metrics

    img = np.zeros((200, 100), dtype=np.float32)
    img[20:180, 40:100] = 1000.0  # breast against the right edge: the node mirrors it
    prepared = prepare_image(Dataset(), (64, 32), "R", pixels=img)
    assert prepared.flipped
    box = (80.0, 150.0, 90.0, 160.0)  # (x0, y0, x1, y1) on the stored image
    heat = np.zeros((8, 4), dtype=np.float32)
    # find the model cell whose centre maps into the box, the way the node maps peaks
    centres = {(r, c): prepared.cell_centre(r, c, (8, 4)) for r in range(8) for c in range(4)}
    target = next(cell for cell, (x, y) in centres.items()
                  if box[0] - 10 <= x <= box[2] + 10 and box[1] - 10 <= y <= box[3] + 10)
    heat[target] = 1.0
    hit, chance = heatmap_hit(heat, prepared, [box])
    assert hit and 0.0 < chance < 0.2
    far = np.zeros_like(heat)
    far[0, 0] = 1.0  # top row: the lesion sits near the bottom
    assert not heatmap_hit(far, prepared, [box])[0]
    rows = [{"heatmap_hit": True, "heatmap_chance": 0.1}] * 3 + [
        {"heatmap_hit": False, "heatmap_chance": 0.1}, {"cancer": 0.2}]
    loc = localisation_metrics(rows, n_boot=200)
    assert loc is not None and loc["n"] == 4 and loc["pointing_accuracy"] == 0.75
    assert loc["pointing_accuracy_ci95"][0] <= 0.75 <= loc["pointing_accuracy_ci95"][1]
    assert localisation_metrics([{"cancer": 0.1}]) is None
