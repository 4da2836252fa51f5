"""Experiments from a config file: data -> split -> train -> evaluate; ablation; export.

A config is a JSON (or TOML) file with three sections::

    {"data":  {"source": "synthetic", "n_exams": 700, "seed": 0,
               "split": [0.6, 0.2, 0.2], "split_seed": 0},
     "train": {... TrainConfig fields ...},
     "eval":  {"n_boot": 1000, "split": "test"}}

``source`` other than ``synthetic`` is a dataset kind of ``train.datasets.load_dataset`` (rsna,
vindr, cbis-ddsm, embed, csv, dicom-folder) with ``root`` and the adapter's options. A dataset's
published train/test split (VinDr-Mammo, CBIS-DDSM) is used unless ``"official_split": false``. An
``export`` section ({out, version, demo})
exports the best checkpoint after training. The run folder keeps ``config.json``, so resume /
evaluate / export need only the folder.
"""

from __future__ import annotations

import json
import time
import tomllib
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cadnode.model.factory import create_model, get_config, tokenizer_for
from cadnode.model.fused import FusedVLM
from train.data import (
    ImageAugment,
    ImageCache,
    InputSpec,
    SampleDataset,
    TextAugment,
    input_spec,
    patient_split,
    prepare_sample,
    shuffled_text_sources,
)
from train.datasets.base import Sample
from train.evaluate import (
    TASKS,
    aggregate_levels,
    cluster_ids,
    heatmap_hit,
    paired_auroc_difference,
    write_report,
)
from train.loop import BEST, TrainConfig, dist_info, predict, train
from train.synthetic import BENCHMARK_VERSION, RULE, SyntheticConfig, generate

CONFIG_NAME = "config.json"
#: The ablation's models; "fused" is the co-attention model the others are compared with, and
#: "late-fusion" (the sum of an image-only and a text-only model's logits) its control.
VARIANTS: dict[str, dict[str, Any]] = {
    "image-only": {"use_image": True, "use_text": False},
    "text-only": {"use_image": False, "use_text": True},
    "late-fusion": {"use_image": True, "use_text": True, "fusion": "late"},
    "fused": {"use_image": True, "use_text": True, "fusion": "coattention"},
    # the pretrained text tower, frozen and lightly tuned (ablate.variants names them)
    "fused-minilm": {"use_image": True, "use_text": True, "fusion": "coattention",
                     "text_encoder": "all-MiniLM-L6-v2", "max_text_len": 96},
    "fused-minilm-top": {"use_image": True, "use_text": True, "fusion": "coattention",
                         "text_encoder": "all-MiniLM-L6-v2", "max_text_len": 96,
                         "text_tuning": "top"},
}
#: What ``ablate`` trains unless ``ablate.variants`` says otherwise.
DEFAULT_VARIANTS = ("image-only", "text-only", "late-fusion", "fused")
#: Evaluated again with the text of other patients (the text-shuffle control).
SHUFFLED = ("late-fusion", "fused")


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    for key in raw:
        if key not in ("data", "train", "eval", "export", "ablate"):
            raise ValueError(f"{path}: unknown section {key!r}")
    return raw


def load_samples(data: dict[str, Any]) -> list[Sample]:
    options = {k: v for k, v in data.items()
               if k not in ("source", "split", "split_seed", "official_split")}
    source = data.get("source", "synthetic")
    if source == "synthetic":
        known = {f.name for f in fields(SyntheticConfig)}
        if "shape" in options:
            options["shape"] = tuple(options["shape"])
        return list(generate(SyntheticConfig(**{k: v for k, v in options.items()
                                                if k in known})))
    from train.datasets import load_dataset

    if "root" not in options:
        raise ValueError(f"data source {source!r} needs a 'root'")
    root = options.pop("root")
    return list(load_dataset(source, Path(root), **options))


def data_summary(data: dict[str, Any], samples: list[Sample], split: dict[str, list[int]]) -> str:
    sizes = ", ".join(f"{k} {len(v)}" for k, v in split.items())
    if data.get("source", "synthetic") == "synthetic":
        return (f"synthetic benchmark v{BENCHMARK_VERSION} (train/synthetic.py, seed "
                f"{data.get('seed', 0)}, {len(samples)} views; {sizes} views by patient); "
                f"labels: {RULE}")
    official = data.get("official_split", True) and any(s.official_split for s in samples)
    rule = "test = the dataset's official test split, val from its training part" if official \
        else "by patient"
    return f"{data.get('source')} ({len(samples)} views; {sizes} views; {rule})"


class Experiment:
    """Samples, the patient split and datasets of one config (images cached once)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.data = dict(config.get("data", {"source": "synthetic"}))
        self.samples = load_samples(self.data)
        self.split = patient_split(self.samples, self.data.get("split", (0.7, 0.15, 0.15)),
                                   self.data.get("split_seed", 0),
                                   official=bool(self.data.get("official_split", True)))
        self.cache = ImageCache()
        self.summary = data_summary(self.data, self.samples, self.split)

    def train_config(self, **model_overrides: Any) -> TrainConfig:
        cfg = TrainConfig.from_dict(dict(self.config.get("train", {})))
        cfg.model_overrides = {**cfg.model_overrides, **model_overrides}
        return cfg

    def dataset(self, name: str, cfg: TrainConfig, train: bool = False,
                shuffle_text: bool = False) -> SampleDataset:
        """The split ``name`` as ``cfg``'s model reads it; ``shuffle_text``: every view reads
        the text of the same view of another patient (the text-shuffle control)."""
        model = get_config(cfg.model, **dict(cfg.model_overrides))
        idx = self.split[name]
        samples = [self.samples[i] for i in idx]
        augment = TextAugment(cfg.field_dropout, cfg.report_sentence, cfg.text_reorder) \
            if train else None
        images = ImageAugment(**cfg.image_augment) if train and cfg.image_augment is not None \
            else None
        text_from = shuffled_text_sources(samples, seed=cfg.seed) if shuffle_text else None
        return SampleDataset(samples, model.input_size, tokenizer_for(model),
                             augment=augment, seed=cfg.seed, cache=self.cache, keys=idx,
                             image_augment=images, text_from=text_from,
                             pipeline=model.pixel_pipeline)

    def rows(self, name: str, probs: dict[str, np.ndarray],
             spec: InputSpec | None = None) -> list[dict[str, Any]]:
        """One row per view; with heatmaps in ``probs`` (model input ``spec``), positives with
        marked malignant lesions also get the pointing-game result (``heatmap_hit``)."""
        rows = []
        for j, i in enumerate(self.split[name]):
            s = self.samples[i]
            row: dict[str, Any] = {"exam_id": s.exam_id, "patient_id": s.patient_id,
                                   "laterality": s.view.laterality, "view": s.view.view}
            row.update({f"group_{k}": v for k, v in s.groups.items()})
            for t in TASKS:
                row[t] = float(probs[t][j])
                row[f"{t}_label"] = getattr(s, t)
            boxes = [lesion.box for lesion in s.lesions if lesion.malignant]
            if "heatmap" in probs and spec is not None and s.cancer == 1 and boxes:
                prepared = self.cache.get(i, s, spec).prepared
                hit, chance = heatmap_hit(probs["heatmap"][j], prepared, boxes)
                row["heatmap_hit"], row["heatmap_chance"] = hit, round(chance, 4)
            rows.append(row)
        return rows


def run_train(config: dict[str, Any], out: str | Path, resume: bool = False,
              experiment: Experiment | None = None, stop_after_epoch: int | None = None,
              **model_overrides: Any) -> dict[str, Any]:
    """Train one model into ``out`` and evaluate its best checkpoint on the eval split."""
    out = Path(out)
    exp = experiment or Experiment(config)
    cfg = exp.train_config(**model_overrides)
    rank, _ = dist_info()
    if rank == 0 and not resume:
        out.mkdir(parents=True, exist_ok=True)
        saved = {**config, "train": asdict(cfg)}
        (out / CONFIG_NAME).write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
    t0 = time.time()
    result = train(cfg, exp.dataset("train", cfg, train=True), exp.dataset("val", cfg), out,
                   resume=resume, stop_after_epoch=stop_after_epoch, summary=exp.summary)
    result["train_seconds"] = time.time() - t0
    state = result["state"]
    done = state["stopped_early"] or state["epoch"] >= cfg.epochs
    if rank == 0 and done:
        result["report"] = evaluate_run(out, experiment=exp)
        if config.get("export"):
            result["package"] = export_run(out, **config["export"],
                                           domain=training_domain(exp, cfg))
    return result


#: Training views summarised into a package's domain (spread evenly over the training split).
DOMAIN_VIEWS = 400


def training_domain(exp: Experiment, cfg: TrainConfig) -> dict[str, Any]:
    """The manifest's ``domain`` (cadnode.jobs.domain): headers and prepared images of up to
    DOMAIN_VIEWS training views, at the model's input size, as the model saw them."""
    from cadnode.jobs.domain import domain_from_views

    model = get_config(cfg.model, **dict(cfg.model_overrides))
    idx = exp.split["train"]
    chosen = [exp.samples[i] for i in idx[::max(1, len(idx) // DOMAIN_VIEWS)][:DOMAIN_VIEWS]]
    prepared = [prepare_sample(s, model.input_size, model.pixel_pipeline) for s in chosen]
    source = f"{len(chosen)} of the {len(idx)} training views of {exp.summary}"
    return domain_from_views([s.header for s in chosen], prepared, source).as_json()


def export_run(run: str | Path, out: str | Path, version: str = "0.1.0", demo: bool = True,
               checkpoint: str = BEST, domain: dict[str, Any] | None = None,
               torch_program: bool = True) -> dict[str, Any]:
    """Model package of a run's checkpoint; the manifest says what it was trained on, and
    (``domain``, default: made again from the run's saved config) the views it was trained on."""
    from cadnode.model.export import export_package

    model, blob = load_run_model(run, checkpoint)
    training = str(blob.get("training_summary") or f"trained weights from {run}")
    if blob.get("epoch"):
        training += f"; checkpoint of epoch {blob['epoch']}"
    if domain is None:
        config = load_config(Path(run) / CONFIG_NAME)
        exp = Experiment(config)
        domain = training_domain(exp, exp.train_config())
    return export_package(model, out, version=version, demo=demo, training=training,
                          domain=domain, torch_program=torch_program)


def load_run_model(run: str | Path, checkpoint: str = BEST) -> tuple[FusedVLM,
                                                                   dict[str, Any]]:
    blob = torch.load(Path(run) / checkpoint, map_location="cpu", weights_only=False)
    cfg = TrainConfig.from_dict(blob["config"])
    model = create_model(cfg.model, **dict(cfg.model_overrides))
    model.load_state_dict(blob["model"])
    return model.eval(), blob


def evaluate_run(run: str | Path, experiment: Experiment | None = None, split: str | None = None,
                 checkpoint: str = BEST, shuffle_text: bool = False) -> dict[str, Any]:
    """Report (JSON, Markdown, ROC PNGs) of a run's checkpoint on a split, in run/eval_<split>
    (``shuffle_text``: with every view reading another patient's text, in
    run/eval_<split>-shuffled-text)."""
    run = Path(run)
    config = json.loads((run / CONFIG_NAME).read_text(encoding="utf-8"))
    exp = experiment or Experiment(config)
    ev = config.get("eval", {})
    split = split or ev.get("split", "test")
    model, blob = load_run_model(run, checkpoint)
    cfg = TrainConfig.from_dict(blob["config"])
    dataset = exp.dataset(split, cfg, shuffle_text=shuffle_text)
    probs = predict(model, dataset, heatmaps=model.cfg.use_image)
    validation = None
    if split != "val" and exp.split["val"]:  # the RSNA pF1 threshold is chosen on validation
        validation = exp.rows("val", predict(model, exp.dataset("val", cfg), heatmaps=False))
    name = eval_folder(split, shuffle_text)
    title = f"{run.name} on {split}" + (", text shuffled across patients" if shuffle_text else "")
    report = write_report(exp.rows(split, probs, (dataset.size, dataset.pipeline)), run / name,
                          title=title,
                          n_boot=int(ev.get("n_boot", 1000)), seed=int(ev.get("seed", 0)),
                          validation=validation)
    report["checkpoint_epoch"] = blob.get("epoch")
    return report


def eval_folder(split: str, shuffle_text: bool = False) -> str:
    return f"eval_{split}" + ("-shuffled-text" if shuffle_text else "")


def _cell(m: dict[str, Any]) -> str:
    lo, hi = m["auroc_ci95"]
    return f"{m['auroc']:.3f} [{lo:.3f}, {hi:.3f}]"


def _pointing(report: dict[str, Any]) -> str:
    loc = report.get("localisation")
    return "n/a" if not loc else f"{loc['pointing_accuracy']:.3f} ({loc['chance']:.3f})"


def load_predictions(run: str | Path, split: str = "test",
                     shuffle_text: bool = False) -> list[dict[str, Any]]:
    """The view rows a run's evaluation wrote (``eval_<split>/predictions.jsonl``)."""
    path = Path(run) / eval_folder(split, shuffle_text) / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def ablation_verdict(rows: dict[str, list[dict[str, Any]]], level: str = "view",
                     n_boot: int = 1000, seed: int = 0,
                     rule: tuple[str, ...] | None = None) -> dict[str, dict[str, Any]]:
    """Per task: fused minus every other model, AUROC difference with a paired bootstrap CI
    over patients (both models scored on the same resampled patients each draw). ``pass``: the
    CI of every difference with a model in ``rule`` (default: all) lies above 0. ``rows`` are
    each model's view rows of the same split."""
    levels = {name: aggregate_levels(r)[level] for name, r in rows.items()}
    fused = levels["fused"]
    rule = tuple(n for n in levels if n != "fused") if rule is None else rule
    verdict: dict[str, dict[str, Any]] = {}
    for t in TASKS:
        keep = [i for i, r in enumerate(fused)
                if r.get(f"{t}_label") is not None and r.get(t) is not None]
        y = np.array([int(fused[i][f"{t}_label"]) for i in keep])
        clusters = cluster_ids([fused[i] for i in keep])
        entry: dict[str, Any] = {}
        for name, other in levels.items():
            if name == "fused":
                continue
            if [(r["exam_id"], r.get("laterality"), r.get(f"{t}_label")) for r in other] != [
                    (r["exam_id"], r.get("laterality"), r.get(f"{t}_label")) for r in fused]:
                raise ValueError(f"{name} and fused were not evaluated on the same {level}s")
            entry[f"fused_minus_{name}"] = paired_auroc_difference(
                y, np.array([float(fused[i][t]) for i in keep]),
                np.array([float(other[i][t]) for i in keep]), clusters, n_boot=n_boot, seed=seed)
        entry["pass"] = all(entry[f"fused_minus_{n}"]["ci95"][0] > 0 for n in rule)
        entry["rule"] = list(rule)
        verdict[t] = entry
    return verdict


def _verdict_line(task: str, entry: dict[str, Any]) -> str:
    parts = [f"{k.removeprefix('fused_minus_')} {d['difference']:+.3f} "
             f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
             for k, d in entry.items() if k.startswith("fused_minus_")]
    return f"- {task}: {'PASS' if entry['pass'] else 'not shown'}; fused minus " + \
        "; ".join(parts)


def ablation_models(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Name -> model overrides of every model the ablation trains: ``VARIANTS`` (or the
    ``ablate.variants`` subset) at the config's size, and image-only at each
    ``ablate.image_sizes`` (the resolution control: the same views read at other sizes)."""
    section = config.get("ablate", {})
    unknown = sorted(set(section) - {"variants", "image_sizes", "shuffle_text"})
    if unknown:
        raise ValueError(f"unknown ablate option(s): {unknown}")
    names = section.get("variants", list(DEFAULT_VARIANTS))
    bad = sorted(set(names) - set(VARIANTS))
    if bad or "fused" not in names:
        raise ValueError(f"ablate.variants must name 'fused' and known variants {list(VARIANTS)}")
    models = {name: dict(VARIANTS[name]) for name in names}
    for h, w in section.get("image_sizes", []):
        models[f"image-only@{h}x{w}"] = {**VARIANTS["image-only"], "input_size": (h, w)}
    return models


def _throughput(history: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """Median training views/s over the epochs after the first (which also decodes or renders
    every image), and the run's peak memory (MB)."""
    later = [e["views_per_s"] for e in history[1:] if "views_per_s" in e] or \
        [e["views_per_s"] for e in history if "views_per_s" in e]
    peak = max((e.get("peak_memory_mb", 0.0) for e in history), default=None)
    return (float(np.median(later)) if later else None), peak


def finished_run(config: dict[str, Any], folder: Path, cfg: TrainConfig,
                 split: str) -> dict[str, Any] | None:
    """A model an earlier (interrupted) ablation already trained and evaluated in ``folder``
    with the same data and training settings (``progress`` aside), as run_train returns it;
    None when there is none, so it is trained."""
    paths = [folder / CONFIG_NAME, folder / "history.json",
             folder / eval_folder(split) / "report.json"]
    if not all(p.is_file() for p in paths):
        return None
    saved, state, report = (json.loads(p.read_text(encoding="utf-8")) for p in paths)

    def settings(train: dict[str, Any]) -> str:
        return json.dumps({k: v for k, v in train.items() if k != "progress"}, sort_keys=True)

    if saved.get("data") != config.get("data") or settings(saved["train"]) != settings(
            json.loads(json.dumps(asdict(cfg)))):
        return None
    if not (state["stopped_early"] or state["epoch"] >= cfg.epochs):
        return None
    return {"report": report, "state": state, "reused": True,
            "train_seconds": sum(e["seconds"] for e in state["history"])}


def run_ablation(config: dict[str, Any], out: str | Path) -> dict[str, Any]:
    """Train the ablation's models on one split; one table (JSON + Markdown) with the
    text-shuffle and resolution controls and the paired verdict. Run again into the same
    folder, it resumes: a model already trained and evaluated there with the same settings is
    read back, not trained again."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    exp = Experiment(config)
    models = ablation_models(config)
    configs = {name: exp.train_config(**overrides) for name, overrides in models.items()}
    for cfg in configs.values():  # every size is prepared on each view's first read
        model = get_config(cfg.model, **dict(cfg.model_overrides))
        exp.cache.register(input_spec(model.input_size, model.pixel_pipeline))
    shuffle = bool(config.get("ablate", {}).get("shuffle_text", True))
    if len({exp.samples[i].patient_id for i in exp.split[config.get("eval", {}).get(
            "split", "test")]}) < 2:
        shuffle = False  # nobody to swap texts with (a toy split)
    reports: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    speed: dict[str, tuple[float | None, float | None]] = {}
    ev = config.get("eval", {})
    split = ev.get("split", "test")
    predictions: dict[str, list[dict[str, Any]]] = {}
    for name, overrides in models.items():
        res = finished_run(config, out / name, configs[name], split) or \
            run_train(config, out / name, experiment=exp, **overrides)
        reports[name] = res["report"]
        seconds[name] = round(res["train_seconds"], 1)
        speed[name] = _throughput(res["state"]["history"])
        predictions[name] = load_predictions(out / name, split)
        if shuffle and name in SHUFFLED:
            shuffled = f"{name}, text shuffled"
            done = out / name / eval_folder(split, True) / "report.json"
            reports[shuffled] = json.loads(done.read_text(encoding="utf-8")) \
                if res.get("reused") and done.is_file() else \
                evaluate_run(out / name, experiment=exp, split=split, shuffle_text=True)
            predictions[shuffled] = load_predictions(out / name, split, shuffle_text=True)
    total = round(time.time() - t0, 1)
    rule = tuple(n for n in ("image-only", "text-only", "late-fusion") if n in models)
    verdict = ablation_verdict(predictions, n_boot=int(ev.get("n_boot", 1000)),
                               seed=int(ev.get("seed", 0)), rule=rule)
    levels: dict[str, Any] = {}
    table = {"levels": levels, "train_seconds": seconds, "total_seconds": total,
             "throughput": {n: {"views_per_s": v, "peak_memory_mb": m}
                            for n, (v, m) in speed.items()},
             "verdict": verdict, "data": exp.summary, "config": config,
             "localisation": {n: r.get("localisation") for n, r in reports.items()},
             "passed": all(v["pass"] for v in verdict.values())}
    lines = ["| model | cancer AUROC [95% CI] | calcification AUROC [95% CI] | "
             "cancer sens@spec0.9 | calc. sens@spec0.9 | cancer pF1 raw | heatmap pointing "
             "(chance) | train s | views/s | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rep in reports.items():
        view = rep["levels"]["view"]
        levels[name] = {lvl: {t: {k: m[k] for k in ("auroc", "auroc_ci95", "pf1_raw",
                                                     "sensitivity_at_specificity")}
                              for t, m in rep["levels"][lvl].items()}
                        for lvl in rep["levels"]}
        rate, peak = speed.get(name, (None, None))
        lines.append(f"| {name} | {_cell(view['cancer'])} | {_cell(view['calcification'])} | "
                     f"{view['cancer']['sensitivity_at_specificity']['0.9']:.3f} | "
                     f"{view['calcification']['sensitivity_at_specificity']['0.9']:.3f} | "
                     f"{view['cancer']['pf1_raw']:.3f} | {_pointing(rep)} | "
                     f"{seconds.get(name, 0.0):.0f} | {'' if rate is None else f'{rate:.1f}'} | "
                     f"{'' if peak is None else f'{peak:.0f}'} |")
    breast = ["", "Breast level (max over the breast's views, `cadnode.runtime.scoring`):", "",
              "| model | cancer AUROC [95% CI] | calcification AUROC [95% CI] |", "|---|---|---|"]
    for name, rep in reports.items():
        b = rep["levels"]["breast"]
        breast.append(f"| {name} | {_cell(b['cancer'])} | {_cell(b['calcification'])} |")
    verdict_lines = ["", f"Total wall time {total:.0f} s. Acceptance (view level): the AUROC "
                         "difference fused (co-attention) minus each of "
                         f"{', '.join(rule)}, with a paired bootstrap 95% CI over patients, "
                         "lies above 0 (the other differences are reported, not required):",
                     "", *(_verdict_line(t, v) for t, v in verdict.items()), "",
                     f"Data: {exp.summary}"]
    md = "\n".join(["# Ablation", "", "View level, test split:", "", *lines, *breast,
                    *verdict_lines]) + "\n"
    (out / "ablation.md").write_text(md, encoding="utf-8")
    (out / "ablation.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    table["markdown"] = md
    return table
