"""Metrics and reports: AUROC with patient-clustered bootstrap CIs, sensitivity at specificity,
RSNA pF1 (breast level, threshold from validation), subgroups.

Breast and exam scores are aggregated with the node's own rule
(:func:`cadnode.runtime.scoring.aggregate`, the maximum over views), so the numbers here describe
what the node reports. ROC curves are drawn with Pillow (a core dependency), not matplotlib.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cadnode.dicom.pixels import PreparedImage, peak_and_outline
from cadnode.runtime.scoring import aggregate

TASKS: tuple[str, ...] = ("cancer", "calcification")
SPECIFICITIES: tuple[float, ...] = (0.8, 0.9, 0.95)


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged (vectorised: the bootstrap calls this 1000s of times)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count one half); NaN when one class is absent."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def cluster_index(clusters: Sequence[Any] | np.ndarray | None, n: int) -> list[np.ndarray]:
    """Row indices of each cluster (first-seen order); ``None`` makes every row its own."""
    if clusters is None:
        return [np.array([i]) for i in range(n)]
    if len(clusters) != n:
        raise ValueError(f"{len(clusters)} cluster ids for {n} rows")
    members: dict[Any, list[int]] = {}
    for i, c in enumerate(clusters):
        members.setdefault(c, []).append(i)
    return [np.array(v) for v in members.values()]


def resamples(clusters: Sequence[Any] | np.ndarray | None, n: int, n_boot: int,
              seed: int) -> Iterator[np.ndarray]:
    """Row indices of ``n_boot`` cluster bootstrap draws (clusters drawn with replacement).

    Views of one patient are correlated, so resampling rows treats them as independent and gives
    intervals that are too narrow; drawing whole clusters keeps that correlation. The draws depend
    only on (clusters, seed), so two models scored on the same rows see the same draws (paired).
    """
    groups = cluster_index(clusters, n)
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        picks = rng.integers(0, len(groups), len(groups))
        yield np.concatenate([groups[k] for k in picks])


def _interval(values: Sequence[float], alpha: float) -> tuple[float, float]:
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return float("nan"), float("nan")
    lo, hi = np.percentile(kept, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def bootstrap_auroc(labels: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0,
                    alpha: float = 0.05, clusters: Sequence[Any] | np.ndarray | None = None
                    ) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUROC, resampling ``clusters`` (patient ids) with
    replacement; without them each row is its own cluster (only right for one row per patient)."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    return _interval([auroc(y[i], s[i]) for i in resamples(clusters, len(y), n_boot, seed)],
                     alpha)


def paired_auroc_difference(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                            clusters: Sequence[Any] | np.ndarray | None = None,
                            n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
                            ) -> dict[str, Any]:
    """AUROC(a) - AUROC(b) on the same rows with a paired cluster bootstrap interval: each draw
    scores both models on the same resampled patients, so their shared case mix cancels out
    (two separate intervals overlap far more often than the difference is uncertain)."""
    y = np.asarray(labels, dtype=bool)
    a = np.asarray(scores_a, dtype=np.float64)
    b = np.asarray(scores_b, dtype=np.float64)
    if not len(y) == len(a) == len(b):
        raise ValueError("labels and both score arrays must have the same length")
    draws = [auroc(y[i], a[i]) - auroc(y[i], b[i])
             for i in resamples(clusters, len(y), n_boot, seed)]
    lo, hi = _interval(draws, alpha)
    return {"difference": auroc(y, a) - auroc(y, b), "ci95": [lo, hi],
            "excludes_zero": bool(lo > 0 or hi < 0)}


def sensitivity_at_specificity(labels: np.ndarray, scores: np.ndarray,
                               specificity: float) -> float:
    """Highest sensitivity over thresholds t (positive iff score >= t) with spec >= target."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    best = 0.0
    for t in np.unique(s):
        if np.mean(neg < t) >= specificity - 1e-12:
            best = max(best, float(np.mean(pos >= t)))
    return best


def probabilistic_f1(labels: np.ndarray, probs: np.ndarray) -> float:
    """RSNA Screening Mammography pF1: precision/recall with probabilities as soft counts."""
    y = np.asarray(labels, dtype=bool)
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    tp, fp = float(p[y].sum()), float(p[~y].sum())
    n_pos = int(y.sum())
    if n_pos == 0 or tp + fp == 0:
        return 0.0
    precision, recall = tp / (tp + fp), tp / n_pos
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def breast_pf1(labels: np.ndarray, probs: np.ndarray, threshold: float) -> float:
    """RSNA pF1 of breast predictions binarised at ``threshold`` (positive iff prob >= it).

    The RSNA Screening Mammography metric is pF1 over breasts (prediction id patient_laterality);
    of 0/1 predictions it is the ordinary F1, which is how it is reported and compared.
    """
    p = (np.asarray(probs, dtype=np.float64) >= threshold).astype(np.float64)
    return probabilistic_f1(labels, p)


def pf1_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The threshold (one of the probabilities) that maximises :func:`breast_pf1`: choose it on
    validation breasts, then apply it to test; the lowest such threshold wins ties."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(probs, dtype=np.float64)
    if not y.any():
        return float("nan")
    candidates = np.unique(s)
    values = [breast_pf1(y, s, float(t)) for t in candidates]
    return float(candidates[int(np.argmax(values))])


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0)."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    ys, ss = y[order], s[order]
    last = np.r_[np.nonzero(np.diff(ss))[0], len(ss) - 1]
    tps = np.cumsum(ys)[last]
    fps = np.cumsum(~ys)[last]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def aggregate_levels(views: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """View rows (patient_id, exam_id, laterality, view, group keys, <task>, <task>_label) ->
    breast, exam.

    Scores use the node's rule (``cadnode.runtime.scoring.aggregate``); a breast's (exam's) label
    is positive when any of its views is. A view of unknown laterality belongs to no breast, so
    its score and label count only for the exam (the maximum rule, like the node's exam score).
    """
    by_exam: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in views:
        by_exam[str(row["exam_id"])].append(row)
    breasts: list[dict[str, Any]] = []
    exams: list[dict[str, Any]] = []
    for exam_id in sorted(by_exam):
        rows = by_exam[exam_id]
        sided = [r for r in rows if r.get("laterality") in ("L", "R")]
        scores = {f"{r['laterality']}-{r.get('view') or 'X'}-{i}": {t: r[t] for t in TASKS}
                  for i, r in enumerate(sided)}
        breast_scores, exam_scores = aggregate(scores)
        for r in (r for r in rows if r.get("laterality") not in ("L", "R")):
            for t in TASKS:
                if r.get(t) is not None and math.isfinite(float(r[t])):
                    exam_scores[t] = max(float(r[t]), exam_scores.get(t, -math.inf))
        ids = {"exam_id": exam_id, "patient_id": rows[0].get("patient_id") or exam_id}
        groups = {k: v for k, v in rows[0].items() if k.startswith("group_")}
        for side, values in breast_scores.items():
            members = [r for r in sided if r["laterality"] == side]
            entry: dict[str, Any] = {**ids, "laterality": side, **groups, **values}
            for t in TASKS:
                entry[f"{t}_label"] = _any_label(members, t)
            breasts.append(entry)
        entry = {**ids, **groups, **exam_scores}
        for t in TASKS:
            entry[f"{t}_label"] = _any_label(rows, t)
        exams.append(entry)
    return {"view": [dict(v) for v in views], "breast": breasts, "exam": exams}


def _any_label(rows: Sequence[Mapping[str, Any]], task: str) -> int | None:
    known = [r[f"{task}_label"] for r in rows if r.get(f"{task}_label") is not None]
    return None if not known else int(any(known))


def task_metrics(labels: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 clusters: Sequence[Any] | np.ndarray | None = None,
                 threshold: float | None = None) -> dict[str, Any]:
    """All metrics of one task at one level; the AUROC CI resamples ``clusters`` (patients).

    ``pf1_raw`` is pF1 of the raw probabilities; with a ``threshold`` (breast level) the RSNA
    figure ``pf1_rsna`` of the predictions binarised at it is added.
    """
    lo, hi = bootstrap_auroc(labels, scores, n_boot=n_boot, seed=seed, clusters=clusters)
    out: dict[str, Any] = {
        "n": int(len(labels)), "positives": int(np.sum(labels)),
        "clusters": len(cluster_index(clusters, len(labels))),
        "auroc": auroc(labels, scores), "auroc_ci95": [lo, hi],
        "sensitivity_at_specificity": {f"{sp:g}": sensitivity_at_specificity(labels, scores, sp)
                                       for sp in SPECIFICITIES},
        "pf1_raw": probabilistic_f1(labels, scores),
    }
    if threshold is not None:
        out["pf1_rsna"] = breast_pf1(labels, scores, threshold)
        out["pf1_rsna_threshold"] = threshold
    return out


def _kept(rows: Sequence[Mapping[str, Any]], task: str) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get(f"{task}_label") is not None and r.get(task) is not None]


def _arrays(rows: Sequence[Mapping[str, Any]], task: str) -> tuple[np.ndarray, np.ndarray]:
    kept = _kept(rows, task)
    return (np.array([int(r[f"{task}_label"]) for r in kept], dtype=np.int64),
            np.array([float(r[task]) for r in kept], dtype=np.float64))


def cluster_ids(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The bootstrap's unit per row: the patient, or the exam where there is no patient id."""
    return [str(r.get("patient_id") or r["exam_id"]) for r in rows]


def task_clusters(rows: Sequence[Mapping[str, Any]], task: str) -> list[str]:
    """Cluster ids aligned with :func:`_arrays` of the same rows and task."""
    return cluster_ids(_kept(rows, task))


def pf1_thresholds(validation: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per task, the breast-level pF1 threshold chosen on validation view rows."""
    breasts = aggregate_levels(validation)["breast"]
    out = {}
    for task in TASKS:
        y, s = _arrays(breasts, task)
        if len(y) and y.any():
            out[task] = pf1_threshold(y, s)
    return out


def evaluate_rows(views: Sequence[Mapping[str, Any]], n_boot: int = 1000, seed: int = 0,
                  validation: Sequence[Mapping[str, Any]] | None = None,
                  thresholds: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Metrics per level (view, breast, exam) and task, plus subgroups at the view level.

    CIs resample patients (exams without a patient id). The RSNA pF1 (breast level) uses
    ``thresholds`` per task, else those chosen on the ``validation`` view rows; with neither it
    is not reported (a threshold chosen on the test set itself would flatter it).
    """
    if thresholds is None and validation is not None:
        thresholds = pf1_thresholds(validation)
    levels = aggregate_levels(views)
    report: dict[str, Any] = {"levels": {}, "subgroups": {},
                              "pf1_thresholds": dict(thresholds or {})}
    for level, level_rows in levels.items():
        report["levels"][level] = {}
        for task in TASKS:
            y, s = _arrays(level_rows, task)
            if len(y):
                threshold = (thresholds or {}).get(task) if level == "breast" else None
                report["levels"][level][task] = task_metrics(
                    y, s, n_boot=n_boot, seed=seed, clusters=task_clusters(level_rows, task),
                    threshold=threshold)
    group_keys = sorted({k for r in views for k in r if k.startswith("group_")})
    for key in group_keys:
        name = key.removeprefix("group_")
        report["subgroups"][name] = {}
        for value in sorted({str(r[key]) for r in views if key in r}):
            rows = [r for r in views if str(r.get(key)) == value]
            entry: dict[str, Any] = {}
            for task in TASKS:
                y, s = _arrays(rows, task)
                entry[task] = {"n": int(len(y)), "positives": int(y.sum()) if len(y) else 0,
                               "auroc": auroc(y, s) if len(y) else float("nan")}
            report["subgroups"][name][value] = entry
    loc = localisation_metrics(views, n_boot=n_boot, seed=seed)
    if loc is not None:
        report["localisation"] = loc
    return report


def heatmap_hit(heat: np.ndarray, prepared: PreparedImage,
                boxes: Sequence[tuple[float, float, float, float]]) -> tuple[bool, float]:
    """Pointing game on the source grid: does the heatmap peak, mapped the way the node maps it
    into its reports, fall in a lesion box grown by half a heatmap cell? Also the chance of that
    for a peak at a random cell (the fraction of cells whose centre falls in a grown box)."""
    h, w = heat.shape
    r0, c0, r1, c1 = prepared.crop
    gx, gy = 0.5 * (c1 - c0) / w, 0.5 * (r1 - r0) / h
    grown = [(x0 - gx, y0 - gy, x1 + gx, y1 + gy) for x0, y0, x1, y1 in boxes]

    def inside(x: float, y: float) -> bool:
        return any(x0 <= x <= x1 and y0 <= y <= y1 for x0, y0, x1, y1 in grown)

    (px, py), _ = peak_and_outline(heat, prepared)
    cells = [prepared.cell_centre(r, c, (h, w)) for r in range(h) for c in range(w)]
    return inside(px, py), float(np.mean([inside(x, y) for x, y in cells]))


def localisation_metrics(views: Sequence[Mapping[str, Any]], n_boot: int = 1000,
                         seed: int = 0) -> dict[str, Any] | None:
    """Pointing accuracy over views that carry ``heatmap_hit`` (positives with marked lesions);
    the CI resamples patients when the rows carry ids."""
    rows = [r for r in views if r.get("heatmap_hit") is not None]
    if not rows:
        return None
    hits = np.array([bool(r["heatmap_hit"]) for r in rows], dtype=np.float64)
    chance = float(np.mean([float(r["heatmap_chance"]) for r in rows]))
    has_ids = all(r.get("exam_id") is not None for r in rows)
    boots = [float(hits[i].mean()) for i in resamples(cluster_ids(rows) if has_ids else None,
                                                      len(rows), n_boot, seed)]
    lo, hi = _interval(boots, 0.05)
    return {"n": len(rows), "pointing_accuracy": float(hits.mean()),
            "pointing_accuracy_ci95": [lo, hi], "chance": chance}


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def report_markdown(report: Mapping[str, Any], title: str = "Evaluation") -> str:
    lines = [f"# {title}", ""]
    for level, tasks in report["levels"].items():
        lines += [f"## {level} level", "",
                  "| task | n (patients) | positives | AUROC [95% CI] | "
                  "sens@spec 0.8 / 0.9 / 0.95 | pF1 raw | RSNA pF1 (threshold) |",
                  "|---|---|---|---|---|---|---|"]
        for task, m in tasks.items():
            sens = " / ".join(_fmt(m["sensitivity_at_specificity"][f"{sp:g}"])
                              for sp in SPECIFICITIES)
            lo, hi = m["auroc_ci95"]
            rsna = (f"{_fmt(m['pf1_rsna'])} ({_fmt(m['pf1_rsna_threshold'])})"
                    if "pf1_rsna" in m else "-")
            lines.append(f"| {task} | {m['n']} ({m['clusters']}) | {m['positives']} | "
                         f"{_fmt(m['auroc'])} [{_fmt(lo)}, {_fmt(hi)}] | {sens} | "
                         f"{_fmt(m['pf1_raw'])} | {rsna} |")
        lines.append("")
    lines += ["95% CIs: percentile bootstrap over patients (exams without a patient id). pF1 raw: "
              "probabilistic F1 of the raw probabilities. RSNA pF1: breast level, predictions "
              "binarised at the threshold chosen on validation breasts (not reported without "
              "validation).", ""]
    loc = report.get("localisation")
    if loc:
        lo, hi = loc["pointing_accuracy_ci95"]
        lines += ["## heatmap localisation (view level)", "",
                  "Views with a positive cancer label and a marked malignant lesion: does the "
                  "heatmap peak (as the node reports it) fall in the lesion's box, grown by half "
                  "a heatmap cell?", "",
                  "| n | pointing accuracy [95% CI] | chance (random cell) |", "|---|---|---|",
                  f"| {loc['n']} | {_fmt(loc['pointing_accuracy'])} [{_fmt(lo)}, {_fmt(hi)}] | "
                  f"{_fmt(loc['chance'])} |", ""]
    for name, groups in report.get("subgroups", {}).items():
        lines += [f"## by {name} (view level)", "",
                  f"| {name} | task | n | positives | AUROC |", "|---|---|---|---|---|"]
        for value, tasks in groups.items():
            for task, m in tasks.items():
                lines.append(f"| {value} | {task} | {m['n']} | {m['positives']} | "
                             f"{_fmt(m['auroc'])} |")
        lines.append("")
    return "\n".join(lines)


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], path: str | Path,
             title: str = "ROC", size: int = 480) -> Path:
    """ROC curves {label: (fpr, tpr, auroc)} as a PNG (Pillow only)."""
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
              (140, 86, 75)]
    margin = 50
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    inner = size - 2 * margin

    def xy(fx: float, fy: float) -> tuple[float, float]:
        return margin + fx * inner, size - margin - fy * inner

    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    draw.line([xy(0, 0), xy(1, 1)], fill=(180, 180, 180))
    for tick in (0.0, 0.5, 1.0):
        draw.text((xy(tick, 0)[0] - 8, size - margin + 6), f"{tick:.1f}", fill="black")
        draw.text((margin - 30, xy(0, tick)[1] - 6), f"{tick:.1f}", fill="black")
    draw.text((size / 2 - 60, size - 22), "false positive rate", fill="black")
    draw.text((6, 10), f"{title}  (y: true positive rate)", fill="black")
    for i, (label, (fpr, tpr, auc)) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        draw.line([xy(float(a), float(b)) for a, b in zip(fpr, tpr, strict=True)], fill=color,
                  width=2)
        draw.text((margin + inner * 0.45, size - margin - 16 * (len(curves) - i) - 4),
                  f"{label}: AUROC {_fmt(auc)}", fill=color)
    path = Path(path)
    img.save(path)
    return path


def write_report(views: Sequence[Mapping[str, Any]], out_dir: str | Path, title: str,
                 n_boot: int = 1000, seed: int = 0,
                 validation: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """report.json, report.md, roc_<level>.png and predictions.jsonl in ``out_dir``;
    ``validation`` view rows choose the RSNA pF1 thresholds (see :func:`evaluate_rows`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = evaluate_rows(views, n_boot=n_boot, seed=seed, validation=validation)
    levels = aggregate_levels(views)
    for level, rows in levels.items():
        curves = {}
        for task in TASKS:
            y, s = _arrays(rows, task)
            if len(y) and 0 < y.sum() < len(y):
                fpr, tpr = roc_curve(y, s)
                curves[task] = (fpr, tpr, auroc(y, s))
        if curves:
            plot_roc(curves, out / f"roc_{level}.png", title=f"{title}: {level} level")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n",
                                     encoding="utf-8")
    (out / "report.md").write_text(report_markdown(report, title) + "\n", encoding="utf-8")
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as fh:
        for row in views:
            fh.write(json.dumps(dict(row), default=_json_default) + "\n")
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")
