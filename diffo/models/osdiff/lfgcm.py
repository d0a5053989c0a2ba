"""OSDiff's latent codec: LFGCM (the DiffEIC/OSDiff codec, ELIC-style), re-implemented for the published weights.

    latent (SD VAE, ×0.18215, 1/8) ─ g_a ─ y (M=320 channels, 1/16) ─ h_a ─ z (N=192, 1/64)
    z ─ EntropyBottleneck ─ ẑ ─ h_s ─ hyper parameters (2M channels, 1/16)
    y in 10 uneven channel slices; each slice: anchors (row + column odd) from [channel context of the earlier
      slices, hyper parameters], then non-anchors from [local 5x5 context of the decoded anchors, the same]
    ŷ ─ g_s ─ the hint (4 channels, 1/8), which the control module feeds to the UNet

Everything that chooses a CDF table (h_s, the channel and local contexts, the entropy-parameter networks) runs
on exact arithmetic (`layers.FINE` grid, float64 sums), so decoding never desynchronises across machines or
devices; the published float weights are rounded onto that grid at load, which changes the rate slightly
(README). g_a, h_a and g_s are ordinary float networks: they shape the symbols on the encoder and the hint on
the decoder, never the tables. All y slices share one range-coded string, coded in the decoder's order (a
sequence of chunks, see `entropy.coders.RangeCoder.encode_chunks`).

Reference: Li et al., "Towards Extreme Image Compression with Latent Feature Guidance and Diffusion Prior"
(DiffEIC, IEEE TCSVT 2024); Guo et al., "OSDiff: One-step diffusion image compression" (2025); He et al.,
"ELIC" (CVPR 2022) for the slices and the checkerboard.
"""

from __future__ import annotations

import torch
from torch import nn

from ...entropy import EntropyBottleneck, GaussianConditional, SymbolCoder, gaussian_conditional
from ...layers import FINE, ExactGELU, FineExactConv2d, FineExactConvTranspose2d, to_grid

SLICES = (8, 8, 8, 8, 16, 16, 32, 32, 96, 96)


def conv(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)


class ResidualBlockWithStride(nn.Module):
    """conv3x3/2 ─ LeakyReLU ─ conv3x3 ─ LeakyReLU(0.1), plus a 1x1/2 projection of the input."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.conv2 = conv(cin, cout, stride=2), conv(cout, cout)
        self.downsample = conv(cin, cout, 1, stride=2)

    def forward(self, x):
        out = nn.functional.leaky_relu(self.conv1(x), 0.01)
        out = nn.functional.leaky_relu(self.conv2(out), 0.1)
        return out + self.downsample(x)


class ResidualBlockUpsample(nn.Module):
    """Sub-pixel 2x upsampling (1x1 conv + PixelShuffle) in both branches; 3x3 conv in the main one."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.subpel = nn.Sequential(conv(cin, cout * 4, 1), nn.PixelShuffle(2))
        self.conv = conv(cout, cout)
        self.upsample = nn.Sequential(conv(cin, cout * 4, 1), nn.PixelShuffle(2))

    def forward(self, x):
        out = nn.functional.leaky_relu(self.subpel(x), 0.01)
        out = nn.functional.leaky_relu(self.conv(out), 0.1)
        return out + self.upsample(x)


class ResidualBottleneck(nn.Module):
    """x + 1x1 ─ GELU ─ 3x3 ─ GELU ─ 1x1 (half width inside)."""

    def __init__(self, n: int):
        super().__init__()
        self.branch = nn.Sequential(conv(n, n // 2, 1), nn.GELU(), conv(n // 2, n // 2), nn.GELU(), conv(n // 2, n, 1))

    def forward(self, x):
        return x + self.branch(x)


def exact_convt(cin: int, cout: int, kernel: int = 5, stride: int = 2) -> FineExactConvTranspose2d:
    return FineExactConvTranspose2d(cin, cout, kernel, stride=stride, padding=kernel // 2, output_padding=stride - 1)


def exact_mlp(cin: int, cout: int) -> nn.Sequential:
    """The entropy-parameter network: three 1x1 convolutions (widths 5/3 and 4/3 of the output) with GELU."""
    return nn.Sequential(FineExactConv2d(cin, cout * 5 // 3, 1), ExactGELU(),
                         FineExactConv2d(cout * 5 // 3, cout * 4 // 3, 1), ExactGELU(),
                         FineExactConv2d(cout * 4 // 3, cout, 1))


def exact_channel_context(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(FineExactConv2d(cin, 224, 5, padding=2), ExactGELU(),
                         FineExactConv2d(224, 128, 5, padding=2), ExactGELU(),
                         FineExactConv2d(128, cout, 5, padding=2))


def anchor_mask(h: int, w: int, device=None) -> torch.Tensor:
    """True at the anchors: the positions where row + column is odd (coded first in every slice)."""
    r = torch.arange(h, device=device)[:, None]
    c = torch.arange(w, device=device)[None, :]
    return (r + c) % 2 == 1


class LFGCM(nn.Module):
    """The latent codec. `compress(latent, coder) -> (z_string, y_string, z_shape)`,
    `decompress(z_string, y_string, z_shape, coder) -> hint` (`coder`: the format's SymbolCoder); `forward` is not
    provided (no training here)."""

    downsampling_factor = 64  # image pixels per z position (the SD VAE's 8 × 8 here)

    def __init__(self, in_channels: int = 4, out_channels: int = 4, analysis_channels: int = 64, N: int = 192,
                 M: int = 320, slices: tuple[int, ...] = SLICES):
        super().__init__()
        if sum(slices) != M:
            raise ValueError(f"the slices {list(slices)} must add up to M={M}")
        self.slices = tuple(int(s) for s in slices)
        self.g_a = nn.Sequential(ResidualBlockWithStride(in_channels, analysis_channels),
                                 *[ResidualBottleneck(analysis_channels) for _ in range(3)],
                                 conv(analysis_channels, M))
        self.h_a = nn.Sequential(conv(M, N), nn.GELU(), conv(N, N, 5, 2), nn.GELU(), conv(N, N, 5, 2), conv(N, N, 1))
        self.h_s = nn.Sequential(exact_convt(N, M), ExactGELU(), exact_convt(M, M * 3 // 2), ExactGELU(),
                                 exact_convt(M * 3 // 2, M * 2, kernel=3, stride=1))
        self.g_s = nn.Sequential(conv(M, N), *[ResidualBottleneck(N) for _ in range(3)], ResidualBlockUpsample(N, N),
                                 *[ResidualBottleneck(N) for _ in range(3)], conv(N, out_channels))
        self.local_context = nn.ModuleList(FineExactConv2d(c, 2 * c, 5, padding=2) for c in self.slices)
        # slice i > 0 sees the decoded slices before it (entry i - 1 here)
        self.channel_context = nn.ModuleList(exact_channel_context(sum(self.slices[:i]), 2 * c)
                                             for i, c in enumerate(self.slices) if i)
        self.entropy_parameters_anchor = nn.ModuleList(
            exact_mlp(2 * M + (2 * c if i else 0), 2 * c) for i, c in enumerate(self.slices))
        self.entropy_parameters_nonanchor = nn.ModuleList(
            exact_mlp(2 * M + (4 * c if i else 2 * c), 2 * c) for i, c in enumerate(self.slices))
        self.entropy_bottleneck = EntropyBottleneck(N)
        self.gaussian_conditional: GaussianConditional = gaussian_conditional()

    # ------------------------------------------------------------------------------------------ parts
    def hyper_parameters(self, z_hat: torch.Tensor) -> torch.Tensor:
        """ẑ (integers + medians, put on the grid) → the 2M-channel hyper parameters, exactly."""
        if not self.h_s[0].exact:  # the reference's float path (layers.set_exact)
            return self.h_s(z_hat.float())
        return self.h_s(to_grid(z_hat.double(), FINE.act_bits, FINE.act_limit))

    def _params(self, i: int, hyper: torch.Tensor, channel_ctx: torch.Tensor | None,
                local_ctx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales, means) of slice i: anchors without `local_ctx`, non-anchors with it (scales come first)."""
        parts = [p for p in (local_ctx, channel_ctx) if p is not None] + [hyper]
        net = self.entropy_parameters_anchor[i] if local_ctx is None else self.entropy_parameters_nonanchor[i]
        scales, means = net(torch.cat(parts, 1)).chunk(2, 1)
        return scales, means

    def _slices(self, hyper: torch.Tensor, code_slice) -> torch.Tensor:
        """Walk the slices in the decoder's order. `code_slice(i, part, scales, means, mask)` returns the
        dequantised values of slice i at `mask` (the anchors, then the non-anchors), zero elsewhere."""
        h, w = hyper.shape[-2:]
        anchors = anchor_mask(h, w, hyper.device)
        done: list[torch.Tensor] = []
        for i in range(len(self.slices)):
            channel_ctx = self.channel_context[i - 1](torch.cat(done, 1)) if i else None
            scales, means = self._params(i, hyper, channel_ctx)
            anchor = code_slice(i, "anchor", scales, means, anchors)
            scales, means = self._params(i, hyper, channel_ctx, self.local_context[i](anchor))
            nonanchor = code_slice(i, "nonanchor", scales, means, ~anchors)
            done.append(anchor + nonanchor)
        return torch.cat(done, 1)

    # -------------------------------------------------------------------------------------- coding
    @torch.no_grad()
    def compress(self, latent: torch.Tensor, coder: SymbolCoder) -> tuple[bytes, bytes, tuple[int, int]]:
        """SD latent [1, 4, h, w] (h, w multiples of 8) → (z string, y string, z shape)."""
        if latent.shape[0] != 1:
            raise ValueError(f"LFGCM codes one latent at a time, got a batch of {latent.shape[0]}")
        y = self.g_a(latent.float())
        z = self.h_a(y)
        z_string = self.entropy_bottleneck.compress(z, coder)[0]
        z_hat = self.entropy_bottleneck.decompress([z_string], tuple(z.shape[-2:]), coder)
        chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
        offsets = [0, *torch.tensor(self.slices).cumsum(0).tolist()]

        def code_slice(i, part, scales, means, mask):
            y_i = y[:, offsets[i]:offsets[i + 1]].to(means.dtype)  # float64 on the exact path
            symbols = torch.round(y_i - means)  # half to even, like CompressAI
            chunks.append((_at(symbols, mask).long(), _at(self.gaussian_conditional.build_indexes(scales), mask)))
            return torch.where(mask, symbols + means, torch.zeros_like(means))

        self._slices(self.hyper_parameters(z_hat), code_slice)
        y_string = coder.encode_chunks([(s.numpy(), i.numpy()) for s, i in chunks],
                                       self.gaussian_conditional.tables())
        return z_string, y_string, tuple(z.shape[-2:])

    @torch.no_grad()
    def decode_y(self, z_string: bytes, y_string: bytes, z_shape: tuple[int, int], coder: SymbolCoder
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The strings → (ŷ [1, M, 4h, 4w], float64 on the exact path; the integer symbols of each chunk in coding
        order)."""
        z_hat = self.entropy_bottleneck.decompress([z_string], tuple(z_shape), coder)
        hyper = self.hyper_parameters(z_hat.to(self.h_s[0].weight.device))
        reader = coder.chunk_decoder(y_string, self.gaussian_conditional.tables())
        symbols: list[torch.Tensor] = []

        def code_slice(i, part, scales, means, mask):
            idx = _at(self.gaussian_conditional.build_indexes(scales), mask)
            got = torch.from_numpy(reader.decode(idx.numpy())).to(means.device)
            symbols.append(got)
            full = torch.zeros_like(means)
            full[mask.expand_as(means)] = got.to(means.dtype)
            return torch.where(mask, full + means, full)

        y_hat = self._slices(hyper, code_slice)
        return y_hat, symbols

    @torch.no_grad()
    def decode_symbols(self, z_string: bytes, y_string: bytes, z_shape: tuple[int, int], coder: SymbolCoder
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the integer ẑ symbols [1, N, h, w], every ŷ symbol in coding order, flat): identical everywhere."""
        indexes, _ = self.entropy_bottleneck._indexes_and_medians(1, tuple(z_shape))
        z_symbols = self.entropy_bottleneck.decompress_symbols([z_string], indexes, coder)
        _, y_symbols = self.decode_y(z_string, y_string, z_shape, coder)
        return z_symbols.cpu(), torch.cat(y_symbols).cpu()

    @torch.no_grad()
    def decompress(self, z_string: bytes, y_string: bytes, z_shape: tuple[int, int], coder: SymbolCoder
                   ) -> torch.Tensor:
        """The strings → the hint [1, 4, 8h, 8w] (float32) for the control module."""
        y_hat, _ = self.decode_y(z_string, y_string, z_shape, coder)
        return self.g_s(y_hat.to(self.g_s[0].weight.dtype))


def _at(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The entries of t [1, C, H, W] at mask [H, W], channel-major then raster order, on the CPU."""
    return t[mask.expand_as(t)].cpu()
