"""Decode: ms per mammogram for each transfer syntax and each decoder available here.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 .venv/bin/python -m \
        tests.bench.bench_decode [--runs 3] [--view lcc]

One real view of the demo exam (CBIS-DDSM, 16-bit) encoded once in each transfer syntax: RLE
lossless (pydicom), JPEG lossless SV1 (DCMTK ``dcmcjpeg``), JPEG-LS lossless (pyjpegls), JPEG
2000 lossless and lossy at 10:1 (OpenJPEG through pylibjpeg). Each row is one file read
(``dcmread``) and its pixels decoded by one of pydicom's decoding plugins found installed
(pylibjpeg's, GDCM, Pillow, pyjpegls, pydicom's own), then the node's own reading
(:func:`cadnode.dicom.pixels.decode_pixels`: the plugin it prefers, then modality and VOI
LUTs, float32) and, for JPEG 2000, the reduced-resolution decode the node can use when the
model's input is smaller than the image (:func:`~cadnode.dicom.pixels.decode_pixels_at`,
OpenJPEG's reduce through Pillow; ``CADNODE_REDUCE_JPEG2000``). The reference is the same read
of the uncompressed file. Median of ``--runs``, after one warm-up.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom import uid
from pydicom.pixels import get_decoder

from cadnode.demo import write_demo_study
from cadnode.dicom.pixels import decode_pixels, decode_pixels_at
from tests.bench import report
from tests.bench.report import Table

#: label -> (transfer syntax, how the file is made from the uncompressed one)
SYNTAXES: dict[str, uid.UID] = {
    "uncompressed (Explicit VR Little Endian)": uid.ExplicitVRLittleEndian,
    "RLE lossless": uid.RLELossless,
    "JPEG lossless SV1": uid.JPEGLosslessSV1,
    "JPEG-LS lossless": uid.JPEGLSLossless,
    "JPEG 2000 lossless": uid.JPEG2000Lossless,
    "JPEG 2000 lossy 10:1": uid.JPEG2000,
}


def encode(raw: Path, syntax: uid.UID, out: Path) -> Path | str:
    """The uncompressed file ``raw`` written in ``syntax`` at ``out``, or why it cannot be."""
    if syntax == uid.ExplicitVRLittleEndian:
        return raw
    if syntax == uid.JPEGLosslessSV1:
        if shutil.which("dcmcjpeg") is None:
            return "DCMTK dcmcjpeg not installed"
        subprocess.run(["dcmcjpeg", "+e1", str(raw), str(out)], check=True)
        return out
    ds = pydicom.dcmread(raw)
    kwargs: dict[str, object] = {}
    if syntax == uid.JPEG2000:
        kwargs = {"j2k_cr": [10], "encoding_plugin": "pylibjpeg"}
    elif syntax == uid.JPEG2000Lossless:
        kwargs = {"encoding_plugin": "pylibjpeg"}
    try:
        ds.compress(syntax, **kwargs)  # type: ignore[arg-type]
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        return f"no encoder: {exc}"
    ds.save_as(out, enforce_file_format=True)
    return out


def timed(fn: Callable[[], object], runs: int) -> float:
    """Median ms of ``fn`` over ``runs`` calls after one warm-up (its failure propagates)."""
    fn()
    laps = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        laps.append(1000 * (time.perf_counter() - start))
    return statistics.median(laps)


def readers(path: Path, syntax: uid.UID) -> dict[str, Callable[[], object]]:
    """Each way of reading ``path``'s pixels: pydicom's plugins, the node's, reduced J2K."""
    decoder = get_decoder(syntax)
    out: dict[str, Callable[[], object]] = {}
    for plugin in sorted(decoder.available_plugins):
        def read(plugin: str = plugin) -> object:
            return decoder.as_array(pydicom.dcmread(path), decoding_plugin=plugin)[0]
        out[f"pydicom plugin {plugin}"] = read
    out["cadnode decode_pixels (float32, LUTs applied)"] = lambda: decode_pixels(
        pydicom.dcmread(path))
    if syntax in (uid.JPEG2000Lossless, uid.JPEG2000):
        for level in (1, 2):
            def reduced(level: int = level) -> object:
                arr, got = decode_pixels_at(pydicom.dcmread(path), level)
                if got != level:
                    raise RuntimeError(f"decoded at level {got}, not {level}")
                return arr
            out[f"cadnode at resolution level {level} (1/{2**level} per side)"] = reduced
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=3, help="timed reads per row (after a warm-up)")
    p.add_argument("--view", default="lcc", choices=("lcc", "lmlo", "rcc", "rmlo"),
                   help="which demo view (default lcc)")


def run(args: argparse.Namespace) -> Table:
    table = Table("decode", "Decode: ms per mammogram by transfer syntax and decoder",
                  "python -m tests.bench.bench_decode",
                  ["transfer syntax", "decoder", "file MB", "ms", "x uncompressed read"])
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        root = Path(tmp)
        source = next(p for p in write_demo_study(root / "demo") if p.stem == args.view)
        ds = pydicom.dcmread(source)
        ds.decompress()
        raw = root / "raw.dcm"
        ds.save_as(raw, enforce_file_format=True)
        shape = (int(ds.Rows), int(ds.Columns))
        reference = timed(lambda: pydicom.dcmread(raw).pixel_array, args.runs)
        for n, (label, syntax) in enumerate(SYNTAXES.items()):
            made = encode(raw, syntax, root / f"{n}.dcm")
            if isinstance(made, str):
                table.add(label, made, "", "", "")
                continue
            mb = made.stat().st_size / 1e6
            for name, fn in readers(made, syntax).items():
                try:
                    ms = timed(fn, args.runs)
                except Exception as exc:  # noqa: BLE001 - a decoder that cannot: say so
                    table.add(label, name, mb, f"fails: {str(exc).splitlines()[0][:80]}", "")
                    continue
                table.add(label, name, mb, ms, f"{ms / reference:.1f}")
    table.notes.append(
        f"Demo view {args.view} ({shape[0]} x {shape[1]}, 16-bit, CBIS-DDSM), median of "
        f"{args.runs} reads after a warm-up; each row is dcmread + decode. Reference: pydicom "
        f"reading the uncompressed file, {reference:.0f} ms. The node decodes one view per "
        "decoding child (CADNODE_DECODE_PROCESSES children in parallel).")
    return table


if __name__ == "__main__":
    report.main(__doc__, add_arguments, run)
