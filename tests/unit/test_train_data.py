"""The training dataset yields exactly what the serving code computes; splits and imbalance."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from cadnode.dicom.pixels import prepare_image  # noqa: E402
from cadnode.text.clinical import build_clinical_text  # noqa: E402
from train.data import (  # noqa: E402
    CachedItem,
    SampleDataset,
    TextAugment,
    make_tokenizer,
    patient_split,
    pos_weights,
    sample_text,
)
from train.synthetic import SyntheticConfig, generate  # noqa: E402

SAMPLES = list(generate(SyntheticConfig(n_exams=2, seed=5)))


def test_items_come_from_the_serving_code() -> None:
    tok = make_tokenizer(64)
    cache: dict[int, CachedItem] = {}
    ds = SampleDataset(SAMPLES, (64, 32), tok, cache=cache)
    item = ds[1]
    s = SAMPLES[1]
    expected = prepare_image(s.header, (64, 32), s.view.laterality,
                             pixels=s.image().astype(np.float32)).array
    assert item["image"].shape == (1, 64, 32) and str(item["image"].dtype) == "torch.float32"
    assert np.allclose(item["image"][0].numpy(), expected, atol=1e-3)  # float16 cache
    ids, mask = tok.encode(build_clinical_text(s.header, s.view))
    assert np.array_equal(item["input_ids"].numpy(), ids)
    assert np.array_equal(item["attention_mask"].numpy(), mask)
    assert item["targets"].tolist() == [float(s.cancer), float(s.calcification)]
    assert item["known"].tolist() == [1.0, 1.0]
    assert 1 in cache  # prepared once, reused


def test_dicom_path_input_matches_the_loader(tmp_path) -> None:
    from train.data import prepare_sample
    from train.synthetic import write_dataset

    write_dataset(SyntheticConfig(n_exams=1, seed=5), tmp_path)
    s = SAMPLES[0]
    path = next((tmp_path / "dicom").glob(f"*_{s.view.laterality}_{s.view.view}.dcm"))
    from dataclasses import replace

    from_file = prepare_sample(replace(s, image=path), (64, 32)).array
    assert np.allclose(from_file, prepare_sample(s, (64, 32)).array, atol=1e-6)


def test_field_dropout_changes_text_not_header() -> None:
    s = SAMPLES[0]
    rng = np.random.default_rng(0)
    text = sample_text(s, TextAugment(field_dropout=1.0), rng)
    assert "age unknown" in text and "implant unknown" in text
    assert "PatientAge" in s.header  # the sample's header is untouched
    assert sample_text(s) == build_clinical_text(s.header, s.view)
    with_sentence = sample_text(s, TextAugment(report_sentence=1.0), rng)
    assert with_sentence.startswith(build_clinical_text(s.header, s.view))
    assert len(with_sentence) > len(build_clinical_text(s.header, s.view))


def test_patient_split_and_pos_weight() -> None:
    samples = list(generate(SyntheticConfig(n_exams=40, seed=2)))
    split = patient_split(samples, (0.6, 0.2, 0.2), seed=0)
    owners = {}
    for name, idx in split.items():
        for i in idx:
            assert owners.setdefault(samples[i].patient_id, name) == name
    assert sum(len(v) for v in split.values()) == len(samples)
    assert all(split.values())
    pw = pos_weights(samples)
    pos = sum(s.cancer for s in samples)
    assert pw[0].item() == pytest.approx((len(samples) - pos) / pos)


def test_official_split_is_honoured_by_patient() -> None:
    from dataclasses import replace

    base = list(generate(SyntheticConfig(n_exams=30, seed=3)))
    patients = sorted({s.patient_id for s in base})
    test_ids = set(patients[:8])
    samples = [replace(s, official_split="test" if s.patient_id in test_ids else "train")
               for s in base]
    split = patient_split(samples, (0.6, 0.2, 0.2), seed=0)
    assert {samples[i].patient_id for i in split["test"]} == test_ids
    assert split["val"] and split["train"]
    val_ids = {samples[i].patient_id for i in split["val"]}
    assert not val_ids & test_ids and not val_ids & {samples[i].patient_id
                                                    for i in split["train"]}
    # a patient with one official test view goes to test whole (no patient on both sides)
    mixed = [replace(samples[0], official_split="test")] + samples[1:]
    moved = patient_split(mixed, (0.6, 0.2, 0.2), seed=0)
    assert {mixed[i].patient_id for i in moved["test"]} == test_ids | {samples[0].patient_id}
    ignored = patient_split(samples, (0.6, 0.2, 0.2), seed=0, official=False)
    assert ignored == patient_split(base, (0.6, 0.2, 0.2), seed=0)
