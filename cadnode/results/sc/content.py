"""The SC montage's pixels: views, heatmaps, outlines and scores burned into one RGB image."""

from __future__ import annotations

import functools
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cadnode.results.common import (
    OUTSIDE_DOMAIN,
    completeness_lines,
    domain_summary,
)
from cadnode.results.findings import StudyFindings, ViewFinding

HANGING = ("R-CC", "L-CC", "R-MLO", "L-MLO")
PANEL_W, PANEL_H = 640, 1024
HEADER_H = 124
BANNER_H = 56
FOOTER_H = 48
NOTE_H = 34  # one line of the notes band (what is missing or was not analysed)
MAX_NOTES = 12
BANNER_TEXT = "NOT FOR DIAGNOSTIC USE - DEMONSTRATION MODEL"
FAILED_GREY = 110
MISSING_GREY = 30
DOMAIN_LINE_H = 26  # the outside-domain box at the bottom of a panel, 22 px text
DOMAIN_WIDTH = 48  # characters per line that fit a panel at 22 px
MAX_DOMAIN_LINES = 12


@functools.cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's own font at ``size`` px, loaded once per size (loading it is most of the
    cost of a line of text)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _heat_rgb(heat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """'Hot' colours (uint8 RGB) and blending weights (uint8, 255 = all colour): cool areas
    stay grey so the anatomy stays readable."""
    h = np.clip(heat.astype(np.float32), 0.0, 1.0)
    rgb = np.zeros((*h.shape, 3), np.uint8)
    rgb[..., 0] = 255
    rgb[..., 1] = np.rint(255.0 * np.clip(2.0 * h - 0.6, 0, 1))
    alpha = np.rint(255.0 * 0.6 * np.clip((h - 0.2) / 0.6, 0.0, 1.0)).astype(np.uint8)
    return rgb, alpha


def _fit(w: int, h: int) -> tuple[int, int]:
    scale = min(PANEL_W / w, PANEL_H / h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _view_panel(v: ViewFinding, thresholds: dict[str, float]) -> tuple[Image.Image, str]:
    """One analysed view: greyscale display + heatmap + outline; returns panel and caption."""
    panel = Image.new("RGB", (PANEL_W, PANEL_H), (0, 0, 0))
    display = v.display
    if display is None:  # analysed, but the worker kept no display image
        display = np.zeros((v.rows, v.columns), dtype=np.uint8)
    disp = Image.fromarray(np.asarray(display, dtype=np.uint8), mode="L")
    fw, fh = _fit(disp.width, disp.height)
    img = disp.resize((fw, fh), Image.Resampling.BILINEAR).convert("RGB")
    if v.heatmap is not None:
        heat = Image.fromarray(np.asarray(v.heatmap, dtype=np.float32), mode="F")
        colour, alpha = _heat_rgb(np.asarray(heat.resize((fw, fh), Image.Resampling.BILINEAR)))
        # blended in Pillow (uint8, in C): the same picture as float arithmetic, to rounding
        img = Image.composite(Image.fromarray(colour, mode="RGB"), img,
                              Image.fromarray(alpha, mode="L"))
    x0, y0 = (PANEL_W - fw) // 2, (PANEL_H - fh) // 2
    panel.paste(img, (x0, y0))
    draw = ImageDraw.Draw(panel)
    sx, sy = fw / max(v.columns, 1), fh / max(v.rows, 1)  # original grid -> panel
    marked = v.marked(thresholds)
    if marked and len(v.outline) >= 3:
        pts = [(x0 + x * sx, y0 + y * sy) for x, y in v.outline]
        draw.line(pts + [pts[0]], fill=(0, 255, 0), width=3)
    if marked and v.center is not None:
        cx, cy = x0 + v.center[0] * sx, y0 + v.center[1] * sy
        draw.line([(cx - 12, cy), (cx + 12, cy)], fill=(0, 255, 0), width=3)
        draw.line([(cx, cy - 12), (cx, cy + 12)], fill=(0, 255, 0), width=3)
    if not marked:
        draw.text((16, PANEL_H - 40), "no region above threshold", fill=(200, 200, 200),
                  font=_font(24))
    lines = domain_lines(v)
    if lines:  # above the "no region" line, over the image: it must not be missed
        top = PANEL_H - 56 - DOMAIN_LINE_H * len(lines)
        draw.rectangle([8, top - 8, PANEL_W - 8, PANEL_H - 52], fill=(150, 0, 0))
        draw.multiline_text((16, top), "\n".join(lines), fill=(255, 255, 255), font=_font(22),
                            spacing=DOMAIN_LINE_H - 22)
    caption = f"{v.view_key} ...{v.sop_instance_uid[-8:]}\n" + _score_caption(
        "cancer", float(v.cancer or 0.0), thresholds)
    if v.calcification is not None:
        caption += "\n" + _score_caption("calc", float(v.calcification), thresholds,
                                         "calcification") + " (no location)"
    return panel, caption


def domain_lines(v: ViewFinding) -> list[str]:
    """The text burned in under a view whose image is unlike the training images: the
    statement in capitals, then its reasons, wrapped to the panel ([] when inside)."""
    if not v.outside_domain:
        return []
    lines = [OUTSIDE_DOMAIN.upper() + ":"]
    for reason in v.outside_domain:
        lines += textwrap.wrap(reason, width=DOMAIN_WIDTH, subsequent_indent="  ")
    if len(lines) > MAX_DOMAIN_LINES:
        lines = lines[: MAX_DOMAIN_LINES - 1] + ["... (all reasons in the SRs)"]
    return lines


def _score_caption(name: str, p: float, thresholds: dict[str, float], key: str = "") -> str:
    """"cancer 12.3% (thr 50%)", with "!" at or above the operating threshold."""
    t = thresholds.get(key or name, 0.5)
    return f"{name} {p * 100:.1f}% (thr {t * 100:.0f}%)" + (" !" if p >= t else "")


def _message_panel(key: str, message: str, grey: int,
                   status: str = "NOT ANALYSED") -> tuple[Image.Image, str]:
    panel = Image.new("RGB", (PANEL_W, PANEL_H), (grey, grey, grey))
    draw = ImageDraw.Draw(panel)
    lines = textwrap.wrap(message, width=36) or [""]
    draw.multiline_text((24, PANEL_H // 2 - 40), "\n".join(lines), fill=(255, 255, 255),
                        font=_font(26))
    return panel, f"{key}  {status}"


def render_montage(findings: StudyFindings) -> np.ndarray:
    """The montage as uint8 RGB (rows, columns, 3); public so the worker can preview it."""
    by_key = {v.view_key: v for v in findings.views}
    keys = list(HANGING) + sorted(k for k in by_key if k not in HANGING)
    banner = BANNER_H if findings.demo_model else 0
    notes = _notes(findings)
    width = PANEL_W * len(keys)
    height = banner + HEADER_H + PANEL_H + FOOTER_H + NOTE_H * len(notes)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    small, big = _font(28), _font(34)
    if banner:
        draw.rectangle([0, 0, width, banner], fill=(200, 0, 0))
        draw.text((24, 8), BANNER_TEXT + "  -  " + BANNER_TEXT, fill=(255, 255, 255), font=big)
    for i, key in enumerate(keys):
        v = by_key.get(key)
        if v is None:
            why = findings.missing.get(key, "no image in study")
            panel, caption = _message_panel(key, f"{key} MISSING: {why}", MISSING_GREY,
                                            "MISSING")
        elif v.failed:
            panel, caption = _message_panel(
                key, f"{key} not analysed: {v.error or 'no score'}", FAILED_GREY
            )
        else:
            panel, caption = _view_panel(v, findings.thresholds)
        x = i * PANEL_W
        canvas.paste(panel, (x, banner + HEADER_H))
        draw.multiline_text((x + 16, banner + 10), caption, fill=(255, 255, 0), font=small)
        draw.line([(x, banner), (x, banner + HEADER_H + PANEL_H)], fill=(80, 80, 80), width=2)
    exam = findings.exam
    footer = f"{findings.model_name} {findings.model_version}"
    if "cancer" in exam:
        footer = (_score_caption("Exam cancer", exam["cancer"], findings.thresholds, "cancer")
                  + "  |  " + footer)
    y = banner + HEADER_H + PANEL_H + 8
    draw.text((16, y), footer, fill=(255, 255, 255), font=small)
    for i, line in enumerate(notes):
        colour = ((255, 80, 80) if line.startswith(("INCOMPLETE", OUTSIDE_DOMAIN.upper()))
                  else (230, 230, 230))
        draw.text((16, y + FOOTER_H - 8 + i * NOTE_H), line, fill=colour, font=_font(24))
    return np.asarray(canvas, dtype=np.uint8)


def _notes(findings: StudyFindings) -> list[str]:
    """The notes band: views outside the training domain and incompleteness first, then
    every image passed over, and why."""
    summary = domain_summary(findings)
    lines = ([summary] if summary else []) + completeness_lines(findings)
    if len(lines) > MAX_NOTES:
        lines = lines[: MAX_NOTES - 1] + [f"... and {len(lines) - MAX_NOTES + 1} more "
                                          "(in the SRs and in `cadnode jobs --json`)"]
    width = max(40, PANEL_W * 4 // 13)  # characters that fit the montage at 24 px
    return [line if len(line) <= width else line[: width - 3] + "..." for line in lines]
