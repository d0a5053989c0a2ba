import os
import warnings
from pathlib import Path

# As diffo/__init__.py sets it, but before this process's torch runs MKL (child processes inherit it).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def tiny_model():
    """A randomly initialised tiny model with built entropy tables (fast; weights are not trained)."""
    pytest.importorskip("compressai", reason="SKIPPED LOUDLY: building entropy tables needs CompressAI (the "
                                             "train extra); the README's install line adds it")
    from diffo.models.diffo.codec import DiffoCodec

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
    from diffo.tools.demo import sample_photo
    from diffo.image import load_image

    return load_image(sample_photo())


@pytest.fixture(scope="session")
def sd_checkpoint(tmp_path_factory):
    """A tiny randomly initialised checkpoint in diffusers' Stable Diffusion layout (vae/, unet/, scheduler/)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from diffo.models.diffo.codec import TINY_VAE

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


def load_plugin_like_comfyui(root: Path = ROOT):
    """Import the plugin as ComfyUI 0.33 does (nodes.load_custom_node): by the path of its __init__.py,
    under a module name made from the path, as a package, so only relative imports can work."""
    import importlib.util
    import sys

    name = str(root).replace(".", "_x_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def plugin():
    return load_plugin_like_comfyui()


@pytest.fixture(scope="session")
def example_inputs(tmp_path_factory):
    """A ComfyUI-style input folder holding what `python -m diffo examples` writes (the workflows' inputs)."""
    from diffo.tools.demo import write_examples

    folder = tmp_path_factory.mktemp("input")
    write_examples(folder)
    return folder


@pytest.fixture
def comfy_dirs(tmp_path, monkeypatch, example_inputs):
    """Fresh input/output/models folders for the nodes (the stand-ins for ComfyUI's folder_paths)."""
    import shutil

    from comfy_core import FOLDERS

    dirs = {k: tmp_path / k for k in ("input", "output", "models")}
    shutil.copytree(example_inputs, dirs["input"])
    dirs["output"].mkdir()
    dirs["models"].mkdir()
    monkeypatch.setenv("DIFFO_INPUT_DIR", str(dirs["input"]))
    monkeypatch.setenv("DIFFO_OUTPUT_DIR", str(dirs["output"]))
    monkeypatch.setenv("DIFFO_MODELS_DIR", str(dirs["models"]))
    FOLDERS.input, FOLDERS.output = dirs["input"], dirs["output"]
    return dirs
