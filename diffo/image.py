"""Turning user images into tensors and back.

`load_image` is the one door through which user images enter the codec. It accepts whatever PIL can
decode and normalises it to an sRGB, 8-bit-per-channel RGB image held as a float32 tensor [3, H, W]
in [0, 1], warning (``UserWarning``) whenever that normalisation changes something the user may care
about, and raising :class:`~diffo.errors.ImageInputError` when it cannot be done without losing
information silently (transparency without ``drop_alpha``).

Conversion choices, documented once here:

* Grayscale ("1", "L"), palette ("P"), "CMYK", "YCbCr", "LAB", "HSV": converted with PIL's own
  ``Image.convert("RGB")`` (CMYK naively, without a profile, unless the image carries an ICC profile).
* 16-bit integer modes ("I;16", "I;16L", "I;16B", "I;16N"): divided by 65535.
* 32-bit integer mode "I": PIL stores 16-bit PNG/TIFF data in this mode, so when every value lies in
  0..65535 the data is taken as 16-bit and divided by 65535; otherwise negatives are clipped to 0 and
  the data divided by 2**31 - 1 (the type's maximum).
* Float mode "F": if every value lies in [0, 1] the data is taken as already normalised; otherwise it is
  taken as 0..255 data, clipped to [0, 255] and divided by 255. NaN counts as 0.
  All three are then rounded to 8 bits and replicated to RGB, with a warning that precision was reduced.
* Alpha ("RGBA", "LA", "PA", "La", "RGBa", and "1"/"L"/"I"/"RGB"/"P" images with ``transparency``
  info): if every pixel is fully opaque the alpha is dropped silently; otherwise an error, or with
  ``drop_alpha=True`` the image is composited onto white (in sRGB values, after colour management).
* ICC profiles that are not sRGB are converted to sRGB with ``PIL.ImageCms`` (perceptual intent);
  if that fails, a warning says colours may be off and the pixel values are used as they are.
"""

from __future__ import annotations

import io
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .errors import DiffoError, ImageInputError

__all__ = ["load_image", "to_pil", "to_uint8", "pad_to_multiple", "crop_to", "psnr"]

_ALPHA_MESSAGE = (
    "image has an alpha channel (transparency); DiffO codes RGB only: "
    "pass drop_alpha=True / --drop-alpha to composite it onto white"
)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_HIGH_PRECISION_MODES = _SIXTEEN_BIT_MODES + ("I", "F")

# mode -> words used in the "converted to RGB" warning
_CONVERTED_MODES = {
    "1": "1-bit (black and white) grayscale image",
    "L": "grayscale image",
    "P": "palette image",
    "CMYK": "CMYK image",
    "YCbCr": "YCbCr image",
    "LAB": "LAB image",
    "HSV": "HSV image",
}


def _warn(message: str) -> None:
    """warnings.warn, attributed to the first frame outside this module (the caller of load_image)."""
    level = 1
    frame = sys._getframe(0)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
        level += 1
    warnings.warn(message, UserWarning, stacklevel=level)


# ----------------------------------------------------------------------------------------------------
# load_image
# ----------------------------------------------------------------------------------------------------


def load_image(path_or_pil: Union[str, os.PathLike, Image.Image], *, drop_alpha: bool = False) -> torch.Tensor:
    """Load an image as a float32 tensor [3, H, W] in [0, 1] (sRGB, 8-bit precision).

    ``path_or_pil`` is a path (str / PathLike) or a ``PIL.Image.Image`` (not modified, except that an
    animated image is left on its first frame). See the module docstring for every conversion rule.

    Raises FileNotFoundError for a missing file and ImageInputError for anything that is not a usable
    image (undecodable, empty, transparent without ``drop_alpha``).
    """
    if isinstance(path_or_pil, Image.Image):
        name = getattr(path_or_pil, "filename", "") or "<PIL image>"
        try:
            img = _first_frame_upright(path_or_pil, name)
        except DiffoError:
            raise
        except Exception as exc:  # a lazily-loaded PIL image whose data turns out to be broken
            raise ImageInputError(f"not an image (or an unsupported format): {name} ({exc})") from exc
    elif isinstance(path_or_pil, (str, os.PathLike)):
        path = Path(path_or_pil)
        name = str(path)
        if not path.exists():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as opened:
                img = _first_frame_upright(opened, name)
        except DiffoError:
            raise
        except FileNotFoundError:  # removed between the check and the open
            raise FileNotFoundError(f"image not found: {path}") from None
        except PermissionError as exc:
            raise ImageInputError(f"cannot read image (permission denied): {path}") from exc
        except Image.DecompressionBombError as exc:
            raise ImageInputError(f"image is too large to load safely: {path} ({exc})") from exc
        except Exception as exc:  # UnidentifiedImageError, truncated data, decoder errors, a directory...
            raise ImageInputError(f"not an image (or an unsupported format): {path}") from exc
    else:
        raise TypeError(f"load_image expects a path or a PIL.Image.Image, not {type(path_or_pil).__name__}")

    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageInputError(f"image has size {width}x{height}; both dimensions must be at least 1: {name}")

    try:
        return _normalise(img, name, drop_alpha)
    except DiffoError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageInputError(f"image is too large to load safely: {name} ({exc})") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageInputError(f"not an image (or an unsupported format): {name} ({exc})") from exc


def _first_frame_upright(img: Image.Image, name: str) -> Image.Image:
    """Select frame 0 of an animated image, decode it and apply EXIF orientation. Returns a new image."""
    n_frames = getattr(img, "n_frames", 1) or 1
    if n_frames > 1:
        img.seek(0)
        _warn(f"animated image with {n_frames} frames: only the first frame is used: {name}")
    img.load()
    try:
        upright = ImageOps.exif_transpose(img)  # returns a (transposed) copy
    except Exception as exc:  # malformed EXIF must not make the image unusable
        _warn(f"could not read the EXIF orientation ({exc}); the image is used as stored: {name}")
        upright = None
    if upright is None or upright is img:
        upright = img.copy()
    return upright


def _normalise(img: Image.Image, name: str, drop_alpha: bool) -> torch.Tensor:
    mode = img.mode
    info = dict(img.info)
    icc = info.get("icc_profile")

    # 1. split off alpha (an "L" image for the alpha, or None), leaving a colour image without alpha.
    color, alpha = _split_alpha(img)

    if alpha is not None:
        lo, _hi = alpha.getextrema()
        if lo >= 255:
            alpha = None  # alpha present but every pixel opaque: drop it silently
        elif not drop_alpha:
            raise ImageInputError(_ALPHA_MESSAGE)

    # 2. high-precision modes -> 8-bit "L"; otherwise note what the conversion to RGB changes
    converted_note: Optional[str] = None
    if color.mode in _HIGH_PRECISION_MODES:
        high_mode = color.mode
        color = _to_8bit_gray(color)
        _warn(
            f"{_describe_high_precision(high_mode)} image: precision reduced to 8 bits per channel "
            f"and converted to RGB: {name}"
        )
    elif mode in ("P", "PA"):
        converted_note = _CONVERTED_MODES["P"]
    elif color.mode in _CONVERTED_MODES:
        converted_note = _CONVERTED_MODES[color.mode]
    elif color.mode not in ("RGB", "RGBX"):
        converted_note = f"{color.mode} image"

    # 3. colour management and conversion to RGB
    rgb = _apply_icc(color, icc, name) if icc else None
    if rgb is not None and converted_note is not None:
        converted_note += " (colour-managed with its ICC profile)"
    if rgb is None:
        if color.mode == "RGB":
            rgb = color
        else:
            try:
                rgb = color.convert("RGB")
            except ValueError as exc:
                raise ImageInputError(f"unsupported image mode {color.mode!r}: {name}") from exc
    if converted_note is not None:
        _warn(f"{converted_note} converted to RGB: {name}")

    arr = np.array(rgb, dtype=np.uint8)  # a writable copy
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageInputError(f"unexpected pixel layout {arr.shape} after conversion to RGB: {name}")
    out = torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32).div_(255.0).contiguous()

    # 4. composite onto white
    if alpha is not None:
        a = torch.from_numpy(np.array(alpha, dtype=np.uint8)).to(torch.float32).div_(255.0)
        out = out * a + (1.0 - a)
        out = out.clamp_(0.0, 1.0).contiguous()
        _warn(f"alpha channel (transparency) composited onto white: {name}")
    return out


def _describe_high_precision(color_mode: str) -> str:
    if color_mode.startswith("I;16"):
        return f"16-bit (mode {color_mode})"
    if color_mode == "I":
        return "32-bit integer (mode I)"
    if color_mode == "F":
        return "32-bit float (mode F)"
    return f"high-precision (mode {color_mode})"


def _split_alpha(img: Image.Image) -> Tuple[Image.Image, Optional[Image.Image]]:
    """Return (colour image without alpha, alpha as an "L" image or None)."""
    mode = img.mode
    if mode == "La":
        img = img.convert("LA")  # un-premultiply
        mode = "LA"
    elif mode == "RGBa":
        img = img.convert("RGBA")  # un-premultiply
        mode = "RGBA"

    if mode == "RGBA":
        return img.convert("RGB"), img.getchannel("A")
    if mode == "LA":
        return img.getchannel("L"), img.getchannel("A")
    if mode == "PA":
        rgba = img.convert("RGBA")
        return rgba.convert("RGB"), rgba.getchannel("A")

    transparency = img.info.get("transparency")
    if transparency is None:
        return img, None
    if mode == "P":
        rgba = img.convert("RGBA")  # honours a transparent index or a per-entry palette alpha
        return rgba.convert("RGB"), rgba.getchannel("A")
    if mode in ("1", "L", "RGB"):
        target = "RGBA" if mode == "RGB" else "LA"
        try:
            with_alpha = img.convert(target)  # PIL turns the transparent colour into alpha
        except Exception:
            return img, None
        return img, with_alpha.getchannel("A")
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        try:
            key = int(transparency)
        except (TypeError, ValueError):
            return img, None
        mask = np.where(np.asarray(img) == key, 0, 255).astype(np.uint8)
        return img, Image.fromarray(mask, mode="L")
    return img, None


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """Scale a 16-bit / 32-bit int / float image to an 8-bit "L" image (see the module docstring)."""
    mode = img.mode
    data = np.asarray(img)
    if mode in _SIXTEEN_BIT_MODES:
        x = data.astype(np.float64) / 65535.0
    elif mode == "I":
        d = data.astype(np.float64)
        if d.size == 0 or (d.min() >= 0 and d.max() <= 65535):
            x = d / 65535.0
        else:
            x = np.clip(d, 0, None) / float(2**31 - 1)
    else:  # "F"
        d = np.nan_to_num(data.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if d.size == 0 or (d.min() >= 0.0 and d.max() <= 1.0):
            x = d
        else:
            x = np.clip(d, 0.0, 255.0) / 255.0
    u8 = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(u8, mode="L")


# sRGB primaries adapted to D50, as in every sRGB ICC profile
_SRGB_COLORANTS = (
    (0.4361, 0.2225, 0.0139),
    (0.3851, 0.7169, 0.0971),
    (0.1431, 0.0606, 0.7139),
)


def _is_srgb(profile) -> bool:
    """An sRGB profile: an RGB profile whose description starts with "sRGB" ("sRGB IEC61966-2.1",
    "sRGB built-in", "sRGB2014", ...) and whose primaries, where readable, are sRGB's."""
    from PIL import ImageCms

    description = (ImageCms.getProfileDescription(profile) or "").strip().lower()
    if not description.startswith("srgb"):
        return False
    core = getattr(profile, "profile", None)
    if core is None:
        return True
    if (getattr(core, "xcolor_space", "RGB ") or "RGB ").strip() != "RGB":
        return False
    colorants = (
        getattr(core, "red_colorant", None),
        getattr(core, "green_colorant", None),
        getattr(core, "blue_colorant", None),
    )
    for colorant, expected in zip(colorants, _SRGB_COLORANTS):
        if not colorant:
            continue
        xyz = colorant[0]
        if any(abs(float(a) - b) > 0.003 for a, b in zip(xyz, expected)):
            return False
    return True


def _apply_icc(color: Image.Image, icc: bytes, name: str) -> Optional[Image.Image]:
    """Convert ``color`` from its embedded profile to sRGB. Returns an RGB image, or None when the profile
    is sRGB already (or could not be applied; then a warning was issued)."""
    try:
        from PIL import ImageCms
    except ImportError:
        _warn(f"the image carries an ICC profile but PIL.ImageCms is unavailable; colours may be off: {name}")
        return None
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if _is_srgb(src):
            return None  # already sRGB: nothing to do (and the pixels stay bit-exact)
        src_mode = color.mode
        if src_mode not in ("RGB", "L", "CMYK", "LAB"):
            color = color.convert("RGB")
            src_mode = "RGB"
        dst = ImageCms.createProfile("sRGB")
        out = ImageCms.profileToProfile(
            color, src, dst, renderingIntent=ImageCms.Intent.PERCEPTUAL, outputMode="RGB"
        )
        if out is None or out.mode != "RGB":
            raise ValueError("colour transform did not produce an RGB image")
        return out
    except Exception as exc:
        _warn(
            f"could not convert the embedded ICC profile to sRGB ({exc}); colours may be off: {name}"
        )
        return None


# ----------------------------------------------------------------------------------------------------
# tensors <-> images, padding, metrics
# ----------------------------------------------------------------------------------------------------


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] float in [0, 1] -> uint8, by ``(x * 255).round().clamp(0, 255)`` (NaN -> 0).

    Computed in float32 whatever the input dtype, so the result is deterministic."""
    if img.dtype == torch.uint8:
        return img
    x = torch.nan_to_num(img.detach().to(torch.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return (x * 255.0).round().clamp(0.0, 255.0).to(torch.uint8)


def to_pil(img: torch.Tensor) -> Image.Image:
    """[3, H, W] (or [1, 3, H, W]) float in [0, 1] -> RGB PIL image (same rounding as :func:`to_uint8`)."""
    if img.dim() == 4 and img.shape[0] == 1:
        img = img[0]
    if img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(f"to_pil expects a [3, H, W] tensor, got shape {tuple(img.shape)}")
    arr = to_uint8(img).cpu().permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr, mode="RGB")


def pad_to_multiple(x: torch.Tensor, multiple: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Replicate-pad x [B, C, H, W] at the bottom/right so H and W are multiples of ``multiple``.

    Returns (padded, (H, W)) with the original size, for :func:`crop_to`."""
    if x.dim() != 4:
        raise ValueError(f"pad_to_multiple expects a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    if int(multiple) < 1:
        raise ValueError(f"multiple must be at least 1, got {multiple}")
    multiple = int(multiple)
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if h < 1 or w < 1:
        raise ValueError(f"cannot pad an empty image of size {h}x{w}")
    ph = (-h) % multiple
    pw = (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    # "replicate" works for any pad size (unlike "reflect", which needs pad < size, so fails on 1x1).
    return F.pad(x, (0, pw, 0, ph), mode="replicate"), (h, w)


def crop_to(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Crop x [..., H', W'] to [..., :H, :W] (undoes :func:`pad_to_multiple`)."""
    h, w = int(size[0]), int(size[1])
    if h > x.shape[-2] or w > x.shape[-1]:
        raise ValueError(f"cannot crop a {x.shape[-2]}x{x.shape[-1]} tensor to {h}x{w}")
    return x[..., :h, :w]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two images, computed on their uint8-rounded values with peak 255 over the
    whole tensor; ``inf`` when they are identical after rounding."""
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    ua = to_uint8(a).cpu().to(torch.float64)
    ub = to_uint8(b).cpu().to(torch.float64)
    mse = float(((ua - ub) ** 2).mean())
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(255.0 * 255.0 / mse)
