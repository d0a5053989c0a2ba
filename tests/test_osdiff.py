"""The OSDiff family: conversion of the official checkpoint layout, equivalence with the authors' code (a tiny
configuration whose reference outputs tools/osdiff_reference.py recorded by running their code), the container,
and every surface (CLI, nodes, Hub) on a converted model. Runs without ../shared and without their code."""

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).with_name("fixtures") / "osdiff_tiny"
sys.path.insert(0, str(ROOT / "tools"))

from osdiff_equivalence import compare, our_config  # noqa: E402

pytest.importorskip("compressai", reason="SKIPPED LOUDLY: converting builds the entropy tables with CompressAI "
                                         "(the train extra); the README's install line adds it")


def write_official_files(folder: Path, edit=None) -> Path:
    """Expand the fixture into the files a user has: lambda_test.ckpt (official layout) and base.safetensors."""
    from safetensors.torch import load_file, save_file

    packed = load_file(FIXTURE / "weights.safetensors")
    official, base = {}, {}
    for k, v in packed.items():
        v = v.float() if v.dtype == torch.float16 else v
        if k.startswith("official/"):
            official[k[len("official/"):]] = v
        elif k.startswith("shape_of/"):
            official[k[len("shape_of/"):]] = torch.zeros(tuple(v.tolist()))
        elif k.startswith("base/"):
            base[k[len("base/"):]] = v
    table = torch.zeros(tuple(packed["token_shape"].tolist()))
    table[[0, 49406, 49407]] = packed["token_rows"].float()
    base["cond_stage_model.model.token_embedding.weight"] = table
    if edit:
        edit(official)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": official, "global_step": 0}, folder / "lambda_test.ckpt")
    save_file(base, folder / "base.safetensors")
    for name in ("reference.safetensors", "reference.json"):
        (folder / name).write_bytes((FIXTURE / name).read_bytes())
    return folder


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return write_official_files(tmp_path_factory.mktemp("osdiff_official"))


@pytest.fixture(scope="module")
def converted(official, tmp_path_factory):
    """The model folder `diffo convert osdiff` writes from the official files (the tiny shapes via config)."""
    from diffo.models.osdiff.convert import convert_osdiff

    meta = json.loads((FIXTURE / "reference.json").read_text())
    out = tmp_path_factory.mktemp("osdiff_model") / "osdiff-tiny"
    convert_osdiff(official / "lambda_test.ckpt", official / "base.safetensors", out, config=our_config(meta["config"]))
    return out


@pytest.fixture(scope="module")
def model(converted):
    from diffo.hub import load_model

    return load_model(converted)


# ----------------------------------------------------------------------------------- equivalence
def test_every_stage_matches_the_authors_code(model, official):
    """Measured against their code's outputs (recorded in the fixture). With the reference's float arithmetic our
    latent codec codes the same symbols and decodes the same hint; the exact path (the product) may move a few
    symbols (means on a grid: 21 of 122,880 at full size); the float networks agree to rounding. Tolerances are
    what the tiny and full-size runs reached, with margin (README, "OSDiff: proof of equivalence")."""
    r = compare(official, model)
    assert r["float_path"]["z_symbols_differing"] == 0 and r["float_path"]["y_symbols_differing"] == 0, r
    assert r["float_path"]["hint"]["max_abs"] < 1e-5
    assert r["z_symbols_differing"] == 0 and r["y_symbols_differing"] <= 0.001 * r["y_symbols"], r
    assert r["latent"]["max_abs"] < 1e-5
    assert r["prompt"]["max_abs"] < 1e-5
    assert r["eps"]["max_abs"] < 1e-4
    assert r["x0"]["max_abs"] < 2e-3
    assert r["pixels_from_reference_x0"]["max_abs"] <= 1
    # the hint differs only by the exact grid of the entropy parameters (means on multiples of 2^-10)
    assert r["hint"]["max_abs"] < 0.01 * r["hint"]["ref_max_abs"]
    assert r["pipeline_pixels_truncated"]["max_abs"] <= 3
    assert abs(r["bytes"]["ours"]["y"] - r["bytes"]["reference"]["y"]) <= 0.05 * r["bytes"]["reference"]["y"] + 8


def test_the_prompt_embedding_comes_from_the_base_text_encoder(model):
    from safetensors.torch import load_file

    ref = load_file(FIXTURE / "reference.safetensors")["prompt"]
    assert ref.abs().max() > 0.1  # not a trivially zero embedding
    assert torch.allclose(model.prompt_embeds, ref, atol=1e-5)


# ----------------------------------------------------------------------------------- conversion
def _convert(folder):
    from diffo.models.osdiff.convert import convert_osdiff

    meta = json.loads((FIXTURE / "reference.json").read_text())
    return convert_osdiff(folder / "lambda_test.ckpt", folder / "base.safetensors", config=our_config(meta["config"]))


def test_an_unknown_tensor_is_an_error_naming_it(tmp_path):
    from diffo.errors import ModelLoadError

    folder = write_official_files(tmp_path, lambda s: s.__setitem__("preprocess_model.surprise.weight", torch.zeros(1)))
    with pytest.raises(ModelLoadError, match=r"preprocess_model\.surprise\.weight"):
        _convert(folder)


def test_a_missing_or_misshapen_tensor_is_an_error_naming_it(tmp_path):
    from diffo.errors import ModelLoadError

    key = "control_model.middle_block_out.0.weight"
    folder = write_official_files(tmp_path / "missing", lambda s: s.pop(key))
    with pytest.raises(ModelLoadError, match=r"lacks 1 tensors, e\.g\. control_module\.mid_zero_conv\.weight"):
        _convert(folder)
    folder = write_official_files(tmp_path / "shape", lambda s: s.__setitem__(key, s[key][:, :-1]))
    with pytest.raises(ModelLoadError, match=r"control_module\.mid_zero_conv\.weight is .*expected"):
        _convert(folder)


def test_ignored_tensors_are_listed_by_name(official):
    """The discriminator and the unused SFT branches are in the file and left out by name, nothing else."""
    from diffo.models.osdiff.convert import load_tensors, map_official

    ours, ignored = map_official(load_tensors(official / "lambda_test.ckpt", "test"))
    assert any(k.startswith("guidance_model.") for k in ignored)
    assert any(".h_a7." in k for k in ignored) and any(k.startswith("preprocess_model.f_c.") for k in ignored)
    assert not any(k.startswith("control_model.") for k in ignored)


def test_a_checkpoint_that_needs_unpickling_is_refused(tmp_path):
    from diffo.errors import ModelLoadError
    from diffo.models.osdiff.convert import load_tensors

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": Path("/")}, path)  # a non-tensor object
    with pytest.raises(ModelLoadError, match=r"cannot be loaded safely.*weights_only=True.*safetensors"):
        load_tensors(path, "the OSDiff checkpoint")


def test_a_base_that_is_not_sd21_says_which_file_is_needed():
    from diffo.errors import ModelLoadError
    from diffo.models.osdiff.convert import _diffusers_base

    sd15 = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768)}
    with pytest.raises(ModelLoadError, match=r"768.*SD 1\.x.*SD 2\.1-base"):
        _diffusers_base({**sd15, **{"model.diffusion_model.x": torch.zeros(1)}})
    with pytest.raises(ModelLoadError, match="SDXL"):
        _diffusers_base({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(1)})


def test_cli_convert_writes_a_folder_atomically_and_refuses_to_overwrite(official, tmp_path, monkeypatch):
    from diffo import cli
    from diffo.models.osdiff import convert as conv

    meta = json.loads((FIXTURE / "reference.json").read_text())
    real = conv.convert_osdiff
    monkeypatch.setattr(conv, "convert_osdiff", lambda c, b, o, name=None: real(c, b, o, name=name,
                                                                               config=our_config(meta["config"])))
    out = tmp_path / "models" / "osdiff"
    args = ["convert", "osdiff", "--checkpoint", str(official / "lambda_test.ckpt"), "--base",
            str(official / "base.safetensors"), "--out", str(out)]
    assert cli.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "conversion.json",
                                                      "diffusion_pytorch_model.safetensors"]
    card = (out / "README.md").read_text()
    assert "lambda_test.ckpt" in card and "responsible" in card
    assert cli.main(args) == 2  # exists: refused before any loading
    assert [p.name for p in out.parent.iterdir()] == ["osdiff"]  # no temporary folder left


# ----------------------------------------------------------------------------------- the surfaces
def test_cli_round_trip_and_the_header_names_the_family(converted, tmp_path, capsys):
    from safetensors.torch import load_file

    from diffo import cli
    from diffo.image import to_pil

    img = load_file(FIXTURE / "reference.safetensors")["image"][0]
    src = tmp_path / "in.png"
    to_pil(img).save(src)
    # one rate per checkpoint: no rate mode needed
    assert cli.main(["compress", str(src), "-o", str(tmp_path / "a.diffo"), "--model", str(converted)]) == 0
    assert cli.main(["info", str(tmp_path / "a.diffo")]) == 0
    info = capsys.readouterr().out
    assert re.search(r"family: OSDiff\n", info) and re.search(r"format_version: 3\n", info)
    assert cli.main(["decompress", str(tmp_path / "a.diffo"), "-o", str(tmp_path / "b.png"),
                     "--model", str(converted)]) == 0
    assert (tmp_path / "b.png").is_file()
    # the embedded DiffO model refuses it, naming the family
    capsys.readouterr()
    assert cli.main(["decompress", str(tmp_path / "a.diffo"), "-o", str(tmp_path / "c.png")]) == 2
    assert "made by a OSDiff model" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_a_diffo_model_refuses_an_osdiff_stream_naming_the_family(model, embedded_model):
    from diffo import pipeline
    from diffo.errors import ModelMismatchError

    data = pipeline.encode(model, torch.rand(3, 64, 64), rate=1.0)
    with pytest.raises(ModelMismatchError, match=r"made by a OSDiff model.*is a diffo model"):
        pipeline.decode(embedded_model, data)
    with pytest.raises(ModelMismatchError, match=r"made by a DiffO model.*is a osdiff model"):
        pipeline.decode(model, pipeline.encode(embedded_model, torch.rand(3, 64, 64), rate=0.1))


def test_one_rate_per_checkpoint_rate_and_bpp_choose_nothing_max_bytes_is_checked(model):
    from diffo import pipeline

    img = torch.rand(3, 64, 96)
    a = pipeline.encode(model, img, rate=0.0)
    assert pipeline.encode(model, img, rate=1.0) == a == pipeline.encode(model, img, bpp=0.01)
    assert pipeline.encode(model, img, max_bytes=len(a)) == a
    with pytest.raises(ValueError, match="cannot fit"):
        pipeline.encode(model, img, max_bytes=len(a) - 1)


def test_decoding_is_the_same_for_any_thread_count_and_after_a_reload(model, converted):
    from diffo import pipeline
    from diffo.models import load_codec

    data = pipeline.encode(model, torch.rand(3, 64, 128), rate=1.0, seed=9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pipeline.decode(model, data)
        sym_one = pipeline.decode_symbols(model, data)
        torch.set_num_threads(2)
        two = pipeline.decode(model, data)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    again = load_codec(converted)
    assert again.fingerprint == model.fingerprint
    assert all(torch.equal(a, b) for a, b in zip(sym_one, pipeline.decode_symbols(again, data)))


def test_every_node_runs_the_osdiff_model(plugin, model):
    from diffo import pipeline

    m = plugin.NODE_CLASS_MAPPINGS
    image = torch.rand(1, 64, 96, 3)
    streams = m["DiffOEncode"]().encode(image, model, "rate level", 0.05, 1.0, 0, 4, -1.0)[0]
    decoded = m["DiffODecode"]().run(streams, model, -1.0, -1, True)[0]
    assert decoded.shape == (1, 64, 96, 3)
    assert torch.equal(decoded[0], pipeline.decode(model, streams[0]).permute(1, 2, 0))
    coded = m["DiffOEntropyDecode"]().run(streams, model)[0]
    control = m["DiffOControl"]().run(coded, model)[0]
    latent = m["DiffOOneStepDenoise"]().run(control, model, -1.0, -1)[0]
    assert torch.equal(m["DiffOLatentToImage"]().run(latent, model)[0], decoded)


def test_hub_repo_id_loads_offline_from_the_cache(converted, model, tmp_path, monkeypatch):
    """A converted folder pushed to the Hub loads by repo id from a local cache with HF_HUB_OFFLINE=1."""
    from huggingface_hub import constants  # noqa: F401

    from diffo.hub import load_model

    cache = tmp_path / "hub"
    snap = cache / "models--someone--osdiff-tiny" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in converted.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (cache / "models--someone--osdiff-tiny" / "refs").mkdir()
    (cache / "models--someone--osdiff-tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    got = load_model("someone/osdiff-tiny")
    assert got.family == "osdiff" and got.fingerprint == model.fingerprint


# ----------------------------------------------------------------------------------- format 3 golden stream
def test_golden_format3_stream_decodes_to_the_recorded_symbols(model):
    """tests/fixtures/osdiff_tiny/format3.diffo, written by the converted fixture model: its symbols are exact on
    every machine, and they are the very symbols the authors' code coded for the same image."""
    from safetensors.torch import load_file

    from diffo import pipeline
    from make_golden import sha256

    record = json.loads((FIXTURE / "golden.json").read_text())
    assert model.fingerprint.hex() == record["fingerprint"], "conversion changed: the model's fingerprint moved"
    data = (FIXTURE / "format3.diffo").read_bytes()
    assert sha256(data) == record["stream_sha256"]
    header = pipeline.read_header(data)
    assert (header.format_version, header.family) == (3, 1)
    z, y = pipeline.decode_symbols(model, data)
    assert (sha256(z.contiguous()), sha256(y.contiguous())) == (record["z_symbols_sha256"], record["y_symbols_sha256"])
    ref = load_file(FIXTURE / "reference.safetensors")
    assert torch.equal(y, ref["y_symbols"]) and torch.equal(z.reshape(-1), ref["z_symbols"].reshape(-1))


# ----------------------------------------------------------------------------------- your own checkpoint (nodes)
from comfy_model import FakeModelPatcher, FakeVAE  # noqa: E402
def test_apply_to_model_hooks_give_the_library_decode(plugin, model, converted):
    """The codec-only nodes on an outside UNet (its hooks called as ComfyUI's LDM UNet calls them, one Euler step
    from sigma_max): the same latent as the library's decode with the same weights, within float rounding."""
    from diffo import pipeline

    m = plugin.NODE_CLASS_MAPPINGS
    parts = plugin.nodes.checkpoint.load_parts(str(converted))
    assert parts.fingerprint == model.fingerprint
    assert not any(n.startswith(("unet.", "vae.")) for n, _ in parts.named_parameters())  # no second backbone
    assert sum(p.numel() for p in parts.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())
    image = torch.rand(1, 64, 96, 3)
    streams = m["DiffOCompressWithVAE"]().compress(image, FakeVAE(model), parts, 7)[0]
    assert streams[0] == pipeline.encode(model, image[0].permute(2, 0, 1), rate=1.0, seed=7)
    base = FakeModelPatcher(model.unet, dict(model.unet.config))
    patched, positive, latent, noise, sigmas = m["DiffOApplyToModel"]().apply(base, parts, streams)
    assert base.model_options == {"transformer_options": {}}  # the input MODEL is untouched
    assert torch.equal(sigmas, torch.stack([base.sampling.sigmas[-1], torch.zeros(())]))  # BasicScheduler simple/1
    assert not latent["samples"].any()  # OSDiff starts from pure noise
    with torch.no_grad():
        z0 = patched.sample_one_step(latent, positive, noise, sigmas)
        bs, hint = pipeline.entropy_decode(model, streams[0])
        ref = pipeline.latent_from_c_hat(model, hint, 1.0, bs.seed)
    assert torch.allclose(z0, ref, atol=1e-4 * float(ref.abs().max())), float((z0 - ref).abs().max())
    decoded = model.decode_latent(z0).permute(0, 2, 3, 1)
    cropped = m["DiffOCropToOriginal"]().crop(decoded, streams)[0]
    assert cropped.shape == (1, 64, 96, 3)


def test_apply_to_model_refuses_a_model_that_is_not_the_base(plugin, model, converted):
    parts = plugin.nodes.checkpoint.load_parts(str(converted))
    wrong = FakeModelPatcher(model.unet, {**dict(model.unet.config), "cross_attention_dim": 768})
    with pytest.raises(ValueError, match=r"not the base OSDiff was trained on: prompt width 768"):
        plugin.nodes.checkpoint.check_base_model(wrong, parts)
    vpred = FakeModelPatcher(model.unet, dict(model.unet.config))
    vpred.model.model_type.name = "V_PREDICTION"
    with pytest.raises(ValueError, match="V_PREDICTION prediction"):
        plugin.nodes.checkpoint.check_base_model(vpred, parts)


def test_the_gpu_bench_script_runs_on_the_cpu_at_tiny_size():
    """`bench --parts osdiff` (prepared for a GPU) on the CPU with tiny shapes: every figure is produced."""
    from diffo.tools.bench_osdiff import bench_osdiff

    meta = json.loads((FIXTURE / "reference.json").read_text())
    r = bench_osdiff(repeats=1, force=True, steps=2, config=our_config(meta["config"]), size=(128, 128),
                     tiled=(128, 256))
    assert r["decode_s"] > 0 and r["encode_s"] > 0 and r["2_step_decode_s"] > 0 and r["tiled"]["decode_s"] > 0
    assert r["decode_speedup"] > 0 and r["image"] == "128x128"


def test_loading_and_decoding_under_inference_mode(converted):
    """ComfyUI runs nodes under torch.inference_mode(): tensors made there have no version counter."""
    from diffo import pipeline
    from diffo.models import load_codec
    from diffo.models.osdiff.parts import OSDiffCodecParts

    with torch.inference_mode():
        model = load_codec(converted)
        parts = OSDiffCodecParts.from_dir(converted)
        data = pipeline.encode(model, torch.rand(3, 64, 64), rate=1.0)
        assert torch.equal(pipeline.entropy_decode(parts, data)[1], pipeline.entropy_decode(model, data)[1])


def test_eval_runs_the_osdiff_model(converted, tmp_path):
    """`diffo eval --model OSDIFF_FOLDER`: one rate per checkpoint, so every bpp target gives the same point."""
    pytest.importorskip("pytorch_msssim", reason="SKIPPED LOUDLY: eval's metrics need the eval extra")
    from diffo.image import to_pil
    from diffo.tools import evaluation

    images = tmp_path / "images"
    images.mkdir()
    to_pil(torch.rand(3, 64, 96)).save(images / "a.png")
    ev = evaluation.Evaluation(images=evaluation.list_images(images), bpps=[0.05, 0.1], codecs=["diffo"],
                               out=tmp_path / "run", model_source=str(converted), save_images=False)
    rows = [r for r in evaluation.run(ev) if r["codec"] == "diffo"]
    assert len(rows) == 2 and rows[0]["bpp"] == rows[1]["bpp"] > 0 and (tmp_path / "run" / "summary.md").is_file()


def test_a_weight_outside_the_exact_grid_is_an_error_naming_it(tmp_path):
    from diffo.errors import ModelLoadError

    key = "preprocess_model.entropy_parameters_anchor.0.fusion.0.weight"
    folder = write_official_files(tmp_path, lambda s: s[key].view(-1).__setitem__(0, 9.5))
    with pytest.raises(ModelLoadError, match=r"entropy_parameters_anchor\.0\.0\.weight holds a value of 9\.5"):
        _convert(folder)


def test_codec_parts_refuse_a_latent_of_the_wrong_size(plugin, converted):
    parts = plugin.nodes.checkpoint.load_parts(str(converted))
    with pytest.raises(ValueError, match=r"must be \[1, 4, 8, 16\]"):
        parts.compress(torch.zeros(1, 4, 8, 12), (64, 96))  # not padded to 64: would not decode
