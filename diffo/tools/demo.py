"""`python -m diffo demo`: the round trip of one photo at several rate levels, with a comparison picture;
`python -m diffo examples DIR`: the input files the example ComfyUI workflows name."""

from __future__ import annotations

from pathlib import Path


from ..bitstream import bits_per_pixel
from ..errors import OutputExistsError
from .figures import comparison_picture
from ..fileio import save_image_atomic, write_atomic
from ..extras import require
from ..image import load_image, psnr


def sample_photo() -> Path:
    """A real photo that an installed package ships (matplotlib's public-domain portrait of Grace Hopper)."""
    cbook = require("matplotlib.cbook", "The demo photo (matplotlib's sample data)")

    return Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def run_demo(image: str | None, out_dir: Path, model_source: str | None, rates: list[float], force: bool) -> list[dict]:
    from .. import pipeline
    from ..hub import load_model

    src = Path(image) if image else sample_photo()
    original = load_image(src)
    planned = [out_dir / f"{src.stem}_rate{r:g}.{ext}" for r in rates for ext in ("diffo", "png")]
    planned.append(out_dir / f"{src.stem}_comparison.png")
    existing = [p for p in planned if p.exists()]
    if existing and not force:
        raise OutputExistsError(f"{existing[0]} exists (and {len(existing) - 1} more); pass --force or another --out")
    model = load_model(model_source)
    h, w = original.shape[1:]
    print(f"{src.name}: {w}x{h}, model {model.config.name} ({model.fingerprint.hex()})")
    print(f"{'rate':>6} {'bytes':>7} {'bpp':>8} {'PSNR dB':>8}")
    rows, recons = [], []
    for r in rates:
        data = pipeline.encode(model, original, rate=r)
        rec = pipeline.decode(model, data)
        row = {"rate": r, "bytes": len(data), "bpp": bits_per_pixel(len(data), w, h), "psnr": psnr(original, rec)}
        rows.append(row)
        write_atomic(out_dir / f"{src.stem}_rate{r:g}.diffo", data, force=force)
        save_image_atomic(out_dir / f"{src.stem}_rate{r:g}.png", rec, force=force)
        recons.append((f"rate {r:g}: {len(data)} B, {row['bpp']:.3f} bpp, {row['psnr']:.1f} dB", rec))
        print(f"{r:>6g} {len(data):>7d} {row['bpp']:>8.4f} {row['psnr']:>8.2f}")
    save_image_atomic(out_dir / f"{src.stem}_comparison.png", comparison_picture(original, recons), force=force)
    print(f"wrote {len(planned)} files to {out_dir}/")
    return rows


EXAMPLE_IMAGE = "diffo_example.png"
EXAMPLE_STREAM = "diffo_example.diffo"
EXAMPLE_BPP = 0.1


def write_examples(out_dir: Path, model_source: str | None = None, force: bool = False) -> list[Path]:
    """The sample photo as `diffo_example.png` and its 0.1 bpp stream as `diffo_example.diffo`: the files the
    shipped workflows load from ComfyUI's input folder."""
    from .. import pipeline
    from ..hub import load_model

    png, stream = out_dir / EXAMPLE_IMAGE, out_dir / EXAMPLE_STREAM
    existing = [p for p in (png, stream) if p.exists()]
    if existing and not force:
        raise OutputExistsError(f"{existing[0]} exists; pass --force to replace the example files")
    photo = load_image(sample_photo())
    data = pipeline.encode(load_model(model_source), photo, bpp=EXAMPLE_BPP)
    return [save_image_atomic(png, photo, force=force), write_atomic(stream, data, force=force)]
