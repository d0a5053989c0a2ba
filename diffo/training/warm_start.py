"""A tiny model with a wider latent space, warm-started from a trained one.

The embedded model's 4-channel latent caps what any denoiser can reach: decoded from the *true* latent, its
held-out photos are already nearly as blurry (NIQE) as after coding, so the one step has nothing left to add.
`widen_latent` builds the same architecture with more latent channels and copies every weight whose shape did
not change (the VAE's body, the UNet's and the codec's inner layers). The layers that touch the latent keep the
old channels' weights in place; every weight by which an old channel's path reads a new channel starts at zero,
so the widened model starts out computing exactly what the old one did, and the new channels are learnt from
there (the same idea as ControlNet's zero convolutions). Every stage is then trained again (the latent space is new).
"""

from __future__ import annotations

import logging

import torch

from ..models.base import public_config
from ..models.diffo.codec import DiffoCodec, with_latent_channels

logger = logging.getLogger(__name__)
NEW_CHANNEL_LOGVAR = -12.0  # posterior log-variance of a new latent channel at the start (std 0.0025)


def _channel_map(old: int, new: int, c_old: int, c_new: int) -> torch.Tensor | None:
    """Where index i of a dimension of size `old` goes in one of size `new`, when the latent widens from
    `c_old` to `c_new` channels: the latent itself, the VAE's [mean, log-variance] pair, or the latent
    followed by other channels (the residual coder's [latent, base code] input). None: no such layout."""
    i = torch.arange(old)
    if (old, new) == (c_old, c_new):
        return i
    if (old, new) == (2 * c_old, 2 * c_new):
        return torch.where(i < c_old, i, i - c_old + c_new)
    if old > c_old and old - c_old == new - c_new:
        return torch.where(i < c_old, i, i - c_old + c_new)
    return None


def _widened_tensor(fresh: torch.Tensor, old: torch.Tensor, c_old: int, c_new: int) -> torch.Tensor | None:
    """`fresh` with `old`'s values at their new places, and zero where an old output channel reads a new input
    channel (dimension 1 of a convolution), so the old outputs are unchanged; the new outputs keep their fresh
    values (they feed only weights that are zero). None when the shapes do not map."""
    if old.dim() != fresh.dim():
        return None
    maps = []
    for o, n in zip(old.shape, fresh.shape):
        m = torch.arange(o) if o == n else _channel_map(o, n, c_old, c_new)
        if m is None:
            return None
        maps.append(m)
    out = fresh.clone()
    if out.dim() >= 2 and old.shape[1] != out.shape[1]:
        new_inputs = torch.nonzero(~torch.isin(torch.arange(out.shape[1]), maps[1]))[:, 0]
        out[maps[0][:, None], new_inputs[None, :]] = 0
    out[torch.meshgrid(*maps, indexing="ij")] = old
    return out


def widen_latent(source: DiffoCodec, channels: int) -> tuple[DiffoCodec, list[str]]:
    """A new model with `channels` latent channels (more than `source`'s), starting out as `source`: every
    parameter of `source` is copied, into its place in the wider tensors (buffers that no longer fit, the
    entropy coders' tables, are rebuilt when the model is saved). Returns the model and the names of the
    widened parameters."""
    c_old = source.latent_channels
    if channels <= c_old:
        raise ValueError(f"latent channels must be more than the model's {c_old} (got {channels})")
    # the trained latent scale is kept, so the old channels reach the codec and UNet as they were trained on
    # (the `latents` stage sets it anew)
    model = DiffoCodec(**with_latent_channels(public_config(source.config), channels))
    own, theirs = model.state_dict(), source.state_dict()
    params = dict(model.named_parameters())
    state, widened = {}, []
    for k, v in own.items():
        if k not in theirs:
            continue
        if theirs[k].shape == v.shape:
            state[k] = theirs[k]
            continue
        w = _widened_tensor(v, theirs[k], c_old, channels)
        if w is None and k in params:
            raise ValueError(f"cannot widen {k}: {tuple(theirs[k].shape)} → {tuple(v.shape)}")
        if w is not None and k in params:
            state[k] = w
            widened.append(k)
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
        # The new channels' posterior starts nearly deterministic, as the trained channels' is (their std is
        # 0.001-0.002 on photos): at a fresh layer's std of about 1 the sampling noise drowns what they carry,
        # and the decoder learns to ignore them instead of using them.
        moments = model.vae.quant_conv if model.vae.quant_conv is not None else model.vae.encoder.conv_out
        moments.weight[channels + c_old:] = 0
        moments.bias[channels + c_old:] = NEW_CHANNEL_LOGVAR
        # the new channels' residual starts at zero: ẑ₀ = ĉ there (other prediction types start them random:
        # the decoders ignore them at first either way)
        if model.config.prediction_type == "residual":
            model.denoiser.unet.conv_out.weight[c_old:] = 0
            model.denoiser.unet.conv_out.bias[c_old:] = 0
    logger.info("latent widened from %d to %d channels: %d tensors widened", c_old, channels, len(widened))
    return model, widened
