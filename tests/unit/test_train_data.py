"""The training dataset yields exactly what the serving code computes; splits and imbalance."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from cadnode.dicom.pixels import prepare_image  # noqa: E402
from cadnode.text.clinical import build_clinical_text  # noqa: E402
from train.data import (  # noqa: E402
    ImageAugment,
    ImageCache,
    SampleDataset,
    TextAugment,
    make_tokenizer,
    patient_split,
    pos_weights,
    sample_text,
    shuffled_text_sources,
)
from train.synthetic import SyntheticConfig, generate  # noqa: E402

SAMPLES = list(generate(SyntheticConfig(n_exams=2, seed=5, shape=(384, 192))))


def test_items_come_from_the_serving_code() -> None:
    tok = make_tokenizer(64)
    cache = ImageCache()
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
    assert set(cache.items) == {(((64, 32), ds.pipeline), 1)}  # prepared once, reused
    # the cached preparation maps back like a fresh one (what heatmap scoring reads)
    geometry = cache.items[(((64, 32), ds.pipeline), 1)].prepared
    fresh = prepare_image(s.header, (64, 32), s.view.laterality,
                          pixels=s.image().astype(np.float32))
    assert geometry.array is cache.items[(((64, 32), ds.pipeline), 1)].image
    assert (geometry.crop, geometry.flipped, geometry.original_shape) == (
        fresh.crop, fresh.flipped, fresh.original_shape)
    assert geometry.cell_centre(1, 0, (2, 1)) == fresh.cell_centre(1, 0, (2, 1))


def test_dicom_path_input_matches_the_loader(tmp_path) -> None:
    from train.data import prepare_sample
    from train.synthetic import write_dataset

    write_dataset(SyntheticConfig(n_exams=1, seed=5, shape=(384, 192)), tmp_path)
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


def test_one_read_prepares_every_registered_size() -> None:
    reads = []
    s = SAMPLES[2]
    from dataclasses import replace

    counted = replace(s, image=lambda: reads.append(1) or s.image())
    cache = ImageCache()
    small = SampleDataset([counted], (64, 32), make_tokenizer(64), cache=cache)
    large = SampleDataset([counted], (128, 64), make_tokenizer(64), cache=cache)
    cache.register(((128, 64), large.pipeline))
    assert small[0]["image"].shape == (1, 64, 32)
    assert large[0]["image"].shape == (1, 128, 64)
    assert len(reads) == 1  # the second size came from the same read


def test_image_augment_moves_boxes_with_the_pixels() -> None:
    image = np.zeros((128, 64), np.float32)
    image[30:40, 20:30] = 1.0  # a bright square and its box, as fractions of the input
    box = np.array([[20 / 64, 30 / 128, 30 / 64, 40 / 128]], np.float32)
    augment = ImageAugment(vflip=0.5, rotate_deg=8.0, scale=0.1, shift=0.05, gamma=0.0,
                           contrast=0.0, noise=0.0)
    flips = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        out, moved = augment(image, box, rng)
        assert out.shape == image.shape and 0.0 <= out.min() and out.max() <= 1.0
        u0, v0, u1, v1 = moved[0]
        rows, cols = np.nonzero(out > 0.5)
        # the square's pixels lie inside the moved box (one pixel of bilinear slack)
        assert (cols >= u0 * 64 - 1).all() and (cols <= u1 * 64 + 1).all()
        assert (rows >= v0 * 128 - 1).all() and (rows <= v1 * 128 + 1).all()
        flips += rows.mean() > 64
        assert cols.mean() < 32  # never flipped left-right: the chest wall stays on the left
    assert 0 < flips < 12  # vertical flips happen, not always
    photometric = ImageAugment(vflip=0.0, rotate_deg=0.0, scale=0.0, shift=0.0)
    out, moved = photometric(np.full((8, 8), 0.5, np.float32), box, np.random.default_rng(1))
    assert np.array_equal(moved, box) and not np.allclose(out, 0.5)


def test_shuffled_text_comes_from_the_same_view_of_another_patient() -> None:
    samples = list(generate(SyntheticConfig(n_exams=6, seed=3, shape=(64, 32))))
    sources = shuffled_text_sources(samples, seed=1)
    for i, j in enumerate(sources):
        assert samples[j].patient_id != samples[i].patient_id
        assert (samples[j].view.laterality, samples[j].view.view) == (
            samples[i].view.laterality, samples[i].view.view)
    assert len({samples[j].patient_id for j in sources}) == 6  # a permutation of patients
    ds = SampleDataset(samples, (64, 32), make_tokenizer(64), text_from=sources)
    ids, _ = make_tokenizer(64).encode(sample_text(samples[sources[0]]))
    assert np.array_equal(ds[0]["input_ids"].numpy(), ids)


def test_reorder_and_report_use_the_header_only() -> None:
    from cadnode.text.clinical import clinical_fields
    from train.data import header_report

    s = SAMPLES[0]
    levels = clinical_fields(s.header, s.view)
    reordered = sample_text(s, TextAugment(reorder=1.0), np.random.default_rng(3))
    assert reordered != build_clinical_text(s.header, s.view)
    # the same level sentences, the same (key value) pairs, another order inside each level
    assert [p.split(":")[0] for p in reordered.split(". ")] == [n for n, _ in levels]
    assert sorted(_words_of(reordered)) == sorted(_words_of(build_clinical_text(s.header,
                                                                               s.view)))
    reports = {header_report(levels, np.random.default_rng(i)) for i in range(40)}
    assert len(reports) > 5
    joined = " ".join(reports)
    age = dict(levels[0][1])["age"]  # the report says the text's own age band
    assert f"in her {age}" in joined
    # labels never leak: the same header with other labels gives the same sentences
    from dataclasses import replace

    flipped = replace(s, cancer=1 - s.cancer, calcification=1 - s.calcification)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    augment = TextAugment(report_sentence=1.0, reorder=0.5)
    assert sample_text(s, augment, rng_a) == sample_text(flipped, augment, rng_b)
    # a header without age or implant: the report does not invent them
    from pydicom import Dataset

    empty = clinical_fields(Dataset(), s.view)
    for i in range(20):
        text = header_report(empty, np.random.default_rng(i))
        assert "her" not in text and "implant" not in text


def _words_of(text: str) -> list[str]:
    return text.replace(".", " ").replace(":", " ").split()
