"""`OSDiffCodec`: OSDiff's published checkpoints as a model family (Guo et al., "OSDiff: One-step diffusion image
compression"; Apache-2.0 code at cheesejiang/OSDiff, read and re-implemented here, not copied).

    image ─ SD VAE encoder ─ latent ─ LFGCM ─ (z, y) strings                                (encoder side)
    strings ─ LFGCM ─ hint ─┬─ CDDM ──┐
    x_T (seeded, CPU) ──────┴─ SD UNet(t = 999, empty prompt) ─ ε̂ ─ x̂0 ─ SD VAE decoder ─ image

The UNet and VAE are SD 2.1-base's (diffusers modules), the prompt is SD's empty-string embedding stored as a
constant (no text encoder at run time). One rate per checkpoint (the λ it was trained with): the rate and bpp
arguments of `encode` choose nothing; `max_bytes` is checked. Converted by `diffo convert osdiff`
(convert.py) into a folder in Hub layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config

from ...entropy import RangeCoder
from ...errors import BitstreamError
from ...layers import use_contiguous_group_norm
from ...tiling import configure_vae
from ..base import CodecBase, padded_latent_shape
from ..sd import SD21_BASE_UNET, SD21_VAE
from .cddm import CDDM, control_eps
from .lfgcm import LFGCM

__all__ = ["OSDiffCodec", "OSDiffControl", "OSDIFF_CONTROL"]

OSDIFF_CONTROL = dict(control_channels=[64, 128, 256, 256], attention_levels=[True, True, True, False], head_dim=16,
                      hint_channels=4)


@dataclass
class OSDiffAnalysis:
    latent: torch.Tensor
    size: tuple[int, int]
    coded: tuple[bytes, bytes] | None = None


@dataclass
class OSDiffControl:
    """What the control stage hands to the one step: the start x_T, its timestep and the hint."""

    x_t: torch.Tensor
    timestep: torch.Tensor  # [B] int64
    cond: torch.Tensor  # the hint


class OSDiffCoding:
    """The entropy-coding stages of the OSDiff family, on `self.latent_codec` (an LFGCM): shared by the whole
    model and by the codec-only parts that run on a user's own SD UNet and VAE (parts.py)."""

    family = "osdiff"
    family_id = 1
    format_version = 3
    has_rate_levels = False

    def analyse(self, x: torch.Tensor, size: tuple[int, int]) -> OSDiffAnalysis:
        latent = self.encode_latent(x.to(self.device)).float()
        return OSDiffAnalysis(latent.to(next(self.latent_codec.parameters()).device), size)

    def streams(self, enc: OSDiffAnalysis, rate_q: int, coder=None) -> tuple[bytes, ...]:
        """(z, y): the one rate of this checkpoint, whatever `rate_q`."""
        if coder is not None:
            return self.latent_codec.compress(enc.latent, coder)[:2]
        if enc.coded is None:
            enc.coded = self.latent_codec.compress(enc.latent, RangeCoder())[:2]
        return enc.coded

    def check_streams(self, bs) -> None:
        if len(bs.streams) != 2:
            raise BitstreamError(f"an OSDiff stream holds 2 sub-streams (z, y), got {len(bs.streams)}")

    def _z_shape(self, bs) -> tuple[int, int]:
        h, w = padded_latent_shape(bs.height, bs.width, self.config.pad_multiple)
        return h // 8, w // 8  # z is at 1/8 of the latent

    def entropy_decode(self, bs, coder) -> torch.Tensor:
        """The hint [1, 4, H/8, W/8] (padded size)."""
        z, y = bs.streams
        return self.latent_codec.decompress(z, y, self._z_shape(bs), coder)

    def decode_symbols(self, bs, coder) -> tuple[torch.Tensor, torch.Tensor]:
        """(ẑ symbols [1, N, h, w], the ŷ symbols of every chunk in coding order, flat)."""
        z, y = bs.streams
        return self.latent_codec.decode_symbols(z, y, self._z_shape(bs), coder)



    def strength_for_rate(self, rate: float) -> float:
        return 1.0  # the one step starts from pure noise


class OSDiffCodec(OSDiffCoding, CodecBase):
    """OSDiff: LFGCM latent codec + CDDM control module + SD 2.1-base UNet and VAE, one step at t = 999."""

    @register_to_config
    def __init__(
        self,
        vae_config: dict | None = None,
        unet_config: dict | None = None,
        latent_codec_config: dict | None = None,
        control_config: dict | None = None,
        prompt_length: int = 77,
        timestep: int = 999,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        pad_multiple: int = 64,
        name: str = "osdiff",
    ):
        super().__init__()
        unet_config = dict(unet_config or SD21_BASE_UNET)
        self.vae = AutoencoderKL.from_config(dict(vae_config or SD21_VAE))
        self.unet = UNet2DConditionModel.from_config(unet_config)
        self.latent_codec = LFGCM(**dict(latent_codec_config or {}))
        self.control_module = CDDM(unet_config, **dict(control_config or OSDIFF_CONTROL))
        self.register_buffer("prompt_embeds", torch.zeros(1, prompt_length, unet_config["cross_attention_dim"]))
        use_contiguous_group_norm(self)  # thread-count-independent pixels (see layers.ContiguousGroupNorm)
        configure_vae(self.vae)  # large images in tiles (tiling.py)
        if not 0 <= timestep < num_train_timesteps:
            raise ValueError(f"timestep {timestep} is outside 0..{num_train_timesteps - 1}")
        # SD's schedule (linear in √β), in float64 as the reference computes its coefficients
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
        a = torch.cumprod(1 - betas, 0)[timestep]
        self._x0_coefs = (float(torch.sqrt(1 / a)), float(torch.sqrt(1 / a - 1)))

    def control(self, c_hat: torch.Tensor, strength: float, noise: torch.Tensor) -> OSDiffControl:
        """x_T is the noise itself (OSDiff starts from pure noise at t = 999; `strength` does not apply)."""
        t = torch.full((len(c_hat),), self.config.timestep, dtype=torch.long, device=c_hat.device)
        # x_T stays float32: x̂0 multiplies it by ~14.6 (see denoise); the UNet gets the model's dtype
        return OSDiffControl(noise.to(c_hat.device, torch.float32), t, c_hat.to(self.dtype))

    def eps(self, ctrl: OSDiffControl) -> torch.Tensor:
        """The UNet's noise prediction ε̂ under the control module."""
        x_t = ctrl.x_t.to(self.dtype)
        prompt = self.prompt_embeds.to(self.dtype).expand(len(x_t), -1, -1)
        return control_eps(self.unet, self.control_module, x_t, ctrl.cond.to(self.dtype), ctrl.timestep, prompt)

    def denoise(self, ctrl: OSDiffControl) -> torch.Tensor:
        """x̂0 = (x_T − √(1−ᾱ)·ε̂)/√ᾱ, with float32 coefficients as the reference applies them."""
        inv, rest = self._x0_coefs
        eps = self.eps(ctrl).float()
        return torch.tensor(inv, dtype=torch.float32) * ctrl.x_t.float() - torch.tensor(rest, dtype=torch.float32) * eps

    def update(self, force: bool = True) -> None:
        """Build the entropy tables (CompressAI's construction: the `train` extra); done once, at conversion."""
        from ...training.entropy_models import build_tables

        training = self.training
        build_tables(self.latent_codec, force=force)
        self.train(training)  # table building switches to the training twins and back
        self._fingerprint = None
