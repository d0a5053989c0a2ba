"""The run-time entropy models: coding with stored integer CDF tables, without CompressAI.

Each class holds exactly the state of its CompressAI training twin (same names, shapes and initial values),
so a model trained with CompressAI's differentiable entropy models (`diffo.training.entropy_models`) loads
here unchanged, and the fingerprint of a saved model does not depend on which side wrote it:

- `CategoricalPrior`    learned static distribution over the VQ codebook indices (the base code)
- `EntropyBottleneck`   CompressAI's factorized density of the hyper-latent z (medians, tables)
- `GaussianConditional` CompressAI's scale-indexed Gaussian tables of the residual y

They code with a `SymbolCoder` (coders.py) chosen by the stream's format version. Likelihoods (`forward`)
and table construction (`update`) are training-time work: they live with the training twins.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..errors import MissingExtraError
from .coders import CdfTables, SymbolCoder

__all__ = ["TableEntropyModel", "CategoricalPrior", "EntropyBottleneck", "GaussianConditional",
           "gaussian_conditional", "entropy_tables_ready", "resize_table_buffers", "SCALES_MIN", "SCALES_MAX",
           "SCALES_LEVELS"]

SCALES_MIN, SCALES_MAX, SCALES_LEVELS = 0.11, 256.0, 64


class LowerBound(nn.Module):
    """Holds the `bound` buffer of CompressAI's LowerBound (max(x, bound)); its custom gradient is training's."""

    def __init__(self, bound: float):
        super().__init__()
        self.register_buffer("bound", torch.Tensor([float(bound)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.max(x, self.bound)


class TableEntropyModel(nn.Module):
    """Base: the CDF table buffers (`_quantized_cdf`, `_cdf_length`, `_offset`) and coding with them."""

    def __init__(self, likelihood_bound: float = 1e-9):
        super().__init__()
        self.likelihood_lower_bound = LowerBound(likelihood_bound)
        self.register_buffer("_offset", torch.IntTensor())
        self.register_buffer("_quantized_cdf", torch.IntTensor())
        self.register_buffer("_cdf_length", torch.IntTensor())
        self._tables: tuple | None = None  # (buffer versions, CdfTables) cache

    def forward(self, *args, **kwargs):
        raise MissingExtraError(
            f"{type(self).__name__} here only codes with stored tables; training uses CompressAI's entropy "
            "models: call diffo.training.entropy_models.trainable(model) first "
            "(needs pip install \"comfyui-diffo[train]\")")

    def tables(self) -> CdfTables:
        if self._quantized_cdf.numel() == 0:
            raise ValueError(f"{type(self).__name__}: entropy tables are not built (run update() when finalising)")
        # in-place loads (load_state_dict) keep the storage but bump the version
        key = tuple((b.data_ptr(), _version(b)) for b in (self._quantized_cdf, self._cdf_length, self._offset))
        if self._tables is None or self._tables[0] != key:
            self._tables = (key, CdfTables.from_buffers(self._quantized_cdf, self._cdf_length, self._offset))
        return self._tables[1]

    def compress_symbols(self, symbols: torch.Tensor, indexes: torch.Tensor, coder: SymbolCoder) -> list[bytes]:
        """One string per batch element of integer symbols [B, ...] with table indexes of the same shape."""
        if symbols.shape != indexes.shape:
            raise ValueError(f"symbols {tuple(symbols.shape)} and indexes {tuple(indexes.shape)} differ in shape")
        tables = self.tables()
        sym = symbols.detach().cpu().long().numpy()
        idx = indexes.detach().cpu().long().numpy()
        return [coder.encode(sym[i].reshape(-1), idx[i].reshape(-1), tables) for i in range(len(sym))]

    def decompress_symbols(self, strings: list[bytes], indexes: torch.Tensor, coder: SymbolCoder) -> torch.Tensor:
        """Integer symbols (int64, shape of `indexes` [B, ...]) of one string per batch element."""
        if len(strings) != len(indexes):
            raise ValueError(f"{len(strings)} strings for a batch of {len(indexes)}")
        tables = self.tables()
        idx = indexes.detach().cpu().long().numpy()
        out = np.stack([coder.decode(s, idx[i].reshape(-1), tables).reshape(idx[i].shape)
                        for i, s in enumerate(strings)]) if len(strings) else np.zeros(idx.shape, np.int64)
        return torch.from_numpy(out).to(self._quantized_cdf.device)  # where the model is, like CompressAI's

    def compress_values(self, values: torch.Tensor, indexes: torch.Tensor, means: torch.Tensor,
                        coder: SymbolCoder) -> list[bytes]:
        """Strings of round(values - means): CompressAI's `compress(inputs, indexes, means)`."""
        return self.compress_symbols(torch.round(values - means), indexes, coder)

    def decompress_values(self, strings: list[bytes], indexes: torch.Tensor, means: torch.Tensor,
                          coder: SymbolCoder) -> torch.Tensor:
        """symbols + means, in the dtype of `means`: CompressAI's `decompress(strings, indexes, means=means)`."""
        return self.decompress_symbols(strings, indexes, coder).to(means.device, means.dtype) + means


def _version(t: torch.Tensor) -> int:
    """The in-place version counter; inference-mode tensors (ComfyUI runs nodes under torch.inference_mode) have
    none, and cannot be changed in place outside inference mode: their storage identifies them."""
    try:
        return t._version
    except RuntimeError:
        return -1


class CategoricalPrior(TableEntropyModel):
    """A learned, static probability table over `num_symbols` symbols (the VQ codebook indices)."""

    def __init__(self, num_symbols: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_symbols))

    @property
    def num_symbols(self) -> int:
        return self.logits.numel()

    def compress(self, indices: torch.Tensor, coder: SymbolCoder) -> list[bytes]:
        """Strings (one per batch element) for integer indices [B, ...]."""
        return self.compress_symbols(indices, torch.zeros_like(indices), coder)

    def decompress(self, strings: list[bytes], shape: tuple[int, ...], coder: SymbolCoder) -> torch.Tensor:
        """Indices [len(strings), *shape] (int64)."""
        return self.decompress_symbols(strings, torch.zeros((len(strings), *shape), dtype=torch.long), coder)


class EntropyBottleneck(TableEntropyModel):
    """The state of CompressAI's EntropyBottleneck (same initial values): its medians and tables are what
    coding needs; the density network's weights ride along for training."""

    def __init__(self, channels: int, tail_mass: float = 1e-9, init_scale: float = 10,
                 filters: tuple[int, ...] = (3, 3, 3, 3)):
        super().__init__()
        self.channels, self.filters = int(channels), tuple(int(f) for f in filters)
        self.init_scale, self.tail_mass = float(init_scale), float(tail_mass)
        dims = (1,) + self.filters + (1,)
        scale = self.init_scale ** (1 / (len(self.filters) + 1))
        self.matrices, self.biases, self.factors = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        for i in range(len(self.filters) + 1):
            init = math.log(math.expm1(1 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.empty(channels, dims[i + 1], 1).uniform_(-0.5, 0.5)))
            if i < len(self.filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))
        self.quantiles = nn.Parameter(torch.Tensor([-self.init_scale, 0, self.init_scale]).repeat(channels, 1, 1))
        target = math.log(2 / self.tail_mass - 1)
        self.register_buffer("target", torch.Tensor([-target, 0, target]))

    def _get_medians(self) -> torch.Tensor:
        return self.quantiles[:, :, 1:2]

    def _indexes_and_medians(self, batch: int, size: tuple[int, ...]):
        c = self._quantized_cdf.size(0)
        indexes = torch.arange(c).view(1, c, *([1] * len(size))).expand(batch, c, *size)
        medians = self._get_medians().detach().reshape(1, c, *([1] * len(size))).expand(batch, c, *size)
        return indexes, medians

    def compress(self, x: torch.Tensor, coder: SymbolCoder) -> list[bytes]:
        indexes, medians = self._indexes_and_medians(x.size(0), tuple(x.shape[2:]))
        return self.compress_values(x, indexes, medians.to(x.device), coder)

    def decompress(self, strings: list[bytes], size: tuple[int, ...], coder: SymbolCoder) -> torch.Tensor:
        indexes, medians = self._indexes_and_medians(len(strings), tuple(size))
        return self.decompress_values(strings, indexes, medians, coder)


class GaussianConditional(TableEntropyModel):
    """The state of CompressAI's GaussianConditional: a scale table whose Gaussian CDF tables code y."""

    def __init__(self, scale_table: list[float], scale_bound: float = 0.11, tail_mass: float = 1e-9):
        super().__init__()
        self.tail_mass = float(tail_mass)
        self.lower_bound_scale = LowerBound(scale_bound)
        self.register_buffer("scale_table", torch.Tensor(tuple(float(s) for s in scale_table)))
        self.register_buffer("scale_bound", torch.Tensor([float(scale_bound)]))

    def build_indexes(self, scales: torch.Tensor) -> torch.Tensor:
        """The table of each scale: the first entry of the scale table not below it (CompressAI's rule)."""
        scales = self.lower_bound_scale(scales)
        indexes = scales.new_full(scales.size(), len(self.scale_table) - 1).int()
        for s in self.scale_table[:-1]:
            indexes -= (scales <= s).int()
        return indexes

    def compress(self, values: torch.Tensor, indexes: torch.Tensor, means: torch.Tensor,
                 coder: SymbolCoder) -> list[bytes]:
        return self.compress_values(values, indexes, means, coder)

    def decompress(self, strings: list[bytes], indexes: torch.Tensor, means: torch.Tensor,
                   coder: SymbolCoder) -> torch.Tensor:
        return self.decompress_values(strings, indexes, means, coder)


def gaussian_conditional() -> GaussianConditional:
    """A GaussianConditional with the usual log-spaced scale table (its CDF tables still need `update()`)."""
    table = torch.exp(torch.linspace(math.log(SCALES_MIN), math.log(SCALES_MAX), SCALES_LEVELS))
    return GaussianConditional(table.tolist())


def resize_table_buffers(module: nn.Module, state: dict) -> None:
    """Give `module`'s buffers the shapes stored in `state` before load_state_dict: CDF tables are sized by
    `update()`, so a fresh model holds empty ones."""
    for name, buf in list(module.named_buffers()):
        if name in state and buf.shape != state[name].shape:
            owner, _, attr = name.rpartition(".")
            module.get_submodule(owner)._buffers[attr] = torch.empty_like(state[name])


def entropy_tables_ready(module: nn.Module) -> bool:
    """True when every entropy model inside `module` (run-time or training twin) has its CDF tables built."""
    return all(m._quantized_cdf.numel() > 0 for m in module.modules() if hasattr(m, "_quantized_cdf"))
