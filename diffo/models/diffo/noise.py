"""Rate-adaptive noise modulation (DiffO): the fewer bits, the more noise the one-step denoiser starts from.

A monotone, piecewise-linear map from rate level to *strength*, the fraction of the diffusion schedule
(strength 0.3 = timestep 0.3 × (T − 1)). It is part of the model config, and the encoder writes the
strength into every bitstream, so a decoder uses exactly the encoder's setting unless the user overrides it.
"""

from __future__ import annotations

import math


def check_noise_map(rates, strengths) -> None:
    """Raise ValueError unless rates rise from 0 to 1 and strengths in [0, 1] never rise with the rate."""
    if len(rates) != len(strengths) or len(rates) < 2:
        raise ValueError(f"noise map needs >= 2 matching points, got rates={rates} strengths={strengths}")
    if rates[0] != 0.0 or rates[-1] != 1.0 or any(b <= a for a, b in zip(rates, rates[1:])):
        raise ValueError(f"noise map rates must rise strictly from 0 to 1, got {rates}")
    if any(not (0.0 <= s <= 1.0) or math.isnan(s) for s in strengths):
        raise ValueError(f"noise map strengths must lie in [0, 1], got {strengths}")
    if any(b > a for a, b in zip(strengths, strengths[1:])):
        raise ValueError(f"noise map strengths must not rise with the rate (more bits, less noise), got {strengths}")


def strength_for_rate(rate: float, rates, strengths) -> float:
    """Linear interpolation of the noise map at `rate` in [0, 1]."""
    rate = min(max(float(rate), 0.0), 1.0)
    for (r0, s0), (r1, s1) in zip(zip(rates, strengths), zip(rates[1:], strengths[1:])):
        if rate <= r1:
            return s0 + (s1 - s0) * (rate - r0) / (r1 - r0)
    return float(strengths[-1])


def timestep_for_strength(strength: float, num_train_timesteps: int) -> int:
    """The integer diffusion timestep a strength stands for."""
    return int(round(min(max(strength, 0.0), 1.0) * (num_train_timesteps - 1)))
