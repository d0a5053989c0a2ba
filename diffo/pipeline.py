"""Bytes in, bytes out: `encode(model, image, rate=|bpp=|max_bytes=) -> bytes`, `decode(model, data) -> image`.

    1. check inputs         image → RGB [3,H,W] in [0,1]; size within the format's limits
    2. pad                  replicate-pad to the model's multiple (cropped away after decoding)
    3. analysis             the family's `analyse`: VAE encoder → latent (DiffO: and its base code, the same for
                            every rate level)
    4. rate                 the given level, or a bisection over the 16-bit level for a bpp / byte target (a
                            family with one rate per model, OSDiff, codes once whatever is asked)
    5. container            header + sub-streams + CRC (bitstream.py); bpp = 8 × len(bytes) / (H × W)
Decoding reverses it: container → family and fingerprint check → entropy decode (c_hat: DiffO's ĉ, OSDiff's hint)
→ control → one-step denoise → decoder → crop. Images are decoded one at a time, so a batch gives the same
pixels as single calls. The families' steps are reached through `diffo.models.CodecBase` only.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from . import tiling
from .bitstream import MAX_PIXELS, MAX_SIDE, Bitstream, bits_per_pixel, dequantize_unit, quantize_unit
from .entropy import coder_for_format
from .errors import BitstreamError, DiffoError, ImageInputError, ModelMismatchError
from .image import crop_to, load_image, pad_to_multiple
from . import models
from .models import FAMILY_NAMES, CodecBase

MAX_RATE_Q = 65535  # the highest rate level (a uint16 in the container)

Progress = Callable[[int, int], None]
Step = Callable[[], None]  # called after each unit of long work (a bisection step, a tile): progress bars, Cancel


def latent_valid(h: int, w: int) -> tuple[int, int]:
    """The latent positions that cover an H x W image (the rest is padding)."""
    return -(-h // 8), -(-w // 8)


def padded_latent_shape(model: CodecBase, h: int, w: int) -> tuple[int, int]:
    """The latent size the codec works on: the image padded to the model's multiple, over 8."""
    return models.padded_latent_shape(h, w, model.config.pad_multiple)


def _as_image(image, drop_alpha: bool = False) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ImageInputError(f"expected an RGB tensor [3, H, W], got shape {tuple(image.shape)}")
        if not torch.isfinite(image).all():
            raise ImageInputError("image tensor holds NaN or infinite values")
        return image.float().clamp(0, 1)
    return load_image(image, drop_alpha=drop_alpha)


def check_size(h: int, w: int) -> None:
    if h < 1 or w < 1:
        raise ImageInputError(f"image is empty ({w}x{h})")
    if h > MAX_SIDE or w > MAX_SIDE or h * w > MAX_PIXELS:
        raise ImageInputError(f"image is {w}x{h}; DiffO codes up to {MAX_SIDE} pixels a side and {MAX_PIXELS} in all")


@torch.no_grad()
def analyse(model: CodecBase, image, drop_alpha: bool = False):
    """Steps 1-3: the part of encoding that does not depend on the rate level (the family's analysis)."""
    img = _as_image(image, drop_alpha)
    h, w = img.shape[-2:]
    check_size(h, w)
    x, _ = pad_to_multiple(img[None], model.config.pad_multiple)
    return model.analyse(x, (h, w))


def container(model: CodecBase, enc, rate_q: int, strength: float | None, seed: int) -> bytes:
    """The `.diffo` bytes of an analysis at rate level `rate_q` (strength None: the model's choice for the rate)."""
    streams = model.streams(enc, rate_q)
    if strength is None:
        strength = model.strength_for_rate(dequantize_unit(rate_q))
    h, w = enc.size
    return Bitstream(fingerprint=model.fingerprint, width=w, height=h, rate_q=rate_q,
                     strength_q=quantize_unit(strength), seed=seed, streams=streams,
                     format_version=model.format_version, family=model.family_id).to_bytes()


def code_streams(model: CodecBase, enc, rate_q: int, coder) -> tuple[bytes, ...]:
    """The sub-streams of rate level `rate_q`, coded afresh with `coder` (any format's: the bench compares the
    coders and the golden fixture writes an old format with it; `encode` writes the model's format and reuses
    what its analysis cached)."""
    return model.streams(enc, rate_q, coder)


SEARCH_STEPS = MAX_RATE_Q.bit_length() + 1  # the most rate levels a bpp / max_bytes search codes


def _search(build: Callable[[int], bytes], fits: Callable[[bytes], bool]) -> int:
    """Largest rate level whose stream `fits`, by bisection (stream size grows with the level)."""
    lo, hi = 0, MAX_RATE_Q
    if fits(build(hi)):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(build(mid)):
            lo = mid
        else:
            hi = mid
    return lo


def encode(model: CodecBase, image, *, rate: float | None = None, bpp: float | None = None,
           max_bytes: int | None = None, seed: int = 0, strength: float | None = None,
           drop_alpha: bool = False, on_step: Step | None = None) -> bytes:
    """Compress `image` (path, PIL image or [3,H,W] tensor in [0,1]) to `.diffo` bytes.

    Exactly one of: `rate` (level in [0, 1]; 0 = base code only), `bpp` (the level whose file is nearest to
    that many bits per pixel, header included), `max_bytes` (the highest level whose file fits).
    `strength` overrides the model's rate → noise map; `seed` seeds the decoder's noise; `drop_alpha`
    composites a transparent image onto white instead of refusing it. `on_step` is called after each coded
    rate level (up to SEARCH_STEPS of them)."""
    check_rate_arguments(rate, bpp, max_bytes, seed, strength)  # before the (slow) analysis
    return encode_analysis(model, analyse(model, image, drop_alpha), rate=rate, bpp=bpp, max_bytes=max_bytes,
                           seed=seed, strength=strength, on_step=on_step)


def check_rate_arguments(rate, bpp, max_bytes, seed, strength) -> None:
    given = [k for k, v in (("rate", rate), ("bpp", bpp), ("max_bytes", max_bytes)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of rate, bpp, max_bytes (got {given or 'none'})")
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed must be in 0..2^32-1, got {seed}")
    if strength is not None:
        quantize_unit(strength)  # validates
    if rate is not None:
        quantize_unit(rate)
    if max_bytes is not None and (int(max_bytes) != max_bytes or max_bytes < 1):
        raise ValueError(f"max_bytes must be a positive integer, got {max_bytes}")
    if bpp is not None and not (0 < bpp < float("inf")):
        raise ValueError(f"bpp must be a positive number, got {bpp}")


def encode_analysis(model, enc, *, rate: float | None = None, bpp: float | None = None,
                    max_bytes: int | None = None, seed: int = 0, strength: float | None = None,
                    on_step: Step | None = None) -> bytes:
    """`encode` from a family's analysis (`enc`: what `model.analyse` gives, or the codec-only parts' analysis
    of a latent made by another VAE): the rate level, bpp or size search and the container."""
    check_rate_arguments(rate, bpp, max_bytes, seed, strength)
    rate_q = quantize_unit(rate) if rate is not None else None
    cache: dict[int, bytes] = {}

    def build(q: int) -> bytes:
        if not model.has_rate_levels:
            q = 0  # one rate per checkpoint: every level is the same stream
        if q not in cache:
            cache[q] = container(model, enc, q, strength, int(seed))
            if on_step:
                on_step()
        return cache[q]

    h, w = enc.size
    if rate_q is not None:
        return build(rate_q)
    if max_bytes is not None:
        q = _search(build, lambda b: len(b) <= max_bytes)
        if len(build(q)) > max_bytes:
            raise ValueError(f"cannot fit this {w}x{h} image in {max_bytes} bytes: the smallest stream "
                             f"({'base code only' if model.has_rate_levels else 'the one rate of this model'}) "
                             f"takes {len(build(0))} bytes")
        return build(q)
    target = bpp * h * w / 8
    q = _search(build, lambda b: len(b) <= target)
    candidates = [q] + ([q + 1] if q < MAX_RATE_Q else [])
    return min((build(c) for c in candidates), key=lambda b: abs(len(b) - target))


def read_header(data: bytes) -> Bitstream:
    return Bitstream.from_bytes(bytes(data))


@torch.no_grad()
def entropy_decode(model: CodecBase, data: bytes | Bitstream,
                   max_pixels: int | None = None) -> tuple[Bitstream, torch.Tensor]:
    """Container → (header, ĉ [1, C, h, w] at the padded latent size). Checks the model fingerprint and,
    when given, that the image is at most `max_pixels` (decoding time and memory grow with the size the header
    claims, so a service decoding untrusted files sets a budget)."""
    bs = data if isinstance(data, Bitstream) else read_header(data)
    if max_pixels is not None and bs.width * bs.height > max_pixels:
        raise BitstreamError(f"this stream claims a {bs.width}x{bs.height} image ({bs.width * bs.height} pixels), "
                             f"more than this decoder's limit of {max_pixels} pixels (raise max_pixels to decode it)")
    check_model(model, bs)
    coder = coder_for_format(bs.format_version)  # format 1 needs CompressAI: a MissingExtraError says so
    try:
        c_hat = model.entropy_decode(bs, coder)
    except DiffoError:
        raise
    except Exception as e:  # the entropy decoder or a shape check met data no encoder wrote
        raise BitstreamError(f"the entropy-coded data is damaged or forged ({type(e).__name__}: {e})") from e
    return bs, c_hat


def check_model(model: CodecBase, bs: Bitstream) -> None:
    """Refuse a stream that another model family or another model made, naming both."""
    if bs.family != model.family_id:
        raise ModelMismatchError(
            f"this stream was made by a {FAMILY_NAMES.get(bs.family, f'family-{bs.family}')} model, but the loaded "
            f"model '{model.config.name}' is a {model.family} model: load the model that made it "
            f"(fingerprint {bs.fingerprint.hex()})")
    if bs.fingerprint != model.fingerprint:
        raise ModelMismatchError(
            f"this stream was made by model {bs.fingerprint.hex()}, but the loaded model "
            f"'{model.config.name}' is {model.fingerprint.hex()}: load the model that made it")
    model.check_streams(bs)


@torch.no_grad()
def decode_symbols(model: CodecBase, data: bytes) -> tuple[torch.Tensor | None, ...]:
    """The entropy-decoded integer symbols of a stream, with the coder of its format: what is identical on every
    machine (the determinism checks hash these). DiffO: (base indices, residual ŷ or None); OSDiff: (ẑ symbols,
    ŷ symbols)."""
    bs = read_header(data)
    check_model(model, bs)
    return model.decode_symbols(bs, coder_for_format(bs.format_version))


def decoder_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The decoder's noise [1, C, h, w]: drawn on the CPU from the header's seed, the same on every device."""
    return torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(int(seed)))


_exact_lock = threading.Lock()
_exact_users = 0  # reproducible (oneDNN-off) sections running now, in any thread
_mkldnn_before = True  # the setting to restore when the last of them ends


@contextmanager
def reproducible(fast: bool = False):
    """Context for the float networks of decoding. By default oneDNN (mkldnn) is off on the CPU: its
    convolutions change their summation order with the thread count, so pixels would differ between a
    1-thread and a 2-thread decode. im2col + GEMM gives identical pixels, 2-3x slower; `fast=True`
    keeps oneDNN (pixels then agree only to float rounding). Entropy decoding is exact either way.
    PyTorch's switch is process-wide, so exact sections are counted across threads: oneDNN goes off when
    the first starts and back to its old setting when the last ends. A `fast` section never turns it back on
    under an exact one (it runs exact while one is active: same result, slower), so concurrent decodes in
    threads (queued ComfyUI prompts, a server) stay reproducible.
    (Not `torch.backends.mkldnn.flags`: it also touches the TF32 setting and warns on every call.)"""
    global _exact_users, _mkldnn_before
    if fast:
        yield
        return
    with _exact_lock:
        if _exact_users == 0:
            _mkldnn_before = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = False
        _exact_users += 1
    try:
        yield
    finally:
        with _exact_lock:
            _exact_users -= 1
            if _exact_users == 0:
                torch.backends.mkldnn.enabled = _mkldnn_before


@torch.no_grad()
def decode(model: CodecBase, data: bytes | Bitstream, *, strength: float | None = None, seed: int | None = None,
           denoise: bool = True, fast: bool = False, on_step: Step | None = None,
           max_pixels: int | None = None) -> torch.Tensor:
    """`.diffo` bytes → image [3, H, W] in [0, 1]. `strength`/`seed` override the stream's noise settings;
    `denoise=False` skips the diffusion step (decodes ĉ directly: the ablation); `fast`: see
    `reproducible`. The same as `entropy_decode` → `control` → `denoise_latent` → `latent_to_image`.
    `on_step` is called after entropy decoding, after each denoiser tile and after the decoder
    (`decode_steps` of them). `max_pixels`: refuse streams that claim a larger image (see `entropy_decode`)."""
    if strength is not None:
        quantize_unit(strength)
    step = on_step or (lambda: None)
    with reproducible(fast):  # g_s inside entropy_decode is a float network too
        bs, c_hat = entropy_decode(model, data, max_pixels)
        step()
        latent = latent_from_c_hat(model, c_hat, bs.strength if strength is None else strength,
                                   bs.seed if seed is None else seed, on_step) if denoise else c_hat
        image = latent_to_image(model, latent, (bs.height, bs.width))[0]
        step()
        return image


def decode_steps(model: CodecBase, data: bytes, denoise: bool = True) -> int:
    """How many times `decode` calls `on_step` for this stream (read from its header)."""
    bs = read_header(data)
    return 2 + (len(tiling.latent_windows(*padded_latent_shape(model, bs.height, bs.width))) if denoise else 0)


@dataclass
class ControlTiles:
    """The control module's output for each tile of a latent (a single tile up to 768 px a side; tiling.py)."""

    shape: tuple[int, int]  # the whole latent's (h, w)
    tiles: list[tuple[tiling.Window, object]]  # each family's control output


def _tile_inputs(model: CodecBase, c_hat: torch.Tensor, strength: float, seed: int):
    """ĉ on the model's device, the decoder noise for the whole latent, and the latent's (h, w)."""
    quantize_unit(strength)  # validates
    c_hat = c_hat.to(model.device)
    return c_hat, decoder_noise(tuple(c_hat.shape[1:]), seed), tuple(c_hat.shape[-2:])


def _control_tile(model: CodecBase, c_hat: torch.Tensor, noise: torch.Tensor, strength: float,
                  window: tiling.Window):
    ys, xs = window
    return model.control(c_hat[..., ys, xs], strength, noise[..., ys, xs])


@torch.no_grad()
def control(model: CodecBase, c_hat: torch.Tensor, strength: float, seed: int) -> ControlTiles:
    """ĉ [1, C, h, w] → the control module's output, per tile: the noisy start x_t (noise from `seed`, its
    amount from `strength`), the timestep and the residuals that steer the UNet."""
    c_hat, noise, shape = _tile_inputs(model, c_hat, strength, seed)
    return ControlTiles(shape, [(win, _control_tile(model, c_hat, noise, strength, win))
                                for win in tiling.latent_windows(*shape)])


@torch.no_grad()
def denoise_latent(model: CodecBase, ctrl: ControlTiles) -> torch.Tensor:
    """The one denoising step on every tile, blended: control output → clean (scaled) latent ẑ₀."""
    return tiling.blend(((win, model.denoise(out)) for win, out in ctrl.tiles), ctrl.shape)


@torch.no_grad()
def latent_from_c_hat(model: CodecBase, c_hat: torch.Tensor, strength: float, seed: int,
                      on_step: Step | None = None) -> torch.Tensor:
    """Control + one-step denoise: ĉ → clean latent ẑ₀; `control` then `denoise_latent`, one tile at a time
    (so a large image never holds every tile's control residuals at once); `on_step` after each tile."""
    c_hat, noise, shape = _tile_inputs(model, c_hat, strength, seed)

    def tiles():
        for win in tiling.latent_windows(*shape):
            piece = model.denoise(_control_tile(model, c_hat, noise, strength, win))
            if on_step:
                on_step()
            yield win, piece

    return tiling.blend(tiles(), shape)


@torch.no_grad()
def latent_to_image(model: CodecBase, latent: torch.Tensor, size: tuple[int, int] | None = None,
                    raw: bool = False) -> torch.Tensor:
    """Scaled latent [B, C, h, w] (`raw`: in the VAE's own units) → images [B, 3, H, W] in [0, 1] on the CPU,
    cropped to `size` (the image's own size, without the padding) when given."""
    latent = latent.to(model.device)
    img = (model.decode_raw_latent(latent) if raw else model.decode_latent(latent)).cpu()
    return crop_to(img, size) if size is not None else img


def decode_batch(model: CodecBase, streams: list[bytes], progress: Progress | None = None, **kw) -> list[torch.Tensor]:
    out = []
    for i, data in enumerate(streams):
        out.append(decode(model, data, **kw))
        if progress:
            progress(i + 1, len(streams))
    return out


def bpp_of(data: bytes) -> float:
    bs = read_header(data)
    return bits_per_pixel(len(data), bs.width, bs.height)
