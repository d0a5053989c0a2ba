"""The latent codec of DiffO: a VQ structural base code plus a residual coded with a hyperprior.

    latent (1/8) ─ base encoder ─ VQ ─ indices (1/32) ─ CategoricalPrior ─────────────── stream 0
          │                             └ embed ┐
          └──────── g_a(latent, embed) ─ y (1/16) ─ × gain(rate) ─ GaussianConditional ─ stream 2
                                          └ h_a ─ z (1/64) ─ EntropyBottleneck ────────── stream 1
    decoder: ĉ = g_s(embed, ŷ)            (means, scales) = h_s(ẑ, embed)  [integer-exact]

Variable rate in one model: the rate level in [0, 1] is carried as a 16-bit integer; level 0 sends the
base code only, levels above pick a gain vector for y interpolated between `num_gains` learned ones.
Every quantity the entropy *decoder* needs (scales, means, gains) is computed with integer-exact
arithmetic (`layers.ExactConv2d`), so decoding never desynchronises across machines.
(Forward/compress/decompress follow CompressAI's contract; names follow the papers.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...bitstream import FORMAT_VERSION
from ...entropy import CategoricalPrior, EntropyBottleneck, SymbolCoder, coder_for_format, gaussian_conditional
from ...layers import WEIGHT_BITS, ExactConv2d, ResBlock, conv, exact_act, to_grid, upconv
from .vq import VectorQuantizer

GAIN_LIMIT = 64.0
MAX_RATE_Q = 65535  # rate levels travel as 16-bit integers (see bitstream.py)
WRITE_FORMAT = FORMAT_VERSION  # the .diffo format whose entropy coder every writer uses


def _coder(coder: SymbolCoder | None) -> SymbolCoder:
    """The given coder, or the one of the format every writer uses."""
    return coder if coder is not None else coder_for_format(WRITE_FORMAT)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def valid_extent(latent_valid: tuple[int, int], factor: int) -> tuple[int, int]:
    """How many positions at `factor`× below the latent touch the image (the rest is padding)."""
    return (-(-latent_valid[0] // factor), -(-latent_valid[1] // factor))


def fill_padding(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Extend the coded window x [B, C, h, w] to `size` by repeating its last row/column.

    Only the window that covers the image is entropy coded; encoder and decoder both fill the padding
    this way, so padding costs no bytes."""
    ph, pw = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if ph == 0 and pw == 0:
        return x
    dtype = x.dtype
    y = x if x.is_floating_point() else x.double()
    y = F.pad(y, (0, pw, 0, ph), mode="replicate")
    return y.to(dtype)


class VQBaseCodec(nn.Module):
    """latent (1/8 of the image) → codebook indices at 1/32 of the image, coded with a learned prior."""

    downsampling = 4  # relative to the latent

    def __init__(self, latent_channels: int, hidden: int, code_dim: int, codebook_size: int):
        super().__init__()
        self.encoder = nn.Sequential(
            conv(latent_channels, hidden, 3, 2), nn.GELU(), ResBlock(hidden),
            conv(hidden, hidden, 3, 2), nn.GELU(), conv(hidden, code_dim, 1),
        )
        self.quantizer = VectorQuantizer(codebook_size, code_dim)
        self.prior = CategoricalPrior(codebook_size)

    def forward(self, latent: torch.Tensor):
        vq = self.quantizer(self.encoder(latent))
        return vq, self.prior(vq.indices)

    @staticmethod
    def coded_window(valid: tuple[int, int]) -> tuple[int, int]:
        """The window of indices that is coded: `valid`, but never a single symbol, because CompressAI's
        rANS encoder (1.2.8, format 1) crashed on one-symbol strings; format 2 keeps the same window so both
        formats code the same symbols. The base grid is always at least 2x2."""
        return (valid[0], max(valid[1], 2)) if valid[0] * valid[1] == 1 else valid

    def compress(self, latent: torch.Tensor, valid: tuple[int, int],
                 coder: SymbolCoder | None = None) -> tuple[list[bytes], torch.Tensor]:
        """Strings of the indices inside the `valid` window; indices [B, h, w] with the padding filled."""
        valid = self.coded_window(valid)
        indices = self.quantizer.nearest(self.encoder(latent))[:, :valid[0], :valid[1]]
        strings = self.prior.compress(indices, _coder(coder))
        return strings, fill_padding(indices[:, None], self._shape(latent))[:, 0]

    def _shape(self, latent: torch.Tensor) -> tuple[int, int]:
        return latent.shape[-2] // self.downsampling, latent.shape[-1] // self.downsampling

    def decompress(self, strings: list[bytes], valid: tuple[int, int], shape: tuple[int, int],
                   coder: SymbolCoder | None = None) -> torch.Tensor:
        indices = self.prior.decompress(strings, self.coded_window(valid), _coder(coder))
        if int(indices.min()) < 0 or int(indices.max()) >= self.quantizer.codebook_size:  # forged streams only
            raise ValueError("base code index out of range")
        return fill_padding(indices[:, None], shape)[:, 0]


class HyperpriorResidualCodec(nn.Module):
    """The residual y (1/16 of the image) given the base code, with a hyperprior z (1/64)."""

    def __init__(self, latent_channels: int, code_dim: int, hidden: int, y_channels: int, z_channels: int,
                 num_gains: int, gain_min: float, gain_max: float):
        super().__init__()
        self.g_a = nn.Sequential(
            conv(latent_channels + code_dim, hidden, 3, 2), nn.GELU(), ResBlock(hidden), conv(hidden, y_channels),
        )
        self.h_a = nn.Sequential(conv(y_channels, hidden, 3, 2), nn.GELU(), conv(hidden, z_channels, 3, 2))
        # Integer-exact from here on: these layers decide the decoder's CDF indexes.
        self.h_s1 = ExactConv2d(z_channels, hidden, 3, padding=1)
        self.h_s2 = ExactConv2d(hidden, hidden, 3, padding=1)
        self.p1 = ExactConv2d(hidden + code_dim, hidden, 3, padding=1)
        self.p2 = ExactConv2d(hidden, 2 * y_channels, 1)
        self.entropy_bottleneck = EntropyBottleneck(z_channels)
        self.gaussian_conditional = gaussian_conditional()
        init = torch.exp(torch.linspace(torch.log(torch.tensor(gain_min)), torch.log(torch.tensor(gain_max)),
                                        num_gains))
        self.gains = nn.Parameter(init[:, None].repeat(1, y_channels))

    def gain(self, rate_q: int) -> torch.Tensor:
        """Gain vector [M] of rate level rate_q (1..MAX_RATE_Q), in float64, integer-exact.

        Linear interpolation between neighbouring learned gains; only IEEE-exact scalar operations and a
        final rounding onto the weight grid, so encoder and decoder agree on any machine."""
        if not 0 < rate_q <= MAX_RATE_Q:
            raise ValueError(f"residual rate level must be in 1..{MAX_RATE_Q}, got {rate_q}")
        g = to_grid(self.gains.double().clamp(2.0**-WEIGHT_BITS, GAIN_LIMIT), WEIGHT_BITS, GAIN_LIMIT)
        i, rem = divmod(rate_q * (len(g) - 1), MAX_RATE_Q)
        if i == len(g) - 1:
            return g[i]
        return to_grid(g[i] + (g[i + 1] - g[i]) * (rem / MAX_RATE_Q), WEIGHT_BITS, GAIN_LIMIT)

    def unit_entropy_parameters(self, z_hat: torch.Tensor, base_embed: torch.Tensor):
        """(means, scales) of the unit-gain residual y. Exact (float64) in eval mode."""
        h = exact_act(self.h_s1(F.interpolate(to_grid(z_hat), scale_factor=2.0, mode="nearest")))
        h = exact_act(self.h_s2(F.interpolate(h, scale_factor=2.0, mode="nearest")))
        e = F.interpolate(to_grid(base_embed), scale_factor=2.0, mode="nearest")
        means, scales = self.p2(exact_act(self.p1(torch.cat([h, e.to(h.dtype)], 1)))).chunk(2, 1)
        return means, scales.abs()

    @staticmethod
    def apply_gain(means: torch.Tensor, scales: torch.Tensor, gain: torch.Tensor):
        """(means, scales) of the gained residual y·g (products of grid values: exact in float64)."""
        g = gain.to(means.dtype)[None, :, None, None]
        return means * g, scales * g

    def entropy_parameters(self, z_hat: torch.Tensor, base_embed: torch.Tensor, gain: torch.Tensor):
        """(means, scales) of the gained residual y·g."""
        return self.apply_gain(*self.unit_entropy_parameters(z_hat, base_embed), gain)

    def analysis(self, latent: torch.Tensor, base_embed: torch.Tensor) -> torch.Tensor:
        return self.g_a(torch.cat([latent, F.interpolate(base_embed, scale_factor=4.0, mode="nearest")], 1))

    def forward(self, latent: torch.Tensor, base_embed: torch.Tensor, rate_q: int):
        """Training pass: ŷ (unit gain, straight-through rounding) and the likelihoods of y and z."""
        y = self.analysis(latent, base_embed)
        z = self.h_a(y)
        _, z_likelihoods = self.entropy_bottleneck(z)
        medians = self.entropy_bottleneck._get_medians()
        z_hat = _round_ste(z - medians) + medians
        g = self.gain(rate_q)
        means, scales = self.entropy_parameters(z_hat, base_embed, g)
        g = g.float()[None, :, None, None]
        _, y_likelihoods = self.gaussian_conditional(y * g, scales.float(), means.float())
        y_hat = (_round_ste(y * g - means.float()) + means.float()) / g
        return y_hat, {"y": y_likelihoods, "z": z_likelihoods}

    @torch.no_grad()
    def analyse(self, latent: torch.Tensor, base_embed: torch.Tensor, latent_valid: tuple[int, int],
                coder: SymbolCoder | None = None) -> "ResidualAnalysis":
        """Everything of the residual that does not depend on the rate level: y, the z strings (only the
        window that covers the image) and the unit-gain entropy parameters, computed as the decoder will."""
        y = self.analysis(latent, base_embed)
        z = self.h_a(y)
        zv = valid_extent(latent_valid, 8)
        coder = _coder(coder)
        z_strings = self.entropy_bottleneck.compress(z[..., :zv[0], :zv[1]].contiguous(), coder)
        z_hat = fill_padding(self.entropy_bottleneck.decompress(z_strings, zv, coder), z.shape[-2:])
        means, scales = self.unit_entropy_parameters(z_hat, base_embed)
        return ResidualAnalysis(y.double(), z_strings, means, scales, coder.format_version)

    @torch.no_grad()
    def compress(self, latent: torch.Tensor, base_embed: torch.Tensor, rate_q: int, latent_valid: tuple[int, int],
                 analysis: "ResidualAnalysis | None" = None, coder: SymbolCoder | None = None):
        """(z strings, y strings) of rate level rate_q; pass `analysis` to reuse it across rate levels."""
        coder = _coder(coder)
        an = analysis or self.analyse(latent, base_embed, latent_valid, coder)
        if an.format_version != coder.format_version:  # its z strings are in the other format's code
            raise ValueError(f"the residual analysis was coded for format {an.format_version}, not "
                             f"{coder.format_version}")
        g = self.gain(rate_q)
        means, scales = self.apply_gain(an.means, an.scales, g)
        yv = valid_extent(latent_valid, 2)
        win = (..., slice(0, yv[0]), slice(0, yv[1]))
        indexes = self.gaussian_conditional.build_indexes(scales)
        y_g = an.y * g[None, :, None, None]
        y_strings = self.gaussian_conditional.compress(y_g[win].contiguous(), indexes[win].contiguous(),
                                                       means[win].contiguous(), coder)
        return an.z_strings, y_strings

    @torch.no_grad()
    def decompress(self, z_strings: list[bytes], y_strings: list[bytes], base_embed: torch.Tensor, rate_q: int,
                   latent_valid: tuple[int, int], coder: SymbolCoder | None = None) -> torch.Tensor:
        """ŷ (unit gain) [B, M, h/2, w/2] of the latent grid, its padding filled."""
        lh, lw = base_embed.shape[-2] * 4, base_embed.shape[-1] * 4
        zv, yv = valid_extent(latent_valid, 8), valid_extent(latent_valid, 2)
        coder = _coder(coder)
        z_hat = fill_padding(self.entropy_bottleneck.decompress(z_strings, zv, coder), (lh // 8, lw // 8))
        g = self.gain(rate_q)
        means, scales = self.entropy_parameters(z_hat, base_embed, g)
        win = (..., slice(0, yv[0]), slice(0, yv[1]))
        indexes = self.gaussian_conditional.build_indexes(scales)[win].contiguous()
        y_hat = self.gaussian_conditional.decompress(y_strings, indexes, means[win].contiguous(), coder)
        y_hat = fill_padding(y_hat, (lh // 2, lw // 2))
        return (y_hat / g[None, :, None, None]).float()


@dataclass
class ResidualAnalysis:
    """The rate-independent part of residual coding (see HyperpriorResidualCodec.analyse)."""

    y: torch.Tensor  # float64, unit gain
    z_strings: list
    means: torch.Tensor  # unit gain, exact
    scales: torch.Tensor
    format_version: int  # whose coder wrote z_strings


@dataclass
class LatentCodecOutput:
    c_hat: torch.Tensor  # decoded latent estimate ĉ [B, C, h, w]
    likelihoods: dict  # name -> likelihood tensor, for the rate term
    vq: object  # VQOutput of the base code


class DiffoLatentCodec(nn.Module):
    """Base + residual latent codec with its synthesis transform g_s (the decoded latent ĉ)."""

    downsampling = 8  # relative to the latent: z sits at 1/8 of it (1/64 of the image)

    def __init__(self, latent_channels: int = 4, hidden: int = 64, code_dim: int = 8, codebook_size: int = 256,
                 y_channels: int = 64, z_channels: int = 32, num_gains: int = 8, gain_min: float = 0.25,
                 gain_max: float = 4.0):
        super().__init__()
        self.base = VQBaseCodec(latent_channels, hidden, code_dim, codebook_size)
        self.residual = HyperpriorResidualCodec(latent_channels, code_dim, hidden, y_channels, z_channels,
                                                num_gains, gain_min, gain_max)
        self.g_s_base = upconv(code_dim, hidden, 4)
        self.g_s_residual = upconv(y_channels, hidden, 2)
        self.g_s = nn.Sequential(nn.GELU(), ResBlock(hidden), ResBlock(hidden), conv(hidden, latent_channels))
        self.y_channels = y_channels

    def synthesize(self, base_embed: torch.Tensor, y_hat: torch.Tensor | None) -> torch.Tensor:
        """ĉ from the base code and (unless rate level 0) the residual."""
        h = self.g_s_base(base_embed)
        if y_hat is not None:
            h = h + self.g_s_residual(y_hat)
        return self.g_s(h)

    def forward(self, latent: torch.Tensor, rate_q: int) -> LatentCodecOutput:
        vq, index_likelihoods = self.base(latent)
        likelihoods = {"indices": index_likelihoods}
        y_hat = None
        if rate_q > 0:
            y_hat, lk = self.residual(latent, vq.embed, rate_q)
            likelihoods.update(lk)
        return LatentCodecOutput(self.synthesize(vq.embed, y_hat), likelihoods, vq)

    # `latent_valid` is the part of the (padded) latent that covers the image: ceil(H/8) x ceil(W/8).
    @torch.no_grad()
    def compress_base(self, latent: torch.Tensor, latent_valid: tuple[int, int],
                      coder: SymbolCoder | None = None) -> tuple[list[bytes], torch.Tensor]:
        """Base-code strings and indices (one per batch element): the same for every rate level."""
        return self.base.compress(latent, valid_extent(latent_valid, self.base.downsampling), coder)

    @torch.no_grad()
    def analyse_residual(self, latent: torch.Tensor, indices: torch.Tensor, latent_valid: tuple[int, int],
                         coder: SymbolCoder | None = None) -> ResidualAnalysis:
        return self.residual.analyse(latent, self.base.quantizer.embed(indices), latent_valid, coder)

    @torch.no_grad()
    def compress_residual(self, latent: torch.Tensor, indices: torch.Tensor, rate_q: int,
                          latent_valid: tuple[int, int], analysis: ResidualAnalysis | None = None,
                          coder: SymbolCoder | None = None):
        """(z strings, y strings) of rate level rate_q > 0; `analysis` (from analyse_residual) skips the
        rate-independent work when several levels are tried."""
        return self.residual.compress(latent, self.base.quantizer.embed(indices), rate_q, latent_valid, analysis,
                                      coder)

    @torch.no_grad()
    def decode_symbols(self, streams: list[tuple[bytes, ...]], latent_shape: tuple[int, int], rate_q: int,
                       latent_valid: tuple[int, int], coder: SymbolCoder | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The entropy-decoded symbols of per-image streams (base,) or (base, z, y): base indices, their
        codebook embedding, and the residual ŷ (None at rate level 0). latent_shape is padded to 8; `coder`
        is the one of the streams' format (default: the format writers use)."""
        h, w = latent_shape
        s = self.base.downsampling
        coder = _coder(coder)
        indices = self.base.decompress([st[0] for st in streams], valid_extent(latent_valid, s), (h // s, w // s),
                                       coder)
        embed = self.base.quantizer.embed(indices)
        y_hat = None
        if rate_q > 0:
            y_hat = self.residual.decompress([st[1] for st in streams], [st[2] for st in streams], embed, rate_q,
                                             latent_valid, coder)
        return indices, embed, y_hat

    @torch.no_grad()
    def decompress(self, streams: list[tuple[bytes, ...]], latent_shape: tuple[int, int], rate_q: int,
                   latent_valid: tuple[int, int], coder: SymbolCoder | None = None):
        """ĉ [B, C, h, w] from per-image streams (base,) or (base, z, y). latent_shape is padded to 8."""
        _, embed, y_hat = self.decode_symbols(streams, latent_shape, rate_q, latent_valid, coder)
        return self.synthesize(embed, y_hat)
