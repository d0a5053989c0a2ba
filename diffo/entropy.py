"""Entropy models on top of CompressAI's (its rANS coder does the actual coding).

- `CategoricalPrior`: a learned distribution over the VQ codebook indices of the base code.
- `gaussian_conditional()`: CompressAI's `GaussianConditional` with the usual log-spaced scale table.

All CDF tables are built by `update()` once, when a model is finalised, and stored as integer buffers in
the weights: a decoder never rebuilds them from floating point, so they are identical on every machine.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():
    # compressai scripts some helpers with torch.jit at import time; newer torch warns about that.
    warnings.simplefilter("ignore", FutureWarning)
    from compressai.entropy_models import EntropyBottleneck, EntropyModel, GaussianConditional

__all__ = ["CategoricalPrior", "EntropyBottleneck", "EntropyModel", "GaussianConditional", "gaussian_conditional",
           "entropy_tables_ready", "resize_table_buffers"]

SCALES_MIN, SCALES_MAX, SCALES_LEVELS = 0.11, 256.0, 64


def gaussian_conditional() -> GaussianConditional:
    """A GaussianConditional whose scale table is already set (tables still need `update()`)."""
    table = torch.exp(torch.linspace(math.log(SCALES_MIN), math.log(SCALES_MAX), SCALES_LEVELS))
    return GaussianConditional(table.tolist())


class CategoricalPrior(EntropyModel):
    """A learned, static probability table over `num_symbols` symbols (the VQ codebook indices).

    Training reads likelihoods from `forward`; coding uses the quantised CDF built by `update()`.
    """

    def __init__(self, num_symbols: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_symbols))

    @property
    def num_symbols(self) -> int:
        return self.logits.numel()

    def forward(self, indices: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Likelihood of every index (same shape as `indices`)."""
        p = F.softmax(self.logits, dim=0)[indices]
        return self.likelihood_lower_bound(p) if self.use_likelihood_bound else p

    @torch.no_grad()
    def update(self, force: bool = False) -> bool:
        if self._offset.numel() > 0 and not force:
            return False
        pmf = F.softmax(self.logits.detach().double(), dim=0).float()
        # Keep every symbol codable: floor its probability at one count of the 16-bit CDF.
        pmf = pmf.clamp_min(2.0 ** -self.entropy_coder_precision)
        pmf = pmf / pmf.sum()
        tail = torch.zeros(1)
        self._quantized_cdf = self._pmf_to_cdf(pmf[None], tail[None], torch.tensor([self.num_symbols]),
                                               self.num_symbols)
        self._offset = torch.zeros(1, dtype=torch.int32)
        self._cdf_length = torch.tensor([self.num_symbols + 2], dtype=torch.int32)
        return True

    def compress(self, indices: torch.Tensor) -> list[bytes]:  # type: ignore[override]
        """Strings (one per batch element) for integer indices [B, ...]."""
        return super().compress(indices.to(torch.int32), torch.zeros_like(indices, dtype=torch.int32))

    def decompress(self, strings: list[bytes], shape: tuple[int, ...]) -> torch.Tensor:  # type: ignore[override]
        """Indices [len(strings), *shape] (int64)."""
        indexes = torch.zeros((len(strings), *shape), dtype=torch.int32)
        return super().decompress(strings, indexes, dtype=torch.float32).round().long()


def resize_table_buffers(module: nn.Module, state: dict) -> None:
    """Give `module`'s buffers the shapes stored in `state` before load_state_dict: CDF tables are sized by
    `update()`, so a fresh model holds empty ones."""
    for name, buf in list(module.named_buffers()):
        if name in state and buf.shape != state[name].shape:
            owner, _, attr = name.rpartition(".")
            module.get_submodule(owner)._buffers[attr] = torch.empty_like(state[name])


def entropy_tables_ready(module: nn.Module) -> bool:
    """True when every entropy model inside `module` has its CDF tables built."""
    return all(m._quantized_cdf.numel() > 0 for m in module.modules() if isinstance(m, EntropyModel))
