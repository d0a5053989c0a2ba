"""The values that travel on DiffO's custom wires, and conversions between ComfyUI's IMAGE/LATENT and `diffo`.

    DIFFO_MODEL      a `diffo.models.diffo.codec.DiffoCodec` (shared: every loader of the same model returns the same object)
    DIFFO_BITSTREAM  `Bitstreams`: one `.diffo` byte string per image of the batch
    DIFFO_LATENT     `CodedLatents`: the entropy-decoded latent ĉ of each stream, with its header
    DIFFO_CONTROL    `Controls`: the control module's output for each stream (noisy start x_t + residuals, per tile)
    LATENT           ComfyUI's {"samples": [B, C, h, w]} in the VAE's own (unscaled) units, as core VAE nodes
                     use it, plus "diffo_sizes": the pixel size of each image, for cropping the padding away
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffo.bitstream import Bitstream
from ..diffo.pipeline import ControlTiles, padded_latent_shape

MODEL = "DIFFO_MODEL"
BITSTREAM = "DIFFO_BITSTREAM"
CODED_LATENT = "DIFFO_LATENT"
CONTROL = "DIFFO_CONTROL"


class Bitstreams(list):
    """`.diffo` byte strings, one per image."""


@dataclass
class CodedLatents:
    headers: list[Bitstream]
    c_hat: list[torch.Tensor]  # each [1, C, h, w] at the padded latent size


@dataclass
class Controls:
    headers: list[Bitstream]
    c_hat: list[torch.Tensor]  # kept so the denoiser can redo the control at another strength or seed
    outputs: list[ControlTiles]  # per stream: the control output of each latent tile
    strength: list[float]
    seed: list[int]


def images_from_comfy(image: torch.Tensor) -> list[torch.Tensor]:
    """ComfyUI IMAGE [B, H, W, C] (float 0..1, possibly float16) → [3, H, W] float32 tensors."""
    if image.dim() != 4:
        raise ValueError(f"expected a ComfyUI IMAGE [batch, height, width, channels], got shape {tuple(image.shape)}")
    c = image.shape[-1]
    if c == 1:
        image = image.expand(-1, -1, -1, 3)
    elif c == 4:
        raise ValueError("this IMAGE has an alpha channel (4 channels); DiffO codes RGB: remove the alpha first "
                         "(e.g. with a 'Join Image with Alpha' / 'Split Image with Alpha' node)")
    elif c != 3:
        raise ValueError(f"expected an RGB IMAGE (3 channels), got {c} channels")
    return [im.permute(2, 0, 1).float().cpu() for im in image]


def images_to_comfy(images: list[torch.Tensor]) -> torch.Tensor:
    """[3, H, W] tensors of one size → ComfyUI IMAGE [B, H, W, 3] float32."""
    _same_size([tuple(im.shape[-2:]) for im in images], "images")
    return torch.stack([im.float().cpu().clamp(0, 1).permute(1, 2, 0) for im in images])


def _same_size(sizes: list[tuple[int, ...]], what: str) -> None:
    if len(set(sizes)) > 1:
        listed = ", ".join(f"{s[-1]}x{s[-2]}" for s in sizes)
        raise ValueError(f"these {what} have different sizes ({listed}); a ComfyUI batch holds one size: "
                         "decode the streams with separate nodes")


def latent_to_comfy(model, latents: list[torch.Tensor], headers: list[Bitstream]) -> dict:
    """Scaled DiffO latents → ComfyUI LATENT in the VAE's own units (as core VAE nodes have it); the division
    is the one `DiffoCodec.decode_latent` makes, so decoding the LATENT gives the same pixels."""
    _same_size([tuple(z.shape[-2:]) for z in latents], "latents")
    samples = torch.cat([z.float().cpu() for z in latents]) / model.vae.config.scaling_factor
    return {"samples": samples, "diffo_sizes": [(h.height, h.width) for h in headers]}


def latent_from_comfy(model, latent: dict) -> tuple[torch.Tensor, list[tuple[int, int]] | None]:
    """ComfyUI LATENT → (latent batch in the VAE's units, the image sizes to crop to, or None when unknown)."""
    samples = latent["samples"]
    if samples.dim() != 4 or samples.shape[1] != model.latent_channels:
        raise ValueError(f"this LATENT has shape {tuple(samples.shape)}; the DiffO model "
                         f"'{model.config.name}' decodes latents with {model.latent_channels} channels")
    sizes = latent.get("diffo_sizes")
    if sizes is not None:
        h, w = samples.shape[-2:]
        padded = [padded_latent_shape(model, sh, sw) for sh, sw in sizes]
        if len(sizes) != len(samples) or any(p != (h, w) for p in padded):
            # a core node resized or re-batched the latent: scale the crop with it, or decode it whole
            if len(sizes) == len(samples) and len(set(padded)) == 1:
                ph, pw = padded[0]
                sizes = [(round(sh * h / ph), round(sw * w / pw)) for sh, sw in sizes]
            else:
                sizes = None
    return samples.float(), sizes
