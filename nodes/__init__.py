"""ComfyUI node wrappers around `diffo`: each node declares its interface and calls library code.

Types on the wires: see `types.py`. ComfyUI services (folders, devices, progress): `comfy_env.py`."""

from .compare import DiffOClassicalCodec, DiffOCompare, DiffORateSweep
from .decode import DiffOControl, DiffODecode, DiffOEntropyDecode, DiffOLatentToImage, DiffOOneStepDenoise
from .encode import DiffOEncode
from .files import DiffOLoadBitstream, DiffOSaveBitstream
from .model import DiffOLoadModel
from .checkpoint import DiffOApplyToModel, DiffOCompressWithVAE, DiffOCropToOriginal, DiffOLoadCodec

NODE_DISPLAY_NAME_MAPPINGS = {
    "DiffOLoadModel": "DiffO Load Model",
    "DiffOEncode": "DiffO Encode",
    "DiffOSaveBitstream": "DiffO Save Bitstream",
    "DiffOLoadBitstream": "DiffO Load Bitstream",
    "DiffOEntropyDecode": "DiffO Entropy Decode",
    "DiffOControl": "DiffO Control",
    "DiffOOneStepDenoise": "DiffO One-Step Denoise",
    "DiffOLatentToImage": "DiffO Latent to Image",
    "DiffODecode": "DiffO Decode",
    "DiffOCompare": "DiffO Compare",
    "DiffOClassicalCodec": "Classical Codec (DiffO)",
    "DiffORateSweep": "DiffO Rate Sweep",
    "DiffOLoadCodec": "DiffO Load Codec (your checkpoint)",
    "DiffOApplyToModel": "DiffO Apply to Model",
    "DiffOCompressWithVAE": "DiffO Compress (your VAE)",
    "DiffOCropToOriginal": "DiffO Crop to Original Size",
}
NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (
    DiffOLoadModel, DiffOEncode, DiffOSaveBitstream, DiffOLoadBitstream, DiffOEntropyDecode, DiffOControl,
    DiffOOneStepDenoise, DiffOLatentToImage, DiffODecode, DiffOCompare, DiffOClassicalCodec, DiffORateSweep,
    DiffOLoadCodec, DiffOApplyToModel, DiffOCompressWithVAE, DiffOCropToOriginal)}
