"""`python -m diffo eval` and `bench` plumbing on small synthetic images: bisection, bpp accounting, caching,
metric sanity, BD-rate (no timing assertions: speed lives in the bench command)."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffo import tiling

from diffo.tools import classical, evaluation
from diffo.tools.metrics import MetricUnavailable, learned_metric


def _images(folder, n=2, h=64, w=96):
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        low = torch.rand(1, 3, h // 16, w // 16, generator=g)
        img = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"im{i}.png")
    return folder


@pytest.fixture
def model_dir(tmp_path, tiny_model):
    return tiny_model.save_pretrained(tmp_path / "model")


def test_eval_rows_accounting_cache_and_outputs(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-torch-hub"))  # LPIPS/DISTS weights absent
    images = evaluation.list_images(_images(tmp_path / "imgs"))
    codecs = ["diffo", "diffo-nodenoise", "jpeg2000", "jpeg"]
    ev = evaluation.Evaluation(images=images, bpps=[0.3, 4.0], codecs=codecs, out=tmp_path / "out",
                               model_source=str(model_dir))
    rows = evaluation.run(ev)
    assert len(rows) == 2 * 2 * 4
    with open(tmp_path / "out" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:7] == ["image", "codec", "target_bpp", "bpp", "bytes", "psnr", "ms_ssim"]
    assert {"haarpsi", "gmsd", "note"} <= set(table[0])
    for row in table:
        if row["note"]:  # unreachable: said so, no invented figures
            assert "cannot reach" in row["note"] and row["bpp"] == row["psnr"] == ""
            continue
        assert float(row["bpp"]) == pytest.approx(8 * int(row["bytes"]) / (64 * 96), rel=1e-5)
        if row["codec"] not in evaluation.DIFFO_CODECS:
            assert float(row["bpp"]) <= float(row["target_bpp"])
        assert row["ms_ssim"] == ""  # 64x96 is below MS-SSIM's 161 px: not measured, not made up
    jpeg_low = [r for r in table if r["codec"] == "jpeg" and r["target_bpp"] == "0.3"]
    assert all(r["note"] for r in jpeg_low)  # JPEG's headers alone exceed 0.3 bpp at 64x96
    # DiffO and its ablation decode the very same stream
    by = {(r["image"], r["codec"], r["target_bpp"]): r for r in table}
    for im in ("im0.png", "im1.png"):
        stream = ev.point_path(Path(im), "diffo", 4.0, ".diffo").read_bytes()
        assert int(by[(im, "diffo", "4")]["bytes"]) == int(by[(im, "diffo-nodenoise", "4")]["bytes"]) == len(stream)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| jpeg | 0.3 | 0/2 |" in summary and "LPIPS not measured" in summary and "DISTS not measured" in summary
    assert f"fingerprint `{ev.fingerprint}`" in summary and len(ev.fingerprint) == 16
    assert (tmp_path / "out" / "rd_psnr.png").is_file()
    # resumable: cached points are not computed again
    calls = []
    monkeypatch.setattr(classical, "encode_to_bpp", lambda *a, **k: calls.append(a))
    evaluation.run(evaluation.Evaluation(images=images, bpps=[0.3, 4.0], codecs=codecs, out=tmp_path / "out",
                                         model_source=str(model_dir)))
    assert calls == []
    # another model's DiffO points are measured afresh, never taken from the cache
    from diffo.models.diffo.codec import DiffoCodec

    other = DiffoCodec.from_pretrained(model_dir)
    torch.nn.init.normal_(other.vae.decoder.conv_out.weight, std=0.1)
    other.save_pretrained(tmp_path / "other")
    again = evaluation.run(evaluation.Evaluation(images=images, bpps=[4.0], codecs=["diffo"], out=tmp_path / "out",
                                                 model_source=str(tmp_path / "other")))
    old = {r["image"]: r["psnr"] for r in rows if r["codec"] == "diffo" and r["target_bpp"] == 4.0}
    assert all(r["psnr"] != old[r["image"]] for r in again)


def test_codec_names_are_checked():
    assert evaluation.parse_codecs("diffo, AVIF") == ["diffo", "avif"]
    with pytest.raises(ValueError, match="unknown codec"):
        evaluation.parse_codecs("diffo,bpg")
    assert evaluation.parse_codecs(None)[:2] == ["diffo", "diffo-nodenoise"]


def test_bd_rate_on_known_curves():
    anchor = [(0.05, 25.0), (0.1, 28.0), (0.2, 31.0), (0.4, 34.0)]
    cheaper = [(b * 0.8, q) for b, q in anchor]  # same quality for 20 % fewer bits
    assert evaluation.bd_rate(anchor, cheaper) == pytest.approx(-20.0, abs=1e-6)
    assert evaluation.bd_rate(anchor, anchor) == pytest.approx(0.0, abs=1e-9)
    assert evaluation.bd_rate(anchor, [(0.1, 15.0), (0.2, 16.0)]) is None  # no overlap in quality
    assert evaluation.bd_rate(anchor, [(0.1, 26.0)]) is None  # one point is not a curve


def test_learned_metrics_are_not_measured_without_local_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MetricUnavailable, match="lpips_weights.pt, vgg16-397923af.pth not in"):
        learned_metric("lpips")


def test_ycbcr_conversion_round_trips_within_rounding():
    rgb = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    back = classical.ycbcr_planes_to_rgb(classical.rgb_to_ycbcr_planes(rgb), 16, 24)
    assert np.abs(back.astype(int) - rgb).max() <= 2
    grey = np.full((4, 4, 3), 100, np.uint8)
    planes = np.frombuffer(classical.rgb_to_ycbcr_planes(grey), np.uint8).reshape(3, 4, 4)
    assert (planes[0] == 100).all() and (planes[1:] == 128).all()  # full-range BT.601: grey has neutral chroma


# ---------------------------------------------------------------------------------------------- tiling
def test_windows_cover_the_latent_on_the_unet_grid():
    wins = tiling.latent_windows(200, 96)
    covered = torch.zeros(200, 96, dtype=torch.int)
    for ys, xs in wins:
        covered[ys, xs] += 1
        assert ys.start % 8 == 0 and (ys.stop - ys.start) == tiling.TILE_LATENT
    assert covered.min() >= 1
    assert tiling.latent_windows(96, 64) == [(slice(0, 96), slice(0, 64))]  # Kodak size: one piece


def test_blend_reassembles_a_field_and_keeps_one_tile_exact():
    x = torch.randn(1, 4, 200, 136)
    wins = tiling.latent_windows(200, 136)
    assert len(wins) > 1
    y = tiling.blend(((w, x[..., w[0], w[1]]) for w in wins), (200, 136))
    assert torch.allclose(y, x, atol=1e-6)
    z = torch.randn(1, 4, 64, 64)
    assert tiling.blend([((slice(0, 64), slice(0, 64)), z)], (64, 64)) is z


def test_tiled_image_decodes_identically_through_the_split_nodes(plugin, tiny_model):
    from diffo import pipeline

    img = torch.rand(3, 40, 1000)  # wider than a VAE tile and a denoiser tile
    data = pipeline.encode(tiny_model, img, rate=0.5)
    bs, c_hat = pipeline.entropy_decode(tiny_model, data)
    assert len(tiling.latent_windows(*c_hat.shape[-2:])) > 1
    whole = pipeline.decode(tiny_model, data)
    assert whole.shape == (3, 40, 1000)
    m = plugin.NODE_CLASS_MAPPINGS
    streams = plugin.nodes.types.Bitstreams([data])
    coded = m["DiffOEntropyDecode"]().run(streams, tiny_model)[0]
    ctrl = m["DiffOControl"]().run(coded, tiny_model)[0]
    assert len(ctrl.outputs[0].tiles) > 1
    latent = m["DiffOOneStepDenoise"]().run(ctrl, tiny_model, -1.0, -1)[0]
    image = m["DiffOLatentToImage"]().run(latent, tiny_model)[0]
    assert torch.equal(image[0], whole.permute(1, 2, 0))


# ---------------------------------------------------------------------------------------------- bench
def test_multi_step_sampler_reduces_to_the_one_step_decoder(tiny_model):
    from diffo import pipeline
    from diffo.tools import bench

    data = pipeline.encode(tiny_model, torch.rand(3, 48, 64), rate=0.6)
    bs, c_hat = pipeline.entropy_decode(tiny_model, data)
    one = pipeline.latent_from_c_hat(tiny_model, c_hat, bs.strength, bs.seed)
    assert torch.allclose(bench.multi_step_latent(tiny_model, c_hat, bs.strength, bs.seed, 1), one, atol=1e-5)
    many = bench.multi_step_latent(tiny_model, c_hat, bs.strength, bs.seed, 5)
    assert many.shape == one.shape and torch.isfinite(many).all() and not torch.allclose(many, one)


def test_scaling_runs_each_size_in_its_own_process(model_dir):
    from diffo.tools import bench

    (row,) = bench.bench_scaling([bench._mp_shape(0.01)], str(model_dir))
    assert "error" not in row, row
    w, h = map(int, row["size"].split("x"))
    assert row["decoded"] == [3, h, w] and row["megapixels"] == pytest.approx(h * w / 1e6)
    assert row["peak_rss_mib"] >= row["peak_rss_mib_after_encode"] > 0
    assert math.isfinite(row["decode_s_per_mp"])
    json.dumps(row)


def test_sizes_part_encodes_and_decodes_odd_sizes_to_their_own_size(model_dir):
    from diffo.tools import bench

    shapes = bench.parse_shapes("1x1, 1x37,7x5")
    assert shapes == [(1, 1), (1, 37), (7, 5)]
    rows = bench.bench_scaling(shapes, str(model_dir), "sizes")
    for (w, h), row in zip(shapes, rows):
        assert "error" not in row, row
        assert row["size"] == f"{w}x{h}" and row["decoded"] == [3, h, w] and row["same_size"]
    for bad in ("12", "0x5", "axb"):
        with pytest.raises(ValueError, match="--shapes"):
            bench.parse_shapes(bad)


def test_eval_writes_a_crop_panel_per_image_and_target(tmp_path, model_dir, monkeypatch):
    """Original | DiffO | no-denoise (| AVIF | VVC where reached) on the same zoomed crop, labelled."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-torch-hub"))
    images = evaluation.list_images(_images(tmp_path / "imgs", n=1, h=96, w=160))
    ev = evaluation.Evaluation(images=images, bpps=[2.0], codecs=["diffo", "diffo-nodenoise"],
                               out=tmp_path / "out", model_source=str(model_dir), metrics=["psnr", "niqe"])
    evaluation.run(ev)
    panel = tmp_path / "out" / "panels" / "im0@2.png"
    with Image.open(panel) as im:
        w, h = im.size
    crop = min(evaluation.PANEL_CROP, 96) * evaluation.PANEL_ZOOM
    assert w == 3 * crop and h > crop  # original + the two DiffO decodes, a label band above
    again = evaluation.write_panels(ev, images[0], evaluation.evaluate_image(ev, images[0], None, {}))
    assert again == [panel]  # rebuilt from the cached points and reconstructions, no model needed


def test_texture_window_finds_the_detailed_region():
    img = torch.full((3, 200, 300), 0.5)
    img[:, 120:180, 200:260] = torch.rand(3, 60, 60, generator=torch.Generator().manual_seed(0))
    top, left = evaluation.texture_window(img, 64)
    assert 100 <= top <= 136 and 180 <= left <= 236


def test_eval_shards_share_one_cache_and_the_final_run_writes_the_summary(tmp_path, model_dir, monkeypatch,
                                                                         capsys):
    from diffo.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-torch-hub"))
    folder = _images(tmp_path / "imgs", n=3)
    out = tmp_path / "run"
    common = ["eval", "--images", str(folder), "--out", str(out), "--bpp", "1.0", "--codecs", "diffo,jpeg2000",
              "--model", str(model_dir)]
    for shard in ("0/2", "1/2"):
        assert main([*common, "--shard", shard]) == 0
        assert not (out / "summary.md").exists()
    assert sorted(p.name for p in (out / "points").iterdir()) == ["im0", "im1", "im2"]
    cached = {p: p.read_bytes() for p in (out / "points").rglob("*.json")}
    assert main(common) == 0  # everything from the cache: nothing recomputed
    assert {p: p.read_bytes() for p in (out / "points").rglob("*.json")} == cached
    assert "| diffo | 1 | 3/3 |" in (out / "summary.md").read_text()
