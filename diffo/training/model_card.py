"""Held-out measurements and the model card (README.md) written beside a trained model."""

from __future__ import annotations

import json
from pathlib import Path

import logging

import torch

from .data import load_centre_crop

logger = logging.getLogger(__name__)

RATES = (0.0, 0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def evaluate_holdout(model, files: list[Path], rates=RATES, crop: int = 256) -> list[dict]:
    """Real encode → bytes → decode on centre crops of held-out photos: mean bpp, PSNR and MS-SSIM per
    rate level, and PSNR, HaarPSI and NIQE (no reference; lower is more natural) with and without the
    one-step denoiser."""
    from ..tools.metrics import haarpsi, ms_ssim, niqe
    from .. import pipeline
    from ..bitstream import bits_per_pixel
    from ..image import psnr

    rows = []
    images = []
    if not files:
        return rows
    for p in files:
        images.append(load_centre_crop(p, crop))
    for r in rates:
        acc = {"rate": r, "bpp": 0.0, "psnr": 0.0, "ms_ssim": 0.0, "psnr_nodenoise": 0.0, "haarpsi": 0.0,
               "haarpsi_nodenoise": 0.0, "niqe": 0.0, "niqe_nodenoise": 0.0}
        for img in images:
            data = pipeline.encode(model, img, rate=r)
            rec = pipeline.decode(model, data)
            plain = pipeline.decode(model, data, denoise=False)
            acc["bpp"] += bits_per_pixel(len(data), img.shape[2], img.shape[1])
            acc["psnr"] += psnr(img, rec)
            acc["psnr_nodenoise"] += psnr(img, plain)
            acc["haarpsi"] += haarpsi(img, rec)
            acc["haarpsi_nodenoise"] += haarpsi(img, plain)
            acc["ms_ssim"] += ms_ssim(img, rec)  # the eval command's metric (NaN below 161 px)
            acc["niqe"] += niqe(img, rec)  # NaN below two 96x96 blocks, like MS-SSIM below 161 px
            acc["niqe_nodenoise"] += niqe(img, plain)
        rows.append({k: (v / len(images) if k != "rate" else v) for k, v in acc.items()})
    return rows


@torch.no_grad()
def evaluate_ceiling(model, files: list[Path], crop: int = 256) -> dict:
    """The same crops decoded from their *true* latent (no coding, no denoiser; padded as `encode` pads):
    PSNR and NIQE of what a denoiser that recovered the true latent exactly would give, beside the originals'
    NIQE. Their gap to the coded decode is the realism a denoiser can win by recovering the latent."""
    from ..tools.metrics import niqe
    from ..image import crop_to, pad_to_multiple, psnr

    acc = {"psnr_true_latent": 0.0, "niqe_true_latent": 0.0, "niqe_original": 0.0}
    for p in files:
        img = load_centre_crop(p, crop)
        x, _ = pad_to_multiple(img[None], model.config.pad_multiple)
        rec = crop_to(model.decode_latent(model.encode_latent(x)).float().cpu(), tuple(img.shape[-2:]))[0]
        acc["psnr_true_latent"] += psnr(img, rec) / len(files)
        acc["niqe_true_latent"] += niqe(img, rec) / len(files)
        acc["niqe_original"] += niqe(img, img) / len(files)
    return acc


def finalize(model, folder: Path, held_files: list[Path], train_info: dict) -> Path:
    """Build the entropy tables, save the model in half precision (codec in float32), measure it on the
    held-out photos *as saved* and write the model card beside it."""
    from ..models.diffo.codec import DiffoCodec

    model.eval()
    model.update()
    model.save_pretrained(folder, half_precision=True)
    saved = DiffoCodec.from_pretrained(folder)
    rows = evaluate_holdout(saved, held_files)
    ceiling = evaluate_ceiling(saved, held_files) if held_files else {}
    (Path(folder).parent / "holdout.json").write_text(json.dumps(rows, indent=1))
    (Path(folder).parent / "holdout_ceiling.json").write_text(json.dumps(ceiling, indent=1))
    # The saved model (half-precision VAE/denoiser) is the one that counts, with its own fingerprint.
    logger.info("model %s fingerprint %s", folder, saved.fingerprint.hex())
    (Path(folder) / "README.md").write_text(model_card(saved.config.name, train_info, rows, len(held_files),
                                                         ceiling))
    return Path(folder)


def model_card(name: str, train_info: dict, holdout: list[dict], n_held: int, ceiling: dict | None = None) -> str:
    init = f"\n- Started from: {train_info['init']}" if train_info.get("init") else ""
    losses = f"\n- Losses of the stages this run trained: {train_info['losses']}" if train_info.get("losses") else ""
    seconds = train_info.get("seconds", {})
    cores = train_info.get("cores", 1)
    cpu_hours = (", ".join(f"{k} {v * cores / 3600:.2f}" for k, v in seconds.items())
                 + f"; this run {sum(seconds.values()) * cores / 3600:.2f} core-hours ({cores} cores)")
    table = "\n".join(
        f"| {r['rate']:.2f} | {r['bpp']:.4f} | {r['psnr']:.2f} | {r['psnr_nodenoise']:.2f} | {r['ms_ssim']:.4f} "
        f"| {r['haarpsi']:.4f} | {r['haarpsi_nodenoise']:.4f} | {r.get('niqe', float('nan')):.2f} "
        f"| {r.get('niqe_nodenoise', float('nan')):.2f} |"
        for r in holdout)
    ceiling_line = (f"\nDecoded from their true latent (no coding, no denoiser: what a denoiser that recovered the "
                    f"true latent exactly would give), "
                    f"the same crops give {ceiling['psnr_true_latent']:.2f} dB and NIQE "
                    f"{ceiling['niqe_true_latent']:.2f}; the originals' NIQE is {ceiling['niqe_original']:.2f} "
                    f"(`evaluate_ceiling`).\n" if ceiling else "")
    return f"""---
library_name: diffo
tags: [image-compression, diffusion, one-step, comfyui]
license: mit
---
# {name}

The embedded default model of ComfyUI-DiffO: the DiffO architecture (VQ structural base code + hyperprior
residual in the latent space of a small VAE; rate-adaptive noise; ControlNet-style control module + one-step
UNet denoiser) at a size that trains on a 2-core CPU. Its latent space is its own, not Stable Diffusion's.

## Training
- Command: `{train_info.get('command', '')}`
- Data: {train_info.get('data', '')} (never Kodak); held-out slice: {n_held} photos chosen by file-name hash.
- Stages (steps): {json.dumps(train_info.get('stages', {}))}; seconds: {json.dumps(
    {k: round(v) for k, v in train_info.get('seconds', {}).items()})}
- Compute: {cpu_hours}
- Hardware: {train_info.get('hardware', '')}{init}{losses}

## Held-out measurements
Centre 256x256 crops of the {n_held} held-out photos, real files (bpp = 8 x bytes / pixels, header included),
measured by `diffo.training.model_card.evaluate_holdout`:

| rate level | bpp | PSNR dB | PSNR without denoiser dB | MS-SSIM | HaarPSI | HaarPSI without denoiser | NIQE | NIQE without denoiser |
|---|---|---|---|---|---|---|---|---|
{table}
{ceiling_line}
Noise map (rate level → strength of the denoiser's starting noise,
{train_info.get('noise_origin', 'tuned on the held-out photos, criterion: HaarPSI')}): {train_info.get('noise_map', '')}. Kodak-24 figures against the classical codecs: the project
README (`python -m diffo eval`).
"""
