"""Tuning the rate-adaptive noise map: for each rate level, the noise strength that gives the best
perceptual result (HaarPSI) on held-out photos, through the real encoder → bytes → decoder.

DiffO ties the denoiser's starting noise to the rate (less rate, more noise); the map must not rise
with the rate (`noise.check_noise_map`), so the choice is the non-increasing sequence of strengths with
the best summed score (a small dynamic programme over the grid), not each level's best on its own.
"""

from __future__ import annotations

import logging

import torch

from .model_card import RATES  # the rate levels the model card measures

logger = logging.getLogger(__name__)

STRENGTHS = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5)


@torch.no_grad()
def score_grid(model, images: list[torch.Tensor], rates=RATES, strengths=STRENGTHS) -> dict:
    """Mean HaarPSI of the decoded held-out images for every (rate, strength), plus the no-denoise
    ablation per rate: {"haarpsi": [[...per strength] per rate], "nodenoise": [... per rate]}."""
    from .. import pipeline
    from ..tools.metrics import haarpsi

    grid = [[0.0] * len(strengths) for _ in rates]
    plain = [0.0] * len(rates)
    for img in images:
        for i, r in enumerate(rates):
            data = pipeline.encode(model, img, rate=r)
            plain[i] += haarpsi(img, pipeline.decode(model, data, denoise=False)) / len(images)
            for j, s in enumerate(strengths):
                grid[i][j] += haarpsi(img, pipeline.decode(model, data, strength=s)) / len(images)
    return {"rates": list(rates), "strengths": list(strengths), "haarpsi": grid, "nodenoise": plain}


def best_non_increasing(scores: list[list[float]], strengths) -> list[float]:
    """The strengths (one per rate, in rate order) that never rise with the rate and maximise the summed
    score. `scores[i][j]`: score of strength j at rate i."""
    n, m = len(scores), len(strengths)
    order = sorted(range(m), key=lambda j: strengths[j])
    # best[i][k]: best total for rates i.. when rate i uses strength order[k] (later rates: order[<=k])
    best = [[0.0] * m for _ in range(n)]
    pick = [[0] * m for _ in range(n)]
    for i in range(n - 1, -1, -1):
        for k in range(m):
            own = scores[i][order[k]]
            if i == n - 1:
                best[i][k] = own
                continue
            nxt = max(range(k + 1), key=lambda q: best[i + 1][q])
            best[i][k], pick[i][k] = own + best[i + 1][nxt], nxt
    k = max(range(m), key=lambda q: best[0][q])
    chosen = []
    for i in range(n):
        chosen.append(float(strengths[order[k]]))
        k = pick[i][k]
    return chosen


def tune(model, images: list[torch.Tensor], rates=None, strengths=None) -> dict:
    """Score the grid (default RATES x STRENGTHS), choose the map and write it into the model's config.
    Returns the scores and the chosen strengths."""
    rates, strengths = rates or RATES, strengths or STRENGTHS
    table = score_grid(model, images, rates, strengths)
    chosen = best_non_increasing(table["haarpsi"], strengths)
    model.register_to_config(noise_rates=list(rates), noise_strengths=chosen)
    table["chosen"] = chosen
    for r, s, row, p in zip(rates, chosen, table["haarpsi"], table["nodenoise"]):
        logger.info("rate %.2f: strength %.2f, HaarPSI %.4f (no denoise %.4f)", r, s,
                    row[list(strengths).index(s)], p)
    return table
