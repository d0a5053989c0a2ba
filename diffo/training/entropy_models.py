"""CompressAI's entropy models for training, and the switch between them and the run-time ones.

Training differentiates through CompressAI's `EntropyBottleneck` and `GaussianConditional` (and a
`CategoricalPrior` built on its `EntropyModel`), and CompressAI builds the integer CDF tables (`update`).
The run-time models in `diffo.entropy.models` hold the same state under the same names, so switching moves
the very same parameter and buffer objects from one to the other (optimizers keep working):

    trainable(model)     run-time entropy models -> CompressAI twins (likelihoods, aux loss)
    runtime(model)       twins -> run-time models (coding with constriction, as users decode)
    runtime_view(model)  the same for a `with` block (the noise stage codes real files mid-training)
    build_tables(model)  CompressAI's update() on every entropy model, tables stored in place

CompressAI installs from wheels on Linux and macOS with Python <= 3.12 only, so it is the `train` extra.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ..entropy import models as rt
from ..errors import MissingExtraError

__all__ = ["require_compressai", "trainable", "runtime", "runtime_view", "build_tables", "is_trainable"]


def require_compressai():
    """CompressAI's entropy_models module, or a MissingExtraError that says what to install."""
    try:
        with warnings.catch_warnings():
            # compressai scripts some helpers with torch.jit at import time; newer torch warns about that.
            warnings.simplefilter("ignore", FutureWarning)
            from compressai import entropy_models
    except ImportError as e:
        raise MissingExtraError(
            "training (and building entropy tables with update()) uses CompressAI's entropy models: "
            "pip install \"comfyui-diffo[train]\" (CompressAI has wheels for Linux and macOS, Python 3.10-3.12; "
            f"decoding and encoding need none of it) ({e})") from None
    return entropy_models


@lru_cache(maxsize=1)  # one class per process: isinstance and pickling work across calls
def _twin_classes() -> dict:
    em = require_compressai()

    class TrainableCategoricalPrior(em.EntropyModel):
        """The run-time CategoricalPrior's training twin: softmax likelihoods, CompressAI's CDF builder."""

        def __init__(self, num_symbols: int):
            super().__init__()
            self.logits = nn.Parameter(torch.zeros(num_symbols))

        def forward(self, indices: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            p = F.softmax(self.logits, dim=0)[indices]
            return self.likelihood_lower_bound(p) if self.use_likelihood_bound else p

        @torch.no_grad()
        def update(self, force: bool = False) -> bool:
            if self._offset.numel() > 0 and not force:
                return False
            n = self.logits.numel()
            pmf = F.softmax(self.logits.detach().double(), dim=0).float()
            # Keep every symbol codable: floor its probability at one count of the 16-bit CDF.
            pmf = pmf.clamp_min(2.0 ** -self.entropy_coder_precision)
            pmf = pmf / pmf.sum()
            dev = self.logits.device
            self._quantized_cdf = self._pmf_to_cdf(pmf[None], torch.zeros(1, device=dev)[None],
                                                   torch.tensor([n]), n)
            self._offset = torch.zeros(1, dtype=torch.int32, device=dev)
            self._cdf_length = torch.tensor([n + 2], dtype=torch.int32, device=dev)
            return True

    return {
        rt.CategoricalPrior: lambda m: TrainableCategoricalPrior(m.num_symbols),
        rt.EntropyBottleneck: lambda m: em.EntropyBottleneck(m.channels, tail_mass=m.tail_mass,
                                                            init_scale=m.init_scale, filters=m.filters),
        rt.GaussianConditional: lambda m: em.GaussianConditional(m.scale_table.tolist(),
                                                                scale_bound=float(m.scale_bound),
                                                                tail_mass=m.tail_mass),
    }


def _runtime_factories() -> dict:
    em = require_compressai()
    return {
        "TrainableCategoricalPrior": lambda m: rt.CategoricalPrior(m.logits.numel()),
        em.EntropyBottleneck.__name__: lambda m: rt.EntropyBottleneck(m.channels, tail_mass=m.tail_mass,
                                                                     init_scale=m.init_scale, filters=m.filters),
        em.GaussianConditional.__name__: lambda m: rt.GaussianConditional(m.scale_table.tolist(),
                                                                         scale_bound=float(m.scale_bound),
                                                                         tail_mass=m.tail_mass),
    }


def _move_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Give `dst` the very parameter and buffer objects of `src` (same names; CDF buffers may be empty)."""
    src_names = {n for n, _ in src.named_parameters()} | {n for n, _ in src.named_buffers()}
    dst_names = {n for n, _ in dst.named_parameters()} | {n for n, _ in dst.named_buffers()}
    if src_names != dst_names:
        raise RuntimeError(f"entropy model states differ: {sorted(src_names ^ dst_names)}")
    for name, p in src.named_parameters():
        owner, _, attr = name.rpartition(".")
        dst.get_submodule(owner)._parameters[attr] = p
    for name, b in src.named_buffers():
        owner, _, attr = name.rpartition(".")
        dst.get_submodule(owner)._buffers[attr] = b
    return dst.train(src.training)


def _swap(model: nn.Module, make) -> nn.Module:
    rng = torch.get_rng_state()  # building a module draws initial values; the state it takes over replaces them
    try:
        for name, child in list(model.named_modules()):
            factory = make(child)
            if factory is not None:
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner), attr, _move_state(child, factory(child)))
    finally:
        torch.set_rng_state(rng)  # so swapping never shifts the training's random numbers
    return model


def trainable(model: nn.Module) -> nn.Module:
    """Replace every run-time entropy model inside `model` by its CompressAI twin (in place)."""
    twins = _twin_classes()
    return _swap(model, lambda m: twins.get(type(m)))


def runtime(model: nn.Module) -> nn.Module:
    """Replace every CompressAI twin inside `model` by the run-time entropy model (in place)."""
    factories = _runtime_factories()
    return _swap(model, lambda m: factories.get(type(m).__name__)
                 if type(m).__module__.startswith(("compressai", __name__)) else None)


@contextmanager
def runtime_view(model: nn.Module):
    """Within the block, `model` codes with the run-time entropy models (then its twins come back)."""
    runtime(model)
    try:
        yield model
    finally:
        trainable(model)


def is_trainable(model: nn.Module) -> bool:
    em = require_compressai()
    return any(isinstance(m, em.EntropyModel) for m in model.modules())


@torch.no_grad()
def build_tables(model: nn.Module, force: bool = True) -> None:
    """Build every entropy model's CDF tables with CompressAI (training twins in place or not)."""
    em = require_compressai()
    was_runtime = not is_trainable(model)
    trainable(model)
    try:
        for m in model.modules():
            if isinstance(m, em.GaussianConditional):
                m.update()  # tables of its fixed scale table
            elif isinstance(m, em.EntropyModel):
                m.update(force=force)  # EntropyBottleneck, CategoricalPrior: tables of the learned densities
    finally:
        if was_runtime:
            runtime(model)
