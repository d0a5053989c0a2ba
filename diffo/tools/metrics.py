"""Image quality metrics, computed the same way everywhere (nodes, eval, demo).

All take two images [3, H, W] (or [B, 3, H, W]) in [0, 1], round them to 8 bits first (what a user sees
in a PNG), and return a float; NIQE is no-reference and scores the second image alone (lower is more
natural). A metric that is undefined for the input (MS-SSIM on an image smaller than its five scales need)
returns NaN, never a made-up value: callers print it as "n/a".
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..extras import require
from ..image import psnr, to_uint8

# MS-SSIM's 11-px window over 5 scales needs a shorter side above (11 - 1) * 2**4 = 160 px.
MS_SSIM_MIN_SIDE = 161
# HaarPSI's coarsest Haar filter is 2**6 = 64 px wide (piq pads, but below that it is meaningless).
HAARPSI_MIN_SIDE = 64

__all__ = ["psnr", "ms_ssim", "haarpsi", "gmsd", "niqe", "quality", "METRICS", "MS_SSIM_MIN_SIDE", "learned_metric"]


def _batch(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
    a = to_uint8(a).cpu().to(torch.float32) / 255
    b = to_uint8(b).cpu().to(torch.float32) / 255
    return (a[None], b[None]) if a.dim() == 3 else (a, b)


def ms_ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Multi-scale SSIM (pytorch-msssim, the CompressAI papers' implementation); NaN below 161 px a side."""
    _ms_ssim = require("pytorch_msssim", "MS-SSIM").ms_ssim

    x, y = _batch(a, b)
    if min(x.shape[-2:]) < MS_SSIM_MIN_SIDE:
        return math.nan
    return float(_ms_ssim(x, y, data_range=1.0).mean())


def haarpsi(a: torch.Tensor, b: torch.Tensor) -> float:
    """HaarPSI (piq): a weight-free perceptual similarity, 1 = identical; NaN below 64 px a side."""
    piq = require("piq", "HaarPSI")

    x, y = _batch(a, b)
    if min(x.shape[-2:]) < HAARPSI_MIN_SIDE:
        return math.nan
    return float(piq.haarpsi(x, y, data_range=1.0).mean())


def gmsd(a: torch.Tensor, b: torch.Tensor) -> float:
    """Gradient magnitude similarity deviation (piq): 0 = identical, higher is worse."""
    piq = require("piq", "GMSD")

    x, y = _batch(a, b)
    return float(piq.gmsd(x, y, data_range=1.0).mean())


def niqe(a: torch.Tensor, b: torch.Tensor) -> float:
    """NIQE of `b` alone (diffo/tools/niqe.py; `a` is not used): lower is more natural. NaN below two 96x96 blocks."""
    from .niqe import niqe as _niqe

    _, y = _batch(a, b)
    try:
        return float(sum(_niqe(img) for img in y) / len(y))
    except ValueError:
        return math.nan


METRICS = {"psnr": psnr, "ms_ssim": ms_ssim, "haarpsi": haarpsi, "gmsd": gmsd, "niqe": niqe}
LOWER_IS_BETTER = {"gmsd", "niqe", "lpips", "dists"}

# Learned metrics: their backbone (torchvision's VGG16) and linear weights are downloaded by torch.hub on first
# use. Nothing is downloaded here: they are measured only when the files are already in the torch hub cache
# (`torch.hub.get_dir()`, or TORCH_HOME), otherwise reported as not measured.
LEARNED = {"lpips": ("LPIPS", "lpips_weights.pt"), "dists": ("DISTS", "dists_weights.pt")}
VGG16_FILE = "vgg16-397923af.pth"


class MetricUnavailable(RuntimeError):
    pass


def learned_metric(name: str):
    """A callable (a, b) -> float for 'lpips' or 'dists' (lower is better), or MetricUnavailable saying which
    weight files are missing from the torch hub cache."""
    piq = require("piq", "LPIPS and DISTS")

    label, weights = LEARNED[name]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    missing = [f for f in (weights, VGG16_FILE) if not (folder / f).is_file()]
    if missing:
        raise MetricUnavailable(f"{label} not measured: {', '.join(missing)} not in {folder} "
                                "(no downloads at run time; put the files there or point TORCH_HOME at them)")
    loss = getattr(piq, label)(reduction="none").eval()

    @torch.no_grad()
    def measure(a: torch.Tensor, b: torch.Tensor) -> float:
        x, y = _batch(a, b)
        return float(loss(x, y).mean())

    return measure


def quality(original: torch.Tensor, reconstruction: torch.Tensor, metrics=tuple(METRICS)) -> dict[str, float]:
    """The named metrics of `reconstruction` against `original`."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
    return {m: METRICS[m](original, reconstruction) for m in metrics}
