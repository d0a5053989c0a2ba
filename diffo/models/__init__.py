"""The model families and what they share.

    base.py     CodecBase: folder format, safe loading, fingerprint, Hub upload, the pipeline's interface
    diffo/      the DiffO family: our re-implementation, trained here (the embedded diffo-tiny, the `sd` scale)
    osdiff/     the OSDiff family: the published OSDiff checkpoints, converted (`diffo convert osdiff`)

Shared blocks stand apart: `diffo.entropy` (entropy models and coders), `diffo.layers` (exact convolutions),
`diffo.tiling`, `diffo.bitstream` (the container). `load_codec(folder)` picks the family from config.json;
`load_codec_parts(folder)` loads only the codec weights of an SD-scale model (to run on a UNet and VAE the user
already has, e.g. ComfyUI's).
"""

from __future__ import annotations

from pathlib import Path

from ..bitstream import FAMILY_NAMES
from ..errors import ModelLoadError
from .base import CONFIG_NAME, WEIGHTS_NAME, CodecBase, padded_latent_shape, read_config

__all__ = ["CodecBase", "FAMILY_NAMES", "padded_latent_shape", "load_codec", "load_codec_parts", "codec_class", "CONFIG_NAME", "WEIGHTS_NAME", "DiffoCodec",
           "OSDiffCodec"]


def __getattr__(name):
    if name in ("DiffoCodec", "OSDiffCodec"):
        return _classes()[name]
    raise AttributeError(f"module 'diffo.models' has no attribute {name!r}")


def _classes() -> dict[str, type[CodecBase]]:
    from .diffo import DiffoCodec
    from .osdiff import OSDiffCodec

    return {cls.__name__: cls for cls in (DiffoCodec, OSDiffCodec)}


def codec_class(config: dict, folder: Path | str = "") -> type[CodecBase]:
    """The family class a config.json names (`_class_name`; none means DiffO, as in the first releases)."""
    name = config.get("_class_name") or "DiffoCodec"
    classes = _classes()
    if name not in classes:
        raise ModelLoadError(f"{Path(folder) / CONFIG_NAME} describes a {name}, which is not a model family this "
                             f"version of DiffO knows ({', '.join(classes)})")
    return classes[name]


def load_codec(folder: Path | str) -> CodecBase:
    """Load the model in `folder`, whatever its family."""
    return codec_class(read_config(Path(folder)), folder).from_dir(Path(folder))


def load_codec_parts(folder: Path | str):
    """The codec-only weights (latent codec, control module, prompt embedding) of an SD-scale model in `folder`,
    whatever its family: an `OSDiffCodecParts` or a `DiffoCodecParts` (each with `family`, `unet_config`,
    `latent_scale`, `prompt_embeds`, `compress`, `control`)."""
    from .diffo.parts import DiffoCodecParts
    from .osdiff.parts import OSDiffCodecParts

    cls = codec_class(read_config(Path(folder)), folder)
    return {"DiffoCodec": DiffoCodecParts, "OSDiffCodec": OSDiffCodecParts}[cls.__name__].from_dir(folder)
