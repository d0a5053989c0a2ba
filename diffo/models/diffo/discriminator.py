"""Discriminator in the UNet's feature space (OSDiff), used by training only.

A copy of the denoising UNet's encoder and middle block (frozen, or trained with the heads) extracts
features of noised latents (real, or decoded by the codec) at random timesteps; small trainable heads score
every level. Nothing of it is shipped with a model: it costs nothing at inference.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .denoiser import OneStepDenoiser


class UNetFeatureDiscriminator(nn.Module):
    def __init__(self, denoiser: OneStepDenoiser, head_channels: int = 64, train_backbone: bool = False):
        super().__init__()
        # Frozen, as OSDiff's, when the UNet's features are rich (SD's); a tiny UNet's frozen features barely
        # separate real from fake latents, so there the copy may train with the heads (still apart from the
        # denoiser: the generator's own UNet is never touched by the discriminator's step).
        self.backbone = copy.deepcopy(denoiser.unet).requires_grad_(train_backbone).eval()
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

    def forward_features(self, img: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The logit map and every activation before it (for feature matching: a perceptual distance learned on
        the photos, where no pretrained network may be downloaded)."""
        feats = []
        for layer in self.net:
            img = layer(img)
            if isinstance(layer, nn.LeakyReLU):
                feats.append(img)
        return img, feats


def feature_matching_loss(fake_feats: list[torch.Tensor], real_feats: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the layers of the L1 distance between the fake's and the real image's activations (pix2pixHD's
    feature matching; the real side carries no gradient)."""
    return sum(F.l1_loss(f.float(), r.detach().float()) for f, r in zip(fake_feats, real_feats)) / len(fake_feats)


def patch_generator_terms(disc: PatchDiscriminator, fake: torch.Tensor, real: torch.Tensor,
                          feature_matching: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The generator's terms against a patch discriminator, its weights frozen: the non-saturating loss on the
    fake crops and, with `feature_matching`, the feature distance to the real crops (else None)."""
    with frozen(disc):
        if not feature_matching:
            return generator_loss(disc(fake)), None
        logits, fake_feats = disc.forward_features(fake)
        with torch.no_grad():
            real_feats = disc.forward_features(real)[1]
        return generator_loss(logits), feature_matching_loss(fake_feats, real_feats)


# The non-saturating GAN losses every adversarial training stage uses; a discriminator returns one logit map or
# a list of them (one per feature level), real > 0.
def _maps(logits) -> list:
    return list(logits) if isinstance(logits, (list, tuple)) else [logits]


def generator_loss(fake_logits) -> torch.Tensor:
    """softplus(−logit), mean over each map, summed over the maps."""
    return sum(F.softplus(-f.float()).mean() for f in _maps(fake_logits))


def discriminator_loss(real_logits, fake_logits) -> torch.Tensor:
    """softplus(−real) + softplus(fake), means over each map, summed over the maps."""
    return sum(F.softplus(-r.float()).mean() + F.softplus(f.float()).mean()
               for r, f in zip(_maps(real_logits), _maps(fake_logits)))


@contextmanager
def frozen(module: nn.Module):
    """The generator's pass through a discriminator: no gradients for its weights (they would only be cleared
    before its own step); each parameter's flag is restored afterwards (a frozen backbone stays frozen)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
