"""Vector quantiser of the structural base code (DiffO): nearest codebook entry per position."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class VQOutput:
    embed: torch.Tensor  # [B, D, h, w] quantised vectors (straight-through gradient to the encoder)
    indices: torch.Tensor  # [B, h, w] int64 codebook indices
    codebook_loss: torch.Tensor  # pulls codes towards encoder outputs
    commitment_loss: torch.Tensor  # pulls encoder outputs towards their codes


class VectorQuantizer(nn.Module):
    """A codebook of `codebook_size` vectors of `code_dim` values (van den Oord et al., VQ-VAE, 2017).

    Codebook health: `usage` counts how often each code was picked since the last `restart_dead_codes`,
    which re-seeds unused codes on encoder outputs of the current batch (no dead codes).
    """

    def __init__(self, codebook_size: int, code_dim: int):
        super().__init__()
        self.codebook = nn.Embedding(codebook_size, code_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.register_buffer("usage", torch.zeros(codebook_size), persistent=False)

    @property
    def codebook_size(self) -> int:
        return self.codebook.num_embeddings

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Indices [B, h, w] of the nearest code for every position of x [B, D, h, w]."""
        flat = rearrange(x, "b d h w -> (b h w) d")
        cb = self.codebook.weight
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ cb.t() + cb.pow(2).sum(1)[None]
        return rearrange(dist.argmin(1), "(b h w) -> b h w", b=x.shape[0], h=x.shape[2], w=x.shape[3])

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors [B, D, h, w] for indices [B, h, w]."""
        return rearrange(self.codebook(indices), "b h w d -> b d h w")

    def forward(self, x: torch.Tensor) -> VQOutput:
        indices = self.nearest(x.detach())
        q = self.embed(indices)
        if self.training:
            self.usage += torch.bincount(indices.flatten(), minlength=self.codebook_size).to(self.usage)
        return VQOutput(
            embed=x + (q - x).detach(),
            indices=indices,
            codebook_loss=F.mse_loss(q, x.detach()),
            commitment_loss=F.mse_loss(x, q.detach()),
        )

    @torch.no_grad()
    def restart_dead_codes(self, x: torch.Tensor) -> int:
        """Re-seed codes unused since the last call on random encoder outputs of x [B, D, h, w]."""
        dead = (self.usage == 0).nonzero().flatten()
        if len(dead):
            flat = rearrange(x, "b d h w -> (b h w) d")
            pick = torch.randint(0, flat.shape[0], (len(dead),), device=flat.device)
            self.codebook.weight[dead] = flat[pick] + 1e-3 * torch.randn_like(flat[pick])
        self.usage.zero_()
        return len(dead)
