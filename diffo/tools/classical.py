"""Classical image codecs as anchors: encode an image to a target bpp by bisection on the codec's quality knob.

Each codec is an encoder `(PIL RGB image, knob) -> bytes` plus a decoder `bytes -> PIL image`, with the knob's
range and direction. `encode_to_bpp` finds the best quality whose *real file* (headers included) fits in
`target_bpp × H × W / 8` bytes; when even the lowest quality is larger it raises `TargetUnreachable` rather
than inventing a point. The bpp reported is always the file's own size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, features

from ..bitstream import bits_per_pixel
from ..extras import require
from ..image import to_pil


class TargetUnreachable(ValueError):
    """The codec's smallest file for this image is larger than the target."""


class CodecUnavailable(RuntimeError):
    """The codec's library is not installed (the message says which package provides it)."""


@dataclass(frozen=True)
class ClassicalCodec:
    name: str  # the name on the command line, in CSVs and in the nodes
    label: str  # for tables and plots
    encode: Callable[[Image.Image, float], bytes]
    decode: Callable[[bytes], Image.Image]
    knob: tuple[float, float]  # (worst, best) value of the quality knob; may run in either direction
    integer: bool  # an integer knob (quality 0-100) or a continuous one
    available: Callable[[], str | None]  # None when usable, else what to install


def _pil_saver(fmt: str, knob_name: str, **options) -> Callable[[Image.Image, float], bytes]:
    def encode(img: Image.Image, knob: float) -> bytes:
        buf = io.BytesIO()
        value = int(round(knob)) if knob_name == "quality" else knob
        img.save(buf, format=fmt, **{knob_name: value}, **options)
        return buf.getvalue()

    return encode


def _j2k_encode(img: Image.Image, ratio: float) -> bytes:
    # JPEG 2000's native rate control: one quality layer at a compression ratio (24 bits / target bpp).
    buf = io.BytesIO()
    img.save(buf, format="JPEG2000", irreversible=True, quality_mode="rates", quality_layers=[ratio])
    return buf.getvalue()


def _pil_decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def _jxl_encode(img: Image.Image, distance: float) -> bytes:
    imagecodecs = require("imagecodecs", "The JPEG XL anchor")

    return bytes(imagecodecs.jpegxl_encode(np.asarray(img), distance=distance, effort=7, numthreads=1))


def _jxl_decode(data: bytes) -> Image.Image:
    imagecodecs = require("imagecodecs", "The JPEG XL anchor")

    return Image.fromarray(np.ascontiguousarray(imagecodecs.jpegxl_decode(data, numthreads=1))[..., :3])


# ---- HEVC (x265) and VVC (vvenc) through imageio-ffmpeg's bundled ffmpeg, as single 4:4:4 intra frames.
# The RGB <-> YCbCr conversion is ours (BT.601 full range, the JPEG/BPG matrix), so ffmpeg never resamples.
_RGB_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_YCC_TO_RGB = np.linalg.inv(_RGB_TO_YCC)


def rgb_to_ycbcr_planes(rgb: np.ndarray) -> bytes:
    """uint8 [H, W, 3] RGB → planar Y, Cb, Cr bytes (yuv444p)."""
    ycc = rgb.astype(np.float64) @ _RGB_TO_YCC.T + np.array([0.0, 128.0, 128.0])
    return np.clip(np.round(ycc), 0, 255).astype(np.uint8).transpose(2, 0, 1).tobytes()


def ycbcr_planes_to_rgb(planes: bytes, h: int, w: int) -> np.ndarray:
    ycc = np.frombuffer(planes, dtype=np.uint8).reshape(3, h, w).transpose(1, 2, 0).astype(np.float64)
    rgb = (ycc - np.array([0.0, 128.0, 128.0])) @ _YCC_TO_RGB.T
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def _ffmpeg(args: list[str], data: bytes, what: str) -> bytes:
    import subprocess

    imageio_ffmpeg = require("imageio_ffmpeg", "The HEVC and VVC anchors")

    proc = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin",
                           *args], input=data, capture_output=True)
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"ffmpeg failed to {what}: {proc.stderr.decode(errors='replace').strip()[-400:]}")
    return proc.stdout


VIDEO_BLOCK = 8  # vvenc refuses frames whose sides are not multiples of its minimum block (481x321 fails)


def _video_codec(encoder: list[str], fmt: str):
    """Encoder/decoder of one intra frame; `encoder` holds '{qp}' where the quantiser goes. The frame is padded
    (edge pixels repeated) to multiples of VIDEO_BLOCK and cropped back after decoding; the padding's bytes count."""
    def encode(img: Image.Image, qp: float) -> bytes:
        rgb = np.asarray(img)
        ph, pw = -(-img.height // VIDEO_BLOCK) * VIDEO_BLOCK, -(-img.width // VIDEO_BLOCK) * VIDEO_BLOCK
        rgb = np.pad(rgb, ((0, ph - img.height), (0, pw - img.width), (0, 0)), mode="edge")
        args = ["-f", "rawvideo", "-pix_fmt", "yuv444p", "-s", f"{pw}x{ph}", "-i", "-",
                "-frames:v", "1", *[a.format(qp=int(round(qp))) for a in encoder], "-f", fmt, "-"]
        # the frame size travels in the stream (SPS); the 4-byte prefix (the size before padding) is ours, for
        # the decoder, and counted
        return img.width.to_bytes(2, "big") + img.height.to_bytes(2, "big") + \
            _ffmpeg(args, rgb_to_ycbcr_planes(rgb), f"encode with {encoder[1]}")

    def decode(data: bytes) -> Image.Image:
        w, h = int.from_bytes(data[:2], "big"), int.from_bytes(data[2:4], "big")
        ph, pw = -(-h // VIDEO_BLOCK) * VIDEO_BLOCK, -(-w // VIDEO_BLOCK) * VIDEO_BLOCK
        planes = _ffmpeg(["-f", fmt, "-i", "-", "-f", "rawvideo", "-pix_fmt", "yuv444p", "-"], data[4:], f"decode {fmt}")
        return Image.fromarray(ycbcr_planes_to_rgb(planes[:3 * pw * ph], ph, pw)[:h, :w])

    return encode, decode


def _ffmpeg_encoder(name: str) -> Callable[[], str | None]:
    def available() -> str | None:
        try:
            import subprocess

            import imageio_ffmpeg
        except ImportError:
            return "the imageio-ffmpeg package (pip install \"comfyui-diffo[eval]\")"
        out = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-encoders"], capture_output=True,
                             text=True).stdout
        return None if f" {name} " in out else f"an ffmpeg with {name} (imageio-ffmpeg's bundled build has it)"

    return available


def _pil_feature(feature: str, package: str) -> Callable[[], str | None]:
    return lambda: None if features.check(feature) else f"a Pillow built with {feature} ({package})"


def _jxl_available() -> str | None:
    try:
        import imagecodecs
    except ImportError:
        return "the imagecodecs package (pip install \"comfyui-diffo[eval]\")"
    return None if imagecodecs.JPEGXL.available else "an imagecodecs build with JPEG XL"


CODECS: dict[str, ClassicalCodec] = {c.name: c for c in (
    ClassicalCodec("jpeg", "JPEG", _pil_saver("JPEG", "quality", optimize=True), _pil_decode, (1, 95), True,
                   _pil_feature("jpg", "libjpeg")),
    ClassicalCodec("webp", "WebP", _pil_saver("WEBP", "quality", method=6), _pil_decode, (0, 100), True,
                   _pil_feature("webp", "libwebp")),
    # tune=psnr: libaom's default tunes for SSIM-like looks; PSNR tuning is the usual anchor in codec papers.
    ClassicalCodec("avif", "AVIF", _pil_saver("AVIF", "quality", speed=6, advanced={"tune": "psnr"}), _pil_decode,
                   (0, 100), True, _pil_feature("avif", "Pillow >= 11.3 with libavif")),
    ClassicalCodec("jpeg2000", "JPEG 2000", _j2k_encode, _pil_decode, (2400.0, 2.0), False,
                   _pil_feature("jpg_2000", "openjpeg")),
    ClassicalCodec("jxl", "JPEG XL", _jxl_encode, _jxl_decode, (25.0, 0.05), False, _jxl_available),
    # BPG-like: x265 4:4:4 intra; info=0 keeps x265's version/settings SEI text (~2 kB) out of the file
    ClassicalCodec("x265", "HEVC (x265 4:4:4)", *_video_codec(
        ["-c:v", "libx265", "-preset", "medium", "-x265-params", "qp={qp}:info=0:log-level=error"], "hevc"),
        (51, 0), True, _ffmpeg_encoder("libx265")),
    ClassicalCodec("vvc", "VVC (vvenc 4:4:4)", *_video_codec(
        ["-c:v", "libvvenc", "-preset", "fast", "-qp", "{qp}"], "vvc"),
        (63, 1), True, _ffmpeg_encoder("libvvenc")),  # vvenc fails at QP 0 on some photos (e.g. kodim13)
)}


def codec(name: str) -> ClassicalCodec:
    if name not in CODECS:
        raise ValueError(f"unknown classical codec {name!r}; known: {', '.join(CODECS)}")
    c = CODECS[name]
    missing = c.available()
    if missing:
        raise CodecUnavailable(f"{c.label} needs {missing}")
    return c


def available_codecs() -> list[str]:
    return [n for n, c in CODECS.items() if c.available() is None]


@dataclass
class ClassicalResult:
    codec: str
    data: bytes
    image: torch.Tensor  # decoded [3, H, W] in [0, 1]
    knob: float

    @property
    def bpp(self) -> float:
        return bits_per_pixel(len(self.data), self.image.shape[2], self.image.shape[1])


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def encode_to_bpp(image: torch.Tensor, name: str, target_bpp: float, steps: int = 24) -> ClassicalResult:
    """`image` [3, H, W] in [0, 1] through codec `name` at the best quality whose file is at most
    `target_bpp` bits per pixel; raises `TargetUnreachable` when its smallest file is larger."""
    c = codec(name)
    if not target_bpp > 0:
        raise ValueError(f"target bpp must be positive, got {target_bpp}")
    pil = to_pil(image)
    budget = target_bpp * pil.width * pil.height / 8
    worst, best = c.knob
    sizes: dict[float, bytes] = {}

    def encoded(k: float) -> bytes:
        if k not in sizes:
            sizes[k] = c.encode(pil, k)
        return sizes[k]

    if len(encoded(worst)) > budget:
        raise TargetUnreachable(
            f"{c.label} cannot reach {target_bpp:g} bpp on this {pil.width}x{pil.height} image: its smallest "
            f"file is {len(encoded(worst))} bytes = {bits_per_pixel(len(encoded(worst)), pil.width, pil.height):.4f} bpp")
    lo, hi = worst, best  # invariant: encoded(lo) fits
    if len(encoded(hi)) <= budget:
        lo = hi
    elif c.integer:
        while abs(hi - lo) > 1:
            mid = (lo + hi) // 2 if hi > lo else (lo + hi + 1) // 2
            lo, hi = (mid, hi) if len(encoded(mid)) <= budget else (lo, mid)
    else:
        for _ in range(steps):  # geometric bisection: both knobs span orders of magnitude
            mid = (lo * hi) ** 0.5
            lo, hi = (mid, hi) if len(encoded(mid)) <= budget else (lo, mid)
    data = encoded(lo)
    return ClassicalResult(name, data, _to_tensor(c.decode(data)), float(lo))
