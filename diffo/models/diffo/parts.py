"""The codec's own weights of a DiffO model folder at the 'sd' scale, without Stable Diffusion's UNet and VAE:
the latent codec, the control module (a diffusers ControlNet) and the prompt embedding. For running the one
step on the UNet and VAE a user already has loaded (ComfyUI's MODEL and VAE from core Load Checkpoint:
nodes/checkpoint.py), so no second copy of the backbone is made. As for OSDiff (osdiff/parts.py), only those
tensors are read and the whole model's fingerprint is computed by streaming the file.

    your VAE encoder ─ latent ×scale ─ `compress(latent, size, rate=…)` ─ .diffo
    .diffo ─ `diffo.pipeline.entropy_decode(parts, data)` ─ ĉ ─ `control(x_t, t, ĉ, prompt)` ─ your UNet
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import nn

from ...errors import ModelLoadError
from ..base import CONFIG_NAME, load_parts_from_dir, padded_latent_shape, read_config
from .codec import TINY_LATENT_CODEC, DiffoCodec, DiffoCoding
from .latent_codec import DiffoLatentCodec

PART_PREFIXES = ("latent_codec.", "denoiser.controlnet.", "denoiser.prompt_embeds")
# What core sampling can run: the predictions of SD checkpoints (the tiny preset's "residual" is our own)
SD_PREDICTIONS = ("epsilon", "v_prediction")


class _Config(dict):
    __getattr__ = dict.__getitem__


class _Control(nn.Module):
    """`denoiser.controlnet` and `denoiser.prompt_embeds`, under the names the whole model stores them."""

    def __init__(self, unet_config: dict, latent_channels: int, embedding_channels: int, prompt_length: int):
        super().__init__()
        with torch.device("meta"):  # the UNet only lends its shapes to ControlNetModel.from_unet
            unet = UNet2DConditionModel.from_config(unet_config)
        self.controlnet = ControlNetModel.from_unet(unet, conditioning_channels=latent_channels,
                                                    conditioning_embedding_out_channels=(embedding_channels,),
                                                    load_weights_from_unet=False)
        self.prompt_embeds = nn.Parameter(torch.zeros(1, prompt_length, unet_config["cross_attention_dim"]))


class DiffoCodecParts(DiffoCoding, nn.Module):
    """Latent codec + control module + prompt embedding of a DiffO model folder (`from_dir`)."""

    def __init__(self, config: dict):
        super().__init__()
        params = {k: v.default for k, v in inspect.signature(DiffoCodec.__init__).parameters.items() if k != "self"}
        self.config = _Config({**params, **{k: v for k, v in config.items() if k in params}})
        if not self.config.unet_config or not self.config.vae_config:
            raise ModelLoadError("a DiffO model folder for your own checkpoint needs its unet_config and vae_config")
        self.unet_config = dict(self.config.unet_config)
        vae = dict(self.config.vae_config)
        self.latent_scale = float(vae.get("scaling_factor", 1.0))
        self.latent_channels = channels = int(vae.get("latent_channels", 4))
        self.latent_codec = DiffoLatentCodec(latent_channels=channels,
                                             **dict(self.config.latent_codec_config or TINY_LATENT_CODEC))
        self.denoiser = _Control(self.unet_config, channels, self.config.control_embedding_channels,
                                 self.config.prompt_length)
        self.fingerprint = b""

    @property
    def prompt_embeds(self) -> torch.Tensor:
        return self.denoiser.prompt_embeds.detach()

    @classmethod
    def from_dir(cls, folder: Path | str) -> "DiffoCodecParts":
        folder = Path(folder)
        config = read_config(folder)
        if config.get("_class_name") != DiffoCodec.__name__:
            raise ModelLoadError(f"{folder / CONFIG_NAME} describes a {config.get('_class_name')}, not a DiffO model")
        if config.get("prediction_type") not in SD_PREDICTIONS:
            raise ModelLoadError(
                f"{folder} is a DiffO model with its own small UNet ({config.get('name')}, prediction "
                f"'{config.get('prediction_type')}'): only the 'sd' scale, built on a Stable Diffusion UNet "
                "(epsilon or v prediction), runs on your checkpoint; use DiffO Load Model for this one")
        parts = cls(config)
        parts.fingerprint = load_parts_from_dir(parts, folder, PART_PREFIXES)
        return parts.eval().requires_grad_(False)

    def compress(self, latent: torch.Tensor, size: tuple[int, int], seed: int = 0, *, rate: float | None = None,
                 bpp: float | None = None, max_bytes: int | None = None) -> bytes:
        """A scaled latent [1, C, h, w] (the image padded to the model's multiple, then your VAE's encoder, ×
        `latent_scale`) of an image of `size` (H, W) → `.diffo` bytes at a rate level, bpp or size."""
        from ... import pipeline

        h, w = size
        m = self.config.pad_multiple
        want = padded_latent_shape(h, w, m)
        channels = self.latent_channels
        if tuple(latent.shape[-2:]) != want or tuple(latent.shape[:2]) != (1, channels):
            raise ValueError(f"the latent of a {w}x{h} image padded to a multiple of {m} must be [1, {channels}, "
                             f"{want[0]}, {want[1]}], got {list(latent.shape)}")
        return pipeline.encode_analysis(self, self.analyse_latent(latent.cpu(), size), rate=rate, bpp=bpp,
                                        max_bytes=max_bytes, seed=seed)

    def control(self, x_t: torch.Tensor, timestep: torch.Tensor, c_hat: torch.Tensor, context: torch.Tensor,
                net: ControlNetModel | None = None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The ControlNet's residuals for the base UNet at (x_t, timestep): (one per skip, 12 for SD; middle).
        `net`: a copy of `denoiser.controlnet` on another device or dtype."""
        down, mid = (net or self.denoiser.controlnet)(x_t, timestep, encoder_hidden_states=context,
                                                      controlnet_cond=c_hat, return_dict=False)
        return tuple(down), mid
