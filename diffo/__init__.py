"""DiffO: ultra-low-bitrate image compression decoded by one diffusion step.

The library needs no ComfyUI. Typical use::

    from diffo import load_model, encode, decode
    model = load_model()                     # the embedded default (diffo-tiny)
    data = encode(model, "photo.png", bpp=0.05)
    image = decode(model, data)              # float tensor [3, H, W] in [0, 1]
"""

from .errors import (
    BitstreamError,
    DiffoError,
    ImageInputError,
    ModelLoadError,
    ModelMismatchError,
    OutputExistsError,
    UnsupportedVersionError,
)

__version__ = "0.1.0"

__all__ = [
    "BitstreamError", "DiffoError", "ImageInputError", "ModelLoadError", "ModelMismatchError",
    "OutputExistsError", "UnsupportedVersionError", "load_model", "encode", "decode", "DiffoCodec",
]


def __getattr__(name):
    # Heavy imports (torch, diffusers, compressai) only when used, so `import diffo` stays cheap.
    if name in ("encode", "decode"):
        from . import pipeline
        return getattr(pipeline, name)
    if name == "load_model":
        from .hub import load_model
        return load_model
    if name == "DiffoCodec":
        from .codec import DiffoCodec
        return DiffoCodec
    raise AttributeError(f"module 'diffo' has no attribute {name!r}")
