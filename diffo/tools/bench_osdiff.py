"""`diffo bench --parts osdiff`: the OSDiff family at SD 2.1-base size (random weights, fp16 on a GPU).

    encode / decode of a 512x768 image (the paper: 0.101 s / 0.060 s on an RTX 4090; our target on an H200:
    decode <= 0.030 s), the same control module and UNet run as a 50-step DDIM sampler (DiffEIC's decoder cost
    on the same backbone), peak GPU memory, a 2048x2048 decode through tiling, and encode on one device /
    decode on the other (symbols identical, pixel difference stated).

Random weights give meaningless pictures but the real cost: shapes are the published ones. Skipped without a
GPU unless forced (`--sd`); building the entropy tables needs CompressAI (the train extra).
"""

from __future__ import annotations

import platform

import torch

from .. import pipeline
from ..hub import place
from ..models import OSDiffCodec
from .bench import BENCH_SIZE, _sync, bench_image, median_time

TILED_SIZE = (2048, 2048)


def random_osdiff(device: torch.device, dtype: torch.dtype, config: dict | None = None) -> OSDiffCodec:
    torch.manual_seed(0)
    model = OSDiffCodec(**{"name": "osdiff-sd21-random", **(config or {})}).eval().requires_grad_(False)
    with torch.no_grad():  # zero-initialised joins would make the control module a no-op: give them weights
        for p in model.control_module.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    model.update()
    place(model, device, dtype)
    return model


@torch.no_grad()
def ddim_latent(model: OSDiffCodec, hint: torch.Tensor, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` DDIM steps (eta 0) of the same control module and UNet: DiffEIC's sampler on this backbone."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(steps)
    x = noise.to(hint.device, model.dtype)
    for t in sched.timesteps:
        ctrl = model.control(hint, 1.0, x)
        ctrl.timestep = torch.full((1,), int(t), dtype=torch.long, device=hint.device)
        x = sched.step(model.eps(ctrl), t, x).prev_sample.to(model.dtype)
    return x


@torch.no_grad()
def bench_osdiff(repeats: int, force: bool, steps: int = 50, config: dict | None = None,
                 size: tuple[int, int] = BENCH_SIZE, tiled: tuple[int, int] = TILED_SIZE) -> dict:
    """`config`, `size`, `tiled`: smaller shapes for the CPU test of this script (tests/test_measuring.py)."""
    from ..errors import MissingExtraError

    if not torch.cuda.is_available() and not force:
        return {"skipped": "no GPU (run with --sd to time it on this device anyway)"}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        model = random_osdiff(device, dtype, config)
    except MissingExtraError as e:
        return {"skipped": str(e)}
    h, w = size
    img = bench_image(h, w)

    def sync(fn):
        def run():
            out = fn()
            _sync(device)
            return out
        return run

    data = pipeline.encode(model, img, rate=1.0)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "dtype": str(dtype).replace("torch.", ""), "image": f"{w}x{h}", "bytes": len(data),
           "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out["encode_s"] = median_time(sync(lambda: pipeline.encode(model, img, rate=1.0)), repeats)
    out["decode_s"] = median_time(sync(lambda: pipeline.decode(model, data, fast=True)), repeats)
    if device.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    bs, hint = pipeline.entropy_decode(model, data)
    noise = pipeline.decoder_noise(tuple(hint.shape[1:]), bs.seed)
    with pipeline.reproducible(fast=True):
        one = median_time(sync(lambda: pipeline.latent_from_c_hat(model, hint, 1.0, bs.seed)), repeats)
        many = median_time(sync(lambda: ddim_latent(model, hint.to(device), noise, steps)), 1)
        rest = median_time(sync(lambda: (pipeline.entropy_decode(model, data),
                                         pipeline.latent_to_image(model, pipeline.latent_from_c_hat(
                                             model, hint, 1.0, bs.seed), (h, w)))), 1) - one
    out.update({"steps": steps, "one_step_denoise_s": one, f"{steps}_step_denoise_s": many,
                "one_step_decode_s": one + rest, f"{steps}_step_decode_s": many + rest,
                "decode_speedup": (many + rest) / (one + rest)})
    th, tw = tiled
    big = pipeline.encode(model, bench_image(th, tw), rate=1.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out["tiled"] = {"image": f"{tw}x{th}", "decode_s": median_time(sync(lambda: pipeline.decode(model, big, fast=True)),
                                                                   1, warmup=0)}
    if device.type == "cuda":
        out["tiled"]["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["cross_device"] = cross_device(model, img)
    return out


@torch.no_grad()
def cross_device(gpu_model: OSDiffCodec, img: torch.Tensor) -> dict:
    """Encode on the CPU and decode on the GPU, and the reverse: the symbols must be identical (exact entropy
    parameters); pixels differ by the float networks' rounding (and fp16 on the GPU)."""
    cpu_model = OSDiffCodec.from_config(gpu_model.config).eval()
    cpu_model.load_state_dict({k: v.float().cpu() for k, v in gpu_model.state_dict().items()})
    cpu_model._fingerprint = gpu_model.fingerprint  # the same weights (only the precision of the copy differs)
    rows = {}
    for name, enc, dec in (("cpu_to_gpu", cpu_model, gpu_model), ("gpu_to_cpu", gpu_model, cpu_model)):
        data = pipeline.encode(enc, img, rate=1.0)
        same = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(pipeline.decode_symbols(enc, data),
                                                                 pipeline.decode_symbols(dec, data)))
        a, b = pipeline.decode(enc, data), pipeline.decode(dec, data)
        rows[name] = {"symbols_identical": same, "max_pixel_levels": float((a - b).abs().max() * 255)}
    return rows
