"""Stand-ins for the few core ComfyUI nodes the example workflows use, for CI runs without ComfyUI.

They declare the same inputs (names, order, widget kinds) as ComfyUI 0.33's nodes and do the same thing in a
few lines; the real nodes run in test_comfyui.py against a real ComfyUI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class Folders:
    input: Path
    output: Path


FOLDERS = Folders()


def _to_image(pil: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255)[None]


class LoadImage:
    @classmethod
    def INPUT_TYPES(cls):
        files = sorted(p.name for p in FOLDERS.input.iterdir() if p.suffix in (".png", ".jpg"))
        return {"required": {"image": (files, {"image_upload": True})}}

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load"

    def load(self, image):
        with Image.open(FOLDERS.input / image) as im:
            img = _to_image(im)
        return img, torch.zeros(img.shape[:3])


class SaveImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    def save(self, images, filename_prefix):
        folder = FOLDERS.output / Path(filename_prefix).parent
        folder.mkdir(parents=True, exist_ok=True)
        saved = []
        for i, img in enumerate(images):
            path = folder / f"{Path(filename_prefix).name}_{i + 1:05d}_.png"
            Image.fromarray((img.clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(path)
            saved.append(str(path))
        return {"ui": {"images": saved}}


class PreviewImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "preview"

    def preview(self, images):
        return {"ui": {"images": [tuple(images.shape)]}}


class PreviewAny:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"source": ("*", {})}}

    RETURN_TYPES = ("STRING",)
    OUTPUT_NODE = True
    FUNCTION = "main"

    def main(self, source=None):
        return {"ui": {"text": (str(source),)}, "result": (str(source),)}


class ImageScale:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",),
                             "upscale_method": (["nearest-exact", "bilinear", "area", "bicubic", "lanczos"],),
                             "width": ("INT", {"default": 512, "min": 0, "max": 16384}),
                             "height": ("INT", {"default": 512, "min": 0, "max": 16384}),
                             "crop": (["disabled", "center"],)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"

    def upscale(self, image, upscale_method, width, height, crop):
        h, w = image.shape[1:3]
        if crop == "center":  # crop to the target aspect first, as comfy.utils.common_upscale does
            if w / h > width / height:
                nw = round(h * width / height)
                image = image[:, :, (w - nw) // 2:(w - nw) // 2 + nw]
            else:
                nh = round(w * height / width)
                image = image[:, (h - nh) // 2:(h - nh) // 2 + nh]
        out = [_to_image(Image.fromarray((im.numpy() * 255).round().astype(np.uint8)).resize(
            (width, height), Image.LANCZOS)) for im in image]
        return (torch.cat(out),)


class ImageStitch:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image1": ("IMAGE",), "direction": (["right", "down", "left", "up"],),
                             "match_image_size": ("BOOLEAN", {"default": True}),
                             "spacing_width": ("INT", {"default": 0, "min": 0, "max": 1024}),
                             "spacing_color": (["white", "black", "red", "green", "blue"],)},
                "optional": {"image2": ("IMAGE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "stitch"

    def stitch(self, image1, direction, match_image_size, spacing_width, spacing_color, image2=None):
        if image2 is None:
            return (image1,)
        dim = 2 if direction in ("right", "left") else 1
        if image1.shape[3 - dim] != image2.shape[3 - dim]:
            raise ValueError("stand-in ImageStitch: sizes must already match")
        pair = (image1, image2) if direction in ("right", "down") else (image2, image1)
        return (torch.cat(pair, dim=dim),)


class LatentUpscaleBy:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",),
                             "upscale_method": (["nearest-exact", "bilinear", "area", "bicubic", "bislerp"],),
                             "scale_by": ("FLOAT", {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "upscale"

    def upscale(self, samples, upscale_method, scale_by):
        s = samples.copy()  # core nodes copy the dict, so extra keys (diffo_sizes) travel on
        z = samples["samples"]
        size = (round(z.shape[-2] * scale_by), round(z.shape[-1] * scale_by))
        s["samples"] = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
        return (s,)


NODES = {c.__name__: c for c in (LoadImage, SaveImage, PreviewImage, PreviewAny, ImageScale, ImageStitch,
                                 LatentUpscaleBy)}
