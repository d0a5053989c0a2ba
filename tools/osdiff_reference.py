"""Run the authors' OSDiff code with random weights and record what our conversion must reproduce.

    python tools/osdiff_reference.py --repo OSDIFF_SNAPSHOT --deps EXTRA_SITE --size tiny|full --out DIR

OSDIFF_SNAPSHOT is a local copy of github.com/cheesejiang/OSDiff (Apache-2.0), never committed; EXTRA_SITE a
throw-away folder holding the packages their modules import that the project does not use (open_clip_torch,
ftfy, wcwidth, regex, omegaconf: `pip install --target`). Their training-only imports (Lightning, LPIPS, pyiqa,
tensorboard, OpenCV, kornia, transformers) are stubbed: no code path used here runs them.

Writes into DIR:
- `lambda_test.ckpt`: the trained parts in the official layout (`{'state_dict': ...}`: `control_model.*` with
  its doubled prefix, `preprocess_model.*` with CompressAI 1.2.4's entropy-bottleneck names and empty CDF
  buffers, a few `guidance_model.*` tensors, the Lightning schedule buffers);
- `base.safetensors`: the random SD base in single-file key names (UNet, VAE, OpenCLIP text encoder);
- `reference.safetensors` + `reference.json`: the input image and every stage of their pipeline (latent, z and
  y symbols with their CDF indexes, the y/z strings' sizes, hint, empty-prompt embedding, x_T, ε̂, x̂0, pixels).
Then `tools/osdiff_equivalence.py DIR` converts and compares (no reference code needed).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch
from torch import nn

SEED = 1234  # the decoder seed stored in our stream: x_T = randn on the CPU from it, as diffo.pipeline draws it

# The smallest configuration their classes build (the channel-context widths 224/128 are fixed in their code).
TINY = dict(
    unet=dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
              num_res_blocks=1, channel_mult=[1, 1, 1, 1], num_head_channels=16, use_spatial_transformer=True,
              use_linear_in_transformer=True, transformer_depth=1, context_dim=32, legacy=False),
    control=dict(image_size=32, in_channels=4, out_channels=4, hint_channels=4, model_channels=32,
                 attention_resolutions=[4, 2, 1], num_res_blocks=1, channel_mult=[1, 1, 1, 1], num_head_channels=16,
                 use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=1, context_dim=32,
                 legacy=False, control_scale=1.0, control_model_ratio=1.0),
    vae=dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 1, 1],
             num_res_blocks=1, attn_resolutions=[], dropout=0.0),
    codec=dict(in_nc=4, enc_mid=[16, 16, 16, 16], out_nc=4, N=16, M=16, prior_nc=8, sft_ks=3, slice_num=2,
               slice_ch=[8, 8]),
    text=dict(width=32, layers=3, heads=1, context_length=77, vocab_size=49408),
    image=(128, 192),
)
FULL = dict(
    unet=dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
              num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=64, use_spatial_transformer=True,
              use_linear_in_transformer=True, transformer_depth=1, context_dim=1024, legacy=False),
    control=dict(image_size=32, in_channels=4, out_channels=4, hint_channels=4, model_channels=320,
                 attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=16,
                 use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=1, context_dim=1024,
                 legacy=False, control_scale=1.0, control_model_ratio=0.2),
    vae=dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
             num_res_blocks=2, attn_resolutions=[], dropout=0.0),
    codec=dict(in_nc=4, enc_mid=[64, 128, 192, 192], out_nc=4, N=192, M=320, prior_nc=64, sft_ks=3, slice_num=10,
               slice_ch=[8, 8, 8, 8, 16, 16, 32, 32, 96, 96]),
    text=dict(width=1024, layers=24, heads=16, context_length=77, vocab_size=49408),
    image=(256, 384),
)


def stub_training_imports() -> None:
    """Modules their files import at the top for training only."""
    class _Anything(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (nn.Module,), {})

    for name in ["lpips", "pyiqa", "thop", "cv2", "kornia", "transformers", "pytorch_lightning",
                 "pytorch_lightning.utilities", "pytorch_lightning.utilities.types",
                 "pytorch_lightning.utilities.distributed", "pytorch_lightning.utilities.rank_zero",
                 "torch.utils.tensorboard", "ldm.models.diffusion.ddpm", "xformers", "xformers.ops"]:
        sys.modules[name] = _Anything(name)
    sys.modules["pytorch_lightning"].LightningModule = nn.Module
    sys.modules["thop"].profile = None
    sys.modules["xformers"] = None  # ldm falls back to its plain attention
    sys.modules["xformers.ops"] = None


TOKEN_ROWS = (0, 49406, 49407)  # the only token embeddings the empty prompt reads (padding, start, end)


def randomise(*modules: nn.Module, gen: torch.Generator) -> None:
    """Random values in every tensor that initialises to zero (zero convs, out projections), so that no path
    of the comparison is trivially zero; LayerNorm/GroupNorm weights stay near 1. Then every float tensor is
    rounded to a float16 value, so that a float16 fixture holds the very weights the reference ran with."""
    for m in modules:
        for name, p in m.named_parameters():
            with torch.no_grad():
                if p.abs().max() == 0:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        with torch.no_grad():
            for t in [*m.parameters(), *m.buffers()]:
                if t.is_floating_point():
                    t.copy_(t.half().float())


def test_image(h: int, w: int) -> torch.Tensor:
    """A deterministic synthetic image with edges, gradients and texture (no data files)."""
    g = torch.Generator().manual_seed(7)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([xx, yy, 0.5 + 0.5 * torch.sin(12 * xx + 7 * yy)])
    img[:, h // 4: h // 2, w // 3: 2 * w // 3] = torch.tensor([0.9, 0.2, 0.1])[:, None, None]
    img = img + 0.08 * torch.rand((3, h, w), generator=g)
    return img.clamp(0, 1)[None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", required=True, type=Path)
    ap.add_argument("--deps", type=Path, default=None)
    ap.add_argument("--size", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--fixture", type=Path, default=None,
                    help="also pack a compact copy for the tests (float16 tensors, token rows only)")
    args = ap.parse_args()
    cfg = TINY if args.size == "tiny" else FULL
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import diffo.models.osdiff.convert  # noqa: F401  (before the stubs: diffusers looks for transformers)
    sys.path[:0] = [str(args.repo)] + ([str(args.deps)] if args.deps else [])
    stub_training_imports()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)

    import numpy as np
    import open_clip
    from compressai import ans
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from ldm.modules.encoders import modules as encoders

    import model.lfgcm as lfgcm_mod
    from model.lfgcm import LFGCM
    from model.osdiff import CDDM
    from model.spaced_sampler import SpacedSampler

    text_cfg = cfg["text"]

    def tiny_clip(*_a, **_k):
        clip = open_clip.model.CLIP(embed_dim=text_cfg["width"],
                                    vision_cfg=open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=32, patch_size=16,
                                                                              image_size=32),
                                    text_cfg=open_clip.model.CLIPTextCfg(**text_cfg))
        return clip, None, None

    encoders.open_clip.create_model_and_transforms = tiny_clip  # no download: random weights of the same code
    text = encoders.FrozenOpenCLIPEmbedder(layer="penultimate").eval()
    unet = UNetModel(**cfg["unet"]).eval()
    control = CDDM(**cfg["control"]).eval()
    codec = LFGCM(**cfg["codec"]).eval()
    vae = AutoencoderKL(ddconfig=cfg["vae"], lossconfig={"target": "torch.nn.Identity"}, embed_dim=4).eval()
    with torch.no_grad():  # LayerNorm biases near zero (ComfyUI reads a large spread as v-prediction)
        for m in [*unet.modules(), *text.modules()]:
            if isinstance(m, nn.LayerNorm) and m.bias is not None:
                m.bias.mul_(0.1)
        keep = torch.zeros(text.model.token_embedding.weight.shape[0], 1)
        keep[list(TOKEN_ROWS)] = 1
        text.model.token_embedding.weight.mul_(keep)  # rows the empty prompt never reads: zero (a small fixture)
    randomise(unet, control, codec, vae, text, gen=gen)
    codec.update(force=True)

    recorded: dict[str, list] = {}

    class RecordingEncoder(ans.BufferedRansEncoder):
        def encode_with_indexes(self, symbols, indexes, *rest):
            recorded["y_symbols"], recorded["y_indexes"] = list(symbols), list(indexes)
            return super().encode_with_indexes(symbols, indexes, *rest)

    lfgcm_mod.BufferedRansEncoder = RecordingEncoder
    out = {}
    with torch.no_grad():
        x = test_image(*cfg["image"])
        out["image"] = x
        latent = vae.encode(x * 2 - 1).mode() * 0.18215
        out["latent"] = latent
        y = codec.encoder(latent, None)
        z = codec.hyper_enc(y, None)
        med = codec.entropy_bottleneck._get_medians().detach().reshape(1, -1, 1, 1)
        out["z_symbols"] = torch.round(z - med).long()
        strings = codec.compress(latent, None)
        out["y_symbols"] = torch.tensor(recorded["y_symbols"])
        out["y_indexes"] = torch.tensor(recorded["y_indexes"])
        hint = codec.decompress(strings["strings"], strings["shape"])
        out["hint"] = hint
        prompt = text([""])
        out["prompt"] = prompt
        shape = (1, 4, latent.shape[-2], latent.shape[-1])
        x_t = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(SEED))
        out["x_T"] = x_t
        t = torch.full((1,), 999, dtype=torch.long)
        eps = control(x=x_t, hint=hint, timesteps=t, context=prompt, base_model=unet)
        out["eps"] = eps

        class OneStepModel:  # what SpacedSampler asks of the Lightning module
            num_timesteps, linear_start, linear_end, parameterization = 1000, 0.00085, 0.0120, "eps"
            betas = torch.zeros(1)

            def apply_model(self, x_noisy, ts, cond):
                assert int(ts[0]) == 999
                return control(x=x_noisy, hint=cond["c_latent"][0], timesteps=ts,
                               context=cond["c_crossattn"][0], base_model=unet)

        x0 = SpacedSampler(OneStepModel(), var_type="fixed_small").sample(
            1, shape, {"c_latent": [hint], "c_crossattn": [prompt]}, x_T=x_t)
        out["x0"] = x0
        pixels = ((vae.decode(x0 / 0.18215) + 1) / 2).clamp(0, 1)
        out["pixels"] = (pixels * 255).to(torch.uint8)  # the official script truncates
    args.out.mkdir(parents=True, exist_ok=True)

    # the trained parts, in the published layout
    state = {}
    for k, v in control.state_dict().items():
        state["control_model." + k] = v
    for k, v in codec.state_dict().items():
        for new_name, old_name in (("matrices.", "_matrix"), ("biases.", "_bias"), ("factors.", "_factor")):
            k = k.replace(f"entropy_bottleneck.{new_name}", f"entropy_bottleneck.{old_name}")
        if k.endswith(("_offset", "_quantized_cdf", "_cdf_length")):
            v = v.new_zeros(0)  # saved empty: the official loader rebuilds them
        state["preprocess_model." + k] = v
    state["guidance_model.DMLP.0.weight"] = torch.randn(8, 8, 4, 4, generator=gen)
    state["guidance_model.Discriminator.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3, generator=gen)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    state["betas"] = betas.float()
    state["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    state["scale_factor"] = torch.tensor(0.18215)
    torch.save({"state_dict": {k: v.contiguous() for k, v in state.items()}, "global_step": 0},
               args.out / "lambda_test.ckpt")

    from safetensors.torch import save_file

    base = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    base.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    base.update({"cond_stage_model.model." + k: v for k, v in text.model.state_dict().items()})
    save_file({k: v.contiguous() for k, v in base.items()}, args.out / "base.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, args.out / "reference.safetensors")
    meta = {"size": args.size, "seed": SEED, "config": {k: v for k, v in cfg.items()},
            "y_string_bytes": len(strings["strings"][0][0]), "z_string_bytes": len(strings["strings"][1][0]),
            "z_shape": list(strings["shape"]), "torch": torch.__version__,
            "compressai": __import__("compressai").__version__,
            "osdiff_commit": _git_head(args.repo)}
    (args.out / "reference.json").write_text(json.dumps(meta, indent=1))
    if args.fixture:
        write_fixture(args.out, args.fixture)
    print(json.dumps({k: meta[k] for k in ("y_string_bytes", "z_string_bytes", "z_shape")}))


def write_fixture(run: Path, fixture: Path) -> None:
    """The tiny run as the CI fixture: the official and base tensors in float16 (they are float16 values, see
    `randomise`), the token embedding cut to the rows the empty prompt reads, the tensors the converter ignores by
    name reduced to their shapes, and the reference outputs. tests/test_osdiff.py expands it back into the
    official files."""
    import re

    from safetensors.torch import load_file, save_file

    from diffo.models.osdiff.convert import IGNORED  # imported before the stubs (see main)

    fixture.mkdir(parents=True, exist_ok=True)
    official = torch.load(run / "lambda_test.ckpt", weights_only=True)["state_dict"]
    base = load_file(run / "base.safetensors")
    packed = {}
    for prefix, tensors in (("official/", official), ("base/", base)):
        for k, v in tensors.items():
            if k == "cond_stage_model.model.token_embedding.weight":
                packed["token_rows"] = v[list(TOKEN_ROWS)].half()
                packed["token_shape"] = torch.tensor(v.shape)
                continue
            if prefix == "official/" and v.numel() > 256 and any(re.fullmatch(p, k) for p in IGNORED):
                packed["shape_of/" + k] = torch.tensor(v.shape, dtype=torch.int64)  # values unused: zeros will do
                continue
            if v.dtype == torch.float32 and v.numel() and torch.equal(v.half().float(), v):
                v = v.half()  # exact: every random weight was rounded to float16 (tables and constants were not)
            packed[prefix + k] = v.contiguous()
    save_file(packed, fixture / "weights.safetensors")
    for name in ("reference.safetensors", "reference.json"):
        (fixture / name).write_bytes((run / name).read_bytes())


def _git_head(repo: Path) -> str | None:
    head = repo / ".git" / "HEAD"
    return head.read_text().strip() if head.is_file() else None


if __name__ == "__main__":
    main()
