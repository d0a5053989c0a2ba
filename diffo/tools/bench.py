"""`python -m diffo bench`: how fast DiffO encodes and decodes, and how much memory it needs. Medians after a
warm-up run; ratios are measured in the same run. JSON out.

    stages      encode / decode of a 768x512 photo with the embedded model, split by stage
    steps       the one-step decode vs the same networks run as a 50-step DDIM sampler (the papers' ~50x)
    coders      the entropy coders of format 2 (constriction) and format 1 (CompressAI rANS) on the same
                symbols of the 768x512 photo at several rate levels: bytes per sub-stream, encode and decode time
    compressai  our decode vs CompressAI's MeanScaleHyperprior (random weights) on the same image
    collection  a folder compressed by one `diffo compress DIR -o OUT` against a loop of single-file commands
                (images/s and peak memory, side by side; the outputs must be the same bytes); `--images DIR`
                (e.g. Kodak-24), else 8 crops of the sample photo
    scaling     encode and decode time per megapixel from 0.25 to 16 MP, and peak memory of each decode,
                each size in a fresh process (so peaks do not mix)
    sizes       the same for the awkward and huge sizes real images have (1x1, 1xN, 7x5, 4097x2049,
                8192x8192: `--shapes`): each must encode and decode to its own size in bounded memory
                (not in the default parts: 8192x8192 takes about half an hour on 2 CPU cores)
    sd          the paper-scale configuration (Stable Diffusion 2.1 size, random weights) at 512x768 in
                fp16 on a GPU, one-step decode time; skipped without a GPU unless asked for
    osdiff      the OSDiff family at SD 2.1-base size (bench_osdiff.py): encode/decode, 1 vs 50 steps, peak
                memory, a tiled 2048x2048 decode, CPU <-> GPU; skipped without a GPU unless asked for (--sd)
The parts marked by DIFFO_PARTS measure the DiffO family's stages and are skipped for other families' models.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch

from .. import child, pipeline
from ..hub import place
from ..models.diffo.denoiser import ControlOutput
from .demo import sample_photo
from ..image import load_image

BENCH_SIZE = (512, 768)  # H, W: Kodak's landscape size
SCALING_MP = (0.25, 1.0, 4.0, 16.0)
PARTS = ("stages", "steps", "coders", "compressai", "collection", "scaling", "sd", "sizes", "osdiff")
DIFFO_PARTS = ("stages", "steps", "coders")
COLLECTION_BPP = 0.05
CODER_RATES = (0.0, 0.25, 0.5, 1.0)
SHAPES = ((1, 1), (1, 300), (7, 5), (4097, 2049), (8192, 8192))  # W x H


def bench_image(h: int, w: int) -> torch.Tensor:
    """The sample photo resized to h x w (a real photo, reproducible, no data download)."""
    photo = load_image(sample_photo())
    return torch.nn.functional.interpolate(photo[None], size=(h, w), mode="bilinear", antialias=True,
                                           align_corners=False)[0].clamp(0, 1)


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ stages
@torch.no_grad()
def bench_stages(model, repeats: int) -> dict:
    h, w = BENCH_SIZE
    img = bench_image(h, w)
    data = pipeline.encode(model, img, bpp=0.1)
    bs, c_hat = pipeline.entropy_decode(model, data)
    enc = pipeline.analyse(model, img)
    codec = model.latent_codec
    latent = enc.latent

    def residual():
        res = codec.analyse_residual(latent, enc.indices, enc.latent_valid)
        return codec.compress_residual(latent, enc.indices, bs.rate_q, enc.latent_valid, res)

    x, _ = pipeline.pad_to_multiple(img[None], model.config.pad_multiple)
    out = {"image": f"{w}x{h}", "stream_bytes": len(data), "bpp": 8 * len(data) / (h * w), "encode_s": {},
           "decode_s": {}}
    with pipeline.reproducible():
        out["encode_s"]["vae_encoder"] = median_time(lambda: model.encode_latent(x), repeats)
        out["encode_s"]["entropy_coding_base"] = median_time(
            lambda: codec.compress_base(latent, enc.latent_valid), repeats)
        out["encode_s"]["entropy_coding_residual"] = median_time(residual, repeats)
        out["encode_s"]["total_at_level"] = median_time(lambda: pipeline.encode(model, img, rate=bs.rate), repeats)
        out["encode_s"]["total_bpp_search"] = median_time(lambda: pipeline.encode(model, img, bpp=0.1), repeats)
        ctrl = pipeline.control(model, c_hat, bs.strength, bs.seed)
        z0 = pipeline.denoise_latent(model, ctrl)
        out["decode_s"]["entropy_decoding"] = median_time(lambda: pipeline.entropy_decode(model, data), repeats)
        out["decode_s"]["control"] = median_time(lambda: pipeline.control(model, c_hat, bs.strength, bs.seed), repeats)
        out["decode_s"]["denoiser_unet"] = median_time(lambda: pipeline.denoise_latent(model, ctrl), repeats)
        # the fast decoder when the model has one, else the VAE's (key kept for comparison with earlier runs)
        out["decode_s"]["vae_decoder"] = median_time(lambda: pipeline.latent_to_image(model, z0, (h, w)), repeats)
        out["decode_s"]["total"] = median_time(lambda: pipeline.decode(model, data), repeats)
    out["decode_s"]["total_fast"] = median_time(lambda: pipeline.decode(model, data, fast=True), repeats)
    out["decode_mpix_per_s"] = h * w / 1e6 / out["decode_s"]["total"]
    return out


# ------------------------------------------------------------------------------------------------ steps
@torch.no_grad()
def multi_step_latent(model, c_hat: torch.Tensor, strength: float, seed: int, steps: int) -> torch.Tensor:
    """The same control module and UNet run as a `steps`-step DDIM sampler (eta = 0) from the stream's noise
    level down to 0, on the model's own noise schedule: what a multi-step diffusion decoder costs. With
    steps=1 it is `pipeline.latent_from_c_hat` (small images: one tile)."""
    den = model.denoiser
    a_bar = den.alphas_cumprod
    t_start = model.timestep_for_strength(strength)
    grid = torch.linspace(t_start, 0, steps + 1).round().long().tolist()
    c_hat = c_hat.to(model.device, model.dtype)
    noise = pipeline.decoder_noise(tuple(c_hat.shape[1:]), seed).to(c_hat)
    x = den.add_noise(c_hat, torch.tensor([t_start], device=c_hat.device), noise)
    for t, t_prev in zip(grid[:-1], grid[1:]):
        tt = torch.full((1,), t, dtype=torch.long, device=c_hat.device)
        down, mid = den.controlnet(x, tt, encoder_hidden_states=den._prompt(1), controlnet_cond=c_hat,
                                   return_dict=False)
        z0 = den.denoise(ControlOutput(x, tt, c_hat, tuple(down), mid))
        if t_prev == 0 or t == t_prev:
            x = z0 if t_prev == 0 else x
            continue
        a, a_prev = a_bar[t].to(x), a_bar[t_prev].to(x)
        eps = (x - a.sqrt() * z0) / (1 - a).sqrt()
        x = a_prev.sqrt() * z0 + (1 - a_prev).sqrt() * eps
    return x


def bench_steps(model, repeats: int, steps: int = 50) -> dict:
    h, w = BENCH_SIZE
    data = pipeline.encode(model, bench_image(h, w), bpp=0.1)
    bs, c_hat = pipeline.entropy_decode(model, data)
    with pipeline.reproducible():
        one = median_time(lambda: pipeline.latent_from_c_hat(model, c_hat, bs.strength, bs.seed), repeats)
        many = median_time(lambda: multi_step_latent(model, c_hat, bs.strength, bs.seed, steps), max(1, repeats // 2))
        z0 = pipeline.latent_from_c_hat(model, c_hat, bs.strength, bs.seed)
        vae = median_time(lambda: pipeline.latent_to_image(model, z0, (h, w)), repeats)
        entropy = median_time(lambda: pipeline.entropy_decode(model, data), repeats)
    rest = vae + entropy
    return {"image": f"{w}x{h}", "steps": steps, "one_step_denoise_s": one, f"{steps}_step_denoise_s": many,
            "denoise_speedup": many / one, "one_step_decode_s": one + rest, f"{steps}_step_decode_s": many + rest,
            "decode_speedup": (many + rest) / (one + rest)}


# ------------------------------------------------------------------------------------------------ coders
@torch.no_grad()
def bench_coders(model, repeats: int) -> dict:
    """Format 2's coder against format 1's on the same symbols: the cost of the format change."""
    from ..bitstream import quantize_unit
    from ..entropy import coder_for_format
    from ..errors import MissingExtraError

    try:
        coders = {v: coder_for_format(v) for v in (2, 1)}
    except MissingExtraError as e:
        return {"skipped": f"format 1's coder needs CompressAI: {e}"}
    h, w = BENCH_SIZE
    enc = pipeline.analyse(model, bench_image(h, w))
    lc, shape = model.latent_codec, pipeline.padded_latent_shape(model, h, w)
    rows = []
    for rate in CODER_RATES:
        q = quantize_unit(rate)
        row = {"rate": rate}
        for v, coder in coders.items():
            def encode(coder=coder):
                return pipeline.code_streams(model, enc, q, coder)

            streams = encode()
            row[f"format{v}"] = {
                "coder": coder.name, "stream_bytes": [len(s) for s in streams],
                "encode_s": median_time(encode, repeats),
                "decode_s": median_time(lambda: lc.decode_symbols([streams], shape, q, enc.latent_valid, coder),
                                        repeats)}
        a, b = row["format2"], row["format1"]
        row["bytes_2_minus_1"] = sum(a["stream_bytes"]) - sum(b["stream_bytes"])
        row["decode_2_over_1"] = a["decode_s"] / b["decode_s"]
        row["encode_2_over_1"] = a["encode_s"] / b["encode_s"]
        rows.append(row)
    return {"image": f"{w}x{h}", "note": "encode_s / decode_s: all entropy coding of the latent codec, including "
            "the exact networks that pick the CDFs (the same for both coders)", "rates": rows}


# ------------------------------------------------------------------------------------------------ compressai
@torch.no_grad()
def bench_compressai(model, repeats: int) -> dict:
    from ..errors import MissingExtraError
    from ..extras import require

    try:
        MeanScaleHyperprior = require("compressai.zoo.image", "The CompressAI baseline").MeanScaleHyperprior
    except MissingExtraError as e:
        return {"skipped": str(e)}

    h, w = BENCH_SIZE
    img = bench_image(h, w)
    torch.manual_seed(0)
    msh = MeanScaleHyperprior(N=128, M=192).eval()
    msh.update(force=True)
    x, _ = pipeline.pad_to_multiple(img[None], 64)
    enc = msh.compress(x)
    theirs = median_time(lambda: msh.decompress(enc["strings"], enc["shape"]), repeats)
    with pipeline.reproducible():  # CompressAI's decoder in the setting our default decode runs in
        theirs_exact = median_time(lambda: msh.decompress(enc["strings"], enc["shape"]), repeats)
    data = pipeline.encode(model, img, bpp=0.1)
    ours = median_time(lambda: pipeline.decode(model, data), repeats)
    ours_fast = median_time(lambda: pipeline.decode(model, data, fast=True), repeats)
    return {"image": f"{w}x{h}", "compressai_msh_decode_s": theirs, "compressai_msh_decode_onednn_off_s": theirs_exact,
            "diffo_decode_s": ours, "diffo_decode_fast_s": ours_fast, "diffo_vs_msh": ours / theirs,
            "diffo_fast_vs_msh": ours_fast / theirs, "diffo_vs_msh_both_onednn_off": ours / theirs_exact,
            "note": "MeanScaleHyperprior N=128, M=192, random weights, as CompressAI runs by default (oneDNN on); "
                    "diffo_decode_s is our default (reproducible: oneDNN off), diffo_decode_fast_s keeps oneDNN"}


# ------------------------------------------------------------------------------------------------ collection
def _timed_commands(commands: list[list[str]]) -> dict:
    """Run CLI commands one after another in a fresh interpreter: wall seconds and the largest child's peak RSS."""
    # ru_maxrss: KiB on Linux, bytes on macOS; no `resource` module on Windows (then no memory figure)
    code = ("import json, subprocess, sys, time; t0 = time.perf_counter(); "
            f"rcs = [subprocess.run([sys.executable, '-m', 'diffo', *c], capture_output=True).returncode "
            f"for c in {commands!r}]; seconds = time.perf_counter() - t0\n"
            "try:\n import resource; peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
            " peak = peak / 2**20 if sys.platform == 'darwin' else peak / 1024\n"
            "except ImportError:\n peak = None\n"
            "print(json.dumps({'seconds': seconds, 'returncodes': sorted(set(rcs)), 'peak_rss_mib': peak}))")
    return child.run_json(code)


def bench_collection(model_source: str | None, images_dir: str | None) -> dict:
    """One folder command against a loop of single-file commands on the same images, in fresh processes."""
    import tempfile
    from pathlib import Path

    from ..collection import IMAGE_SUFFIXES
    from ..fileio import save_image_atomic

    model = ["--model", model_source] if model_source else []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if images_dir is None:
            src = tmp / "photos"
            h, w = BENCH_SIZE
            photo = bench_image(h * 2, w * 2)
            for i in range(8):  # 8 different 768x512 crops of the sample photo at twice the size
                top, left = (i // 4) * (h // 2), (i % 4) * (w // 4)
                save_image_atomic(src / f"crop{i}.png", photo[:, top:top + h, left:left + w])
        else:
            src = Path(images_dir)
        files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            return {"skipped": f"no images directly in {src}"}
        loop = _timed_commands([[ "compress", str(f), "-o", str(tmp / "loop" / f"{f.stem}.diffo"), "--bpp",
                                  str(COLLECTION_BPP), *model] for f in files])
        folder = _timed_commands([["compress", str(src), "-o", str(tmp / "folder"), "--bpp", str(COLLECTION_BPP),
                                   *model]])
        outputs = [(tmp / "loop" / f"{f.stem}.diffo", tmp / "folder" / f"{f.stem}.diffo") for f in files]
        same = all(a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes() for a, b in outputs)
    n = len(files)
    return {"images": n, "source": images_dir or "8 crops (768x512) of the sample photo", "bpp": COLLECTION_BPP,
            "loop_of_single_commands": {**loop, "images_per_s": n / loop["seconds"]} if "error" not in loop else loop,
            "folder_command": {**folder, "images_per_s": n / folder["seconds"]} if "error" not in folder else folder,
            "speedup": loop.get("seconds", math.nan) / folder.get("seconds", math.nan),
            "same_bytes": same}


# ------------------------------------------------------------------------------------------------ scaling
def _mp_shape(mp: float) -> tuple[int, int]:
    """(W, H) of a 3:2 landscape of `mp` megapixels, multiples of 8; 16 MP is 4096x4096."""
    if mp >= 16:
        return 4096, 4096
    side_w = int(round((mp * 1e6 * 1.5) ** 0.5 / 8)) * 8
    return side_w, int(round(mp * 1e6 / side_w / 8)) * 8


def _scaling_child(side_w: int, side_h: int, model_source: str | None) -> dict:
    """Runs in a fresh process: encode then decode one side_w x side_h image; peak RSS after each."""
    import resource

    from ..hub import load_model

    img = bench_image(side_h, side_w)
    model = load_model(model_source)
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731  (MiB, Linux)
    t0 = time.perf_counter()
    data = pipeline.encode(model, img, rate=0.5)
    t_enc = time.perf_counter() - t0
    peak_enc = rss()
    del img
    t0 = time.perf_counter()
    rec = pipeline.decode(model, data)
    t_dec = time.perf_counter() - t0
    megapixels = side_h * side_w / 1e6
    return {"size": f"{side_w}x{side_h}", "megapixels": megapixels, "bytes": len(data), "encode_s": t_enc,
            "decode_s": t_dec, "encode_s_per_mp": t_enc / megapixels, "decode_s_per_mp": t_dec / megapixels,
            "peak_rss_mib_after_encode": peak_enc, "peak_rss_mib": rss(), "decoded": list(rec.shape),
            "same_size": list(rec.shape) == [3, side_h, side_w]}


def bench_scaling(shapes, model_source: str | None, label: str = "scaling") -> list[dict]:
    """Encode + decode each (W, H) in a fresh process (peak memory per size, nothing shared)."""
    rows = []
    for w, h in shapes:
        row = child.run_json(f"import json; from diffo.tools.bench import _scaling_child; "
                             f"print(json.dumps(_scaling_child({w}, {h}, {model_source!r})))")
        rows.append({"size": f"{w}x{h}", **row} if "error" in row else row)
        print(f"  {label} {w}x{h}: {rows[-1]}", file=sys.stderr)
    return rows


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"1x1,4097x2049" → [(1, 1), (4097, 2049)] (W x H)."""
    shapes = []
    for token in filter(None, (t.strip() for t in text.split(","))):
        try:
            w, h = (int(v) for v in token.lower().split("x"))
        except ValueError:
            raise ValueError(f"--shapes: {token!r} is not WIDTHxHEIGHT") from None
        if w < 1 or h < 1:
            raise ValueError(f"--shapes: {token!r} must be at least 1x1")
        shapes.append((w, h))
    return shapes


# ------------------------------------------------------------------------------------------------ sd scale
@torch.no_grad()
def bench_sd(repeats: int, force: bool) -> dict:
    from ..models.diffo.codec import DiffoCodec

    if not torch.cuda.is_available() and not force:
        return {"skipped": "no GPU (run with --sd to time it on this device anyway)"}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    from ..errors import MissingExtraError

    torch.manual_seed(0)
    model = DiffoCodec.sd21_sized().eval().requires_grad_(False)
    try:
        model.update()  # a random model's entropy tables: CompressAI builds them
    except MissingExtraError as e:
        return {"skipped": str(e)}
    place(model, device, dtype)
    h, w = BENCH_SIZE
    data = pipeline.encode(model, bench_image(h, w), rate=0.5)

    def decode():
        pipeline.decode(model, data, fast=True)
        _sync(device)

    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "dtype": str(dtype).replace("torch.", ""), "image": f"{w}x{h}", "decode_s": median_time(decode, repeats),
           "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}
    if device.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _bench_osdiff(repeats: int, force: bool) -> dict:
    from .bench_osdiff import bench_osdiff

    return bench_osdiff(repeats, force)


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "cuda": torch.cuda.is_available()}


def run(parts: list[str], repeats: int, sizes_mp, model_source: str | None, force_sd: bool,
        shapes=SHAPES, images: str | None = None) -> dict:
    from ..hub import load_model

    model = load_model(model_source)
    result = {"model": model.config.name, "fingerprint": model.fingerprint.hex(), "environment": environment()}
    steps = {"stages": lambda: bench_stages(model, repeats), "steps": lambda: bench_steps(model, repeats),
             "coders": lambda: bench_coders(model, repeats), "compressai": lambda: bench_compressai(model, repeats),
             "collection": lambda: bench_collection(model_source, images),
             "scaling": lambda: bench_scaling([_mp_shape(mp) for mp in sizes_mp], model_source),
             "sizes": lambda: bench_scaling(shapes, model_source, "sizes"), "sd": lambda: bench_sd(repeats, force_sd),
             "osdiff": lambda: _bench_osdiff(repeats, force_sd)}
    for part in parts:
        print(f"bench: {part} …", file=sys.stderr)
        if part in DIFFO_PARTS and model.family != "diffo":
            result[part] = {"skipped": f"a DiffO-family part; {model.config.name} is a {model.family} model"}
            continue
        result[part] = steps[part]()
    return result
