"""Entropy coding at run time: symbol coders (`coders`) and the table-driven entropy models (`models`).

Nothing here imports CompressAI: its differentiable entropy models and CDF construction serve training
only (`diffo.training.entropy_models`), and its rANS coder is loaded only to read format-1 files.
"""

from .coders import CdfTables, CompressAIRansCoder, RangeCoder, SymbolCoder, coder_for_format
from .models import (CategoricalPrior, EntropyBottleneck, GaussianConditional, TableEntropyModel,
                     entropy_tables_ready, gaussian_conditional, resize_table_buffers)

__all__ = ["CdfTables", "CompressAIRansCoder", "RangeCoder", "SymbolCoder", "coder_for_format",
           "CategoricalPrior", "EntropyBottleneck", "GaussianConditional", "TableEntropyModel",
           "entropy_tables_ready", "gaussian_conditional", "resize_table_buffers"]
