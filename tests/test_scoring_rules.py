"""The energy score the realism stage can train with: it must prefer the photos' own variety to their mean (the
blur L1 and MSE reward) and to too much variety, and stay finite where a step ignores its noise."""

import pytest
import torch

from diffo.training.scoring_rules import patch_energy_score


def _texture(mean, sigma, generator):
    """A draw of a textured patch field: the mean plus independent Gaussian texture of spread sigma."""
    return mean + sigma * torch.randn(mean.shape, generator=generator)


def test_the_energy_score_is_lowest_for_samples_of_the_real_distribution():
    g = torch.Generator().manual_seed(0)
    mean = torch.rand(4, 3, 64, 64, generator=g)
    real = _texture(mean, 0.1, g)
    scores = {name: [patch_energy_score(_texture(mean, s, g), _texture(mean, s, g), real)[0].item() for _ in range(4)]
              for name, s in (("mean", 0.0), ("true", 0.1), ("too wide", 0.3), ("too narrow", 0.03))}
    avg = {k: sum(v) / len(v) for k, v in scores.items()}
    assert avg["true"] < avg["too narrow"] < avg["mean"]
    assert avg["true"] < avg["too wide"]
    assert avg["mean"] - avg["true"] > 0.01  # by a margin: one draw's score varies by at most 5e-4
    # its units are an RMS error: the mean's score is the texture's RMS (0.1), as a patch's norm / √dims
    assert avg["mean"] == pytest.approx(0.1, rel=0.02)


def test_the_energy_score_spread_and_gradient_where_the_samples_coincide():
    real = torch.rand(2, 3, 16, 16)
    a = torch.rand(2, 3, 16, 16, requires_grad=True)
    score, spread = patch_energy_score(a, a, real)
    assert spread.item() < 1e-5
    score.backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    exact, spread = patch_energy_score(real, real, real)
    assert exact.item() == pytest.approx(0.0, abs=1e-5) and spread.item() == pytest.approx(0.0, abs=1e-5)


def test_the_energy_score_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        patch_energy_score(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 8, 16))
