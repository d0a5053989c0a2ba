"""The ComfyUI nodes, imported the way ComfyUI imports the plugin (by file path, relative imports only)."""

import ast
import math

import pytest
import torch

from conftest import ROOT

WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}
CUSTOM_TYPES = {"DIFFO_MODEL", "DIFFO_BITSTREAM", "DIFFO_LATENT", "DIFFO_CONTROL"}
CORE_TYPES = {"IMAGE", "LATENT", "INT", "FLOAT", "STRING", "BOOLEAN"}


def test_plugin_registers_every_node_with_its_web_extension(plugin):
    assert len(plugin.NODE_CLASS_MAPPINGS) == 16
    assert set(plugin.NODE_CLASS_MAPPINGS) == set(plugin.NODE_DISPLAY_NAME_MAPPINGS)
    assert (ROOT / plugin.WEB_DIRECTORY / "diffo.js").is_file()
    assert plugin.__name__ == str(ROOT).replace(".", "_x_")  # ComfyUI's module name, not 'diffo' or 'nodes'


def test_nodes_hold_no_comfyui_import_outside_comfy_env_and_library_has_none():
    for path in [*(ROOT / "nodes").glob("*.py"), *(ROOT / "diffo").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            comfy = [n for n in names if n.split(".")[0] in ("comfy", "folder_paths", "comfy_api", "server")]
            if path.name != "comfy_env.py":
                assert not comfy, f"{path}: imports {comfy}"
            if path.parent.name == "nodes":  # ComfyUI imports the plugin by path: the library only relatively
                assert not [n for n in names if n.split(".")[0] == "diffo"], f"{path}: absolute diffo import"


@pytest.mark.parametrize("key", [
    "DiffOLoadModel", "DiffOEncode", "DiffOSaveBitstream", "DiffOLoadBitstream", "DiffOEntropyDecode", "DiffOControl",
    "DiffOOneStepDenoise", "DiffOLatentToImage", "DiffODecode", "DiffOCompare", "DiffOClassicalCodec",
    "DiffORateSweep"])
def test_node_declaration(plugin, comfy_dirs, key):
    cls = plugin.NODE_CLASS_MAPPINGS[key]
    assert cls.CATEGORY.startswith("DiffO/") and len(cls.DESCRIPTION) > 40 and cls.SEARCH_ALIASES
    assert callable(getattr(cls, cls.FUNCTION))
    outputs = cls.RETURN_TYPES
    assert len(getattr(cls, "RETURN_NAMES", outputs)) == len(outputs)
    assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(outputs)
    assert set(outputs) <= CUSTOM_TYPES | CORE_TYPES
    assert outputs or cls.OUTPUT_NODE
    spec = cls.INPUT_TYPES()
    for section in spec.values():
        for name, (kind, *rest) in section.items():
            opts = rest[0] if rest else {}
            assert opts.get("tooltip"), f"{key}.{name} has no tooltip"
            if isinstance(kind, list):
                assert not kind or opts.get("default", kind[0]) in kind, f"{key}.{name}"
            else:
                assert kind in CUSTOM_TYPES | CORE_TYPES, f"{key}.{name}: {kind}"
            if kind in ("INT", "FLOAT") and "default" in opts:
                assert opts["min"] <= opts["default"] <= opts["max"], f"{key}.{name}"
    # the function takes exactly the declared inputs
    import inspect

    params = set(inspect.signature(getattr(cls, cls.FUNCTION)).parameters) - {"self"}
    assert params == {n for section in spec.values() for n in section}


# ------------------------------------------------------------------------------------------- model loader
def test_loader_shares_one_copy_and_lists_local_models(plugin, comfy_dirs, tiny_model):
    from diffo.hub import EMBEDDED_NAME

    loader = plugin.NODE_CLASS_MAPPINGS["DiffOLoadModel"]
    embedded = f"{EMBEDDED_NAME} (embedded)"
    a = loader().load(embedded, "", "", "cpu", "auto")[0]
    b = loader().load(embedded, "", "", "auto", "float32")[0]
    assert a is b  # two loaders, one model in memory
    tiny_model.save_pretrained(comfy_dirs["models"] / "my-codec")
    (comfy_dirs["models"] / "not-a-model").mkdir()
    choices = loader.INPUT_TYPES()["required"]["model"][0]
    assert "models/diffo/my-codec" in choices and "models/diffo/not-a-model" not in choices
    local = loader().load("models/diffo/my-codec", "", "", "cpu", "auto")[0]
    assert local.fingerprint == tiny_model.fingerprint
    with pytest.raises(ValueError, match="hub_repo_id is empty"):
        loader().load(choices[-1], "  ", "", "cpu", "auto")


def test_auto_device_and_dtype_follow_comfyui(plugin, monkeypatch):
    env = plugin.nodes.comfy_env

    class FakeMM:
        @staticmethod
        def get_torch_device():
            return torch.device("meta")

        @staticmethod
        def should_use_fp16(device):
            return True

    monkeypatch.setattr(env, "IN_COMFYUI", True)
    monkeypatch.setattr(env, "model_management", FakeMM)
    assert env.torch_device("auto") == torch.device("meta")
    assert env.default_dtype(torch.device("meta")) == torch.float16
    assert env.default_dtype(torch.device("cpu")) == torch.float32


def test_progress_bar_is_drawn_and_cancel_stops_the_work(plugin, monkeypatch, tiny_model):
    env = plugin.nodes.comfy_env
    drawn, checks = [], []

    class Bar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total):
            drawn.append((value, total))

    class Interrupted(Exception):
        pass

    class FakeMM:
        @staticmethod
        def throw_exception_if_processing_interrupted():
            checks.append(1)
            if len(checks) > 2:
                raise Interrupted

    monkeypatch.setattr(env, "IN_COMFYUI", True)
    monkeypatch.setattr(env, "comfy_utils", type("U", (), {"ProgressBar": Bar}))
    monkeypatch.setattr(env, "model_management", FakeMM)
    encode = plugin.NODE_CLASS_MAPPINGS["DiffOEncode"]()
    images = torch.rand(3, 32, 40, 3)
    with pytest.raises(Interrupted):
        encode.encode(images, tiny_model, "rate level", 0.1, 0.3, 4096, 0, -1.0)
    assert drawn == [(1, 3)]  # the first image was coded and drawn, then Cancel stopped the batch


# ------------------------------------------------------------------------------------------- encode / files
def test_encode_batch_modes_and_bad_images(plugin, tiny_model):
    from diffo import pipeline

    encode = plugin.NODE_CLASS_MAPPINGS["DiffOEncode"]()
    torch.manual_seed(1)
    images = torch.rand(2, 48, 64, 3)
    streams, total, bpp = encode.encode(images, tiny_model, "rate level", 0.1, 0.6, 4096, 7, -1.0)
    assert len(streams) == 2 and total == sum(map(len, streams))
    assert math.isclose(bpp, 8 * total / 2 / (48 * 64))
    for s, img in zip(streams, images):  # the node's stream is the library's stream
        assert s == pipeline.encode(tiny_model, img.permute(2, 0, 1), rate=0.6, seed=7)
    small, *_ = encode.encode(images[:1], tiny_model, "max bytes", 0.1, 0.6, 200, 0, -1.0)
    assert len(small[0]) <= 200
    with pytest.raises(ValueError, match="alpha channel"):
        encode.encode(torch.rand(1, 8, 8, 4), tiny_model, "rate level", 0.1, 0.5, 4096, 0, -1.0)
    gray, *_ = encode.encode(torch.rand(1, 8, 8, 1), tiny_model, "rate level", 0.1, 0.5, 4096, 0, -1.0)
    assert pipeline.read_header(gray[0]).width == 8


def test_save_never_overwrites_and_stays_in_the_output_folder(plugin, comfy_dirs, tiny_model):
    files = plugin.nodes.files
    save = plugin.NODE_CLASS_MAPPINGS["DiffOSaveBitstream"]()
    from diffo import pipeline

    streams = plugin.nodes.types.Bitstreams(pipeline.encode(tiny_model, torch.rand(3, 16, 16), rate=r) for r in (0, 1))
    folder = comfy_dirs["output"] / "sub"
    folder.mkdir()
    (folder / "x_00001.diffo").write_bytes(b"user's file")
    ui = save.save(streams, "sub/x")["ui"]["text"]
    assert (folder / "x_00001.diffo").read_bytes() == b"user's file"
    assert (folder / "x_00002.diffo").read_bytes() == streams[0]
    assert (folder / "x_00003.diffo").read_bytes() == streams[1]
    assert ui[0].startswith(f"sub/x_00002.diffo: {len(streams[0])} bytes") and "bpp" in ui[0]
    for bad in ("../escape", "/tmp/abs"):
        with pytest.raises(ValueError, match="outside"):
            save.save(streams, bad)
    assert files.next_free_path(comfy_dirs["output"], "fresh").name == "fresh_00001.diffo"


def test_save_on_a_full_disk_leaves_no_partial_file_and_names_the_file(plugin, comfy_dirs, tiny_model,
                                                                       monkeypatch):
    import errno
    import os
    import stat

    from diffo import fileio, pipeline

    save = plugin.NODE_CLASS_MAPPINGS["DiffOSaveBitstream"]()
    streams = plugin.nodes.types.Bitstreams(pipeline.encode(tiny_model, torch.rand(3, 16, 16), rate=r) for r in (0, 1))
    out = comfy_dirs["output"]
    (out / "full_00001.diffo").write_bytes(b"user's file")
    real_fsync, calls = fileio.os.fsync, []

    def disk_fills_on_the_second_file(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):  # file data, not the folder's entry
            calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", disk_fills_on_the_second_file)
    with pytest.raises(OSError, match=r"could not save .*full_00003\.diffo: No space left on device .*"
                                      r"already saved: full_00002\.diffo") as err:
        save.save(streams, "full")
    assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in out.iterdir()) == ["full_00001.diffo", "full_00002.diffo"]  # no temp, no partial
    assert (out / "full_00001.diffo").read_bytes() == b"user's file"
    assert (out / "full_00002.diffo").read_bytes() == streams[0]


def test_load_bitstream_reads_only_the_input_folder(plugin, comfy_dirs, tmp_path):
    load_cls = plugin.NODE_CLASS_MAPPINGS["DiffOLoadBitstream"]
    sub = comfy_dirs["input"] / "streams"
    sub.mkdir()
    (sub / "copy.diffo").write_bytes((comfy_dirs["input"] / "diffo_example.diffo").read_bytes())
    choices = load_cls.INPUT_TYPES()["required"]["bitstream_file"][0]
    assert choices == ["diffo_example.diffo", "streams/copy.diffo"]
    streams, info = load_cls().load("streams/copy.diffo")
    assert streams[0] == (sub / "copy.diffo").read_bytes() and "bpp" in info
    outside = tmp_path / "secret.diffo"
    outside.write_bytes(streams[0])
    for bad in ("../secret.diffo", str(outside)):
        assert "outside" in load_cls.VALIDATE_INPUTS(bad)
        with pytest.raises(ValueError, match="outside"):
            load_cls().load(bad)
    assert "no .diffo file" in load_cls.VALIDATE_INPUTS("missing.diffo")
    assert load_cls.VALIDATE_INPUTS("diffo_example.diffo") is True
    (comfy_dirs["input"] / "broken.diffo").write_bytes(streams[0][:20])
    # the plugin's own copy of the library (ComfyUI imports it under the plugin's package)
    with pytest.raises(plugin.diffo.errors.BitstreamError, match="broken.diffo: truncated"):
        load_cls().load("broken.diffo")


def test_is_changed_follows_the_file_content(plugin, comfy_dirs):
    load_cls = plugin.NODE_CLASS_MAPPINGS["DiffOLoadBitstream"]
    path = comfy_dirs["input"] / "diffo_example.diffo"
    before = load_cls.IS_CHANGED("diffo_example.diffo")
    path.write_bytes(path.read_bytes() + b"\0")
    assert load_cls.IS_CHANGED("diffo_example.diffo") != before


# ------------------------------------------------------------------------------------------- decoder blocks
def _chain(plugin, model, streams, strength=-1.0, seed=-1):
    m = plugin.NODE_CLASS_MAPPINGS
    coded = m["DiffOEntropyDecode"]().run(streams, model)[0]
    control = m["DiffOControl"]().run(coded, model)[0]
    latent = m["DiffOOneStepDenoise"]().run(control, model, strength, seed)[0]
    return latent, m["DiffOLatentToImage"]().run(latent, model)[0]


def test_split_decoder_equals_decode_node_and_library(plugin, tiny_model):
    from diffo import pipeline

    torch.manual_seed(2)
    streams = plugin.nodes.types.Bitstreams(
        [pipeline.encode(tiny_model, torch.rand(3, 40, 72), rate=0.7, seed=3) for _ in range(2)])
    decode = plugin.NODE_CLASS_MAPPINGS["DiffODecode"]()
    latent, image = _chain(plugin, tiny_model, streams)
    assert torch.equal(image, decode.run(streams, tiny_model, -1.0, -1, True)[0])
    assert torch.equal(image[1], pipeline.decode(tiny_model, streams[1]).permute(1, 2, 0))
    assert latent["samples"].shape == (2, tiny_model.latent_channels, 64 // 8, 128 // 8)  # padded to 64
    assert latent["diffo_sizes"] == [(40, 72), (40, 72)]
    # overrides on the denoiser re-run the control with the new noise, as DiffO Decode does
    _, over = _chain(plugin, tiny_model, streams, 0.9, 5)
    assert torch.equal(over, decode.run(streams, tiny_model, 0.9, 5, True)[0])
    assert not torch.equal(over, image)
    plain = decode.run(streams, tiny_model, -1.0, -1, False)[0]
    assert torch.equal(plain[0], pipeline.decode(tiny_model, streams[0], denoise=False).permute(1, 2, 0))


def test_latent_is_in_vae_units_and_crop_follows_core_resizes(plugin, tiny_model):
    from diffo import pipeline

    stream = pipeline.encode(tiny_model, torch.rand(3, 40, 72), rate=0.5)
    latent, image = _chain(plugin, tiny_model, plugin.nodes.types.Bitstreams([stream]))
    bs, c_hat = pipeline.entropy_decode(tiny_model, stream)
    z0 = pipeline.latent_from_c_hat(tiny_model, c_hat, bs.strength, bs.seed)
    assert torch.equal(latent["samples"], z0 / tiny_model.vae.config.scaling_factor)
    to_image = plugin.NODE_CLASS_MAPPINGS["DiffOLatentToImage"]()
    doubled = {**latent, "samples": torch.nn.functional.interpolate(latent["samples"], scale_factor=2.0)}
    assert to_image.run(doubled, tiny_model)[0].shape == (1, 80, 144, 3)
    bare = {"samples": latent["samples"]}  # a LATENT from elsewhere: decoded whole
    assert to_image.run(bare, tiny_model)[0].shape == (1, 64, 128, 3)
    with pytest.raises(ValueError, match="channels"):
        to_image.run({"samples": torch.zeros(1, 3, 8, 8)}, tiny_model)


def test_streams_of_other_sizes_or_models_fail_with_what_to_do(plugin, tiny_model, embedded_model):
    from diffo import pipeline

    ModelMismatchError = plugin.diffo.errors.ModelMismatchError
    streams = plugin.nodes.types.Bitstreams([pipeline.encode(tiny_model, torch.rand(3, 16, 16), rate=0),
                                             pipeline.encode(tiny_model, torch.rand(3, 16, 24), rate=0)])
    decode = plugin.NODE_CLASS_MAPPINGS["DiffODecode"]()
    with pytest.raises(ValueError, match="different sizes.*separate nodes"):
        decode.run(streams, tiny_model, -1.0, -1, True)
    with pytest.raises(ModelMismatchError, match=f"made by model {tiny_model.fingerprint.hex()}.*load the model"):
        decode.run(streams[:1], embedded_model, -1.0, -1, True)


# ------------------------------------------------------------------------------------------- compare nodes
def test_compare_reports_figures_and_draws_them(plugin, photo):
    compare = plugin.NODE_CLASS_MAPPINGS["DiffOCompare"]()
    original = photo.permute(1, 2, 0)[None]
    noisy = (original + 0.05 * torch.randn_like(original)).clamp(0, 1)
    out = compare.run(original, noisy, "noise", bpp=0.25)
    report, sheet = out["result"]
    assert out["ui"]["text"] == [report]
    assert report.startswith("noise image 1: 512x600, 0.2500 bpp, PSNR 2")
    h, w = photo.shape[1:]
    assert sheet.shape[0] == 1 and sheet.shape[2] == 2 * w and sheet.shape[1] > h
    same = compare.run(original, original, "same")["result"][0]
    assert "PSNR inf dB" in same and "MS-SSIM 1.0000" in same
    with pytest.raises(ValueError, match="original is 512x600 but the reconstruction is 512x100"):
        compare.run(original, original[:, :100], "x")


def test_classical_codec_node_fits_the_target(plugin, photo):
    node = plugin.NODE_CLASS_MAPPINGS["DiffOClassicalCodec"]()
    original = photo.permute(1, 2, 0)[None]
    image, bpp, n_bytes = node.run(original, "JPEG 2000", 0.05)
    assert image.shape == original.shape and bpp <= 0.05 and n_bytes == round(bpp * 512 * 600 / 8)
    with pytest.raises(plugin.diffo.tools.classical.TargetUnreachable, match="JPEG cannot reach 0.01 bpp"):
        node.run(original, "JPEG", 0.01)


def test_decode_progress_counts_every_tile_and_ends_full(plugin, monkeypatch, tiny_model):
    from diffo import pipeline

    env = plugin.nodes.comfy_env
    drawn = []

    class Bar:
        def __init__(self, total):
            pass

        def update_absolute(self, value, total):
            drawn.append((value, total))

    monkeypatch.setattr(env, "IN_COMFYUI", True)
    monkeypatch.setattr(env, "comfy_utils", type("U", (), {"ProgressBar": Bar}))
    monkeypatch.setattr(env, "model_management", type("M", (), {
        "throw_exception_if_processing_interrupted": staticmethod(lambda: None)}))
    streams = plugin.nodes.types.Bitstreams([pipeline.encode(tiny_model, torch.rand(3, 40, 1000), rate=0.4),
                                             pipeline.encode(tiny_model, torch.rand(3, 40, 1000), rate=0.0)])
    plugin.NODE_CLASS_MAPPINGS["DiffODecode"]().run(streams, tiny_model, -1.0, -1, True)
    total = drawn[-1][1]
    assert total == 2 * (2 + 2)  # per stream: entropy decoding, 2 denoiser tiles (1000 px: latent 128 wide), VAE
    assert [v for v, _ in drawn] == list(range(1, total + 1))
