"""Tuning the rate-adaptive noise map on held-out photos, through the real encoder → bytes → decoder.

Two criteria: `haarpsi`, for each rate level the strength with the best HaarPSI (fidelity-leaning); and
`strongest` (for a denoiser trained for realism, whose texture comes from its starting noise), the strongest
noise whose held-out PSNR stays within `psnr_tolerance` dB of the no-denoise decode at that rate. Neither
uses a no-reference realism score (NIQE is only a yardstick) nor Kodak.

DiffO ties the denoiser's starting noise to the rate (less rate, more noise); the map must not rise
with the rate (`noise.check_noise_map`), so the choice is the non-increasing sequence of strengths with
the best summed score (a small dynamic programme over the grid), not each level's best on its own.
"""

from __future__ import annotations

import logging

import torch

from .model_card import RATES  # the rate levels the model card measures

logger = logging.getLogger(__name__)

STRENGTHS = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.65)


@torch.no_grad()
def score_grid(model, images: list[torch.Tensor], rates=RATES, strengths=STRENGTHS) -> dict:
    """Mean HaarPSI of the decoded held-out images for every (rate, strength), plus the no-denoise
    ablation per rate: {"haarpsi": [[...per strength] per rate], "nodenoise": [... per rate]}."""
    from .. import pipeline
    from ..tools.metrics import haarpsi

    from ..tools.metrics import psnr

    grid = [[0.0] * len(strengths) for _ in rates]
    grid_psnr = [[0.0] * len(strengths) for _ in rates]
    plain = [0.0] * len(rates)
    plain_psnr = [0.0] * len(rates)
    for img in images:
        for i, r in enumerate(rates):
            data = pipeline.encode(model, img, rate=r)
            out = pipeline.decode(model, data, denoise=False)
            plain[i] += haarpsi(img, out) / len(images)
            plain_psnr[i] += psnr(img, out) / len(images)
            for j, s in enumerate(strengths):
                out = pipeline.decode(model, data, strength=s)
                grid[i][j] += haarpsi(img, out) / len(images)
                grid_psnr[i][j] += psnr(img, out) / len(images)
    return {"rates": list(rates), "strengths": list(strengths), "haarpsi": grid, "nodenoise": plain,
            "psnr": grid_psnr, "nodenoise_psnr": plain_psnr}


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


def strongest_within(psnr: list[list[float]], plain_psnr: list[float], strengths, tolerance: float) -> list[float]:
    """Per rate, the strongest noise whose PSNR is within `tolerance` dB of the no-denoise PSNR (strength 0
    when none is), never rising with the rate."""
    scores = [[s if p >= q - tolerance else (0.0 if s == min(strengths) else -1e9) for s, p in zip(strengths, row)]
              for row, q in zip(psnr, plain_psnr)]
    return best_non_increasing(scores, strengths)


CRITERIA = ("haarpsi", "strongest")


def tune(model, images: list[torch.Tensor], rates=None, strengths=None, criterion: str = "haarpsi",
         psnr_tolerance: float = 0.3) -> dict:
    """Score the grid (default RATES x STRENGTHS), choose the map by `criterion` and write it into the
    model's config. Returns the scores and the chosen strengths."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown noise criterion {criterion!r}: use one of {', '.join(CRITERIA)}")
    rates, strengths = rates or RATES, strengths or STRENGTHS
    table = score_grid(model, images, rates, strengths)
    if criterion == "haarpsi":
        chosen = best_non_increasing(table["haarpsi"], strengths)
    else:
        chosen = strongest_within(table["psnr"], table["nodenoise_psnr"], strengths, psnr_tolerance)
    table["criterion"] = criterion if criterion == "haarpsi" else f"strongest within {psnr_tolerance:g} dB PSNR"
    model.register_to_config(noise_rates=list(rates), noise_strengths=chosen)
    table["chosen"] = chosen
    for r, s, row, p in zip(rates, chosen, table["haarpsi"], table["nodenoise"]):
        logger.info("rate %.2f: strength %.2f, HaarPSI %.4f (no denoise %.4f)", r, s,
                    row[list(strengths).index(s)], p)
    return table
