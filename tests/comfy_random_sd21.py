"""Writes a random-weight SD 2.1-base checkpoint in the original single-file layout, with ComfyUI's own classes,
so that ComfyUI's Load Checkpoint detects it as SD 2.x (epsilon) and gives MODEL, CLIP and VAE. Run with
ComfyUI's Python:  COMFY_PYTHON tests/comfy_random_sd21.py COMFYUI_PATH OUT.safetensors

Every tensor is filled (ComfyUI does not initialise weights): weights N(0, 0.02), norm scales 1, biases 0
(ComfyUI reads a spread above ~0.09 in a LayerNorm bias as v-prediction). Float16, about 2.6 GB."""

import sys

import torch


def fill(state: dict, gen: torch.Generator) -> dict:
    out = {}
    for k, v in state.items():
        if k.endswith("bias") or "positional_embedding" in k:
            t = torch.zeros(v.shape)
        elif v.dim() == 1 and ("norm" in k or "ln_" in k):
            t = torch.ones(v.shape)
        elif v.dim() == 0:
            t = torch.tensor(4.6052)  # logit_scale
        else:
            t = torch.randn(v.shape, generator=gen) * 0.02
        out[k] = t.half().contiguous()
    return out


def main(comfy: str, out: str) -> None:
    sys.path.insert(0, comfy)
    sys.argv = sys.argv[:1] + ["--cpu"]  # ComfyUI's modules read its command line when imported
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    gen = torch.Generator().manual_seed(0)
    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                     channel_mult=[1, 2, 4, 4], use_spatial_transformer=True, use_linear_in_transformer=True,
                     transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                     transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], context_dim=1024,
                     num_head_channels=64, legacy=False, adm_in_channels=None, device="meta",
                     operations=comfy.ops.disable_weight_init)
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    vae = AutoencoderKL(ddconfig=dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                                      ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0),
                        embed_dim=4)
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    w, layers, p = 1024, 24, "cond_stage_model.model."
    text = {p + "token_embedding.weight": torch.empty(49408, w), p + "positional_embedding": torch.empty(77, w),
            p + "ln_final.weight": torch.empty(w), p + "ln_final.bias": torch.empty(w),
            p + "text_projection": torch.empty(w, w), p + "logit_scale": torch.empty(())}
    for i in range(layers):
        b = f"{p}transformer.resblocks.{i}."
        text.update({b + "ln_1.weight": torch.empty(w), b + "ln_1.bias": torch.empty(w),
                     b + "attn.in_proj_weight": torch.empty(3 * w, w), b + "attn.in_proj_bias": torch.empty(3 * w),
                     b + "attn.out_proj.weight": torch.empty(w, w), b + "attn.out_proj.bias": torch.empty(w),
                     b + "ln_2.weight": torch.empty(w), b + "ln_2.bias": torch.empty(w),
                     b + "mlp.c_fc.weight": torch.empty(4 * w, w), b + "mlp.c_fc.bias": torch.empty(4 * w),
                     b + "mlp.c_proj.weight": torch.empty(w, 4 * w), b + "mlp.c_proj.bias": torch.empty(w)})
    sd.update(text)
    from safetensors.torch import save_file

    save_file(fill(sd, gen), out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
