"""DiffO's 'sd' scale on the user's own checkpoint (nodes/checkpoint.py): only the codec weights are loaded, the
core MODEL is patched with the ControlNet's residuals as ComfyUI's `control`, and one core sampling step from the
node's LATENT, NOISE and SIGMAS gives the library's decode. A tiny configuration with Stable Diffusion's UNet
structure and random weights stands in for SD 2.1 (test_comfyui.py runs the real ComfyUI)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from comfy_model import FakeModelPatcher, FakeVAE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from osdiff_equivalence import our_config  # noqa: E402

pytest.importorskip("compressai", reason="SKIPPED LOUDLY: building the entropy tables needs CompressAI (the train "
                                         "extra); the README's install line adds it")


@pytest.fixture(scope="module")
def sd_tiny(tmp_path_factory):
    """A DiffO model at the 'sd' scale's structure (SD's UNet blocks, epsilon prediction), tiny, saved."""
    from diffo.models.diffo.codec import TINY_LATENT_CODEC, DiffoCodec

    meta = json.loads((ROOT / "tests" / "fixtures" / "osdiff_tiny" / "reference.json").read_text())
    cfg = our_config(meta["config"])
    torch.manual_seed(0)
    model = DiffoCodec(vae_config=cfg["vae_config"], unet_config=cfg["unet_config"],
                       latent_codec_config=TINY_LATENT_CODEC, prediction_type="epsilon", prompt_length=3,
                       control_embedding_channels=16, noise_rates=[0.0, 1.0], noise_strengths=[0.6, 0.2],
                       name="diffo-sd-tiny")
    cn = model.denoiser.controlnet
    with torch.no_grad():  # the zero-initialised joins would hide a wrongly routed residual
        for block in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            block.weight.normal_(0, 0.05)
        model.denoiser.prompt_embeds.normal_()
    model.update()
    folder = tmp_path_factory.mktemp("diffo_sd") / "diffo-sd-tiny"
    model.save_pretrained(folder)
    return folder, DiffoCodec.from_pretrained(folder).eval()


def test_the_codec_parts_hold_no_backbone_and_carry_the_models_fingerprint(plugin, sd_tiny):
    folder, model = sd_tiny
    parts = plugin.nodes.checkpoint.load_parts(str(folder))
    assert parts.family == "diffo" and type(parts).__name__ == "DiffoCodecParts"
    assert parts.fingerprint == model.fingerprint
    assert not any(n.startswith(("denoiser.unet.", "vae.")) for n, _ in parts.named_parameters())
    assert sum(p.numel() for p in parts.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())


def test_one_core_step_on_the_patched_model_gives_the_library_decode(plugin, sd_tiny):
    from diffo import pipeline

    folder, model = sd_tiny
    m = plugin.NODE_CLASS_MAPPINGS
    parts = plugin.nodes.checkpoint.load_parts(str(folder))
    image = torch.rand(1, 64, 96, 3)
    streams = m["DiffOCompressWithVAE"]().compress(image, FakeVAE(model), parts, 7, rate=0.5)[0]
    assert streams[0] == pipeline.encode(model, image[0].permute(2, 0, 1), rate=0.5, seed=7)
    base = FakeModelPatcher(model.denoiser.unet, dict(model.denoiser.unet.config), parts.latent_scale)
    bs, c_hat = pipeline.entropy_decode(model, streams[0])
    for strength in (-1.0, 0.3):
        patched, positive, latent, noise, sigmas = m["DiffOApplyToModel"]().apply(base, parts, streams, strength)
        assert base.model_options == {"transformer_options": {}}  # the input MODEL is untouched
        s = bs.strength if strength < 0 else strength
        t = model.timestep_for_strength(s)
        assert torch.equal(sigmas, torch.stack([base.sampling.sigmas[t], torch.zeros(())]))
        with torch.no_grad():
            z0 = patched.sample_one_step(latent, positive, noise, sigmas)
            ref = pipeline.latent_from_c_hat(model, c_hat, s, bs.seed)
        assert torch.allclose(z0, ref, atol=1e-4 * float(ref.abs().max())), float((z0 - ref).abs().max())
    # the control module matters: without it the step gives something else
    plain = base.clone()
    plain.set_model_unet_function_wrapper(lambda apply_model, a: apply_model(a["input"], a["timestep"], **a["c"]))
    with torch.no_grad():
        z_plain = plain.sample_one_step(latent, positive, noise, sigmas)
    assert (z_plain - ref).abs().max() > 1e-2 * float(ref.abs().max())


def test_residuals_add_to_another_controlnets(plugin, sd_tiny):
    folder, model = sd_tiny
    parts = plugin.nodes.checkpoint.load_parts(str(folder))
    c_hat = torch.randn(1, 4, 16, 16)
    base = FakeModelPatcher(model.denoiser.unet, dict(model.denoiser.unet.config))
    patch = plugin.nodes.checkpoint.DiffoControlPatch(parts, c_hat, base)
    seen = {}

    def apply_model(x, sigma, **c):
        seen.update(c["control"])
        return x

    sigma = base.sampling.sigmas[400:401]
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        down, mid = parts.control(base.sampling.calculate_input(sigma, x), base.sampling.timestep(sigma), c_hat,
                                  parts.prompt_embeds)
    n = len(down)  # one per skip of the UNet (12 for SD)
    other = {"output": [None] * (n - 1) + [torch.ones(1)], "middle": [torch.full((1,), 2.0)], "input": ["kept"]}
    patch.unet_wrapper(apply_model, {"input": x, "timestep": sigma, "c": {"c_crossattn": parts.prompt_embeds,
                                                                             "control": other}})
    assert seen["input"] == ["kept"] and len(seen["output"]) == n
    assert torch.allclose(seen["output"][0], down[0]) and torch.allclose(seen["output"][n - 1], down[n - 1] + 1)
    assert torch.allclose(seen["middle"][0], mid + 2)


def test_a_model_with_its_own_small_unet_or_the_wrong_base_is_refused_clearly(plugin, sd_tiny):
    with pytest.raises(Exception, match="only the 'sd' scale") as err:  # the embedded diffo-tiny
        plugin.nodes.checkpoint.load_parts(str(ROOT / "diffo" / "weights" / "diffo-tiny"))
    assert type(err.value).__name__ == "ModelLoadError"  # the plugin's own copy of diffo.errors
    folder, model = sd_tiny
    parts = plugin.nodes.checkpoint.load_parts(str(folder))
    vpred = FakeModelPatcher(model.denoiser.unet, dict(model.denoiser.unet.config))
    vpred.model.model_type.name = "V_PREDICTION"
    with pytest.raises(ValueError, match="not the base DiffO was trained on: V_PREDICTION prediction"):
        plugin.nodes.checkpoint.check_base_model(vpred, parts)
