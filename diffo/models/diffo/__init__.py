"""The DiffO family: our re-implementation of DiffO (VQ structural base code + hyperprior residual in a VAE latent,
rate-adaptive noise, control module + one-step UNet)."""

from .codec import DiffoCodec

__all__ = ["DiffoCodec"]
