"""Small building blocks shared by the codec modules.

`ExactConv2d` and `exact_act` form *integer-exact* networks (Ballé et al., "Integer networks for data
compression with latent-variable models", ICLR 2019, in spirit): weights and activations live on fixed
binary grids, so every product and every partial sum is exactly representable in float64 and the result
does not depend on summation order, thread count, batch size or device. The entropy-coding parameters are
computed with them, which is what keeps encoder and decoder in sync on any machine (the failure CompressAI
users hit when scales are computed in ordinary floating point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ACT_BITS = 8  # activations are multiples of 2^-8 ...
ACT_LIMIT = 2.0**10  # ... with |a| <= 2^10
WEIGHT_BITS = 12  # weights are multiples of 2^-12 ...
WEIGHT_LIMIT = 8.0  # ... with |w| <= 8
# Worst case |sum| <= fan_in * 2^10 * 8 = fan_in * 2^13, on a grid of 2^-20: exact in float64 (53-bit
# mantissa) for fan_in < 2^20.


@dataclass(frozen=True)
class Grid:
    """The fixed binary grids of an exact network: activations k·2^-act_bits (|a| <= act_limit), weights
    k·2^-weight_bits (|w| <= weight_limit). Sums stay exact in float64 while
    log2(fan_in) + log2(act_limit · weight_limit) + act_bits + weight_bits <= 53."""

    act_bits: int = ACT_BITS
    act_limit: float = ACT_LIMIT
    weight_bits: int = WEIGHT_BITS
    weight_limit: float = WEIGHT_LIMIT

    def max_fan_in(self) -> int:
        spare = 53 - math.log2(self.act_limit * self.weight_limit) - self.act_bits - self.weight_bits
        return int(2 ** spare)


COARSE = Grid()  # DiffO's entropy networks, trained on this grid
# Published float weights (OSDiff's entropy parameters) rounded onto a grid fine enough to change the rate only
# slightly (measured in the README): fan-in up to 2^13 (a 5x5 convolution over 320 channels) stays exact.
FINE = Grid(act_bits=10, weight_bits=16)
_CHUNK_ELEMENTS = 1 << 23  # float64 im2col elements per block of output rows (64 MiB)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter: a join that starts as the identity (ControlNet's zero convolution)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def to_grid(x: torch.Tensor, bits: int = ACT_BITS, limit: float = ACT_LIMIT) -> torch.Tensor:
    """Clamp to [-limit, limit] and round to multiples of 2^-bits (straight-through gradient)."""
    scale = 2.0**bits
    return _round_ste(x.clamp(-limit, limit) * scale) / scale


def exact_act(x: torch.Tensor) -> torch.Tensor:
    """The nonlinearity of exact networks: ReLU back onto the activation grid (both exact operations)."""
    return to_grid(F.relu(x))


def exact_gelu(x: torch.Tensor, grid: Grid = FINE) -> torch.Tensor:
    """GELU (erf form) of grid values, rounded back onto the grid. erf is not an exact operation, but on
    every input of the grid the result lies at least 1e-6 grid steps from a rounding boundary (checked
    exhaustively by tests/test_layers_exact.py), far above any float64 erf error: the rounded value is the same
    on every machine."""
    return to_grid(F.gelu(x.double()), grid.act_bits, grid.act_limit)


def exact_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int],
                 padding: tuple[int, int]) -> torch.Tensor:
    """Convolution of grid values with grid weights in float64 as unfold + matmul (no Winograd/FFT
    algorithms whose transforms round): every partial sum is exact, so any summation order gives the same
    result. Computed in blocks of output rows to bound memory on large images."""
    x64, w64 = x.to(torch.float64), weight.to(torch.float64)
    n, cin, h, w_in = x64.shape
    cout, _, kh, kw = w64.shape
    (sh, sw), (ph, pw) = stride, padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w_in + 2 * pw - kw) // sw + 1
    x64 = F.pad(x64, (pw, pw, ph, ph))
    wmat = w64.reshape(cout, -1)
    rows = max(1, _CHUNK_ELEMENTS // max(1, cin * kh * kw * ow * n))
    out = []
    for r0 in range(0, oh, rows):
        r1 = min(oh, r0 + rows)
        band = x64[:, :, r0 * sh:(r1 - 1) * sh + kh]
        cols = F.unfold(band, (kh, kw), stride=(sh, sw))  # [N, C*kh*kw, L]
        o = torch.matmul(wmat, cols)
        if bias is not None:
            o = o + bias.to(torch.float64)[:, None]
        out.append(o.reshape(n, cout, r1 - r0, ow))
    return torch.cat(out, 2)


class ExactConv2d(nn.Conv2d):
    """A convolution whose eval-mode output is bit-identical everywhere.

    Training runs an ordinary float32 convolution on grid-rounded weights (straight-through), so the
    network learns with the rounding it will meet. Evaluation runs the same arithmetic in float64
    (`exact_conv2d`), on inputs that must already lie on the activation grid; the output is then exact and is
    itself rounded back onto the grid.
    """

    grid: Grid = COARSE

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        g = self.grid
        w = to_grid(self.weight, g.weight_bits, g.weight_limit)
        b = None if self.bias is None else to_grid(self.bias, g.act_bits, g.act_limit)
        return w, b

    def _on_grid(self, out: torch.Tensor) -> torch.Tensor:
        return to_grid(out, self.grid.act_bits, self.grid.act_limit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.quantized_weight()
        if self.training:
            out = F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
            return self._on_grid(out)
        if self.groups != 1 or self.dilation != (1, 1):
            raise NotImplementedError("ExactConv2d supports groups=1, dilation=1 only")
        return self._on_grid(exact_conv2d(x, w, b, self.stride, self.padding))


class FineExactConv2d(ExactConv2d):
    """ExactConv2d on the FINE grid (published float weights). With `exact = False` it is a plain float32
    convolution of the unrounded weights: the reference implementation's arithmetic, for measuring what the
    grid changes (`set_exact`)."""

    grid = FINE
    exact = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.exact and not self.training:
            return F.conv2d(x.float(), self.weight, self.bias, self.stride, self.padding)
        return super().forward(x)


class FineExactConvTranspose2d(nn.ConvTranspose2d):
    """A transposed convolution on the FINE grid, exact in eval mode: the input is spread onto a zero grid at
    the stride, padded, and convolved with the flipped kernel by `exact_conv2d`."""

    grid = FINE
    exact = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.exact and not self.training:
            return F.conv_transpose2d(x.float(), self.weight, self.bias, self.stride, self.padding, self.output_padding)
        g = self.grid
        w = to_grid(self.weight, g.weight_bits, g.weight_limit)
        b = None if self.bias is None else to_grid(self.bias, g.act_bits, g.act_limit)
        if self.training:
            return to_grid(F.conv_transpose2d(x, w, b, self.stride, self.padding, self.output_padding),
                           g.act_bits, g.act_limit)
        if self.groups != 1 or self.dilation != (1, 1):
            raise NotImplementedError("FineExactConvTranspose2d supports groups=1, dilation=1 only")
        n, c, h, w_in = x.shape
        (sh, sw), (kh, kw) = self.stride, self.kernel_size
        (ph, pw), (oph, opw) = self.padding, self.output_padding
        spread = x.new_zeros((n, c, (h - 1) * sh + 1, (w_in - 1) * sw + 1), dtype=torch.float64)
        spread[:, :, ::sh, ::sw] = x
        spread = F.pad(spread, (kw - 1 - pw, kw - 1 - pw + opw, kh - 1 - ph, kh - 1 - ph + oph))
        kernel = w.flip(2, 3).transpose(0, 1)  # [in, out, kh, kw] → [out, in, kh, kw]
        return to_grid(exact_conv2d(spread, kernel, b, (1, 1), (0, 0)), g.act_bits, g.act_limit)


class ExactGELU(nn.Module):
    """GELU between exact layers (see `exact_gelu`); a plain GELU in training."""

    grid = FINE
    exact = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.exact:
            return F.gelu(x)
        return exact_gelu(x, self.grid)


def set_exact(module: nn.Module, exact: bool) -> nn.Module:
    """Switch every FINE-grid layer inside `module` between exact arithmetic (True, the default: decodes the same
    everywhere) and the plain float32 arithmetic of the published weights (False: only for measuring the
    difference; streams made that way can desynchronise across machines)."""
    for m in module.modules():
        if isinstance(m, (FineExactConv2d, FineExactConvTranspose2d, ExactGELU)):
            m.exact = exact
    return module


class ContiguousGroupNorm(nn.GroupNorm):
    """GroupNorm that normalises a contiguous copy of its input. PyTorch's CPU kernel for strided
    (channels-last) inputs splits its reductions by thread count, so a 1-thread and a 2-thread decode
    differed in the last bits (seen in the VAE decoder); the contiguous kernel does not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous())


def use_contiguous_group_norm(model: nn.Module) -> nn.Module:
    """Switch every nn.GroupNorm inside `model` (diffusers' blocks included) to ContiguousGroupNorm in place;
    parameters and state-dict keys are unchanged."""
    for m in model.modules():
        if type(m) is nn.GroupNorm:
            m.__class__ = ContiguousGroupNorm
    return model


def conv(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)


def upconv(cin: int, cout: int, factor: int = 2) -> nn.Sequential:
    """Nearest upsampling then a 3x3 conv: no checkerboard artefacts of transposed convolutions."""
    return nn.Sequential(nn.Upsample(scale_factor=factor, mode="nearest"), conv(cin, cout))


class ResBlock(nn.Module):
    """Two 3x3 convolutions with GELU and a skip connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv(channels, channels), nn.GELU(), conv(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)
