"""The codec's own weights of an OSDiff model folder, without Stable Diffusion's UNet and VAE: the latent codec,
the control module and the empty-prompt embedding. For running the one step on a UNet and VAE the user already
has loaded (ComfyUI's MODEL and VAE from its core Load Checkpoint: nodes/osdiff.py), so no second copy of the
backbone is made. Only the tensors of those three parts are read from the safetensors file; the fingerprint (of
the whole model, as in every stream it made) is computed by streaming the file one tensor at a time.

    your VAE encoder ─ latent ×0.18215 ─ `compress(latent, size, seed)` ─ .diffo
    .diffo ─ `diffo.pipeline.entropy_decode(parts, data)` ─ hint ─ `features(x_t, hint, t, prompt)` ─ your UNet
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...errors import ModelLoadError
from ..base import CONFIG_NAME, load_parts_from_dir, padded_latent_shape, read_config
from ..sd import SD21_BASE_UNET, SD21_VAE
from .cddm import CDDM, ControlFeatures, control_features
from .codec import OSDIFF_CONTROL, OSDiffAnalysis, OSDiffCodec, OSDiffCoding
from .lfgcm import LFGCM

PART_PREFIXES = ("latent_codec.", "control_module.", "prompt_embeds")


class _Config(dict):
    __getattr__ = dict.__getitem__


class OSDiffCodecParts(OSDiffCoding, nn.Module):
    """Latent codec + control module + prompt embedding of an OSDiff model folder (`from_dir`)."""

    def __init__(self, config: dict):
        super().__init__()
        import inspect

        # as OSDiffCodec.from_config reads it: the constructor's arguments, defaults filled in, nothing else
        params = {k: v.default for k, v in inspect.signature(OSDiffCodec.__init__).parameters.items() if k != "self"}
        self.config = _Config({**params, **{k: v for k, v in config.items() if k in params}})
        unet_config = dict(self.config.unet_config or SD21_BASE_UNET)
        self.unet_config = unet_config
        self.latent_scale = float((self.config.vae_config or SD21_VAE)["scaling_factor"])  # SD's 0.18215
        self.latent_codec = LFGCM(**dict(self.config.latent_codec_config or {}))
        self.control_module = CDDM(unet_config, **dict(self.config.control_config or OSDIFF_CONTROL))
        self.register_buffer("prompt_embeds", torch.zeros(1, self.config.prompt_length,
                                                          unet_config["cross_attention_dim"]))
        self.fingerprint = b""

    @classmethod
    def from_dir(cls, folder: Path | str) -> "OSDiffCodecParts":
        folder = Path(folder)
        config = read_config(folder)
        if config.get("_class_name") != OSDiffCodec.__name__:
            raise ModelLoadError(f"{folder / CONFIG_NAME} describes a {config.get('_class_name')}, not an OSDiff "
                                 "model: the codec weights for your own SD checkpoint come from an OSDiff model "
                                 "folder (python -m diffo convert osdiff)")
        parts = cls(config)
        parts.fingerprint = load_parts_from_dir(parts, folder, PART_PREFIXES)
        return parts.eval().requires_grad_(False)

    def compress(self, latent: torch.Tensor, size: tuple[int, int], seed: int = 0) -> bytes:
        """A scaled SD latent [1, 4, h, w] (the image padded to a multiple of 64, then your VAE's encoder, ×
        `latent_scale`) of an image of `size` (H, W) → `.diffo` bytes."""
        from ... import pipeline

        h, w = size
        m = self.config.pad_multiple
        want = padded_latent_shape(h, w, m)
        if tuple(latent.shape[-2:]) != want or latent.shape[:2] != (1, self.latent_codec.g_a[0].conv1.in_channels):
            raise ValueError(f"the latent of a {w}x{h} image padded to a multiple of {m} must be [1, 4, {want[0]}, "
                             f"{want[1]}], got {list(latent.shape)}")
        return pipeline.container(self, OSDiffAnalysis(latent.float().cpu(), size), 0, None, seed)

    def features(self, x_t: torch.Tensor, hint: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                 module: CDDM | None = None) -> ControlFeatures:
        """The control module's residuals for a base UNet at (x_t, timestep) (see cddm.control_features);
        `module`: a copy of `control_module` on another device or dtype."""
        return control_features(module or self.control_module, x_t, hint, timestep, context)
