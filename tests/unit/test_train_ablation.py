"""`python -m train ablate` end to end on a tiny setting, then `export` of its fused run."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_torch_thread")]

from train.__main__ import main  # noqa: E402


def test_ablate_writes_one_table_then_export_loads_in_the_node(tmp_path) -> None:
    config = {
        "data": {"source": "synthetic", "n_exams": 12, "seed": 0, "split": [0.5, 0.25, 0.25],
                 "shape": [96, 48]},
        "train": {"model": "cadnode-tiny-256",
                  "model_overrides": {"input_size": [64, 32], "dim": 32, "heads": 2},
                  "epochs": 1, "batch_size": 8, "max_steps_per_epoch": 1, "progress": False,
                  "image_augment": {}},
        "ablate": {"image_sizes": [[96, 48]]},
        "eval": {"n_boot": 20},
    }
    path = tmp_path / "abl.json"
    path.write_text(json.dumps(config))
    code = main(["ablate", "--config", str(path), "--out", str(tmp_path / "abl")])
    assert code in (0, 3)  # 3: ran, but a tiny model does not pass the acceptance
    md = (tmp_path / "abl" / "ablation.md").read_text()
    trained = ("image-only", "text-only", "late-fusion", "fused", "image-only@96x48")
    for name in trained:
        assert f"| {name} |" in md
        assert (tmp_path / "abl" / name / "eval_test" / "report.json").exists()
    for name in ("late-fusion", "fused"):  # the text-shuffle control
        assert f"| {name}, text shuffled |" in md
        assert (tmp_path / "abl" / name / "eval_test-shuffled-text" / "report.json").exists()
    table = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert set(table["levels"]) == {*trained, "late-fusion, text shuffled",
                                    "fused, text shuffled"}
    assert set(table["verdict"]) == {"cancer", "calcification"}
    assert table["verdict"]["cancer"]["rule"] == ["image-only", "text-only", "late-fusion"]
    assert "fused_minus_fused, text shuffled" in table["verdict"]["cancer"]
    assert table["throughput"]["fused"]["views_per_s"] > 0
    resolution = torch.load(tmp_path / "abl" / "image-only@96x48" / "best.pt",
                            weights_only=False)
    assert tuple(resolution["model_config"]["input_size"]) == (96, 48)
    assert table["passed"] == (code == 0)
    # the variants really differ in what they read
    text_only = torch.load(tmp_path / "abl" / "text-only" / "best.pt", weights_only=False)
    assert not any(k.startswith("image.") for k in text_only["model"])

    # run again into the same folder: it resumes, nothing is trained twice
    stamps = {n: (tmp_path / "abl" / n / "best.pt").stat().st_mtime_ns for n in trained}
    assert main(["ablate", "--config", str(path), "--out", str(tmp_path / "abl")]) == code
    again = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert again["levels"] == table["levels"] and again["verdict"] == table["verdict"]
    assert stamps == {n: (tmp_path / "abl" / n / "best.pt").stat().st_mtime_ns for n in trained}

    pkg = tmp_path / "pkg"
    assert main(["export", "--run", str(tmp_path / "abl" / "fused"), "--out", str(pkg),
                 "--version", "0.0.1-test", "--demo"]) == 0
    from cadnode.runtime.onnx import OnnxEngine

    engine = OnnxEngine(pkg)
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["demo"] is True and "synthetic benchmark" in manifest["training"]
    assert manifest["input_size"] == [64, 32] and manifest["parity_max_abs_diff"] <= 1e-4
    # the package records the views it was trained on, as the node's domain check reads them
    assert manifest["domain"]["views"] > 0 and "training views" in manifest["domain"]["source"]
    assert engine.manifest.domain is not None and engine.manifest.domain.manufacturers
    assert engine is not None
