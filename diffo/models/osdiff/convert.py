"""`diffo convert osdiff`: the files an OSDiff user downloads → a model folder in Hub layout.

Inputs: the authors' Lightning checkpoint (`lambda_1.ckpt`: the trained latent codec `preprocess_model.*` and
control module `control_model.*`, plus the training-only discriminator `guidance_model.*`) and the SD 2.1-base
weights the user has (a single-file `.safetensors`/`.ckpt`, as in ComfyUI's models/checkpoints, or a diffusers
folder). Nothing is downloaded: Stability AI removed SD 2.1 from the Hub in November 2025.

Safety and strictness: tensors only (`torch.load(weights_only=True)`; a file that needs arbitrary unpickling is
refused), and every tensor of the official file is either used or ignored by name (`IGNORED`); a missing or
misshapen tensor is an error naming it. The entropy tables are built here, once (CompressAI's construction:
the `train` extra), and stored, so loading never rebuilds them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ...errors import ModelLoadError
from ..sd import SD21_BASE_UNET, SD21_VAE
from .codec import OSDIFF_CONTROL, OSDiffCodec
from .prompt import empty_prompt_embedding

# Tensors of the official checkpoint that inference does not use, by name (reference: model/lfgcm.py and
# model/osdiff.py of cheesejiang/OSDiff).
IGNORED = [
    r"guidance_model\..*",  # the training-only discriminator on the UNet's features
    r"preprocess_model\.hyper_enc\.(sft_feature.*|h_a1|h_a4|h_a7|h_a8)\..*",  # SFT branches built but not run
    r"preprocess_model\.f_c\..*",  # an unused hyper-synthesis branch
    r"preprocess_model\.(entropy_bottleneck|gaussian_conditional)\.(_offset|_quantized_cdf|_cdf_length)",  # rebuilt
    r"preprocess_model\.(entropy_bottleneck|gaussian_conditional)\.likelihood_lower_bound\.bound",
    r"preprocess_model\.gaussian_conditional\.(scale_table|scale_bound|lower_bound_scale\.bound)",  # checked
    r"preprocess_model\.entropy_bottleneck\.target",
    # the diffusion schedule buffers of the Lightning module (we use SD's schedule, the same numbers)
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
    r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance|"
    r"posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar|scale_factor)",
    r"cond_stage_model\..*",  # the text encoder: only its empty-prompt output is kept (computed from the base)
]
BASE_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")

_RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


# ------------------------------------------------------------------------------------------ reading files
def load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file or of a PyTorch/Lightning checkpoint (its `state_dict`), loaded with
    `weights_only=True`: a file that needs arbitrary unpickling is refused."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{what} not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:
            raise ModelLoadError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from e
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # files in the legacy (pre-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise ModelLoadError(
            f"{path} cannot be loaded safely ({type(e).__name__}: {str(e).splitlines()[0][:300]}). DiffO reads "
            "checkpoints with torch.load(weights_only=True), which refuses files that would run code while "
            f"loading. If you trust the file, re-save its tensors as .safetensors and pass that ({what})") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{path} holds no state dict of tensors ({what})")
    return obj


def load_base(base: Path) -> dict[str, torch.Tensor]:
    """SD 2.1-base's tensors: a single file in its original key names, or a diffusers folder's components under
    'unet.', 'vae.' and 'text_encoder.' prefixes."""
    base = Path(base)
    if base.is_dir():
        from safetensors.torch import load_file

        out = {}
        for part in ("unet", "vae", "text_encoder"):
            files = sorted((base / part).glob("*.safetensors"))
            if not files:
                raise ModelLoadError(f"{base} is not a diffusers SD 2.1-base folder: {part}/*.safetensors is missing")
            for f in files:
                out.update({f"{part}.{k}": v for k, v in load_file(f).items()})
        return out
    return load_tensors(base, "the SD 2.1-base checkpoint")


def _diffusers_base(state: dict) -> tuple[dict, dict]:
    """(UNet, VAE) state dicts in diffusers names, from either layout; shapes checked against SD 2.1-base."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    if any(k.startswith("unet.") for k in state):
        unet = {k[5:]: v for k, v in state.items() if k.startswith("unet.")}
        vae = {k[4:]: v for k, v in state.items() if k.startswith("vae.")}
    else:
        probe = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        if probe not in state:
            kind = "an SDXL checkpoint" if any("label_emb" in k for k in state) else "not a Stable Diffusion UNet"
            raise ModelLoadError(f"the base checkpoint is {kind}: OSDiff needs SD 2.1-base "
                                 "(v2-1_512-ema-pruned, 512 px, epsilon prediction)")
        _check_prompt_width(tuple(state[probe].shape))
        unet = convert_ldm_unet_checkpoint(state, SD21_BASE_UNET)
        vae = convert_ldm_vae_checkpoint(state, SD21_VAE)
    k = unet.get("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")
    _check_prompt_width(None if k is None else tuple(k.shape))
    for name, cls, cfg, sd in (("UNet", UNet2DConditionModel, SD21_BASE_UNET, unet), ("VAE", AutoencoderKL, SD21_VAE, vae)):
        want = {n: tuple(t.shape) for n, t in cls.from_config(cfg).state_dict().items()}
        _check_exact(name + " of the base checkpoint", want, sd)
    return unet, vae


def _check_prompt_width(shape: tuple | None) -> None:
    """SD 2.x cross-attends to 1024-wide prompts (SD 1.x: 768)."""
    if shape != (320, 1024):
        got = "missing" if shape is None else str(shape)
        hint = " (that is SD 1.x: its prompt width is 768)" if shape is not None and shape[-1] == 768 else ""
        raise ModelLoadError(f"the base checkpoint's UNet is not SD 2.1's: first cross-attention key weight {got}, "
                             f"expected (320, 1024){hint}. OSDiff needs SD 2.1-base (v2-1_512-ema-pruned.safetensors "
                             "or .ckpt, as in ComfyUI's models/checkpoints)")


def _check_exact(what: str, want: dict[str, tuple], got: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(want) - set(got))
    if missing:
        raise ModelLoadError(f"the {what} lacks {len(missing)} tensors, e.g. {missing[0]}")
    extra = sorted(set(got) - set(want))
    if extra:
        raise ModelLoadError(f"the {what} has {len(extra)} unexpected tensors, e.g. {extra[0]}")
    for k, shape in want.items():
        if tuple(got[k].shape) != shape:
            raise ModelLoadError(f"the {what}: {k} is {tuple(got[k].shape)}, expected {shape}")


# ------------------------------------------------------------------------------------------ renaming
def _rename_control(key: str) -> str | None:
    """An official `control_model.*` key → ours (`control_module.*`), or None if it is not one."""
    m = re.fullmatch(r"control_model\.control_model\.time_embed\.([02])\.(weight|bias)", key)
    if m:
        return f"control_module.time_embedding.linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"
    m = re.fullmatch(r"control_model\.control_model\.(input_blocks\.\d+|middle_block)\.(\d+)\.(.+)", key)
    if m:
        block, part, rest = m.groups()
        for old, new in _RESBLOCK.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        if rest.startswith("op."):  # Downsample: diffusers' Downsample2D keeps its conv as `conv`
            rest = "conv." + rest[3:]
        return f"control_module.{block}.{part}.{rest}"
    m = re.fullmatch(r"control_model\.(enc|dec)_zero_convs_out\.(\d+)\.0\.(weight|bias)", key)
    if m:
        return f"control_module.{m.group(1)}_zero_convs.{m.group(2)}.{m.group(3)}"
    m = re.fullmatch(r"control_model\.middle_block_out\.0\.(weight|bias)", key)
    if m:
        return f"control_module.mid_zero_conv.{m.group(1)}"
    if key == "control_model.scale_list":
        return "control_module.scales"
    return None


_LFGCM = [
    (r"encoder\.g_a1\.(\d)\.(.+)", "g_a.{0}.{1}"),
    (r"encoder\.g_a6\.(.+)", "g_a.4.{0}"),
    (r"hyper_enc\.h_a0\.(.+)", "h_a.0.{0}"), (r"hyper_enc\.h_a3\.(.+)", "h_a.2.{0}"),
    (r"hyper_enc\.h_a6\.(.+)", "h_a.4.{0}"), (r"hyper_enc\.h_a9\.(.+)", "h_a.5.{0}"),
    (r"hyper_dec\.hyper_dec\.(\d)\.(.+)", "h_s.{0}.{1}"),
    (r"decoder\.g_s2\.(\d)\.(.+)", "g_s.{0}.{1}"),
    (r"decoder\.g_s3\.0\.subpel_conv\.0\.(.+)", "g_s.4.subpel.0.{0}"),
    (r"decoder\.g_s3\.0\.conv\.(.+)", "g_s.4.conv.{0}"),
    (r"decoder\.g_s3\.0\.upsample\.0\.(.+)", "g_s.4.upsample.0.{0}"),
    (r"decoder\.g_s4\.(.+)", "g_s.8.{0}"),
    (r"local_context\.(\d+)\.(.+)", "local_context.{0}.{1}"),
    (r"entropy_parameters_(anchor|nonanchor)\.(\d+)\.fusion\.(\d)\.(.+)", "entropy_parameters_{0}.{1}.{2}.{3}"),
    (r"entropy_bottleneck\.(?:_matrix|matrices\.)(\d)", "entropy_bottleneck.matrices.{0}"),
    (r"entropy_bottleneck\.(?:_bias|biases\.)(\d)", "entropy_bottleneck.biases.{0}"),
    (r"entropy_bottleneck\.(?:_factor|factors\.)(\d)", "entropy_bottleneck.factors.{0}"),
    (r"entropy_bottleneck\.quantiles", "entropy_bottleneck.quantiles"),
]


def _rename_codec(key: str) -> str | None:
    """An official `preprocess_model.*` key → ours (`latent_codec.*`), or None."""
    if not key.startswith("preprocess_model."):
        return None
    rest = key[len("preprocess_model."):]
    m = re.fullmatch(r"channel_context\.(\d+)\.fushion\.(\d)\.(.+)", rest)  # sic: the reference's spelling
    if m:
        return f"latent_codec.channel_context.{int(m.group(1)) - 1}.{m.group(2)}.{m.group(3)}"
    m = re.fullmatch(r"decoder\.g_s3\.(\d)\.(.+)", rest)
    if m and m.group(1) != "0":
        return f"latent_codec.g_s.{4 + int(m.group(1))}.{m.group(2)}"
    for pattern, target in _LFGCM:
        m = re.fullmatch(pattern, rest)
        if m:
            return "latent_codec." + target.format(*m.groups())
    return None


def map_official(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(our tensors from the official checkpoint, the official names ignored). Unknown names are an error."""
    ours, ignored, unknown = {}, [], []
    for key, value in state.items():
        if key.startswith(BASE_PREFIXES[:2]):
            continue  # base weights carried by the checkpoint: handled with the base
        new = _rename_control(key) or _rename_codec(key)
        if new is not None:
            ours[new] = value
        elif any(re.fullmatch(p, key) for p in IGNORED):
            ignored.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ModelLoadError(f"the OSDiff checkpoint holds {len(unknown)} tensors this converter does not know, e.g. "
                             f"{unknown[0]!r}: is it an OSDiff checkpoint (lambda_*.ckpt)?")
    return ours, ignored


# ------------------------------------------------------------------------------------------ converting
def convert_osdiff(checkpoint: Path | str, base: Path | str, out: Path | str | None = None, *,
                   name: str | None = None, config: dict | None = None) -> OSDiffCodec:
    """Build the OSDiff model from the official checkpoint and SD 2.1-base; with `out`, save it there (Hub
    layout, model card). `config` overrides OSDiffCodec's constructor arguments (tests use tiny shapes)."""
    checkpoint, base = Path(checkpoint), Path(base)
    official = load_tensors(checkpoint, "the OSDiff checkpoint")
    base_state = load_base(base)
    # the checkpoint's own base tensors win, as in the reference's loader (sd.update(checkpoint))
    carried = {k: v for k, v in official.items() if k.startswith(BASE_PREFIXES[:2])}
    if carried and any(k.startswith("unet.") for k in base_state):
        raise ModelLoadError(f"{checkpoint.name} carries {len(carried)} UNet/VAE tensors of its own, which replace "
                             "the base's (as the reference's loader does): give the SD 2.1-base single file "
                             "(.safetensors/.ckpt) as --base, not a diffusers folder, so that they can be merged")
    merged = {**base_state, **carried}
    kwargs = dict(name=name or f"osdiff-{checkpoint.stem}")
    kwargs.update(config or {})
    if config is None:
        unet, vae = _diffusers_base(merged)
    else:  # tiny test shapes: the converter's own checks on the SD 2.1 shapes do not apply
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

        unet = convert_ldm_unet_checkpoint(merged, kwargs["unet_config"])
        vae = convert_ldm_vae_checkpoint(merged, kwargs["vae_config"])
    model = OSDiffCodec(**kwargs)
    ours, ignored = map_official(official)
    if "text_encoder.text_model.embeddings.token_embedding.weight" in merged:
        prompt = empty_prompt_embedding({k[len("text_encoder."):]: v for k, v in merged.items()
                                         if k.startswith("text_encoder.")})
    else:
        try:
            prompt = empty_prompt_embedding(merged)
        except KeyError as e:
            raise ModelLoadError(f"the base checkpoint {base} has no text encoder (cond_stage_model.*), needed once "
                                 "to compute the empty-prompt embedding: use the full SD 2.1-base file") from e
    state = {f"unet.{k}": v for k, v in unet.items()}
    state.update({f"vae.{k}": v for k, v in vae.items()})
    state.update(ours)
    state["prompt_embeds"] = prompt
    want = model.state_dict()
    for k in [k for k in want if re.search(r"\.(_offset|_quantized_cdf|_cdf_length)$", k)]:
        state[k] = want[k]  # the tables are built below
    for k in ("latent_codec.entropy_bottleneck.target", "latent_codec.entropy_bottleneck.likelihood_lower_bound.bound",
              "latent_codec.gaussian_conditional.likelihood_lower_bound.bound",
              "latent_codec.gaussian_conditional.lower_bound_scale.bound",
              "latent_codec.gaussian_conditional.scale_table", "latent_codec.gaussian_conditional.scale_bound"):
        state[k] = want[k]  # constants of the entropy models, the same in the reference
    _check_scale_table(official, want["latent_codec.gaussian_conditional.scale_table"])
    _check_exact("converted OSDiff model", {k: tuple(v.shape) for k, v in want.items()}, state)
    model.load_state_dict({k: v.to(want[k].dtype) for k, v in state.items()})
    _check_grid_range(model)
    model.eval()
    model.update()
    if out is not None:
        from ..base import public_config

        card = model_card(model, checkpoint, base, ignored)
        model.save_pretrained(out, model_card=card)
        (Path(out) / "conversion.json").write_text(json.dumps(
            {"checkpoint": checkpoint.name, "base": base.name, "ignored_tensors": len(ignored),
             "config": public_config(model.config)}, indent=1, default=str))
    return model


def _check_grid_range(model: OSDiffCodec) -> None:
    """The exact layers clamp weights to the grid's range: a published weight outside it would silently change the
    model, so it is an error naming the tensor."""
    from ...layers import FineExactConv2d, FineExactConvTranspose2d

    for name, m in model.latent_codec.named_modules():
        if isinstance(m, (FineExactConv2d, FineExactConvTranspose2d)):
            g = m.grid
            for what, t, limit in (("weight", m.weight, g.weight_limit), ("bias", m.bias, g.act_limit)):
                if t is not None and float(t.abs().max()) > limit:
                    raise ModelLoadError(f"latent_codec.{name}.{what} holds a value of {float(t.abs().max()):.4g}, "
                                         f"outside the exact grid's range ±{limit:g}: this converter cannot keep "
                                         "the entropy coding exact for this checkpoint (please report it)")


def _check_scale_table(official: dict, ours: torch.Tensor) -> None:
    table = official.get("preprocess_model.gaussian_conditional.scale_table")
    if table is not None and table.numel() and not torch.allclose(table.float(), ours.float(), rtol=1e-6, atol=0):
        raise ModelLoadError("the checkpoint's Gaussian scale table differs from OSDiff's "
                             "(exp(linspace(ln 0.11, ln 256, 64))): not a checkpoint this converter knows")


def model_card(model: OSDiffCodec, checkpoint: Path, base: Path, ignored: list[str]) -> str:
    return f"""---
library_name: diffo
tags: [image-compression, diffusion, one-step, osdiff, comfyui]
---
# {model.config.name}

The published OSDiff model (Guo et al., "OSDiff: One-step diffusion image compression"), converted by
ComfyUI-DiffO (`python -m diffo convert osdiff`) into the DiffO model format. Fingerprint
`{model.fingerprint.hex()}`.

## Sources (the user's files; nothing was downloaded)
- OSDiff checkpoint: `{checkpoint.name}` from the authors' release (github.com/cheesejiang/OSDiff, code
  Apache-2.0; no licence is stated for the weights). {len(ignored)} tensors of it are not used at inference and
  were left out by name (the training-only discriminator `guidance_model.*`, unused SFT branches, rebuilt tables).
- Base: `{base.name}`, Stable Diffusion 2.1-base (CreativeML Open RAIL++-M licence, with its use restrictions).

This folder holds those weights: you are responsible for respecting both licences; do not redistribute it
where they do not allow it.

## What differs from the reference implementation
- Entropy coding: constriction's range coder (`.diffo` format 3) instead of CompressAI's rANS; the entropy-
  parameter networks run on an exact grid (their weights rounded to multiples of 2^-16), so files decode the same
  on every machine; this changes the rate slightly (see the DiffO README).
- The decoder's start noise x_T is drawn on the CPU from the seed stored in each file.
"""
