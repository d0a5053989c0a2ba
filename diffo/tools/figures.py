"""Pictures for people: labelled side-by-side comparisons and rate-distortion plots (matplotlib)."""

from __future__ import annotations

import io
import math
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from ..extras import require
from ..image import to_pil


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except TypeError:  # pragma: no cover - old Pillow without the size argument
        return ImageFont.load_default()


def comparison_picture(original: torch.Tensor, recons: Sequence[tuple[str, torch.Tensor]],
                       original_label: str = "original") -> Image.Image:
    """Original and reconstructions [3, H, W] side by side, each with its (multi-line) label above it."""
    tiles = [(original_label, original)] + list(recons)
    h, w = original.shape[1], original.shape[2]
    font = _font(max(11, min(18, w // 28)))
    line = font.getbbox("Ag")[3] + 4
    band = 6 + line * max(label.count("\n") + 1 for label, _ in tiles)
    sheet = Image.new("RGB", (w * len(tiles), h + band), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, img) in enumerate(tiles):
        if tuple(img.shape[-2:]) != (h, w):
            raise ValueError(f"'{label}' is {img.shape[-1]}x{img.shape[-2]}, the original {w}x{h}")
        sheet.paste(to_pil(img), (i * w, band))
        draw.multiline_text((i * w + 4, 3), label, fill="black", font=font, spacing=4)
    return sheet


def strength_plot(rows: list[dict], title: str = "") -> Image.Image:
    """PSNR (left axis) and NIQE (right axis, lower is more natural) against the decode noise strength, from
    `sweep.strength_sweep` rows; the no-denoise ablation as dashed lines, the stream's default as a marker."""
    matplotlib = require("matplotlib", "Strength plots")
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    swept = sorted((r for r in rows if r["strength"] is not None and not r.get("default")),
                   key=lambda r: r["strength"])
    ablation = next(r for r in rows if r["strength"] is None)
    default = next((r for r in rows if r.get("default")), None)
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.add_subplot()
    ax2 = ax.twinx()
    for axis, key, color, label in ((ax, "psnr", "C0", "PSNR dB"), (ax2, "niqe", "C3", "NIQE (lower: more natural)")):
        axis.plot([r["strength"] for r in swept], [r[key] for r in swept], marker="o", color=color, label=label)
        axis.axhline(ablation[key], color=color, linestyle="--", linewidth=1, label=f"{key.upper()} without the step")
        if default is not None:
            axis.plot([default["strength"]], [default[key]], marker="*", markersize=14, color=color,
                      linestyle="none", label=f"stream default ({default['strength']:.2f})")
        axis.set_ylabel(label, color=color)
    ax.set_xlabel("decode noise strength (0 = none, 1 = pure noise)")
    ax.set_title(title or "decode-time trade: fidelity against naturalness")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
    ax.legend(handles[0][0] + handles[1][0], handles[0][1] + handles[1][1], fontsize=7, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def rd_plot(series: dict[str, list[tuple[float, float]]], metric: str, title: str = "",
            higher_is_better: bool = True, partial: dict[str, list[tuple[float, float]]] | None = None) -> Image.Image:
    """One rate-distortion curve per codec: `series[codec] = [(bpp, value), …]` → a PNG-ready PIL image.
    `partial` points (e.g. means over only some of the images) are drawn as hollow markers, unjoined."""
    matplotlib = require("matplotlib", "RD plots")

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # not pyplot: no global state, safe in a server thread

    def finite(points):
        return sorted((b, v) for b, v in points if math.isfinite(b) and math.isfinite(v))

    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    ax = fig.add_subplot()
    partial = partial or {}
    for i, name in enumerate(dict.fromkeys([*series, *partial])):
        color = f"C{i % 10}"
        pts = finite(series.get(name, []))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, color=color,
                    linewidth=2.2 if name.startswith("diffo") else 1.4)
        extra = finite(partial.get(name, []))
        if extra:
            ax.plot([p[0] for p in extra], [p[1] for p in extra], linestyle="none", marker="o", markersize=7,
                    markerfacecolor="none", color=color, label=None if pts else f"{name} (partial)")
    ax.set_xlabel("bits per pixel")
    ax.set_ylabel(metric + ("" if higher_is_better else " (lower is better)"))
    ax.set_title(title or f"{metric} vs rate")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    if any(partial.values()):
        fig.text(0.01, 0.01, "hollow: mean over only the images the codec could code that small", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return Image.open(buf).convert("RGB")
