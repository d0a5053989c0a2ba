"""The OSDiff family: the published OSDiff checkpoints (LFGCM latent codec + CDDM control module on SD 2.1-base,
one step), converted from the files users download (`convert.py`)."""

from .codec import OSDiffCodec

__all__ = ["OSDiffCodec"]
