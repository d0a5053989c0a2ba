"""Sweeps of one image. `rate_sweep`: DiffO at several rate levels, classical codecs at the sizes DiffO
reached; `strength_sweep`: one stream decoded at several noise strengths (the decode-time trade between
realism and fidelity). Rows of figures; `markdown_table`, `rd_plot` and `strength_plot` (figures.py) turn them
into what people read.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from . import classical
from .. import pipeline
from ..bitstream import bits_per_pixel
from ..models import CodecBase as DiffoCodec  # any family
from .metrics import quality

Step = Callable[[], None]  # called after each coded point (progress, interrupt checks)


def parse_floats(text: str, name: str = "values") -> list[float]:
    """'0, 0.25,0.5' → [0.0, 0.25, 0.5], with an error that names the bad entry."""
    out = []
    for part in text.replace(";", ",").split(","):
        if part.strip():
            try:
                out.append(float(part))
            except ValueError:
                raise ValueError(f"{name}: {part.strip()!r} is not a number (write e.g. 0, 0.25, 0.5)") from None
    if not out:
        raise ValueError(f"{name}: give at least one number")
    return out


def rate_sweep(model: DiffoCodec, image: torch.Tensor, rates: Sequence[float], codecs: Sequence[str] = (),
               metrics: Sequence[str] = ("psnr", "ms_ssim", "haarpsi"), step: Step | None = None) -> list[dict]:
    """Rows {codec, rate, bytes, bpp, <metrics>} for DiffO at each rate level and each classical codec at
    each bpp DiffO reached (a codec that cannot get that small gives a row with `note` and no figures)."""
    h, w = image.shape[-2:]
    rows = []
    for r in rates:
        data = pipeline.encode(model, image, rate=r)
        rec = pipeline.decode(model, data)
        rows.append({"codec": "diffo", "rate": r, "bytes": len(data),
                     "bpp": bits_per_pixel(len(data), w, h), **quality(image, rec, metrics)})
        if step:
            step()
    for target in [row["bpp"] for row in rows]:
        for name in codecs:
            try:
                res = classical.encode_to_bpp(image, name, target)
            except classical.TargetUnreachable as e:
                rows.append({"codec": name, "target_bpp": target, "note": str(e)})
            else:
                rows.append({"codec": name, "target_bpp": target, "bytes": len(res.data), "bpp": res.bpp,
                             **quality(image, res.image, metrics)})
            if step:
                step()
    return rows


def strength_sweep(model: DiffoCodec, image: torch.Tensor, strengths: Sequence[float], *, bpp: float = 0.05,
                   seed: int = 0, metrics: Sequence[str] = ("psnr", "niqe"), step: Step | None = None) -> list[dict]:
    """Rows {strength, bytes, bpp, <metrics>}: the same stream (nearest to `bpp`) decoded with each noise
    strength (0 = no added noise; the diffusion step still runs), plus a row `strength: None` for the
    no-denoise ablation and one marked `default` for the strength the stream carries."""
    h, w = image.shape[-2:]
    data = pipeline.encode(model, image, bpp=bpp, seed=seed)
    size = {"bytes": len(data), "bpp": bits_per_pixel(len(data), w, h)}
    rows = [{"strength": None, **size, **quality(image, pipeline.decode(model, data, denoise=False), metrics)}]
    default = pipeline.read_header(data).strength
    for s in [*strengths, default]:
        rows.append({"strength": float(s), **size, **quality(image, pipeline.decode(model, data, strength=s),
                                                              metrics)})
        if step:
            step()
    rows[-1]["default"] = True
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def markdown_table(rows: list[dict], metrics: Sequence[str] = ("psnr", "ms_ssim", "haarpsi")) -> str:
    cols = ["codec", "bytes", "bpp", *metrics]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    notes = []
    for row in rows:
        if "note" in row:
            notes.append(f"- {row['codec']} at {row['target_bpp']:.4f} bpp: {row['note']}")
            continue
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in cols) + " |")
    return "\n".join(lines + ([""] + notes if notes else []))


def series(rows: list[dict], metric: str) -> dict[str, list[tuple[float, float]]]:
    """Rows → {codec: [(bpp, metric), …]} for `figures.rd_plot`."""
    out: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if metric in row:
            out.setdefault(row["codec"], []).append((row["bpp"], row[metric]))
    return out
