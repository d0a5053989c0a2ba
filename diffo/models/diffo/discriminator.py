"""Discriminator in the UNet's feature space (OSDiff), used by training only.

A frozen copy of the denoising UNet's encoder and middle block extracts features of noised latents
(real, or decoded by the codec) at random timesteps; small trainable heads score every level. Nothing
of it is shipped with a model: it costs nothing at inference.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .denoiser import OneStepDenoiser


class UNetFeatureDiscriminator(nn.Module):
    def __init__(self, denoiser: OneStepDenoiser, head_channels: int = 64):
        super().__init__()
        self.backbone = copy.deepcopy(denoiser.unet).requires_grad_(False).eval()
        self.backbone.up_blocks = None  # the decoder half is never used
        self.backbone.conv_out = None
        self._denoiser = [denoiser]  # not a submodule: only its prompt and feature walk are borrowed
        chans = list(denoiser.unet.config.block_out_channels) + [denoiser.unet.config.block_out_channels[-1]]
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, head_channels, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(head_channels, 1, 1))
            for c in chans
        )

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor) -> list[torch.Tensor]:
        """Per-level logit maps (real > 0)."""
        feats = self._denoiser[0].unet_features(x_t, timestep, unet=self.backbone)
        return [head(f) for head, f in zip(self.heads, feats)]


class PatchDiscriminator(nn.Module):
    """Pixel-space patch discriminator (PatchGAN) on decoded crops, for the realism stage: a logit per
    overlapping patch of about 46 px. Spectrally normalised convolutions keep it stable at high weight."""

    def __init__(self, channels: tuple = (32, 64, 128)):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        layers, c_in = [], 3
        for c in channels:
            layers += [sn(nn.Conv2d(c_in, c, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            c_in = c
        layers += [sn(nn.Conv2d(c_in, c_in, 3, padding=1)), nn.LeakyReLU(0.2), nn.Conv2d(c_in, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] → logit map (real > 0)."""
        return self.net(img)
