"""Compare our OSDiff family with a run of the authors' code (tools/osdiff_reference.py), stage by stage.

    python tools/osdiff_equivalence.py RUN_DIR [--out results.json]

RUN_DIR holds what the reference tool wrote: `lambda_test.ckpt` (official layout), `base.safetensors` (SD
single-file layout), `reference.safetensors` and `reference.json`. We convert the two checkpoint files with
`diffo.models.osdiff.convert` (as a user would) and feed our stages the reference's own inputs where a stage is
compared on its own (so that an earlier stage's rounding does not hide or cause a later difference), then run the
whole public pipeline. tests/test_osdiff.py runs the same comparison on the committed tiny fixture.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def our_config(ref_config: dict) -> dict | None:
    """OSDiffCodec arguments for the reference's module configuration (None: the published SD 2.1-base sizes)."""
    u, c, v, k = ref_config["unet"], ref_config["control"], ref_config["vae"], ref_config["codec"]
    if u["model_channels"] == 320 and k["M"] == 320:
        return None
    chans = [u["model_channels"] * m for m in u["channel_mult"]]
    attn = [2 ** i in u["attention_resolutions"] for i in range(len(chans))]
    unet = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=u["num_res_blocks"],
                block_out_channels=chans,
                down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
                up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
                cross_attention_dim=u["context_dim"], attention_head_dim=[ch // u["num_head_channels"] for ch in chans],
                use_linear_projection=True)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=v["num_res_blocks"],
               norm_num_groups=32, down_block_types=["DownEncoderBlock2D"] * len(v["ch_mult"]),
               up_block_types=["UpDecoderBlock2D"] * len(v["ch_mult"]),
               block_out_channels=[v["ch"] * m for m in v["ch_mult"]], scaling_factor=0.18215)
    control = dict(control_channels=[int(c["model_channels"] * c["control_model_ratio"]) * m for m in c["channel_mult"]],
                   attention_levels=attn, head_dim=c["num_head_channels"], hint_channels=c["hint_channels"])
    codec = dict(analysis_channels=k["enc_mid"][0], N=k["N"], M=k["M"], slices=k["slice_ch"])
    return dict(vae_config=vae, unet_config=unet, latent_codec_config=codec, control_config=control)


def convert(run: Path):
    from diffo.models.osdiff.convert import convert_osdiff

    meta = json.loads((run / "reference.json").read_text())
    return convert_osdiff(run / "lambda_test.ckpt", run / "base.safetensors", config=our_config(meta["config"]))


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double().cpu(), b.double().cpu()
    d = (a - b).abs()
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "ref_max_abs": float(b.abs().max())}


@torch.no_grad()
def compare(run: Path, model=None) -> dict:
    """Every stage's difference from the reference (see the module docstring)."""
    from safetensors.torch import load_file

    from diffo import pipeline
    from diffo.entropy import RangeCoder
    from diffo.models.osdiff.codec import OSDiffControl
    from diffo.image import to_uint8

    meta = json.loads((run / "reference.json").read_text())
    ref = load_file(run / "reference.safetensors")
    model = model if model is not None else convert(run).eval()
    lc, coder = model.latent_codec, RangeCoder()
    out: dict = {"size": meta["size"]}
    out["latent"] = _diff(model.encode_latent(ref["image"]), ref["latent"])
    # 1. our LFGCM with the reference's float arithmetic: the same symbols
    with float_path(lc):
        fz, fy, z_shape = lc.compress(ref["latent"], coder)
        f_zsym, f_ysym = lc.decode_symbols(fz, fy, z_shape, coder)
        f_hint = lc.decompress(fz, fy, z_shape, coder)
        float_data = pipeline.encode(model, ref["image"][0], rate=1.0, seed=meta["seed"])
        float_pixels = pipeline.decode(model, float_data)
    out["float_path"] = {
        "z_symbols_differing": int((f_zsym.reshape(-1) != ref["z_symbols"].reshape(-1)).sum()),
        "y_symbols_differing": int((f_ysym != ref["y_symbols"]).sum()) if f_ysym.shape == ref["y_symbols"].shape else -1,
        "bytes": {"z": len(fz), "y": len(fy)}, "hint": _diff(f_hint, ref["hint"])}
    # 2. the exact path (what the product runs): entropy parameters on the grid
    z_str, y_str, z_shape = lc.compress(ref["latent"], coder)
    z_sym, y_sym = lc.decode_symbols(z_str, y_str, z_shape, coder)
    out["z_symbols_differing"] = int((z_sym.reshape(-1) != ref["z_symbols"].reshape(-1)).sum())
    out["z_symbols"] = int(z_sym.numel())
    out["y_symbols_differing"] = int((y_sym != ref["y_symbols"]).sum()) if y_sym.shape == ref["y_symbols"].shape else -1
    out["y_symbols"] = int(ref["y_symbols"].numel())
    out["bytes"] = {"ours": {"z": len(z_str), "y": len(y_str)},
                    "reference": {"z": meta["z_string_bytes"], "y": meta["y_string_bytes"]}}
    hint = lc.decompress(z_str, y_str, z_shape, coder)
    out["hint"] = _diff(hint, ref["hint"])
    out["prompt"] = _diff(model.prompt_embeds, ref["prompt"])
    t = torch.full((1,), model.config.timestep, dtype=torch.long)
    same_inputs = OSDiffControl(ref["x_T"], t, ref["hint"])
    out["eps"] = _diff(model.eps(same_inputs), ref["eps"])
    x0 = model.denoise(same_inputs)
    out["x0"] = _diff(x0, ref["x0"])
    pixels = (model.decode_latent(x0) * 255).to(torch.uint8)  # truncated, as the official script does
    out["pixels_from_reference_x0"] = _diff(pixels.float(), ref["pixels"].float())
    # the whole public pipeline: encode the image, decode the stream (seeded x_T), rounded pixels
    data = pipeline.encode(model, ref["image"][0], rate=1.0, seed=meta["seed"])
    decoded = pipeline.decode(model, data)
    out["pipeline_pixels_truncated"] = _diff((decoded * 255).to(torch.uint8).float(), ref["pixels"][0].float())
    out["pipeline_pixels_rounded"] = _diff(to_uint8(decoded).float(), ref["pixels"][0].float())
    out["pipeline_bpp"] = pipeline.bpp_of(data)
    out["exact_vs_float_path"] = {"bytes": [len(data), len(float_data)],
                                  "rate_change": len(data) / len(float_data) - 1,
                                  "psnr_db": _psnr(decoded, float_pixels),
                                  "psnr_vs_input_db": [_psnr(decoded, ref["image"][0]),
                                                       _psnr(float_pixels, ref["image"][0])]}
    return out


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


class float_path:
    """Within: the latent codec runs the published weights in plain float32 (layers.set_exact(False))."""

    def __init__(self, codec):
        self.codec = codec

    def __enter__(self):
        from diffo.layers import set_exact

        set_exact(self.codec, False)

    def __exit__(self, *exc):
        from diffo.layers import set_exact

        set_exact(self.codec, True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result = compare(args.run)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
