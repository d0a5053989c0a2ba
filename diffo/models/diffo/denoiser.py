"""The one-step diffusion decoder (OSDiff): a control module guides the denoising UNet in one evaluation.

    ĉ ─┬─────────────── control module (ControlNet: trainable copy of the UNet encoder, zero joins) ─┐
       └ x_t = √ᾱ_t·ĉ + √(1−ᾱ_t)·ε ─ UNet(x_t, t, residuals) ─ prediction ─ ẑ₀ (clean latent) ◄──────┘

Blocks are diffusers' (`UNet2DConditionModel`, `ControlNetModel.from_unet`, `DDPMScheduler` for the noise
schedule). The prompt is a learned constant embedding (the papers use SD's empty prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
from torch import nn


# "residual": the UNet predicts the correction to ĉ (ẑ₀ = ĉ + output). A model trained from scratch starts as
# the identity (zero-initialised conv_out) instead of having to learn it; SD checkpoints use epsilon / v.
PREDICTION_TYPES = ("sample", "epsilon", "v_prediction", "residual")


@dataclass
class ControlOutput:
    """What the control stage hands to the denoiser: the noised latent and the UNet residuals."""

    x_t: torch.Tensor
    timestep: torch.Tensor  # [B] int64
    cond: torch.Tensor  # ĉ, the decoded latent the control module was fed
    down_residuals: tuple
    mid_residual: torch.Tensor


class OneStepDenoiser(nn.Module):
    def __init__(self, unet_config: dict, conditioning_channels: int, control_embedding_channels: int,
                 prediction_type: str = "sample", num_train_timesteps: int = 1000, prompt_length: int = 1,
                 beta_schedule: str = "scaled_linear"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.unet = UNet2DConditionModel.from_config(unet_config)
        # Condition enters at latent resolution: one embedding stage, no downsampling.
        self.controlnet = ControlNetModel.from_unet(
            self.unet, conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=(control_embedding_channels,),
        )
        self.prompt_embeds = nn.Parameter(torch.zeros(1, prompt_length, self.unet.config.cross_attention_dim))
        self.prediction_type = prediction_type
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                       beta_start=0.00085, beta_end=0.012,
                                       prediction_type="sample" if prediction_type == "residual" else prediction_type)
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone().float(), persistent=False)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def _prompt(self, batch: int) -> torch.Tensor:
        return self.prompt_embeds.expand(batch, -1, -1)

    def add_noise(self, c_hat: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[timestep].to(c_hat)[:, None, None, None]
        return a.sqrt() * c_hat + (1 - a).sqrt() * noise

    def control(self, c_hat: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> ControlOutput:
        """Noise ĉ to `timestep` and run the control module on it, conditioned on ĉ."""
        x_t = self.add_noise(c_hat, timestep, noise)
        down, mid = self.controlnet(x_t, timestep, encoder_hidden_states=self._prompt(len(x_t)),
                                    controlnet_cond=c_hat, return_dict=False)
        return ControlOutput(x_t, timestep, c_hat, tuple(down), mid)

    def denoise(self, ctrl: ControlOutput) -> torch.Tensor:
        """One UNet evaluation: the clean latent ẑ₀."""
        out = self.unet(ctrl.x_t, ctrl.timestep, encoder_hidden_states=self._prompt(len(ctrl.x_t)),
                        down_block_additional_residuals=ctrl.down_residuals,
                        mid_block_additional_residual=ctrl.mid_residual, return_dict=False)[0]
        if self.prediction_type == "sample":
            return out
        if self.prediction_type == "residual":
            return ctrl.cond + out
        a = self.alphas_cumprod[ctrl.timestep].to(out)[:, None, None, None]
        if self.prediction_type == "epsilon":
            return (ctrl.x_t - (1 - a).sqrt() * out) / a.sqrt()
        return a.sqrt() * ctrl.x_t - (1 - a).sqrt() * out  # v_prediction

    def forward(self, c_hat: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.denoise(self.control(c_hat, timestep, noise))

    def unet_features(self, x: torch.Tensor, timestep: torch.Tensor, unet: UNet2DConditionModel | None = None):
        """Encoder and middle-block features of `unet` (default: ours) at (x, t): what the discriminator sees."""
        unet = unet or self.unet
        prompt = self._prompt(len(x))
        emb = unet.time_embedding(unet.time_proj(timestep).to(x.dtype))
        h = unet.conv_in(x)
        feats = []
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=prompt)
            else:
                h, _ = block(hidden_states=h, temb=emb)
            feats.append(h)
        feats.append(unet.mid_block(h, emb, encoder_hidden_states=prompt))
        return feats
