"""Large images in bounded memory: the float networks run on overlapping tiles whose seams are blended away.

* VAE encoder and decoder: diffusers' own tiling (`AutoencoderKL.enable_tiling`), above TILE_PIXELS a side.
* Control module + one-step UNet: `latent_windows` cuts the latent into TILE_LATENT tiles overlapping by
  OVERLAP_LATENT; each tile is denoised on its own (its slice of the same noise), and `blend` averages the
  overlaps with linear ramps.

Tiling is decided by the image size alone and adds nothing to the stream: the same file decodes to the same
pixels everywhere. Images up to 768 px a side (Kodak's 768x512) run in one piece.
"""

from __future__ import annotations

from typing import Iterable

import torch

TILE_PIXELS = 768  # VAE tiles (pixels); the latent tile is TILE_PIXELS / 8
TILE_OVERLAP = 0.25  # fraction of a VAE tile shared with its neighbour
TILE_LATENT = 96  # denoiser tiles (latent positions); multiples of 8 keep the UNet's down/up-sampling aligned
OVERLAP_LATENT = 32

Window = tuple[slice, slice]


def configure_vae(vae) -> None:
    """Turn on diffusers' tiled VAE encode/decode for inputs above TILE_PIXELS a side."""
    vae.enable_tiling()
    vae.tile_sample_min_size = TILE_PIXELS
    vae.tile_latent_min_size = TILE_PIXELS // 8
    vae.tile_overlap_factor = TILE_OVERLAP


def spans(n: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    if n <= tile:
        return [(0, n)]
    stride = tile - overlap
    starts = list(range(0, n - tile, stride)) + [n - tile]
    return [(s, s + tile) for s in starts]


def latent_windows(h: int, w: int, tile: int = TILE_LATENT, overlap: int = OVERLAP_LATENT) -> list[Window]:
    """Row-major windows covering an h x w latent (one window when it fits in a tile)."""
    return [(slice(y0, y1), slice(x0, x1)) for y0, y1 in spans(h, tile, overlap) for x0, x1 in spans(w, tile, overlap)]


def _ramp(start: int, stop: int, n: int, overlap: int) -> torch.Tensor:
    """1 inside; rising linearly over `overlap` on each side that has a neighbouring tile (never 0)."""
    length = stop - start
    r = torch.ones(length, dtype=torch.float32)
    edge = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
    k = min(overlap, length)
    if start > 0:
        r[:k] = torch.minimum(r[:k], edge[:k])
    if stop < n:
        r[length - k:] = torch.minimum(r[length - k:], edge[:k].flip(0))
    return r


def blend(pieces: Iterable[tuple[Window, torch.Tensor]], shape: tuple[int, int],
          overlap: int = OVERLAP_LATENT) -> torch.Tensor:
    """Weighted average of tile results [1, C, th, tw] into one [1, C, h, w] (in window order, so the sums
    are the same everywhere). A single window returns its tensor unchanged."""
    h, w = shape
    total = weights = None
    for (ys, xs), piece in pieces:
        if (ys.start, ys.stop, xs.start, xs.stop) == (0, h, 0, w):
            return piece  # one tile: nothing to blend
        wy = _ramp(ys.start, ys.stop, h, overlap).to(piece.device)
        wx = _ramp(xs.start, xs.stop, w, overlap).to(piece.device)
        wt = (wy[:, None] * wx[None, :])[None, None]
        if total is None:
            total = piece.new_zeros((*piece.shape[:2], h, w), dtype=torch.float32)
            weights = torch.zeros((1, 1, h, w), dtype=torch.float32, device=piece.device)
        total[..., ys, xs] += piece.float() * wt
        weights[..., ys, xs] += wt
    if total is None:
        raise ValueError("blend needs at least one tile")
    return (total / weights).to(piece.dtype)
