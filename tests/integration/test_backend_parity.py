"""Every backend that runs here gives torch fp32's per-view outputs on real and synthetic exams,
within 1e-4, and the worker writes the same SR values whichever backend it runs.

The package is exported here from one set of torch weights (the demo architecture at 512 x 256)
into both of its forms, ``model.onnx`` and ``model.pt2``: the committed demo package carries
no torch program (docs/architecture.md, "Model packages"). The reference is the torch module
itself, run eagerly in fp32 — not any of the engines under test.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from cadnode.jobs.inputs import ModelInputs, file_inputs  # noqa: E402
from cadnode.runtime import load_engine, read_manifest  # noqa: E402
from cadnode.text.tokenizer import ClinicalTokenizer  # noqa: E402

pytestmark = pytest.mark.torch

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, object]]:
    from cadnode.model.export import export_package
    from cadnode.model.factory import create_model

    torch.manual_seed(0)
    model = create_model("cadnode-effb0-cpu", input_size=(512, 256)).eval()
    with torch.no_grad():  # spread the heads so that scores differ from view to view
        for head in (model.heads.cancer, model.heads.calcification):
            head.weight.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("pkg")
    export_package(model, out, version="parity", demo=True,
                   training="random initialisation, for backend parity tests")
    yield out, model


@pytest.fixture(scope="module")
def exams(exported, demo_study, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelInputs]:
    from train.synthetic import SyntheticConfig, write_dataset

    package, _ = exported
    manifest = read_manifest(package)
    tok = ClinicalTokenizer.from_file(manifest.tokenizer_path)
    synthetic = tmp_path_factory.mktemp("synthetic")
    write_dataset(SyntheticConfig(n_exams=2, seed=5, shape=(512, 256)), synthetic)
    return {"real CBIS-DDSM exam": file_inputs(demo_study, manifest, tok),
            "synthetic exams": file_inputs(sorted((synthetic / "dicom").glob("*.dcm")),
                                           manifest, tok)}


def _reference(model, inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from cadnode.model.fused import ProbabilityWrapper

    with torch.no_grad():
        out = ProbabilityWrapper(model).eval()(torch.from_numpy(inputs.images),
                                               torch.from_numpy(inputs.input_ids),
                                               torch.from_numpy(inputs.attention_mask))
    return tuple(o.numpy() for o in out)  # type: ignore[return-value]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_backend_matches_torch_fp32_on_real_and_synthetic_exams(backend, exported, exams) -> None:  # type: ignore[no-untyped-def]
    package, model = exported
    engine = load_engine(package, backend, device="cpu")
    for label, inputs in exams.items():
        cancer, calc, heat = _reference(model, inputs)
        assert np.ptp(cancer) > 1e-3, "the weights must tell views apart for parity to mean much"
        out = engine.predict(inputs.images, inputs.input_ids, inputs.attention_mask)
        for name, got, ref in (("cancer", out.cancer, cancer),
                               ("calcification", out.calcification, calc),
                               ("heatmap", out.heatmap, heat)):
            worst = float(np.max(np.abs(got - ref)))
            assert worst <= TOLERANCE, f"{backend} {name} on {label}: {worst:.2g}"


def _sr_values(path: Path) -> list[tuple[str, str]]:
    """(concept, value) of every numeric and text item of an SR, in document order."""
    found: list[tuple[str, str]] = []

    def walk(items) -> None:  # type: ignore[no-untyped-def]
        for item in items:
            concept = item.get("ConceptNameCodeSequence")
            name = concept[0].CodeMeaning if concept else ""
            kind = item.get("ValueType")
            if kind == "NUM":
                found.append((name, str(item.MeasuredValueSequence[0].NumericValue)))
            elif kind == "TEXT":
                found.append((name, str(item.TextValue)))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(pydicom.dcmread(path).ContentSequence)
    return found


def test_the_worker_writes_the_same_sr_values_on_each_backend(exported, demo_study,  # type: ignore[no-untyped-def]
                                                               tmp_path) -> None:
    from cadnode.config import Settings
    from cadnode.jobs import admin, queue
    from cadnode.jobs.db import Database
    from cadnode.jobs.worker import Worker
    from tests.integration.test_worker import receive

    package, _ = exported
    study_uid = str(pydicom.dcmread(demo_study[0], stop_before_pixels=True).StudyInstanceUID)
    documents: dict[str, dict[str, list[tuple[str, str]]]] = {}
    scores: dict[str, dict] = {}
    for backend in ("onnxruntime", "torch"):
        (tmp_path / backend).mkdir()
        settings = Settings(home=tmp_path / backend, backend=backend, device="cpu",
                            model=str(package), decode_memory_mb=0)
        db = Database(settings.database_url)
        db.create_schema()
        try:
            receive(db, settings, demo_study)
            assert study_uid in queue.assemble_studies(db, 0, 0, now=time.time() + 1)
            worker = Worker(settings, db)
            assert worker.engine.backend == backend
            assert worker.run_once()
            (row,) = admin.list_studies(db)
            assert row["state"] == "done", row["job"]["error"]
            scores[backend] = row["job"]["scores"]["views"]
            documents[backend] = {
                str(ds.SOPClassUID): _sr_values(path)
                for path in sorted(settings.results_dir.rglob("*.dcm"))
                if (ds := pydicom.dcmread(path, stop_before_pixels=True)).Modality == "SR"}
            worker.close()
        finally:
            db.dispose()
    assert set(scores["torch"]) == set(scores["onnxruntime"]) == {"L-CC", "L-MLO", "R-CC",
                                                                  "R-MLO"}
    for view, values in scores["onnxruntime"].items():
        for name, value in values.items():
            assert abs(value - scores["torch"][view][name]) <= TOLERANCE, (view, name)
    numbers = [v for doc in documents["onnxruntime"].values() for v in doc if v[1][:1].isdigit()]
    assert len(documents["onnxruntime"]) == 2 and len(numbers) >= 8, documents
    assert documents["onnxruntime"] == documents["torch"]
