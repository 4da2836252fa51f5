"""Honest statistics: patient-clustered and paired bootstraps, unknown laterality, RSNA pF1."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from train.evaluate import (  # noqa: E402
    aggregate_levels,
    auroc,
    bootstrap_auroc,
    breast_pf1,
    evaluate_rows,
    paired_auroc_difference,
    pf1_threshold,
    probabilistic_f1,
)
from train.experiment import ablation_verdict  # noqa: E402


def correlated_views(n_patients: int = 60, views: int = 4, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and scores shared by a patient's views (plus a little view noise)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n_patients)
    patient_score = y * 0.8 + rng.normal(0, 1.0, n_patients)
    labels = np.repeat(y, views)
    scores = np.repeat(patient_score, views) + rng.normal(0, 0.1, n_patients * views)
    return labels, scores, np.repeat(np.arange(n_patients), views)


def test_clustered_interval_is_wider_with_correlated_views() -> None:
    y, s, patients = correlated_views()
    row_lo, row_hi = bootstrap_auroc(y, s, n_boot=400, seed=0)
    lo, hi = bootstrap_auroc(y, s, n_boot=400, seed=0, clusters=patients)
    assert lo < auroc(y, s) < hi
    assert hi - lo > 1.6 * (row_hi - row_lo)  # 4 near-copies per patient: about 2x (sqrt 4)
    assert bootstrap_auroc(y, s, n_boot=400, seed=0, clusters=patients) == (lo, hi)  # seeded


def test_one_view_per_cluster_is_the_row_bootstrap() -> None:
    y, s, _ = correlated_views(views=1)
    ids = [f"p{i}" for i in range(len(y))]
    assert bootstrap_auroc(y, s, n_boot=200, seed=3, clusters=ids) == \
        bootstrap_auroc(y, s, n_boot=200, seed=3)


def test_report_intervals_resample_patients() -> None:
    y, s, patients = correlated_views(n_patients=40)
    rows = [{"patient_id": f"p{p}", "exam_id": f"e{p}", "laterality": "LR"[i % 2],
             "view": "CC", "cancer": float(v), "cancer_label": int(t),
             "calcification": None, "calcification_label": None}
            for i, (t, v, p) in enumerate(zip(y, s, patients, strict=True))]
    report = evaluate_rows(rows, n_boot=200)
    view = report["levels"]["view"]["cancer"]
    assert view["n"] == 160 and view["clusters"] == 40
    assert view["auroc_ci95"] == list(bootstrap_auroc(y, s, n_boot=200, clusters=patients))
    assert report["levels"]["breast"]["cancer"]["clusters"] == 40


def test_unknown_laterality_counts_only_for_the_exam() -> None:
    rows = [
        {"exam_id": "e0", "laterality": "L", "view": "CC", "cancer": 0.2, "cancer_label": 0},
        {"exam_id": "e0", "laterality": "R", "view": "CC", "cancer": 0.3, "cancer_label": 0},
        {"exam_id": "e0", "laterality": None, "view": "MLO", "cancer": 0.9, "cancer_label": 1},
    ]
    for r in rows:
        r.update(calcification=None, calcification_label=None)
    levels = aggregate_levels(rows)
    breasts = {b["laterality"]: b for b in levels["breast"]}
    assert set(breasts) == {"L", "R"}
    assert (breasts["L"]["cancer"], breasts["L"]["cancer_label"]) == (0.2, 0)  # not 0.9 / 1
    assert (breasts["R"]["cancer"], breasts["R"]["cancer_label"]) == (0.3, 0)
    (exam,) = levels["exam"]
    assert (exam["cancer"], exam["cancer_label"]) == (0.9, 1)
    only_unknown = aggregate_levels([{**rows[2], "exam_id": "e1"}])
    assert only_unknown["breast"] == [] and only_unknown["exam"][0]["cancer"] == 0.9


def test_rsna_pf1_binarised_at_a_validation_threshold() -> None:
    y = np.array([1, 1, 0, 0, 0, 1])
    p = np.array([0.9, 0.6, 0.55, 0.3, 0.1, 0.2])
    # at 0.6: TP 2, FP 0, FN 1 -> F1 = 2 * 2 / (2 * 2 + 0 + 1) = 0.8
    assert breast_pf1(y, p, 0.6) == pytest.approx(0.8)
    assert breast_pf1(y, p, 0.2) == pytest.approx(2 * 3 / (2 * 3 + 2 + 0))
    assert pf1_threshold(y, p) == pytest.approx(0.6)  # 0.8 beats every other cut
    assert probabilistic_f1(y, p) != breast_pf1(y, p, 0.6)  # raw probabilities differ
    # evaluate_rows: threshold from validation breasts, applied at breast level only
    def rows(scores: np.ndarray) -> list[dict]:
        return [{"patient_id": f"p{i}", "exam_id": f"e{i}", "laterality": "L", "view": "CC",
                 "cancer": float(v), "cancer_label": int(t), "calcification": None,
                 "calcification_label": None} for i, (t, v) in enumerate(zip(y, scores,
                                                                            strict=True))]
    report = evaluate_rows(rows(p * 0.5), n_boot=20, validation=rows(p))
    breast = report["levels"]["breast"]["cancer"]
    assert report["pf1_thresholds"] == {"cancer": pytest.approx(0.6)}
    assert breast["pf1_rsna_threshold"] == pytest.approx(0.6)
    assert breast["pf1_rsna"] == 0.0  # test scores halved: nothing reaches 0.6
    assert breast["pf1_raw"] == pytest.approx(probabilistic_f1(y, p * 0.5))
    assert "pf1_rsna" not in report["levels"]["view"]["cancer"]
    assert "pf1_rsna" not in evaluate_rows(rows(p), n_boot=20)["levels"]["breast"]["cancer"]


def _model_rows(y: np.ndarray, scores: np.ndarray, patients: np.ndarray) -> list[dict]:
    return [{"patient_id": f"p{q}", "exam_id": f"e{q}", "laterality": "LR"[i % 2], "view": "CC",
             "cancer": float(v), "cancer_label": int(t), "calcification": float(v),
             "calcification_label": int(t)}
            for i, (t, v, q) in enumerate(zip(y, scores, patients, strict=True))]


def test_paired_verdict_shows_a_real_gain_and_not_noise() -> None:
    rng = np.random.default_rng(1)
    y, _, patients = correlated_views(n_patients=80, views=2, seed=1)
    base = rng.normal(0, 1.0, len(y))
    weak = y * 0.5 + base
    strong = y * 2.0 + base
    diff = paired_auroc_difference(y, strong, weak, patients, n_boot=300)
    assert diff["difference"] == pytest.approx(auroc(y, strong) - auroc(y, weak))
    assert diff["ci95"][0] > 0 and diff["excludes_zero"]
    verdict = ablation_verdict({"fused": _model_rows(y, strong, patients),
                                "image-only": _model_rows(y, weak, patients)}, n_boot=300)
    assert verdict["cancer"]["pass"]
    assert verdict["cancer"]["fused_minus_image-only"]["ci95"][0] > 0
    # two models whose scores differ only by noise: the paired CI straddles 0
    twin = weak + rng.normal(0, 0.05, len(y))
    verdict = ablation_verdict({"fused": _model_rows(y, twin, patients),
                                "image-only": _model_rows(y, weak, patients),
                                "text-only": _model_rows(y, strong, patients)}, n_boot=300)
    for task in ("cancer", "calcification"):
        lo, hi = verdict[task]["fused_minus_image-only"]["ci95"]
        assert lo < 0 < hi and not verdict[task]["pass"]
