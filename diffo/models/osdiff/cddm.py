"""OSDiff's control module (CDDM) and its one step on a frozen Stable Diffusion UNet.

    hint ─┐
    x_T ──┴ cat ─ control branch (the SD UNet encoder at 0.2 width, own time embedding) ─┬ zero 1x1 convs
    x_T ─ SD UNet: input block k ── + enc_zero_convs[k](control k) ─ (the next block and the skip) ◄──────┤
                   middle block ─── + mid_zero_conv(control middle)  ◄──────────────────────────────────┤
                   output block k ─ + dec_zero_convs[k](control 11-k), before the skip-concat ◄─────────┘
    ε̂ at t = 999 from pure noise x_T;  x̂0 = (x_T − √(1−ᾱ)·ε̂) / √ᾱ

ControlNet-XS-like with control→base joins only (nothing flows back into the control branch), so the control
features are computed first (`control_features`) and added while the base UNet runs: here a diffusers UNet
(`control_eps`), in ComfyUI the user's own MODEL through its patch hooks (nodes/osdiff.py). The blocks are diffusers'
(`ResnetBlock2D`, `Transformer2DModel`, `Downsample2D`); the base UNet is a diffusers `UNet2DConditionModel`,
walked block by block because the joins land inside its down and up blocks (diffusers' ControlNet residuals
add to the skips only, which is not where CDDM adds them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding
from diffusers.models.resnet import Downsample2D, ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of n not above `at_most` (the reference's group and head-width rule)."""
    for d in range(min(n, at_most), 0, -1):
        if n % d == 0:
            return d
    return 1


def _resnet(cin: int, cout: int, temb: int) -> ResnetBlock2D:
    return ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=temb, groups=largest_divisor(cin, 32),
                         groups_out=largest_divisor(cout, 32), eps=1e-5, non_linearity="silu")


def _transformer(ch: int, head_dim: int, context_dim: int) -> Transformer2DModel:
    d = largest_divisor(ch, head_dim)
    return Transformer2DModel(num_attention_heads=ch // d, attention_head_dim=d, in_channels=ch,
                              cross_attention_dim=context_dim, use_linear_projection=True, norm_num_groups=32)


def _zero_conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def unet_channels(unet_config: dict) -> tuple[list[int], int, list[int]]:
    """Output channels of a diffusers SD UNet's input blocks (in LDM order: conv_in, then each resnet(+attention)
    and downsampler), of its middle block, and of its output blocks."""
    chans, layers = list(unet_config["block_out_channels"]), int(unet_config["layers_per_block"])
    enc = [chans[0]]
    for level, ch in enumerate(chans):
        enc += [ch] * layers + ([ch] if level < len(chans) - 1 else [])
    dec = [ch for ch in reversed(chans) for _ in range(layers + 1)]
    return enc, chans[-1], dec


class CDDM(nn.Module):
    """The control module: a reduced copy of the UNet encoder and the zero convolutions into the base UNet."""

    def __init__(self, unet_config: dict, control_channels: tuple[int, ...] = (64, 128, 256, 256),
                 attention_levels: tuple[bool, ...] = (True, True, True, False), head_dim: int = 16,
                 hint_channels: int = 4):
        super().__init__()
        in_ch, layers = int(unet_config["in_channels"]), int(unet_config["layers_per_block"])
        time_ch = int(unet_config["block_out_channels"][0])
        temb = time_ch * 4
        context = int(unet_config["cross_attention_dim"])
        if len(control_channels) != len(unet_config["block_out_channels"]) or len(attention_levels) != len(
                control_channels):
            raise ValueError("control_channels and attention_levels need one entry per UNet level")
        self.time_embedding = TimestepEmbedding(time_ch, temb)
        blocks = [nn.ModuleList([nn.Conv2d(in_ch + hint_channels, control_channels[0], 3, padding=1)])]
        ch = control_channels[0]
        ctr_out = [ch]
        for level, (out, attn) in enumerate(zip(control_channels, attention_levels)):
            for _ in range(layers):
                parts = [_resnet(ch, out, temb)] + ([_transformer(out, head_dim, context)] if attn else [])
                blocks.append(nn.ModuleList(parts))
                ch = out
                ctr_out.append(ch)
            if level < len(control_channels) - 1:
                blocks.append(nn.ModuleList([Downsample2D(ch, use_conv=True, out_channels=ch, padding=1, name="op")]))
                ctr_out.append(ch)
        self.input_blocks = nn.ModuleList(blocks)
        self.middle_block = nn.ModuleList([_resnet(ch, ch, temb), _transformer(ch, head_dim, context),
                                           _resnet(ch, ch, temb)])
        base_enc, base_mid, base_dec = unet_channels(unet_config)
        if len(base_enc) != len(ctr_out):
            raise ValueError(f"the control branch has {len(ctr_out)} input blocks, the UNet {len(base_enc)}")
        self.enc_zero_convs = nn.ModuleList(_zero_conv(c, b) for c, b in zip(ctr_out, base_enc))
        self.mid_zero_conv = _zero_conv(ch, base_mid)
        dec_in = [ctr_out[-1]] + [ctr_out[-(i + 1)] for i in range(1, len(ctr_out))]
        dec_out = [base_mid] + base_dec[:-1]
        self.dec_zero_convs = nn.ModuleList(_zero_conv(c, b) for c, b in zip(dec_in, dec_out))
        # per-join multipliers (all 1.0 in the published weights; kept because the checkpoint carries them)
        self.register_buffer("scales", torch.ones(len(self.enc_zero_convs) + 1 + len(self.dec_zero_convs)))


def _run(parts, h, emb, context):
    """One LDM-style block: resnets take the time embedding, transformers the prompt, the rest only h."""
    for m in parts:
        if isinstance(m, ResnetBlock2D):
            h = m(h, emb)
        elif isinstance(m, Transformer2DModel):
            h = m(h, encoder_hidden_states=context, return_dict=False)[0]
        else:
            h = m(h)
    return h


def _base_input_blocks(unet: UNet2DConditionModel):
    """The diffusers UNet's encoder as LDM input blocks: conv_in, (resnet, attention) pairs, downsamplers."""
    yield [unet.conv_in]
    for block in unet.down_blocks:
        attns = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            yield [resnet] + ([attns[j]] if attns is not None else [])
        if block.downsamplers is not None:
            yield list(block.downsamplers)


@dataclass
class ControlFeatures:
    """What the control module adds to a base UNet at one (x_t, t): one residual per input block (after the
    block, so also into its skip), one after the middle block, one per output block (before its skip-concat)."""

    input: list[torch.Tensor]
    middle: torch.Tensor
    output: list[torch.Tensor]


def control_features(cddm: CDDM, x_t: torch.Tensor, hint: torch.Tensor, timestep: torch.Tensor,
                     context: torch.Tensor) -> ControlFeatures:
    """The control branch alone (nothing flows back into it from the base UNet, so it runs first): its zero
    convolutions' outputs, scaled, ready to add. `timestep` may be fractional (ComfyUI's sampling gives floats)."""
    t_emb = get_timestep_embedding(timestep.reshape(-1).float(), cddm.time_embedding.linear_1.in_features,
                                   flip_sin_to_cos=True, downscale_freq_shift=0).to(x_t.dtype)
    if t_emb.shape[0] == 1 and x_t.shape[0] > 1:
        t_emb = t_emb.expand(x_t.shape[0], -1)
    emb = cddm.time_embedding(t_emb)
    scales = cddm.scales.to(x_t.dtype)
    h = torch.cat([x_t, hint.to(x_t.dtype)], 1)
    feats = []
    for k, parts in enumerate(cddm.input_blocks):
        h = _run(parts, h, emb, context)
        feats.append(h)
    n_in = len(feats)
    inputs = [cddm.enc_zero_convs[k](f) * scales[k] for k, f in enumerate(feats)]
    h = _run(cddm.middle_block, h, emb, context)
    middle = cddm.mid_zero_conv(h) * scales[n_in]
    outputs = [cddm.dec_zero_convs[k](feats[n_in - 1 - k]) * scales[n_in + 1 + k] for k in range(n_in)]
    return ControlFeatures(inputs, middle, outputs)


def control_eps(unet: UNet2DConditionModel, cddm: CDDM, x_t: torch.Tensor, hint: torch.Tensor,
                timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The UNet's ε̂ at (x_t, timestep) under the control module's guidance by `hint`."""
    feats = control_features(cddm, x_t, hint, timestep, context)
    emb = unet.time_embedding(unet.time_proj(timestep).to(x_t.dtype))
    h, skips = x_t, []
    for k, parts in enumerate(_base_input_blocks(unet)):
        h = _run(parts, h, emb, context) + feats.input[k]
        skips.append(h)
    h = unet.mid_block(h, emb, encoder_hidden_states=context) + feats.middle
    k = 0
    for block in unet.up_blocks:
        attns = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            h = torch.cat([h + feats.output[k], skips.pop()], 1)
            h = resnet(h, emb)
            if attns is not None:
                h = attns[j](h, encoder_hidden_states=context, return_dict=False)[0]
            k += 1
        if block.upsamplers is not None:
            size = skips[-1].shape[-2:] if skips else None
            for up in block.upsamplers:
                h = up(h, output_size=size)
    h = unet.conv_act(unet.conv_norm_out(h)) if unet.conv_norm_out is not None else h
    return unet.conv_out(h)
