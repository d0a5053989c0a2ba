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


@pytest.fixture(scope="session")
def sd_checkpoint(tmp_path_factory):
    """A tiny randomly initialised checkpoint in diffusers' Stable Diffusion layout (vae/, unet/, scheduler/)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from diffo.codec import TINY_VAE

    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    AutoencoderKL(**{**TINY_VAE, "block_out_channels": [16, 16, 16, 16], "norm_num_groups": 8}).save_pretrained(root / "vae")
    UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    ).save_pretrained(root / "unet")
    DDPMScheduler(prediction_type="v_prediction").save_pretrained(root / "scheduler")
    return root


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
