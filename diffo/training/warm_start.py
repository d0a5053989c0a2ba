"""A tiny model with a wider latent space, warm-started from a trained one.

The embedded model's 4-channel latent caps what any denoiser can reach: decoded from the *true* latent, its
held-out photos are already nearly as blurry (NIQE) as after coding, so the one step has nothing left to add.
`widen_latent` builds the same architecture with more latent channels and copies every weight whose shape did
not change (the VAE's body, the UNet's and the codec's inner layers); only the layers that touch the latent start
afresh. Every stage is then trained again (the latent space is new), from that head start.
"""

from __future__ import annotations

import logging

import torch

from ..layers import zero_module
from ..models.base import public_config
from ..models.diffo.codec import DiffoCodec

logger = logging.getLogger(__name__)


def widened_config(config, channels: int) -> dict:
    """`config` (a DiffoCodec's) with `channels` latent channels in the VAE, UNet and fast decoder."""
    cfg = public_config(config)
    cfg["vae_config"] = {**cfg["vae_config"], "latent_channels": channels, "scaling_factor": 1.0}
    cfg["unet_config"] = {**cfg["unet_config"], "in_channels": channels, "out_channels": channels}
    if cfg.get("decoder_config"):
        cfg["decoder_config"] = {**cfg["decoder_config"], "latent_channels": channels}
    return cfg


def widen_latent(source: DiffoCodec, channels: int) -> tuple[DiffoCodec, list[str]]:
    """A new model with `channels` latent channels; the tensors of `source` whose shapes still fit are copied.
    Returns the model and the names of the tensors left at their fresh initialisation."""
    if channels < 1:
        raise ValueError(f"latent channels must be >= 1 (got {channels})")
    model = DiffoCodec(**widened_config(source.config, channels))
    if model.config.prediction_type == "residual":
        zero_module(model.denoiser.unet.conv_out)  # the fresh output layer starts as the identity ẑ₀ = ĉ
    own, theirs = model.state_dict(), source.state_dict()
    fresh = [k for k, v in own.items() if k not in theirs or theirs[k].shape != v.shape]
    with torch.no_grad():
        model.load_state_dict({k: theirs[k] for k in own if k not in fresh}, strict=False)
    logger.info("latent widened to %d channels: %d tensors copied, %d fresh", channels, len(own) - len(fresh),
                len(fresh))
    return model, fresh
