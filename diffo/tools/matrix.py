"""`python -m diffo matrix`: the reliability matrices the README reports, measured on this machine.

    images       one file per image kind users bring (PIL modes 1, L, LA, P, PA, RGB, RGBA, CMYK, I;16, I,
                 F; an EXIF-rotated phone JPEG; an sRGB ICC profile; an animated GIF; 1x1, 1xN and 7x5
                 sizes) written to a temporary folder, then load → encode → decode: what the loader said
                 (its warnings), the stream size and whether the decoded image has the loaded size
    determinism  one stream decoded in fresh processes with 1 and 2 threads, alone and in a batch of 4:
                 hashes of the decoded base indices, residual symbols and 8-bit pixels, which must agree
    devices      (`--devices cpu,cuda`; the default when CUDA is present) a stream encoded on each device is
                 decoded on every device, each in a fresh process: the decoded symbols must be identical,
                 the pixels agree within float rounding (the report gives their largest difference)

The unit tests check each case in detail (tests/test_image.py, tests/test_determinism.py); this command
shows the whole matrix at once, with the embedded model or `--model`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import child, pipeline
from ..image import load_image, to_uint8

THREADS = (1, 2)
BATCH = 4


def _photo(h: int = 48, w: int = 64) -> np.ndarray:
    """A small real photo (the demo's sample) as uint8 [h, w, 3]."""
    from .demo import sample_photo

    with Image.open(sample_photo()) as im:
        return np.array(im.convert("RGB").resize((w, h), Image.Resampling.LANCZOS))


def _crop() -> torch.Tensor:
    """The image the determinism and device matrices code: a 200x264 crop of the sample photo, [3, H, W]."""
    return torch.from_numpy(_photo(200, 264)).permute(2, 0, 1).float() / 255


def image_cases(folder: Path) -> list[tuple[str, Path | Image.Image]]:
    """Write one file per image kind into `folder`: (what it is, path), or (what it is, PIL image) for a
    mode no file format stores (what a Python caller or another node may hand over)."""
    from PIL import ImageCms

    rgb = _photo()
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    alpha = np.full(gray.shape, 255, np.uint8)
    alpha[:, : gray.shape[1] // 3] = 96  # a third of the image is see-through
    base = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display (how phones store portrait shots)
    frames = [base, Image.fromarray(255 - rgb)]
    cases = {
        "mode 1 (PNG)": ("m1.png", base.convert("1"), {}),
        "mode L (PNG)": ("mL.png", base.convert("L"), {}),
        "mode LA, partly transparent (PNG)": ("mLA.png", Image.merge("LA", [Image.fromarray(gray),
                                                                             Image.fromarray(alpha)]), {}),
        "mode P (PNG)": ("mP.png", base.convert("P"), {}),
        "mode PA (a PIL image: no file format stores PA)": (None, base.convert("P").convert("PA"), {}),
        "mode RGB (PNG)": ("mRGB.png", base, {}),
        "mode RGBA, partly transparent (PNG)": ("mRGBA.png", Image.merge("RGBA", [*base.split(),
                                                                                 Image.fromarray(alpha)]), {}),
        "mode CMYK (JPEG)": ("mCMYK.jpg", base.convert("CMYK"), {"quality": 95}),
        "mode I;16, 16-bit gray (PNG)": ("mI16.png", Image.fromarray(gray.astype(np.uint16) * 257), {}),
        "mode I, 32-bit integer (TIFF)": ("mI.tif", Image.fromarray(gray.astype(np.int32) * 100000, "I"), {}),
        "mode F, 32-bit float (TIFF)": ("mF.tif", Image.fromarray(gray.astype(np.float32) / 255, "F"), {}),
        "EXIF orientation 6 (phone JPEG)": ("exif.jpg", base, {"exif": exif.tobytes(), "quality": 95}),
        "sRGB ICC profile (PNG)": ("icc.png", base, {"icc_profile": ImageCms.ImageCmsProfile(
            ImageCms.createProfile("sRGB")).tobytes()}),
        "animated GIF, 2 frames": ("anim.gif", frames[0], {"save_all": True, "append_images": frames[1:],
                                                           "duration": 100}),
        "1x1 (PNG)": ("s1x1.png", base.resize((1, 1)), {}),
        "1x300 (PNG)": ("s1x300.png", base.resize((1, 300)), {}),
        "7x5 (PNG)": ("s7x5.png", base.resize((7, 5)), {}),
    }
    out = []
    for what, (name, im, kwargs) in cases.items():
        if name is None:
            out.append((what, im))
            continue
        path = folder / name
        im.save(path, **kwargs)
        out.append((what, path))
    return out


def image_matrix(model) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for what, source in image_cases(Path(tmp)):
            name = str(source) if isinstance(source, Path) else "<PIL image>"  # as the loader's warnings say
            with (Image.open(source) if isinstance(source, Path) else nullcontext(source)) as im:
                row = {"case": what, "stored_mode": im.mode, "stored_size": f"{im.width}x{im.height}"}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    img = load_image(source, drop_alpha=True)
                except Exception as e:  # reported as the row's outcome: the matrix shows every refusal
                    rows.append({**row, "ok": False, "error": f"{type(e).__name__}: {e}"})
                    continue
            data = pipeline.encode(model, img, rate=0.5)
            rec = pipeline.decode(model, data)
            rows.append({**row, "loaded_size": f"{img.shape[2]}x{img.shape[1]}", "bytes": len(data),
                         "warnings": [str(w.message).removesuffix(f": {name}") for w in caught],
                         "ok": rec.shape == img.shape})
    return rows


# ------------------------------------------------------------------------------------------------ determinism
def _h(t) -> str:
    if t is None:  # no residual at rate level 0
        return "none"
    return hashlib.sha256(t if isinstance(t, bytes) else t.cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _sample_stream(model) -> bytes:
    """The stream the determinism and device matrices decode: the crop at rate level 0.6, decoder seed 7."""
    return pipeline.encode(model, _crop(), rate=0.6, seed=7)


def _symbols(model, data: bytes) -> dict:
    """Hashes of the entropy-decoded base indices and residual symbols (ŷ) of `data`."""
    idx, y_hat = pipeline.decode_symbols(model, data)
    return {"indices": _h(idx), "y_hat": _h(y_hat)}


def decoded_symbols(model, data: bytes) -> dict:
    """Hashes of what decoding `data` gives: base indices, residual symbols (ŷ), 8-bit pixels, and whether
    a batch of BATCH copies decodes to the same pixels."""
    pixels = to_uint8(pipeline.decode(model, data))
    batch = [to_uint8(x) for x in pipeline.decode_batch(model, [data] * BATCH)]
    return {**_symbols(model, data), "pixels": _h(pixels), "batch_equal": all(torch.equal(b, pixels) for b in batch)}


def _determinism_child(threads: int, model_source: str | None, stream: str) -> dict:
    from ..hub import load_model

    torch.set_num_threads(threads)
    return {"threads": torch.get_num_threads(), **decoded_symbols(load_model(model_source), Path(stream).read_bytes())}


def determinism_matrix(model, model_source: str | None) -> dict:
    data = _sample_stream(model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stream = Path(tmp) / "one.diffo"
        stream.write_bytes(data)
        for threads in THREADS:
            row = child.run_json(
                f"import json; from diffo.tools.matrix import _determinism_child; "
                f"print(json.dumps(_determinism_child({threads}, {model_source!r}, {str(stream)!r})))",
                env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            rows.append({"threads": threads, **row} if "error" in row else row)
    keys = ("indices", "y_hat", "pixels")
    same = all("error" not in r for r in rows) and all(len({r[k] for r in rows}) == 1 for k in keys) \
        and all(r["batch_equal"] for r in rows)
    return {"stream_bytes": len(data), "image": "200x264 crop of the sample photo", "rate": 0.6,
            "processes": rows, "identical": same}


# ------------------------------------------------------------------------------------------------ devices
def _device_child(phase: str, device: str, tag: str, model_source: str | None, folder: str) -> dict:
    """In a fresh process on `device`: "encode" writes `tag`.diffo; "decode" decodes every stream in
    `folder`, saving its 8-bit pixels as <stream>.<tag>.npy, and returns the hashes of its symbols."""
    from ..hub import load_model

    model = load_model(model_source, device=device)
    out = Path(folder)
    if phase == "encode":
        data = _sample_stream(model)
        (out / f"{tag}.diffo").write_bytes(data)
        return {"device": str(model.device), "bytes": len(data), "stream": _h(data)}
    rows = {}
    for stream in sorted(out.glob("*.diffo")):
        data = stream.read_bytes()
        pixels = to_uint8(pipeline.decode(model, data))
        np.save(out / f"{stream.stem}.{tag}.npy", pixels.numpy())
        rows[stream.stem] = {**_symbols(model, data), "pixels": _h(pixels)}
    return {"device": str(model.device), "decoded": rows}


def device_matrix(model_source: str | None, devices: list[str]) -> dict:
    """Encode on each of `devices`, decode every stream on each: symbol hashes per (encoder, decoder) and the
    largest pixel difference between decoders (8-bit levels). Identical when the symbols are."""
    tags = [f"{i}-{d.replace(':', '')}" for i, d in enumerate(devices)]

    def each(phase: str, folder: str) -> list[dict]:
        return [child.run_json(f"import json; from diffo.tools.matrix import _device_child; print(json.dumps("
                               f"_device_child({phase!r}, {d!r}, {t!r}, {model_source!r}, {folder!r})))")
                for d, t in zip(devices, tags)]

    with tempfile.TemporaryDirectory() as tmp:
        encoded = each("encode", tmp)
        decoded = [] if any("error" in r for r in encoded) else each("decode", tmp)
        errors = [r["error"] for r in encoded + decoded if "error" in r]
        if errors:
            return {"devices": devices, "errors": errors, "identical_symbols": False}
        pairs, same = [], True
        for enc_tag, enc_dev in zip(tags, devices):
            pixels = [np.load(Path(tmp) / f"{enc_tag}.{t}.npy").astype(np.int16) for t in tags]
            rows = [{"encoded_on": enc_dev, "decoded_on": dec_dev, **dec["decoded"][enc_tag],
                     "max_pixel_diff_vs_first": int(np.abs(px - pixels[0]).max()),
                     "mean_pixel_diff_vs_first": float(np.abs(px - pixels[0]).mean())}
                    for dec, dec_dev, px in zip(decoded, devices, pixels)]
            same &= all(len({r[k] for r in rows}) == 1 for k in ("indices", "y_hat"))  # one stream, every decoder
            pairs += rows
    return {"devices": [r["device"] for r in encoded], "streams": encoded, "pairs": pairs, "identical_symbols": same}


def default_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else []


def run(model_source: str | None, devices: list[str] | None = None) -> dict:
    from ..hub import load_model

    model = load_model(model_source)
    devices = default_devices() if devices is None else devices
    return {"model": model.config.name, "fingerprint": model.fingerprint.hex(),
            "images": image_matrix(model), "determinism": determinism_matrix(model, model_source),
            "devices": device_matrix(model_source, devices) if len(devices) > 1
            else {"skipped": "no second device (CUDA not available): pass --devices cpu,cuda on a GPU machine"}}
