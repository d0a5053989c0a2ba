import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def tiny_model():
    """A randomly initialised tiny model with built entropy tables (fast; weights are not trained)."""
    from diffo.codec import DiffoCodec

    torch.manual_seed(0)
    m = DiffoCodec.from_preset("tiny").eval()
    # from_preset starts the denoiser as the identity; give it a random output layer so that noise matters
    torch.nn.init.normal_(m.denoiser.unet.conv_out.weight, std=0.05)
    m.update()
    return m


@pytest.fixture(scope="session")
def embedded_model():
    from diffo.hub import load_model

    return load_model()


@pytest.fixture(scope="session")
def photo():
    """A real photo shipped by an installed package (matplotlib's sample data), as a [3,H,W] tensor."""
    from diffo.demo import sample_photo
    from diffo.image import load_image

    return load_image(sample_photo())


@pytest.fixture
def shared_file():
    """shared_file("data", "kodak", "kodim23.png"): a path under ../shared, or a loud skip when absent."""
    return shared_path


def shared_path(*parts) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        msg = f"SKIPPED LOUDLY: {p} is absent (../shared data is not part of the repository)"
        print(msg)
        pytest.skip(msg)
    return p
