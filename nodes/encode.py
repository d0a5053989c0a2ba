"""DiffO Encode: IMAGE → one `.diffo` stream per image, at a rate level, a target bpp or a byte budget."""

from __future__ import annotations

from ..diffo import pipeline
from ..diffo.bitstream import bits_per_pixel
from . import comfy_env
from .types import BITSTREAM, MODEL, Bitstreams, images_from_comfy

RATE_MODES = ["target bpp", "rate level", "max bytes"]


class DiffOEncode:
    DESCRIPTION = ("Compresses each image of the batch into a .diffo bitstream: a VQ structure code plus a "
                   "residual whose size the rate mode sets. Save it with DiffO Save Bitstream; decode it with "
                   "DiffO Decode (or the split decoder nodes).")
    CATEGORY = "DiffO/encode"
    SEARCH_ALIASES = ["compress image", "diffo compress", "image codec", "neural compression", "encode image"]
    RETURN_TYPES = (BITSTREAM, "INT", "FLOAT")
    RETURN_NAMES = ("bitstream", "bytes", "bpp")
    OUTPUT_TOOLTIPS = ("One .diffo stream per image.",
                       "Total size of the streams in bytes (header included).",
                       "Bits per pixel, averaged over the batch: 8 × bytes / (width × height).")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The images to compress (any size; each is one stream)."}),
            "diffo_model": (MODEL, {"tooltip": "From DiffO Load Model."}),
            "rate_mode": (RATE_MODES, {"default": "target bpp", "tooltip":
                          "target bpp: the stream nearest to `bpp`. rate level: `rate` as is. "
                          "max bytes: the best stream that fits in `max_bytes`."}),
            "bpp": ("FLOAT", {"default": 0.1, "min": 0.001, "max": 24.0, "step": 0.001, "tooltip":
                    "Target bits per pixel (rate mode 'target bpp'). 0.1 bpp is 4.9 KB for 768x512."}),
            "rate": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                     "Rate level (rate mode 'rate level'): 0 = structure code only (smallest), 1 = largest."}),
            "max_bytes": ("INT", {"default": 4096, "min": 1, "max": 1 << 30, "tooltip":
                          "Byte budget per image (rate mode 'max bytes')."}),
            "decoder_seed": ("INT", {"default": 0, "min": 0, "max": 2**32 - 1, "tooltip":
                             "Seed of the decoder's noise, stored in the stream: the same stream always "
                             "decodes to the same pixels."}),
            "strength": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.01, "tooltip":
                         "Noise strength stored in the stream; -1 = the model's rate-adaptive choice "
                         "(lower rate, more noise)."}),
        }}

    def encode(self, image, diffo_model, rate_mode, bpp, rate, max_bytes, decoder_seed, strength):
        if rate_mode not in RATE_MODES:
            raise ValueError(f"rate_mode must be one of {RATE_MODES}, got {rate_mode!r}")
        target = {"target bpp": {"bpp": bpp}, "rate level": {"rate": rate},
                  "max bytes": {"max_bytes": max_bytes}}[rate_mode]
        images = images_from_comfy(image)
        per_image = 1 if rate_mode == "rate level" else pipeline.SEARCH_STEPS
        progress = comfy_env.Progress(len(images) * per_image)
        streams = Bitstreams()
        for i, img in enumerate(images):
            comfy_env.check_interrupt()
            streams.append(pipeline.encode(diffo_model, img, seed=decoder_seed, on_step=progress.step,
                                           strength=None if strength < 0 else strength, **target))
            progress.to((i + 1) * per_image)
        bpps = [bits_per_pixel(len(s), im.shape[2], im.shape[1]) for s, im in zip(streams, images)]
        return (streams, sum(map(len, streams)), sum(bpps) / len(bpps))
