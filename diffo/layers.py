"""Small building blocks shared by the codec modules.

`ExactConv2d` and `exact_act` form *integer-exact* networks (Ballé et al., "Integer networks for data
compression with latent-variable models", ICLR 2019, in spirit): weights and activations live on fixed
binary grids, so every product and every partial sum is exactly representable in float64 and the result
does not depend on summation order, thread count, batch size or device. The entropy-coding parameters are
computed with them, which is what keeps encoder and decoder in sync on any machine (the failure CompressAI
users hit when scales are computed in ordinary floating point).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACT_BITS = 8  # activations are multiples of 2^-8 ...
ACT_LIMIT = 2.0**10  # ... with |a| <= 2^10
WEIGHT_BITS = 12  # weights are multiples of 2^-12 ...
WEIGHT_LIMIT = 8.0  # ... with |w| <= 8
# Worst case |sum| <= fan_in * 2^10 * 8 = fan_in * 2^13, on a grid of 2^-20: exact in float64 (53-bit
# mantissa) for fan_in < 2^20.


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


class ExactConv2d(nn.Conv2d):
    """A convolution whose eval-mode output is bit-identical everywhere.

    Training runs an ordinary float32 convolution on grid-rounded weights (straight-through), so the
    network learns with the rounding it will meet. Evaluation runs the same arithmetic in float64 as
    unfold + matmul (no Winograd/FFT algorithms whose transforms round), on inputs that must already lie
    on the activation grid; the output is then exact and is itself rounded back onto the grid.
    """

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = to_grid(self.weight, WEIGHT_BITS, WEIGHT_LIMIT)
        b = None if self.bias is None else to_grid(self.bias, ACT_BITS, ACT_LIMIT)
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.quantized_weight()
        if self.training:
            out = F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
            return to_grid(out)
        if self.groups != 1 or self.dilation != (1, 1):
            raise NotImplementedError("ExactConv2d supports groups=1, dilation=1 only")
        x64 = x.to(torch.float64)
        n, _, h, w_in = x64.shape
        kh, kw = self.kernel_size
        cols = F.unfold(x64, (kh, kw), padding=self.padding, stride=self.stride)  # [N, C*kh*kw, L]
        out = torch.matmul(w.to(torch.float64).reshape(self.out_channels, -1), cols)
        if b is not None:
            out = out + b.to(torch.float64)[:, None]
        oh = (h + 2 * self.padding[0] - kh) // self.stride[0] + 1
        ow = (w_in + 2 * self.padding[1] - kw) // self.stride[1] + 1
        return to_grid(out.reshape(n, self.out_channels, oh, ow))


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
