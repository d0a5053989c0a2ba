"""Optional dependencies, imported where they are used: a missing one is a MissingExtraError that names the
extra to install, so the plugin still loads and registers every node without them.

    eval   metrics, classical anchors, plots, the demo photo (pytorch-msssim, piq, scipy, imagecodecs,
           imageio-ffmpeg, matplotlib)
    train  CompressAI's entropy models, accelerate (and everything of eval)
"""

from __future__ import annotations

import importlib

from .errors import MissingExtraError

EXTRA_OF = {
    "pytorch_msssim": "eval", "piq": "eval", "scipy": "eval", "imagecodecs": "eval", "imageio_ffmpeg": "eval",
    "matplotlib": "eval", "compressai": "train", "accelerate": "train",
}


def require(module: str, purpose: str):
    """`importlib.import_module(module)`, or a MissingExtraError saying which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRA_OF.get(module.split(".")[0], "eval")
        raise MissingExtraError(f"{purpose} needs the optional package {module.split('.')[0]}: "
                                f"pip install \"comfyui-diffo[{extra}]\" ({e})") from None
