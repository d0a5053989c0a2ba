"""The energy score (Gneiting & Raftery 2007), a distribution-matching loss without a discriminator.

For a generator that draws samples X, X' of a photo y (here: the one step from two independent starting
noises, decoded), ES = E‖X − y‖ − ½ E‖X − X'‖ is a proper scoring rule: in expectation it is lowest only when
X follows the photos' own distribution given the code. L1 and MSE are lowest at the median and mean, the blur a
deterministic step learns; the energy score instead rewards drawing texture that varies as the photos do, and
being unbiased with two samples it needs no adversary that can win or stall. Its known weakness, in high
dimensions, is that it weighs how far the draws spread more than how their values co-vary: in experiment P
(docs/results/realism_experiments.md) the step learnt to spread as far as it erred, with diagonal hatching.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_energy_score(sample_a: torch.Tensor, sample_b: torch.Tensor, real: torch.Tensor,
                       patch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-sample energy score of images (N, C, H, W), scored on each non-overlapping `patch` x `patch`
    patch as one vector (so that texture's joint statistics count, not each pixel's alone; H and W are
    cropped to whole patches), the distances divided by √(C·patch²) to read as an RMS error. Returns the mean
    score over the patches (the loss) and the mean distance between the two samples (their spread, 0 for a
    step that ignores its noise)."""
    if sample_a.shape != sample_b.shape or sample_a.shape != real.shape:
        raise ValueError(f"the two samples and the real images must have one shape (got {tuple(sample_a.shape)}, "
                         f"{tuple(sample_b.shape)} and {tuple(real.shape)})")
    a, b, r = (F.unfold(t.float(), patch, stride=patch) for t in (sample_a, sample_b, real))  # (N, C·p², L)
    scale = a.shape[1] ** 0.5

    def dist(u, v):  # a small floor keeps the gradient of the norm finite where two patches coincide
        return ((u - v).pow(2).sum(1) + 1e-12).sqrt() / scale

    spread = dist(a, b)
    return (0.5 * (dist(a, r) + dist(b, r)) - 0.5 * spread).mean(), spread.mean()
