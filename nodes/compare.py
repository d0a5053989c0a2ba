"""Measuring nodes: DiffO Compare, Classical Codec, DiffO Rate Sweep."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..diffo.tools import classical
from ..diffo.bitstream import bits_per_pixel
from ..diffo.tools.figures import comparison_picture, rd_plot
from ..diffo.tools.metrics import LOWER_IS_BETTER, niqe, quality
from ..diffo.tools.sweep import markdown_table, parse_floats, rate_sweep, series
from . import comfy_env
from .types import BITSTREAM, MODEL, images_from_comfy, images_to_comfy

CODEC_LABELS = {c.label: name for name, c in classical.CODECS.items()}
SWEEP_METRICS = ["psnr", "ms_ssim", "haarpsi", "gmsd", "niqe"]


def _fmt(name: str, value: float) -> str:
    if math.isnan(value):
        return f"{name} n/a"
    return f"{name} {value:.2f} dB" if name == "PSNR" else f"{name} {value:.4f}"


def _pil_to_comfy(pictures) -> torch.Tensor:
    """PIL pictures of one size → ComfyUI IMAGE [B, H, W, 3]."""
    return torch.stack([torch.from_numpy(np.asarray(p.convert("RGB"), dtype=np.float32) / 255) for p in pictures])


class DiffOCompare:
    DESCRIPTION = ("Measures a reconstruction against its original: bytes and bpp (when the bitstream is "
                   "connected), PSNR, MS-SSIM, HaarPSI, GMSD and NIQE (naturalness of each image alone, lower is "
                   "more natural); and draws them side by side with the figures.")
    CATEGORY = "DiffO/compare"
    SEARCH_ALIASES = ["psnr", "ms-ssim", "image quality", "side by side", "compare images"]
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "side_by_side")
    OUTPUT_TOOLTIPS = ("One line of figures per image.", "Original | reconstruction, labelled.")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
                    "original": ("IMAGE", {"tooltip": "The image before compression."}),
                    "reconstruction": ("IMAGE", {"tooltip": "The decoded image (same size)."}),
                    "label": ("STRING", {"default": "DiffO", "tooltip": "Name of the reconstruction's codec."})},
                "optional": {
                    "bitstream": (BITSTREAM, {"tooltip": "The streams, to report their size."}),
                    "bpp": ("FLOAT", {"forceInput": True, "tooltip":
                                      "Size in bpp when the reconstruction is not DiffO's (e.g. Classical Codec)."})}}

    def run(self, original, reconstruction, label, bitstream=None, bpp=None):
        originals, recons = images_from_comfy(original), images_from_comfy(reconstruction)
        if len(originals) != len(recons):
            raise ValueError(f"{len(originals)} originals but {len(recons)} reconstructions")
        if bitstream is not None and len(bitstream) != len(recons):
            raise ValueError(f"{len(bitstream)} bitstreams for {len(recons)} images")
        progress = comfy_env.Progress(len(recons))
        lines, sheets = [], []
        for i, (a, b) in enumerate(zip(originals, recons)):
            h, w = a.shape[1:]
            if a.shape != b.shape:
                raise ValueError(f"the original is {w}x{h} but the reconstruction is {b.shape[2]}x{b.shape[1]}: "
                                 "connect an image and its own reconstruction")
            q = quality(a, b)
            size = []
            if bitstream is not None:
                size = [f"{len(bitstream[i])} bytes", f"{bits_per_pixel(len(bitstream[i]), w, h):.4f} bpp"]
            elif bpp is not None:
                size = [f"{bpp:.4f} bpp"]
            niqe_original = _fmt("", niqe(a, a)).strip()  # no-reference: the original's own naturalness
            figures = [_fmt("PSNR", q["psnr"]), _fmt("MS-SSIM", q["ms_ssim"]), _fmt("HaarPSI", q["haarpsi"]),
                       _fmt("GMSD", q["gmsd"]), _fmt("NIQE", q["niqe"]) + f" (original {niqe_original})"]
            lines.append(f"{label} image {i + 1}: {w}x{h}, " + ", ".join(size + figures))
            caption = f"{label}: " + ", ".join(size) + "\n" + ", ".join(figures[:2]) + "\n" + ", ".join(figures[2:])
            sheets.append(comparison_picture(a, [(caption, b)], original_label=f"original {w}x{h}"))
            progress.step()
        report = "\n".join(lines)
        return {"ui": {"text": [report]}, "result": (report, _pil_to_comfy(sheets))}


class DiffOClassicalCodec:
    DESCRIPTION = ("Compresses with a classical codec (JPEG, WebP, AVIF, JPEG 2000, JPEG XL, HEVC, VVC) at the best "
                   "quality whose real file fits the target bpp, and decodes it: the anchor to compare DiffO "
                   "with at the same size. Fails, saying so, when the codec cannot get that small.")
    CATEGORY = "DiffO/compare"
    SEARCH_ALIASES = ["jpeg", "webp", "avif", "jpeg 2000", "jpeg xl", "classical codec", "anchor"]
    RETURN_TYPES = ("IMAGE", "FLOAT", "INT")
    RETURN_NAMES = ("image", "bpp", "bytes")
    OUTPUT_TOOLTIPS = ("The decoded images.", "Real bits per pixel of the files (batch mean).",
                       "Total file bytes.")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The images to compress."}),
            "codec": (list(CODEC_LABELS), {"default": "AVIF", "tooltip": "AVIF is tuned for PSNR; each codec "
                                           "searches its quality knob for the target."}),
            "target_bpp": ("FLOAT", {"default": 0.1, "min": 0.001, "max": 24.0, "step": 0.001, "tooltip":
                           "Bits per pixel to fit in; connect DiffO Encode's bpp to compare at the same size."}),
        }}

    def run(self, image, codec, target_bpp):
        if codec not in CODEC_LABELS:
            raise ValueError(f"codec must be one of {list(CODEC_LABELS)}, got {codec!r}")
        images = images_from_comfy(image)
        progress = comfy_env.Progress(len(images))
        results = []
        for img in images:
            comfy_env.check_interrupt()
            results.append(classical.encode_to_bpp(img, CODEC_LABELS[codec], target_bpp))
            progress.step()
        mean_bpp = sum(r.bpp for r in results) / len(results)
        return (images_to_comfy([r.image for r in results]), mean_bpp, sum(len(r.data) for r in results))


class DiffORateSweep:
    DESCRIPTION = ("Codes one image at several DiffO rate levels and with classical codecs at the sizes DiffO "
                   "reached; plots the rate-distortion curves and tabulates every point.")
    CATEGORY = "DiffO/compare"
    SEARCH_ALIASES = ["rd curve", "rate distortion", "bitrate sweep", "codec comparison", "benchmark"]
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("rd_plot", "table")
    OUTPUT_TOOLTIPS = ("The RD plot of the chosen metric.", "Every point as a markdown table.")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The image to sweep (the first of a batch)."}),
            "diffo_model": (MODEL, {"tooltip": "From DiffO Load Model."}),
            "rates": ("STRING", {"default": "0, 0.25, 0.5, 1", "tooltip":
                      "DiffO rate levels, comma-separated, each in [0, 1]."}),
            "codecs": ("STRING", {"default": "avif, jpeg2000, webp, jpeg", "tooltip":
                       f"Classical codecs to compare, comma-separated: {', '.join(classical.CODECS)} "
                       "(empty: none)."}),
            "metric": (SWEEP_METRICS, {"default": "psnr", "tooltip": "The metric on the plot's y axis."}),
        }}

    def run(self, image, diffo_model, rates, codecs, metric):
        rate_list = parse_floats(rates, "rates")
        codec_list = [c.strip().lower() for c in codecs.split(",") if c.strip()]
        for c in codec_list:
            classical.codec(c)  # unknown or unavailable: fail before the slow part
        images = images_from_comfy(image)
        progress = comfy_env.Progress(len(rate_list) * (1 + len(codec_list)))
        rows = rate_sweep(diffo_model, images[0], rate_list, codec_list, SWEEP_METRICS, step=progress.step)
        h, w = images[0].shape[1:]
        title = f"{metric} vs rate, {w}x{h}" + (f" (first of {len(images)} images)" if len(images) > 1 else "")
        table = markdown_table(rows, SWEEP_METRICS)
        plot = rd_plot(series(rows, metric), metric, title, higher_is_better=metric not in LOWER_IS_BETTER)
        return {"ui": {"text": [table]}, "result": (_pil_to_comfy([plot]), table)}
