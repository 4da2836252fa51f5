"""Metrics and reports: AUROC with bootstrap CIs, sensitivity at specificity, RSNA pF1, subgroups.

Breast and exam scores are aggregated with the node's own rule
(:func:`cadnode.runtime.scoring.aggregate`, the maximum over views), so the numbers here describe
what the node reports. ROC curves are drawn with Pillow (a core dependency), not matplotlib.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
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


def bootstrap_auroc(labels: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0,
                    alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUROC (resampling cases with replacement)."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        v = auroc(y[idx], s[idx])
        if not math.isnan(v):
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


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
    """View rows (exam_id, laterality, view, group keys, <task>, <task>_label) -> breast, exam.

    Scores use the node's rule (``cadnode.runtime.scoring.aggregate``); a breast's (exam's) label
    is positive when any of its views is. Views with unknown laterality count only for the exam.
    """
    by_exam: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in views:
        by_exam[str(row["exam_id"])].append(row)
    breasts: list[dict[str, Any]] = []
    exams: list[dict[str, Any]] = []
    for exam_id in sorted(by_exam):
        rows = by_exam[exam_id]
        scores: dict[str, dict[str, float | None]] = {}
        for i, row in enumerate(rows):
            side = row.get("laterality") or "L"  # unknown side still counts for the exam
            scores[f"{side}-{row.get('view') or 'X'}-{i}"] = {t: row[t] for t in TASKS}
        breast_scores, exam_scores = aggregate(scores)
        groups = {k: v for k, v in rows[0].items() if k.startswith("group_")}
        for side, values in breast_scores.items():
            members = [r for r in rows if r.get("laterality") == side]
            if not members:
                continue
            entry: dict[str, Any] = {"exam_id": exam_id, "laterality": side, **groups, **values}
            for t in TASKS:
                entry[f"{t}_label"] = _any_label(members, t)
            breasts.append(entry)
        entry = {"exam_id": exam_id, **groups, **exam_scores}
        for t in TASKS:
            entry[f"{t}_label"] = _any_label(rows, t)
        exams.append(entry)
    return {"view": [dict(v) for v in views], "breast": breasts, "exam": exams}


def _any_label(rows: Sequence[Mapping[str, Any]], task: str) -> int | None:
    known = [r[f"{task}_label"] for r in rows if r.get(f"{task}_label") is not None]
    return None if not known else int(any(known))


def task_metrics(labels: np.ndarray, scores: np.ndarray, n_boot: int = 1000,
                 seed: int = 0) -> dict[str, Any]:
    """All metrics of one task at one level."""
    lo, hi = bootstrap_auroc(labels, scores, n_boot=n_boot, seed=seed)
    return {
        "n": int(len(labels)), "positives": int(np.sum(labels)),
        "auroc": auroc(labels, scores), "auroc_ci95": [lo, hi],
        "sensitivity_at_specificity": {f"{sp:g}": sensitivity_at_specificity(labels, scores, sp)
                                       for sp in SPECIFICITIES},
        "pf1": probabilistic_f1(labels, scores),
    }


def _arrays(rows: Sequence[Mapping[str, Any]], task: str) -> tuple[np.ndarray, np.ndarray]:
    kept = [r for r in rows if r.get(f"{task}_label") is not None and r.get(task) is not None]
    return (np.array([int(r[f"{task}_label"]) for r in kept], dtype=np.int64),
            np.array([float(r[task]) for r in kept], dtype=np.float64))


def evaluate_rows(views: Sequence[Mapping[str, Any]], n_boot: int = 1000,
                  seed: int = 0) -> dict[str, Any]:
    """Metrics per level (view, breast, exam) and task, plus subgroups at the view level."""
    levels = aggregate_levels(views)
    report: dict[str, Any] = {"levels": {}, "subgroups": {}}
    for level, level_rows in levels.items():
        report["levels"][level] = {}
        for task in TASKS:
            y, s = _arrays(level_rows, task)
            if len(y):
                report["levels"][level][task] = task_metrics(y, s, n_boot=n_boot, seed=seed)
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
    """Pointing accuracy over views that carry ``heatmap_hit`` (positives with marked lesions)."""
    rows = [r for r in views if r.get("heatmap_hit") is not None]
    if not rows:
        return None
    hits = np.array([bool(r["heatmap_hit"]) for r in rows], dtype=np.float64)
    chance = float(np.mean([float(r["heatmap_chance"]) for r in rows]))
    rng = np.random.default_rng(seed)
    boots = hits[rng.integers(0, len(hits), size=(n_boot, len(hits)))].mean(1)
    lo, hi = (float(v) for v in np.percentile(boots, [2.5, 97.5]))
    return {"n": len(rows), "pointing_accuracy": float(hits.mean()),
            "pointing_accuracy_ci95": [lo, hi], "chance": chance}


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def report_markdown(report: Mapping[str, Any], title: str = "Evaluation") -> str:
    lines = [f"# {title}", ""]
    for level, tasks in report["levels"].items():
        lines += [f"## {level} level", "",
                  "| task | n | positives | AUROC [95% CI] | sens@spec 0.8 / 0.9 / 0.95 | pF1 |",
                  "|---|---|---|---|---|---|"]
        for task, m in tasks.items():
            sens = " / ".join(_fmt(m["sensitivity_at_specificity"][f"{sp:g}"])
                              for sp in SPECIFICITIES)
            lo, hi = m["auroc_ci95"]
            lines.append(f"| {task} | {m['n']} | {m['positives']} | {_fmt(m['auroc'])} "
                         f"[{_fmt(lo)}, {_fmt(hi)}] | {sens} | {_fmt(m['pf1'])} |")
        lines.append("")
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
                 n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """report.json, report.md, roc_<level>.png and predictions.jsonl in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = evaluate_rows(views, n_boot=n_boot, seed=seed)
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
