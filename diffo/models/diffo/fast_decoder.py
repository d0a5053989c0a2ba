"""`FastLatentDecoder`: latent → pixels with plain 3x3 convolutions and ReLU, built for CPU speed.

The VAE decoder of diffusers (GroupNorm + SiLU ResNet blocks, 32 channels at full resolution) is most of a
DiffO decode on a CPU. This decoder follows the tiny autoencoders for diffusion: no normalisation, no
attention, channels halving at each 2x upsampling, nearest upsampling + conv, and the last 2x by pixel
shuffle (no convolution at full resolution). It is
trained against the photos from the frozen VAE encoder's latents (`python -m diffo train`, stage `decoder`),
so it reads the same latent space and the latent codec and denoiser are unchanged.

Large latents are decoded in overlapping tiles (`tiling.latent_windows`), each keeping the pixels up to the
middle of its overlaps: its receptive field is small (7.5 latent positions each way), so with 16 positions of
overlap the tiled result is the one-pass result (no blending, no seam).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ...tiling import latent_windows, spans

TILE_LATENT = 96  # 768 px tiles
OVERLAP_LATENT = 16  # each side keeps 8 positions of context: more than the receptive field (7.5)


class _Block(nn.Module):
    """conv-ReLU-conv with a skip, then ReLU."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class FastLatentDecoder(ModelMixin, ConfigMixin):
    """`channels[i]` at latent resolution x 2^i, `blocks[i]` residual blocks there; the output is upsampled a
    further `shuffle` times by pixel shuffle (2^(len(channels) - 1) x shuffle = the VAE's factor, 8)."""

    @register_to_config
    def __init__(self, latent_channels: int = 4, out_channels: int = 3, channels: tuple = (128, 64, 32),
                 blocks: tuple = (2, 1, 1), shuffle: int = 2):
        super().__init__()
        if len(channels) != len(blocks):
            raise ValueError("FastLatentDecoder: channels and blocks need one entry per resolution")
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, channels[0], 3, padding=1), nn.ReLU()]
        for i, (ch, n) in enumerate(zip(channels, blocks)):
            if i > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                           nn.Conv2d(channels[i - 1], ch, 3, padding=1), nn.ReLU()]
            layers += [_Block(ch) for _ in range(n)]
        # shuffle > 1: the last conv predicts shuffle² pixels per position (no convolution at full resolution)
        layers.append(nn.Conv2d(channels[-1], out_channels * shuffle**2, 3, padding=1))
        if shuffle > 1:
            layers.append(nn.PixelShuffle(shuffle))
        self.net = nn.Sequential(*layers)

    @property
    def scale(self) -> int:
        return 2 ** (len(self.config.channels) - 1) * self.config.shuffle

    @property
    def last_layer(self) -> torch.Tensor:
        """The last convolution's weight: where the training stages take VQGAN's adaptive weight."""
        return self.net[-2 if self.config.shuffle > 1 else -1].weight

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latent (the VAE's own units) → image in [-1, 1] (not clamped, like the VAE decoder's sample)."""
        return self.net(raw)

    def decode(self, raw: torch.Tensor, tile: int = TILE_LATENT, overlap: int = OVERLAP_LATENT) -> torch.Tensor:
        """`forward` in overlapping tiles above `tile` latent positions a side (bounded memory). Each tile keeps
        only the pixels up to the middle of its overlaps, where both neighbours see at least overlap / 2
        positions of context, more than the receptive field: the result is a one-pass decode's."""
        h, w = raw.shape[-2:]
        if h <= tile and w <= tile:
            return self(raw)
        s = self.scale
        out = None
        for (ys, xs), (ky, kx) in zip(latent_windows(h, w, tile, overlap), _kept(h, w, tile, overlap)):
            piece = self(raw[..., ys, xs])
            if out is None:
                out = piece.new_empty((*piece.shape[:2], h * s, w * s))
            out[..., ky.start * s:ky.stop * s, kx.start * s:kx.stop * s] = \
                piece[..., (ky.start - ys.start) * s:(ky.stop - ys.start) * s,
                      (kx.start - xs.start) * s:(kx.stop - xs.start) * s]
        return out


def _cuts(ranges: list[tuple[int, int]]) -> list[slice]:
    """For ranges in order, the part each keeps: from the middle of the overlap before to that after."""
    kept = []
    for i, (a, b) in enumerate(ranges):
        lo = 0 if i == 0 else (a + ranges[i - 1][1]) // 2
        hi = b if i == len(ranges) - 1 else (ranges[i + 1][0] + b) // 2
        kept.append(slice(lo, hi))
    return kept


def _kept(h: int, w: int, tile: int, overlap: int) -> list[tuple[slice, slice]]:
    """The kept region of each window of `latent_windows(h, w, tile, overlap)`, in the same order."""
    ky, kx = _cuts(spans(h, tile, overlap)), _cuts(spans(w, tile, overlap))
    return [(y, x) for y in ky for x in kx]
