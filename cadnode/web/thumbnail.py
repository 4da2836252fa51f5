"""The Secondary Capture montage as a PNG thumbnail, for the study page."""

from __future__ import annotations

from functools import lru_cache
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

#: Longest side of a thumbnail in pixels.
THUMBNAIL_SIZE = 1200


def sc_png(path: Path, size: int = THUMBNAIL_SIZE) -> bytes:
    """The PNG of a Secondary Capture file, downscaled to fit ``size`` (cached per file
    version: a result file is never rewritten in place, a new version has a new name)."""
    stat = path.stat()
    return _png(str(path), stat.st_mtime_ns, stat.st_size, size)


@lru_cache(maxsize=32)
def _png(path: str, _mtime: int, _size: int, size: int) -> bytes:
    ds = pydicom.dcmread(path)
    pixels = np.asarray(ds.pixel_array)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if pixels.ndim == 3 and photometric != "RGB":  # YBR_FULL and friends
        from pydicom.pixels import convert_color_space

        pixels = convert_color_space(pixels, photometric, "RGB")
    if pixels.ndim == 2:
        image = Image.fromarray(_to_8bit(pixels, photometric), "L")
    else:
        image = Image.fromarray(_to_8bit(pixels, "RGB"), "RGB")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = BytesIO()
    image.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _to_8bit(pixels: np.ndarray, photometric: str) -> np.ndarray:
    if pixels.dtype == np.uint8:
        out = pixels
    else:
        lo, hi = float(pixels.min()), float(pixels.max())
        scaled = (pixels.astype(np.float32) - lo) / max(hi - lo, 1.0) * 255.0
        out = np.clip(scaled, 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return np.ascontiguousarray(out)
