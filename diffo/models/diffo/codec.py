"""`DiffoCodec`: the whole model, composed from diffusers blocks and our entropy models.

    image ─ VAE encoder ─ latent ─ DiffoLatentCodec ─ streams        (encoder side)
    streams ─ DiffoLatentCodec ─ ĉ ─ OneStepDenoiser(strength(rate)) ─ ẑ₀ ─ VAE decoder ─ image

One class, two scales: `DiffoCodec.from_preset("tiny")` (trains on a CPU; the embedded default) and
`DiffoCodec.from_sd(path_or_repo)` (VAE and UNet of a Stable Diffusion 2.1 / SD-Turbo checkpoint).
A saved model is a folder in Hub layout: `config.json`, `diffusion_pytorch_model.safetensors`, `README.md`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config

from ...tiling import configure_vae
from .denoiser import ControlOutput, OneStepDenoiser
from .fast_decoder import FastLatentDecoder
from ...errors import BitstreamError
from ..sd import SD21_UNET, SD21_VAE
from ..base import CONFIG_NAME, WEIGHTS_NAME, CodecBase, fingerprint_of, padded_latent_shape, public_config
from .latent_codec import MAX_RATE_Q, DiffoLatentCodec, ResidualAnalysis
from ...layers import use_contiguous_group_norm, zero_module
from .noise import check_noise_map, strength_for_rate, timestep_for_strength

logger = logging.getLogger(__name__)

__all__ = ["DiffoCodec", "EncodedLatent", "latent_valid", "CONFIG_NAME", "WEIGHTS_NAME", "fingerprint_of",
           "MAX_RATE_Q"]

TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[32, 64, 64, 64], mid_block_add_attention=False, scaling_factor=1.0,
)
TINY_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[48, 96, 128],
    down_block_types=["DownBlock2D"] * 3, up_block_types=["UpBlock2D"] * 3, norm_num_groups=16,
    cross_attention_dim=32, attention_head_dim=8, mid_block_type="UNetMidBlock2DCrossAttn",
)
TINY_LATENT_CODEC = dict(hidden=64, code_dim=8, codebook_size=256, y_channels=64, z_channels=32, num_gains=8)
SD_LATENT_CODEC = dict(hidden=192, code_dim=16, codebook_size=1024, y_channels=320, z_channels=192, num_gains=8)


def with_latent_channels(config: dict, channels: int) -> dict:
    """A DiffoCodec config (`vae_config`, `unet_config`, optional `decoder_config`) whose networks take
    `channels` latent channels: every key that carries the latent's width, in one place."""
    if channels < 1:
        raise ValueError(f"latent channels must be >= 1 (got {channels})")
    cfg = dict(config)
    cfg["vae_config"] = {**cfg["vae_config"], "latent_channels": channels}
    cfg["unet_config"] = {**cfg["unet_config"], "in_channels": channels, "out_channels": channels}
    if cfg.get("decoder_config"):
        cfg["decoder_config"] = {**cfg["decoder_config"], "latent_channels": channels}
    return cfg


@dataclass
class EncodedLatent:
    """What the rate search reuses: the padded latent, the base strings and indices, the image size."""

    latent: torch.Tensor
    base_string: bytes
    indices: torch.Tensor
    size: tuple[int, int]  # original (H, W)
    residual: ResidualAnalysis | None = None  # computed on the first rate level > 0, reused by the others

    @property
    def latent_valid(self) -> tuple[int, int]:
        return latent_valid(*self.size)


def latent_valid(h: int, w: int) -> tuple[int, int]:
    """The latent positions that cover an H x W image (the rest is padding, never coded)."""
    return -(-h // 8), -(-w // 8)


class DiffoCoding:
    """The entropy-coding stages of the DiffO family and its noise map, on `self.latent_codec` and
    `self.config`: shared by the whole model and by the codec-only parts that run on a user's own SD UNet and
    VAE (parts.py)."""

    family = "diffo"
    family_id = 0
    format_version = 2
    has_rate_levels = True

    def strength_for_rate(self, rate: float) -> float:
        return strength_for_rate(rate, list(self.config.noise_rates), list(self.config.noise_strengths))

    def timestep_for_strength(self, strength: float) -> int:
        return timestep_for_strength(strength, self.config.num_train_timesteps)

    def analyse(self, x: torch.Tensor, size: tuple[int, int]) -> EncodedLatent:
        return self.analyse_latent(self.encode_latent(x.to(self.device)), size)

    def analyse_latent(self, latent: torch.Tensor, size: tuple[int, int]) -> EncodedLatent:
        """Latent and base code once: they are the same for every rate level."""
        latent = latent.float().to(next(self.latent_codec.parameters()).device)
        strings, indices = self.latent_codec.compress_base(latent, latent_valid(*size))
        return EncodedLatent(latent, strings[0], indices, size)

    def streams(self, enc: EncodedLatent, rate_q: int, coder=None) -> tuple[bytes, ...]:
        """(base,) at level 0, else (base, z, y); with `coder`, everything is coded afresh with it."""
        if coder is not None:
            base = self.latent_codec.compress_base(enc.latent, enc.latent_valid, coder)[0][0]
            if rate_q == 0:
                return (base,)
            z, y = self.latent_codec.compress_residual(enc.latent, enc.indices, rate_q, enc.latent_valid, None, coder)
            return base, z[0], y[0]
        if rate_q == 0:
            return (enc.base_string,)
        if enc.residual is None:
            enc.residual = self.latent_codec.analyse_residual(enc.latent, enc.indices, enc.latent_valid)
        z, y = self.latent_codec.compress_residual(enc.latent, enc.indices, rate_q, enc.latent_valid, enc.residual)
        return enc.base_string, z[0], y[0]

    def check_streams(self, bs) -> None:
        if len(bs.streams) not in (1, 3):
            raise BitstreamError(f"a DiffO stream holds 1 sub-stream (base) or 3 (base, z, y), got {len(bs.streams)}")

    def _latent_shape(self, bs) -> tuple[int, int]:
        return padded_latent_shape(bs.height, bs.width, self.config.pad_multiple)

    def entropy_decode(self, bs, coder) -> torch.Tensor:
        return self.latent_codec.decompress([bs.streams], self._latent_shape(bs), bs.rate_q,
                                            latent_valid(bs.height, bs.width), coder)

    def decode_symbols(self, bs, coder) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(base indices, residual ŷ or None at rate level 0)."""
        idx, _, y_hat = self.latent_codec.decode_symbols([bs.streams], self._latent_shape(bs), bs.rate_q,
                                                         latent_valid(bs.height, bs.width), coder)
        return idx, y_hat


class DiffoCodec(DiffoCoding, CodecBase):
    """The DiffO codec. Constructor arguments are its `config.json`."""

    @register_to_config
    def __init__(
        self,
        vae_config: dict | None = None,
        unet_config: dict | None = None,
        latent_codec_config: dict | None = None,
        control_embedding_channels: int = 32,
        prediction_type: str = "sample",
        num_train_timesteps: int = 1000,
        prompt_length: int = 1,
        noise_rates: list = (0.0, 1.0),
        noise_strengths: list = (0.5, 0.15),
        pad_multiple: int = 64,
        name: str = "diffo-tiny",
        decoder_config: dict | None = None,
    ):
        super().__init__()
        check_noise_map(list(noise_rates), list(noise_strengths))
        self.vae = AutoencoderKL.from_config(dict(vae_config or TINY_VAE))
        latent_channels = self.vae.config.latent_channels
        self.latent_codec = DiffoLatentCodec(latent_channels=latent_channels,
                                             **dict(latent_codec_config or TINY_LATENT_CODEC))
        self.denoiser = OneStepDenoiser(dict(unet_config or TINY_UNET), latent_channels, control_embedding_channels,
                                        prediction_type, num_train_timesteps, prompt_length)
        # a fast latent → pixel decoder replacing the VAE's (see fast_decoder.py); None: the VAE decoder
        self.decoder = FastLatentDecoder(**decoder_config) if decoder_config else None
        use_contiguous_group_norm(self)  # thread-count-independent pixels (see layers.ContiguousGroupNorm)
        configure_vae(self.vae)  # large images in tiles (tiling.py)
        self._fingerprint: bytes | None = None

    # ----------------------------------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str = "tiny", latent_channels: int = 4, **overrides) -> "DiffoCodec":
        """A randomly initialised model of a named configuration ('tiny' is the only pixel-space preset), with
        `latent_channels` channels in its latent space."""
        if name != "tiny":
            raise ValueError(f"unknown preset {name!r}: use 'tiny', or DiffoCodec.from_sd(...) for the 'sd' scale")
        overrides.setdefault("prediction_type", "residual")
        nets = with_latent_channels(dict(vae_config=TINY_VAE, unet_config=TINY_UNET), latent_channels)
        model = cls(**nets, latent_codec_config=TINY_LATENT_CODEC, **overrides)
        if model.config.prediction_type == "residual":
            zero_module(model.denoiser.unet.conv_out)  # start as the identity ẑ₀ = ĉ
        return model

    @classmethod
    def sd21_sized(cls, **overrides) -> "DiffoCodec":
        """Randomly initialised at Stable Diffusion 2.1 size (what `from_sd` builds from a real checkpoint):
        for timing and memory measurements only."""
        kwargs = dict(latent_codec_config=SD_LATENT_CODEC, prediction_type="v_prediction", prompt_length=77,
                      control_embedding_channels=64, name="diffo-sd21-random")
        kwargs.update(overrides)
        return cls(vae_config=SD21_VAE, unet_config=SD21_UNET, **kwargs)

    @classmethod
    def from_sd(cls, pretrained: str | Path, revision: str | None = None, **overrides) -> "DiffoCodec":
        """The 'sd' scale: VAE and UNet of a diffusers Stable Diffusion 2.1 / SD-Turbo checkpoint (local folder
        or Hub repo id), a fresh latent codec and a control module copied from the UNet (ControlNet init)."""
        from ...hub import resolve_model_dir

        root = resolve_model_dir(pretrained, revision, allow_patterns=["vae/*", "unet/*", "scheduler/*"])
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", use_safetensors=True)
        prediction_type = "epsilon"
        sched = root / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            prediction_type = json.loads(sched.read_text()).get("prediction_type", prediction_type)
        kwargs = dict(latent_codec_config=SD_LATENT_CODEC, prediction_type=prediction_type, prompt_length=77,
                      noise_rates=[0.0, 1.0], noise_strengths=[0.5, 0.15], control_embedding_channels=64,
                      name=f"diffo-sd:{Path(str(pretrained)).name}")
        kwargs.update(overrides)
        model = cls(vae_config=public_config(vae.config), unet_config=public_config(unet.config), **kwargs)
        model.vae.load_state_dict(vae.state_dict())
        model.denoiser.unet.load_state_dict(unet.state_dict())
        model.denoiser.controlnet.load_state_dict(model.denoiser.controlnet.from_unet(
            unet, conditioning_channels=vae.config.latent_channels,
            conditioning_embedding_out_channels=(kwargs["control_embedding_channels"],)).state_dict())
        return model

    def add_fast_decoder(self, **config) -> FastLatentDecoder:
        """Attach a fresh `FastLatentDecoder` (recorded in the config) to be trained from this model's VAE
        encoder; decoding uses it from then on."""
        self.decoder = FastLatentDecoder(latent_channels=self.latent_channels, **config).to(self.device)
        self.register_to_config(decoder_config=public_config(self.decoder.config))
        self._fingerprint = None
        return self.decoder

    def decode_raw_latent_signed(self, raw: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            return super().decode_raw_latent_signed(raw)
        return self.decoder.decode(raw.to(self.dtype))

    def update(self, force: bool = True) -> None:
        """Build the entropy coders' CDF tables from the learned distributions (once, when finalising).
        Table construction is CompressAI's: this needs the `train` extra; coding with the tables does not."""
        from ...training.entropy_models import build_tables

        build_tables(self.latent_codec, force=force)
        self._fingerprint = None

    # ------------------------------------------------------------------------------- the stages
    def control(self, c_hat: torch.Tensor, strength: float, noise: torch.Tensor) -> ControlOutput:
        t = torch.full((len(c_hat),), self.timestep_for_strength(strength), dtype=torch.long, device=c_hat.device)
        return self.denoiser.control(c_hat.to(self.dtype), t, noise.to(c_hat.device, self.dtype))

    def denoise(self, ctrl: ControlOutput) -> torch.Tensor:
        return self.denoiser.denoise(ctrl)


