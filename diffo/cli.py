"""`python -m diffo` / `diffo`: compress, decompress, info, demo, examples, eval, bench, fuzz, matrix, train, convert.

Errors on bad input (missing file, not an image, damaged or foreign stream, wrong model, existing output)
print one line `diffo: error: …` and exit with status 2; no traceback. Outputs are written atomically and
never replace an existing file unless --force is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from .errors import DiffoError

EXIT_ERROR = 2


def _model(args):
    from .hub import load_model

    return load_model(getattr(args, "model", None))


EXIT_SOME_FAILED = 1  # a collection finished, but some files failed (each is named in the summary)


def _check_rate_given(args) -> None:
    """One of --rate/--bpp/--max-bytes, unless the model has a single rate (OSDiff checkpoints): read from the
    model folder's config.json, before anything heavy is imported."""
    if args.rate is not None or args.bpp is not None or args.max_bytes is not None:
        return
    from .hub import resolve_model_dir  # light: no torch yet

    try:
        config = json.loads((resolve_model_dir(getattr(args, "model", None)) / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        config = {}  # loading the model will say what is wrong with it
    if isinstance(config, dict) and config.get("_class_name") == "OSDiffCodec":
        args.rate = 0.0  # chooses nothing: each checkpoint has one rate
        return
    raise DiffoError("give one of --rate, --bpp or --max-bytes (this model has rate levels)")


def cmd_compress(args) -> int:
    from .collection import is_batch

    _check_rate_given(args)
    if is_batch(args.input, args.output):
        return _collection(args, "compress")
    src = Path(args.input[0])
    out = Path(args.output) if args.output else src.with_suffix(".diffo")
    if out.exists() and not args.force:  # fail before the (slow) imports and encode
        raise DiffoError(f"{out} exists; pass --force to overwrite it")
    if not src.exists():
        raise FileNotFoundError(f"image not found: {src}")
    from .collection import check_image

    problem = check_image(src)  # from the header alone, before torch is even imported
    if problem:
        raise DiffoError(f"{src}: {problem}")
    from . import pipeline
    from .bitstream import bits_per_pixel
    from .fileio import write_atomic
    from .image import load_image

    image = load_image(src, drop_alpha=args.drop_alpha)  # a bad image fails before the model loads
    data = pipeline.encode(_model(args), image, rate=args.rate, bpp=args.bpp, max_bytes=args.max_bytes,
                           seed=args.seed, strength=args.strength)
    write_atomic(out, data, force=args.force)
    bs = pipeline.read_header(data)
    print(f"{out}: {len(data)} bytes, {bits_per_pixel(len(data), bs.width, bs.height):.4f} bpp, "
          f"{bs.width}x{bs.height}, rate level {bs.rate:.4f}")
    return 0


def cmd_decompress(args) -> int:
    from .bitstream import Bitstream
    from .collection import is_batch

    if is_batch(args.input, args.output):
        return _collection(args, "decompress")
    src = Path(args.input[0])
    # Not INPUT.png: in a round trip that is the original photo, which must never be the default target.
    out = Path(args.output) if args.output else src.with_name(f"{src.stem}_diffo.png")
    if out.exists() and not args.force:
        raise DiffoError(f"{out} exists; pass --force to overwrite it")
    data = _read_stream(src)
    Bitstream.from_bytes(data)  # a damaged file fails before torch is imported and the model loads
    from . import pipeline
    from .fileio import save_image_atomic

    img = pipeline.decode(_model(args), data, strength=args.strength, seed=args.seed, fast=args.fast,
                          max_pixels=args.max_pixels)
    save_image_atomic(out, img, force=args.force)
    print(f"{out}: {img.shape[2]}x{img.shape[1]} PNG")
    return 0


def _collection(args, kind: str) -> int:
    """Folders, globs or several files: the collection path (diffo/collection.py)."""
    from . import collection

    if not args.output:
        raise DiffoError(f"{kind} of several files or a folder needs -o OUTPUT_FOLDER")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise DiffoError(f"{out} is a file; -o must be a folder when {kind}ing a collection")
    for item in args.input:  # restored PNGs must never land on (and be taken for) the user's originals
        if Path(item).is_dir() and Path(item).resolve() in (out.resolve(), *out.resolve().parents):
            raise DiffoError(f"-o {out} is inside the input folder {item}: write the {kind}ed tree elsewhere")
    rank, world = collection.parse_shard(args.shard)
    suffixes, suffix = ((collection.IMAGE_SUFFIXES, ".diffo") if kind == "compress"
                        else (collection.STREAM_SUFFIXES, ".png"))
    found, missing = collection.gather(args.input, suffixes)
    if not found and not missing:
        raise DiffoError(f"no {'images' if kind == 'compress' else '.diffo files'} in {', '.join(args.input)}")
    # missing inputs are reported once, by shard 0; a shard may get no file at all (more workers than files)
    jobs = (missing if rank == 0 else []) + collection.shard(collection.plan(found, out, suffix), rank, world)
    device = args.device
    shard_note = f" (shard {rank}/{world})" if world > 1 else ""
    print(f"diffo: {kind} {len(jobs)} files into {out}{shard_note}", file=sys.stderr)
    if kind == "compress":
        summary = collection.compress(jobs, args.model, out, shard_of=(rank, world), device=device,
                                      drop_alpha=args.drop_alpha, redo=args.force,
                                      encode_kwargs=dict(rate=args.rate, bpp=args.bpp, max_bytes=args.max_bytes,
                                                         seed=args.seed, strength=args.strength))
    else:
        summary = collection.decompress(jobs, args.model, out, shard_of=(rank, world), device=device, redo=args.force,
                                        decode_kwargs=dict(strength=args.strength, seed=args.seed, fast=args.fast,
                                                           max_pixels=args.max_pixels))
    print(summary.text())
    print(f"manifest: {collection.manifest_path(out, rank, world)}")
    return EXIT_SOME_FAILED if summary.failed else 0


def _read_stream(src: Path) -> bytes:
    if not src.is_file():
        raise FileNotFoundError(f"file not found: {src}")
    return src.read_bytes()


def cmd_info(args) -> int:
    from .bitstream import Bitstream

    head = Bitstream.from_bytes(_read_stream(Path(args.input))).header_dict()
    if args.model:
        head["made_by_this_model"] = head["fingerprint"] == _model(args).fingerprint.hex()
    if args.json:
        print(json.dumps(head, indent=1))
    else:
        for k, v in head.items():
            print(f"{k:>18}: {v}")
    return 0


def cmd_demo(args) -> int:
    from .tools.demo import run_demo

    run_demo(image=args.image, out_dir=Path(args.out), model_source=args.model,
             rates=[float(r) for r in args.rates.split(",")], force=args.force)
    return 0


def cmd_examples(args) -> int:
    from .tools.demo import write_examples

    for path in write_examples(Path(args.dir), args.model, args.force):
        print(path)
    return 0


def cmd_strength(args) -> int:
    from .fileio import save_image_atomic, write_atomic
    from .tools.figures import strength_plot
    from .hub import load_model
    from .image import load_image
    from .tools.sweep import parse_floats, strength_sweep

    out = Path(args.out)
    targets = [out / "strength_sweep.json", out / "strength_sweep.png"]
    if not args.force and any(p.exists() for p in targets):
        raise DiffoError(f"{out} already holds a strength sweep; pass --force to replace it")
    strengths = parse_floats(args.strengths, "--strengths")
    if any(not 0 <= s <= 1 for s in strengths):
        raise DiffoError("--strengths: every strength must be in [0, 1]")
    if args.image is None:
        from .tools.demo import sample_photo

        args.image = str(sample_photo())
    image = load_image(Path(args.image))
    rows = strength_sweep(load_model(args.model), image, strengths, bpp=args.bpp, seed=args.seed)
    write_atomic(targets[0], (json.dumps(rows, indent=1) + "\n").encode(), force=True)
    title = f"{Path(args.image).name}, {rows[0]['bpp']:.4f} bpp: one stream, decoded at each strength"
    save_image_atomic(targets[1], strength_plot(rows, title), force=True)
    for r in rows:
        name = "no denoise" if r["strength"] is None else f"{r['strength']:.2f}" + (" (default)" if r.get("default") else "")
        print(f"{name:>16}  PSNR {r['psnr']:.2f} dB  NIQE {r['niqe']:.2f}")
    print(f"wrote {targets[0]} and {targets[1]}")
    return 0


def cmd_eval(args) -> int:
    from .tools import evaluation
    from .tools.sweep import parse_floats

    out = Path(args.out)
    if out.exists() and not any((out / d).is_dir() for d in ("points", "images", "panels")) and any(out.iterdir()):
        raise DiffoError(f"{out} holds other files; give an empty or new folder (a folder from an earlier "
                         "eval is resumed)")
    from .collection import parse_shard, shard

    rank, world = parse_shard(args.shard)
    images = evaluation.list_images(Path(args.images))[: args.limit or None]
    ev = evaluation.Evaluation(images=shard(images, rank, world), bpps=parse_floats(args.bpp, "--bpp"),
                               codecs=evaluation.parse_codecs(args.codecs), out=out, model_source=args.model,
                               save_images=args.save_images)
    if world > 1:  # a worker of a large evaluation: its points go to the shared cache, the summary comes later
        evaluation.run(ev, write=False)
        print(f"shard {rank}/{world}: {len(ev.images)} images evaluated into {out}/points; run eval again without "
              "--shard (and without torchrun) to write the summary from the cached points")
        return 0
    evaluation.run(ev)
    print((out / "summary.md").read_text())
    print(f"wrote {out}/results.csv, summary.md and rd_*.png")
    return 0


def _refuse_existing_out(args) -> None:
    """Fail before the (long) work when --out would replace a file without --force."""
    if args.out and Path(args.out).exists() and not args.force:
        raise DiffoError(f"{args.out} exists; pass --force to overwrite it")


def _report_json(args, report: dict) -> None:
    """Print a JSON report and, with --out, write it atomically."""
    from .fileio import write_atomic

    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        write_atomic(Path(args.out), (text + "\n").encode(), force=args.force)


def cmd_bench(args) -> int:
    from .tools import bench
    from .tools.sweep import parse_floats

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(bench.PARTS)
    if unknown:
        raise ValueError(f"unknown bench part(s) {sorted(unknown)}; known: {', '.join(bench.PARTS)}")
    _refuse_existing_out(args)
    _report_json(args, bench.run(parts, args.repeats, parse_floats(args.sizes, "--sizes"), args.model, args.sd,
                                 bench.parse_shapes(args.shapes) if args.shapes else bench.SHAPES, args.images))
    return 0


def cmd_fuzz(args) -> int:
    from tqdm import tqdm

    from .tools import fuzz

    _refuse_existing_out(args)
    with tqdm(total=args.n, desc="fuzz", unit="case") as bar:
        report = fuzz.run(_model(args), args.n, seed=args.seed, progress=bar.update,
                          max_pixels=args.max_pixels or fuzz.DEFAULT_MAX_PIXELS)
    _report_json(args, report)
    return 1 if report["crashes"] else 0


def cmd_matrix(args) -> int:
    from .tools import matrix

    _refuse_existing_out(args)
    devices = args.devices.split(",") if args.devices else None
    report = matrix.run(args.model, devices)
    _report_json(args, report)
    ok = report["determinism"]["identical"] and all(r["ok"] for r in report["images"])
    return 0 if ok and report["devices"].get("identical_symbols", True) else 1


def cmd_convert(args) -> int:
    """Published checkpoints → a model folder (written to a temporary folder beside --out, then renamed)."""
    import shutil
    import tempfile

    out = Path(args.out)
    if out.exists() and not args.force:  # before the slow loading
        raise DiffoError(f"{out} exists; pass --force to replace it")
    for what, path in (("checkpoint", args.checkpoint), ("base", args.base)):
        if not Path(path).exists():
            raise DiffoError(f"--{what} {path} does not exist")
    from .models.osdiff.convert import convert_osdiff

    if out.exists() and not out.is_dir():
        raise DiffoError(f"{out} is a file; --out names the model folder to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    old = out.parent / f".{out.name}.replaced"
    try:
        model = convert_osdiff(args.checkpoint, args.base, tmp, name=args.name)
        if out.exists():  # --force: the old folder is set aside until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)  # the conversion failed after setting the old folder aside: put it back
    print(f"{out}: {model.config.name}, fingerprint {model.fingerprint.hex()}; use it with --model {out}")
    return 0


def cmd_train(args) -> int:
    from .training.train import TrainConfig, train

    out = Path(args.out)
    if (out / "checkpoint" / "progress.json").is_file() and not args.resume:
        raise DiffoError(f"{out} holds a training checkpoint: pass --resume to continue it, or choose another --out")
    cfg = TrainConfig(config=args.config, sd_path=args.sd, init=args.init, mixed_precision=args.mixed_precision,
                      data=args.data, out=str(out),
                      stages=args.stages.split(",") if args.stages else None, noise_criterion=args.noise_criterion,
                      lambda_max=args.lambda_max, realism_adv_weight=args.realism_adv_weight,
                      realism_l1_weight=args.realism_l1_weight, realism_fm_weight=args.realism_fm_weight,
                      realism_real=args.realism_real, realism_mse_weight=args.realism_mse_weight,
                      realism_adv_adaptive=args.realism_adv_adaptive, realism_train_decoder=args.realism_train_decoder,
                      realism_energy_weight=args.realism_energy_weight,
                      realism_adv_schedule=args.realism_adv_schedule, decoder_adv_weight=args.decoder_adv_weight,
                      decoder_fm_weight=args.decoder_fm_weight,
                      latent_channels=args.latent_channels, adv_weight=args.denoiser_adv_weight,
                      disc_backbone=args.denoiser_disc_backbone,
                      minutes={"vae": args.minutes_vae, "decoder": args.minutes_decoder, "codec": args.minutes_codec,
                               "denoiser": args.minutes_denoiser, "realism": args.minutes_realism},
                      steps={k: args.steps for k in ("vae", "decoder", "codec", "denoiser", "realism")})
    folder = train(cfg)
    print(f"model saved to {folder}")
    return 0


def _collection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard", default=None, metavar="RANK/WORLD",
                   help="collections: take every WORLD-th file from RANK (default: RANK / WORLD_SIZE from torchrun "
                        "or accelerate launch, else all)")
    p.add_argument("--device", default="auto", help="collections: cpu, cuda, cuda:N, or auto (the GPU of "
                   "LOCAL_RANK when there is one)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffo", description="DiffO: ultra-low-bitrate image compression, "
                                "decoded by one diffusion step.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress and details")
    sub = p.add_subparsers(dest="command", required=True)
    model_help = "model: a local folder, a Hugging Face Hub repo id, or 'default' (the embedded diffo-tiny)"

    batch_help = ("folders, several files or a quoted glob make it a collection: -o is then a folder that mirrors "
                  "the input tree; done files are skipped, bad ones reported, a manifest written (exit 1 if any "
                  "failed)")
    c = sub.add_parser("compress", help="image -> .diffo (or a folder of images -> a folder of .diffo)")
    c.add_argument("input", nargs="+", help="an image; or " + batch_help)
    c.add_argument("-o", "--output", help="output .diffo (default: INPUT with .diffo suffix), or the output folder")
    c.add_argument("--model", default=None, help=model_help)
    g = c.add_mutually_exclusive_group()  # one is required for models with rate levels (checked before loading)
    g.add_argument("--rate", type=float, help="rate level in [0, 1] (0 = structural base code only)")
    g.add_argument("--bpp", type=float, help="target bits per pixel (file size, header included)")
    g.add_argument("--max-bytes", type=int, help="largest file size allowed, in bytes")
    c.add_argument("--seed", type=int, default=0, help="seed of the decoder noise stored in the stream")
    c.add_argument("--strength", type=float, default=None, help="override the rate->noise map (0..1)")
    c.add_argument("--drop-alpha", action="store_true", help="composite transparent images onto white")
    c.add_argument("--force", action="store_true", help="overwrite an existing output (collections: redo every file)")
    _collection_args(c)
    c.set_defaults(func=cmd_compress)

    d = sub.add_parser("decompress", help=".diffo -> PNG (or a folder of .diffo -> a folder of PNG)")
    d.add_argument("input", nargs="+", help="a .diffo file; or " + batch_help)
    d.add_argument("-o", "--output", help="output image (default: NAME_diffo.png beside NAME.diffo), or the "
                   "output folder")
    d.add_argument("--model", default=None, help=model_help)
    d.add_argument("--strength", type=float, default=None, help="override the stream's noise strength (0..1)")
    d.add_argument("--seed", type=int, default=None, help="override the stream's noise seed")
    d.add_argument("--fast", action="store_true", help="use oneDNN: faster on CPU, but pixels may then differ "
                   "in the last bit between thread counts")
    d.add_argument("--max-pixels", type=int, default=None, help="refuse streams that claim a larger image "
                   "(a budget for decoding untrusted files: time and memory grow with the claimed size)")
    d.add_argument("--force", action="store_true", help="overwrite an existing output (collections: redo every file)")
    _collection_args(d)
    d.set_defaults(func=cmd_decompress)

    i = sub.add_parser("info", help="print a .diffo header")
    i.add_argument("input")
    i.add_argument("--json", action="store_true", help="JSON output")
    i.add_argument("--model", default=None, help="also say whether this model made the stream")
    i.set_defaults(func=cmd_info)

    m = sub.add_parser("demo", help="round trip of a sample photo at several rates")
    m.add_argument("--image", default=None, help="photo to use (default: a sample photo that matplotlib ships)")
    m.add_argument("--out", default="diffo-demo", help="output folder (default: ./diffo-demo)")
    m.add_argument("--model", default=None, help=model_help)
    m.add_argument("--rates", default="0,0.25,0.5,1", help="comma-separated rate levels")
    m.add_argument("--force", action="store_true", help="overwrite existing outputs")
    m.set_defaults(func=cmd_demo)

    e = sub.add_parser("examples", help="write the input files the example ComfyUI workflows use")
    e.add_argument("dir", help="folder to write into, e.g. ComfyUI/input")
    e.add_argument("--model", default=None, help=model_help)
    e.add_argument("--force", action="store_true", help="replace existing example files")
    e.set_defaults(func=cmd_examples)

    s = sub.add_parser("strength", help="one stream decoded at several noise strengths: PSNR and NIQE plot")
    s.add_argument("--image", default=None, help="the photo to compress (default: the demo's sample photo)")
    s.add_argument("--bpp", type=float, default=0.05, help="target bits per pixel of the one stream")
    s.add_argument("--strengths", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", help="strengths to decode at")
    s.add_argument("--seed", type=int, default=0, help="decoder noise seed")
    s.add_argument("--out", required=True, help="folder for strength_sweep.json and .png")
    s.add_argument("--model", default=None, help=model_help)
    s.add_argument("--force", action="store_true", help="replace an earlier sweep in --out")
    s.set_defaults(func=cmd_strength)

    v = sub.add_parser("eval", help="rate-distortion against classical codecs on a folder of images (resumable)")
    v.add_argument("--images", required=True, help="folder of images, e.g. ../shared/data/kodak")
    v.add_argument("--bpp", default="0.02,0.05,0.1,0.15", help="comma-separated target bits per pixel")
    v.add_argument("--codecs", default=None, help="comma-separated, from: diffo, diffo-nodenoise, jpeg, webp, "
                   "avif, jpeg2000, jxl, x265, vvc (default: all available)")
    v.add_argument("--out", required=True, help="output folder (results.csv, summary.md, rd_*.png, points/ cache)")
    v.add_argument("--model", default=None, help=model_help)
    v.add_argument("--limit", type=int, default=0, help="only the first N images (quick runs)")
    v.add_argument("--save-images", action="store_true", help="also save every reconstruction as PNG")
    v.add_argument("--shard", default=None, metavar="RANK/WORLD",
                   help="evaluate every WORLD-th image from RANK into the shared cache (default: RANK / WORLD_SIZE "
                        "from torchrun or accelerate launch); a final run without it writes the summary")
    v.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="speed and memory: stages, 1 vs 50 steps, CompressAI, MP scaling, SD size")
    b.add_argument("--out", default=None, help="also write the JSON to this file")
    b.add_argument("--parts", default="stages,steps,coders,compressai,collection,scaling,sd,osdiff",
                   help="which measurements (also: sizes, the odd and huge image sizes of --shapes)")
    b.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median; after one warm-up)")
    b.add_argument("--sizes", default="0.25,1,4,16", help="megapixels for the scaling part (16 = 4096x4096)")
    b.add_argument("--model", default=None, help=model_help)
    b.add_argument("--images", default=None, help="folder of images for the collection part (e.g. Kodak-24)")
    b.add_argument("--shapes", default=None,
                   help="WIDTHxHEIGHT list for the sizes part (default: from 1x1 up to 8192x8192)")
    b.add_argument("--sd", action="store_true", help="time the SD 2.1-size configuration even without a GPU")
    b.add_argument("--force", action="store_true", help="overwrite --out")
    b.set_defaults(func=cmd_bench)

    f = sub.add_parser("fuzz", help="decode N mutated, truncated, spliced and forged streams; count crashes")
    f.add_argument("--n", type=int, default=10000, help="number of cases")
    f.add_argument("--seed", type=int, default=0, help="random seed of the mutations (a run is reproducible)")
    f.add_argument("--max-pixels", type=int, default=None, help="decoder pixel budget for forged sizes "
                   "(default 128x128: decoding time grows with the size a header claims)")
    f.add_argument("--model", default=None, help=model_help)
    f.add_argument("--out", default=None, help="also write the JSON report to this file")
    f.add_argument("--force", action="store_true", help="overwrite --out")
    f.set_defaults(func=cmd_fuzz)

    m = sub.add_parser("matrix",
                       help="reliability matrices: every image kind; decoding across threads, batches and devices")
    m.add_argument("--model", default=None, help=model_help)
    m.add_argument("--devices", default=None,
                   help="comma-separated torch devices to encode and decode on, each against the others "
                        "(default: cpu,cuda when CUDA is available, else this part is skipped)")
    m.add_argument("--out", default=None, help="also write the JSON report to this file")
    m.add_argument("--force", action="store_true", help="overwrite --out")
    m.set_defaults(func=cmd_matrix)

    cv = sub.add_parser("convert", help="convert published checkpoints into a model folder (Hub layout)")
    cvs = cv.add_subparsers(dest="family", required=True, metavar="FAMILY")
    o = cvs.add_parser("osdiff", help="OSDiff: the authors' lambda_*.ckpt + your SD 2.1-base file")
    o.add_argument("--checkpoint", required=True, help="the OSDiff checkpoint you downloaded (lambda_1.ckpt)")
    o.add_argument("--base", required=True,
                   help="SD 2.1-base: v2-1_512-ema-pruned .safetensors/.ckpt (ComfyUI's models/checkpoints) "
                        "or a diffusers folder")
    o.add_argument("--out", required=True, help="the model folder to write (then: --model OUT)")
    o.add_argument("--name", default=None, help="model name (default: osdiff-<checkpoint name>)")
    o.add_argument("--force", action="store_true", help="replace --out")
    o.set_defaults(func=cmd_convert)

    t = sub.add_parser("train", help="train a model (resumable)")
    t.add_argument("--config", choices=["tiny", "sd"], default="tiny")
    t.add_argument("--sd", default=None, help="for --config sd: diffusers SD 2.1 / SD-Turbo folder or repo id")
    t.add_argument("--init", default=None, help="start from this saved model folder (continued training)")
    t.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                   help="autocast for the VAE and denoiser stages (bf16: faster on CPUs and GPUs with bf16)")
    t.add_argument("--data", nargs="+", required=True, help="folders of training photos (never Kodak)")
    t.add_argument("--out", required=True, help="run folder (checkpoints, logs, final model)")
    t.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    t.add_argument("--steps", type=int, default=100000, help="max steps per stage")
    t.add_argument("--minutes-vae", type=float, default=18)
    t.add_argument("--minutes-codec", type=float, default=10)
    t.add_argument("--minutes-denoiser", type=float, default=14)
    t.add_argument("--minutes-decoder", type=float, default=20)
    t.add_argument("--minutes-realism", type=float, default=40)
    t.add_argument("--lambda-max", type=float, default=4.0,
                   help="codec stage: distortion weight at the top rate level (higher: the top level spends more bits)")
    t.add_argument("--realism-adv-weight", type=float, default=0.1,
                   help="realism stage: weight of the pixel patch discriminator's loss (at the top strength when "
                        "--realism-adv-schedule strength)")
    t.add_argument("--realism-adv-schedule", choices=["flat", "strength"], default="flat",
                   help="realism stage: the adversarial weight flat, or scaled by strength / 0.6 so that the "
                        "decode-time strength trades fidelity for realism")
    t.add_argument("--realism-l1-weight", type=float, default=1.0,
                   help="realism stage: weight of the decoded crops' L1 (lower: less pull to the blurry mean)")
    t.add_argument("--realism-fm-weight", type=float, default=0.0,
                   help="realism stage: weight of feature matching, the L1 between the patch discriminator's "
                        "activations on the decoded and the real crops (on the adversarial weight's schedule)")
    t.add_argument("--realism-energy-weight", type=float, default=0.0,
                   help="realism stage: weight of the energy score of two decodes of the step from independent "
                        "starting noises against the real crops, over 8x8 pixel patches (a proper scoring rule: "
                        "lowest when the step draws the photos' variety given the code, not their mean; no "
                        "discriminator)")
    t.add_argument("--realism-mse-weight", type=float, default=1.0,
                   help="realism stage: weight of the step's latent MSE against the true latent (lower: less pull "
                        "to the conditional mean)")
    t.add_argument("--realism-adv-adaptive", action="store_true",
                   help="realism stage: scale the adversarial weight by VQGAN's adaptive weight (its gradient at the "
                        "step's output, or at the fast decoder's last layer with --realism-train-decoder, matched "
                        "to the reconstruction terms'), as --decoder-adv-weight does")
    t.add_argument("--realism-train-decoder", action="store_true",
                   help="realism stage: train the fast decoder with the step (needs --realism-real photo and the flat "
                        "schedule); its decode of the true latent keeps the decoder stage's L1 + MSE and is judged too")
    t.add_argument("--realism-real", choices=["decoded", "photo"], default="decoded",
                   help="realism stage: the discriminator's real crops are the decoded true latents, or the photos "
                        "themselves (encoded on the fly; judged against real texture)")
    t.add_argument("--decoder-adv-weight", type=float, default=0.0,
                   help="decoder stage: weight of a pixel patch discriminator (adaptive, VQGAN-style) beside L1 + MSE, "
                        "so that the fast decoder renders texture (0: L1 + MSE only)")
    t.add_argument("--decoder-fm-weight", type=float, default=0.0,
                   help="decoder stage, with --decoder-adv-weight: weight of feature matching, the L1 between the "
                        "patch discriminator's activations on the decoded and the real crops (a perceptual loss "
                        "learned on the photos)")
    t.add_argument("--denoiser-adv-weight", type=float, default=0.01,
                   help="denoiser stage: weight of the discriminator on the UNet's features (OSDiff's), from 40%% "
                        "of the stage on (higher: more realism, less fidelity)")
    t.add_argument("--denoiser-disc-backbone", choices=["frozen", "trained"], default="frozen",
                   help="denoiser stage: the discriminator's copy of the UNet frozen (OSDiff's, for a pretrained "
                        "UNet) or trained with its heads (a tiny UNet's frozen features barely tell real from fake)")
    t.add_argument("--latent-channels", type=int, default=None,
                   help="tiny: a latent space of this many channels; more than --init's widens that model (it "
                        "starts out computing what the old one did) and every stage trains again (default: the "
                        "model's own, or 4)")
    t.add_argument("--noise-criterion", choices=["haarpsi", "strongest"], default="haarpsi",
                   help="noise map: best held-out HaarPSI per rate, or the strongest noise within 0.3 dB of the "
                        "no-denoise PSNR (for a model trained with the realism stage)")
    t.add_argument("--stages", default=None, help="comma-separated stages to run (default: all): vae, latents, "
                   "decoder, codec, denoiser, realism, noise, final; skipping the first ones needs --init")
    t.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="diffo: %(message)s")

    def show_warning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and not issubclass(category, FutureWarning):
            print(f"diffo: warning: {message}", file=sys.stderr)

    warnings.showwarning = show_warning
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return args.func(args)
    except (DiffoError, FileNotFoundError, IsADirectoryError, PermissionError, ValueError) as e:
        print(f"diffo: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("diffo: interrupted", file=sys.stderr)
        return 130
