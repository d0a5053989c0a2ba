"""DiffO: ultra-low-bitrate image compression decoded by one diffusion step.

The library needs no ComfyUI. Typical use::

    from diffo import load_model, encode, decode
    model = load_model()                     # the embedded default (diffo-tiny)
    data = encode(model, "photo.png", bpp=0.05)
    image = decode(model, data)              # float tensor [3, H, W] in [0, 1]
"""

import os

# MKL's sgemm splits its sums by thread count on AVX-512 CPUs, so the float networks' pixels would depend on the
# number of threads. Strict conditional numerical reproducibility removes that at no measured cost (README,
# "Decoding the same everywhere"). MKL reads this when it starts: it takes effect when diffo is imported before
# torch has run any MKL routine (the CLI, scripts); a user's own MKL_CBWR setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from .errors import (  # noqa: E402
    BitstreamError,
    DiffoError,
    ImageInputError,
    MissingExtraError,
    ModelLoadError,
    ModelMismatchError,
    OutputExistsError,
    UnsupportedVersionError,
)

__version__ = "0.2.0"

__all__ = [
    "BitstreamError", "DiffoError", "ImageInputError", "ModelLoadError", "ModelMismatchError",
    "OutputExistsError", "UnsupportedVersionError", "MissingExtraError", "load_model", "encode", "decode", "DiffoCodec",
    "OSDiffCodec",
]


def __getattr__(name):
    # Heavy imports (torch, diffusers) only when used, so `import diffo` stays cheap.
    if name in ("encode", "decode"):
        from . import pipeline
        return getattr(pipeline, name)
    if name == "load_model":
        from .hub import load_model
        return load_model
    if name in ("DiffoCodec", "OSDiffCodec"):
        from . import models
        return getattr(models, name)
    raise AttributeError(f"module 'diffo' has no attribute {name!r}")
