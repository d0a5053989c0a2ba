"""The fast latent decoder: shapes, tiles equal to one pass, saving with a DiffoCodec, thread-count determinism."""

import pytest
import torch

from diffo.models.diffo.codec import DiffoCodec
from diffo.models.diffo.fast_decoder import FastLatentDecoder


def _random(seed=0, **config) -> FastLatentDecoder:
    torch.manual_seed(seed)
    dec = FastLatentDecoder(**config)
    for p in dec.parameters():  # larger than the init, so that any context a tile lacks shows
        p.data.normal_(0, 0.08)
    return dec.eval()


@pytest.mark.parametrize("config", [{}, {"channels": (32, 16, 8, 8), "blocks": (1, 0, 0, 1), "shuffle": 1}])
def test_upsamples_by_the_vaes_factor(config):
    dec = _random(**config)
    assert dec.scale == 8
    with torch.no_grad():
        assert dec(torch.randn(2, 4, 5, 7)).shape == (2, 3, 40, 56)


def test_mismatched_config_is_refused():
    with pytest.raises(ValueError, match="one entry per resolution"):
        FastLatentDecoder(channels=(8, 8), blocks=(1,))


@torch.no_grad()
def test_tiles_give_the_one_pass_result_and_too_little_overlap_would_not():
    dec = _random()
    raw = torch.randn(1, 4, 70, 130)
    whole = dec(raw)
    tiled = dec.decode(raw, tile=32, overlap=16)
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().max() <= 1e-5 * whole.abs().max()  # float rounding only
    assert (dec.decode(raw, tile=32, overlap=4) - whole).abs().max() > 1e-2 * whole.abs().max()


def test_a_codec_with_a_fast_decoder_saves_loads_and_decodes_with_it(tmp_path):
    model = DiffoCodec.from_preset("tiny")
    fp_before = model.fingerprint
    dec = model.add_fast_decoder(channels=(16, 8, 8), blocks=(1, 0, 1))
    assert model.fingerprint != fp_before and model.config.decoder_config["channels"] == (16, 8, 8)
    model.update()
    model.save_pretrained(tmp_path / "m")
    loaded = DiffoCodec.from_pretrained(tmp_path / "m")
    assert loaded.fingerprint == model.fingerprint
    for k, v in dec.state_dict().items():
        assert torch.equal(v, loaded.decoder.state_dict()[k]), k
    lat = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        out = loaded.decode_latent(lat)
        raw = lat / loaded.vae.config.scaling_factor
        assert torch.equal(out, ((loaded.decoder(raw) + 1) / 2).clamp(0, 1))


def test_a_model_without_the_key_keeps_its_fingerprint():
    """Models published before `decoder_config` existed keep the fingerprint their files carry."""
    from diffo.models.base import fingerprint_of

    model = DiffoCodec.from_preset("tiny")
    state = model.state_dict()
    config = {k: v for k, v in dict(model.config).items() if k != "decoder_config"}
    assert fingerprint_of(config, state) == fingerprint_of(model.config, state)


@torch.no_grad()
def test_the_same_pixels_for_one_and_two_threads_in_the_reproducible_setting():
    from diffo import pipeline

    dec = _random(1)
    raw = torch.randn(1, 4, 40, 56)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with pipeline.reproducible():
                outs.append(dec.decode(raw, tile=24, overlap=16))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
