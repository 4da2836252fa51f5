"""Decode a mammogram and prepare it for the model: LUTs, polarity, orientation, crop, resize.

Training and serving both call :func:`prepare_image`, so the model sees the same pixels in both.

Orientation (chest wall on the left of the model input) is decided, in this order, by:

1. ``PatientOrientation`` row direction: "A" means the image runs towards anterior from left to
   right, so the chest wall (posterior) is on the left; "P" means it is on the right. This describes
   how the pixels are actually stored, whatever the side.
2. ``laterality``: in the standard display a right breast's chest wall is on the image's right.
   All nine real test images (eight CBIS-DDSM film scans, one NEMA digital MLO) follow this.
3. the image itself: the half holding more breast tissue is the chest-wall half.

Header information wins over the image because the image test can be fooled (film labels,
implants, small breasts); it decides only when the header is silent.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import tempfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from pydicom import uid as dcm_uid
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, generate_frames
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder

from cadnode.dicom.enum import NEWEST_PIXEL_PIPELINE, PixelPipeline
from cadnode.dicom.views import chest_wall_on_right, orientation_directions

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "PixelDecodeError",
    "PreparedImage",
    "decode_pixels",
    "heatmap_to_original",
    "prepare_image",
]

log = logging.getLogger(__name__)

#: Rows * Columns above which a file is refused before decoding (decompression-bomb guard).
DEFAULT_MAX_PIXELS = 100_000_000
#: Longest side of :attr:`PreparedImage.display`.
DISPLAY_MAX_SIDE = 1024
_MASK_SIDE = 128  # grid on which the breast mask and its largest component are found
_STATS_SIDE = 512  # grid on which percentiles are taken
_ERODE = 2  # erosion steps on the mask grid before taking the largest component
#: PixelPipeline.PAD_KNEE: the 99.5th percentile maps here; brighter values approach 1.
KNEE = 0.8
#: ``prepare_image(reduce_j2k=True)``: a JPEG 2000 image is decoded at resolution level N (each
#: side halved N times) only while the reduced image stays at least this many times the model
#: input on both sides. The breast crop is 0.57-0.83 of the rows and 0.45-0.65 of the columns on
#: the demo exam, so at 2x the crop still has more than one decoded pixel per model pixel.
REDUCE_MARGIN = 2.0
#: Deepest resolution level tried (a codestream has at least this many decompositions in
#: practice; a shallower one is decoded at full resolution).
REDUCE_MAX_LEVEL = 3
_REDUCIBLE = frozenset({dcm_uid.JPEG2000Lossless, dcm_uid.JPEG2000})


#: pydicom decoding plugins tried first, fastest first, by transfer syntax (16-bit mammograms,
#: ``tests/bench/bench_decode.py``; figures in docs/performance.md): GDCM decodes JPEG lossless
#: and JPEG 2000 1.5-1.7x faster than pylibjpeg, pyjpegls JPEG-LS 2-5x faster than the others;
#: pylibjpeg's RLE is 6x pydicom's. Where one refuses an image (GDCM's plugin and 12-bit lossy
#: JPEG), the next is tried.
PREFERRED_PLUGINS: dict[dcm_uid.UID, tuple[str, ...]] = {
    dcm_uid.RLELossless: ("pylibjpeg",),
    dcm_uid.JPEGLosslessSV1: ("gdcm", "pylibjpeg"),
    dcm_uid.JPEGLossless: ("gdcm", "pylibjpeg"),
    dcm_uid.JPEGLSLossless: ("pyjpegls", "gdcm"),
    dcm_uid.JPEGLSNearLossless: ("pyjpegls", "gdcm"),
    dcm_uid.JPEG2000Lossless: ("gdcm", "pylibjpeg"),
    dcm_uid.JPEG2000: ("gdcm", "pylibjpeg"),
}


class PixelDecodeError(Exception):
    """The pixel data cannot (or must not) be decoded; the message names the transfer syntax.

    ``summary`` is one line for a report reader; the message may carry every decoder's error.
    """

    def __init__(self, message: str, summary: str | None = None) -> None:
        super().__init__(message)
        self.summary = summary or message.splitlines()[0][:200]

    def __reduce__(self) -> tuple[type[PixelDecodeError], tuple[str, str]]:
        return (PixelDecodeError, (str(self), self.summary))  # keeps the summary across processes


@dataclass(frozen=True)
class PreparedImage:
    """Model input and everything needed to map model outputs back onto the source image."""

    array: np.ndarray  # float32 (H, W) in [0, 1], model input size, chest wall on the left
    original_shape: tuple[int, int]  # (rows, columns) of the source image
    flipped: bool  # mirrored left-right to put the chest wall on the left
    crop: tuple[int, int, int, int]  # (row0, col0, row1, col1) on the original grid; may reach
    # past the image (PixelPipeline.PAD_KNEE pads it to the input aspect ratio)
    display: np.ndarray = field(repr=False)  # uint8 (h, w) whole image, original orientation
    #: JPEG 2000 resolution level the pixels were decoded at (0: full resolution; N: each side
    #: halved N times). Every coordinate above is on the full-resolution grid whatever it is.
    resolution_level: int = 0

    def to_original(self, x: float, y: float) -> tuple[float, float]:
        """Model-grid point (column x, row y; pixel centres) -> original grid (column, row)."""
        h, w = self.array.shape
        r0, c0, r1, c1 = self.crop
        cw, ch = c1 - c0, r1 - r0
        xc = (x + 0.5) * cw / w - 0.5
        yc = (y + 0.5) * ch / h - 0.5
        if self.flipped:
            xc = cw - 1 - xc
        return c0 + xc, r0 + yc

    def cell_centre(self, row: int, col: int, grid: tuple[int, int]) -> tuple[float, float]:
        """Centre of cell (row, col) of a coarse ``grid`` (h, w) over the model input, on the
        original grid (column, row): where a heatmap cell lies in the source image."""
        h, w = self.array.shape
        return self.to_original((col + 0.5) * w / grid[1] - 0.5, (row + 0.5) * h / grid[0] - 0.5)

    def to_model(self, x: float, y: float) -> tuple[float, float]:
        """Original-grid point (column, row) -> model grid (the inverse of :meth:`to_original`)."""
        h, w = self.array.shape
        r0, c0, r1, c1 = self.crop
        cw, ch = c1 - c0, r1 - r0
        xc, yc = x - c0, y - r0
        if self.flipped:
            xc = cw - 1 - xc
        return (xc + 0.5) * w / cw - 0.5, (yc + 0.5) * h / ch - 0.5


def _ts_name(ds: Dataset) -> str:
    try:
        ts = dcm_uid.UID(str(ds.file_meta.TransferSyntaxUID))
    except Exception:  # noqa: BLE001
        return "unknown transfer syntax"
    return f"{ts.name} ({ts})" if ts.name != ts else str(ts)


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    try:
        value = getattr(ds, keyword, None)
        return int(value) if value is not None and value != "" else default
    except Exception:  # noqa: BLE001
        return default


def _decode_with_pydicom(ds: Dataset, index: int | None) -> np.ndarray:
    """Decode with pydicom's plugins: the fastest for the transfer syntax first
    (:data:`PREFERRED_PLUGINS`), then any that will."""
    ts = ds.file_meta.TransferSyntaxUID
    decoder = get_decoder(ts)
    errors: list[str] = []
    plugins = list(decoder.available_plugins)
    preferred = PREFERRED_PLUGINS.get(dcm_uid.UID(str(ts)), ())
    order = [p for p in preferred if p in plugins and len(plugins) > 1] + [""]
    for plugin in order:
        try:
            arr, _ = decoder.as_array(ds, index=index, decoding_plugin=plugin)
            return arr
        except Exception as exc:  # noqa: BLE001 - try the next plugin, report all
            errors.append(f"{plugin or 'any plugin'}: {exc}")
    raise RuntimeError("; ".join(errors))


def _decode_with_gdcm(ds: Dataset) -> np.ndarray:
    """Decode through GDCM's own reader: it handles 12-bit lossy JPEG that pydicom's GDCM
    plugin refuses up front. First frame only."""
    import gdcm  # python-gdcm; imported lazily, only this rare path needs it

    path = getattr(ds, "filename", None)
    tmp: str | None = None
    if not (isinstance(path, str) and os.path.isfile(path)):
        fd, tmp = tempfile.mkstemp(suffix=".dcm")
        os.close(fd)
        ds.save_as(tmp, enforce_file_format=True)
        path = tmp
    try:
        reader = gdcm.ImageReader()
        reader.SetFileName(path)
        if not reader.Read():
            raise RuntimeError("GDCM could not read the file")
        image = reader.GetImage()
        buf = image.GetBuffer()
        if not buf:
            raise RuntimeError("GDCM returned no pixel data")
        data = buf.encode("utf-8", "surrogateescape") if isinstance(buf, str) else bytes(buf)
    finally:
        if tmp is not None:
            os.unlink(tmp)
    rows, cols = _int(ds, "Rows", 0) or 0, _int(ds, "Columns", 0) or 0
    spp = _int(ds, "SamplesPerPixel", 1) or 1
    bits = _int(ds, "BitsAllocated", 16) or 16
    signed = _int(ds, "PixelRepresentation", 0) == 1
    dtype = np.dtype(f"{'i' if signed else 'u'}{max(1, bits // 8)}").newbyteorder("<")
    n = rows * cols * spp
    if len(data) < n * dtype.itemsize or n == 0:
        raise RuntimeError(f"GDCM returned {len(data)} bytes, expected {n * dtype.itemsize}")
    arr = np.frombuffer(data, dtype=dtype, count=n)
    return arr.reshape((rows, cols, spp) if spp > 1 else (rows, cols))


def _check_native_length(ds: Dataset, pixels: int, frames: int, ts_name: str) -> None:
    """Native Pixel Data shorter than Rows x Columns x Samples x Bits x Frames says is corrupt
    (pydicom would pad it with zeros and decode a partly blank image)."""
    try:
        ts = dcm_uid.UID(str(ds.file_meta.TransferSyntaxUID))
        if ts.is_compressed:
            return
        have = len(ds.PixelData)
    except Exception:  # noqa: BLE001 - no usable transfer syntax: the decoder will say so
        return
    spp = _int(ds, "SamplesPerPixel", 1) or 1
    bits = _int(ds, "BitsAllocated", 16) or 16
    need = (pixels * spp * frames * bits + 7) // 8
    if have < need:
        raise PixelDecodeError(
            f"Pixel Data holds {have} bytes but Rows x Columns x {spp} sample(s) x {bits} bits "
            f"x {frames} frame(s) needs {need} ({ts_name})"
        )


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                          0xCF, 0xF7})  # JPEG (baseline ... lossless) and JPEG-LS (SOF55)


def codestream_size(fragment: bytes) -> tuple[int, int] | None:
    """(rows, columns) that a JPEG 2000, JPEG or JPEG-LS codestream declares in its own header
    (SIZ or SOF marker), read without decoding; None when the fragment starts no such stream."""
    if fragment[:4] == b"\xff\x4f\xff\x51" and len(fragment) >= 24:  # SOC then SIZ
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", fragment[8:24])
        return ysiz - yosiz, xsiz - xosiz
    if fragment[:2] != b"\xff\xd8":  # SOI
        return None
    pos = 2
    while pos + 4 <= len(fragment):
        if fragment[pos] != 0xFF:
            return None
        marker = fragment[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length field
            pos += 2
            continue
        length = struct.unpack(">H", fragment[pos + 2:pos + 4])[0]
        if marker in _SOF_MARKERS and pos + 9 <= len(fragment):
            rows, cols = struct.unpack(">HH", fragment[pos + 5:pos + 9])
            return None if rows == 0 else (rows, cols)  # 0: height given later (DNL marker)
        pos += 2 + length
    return None


def _check_codestream(ds: Dataset, rows: int, cols: int, max_pixels: int, ts_name: str) -> None:
    """A compressed frame must declare the size the header does, and at most ``max_pixels``:
    a 1.8 KB JPEG 2000 file whose SIZ says 16384 x 16384 is refused before it is decoded."""
    try:
        if not dcm_uid.UID(str(ds.file_meta.TransferSyntaxUID)).is_encapsulated:
            return
        items = generate_fragments(ds.PixelData)
        next(items, b"")  # the Basic Offset Table item
        first = next(items, b"")
    except Exception:  # noqa: BLE001 - no usable fragment: the decoder will say why
        return
    size = codestream_size(bytes(first))
    if size is None:
        return
    if size[0] * size[1] > max_pixels or size != (rows, cols):
        raise PixelDecodeError(
            f"the codestream declares {size[0]}x{size[1]} pixels, the header {rows}x{cols} "
            f"(limit {max_pixels} pixels); refused before decoding ({ts_name})",
            f"the compressed image's own size ({size[0]}x{size[1]}) does not match its header "
            f"({rows}x{cols}); not decoded")


def decode_pixels(ds: Dataset, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decoded first frame as float32 (rows, columns), Modality LUT then VOI LUT (or the first
    window) applied, MONOCHROME1 inverted so that bright means dense.

    Raises PixelDecodeError, naming the transfer syntax, when no decoder can decode the data or
    when Rows * Columns exceeds ``max_pixels`` (checked before any decoding).
    """
    return decode_pixels_at(ds, 0, max_pixels)[0]


def reduced_level(shape: tuple[int, int], size: tuple[int, int],
                  margin: float = REDUCE_MARGIN, max_level: int = REDUCE_MAX_LEVEL) -> int:
    """Deepest JPEG 2000 resolution level N (0 ... ``max_level``) at which an image of
    ``shape`` (rows, columns), each side halved N times (rounded up), is still at least
    ``margin`` times the model input ``size`` (H, W) on both sides."""
    rows, cols = shape
    level = 0
    while level < max_level:
        s = 2 ** (level + 1)
        if -(-rows // s) < margin * size[0] or -(-cols // s) < margin * size[1]:
            break
        level += 1
    return level


def _check(ds: Dataset, max_pixels: int) -> tuple[int, int, int, str]:
    """Rows, columns, frames and transfer syntax name, once every check before decoding passed."""
    ts_name = _ts_name(ds)
    if len(ds) == 0:  # pydicom returns an empty dataset for a file cut inside encapsulated data
        raise PixelDecodeError(f"the dataset is empty: file truncated or unreadable ({ts_name})")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if not rows or not cols or rows < 0 or cols < 0:
        raise PixelDecodeError(f"missing or invalid Rows/Columns ({ts_name})")
    if rows * cols > max_pixels:
        raise PixelDecodeError(
            f"image of {rows}x{cols} pixels exceeds the limit of {max_pixels} pixels "
            f"(refused before decoding {ts_name})"
        )
    if "PixelData" not in ds:
        raise PixelDecodeError(f"no Pixel Data ({ts_name})")
    frames = _int(ds, "NumberOfFrames", 1) or 1
    _check_native_length(ds, rows * cols, frames, ts_name)
    _check_codestream(ds, rows, cols, max_pixels, ts_name)
    return rows, cols, frames, ts_name


def _decode_j2k_reduced(ds: Dataset, frames: int, level: int) -> np.ndarray | None:
    """First frame of a single-sample unsigned JPEG 2000 image decoded at resolution ``level``
    (OpenJPEG's reduce, through Pillow: pylibjpeg-openjpeg and GDCM do not expose it); None
    when this image or Pillow cannot do it (the caller decodes at full resolution)."""
    if (_int(ds, "SamplesPerPixel", 1) != 1 or _int(ds, "PixelRepresentation", 0) != 0
            or dcm_uid.UID(str(ds.file_meta.TransferSyntaxUID)) not in _REDUCIBLE):
        return None
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=frames))
        # SIZ: one component, unsigned (bit 7 of Ssiz clear), its precision in bits
        if frame[:4] != b"\xff\x4f\xff\x51" or len(frame) < 43 or frame[40:42] != b"\x00\x01":
            return None
        if frame[42] & 0x80:
            return None
        precision = (frame[42] & 0x7F) + 1
        with Image.open(io.BytesIO(frame), formats=["JPEG2000"]) as im:
            if im.mode not in ("L", "I;16") or im.size != (_int(ds, "Columns"), _int(ds, "Rows")):
                return None
            im.reduce = level  # type: ignore[assignment,method-assign]  # Jpeg2KImageFile's
            im.load()
            arr = np.array(im)
    except Exception as exc:  # noqa: BLE001 - the full-resolution decoders get their turn
        log.info("reduced JPEG 2000 decoding failed, decoding at full resolution: %s", exc)
        return None
    if arr.dtype == np.uint16 and precision < 16:
        arr >>= 16 - precision  # Pillow scales 9-15 bit samples up to 16 bits
    elif arr.dtype != np.uint8 and arr.dtype != np.uint16:
        return None
    return arr


def decode_pixels_at(ds: Dataset, level: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                     ) -> tuple[np.ndarray, int]:
    """:func:`decode_pixels` at JPEG 2000 resolution ``level`` (each side halved ``level``
    times) where that can be done; the level returned is 0 when the image was decoded at full
    resolution (another transfer syntax, or a codestream Pillow cannot reduce)."""
    rows, cols, frames, ts_name = _check(ds, max_pixels)
    arr: np.ndarray | None = _decode_j2k_reduced(ds, frames, level) if level > 0 else None
    if arr is None:
        level = 0
        try:
            arr = _decode_with_pydicom(ds, 0 if frames > 1 else None)
        except Exception as exc:  # noqa: BLE001
            try:
                arr = _decode_with_gdcm(ds)
                log.info("decoded with GDCM's reader after pydicom failed: %s", exc)
            except Exception as exc2:  # noqa: BLE001
                raise PixelDecodeError(
                    f"cannot decode pixel data in {ts_name}: {exc}; GDCM: {exc2}",
                    f"the pixel data could not be decoded ({ts_name})",
                ) from exc2
    if arr.ndim == 3:  # colour secondary capture: luminance
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    s = 2**level
    if arr.shape != (-(-rows // s), -(-cols // s)):
        raise PixelDecodeError(f"decoded shape {arr.shape} != ({rows}, {cols})"
                               f"{f' at resolution level {level}' if level else ''} ({ts_name})")

    out: np.ndarray = arr
    try:
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    except Exception:  # noqa: BLE001
        slope, intercept = 1.0, 0.0
    if "ModalityLUTSequence" in ds or slope != 1.0 or intercept != 0.0:
        try:
            out = apply_modality_lut(out, ds)
        except Exception as exc:  # noqa: BLE001 - a broken LUT is not worth losing the image
            log.warning("Modality LUT ignored: %s", exc)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        try:
            out = apply_voi_lut(out, ds, index=0, prefer_lut=True)
        except Exception as exc:  # noqa: BLE001
            log.warning("VOI LUT ignored: %s", exc)
    out = np.asarray(out, dtype=np.float32)
    if str(getattr(ds, "PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        out = (out.max() + out.min()) - out
    return out, level


def _otsu(values: np.ndarray) -> float:
    """Otsu threshold: breast vs background are the two modes of a mammogram's histogram."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(values, bins=256, range=(lo, hi))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def _erode(mask: np.ndarray, iterations: int) -> np.ndarray:
    """Binary erosion with a 3x3 cross, border cells count as background."""
    m = mask.copy()
    for _ in range(iterations):
        e = m.copy()
        e[1:, :] &= m[:-1, :]
        e[:-1, :] &= m[1:, :]
        e[:, 1:] &= m[:, :-1]
        e[:, :-1] &= m[:, 1:]
        e[0, :] = e[-1, :] = False
        e[:, 0] = e[:, -1] = False
        m = e
    return m


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a small mask (drops film labels and markers); of
    components of the same size, the one whose first cell comes first in row-major order.

    Works on runs (row, first column, end column) joined by union-find: a few hundred runs
    where a cell-by-cell search visits ten thousand cells."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    starts_r, starts_c = np.nonzero(edges == 1)  # row-major: runs in order of their first cell
    ends_c = np.nonzero(edges == -1)[1]
    n = len(starts_r)
    if n == 0:
        return mask
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(starts_r, np.arange(h + 1))  # runs of row r: [row_first[r], ...)
    rs, cs, ce = starts_r.tolist(), starts_c.tolist(), ends_c.tolist()
    for r in range(1, h):
        i, i_end = int(row_first[r - 1]), int(row_first[r])  # runs of the row above
        j, j_end = i_end, int(row_first[r + 1])
        while i < i_end and j < j_end:
            if cs[i] < ce[j] and cs[j] < ce[i]:  # overlapping columns: 4-connected
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)  # the root is the component's first run
            if ce[i] < ce[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(i) for i in range(n)])
    sizes = np.bincount(roots, weights=np.asarray(ce) - np.asarray(cs), minlength=n)
    best = int(np.argmax(sizes))  # first maximum: the earliest root, as the search found it
    out = np.zeros((h, w), bool)
    for k in np.nonzero(roots == best)[0].tolist():
        out[rs[k], cs[k]:ce[k]] = True
    return out


def _chest_wall_on_right(ds: Dataset, mask: np.ndarray, laterality: str | None) -> bool:
    from_header = chest_wall_on_right(orientation_directions(ds))
    if from_header is not None:
        return from_header
    if laterality in ("L", "R"):
        return laterality == "R"
    half = mask.shape[1] // 2
    return bool(mask[:, mask.shape[1] - half :].sum() > mask[:, :half].sum())


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-style resize of a float32 image to (H, W) (Pillow, box filter when shrinking)."""
    h, w = size
    if img.shape == (h, w):
        return img.astype(np.float32, copy=True)
    shrink = img.shape[0] >= h and img.shape[1] >= w
    pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
    out = pil.resize((w, h), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
    return np.array(out, dtype=np.float32)


def _fit_box(box: tuple[int, int, int, int], size: tuple[int, int],
             flipped: bool) -> tuple[int, int, int, int]:
    """Grow the crop box to the model input's aspect ratio: wider on the nipple side (the
    chest wall stays at the input's left edge), or taller evenly above and below."""
    r0, c0, r1, c1 = box
    height, width = r1 - r0, c1 - c0
    ratio = size[0] / size[1]
    if height > ratio * width:
        grow = int(np.ceil(height / ratio)) - width
        if flipped:  # chest wall on the original's right: grow to the left
            c0 -= grow
        else:
            c1 += grow
    else:
        grow = int(np.ceil(width * ratio)) - height
        r0 -= grow // 2
        r1 = r0 + height + grow
    return r0, c0, r1, c1


def _padded_crop(arr: np.ndarray, box: tuple[int, int, int, int], fill: float) -> np.ndarray:
    """``arr[r0:r1, c0:c1]`` where the box may reach past the image: the rest is ``fill``."""
    r0, c0, r1, c1 = box
    rows, cols = arr.shape
    if r0 >= 0 and c0 >= 0 and r1 <= rows and c1 <= cols:
        return arr[r0:r1, c0:c1]
    out = np.full((r1 - r0, c1 - c0), fill, dtype=np.float32)
    ir0, ic0, ir1, ic1 = max(r0, 0), max(c0, 0), min(r1, rows), min(c1, cols)
    out[ir0 - r0:ir1 - r0, ic0 - c0:ic1 - c0] = arr[ir0:ir1, ic0:ic1]
    return out


def _soft_knee(model: np.ndarray) -> None:
    """In place: values above KNEE approach 1 as t / (1 + t) does (same slope at the knee; a
    value 10x the window still maps below 1, so bright specks keep their order)."""
    above = model > KNEE
    if above.any():
        span = 1.0 - KNEE
        t = (model[above] - KNEE) / span
        model[above] = KNEE + span * t / (1.0 + t)


def _grid(arr: np.ndarray, rows: slice, cols: slice, level: int) -> np.ndarray:
    """``full[rows, cols]`` of the full-resolution image, read from ``arr`` decoded at
    resolution ``level``: full pixel p is taken from decoded pixel p // 2**level."""
    if level == 0:
        return arr[rows, cols]
    s = 2**level
    ri = np.arange(*rows.indices(arr.shape[0] * s)) // s
    ci = np.arange(*cols.indices(arr.shape[1] * s)) // s
    return arr[np.ix_(np.minimum(ri, arr.shape[0] - 1), np.minimum(ci, arr.shape[1] - 1))]


def _resize_reduced(arr: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int],
                    level: int, fill: float) -> np.ndarray:
    """The full-resolution ``box`` (row0, col0, row1, col1; may reach past the image) resized
    to ``size`` from ``arr`` decoded at resolution ``level`` (full edge e is decoded edge
    e / 2**level), Pillow's box filter on the fractional box."""
    s = 2**level
    r0, c0, r1, c1 = box
    ib = (r0 // s, c0 // s, -(-r1 // s), -(-c1 // s))  # whole decoded pixels holding the box
    region = np.ascontiguousarray(_padded_crop(arr, ib, fill), dtype=np.float32)
    h, w = size
    shrink = region.shape[0] >= h and region.shape[1] >= w
    pil = Image.fromarray(region, mode="F")
    frac = (c0 / s - ib[1], r0 / s - ib[0], c1 / s - ib[1], r1 / s - ib[0])
    out = pil.resize((w, h), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR,
                     box=frac)
    return np.array(out, dtype=np.float32)


def prepare_image(
    ds: Dataset,
    size: tuple[int, int],
    laterality: str | None,
    pixels: np.ndarray | None = None,
    pipeline: PixelPipeline | str = NEWEST_PIXEL_PIPELINE,
    reduce_j2k: bool = False,
) -> PreparedImage:
    """Model input of ``size`` (H, W) in [0, 1], cropped to the breast, chest wall on the left,
    as ``pipeline`` says (:class:`~cadnode.dicom.enum.PixelPipeline`: the model package names
    the one it was trained with); plus a display image and the mapping back.

    ``pixels`` (the output of :func:`decode_pixels`) may be passed to avoid decoding twice.

    ``reduce_j2k`` (serving only; off by default, so training reads every image as before): a
    JPEG 2000 image is decoded at a reduced resolution level when the reduced image is still
    :data:`REDUCE_MARGIN` times the model input on both sides (:func:`reduced_level`), which
    makes decoding several times faster; the model input is then close to, not the same as,
    the full-resolution one. The crop, the mapping and ``original_shape`` stay on the
    full-resolution grid; ``resolution_level`` says which level was decoded.
    """
    pipeline = PixelPipeline(pipeline)
    level = 0
    if pixels is not None:
        arr = np.asarray(pixels, dtype=np.float32)
        rows, cols = arr.shape
    elif reduce_j2k and _int(ds, "Rows") and _int(ds, "Columns"):
        rows, cols = _int(ds, "Rows") or 0, _int(ds, "Columns") or 0
        arr, level = decode_pixels_at(ds, reduced_level((rows, cols), size))
    else:
        arr = decode_pixels(ds)
        rows, cols = arr.shape

    # Breast mask on a small grid: Otsu threshold, largest connected component.
    step = max(1, int(np.ceil(max(rows, cols) / _MASK_SIDE)))
    small = _grid(arr, slice(None, None, step), slice(None, None, step), level)
    thr = _otsu(small)
    raw_mask = small > thr
    # Erode first: thin bright film edges and rulers would otherwise join labels and borders to
    # the breast; the padding below gives the eroded cells back.
    mask = _largest_component(_erode(raw_mask, _ERODE))
    if not mask.any():
        mask = _largest_component(raw_mask)
    if not mask.any():
        mask = np.ones_like(small, dtype=bool)
    rr = np.nonzero(mask.any(axis=1))[0]
    cc = np.nonzero(mask.any(axis=0))[0]
    # Each small-grid cell stands for step x step original pixels; pad the eroded cells and one
    # more for safety.
    pad = _ERODE + 1
    r0 = max(0, (int(rr[0]) - pad) * step)
    r1 = min(rows, (int(rr[-1]) + 1 + pad) * step)
    c0 = max(0, (int(cc[0]) - pad) * step)
    c1 = min(cols, (int(cc[-1]) + 1 + pad) * step)

    # Robust intensity range of the breast.
    sstep = max(1, int(np.ceil(max(rows, cols) / _STATS_SIDE)))
    stats = _grid(arr, slice(r0, r1, sstep), slice(c0, c1, sstep), level)
    breast = stats[stats > thr]
    if breast.size < 16:
        breast = stats.ravel()
    lo, hi = (float(v) for v in np.percentile(breast, [0.5, 99.5]))
    if hi <= lo:
        hi = lo + 1.0
    scale = np.float32(1.0 / (hi - lo))
    offset = np.float32(lo)

    flipped = _chest_wall_on_right(ds, mask, laterality)

    if pipeline is PixelPipeline.PAD_KNEE:
        r0, c0, r1, c1 = _fit_box((r0, c0, r1, c1), size, flipped)
        scale = np.float32(KNEE / (hi - lo))
    if level == 0:
        crop = _padded_crop(arr, (r0, c0, r1, c1), fill=lo)
        if flipped:
            crop = crop[:, ::-1]
        model = _resize(crop, size)
    else:
        model = _resize_reduced(arr, (r0, c0, r1, c1), size, level, fill=lo)
        if flipped:
            model = np.ascontiguousarray(model[:, ::-1])
    model -= offset
    model *= scale
    if pipeline is PixelPipeline.PAD_KNEE:
        _soft_knee(model)
    np.clip(model, 0.0, 1.0, out=model)

    f = min(1.0, DISPLAY_MAX_SIDE / max(rows, cols))
    dsize = (max(1, round(rows * f)), max(1, round(cols * f)))
    disp = _resize(arr, dsize)
    disp -= offset
    disp *= 255.0 / (hi - lo)
    display = np.clip(disp, 0, 255).astype(np.uint8)

    return PreparedImage(
        array=model,
        original_shape=(rows, cols),
        flipped=flipped,
        crop=(r0, c0, r1, c1),
        display=display,
        resolution_level=level,
    )


def _sample_positions(
    n_out: int, n_orig: int, start: int, stop: int, flip: bool, n_hm: int
) -> np.ndarray:
    """Heatmap index (float) of each display pixel centre along one axis; NaN outside the crop."""
    o = (np.arange(n_out, dtype=np.float64) + 0.5) * n_orig / n_out - 0.5  # original index
    rel = o - start
    length = stop - start
    if flip:
        rel = length - 1 - rel
    u = (rel + 0.5) / length  # 0..1 across the crop (pixel edges)
    pos = u * n_hm - 0.5
    inside = (o >= start - 0.5) & (o <= stop - 0.5)
    return np.where(inside, pos, np.nan)


def heatmap_to_original(
    prepared: PreparedImage, heatmap: np.ndarray, shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Coarse model-grid heatmap (h, w) -> float32 map over the whole original image at the
    display resolution (or ``shape``), zeros outside the crop, ready to overlay on ``display``."""
    hm = np.asarray(heatmap, dtype=np.float32)
    if hm.ndim != 2 or hm.size == 0:
        raise ValueError(f"heatmap must be 2-D and non-empty, got shape {hm.shape}")
    out_h, out_w = shape if shape is not None else prepared.display.shape[:2]
    rows, cols = prepared.original_shape
    r0, c0, r1, c1 = prepared.crop
    h, w = hm.shape
    py = _sample_positions(out_h, rows, r0, r1, False, h)
    px = _sample_positions(out_w, cols, c0, c1, prepared.flipped, w)
    valid = ~np.isnan(py)[:, None] & ~np.isnan(px)[None, :]
    py = np.clip(np.nan_to_num(py), 0, h - 1)
    px = np.clip(np.nan_to_num(px), 0, w - 1)
    y0 = np.floor(py).astype(np.intp)
    x0 = np.floor(px).astype(np.intp)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wy = (py - y0).astype(np.float32)[:, None]
    wx = (px - x0).astype(np.float32)[None, :]
    top = hm[y0][:, x0] * (1 - wx) + hm[y0][:, x1] * wx
    bot = hm[y1][:, x0] * (1 - wx) + hm[y1][:, x1] * wx
    out = top * (1 - wy) + bot * wy
    return np.where(valid, out, 0.0).astype(np.float32)


def peak_and_outline(
    heat: np.ndarray, prepared: PreparedImage
) -> tuple[tuple[float, float], list[tuple[float, float]]]:
    """The heatmap peak and the box of cells above half of it, on the original pixel grid."""
    h, w = heat.shape
    H, W = prepared.array.shape
    sy, sx = H / h, W / w
    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    centre = prepared.cell_centre(int(r), int(c), (h, w))
    rows, cols = np.nonzero(heat >= heat[r, c] * 0.5)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    corners = [(c0, r0), (c1, r0), (c1, r1), (c0, r1)]
    outline = [prepared.to_original(x * sx - 0.5, y * sy - 0.5) for x, y in corners]
    rows_o, cols_o = prepared.original_shape

    def clip(p: tuple[float, float]) -> tuple[float, float]:
        return (min(max(p[0], 0.0), cols_o - 1.0), min(max(p[1], 0.0), rows_o - 1.0))

    outline = [clip(p) for p in outline]
    return clip(centre), outline + [outline[0]]
