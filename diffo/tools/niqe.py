"""NIQE: the Natural Image Quality Evaluator (Mittal, Soundararajan, Bovik, "Making a completely blind image
quality analyzer", IEEE Signal Processing Letters 2013). No reference image and no neural network: lower is
more natural. A yardstick for realism only (never a training loss, never for model selection on Kodak).

Written from the paper's published algorithm (the authors' MATLAB `niqe.m`), with their pristine model
(`data/niqe_modelparameters.mat`: mean and covariance of 36 natural-scene-statistics features):

1. luminance in [0, 255] (0.2989 R + 0.5870 G + 0.1140 B), cropped to whole 96x96 blocks;
2. at two scales (full, then halved by bicubic resampling with antialiasing):
   MSCN coefficients (x - mu) / (sigma + 1), with mu and sigma from a 7x7 Gaussian window (sigma 7/6,
   replicate borders); per block (96/scale a side): an asymmetric generalised Gaussian (AGGD) fit of the
   coefficients (shape, mean of the two scales) and of their products with the 4 neighbours (right, down,
   down-right, down-left; cyclic within the block): shape, mean, left and right scale -> 18 features;
3. the blocks' 36-feature mean and covariance (blocks with an undefined feature dropped) against the pristine
   model: sqrt((mu_p - mu)^T pinv((C_p + C) / 2) (mu_p - mu)).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..extras import require

BLOCK = 96
PARAMETERS = Path(__file__).resolve().parents[1] / "data" / "niqe_modelparameters.mat"
_SHIFTS = ((0, 1), (1, 0), (1, 1), (-1, 1))  # (rows, cols) as MATLAB's circshift: right, down, down-right, down-left
_GAMMAS = np.arange(0.2, 10.0005, 0.001)


@lru_cache(maxsize=1)
def pristine_model() -> tuple[np.ndarray, np.ndarray]:
    """(mean [36], covariance [36, 36]) of the pristine natural-scene features."""
    loadmat = require("scipy.io", "NIQE's pristine model").loadmat
    m = loadmat(PARAMETERS)
    return m["mu_prisparam"].reshape(-1).astype(np.float64), m["cov_prisparam"].astype(np.float64)


@lru_cache(maxsize=1)
def _ratio_table() -> np.ndarray:
    g = np.array([math.gamma(2 / a) ** 2 / (math.gamma(1 / a) * math.gamma(3 / a)) for a in _GAMMAS])
    return g


def _gamma(x: np.ndarray) -> np.ndarray:
    """Γ elementwise, NaN where x is (an undefined fit)."""
    return np.array([math.gamma(v) if np.isfinite(v) else np.nan for v in x])


def _aggd(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AGGD fit per row of v [n, m]: (shape alpha, left scale, right scale); NaN where a side is empty."""
    neg, pos = v < 0, v > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        left = np.sqrt((np.where(neg, v, 0) ** 2).sum(1) / neg.sum(1))
        right = np.sqrt((np.where(pos, v, 0) ** 2).sum(1) / pos.sum(1))
        gam_hat = left / right
        r_hat = np.abs(v).mean(1) ** 2 / (v ** 2).mean(1)
        r_norm = r_hat * (gam_hat ** 3 + 1) * (gam_hat + 1) / (gam_hat ** 2 + 1) ** 2
    table = _ratio_table()
    ok = np.isfinite(r_norm)
    alpha = np.full(len(v), np.nan)
    alpha[ok] = _GAMMAS[np.argmin((table[None, :] - r_norm[ok, None]) ** 2, axis=1)]
    scale = np.sqrt(_gamma(1 / alpha) / _gamma(3 / alpha))
    return alpha, left * scale, right * scale


def _block_features(mscn: np.ndarray, block: int) -> np.ndarray:
    """18 features per block of the MSCN map [H, W] (H, W multiples of `block`): [n_blocks, 18]."""
    h, w = mscn.shape
    blocks = mscn.reshape(h // block, block, w // block, block).transpose(0, 2, 1, 3).reshape(-1, block, block)
    flat = blocks.reshape(len(blocks), -1)
    alpha, bl, br = _aggd(flat)
    feats = [alpha, (bl + br) / 2]
    for shift in _SHIFTS:
        pair = (blocks * np.roll(blocks, shift, axis=(1, 2))).reshape(len(blocks), -1)
        a, bl, br = _aggd(pair)
        feats += [a, (br - bl) * _gamma(2 / a) / _gamma(1 / a), bl, br]
    return np.stack(feats, 1)


def _gaussian_window() -> torch.Tensor:
    x = torch.arange(7, dtype=torch.float64) - 3
    g = torch.exp(-(x ** 2) / (2 * (7 / 6) ** 2))
    k = g[:, None] * g[None, :]
    return (k / k.sum())[None, None]


def _mscn(lum: torch.Tensor) -> np.ndarray:
    """(x - mu) / (sigma + 1) of a luminance map [H, W] (float64, 0..255)."""
    win = _gaussian_window()
    x = lum[None, None]
    pad = lambda t: F.pad(t, (3, 3, 3, 3), mode="replicate")  # noqa: E731
    mu = F.conv2d(pad(x), win)
    sigma = torch.sqrt((F.conv2d(pad(x * x), win) - mu * mu).abs())
    return ((x - mu) / (sigma + 1))[0, 0].numpy()


def luminance(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] or [1, H, W] in [0, 1] -> [H, W] float64 in [0, 255]: MATLAB's rgb2gray weights, rounded to
    integers as rgb2gray does on 8-bit images (the reference reads 8-bit files)."""
    img = image.detach().cpu().double().clamp(0, 1) * 255
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"NIQE expects an image [3, H, W] or [1, H, W], got shape {tuple(image.shape)}")
    if img.shape[0] == 1:
        return torch.round(img[0])
    return torch.round(0.2989 * img[0] + 0.5870 * img[1] + 0.1140 * img[2])


def niqe(image: torch.Tensor) -> float:
    """NIQE of an image [3, H, W] (or [1, H, W]) in [0, 1]; lower is more natural. Needs at least two whole
    96x96 blocks with defined statistics (e.g. 96x192): smaller or flat images raise ValueError."""
    lum = luminance(image)
    h, w = (lum.shape[0] // BLOCK) * BLOCK, (lum.shape[1] // BLOCK) * BLOCK
    if h * w < 2 * BLOCK * BLOCK:
        raise ValueError(f"NIQE needs at least two whole {BLOCK}x{BLOCK} blocks; this image is "
                         f"{lum.shape[1]}x{lum.shape[0]}")
    lum = lum[:h, :w]
    feats = []
    for scale in (1, 2):
        feats.append(_block_features(_mscn(lum), BLOCK // scale))
        if scale == 1:
            lum = F.interpolate(lum[None, None], size=(h // 2, w // 2), mode="bicubic", align_corners=False,
                                antialias=True)[0, 0]
    dist = np.concatenate(feats, 1)
    complete = dist[np.isfinite(dist).all(1)]  # nancov: blocks with an undefined feature are left out
    if len(complete) < 2:
        raise ValueError("NIQE: fewer than two blocks with defined statistics (is the image flat?)")
    mu_p, cov_p = pristine_model()
    mu, cov = np.nanmean(dist, 0), np.cov(complete, rowvar=False)  # nanmean: per feature, as the reference
    d = mu_p - mu
    return float(np.sqrt(d @ np.linalg.pinv((cov_p + cov) / 2) @ d))
