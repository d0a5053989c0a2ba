"""Model blocks: shapes, the integer-exact entropy path, the noise map, the 'sd' scale from a diffusers checkpoint."""

import json

import pytest
import torch

from diffo.models.diffo.codec import DiffoCodec
from diffo.errors import ModelLoadError
from diffo.models.diffo.latent_codec import MAX_RATE_Q
from diffo.layers import ExactConv2d
from diffo.models.diffo.noise import check_noise_map, strength_for_rate


def test_forward_shapes_and_likelihoods(tiny_model):
    from diffo.training import entropy_models

    lat = torch.randn(2, 4, 16, 24)
    tiny_model.latent_codec.train()
    entropy_models.trainable(tiny_model.latent_codec)  # likelihoods are training's (CompressAI's models)
    try:
        out = tiny_model.latent_codec(lat, 30000)
        base_only = tiny_model.latent_codec(lat, 0)
    finally:
        entropy_models.runtime(tiny_model.latent_codec)
        tiny_model.latent_codec.eval()
    assert out.c_hat.shape == lat.shape
    assert set(out.likelihoods) == {"indices", "y", "z"}
    assert set(base_only.likelihoods) == {"indices"}


def test_run_time_models_refuse_training_work_naming_the_fix(tiny_model):
    from diffo.errors import MissingExtraError

    with pytest.raises(MissingExtraError, match="trainable"):
        tiny_model.latent_codec(torch.randn(1, 4, 16, 16), 30000)


def test_exact_conv_is_independent_of_batch_and_threads():
    torch.manual_seed(1)
    conv = ExactConv2d(8, 16, 3, padding=1).eval()
    x = torch.round(torch.randn(4, 8, 12, 12) * 256) / 256
    full = conv(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = torch.cat([conv(x[i:i + 1]) for i in range(4)])
    finally:
        torch.set_num_threads(threads)
    assert full.dtype == torch.float64
    assert torch.equal(full, single)
    # values are on the activation grid
    assert torch.equal(full * 256, torch.round(full * 256))


def test_residual_strings_do_not_depend_on_batch(tiny_model):
    torch.manual_seed(2)
    lat = torch.randn(4, 4, 16, 16)
    lc = tiny_model.latent_codec
    strings, idx = lc.compress_base(lat, (16, 15))
    z4, y4 = lc.compress_residual(lat, idx, 40000, (16, 15))
    for i in range(4):
        z1, y1 = lc.compress_residual(lat[i:i + 1], idx[i:i + 1], 40000, (16, 15))
        assert (z1[0], y1[0]) == (z4[i], y4[i])
    c4 = lc.decompress([(strings[i], z4[i], y4[i]) for i in range(4)], (16, 16), 40000, (16, 15))
    c1 = lc.decompress([(strings[0], z4[0], y4[0])], (16, 16), 40000, (16, 15))
    assert torch.allclose(c4[:1], c1, atol=1e-5)


def test_gain_interpolation_is_exact_and_on_the_grid(tiny_model):
    r = tiny_model.latent_codec.residual
    grid = 2.0 ** 12
    for q in (1, 10000, 30000, MAX_RATE_Q):
        g = r.gain(q)
        assert g.dtype == torch.float64
        assert torch.equal(g * grid, torch.round(g * grid)), q  # on the weight grid: exact products later
        assert torch.equal(g, r.gain(q))
    # level 1 is (within one grid step) the first learned gain, the top level exactly the last one
    learned = r.gains.detach().double()
    assert torch.allclose(r.gain(1), learned[0], atol=2 / grid)
    assert torch.allclose(r.gain(MAX_RATE_Q), learned[-1], atol=1 / grid)
    with pytest.raises(ValueError):
        r.gain(0)


def test_rate_search_reuses_the_residual_analysis(tiny_model):
    """Strings from a shared analysis equal strings computed from scratch, level by level."""
    torch.manual_seed(6)
    lat = torch.randn(1, 4, 16, 16)
    lc = tiny_model.latent_codec
    _, idx = lc.compress_base(lat, (14, 16))
    shared = lc.analyse_residual(lat, idx, (14, 16))
    for q in (1, 20000, MAX_RATE_Q):
        assert lc.compress_residual(lat, idx, q, (14, 16), shared) == lc.compress_residual(lat, idx, q, (14, 16))


def test_noise_map_validation():
    check_noise_map([0.0, 1.0], [0.5, 0.15])
    assert strength_for_rate(0.0, [0, 1], [0.5, 0.1]) == 0.5
    assert strength_for_rate(1.0, [0, 1], [0.5, 0.1]) == pytest.approx(0.1)
    levels = [strength_for_rate(r / 10, [0, 0.5, 1], [0.6, 0.3, 0.1]) for r in range(11)]
    assert levels == sorted(levels, reverse=True)
    for rates, strengths in [([0, 1], [0.1, 0.5]), ([0.2, 1], [0.5, 0.1]), ([0, 1], [1.5, 0.1])]:
        with pytest.raises(ValueError):
            check_noise_map(rates, strengths)


def test_save_and_load_round_trip(tiny_model, tmp_path):
    folder = tiny_model.save_pretrained(tmp_path / "m", model_card="# card")
    loaded = DiffoCodec.from_pretrained(folder)
    assert loaded.fingerprint == tiny_model.fingerprint
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_unbuilt_tables_refuse_to_save(tmp_path):
    with pytest.raises(ValueError, match="update"):
        DiffoCodec.from_preset("tiny").save_pretrained(tmp_path / "x")


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        DiffoCodec.from_preset("huge")


def test_sd_scale_from_diffusers_checkpoint(sd_checkpoint, tmp_path):
    from diffusers import UNet2DConditionModel

    from diffo import pipeline

    model = DiffoCodec.from_sd(sd_checkpoint, latent_codec_config=dict(hidden=16, code_dim=4, codebook_size=16,
                                                                        y_channels=8, z_channels=8, num_gains=2))
    assert model.config.prediction_type == "v_prediction"
    assert model.denoiser.prompt_embeds.shape == (1, 77, 32)
    ref = UNet2DConditionModel.from_pretrained(sd_checkpoint / "unet")
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.denoiser.unet.state_dict()[k]), k
    # the control module starts as a copy of the UNet's encoder
    assert torch.equal(model.denoiser.controlnet.conv_in.weight, ref.conv_in.weight)
    model.eval().update()
    img = torch.rand(3, 40, 56)
    data = pipeline.encode(model, img, rate=0.5)
    out = pipeline.decode(model, data)
    assert out.shape == img.shape
    loaded = DiffoCodec.from_pretrained(model.save_pretrained(tmp_path / "sd"))
    assert torch.equal(pipeline.decode(loaded, data), out)


def test_wrong_class_in_config(tmp_path, tiny_model):
    folder = tiny_model.save_pretrained(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["_class_name"] = "UNet2DModel"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="not a DiffO model"):
        DiffoCodec.from_pretrained(folder)


def test_fresh_tiny_denoiser_starts_as_identity():
    torch.manual_seed(0)
    m = DiffoCodec.from_preset("tiny").eval()
    c_hat = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        out = m.denoise(m.control(c_hat, 0.5, torch.randn_like(c_hat)))
    assert torch.equal(out, c_hat)


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction", "residual"])
def test_prediction_types_recover_the_clean_latent(prediction_type):
    """With the ideal network output, every parametrisation gives back the clean latent."""
    from diffo.models.diffo.denoiser import ControlOutput

    torch.manual_seed(0)
    m = DiffoCodec.from_preset("tiny", prediction_type=prediction_type).eval()
    den = m.denoiser
    z0, c_hat, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = torch.tensor([400])
    a = den.alphas_cumprod[t][:, None, None, None]
    x_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
    ideal = {"sample": z0, "epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * z0,
             "residual": z0 - c_hat}[prediction_type]
    den.unet.forward = lambda *args, **kw: (ideal,)
    ctrl = ControlOutput(x_t, t, c_hat, (), None)
    assert torch.allclose(den.denoise(ctrl), z0, atol=1e-5)
