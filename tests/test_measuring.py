"""Classical anchors, metrics, rate sweep and figures, on small synthetic images (fast, no network)."""

import math

import pytest
import torch

from diffo.tools import classical, metrics
from diffo.tools.figures import comparison_picture, rd_plot
from diffo.tools.sweep import markdown_table, parse_floats, rate_sweep, series


def smooth_image(h=96, w=128, seed=0):
    """A smooth random image (compressible, so every codec reaches moderate rates)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, h // 16, w // 16, generator=g)
    return torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)


@pytest.mark.parametrize("name", classical.available_codecs())
def test_every_codec_fits_its_target_and_spends_it(name):
    img = smooth_image()
    target = 1.0
    res = classical.encode_to_bpp(img, name, target)
    assert res.bpp <= target and res.bpp == 8 * len(res.data) / (96 * 128)
    assert res.image.shape == img.shape and res.image.dtype == torch.float32
    assert metrics.psnr(img, res.image) > 20
    # the search went for quality: a larger budget never gives a smaller file
    bigger = classical.encode_to_bpp(img, name, 3.0)
    assert len(bigger.data) >= len(res.data)


def test_unreachable_targets_say_so_instead_of_inventing_a_point():
    with pytest.raises(classical.TargetUnreachable, match=r"JPEG cannot reach 0.001 bpp .* its smallest file is \d+ bytes"):
        classical.encode_to_bpp(smooth_image(), "jpeg", 0.001)
    with pytest.raises(ValueError, match="unknown classical codec 'bpg'"):
        classical.encode_to_bpp(smooth_image(), "bpg", 0.1)
    with pytest.raises(ValueError, match="positive"):
        classical.encode_to_bpp(smooth_image(), "jpeg", 0)


def test_missing_codec_library_names_the_package(monkeypatch):
    monkeypatch.setitem(classical.CODECS, "jxl", classical.CODECS["jxl"].__class__(
        **{**classical.CODECS["jxl"].__dict__, "available": lambda: "the imagecodecs package (pip install imagecodecs)"}))
    with pytest.raises(classical.CodecUnavailable, match="pip install imagecodecs"):
        classical.codec("jxl")
    assert "jxl" not in classical.available_codecs()


def test_metrics_sanity():
    a = smooth_image(192, 256)
    assert metrics.psnr(a, a) == math.inf
    assert metrics.ms_ssim(a, a) == pytest.approx(1.0)
    assert metrics.haarpsi(a, a) == pytest.approx(1.0, abs=1e-4)
    assert metrics.gmsd(a, a) == pytest.approx(0.0, abs=1e-6)
    b = (a + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    c = (a + 0.2 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    qb, qc = metrics.quality(a, b), metrics.quality(a, c)
    assert qb["psnr"] > qc["psnr"] and qb["ms_ssim"] > qc["ms_ssim"] and qb["haarpsi"] > qc["haarpsi"]
    assert qb["gmsd"] < qc["gmsd"]
    # PSNR of uniform noise of known size: MSE of one 8-bit level everywhere is 20*log10(255) dB
    one_level = (metrics.to_uint8(a).float() + 1).clamp(max=255) / 255
    assert metrics.psnr(metrics.to_uint8(a).float() / 255, one_level) == pytest.approx(48.13, abs=0.1)


def test_metrics_undefined_on_small_images_are_nan_not_made_up():
    a = smooth_image(64, 96)
    assert math.isnan(metrics.ms_ssim(a, a))  # 5 scales need 161 px
    assert math.isnan(metrics.haarpsi(a[:, :40, :40], a[:, :40, :40]))
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.quality(a, a, ["lpips"])


def test_rate_sweep_rows_table_and_plot(tiny_model):
    img = smooth_image(64, 96)
    steps = []
    rows = rate_sweep(tiny_model, img, [0.0, 1.0], ["jpeg2000", "jpeg"], ("psnr",), step=lambda: steps.append(1))
    assert len(steps) == 2 + 2 * 2
    diffo = [r for r in rows if r["codec"] == "diffo"]
    assert [r["rate"] for r in diffo] == [0.0, 1.0] and diffo[0]["bytes"] < diffo[1]["bytes"]
    for r in rows:
        if r["codec"] != "diffo" and "note" not in r:
            assert r["bpp"] <= r["target_bpp"]
    table = markdown_table(rows, ("psnr",))
    assert table.splitlines()[0] == "| codec | bytes | bpp | psnr |"
    notes = [r for r in rows if "note" in r]
    assert all(f"- {r['codec']} at " in table for r in notes)
    plot = rd_plot(series(rows, "psnr"), "psnr")
    assert plot.size == (640, 440)
    with pytest.raises(ValueError, match="'abc' is not a number"):
        parse_floats("0.1, abc", "rates")


def test_comparison_picture_labels_and_size_check():
    a = smooth_image(40, 60)
    sheet = comparison_picture(a, [("two\nlines", a)])
    assert sheet.width == 120 and sheet.height > 40
    with pytest.raises(ValueError, match="is 30x20, the original 60x40"):
        comparison_picture(a, [("small", a[:, :20, :30])])


def test_strength_sweep_decodes_one_stream_at_each_strength(tiny_model, photo):
    from diffo import pipeline
    from diffo.tools.figures import strength_plot
    from diffo.tools.sweep import strength_sweep

    img = photo[:, :192, :256]
    rows = strength_sweep(tiny_model, img, [0.0, 0.5, 1.0], bpp=0.5, seed=3)
    assert [r["strength"] for r in rows[:4]] == [None, 0.0, 0.5, 1.0] and rows[-1]["default"]
    assert len({r["bytes"] for r in rows}) == 1  # one stream
    data = pipeline.encode(tiny_model, img, bpp=0.5, seed=3)
    assert rows[3]["psnr"] == metrics.psnr(img, pipeline.decode(tiny_model, data, strength=1.0))
    assert rows[1]["psnr"] != rows[3]["psnr"]  # the strength reaches the decoder (the tiny model's UNet is random)
    assert all(math.isfinite(r["niqe"]) for r in rows)
    assert strength_plot(rows).size == (640, 420)


def test_strength_command_refuses_bad_strengths_and_existing_output(tmp_path, capsys):
    from diffo.cli import main

    assert main(["strength", "--out", str(tmp_path), "--strengths", "0,1.5"]) == 2
    assert "every strength must be in [0, 1]" in capsys.readouterr().err
    (tmp_path / "strength_sweep.png").write_bytes(b"x")
    assert main(["strength", "--out", str(tmp_path)]) == 2
    assert "already holds a strength sweep" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["x265", "vvc"])
def test_video_anchors_code_sides_that_are_not_multiples_of_8(name):
    """vvenc refuses a 321x481 frame: the anchors pad to their block size and crop back (BSDS500's size)."""
    import numpy as np
    from PIL import Image

    codec = classical.CODECS[name]
    if codec.available():
        pytest.skip(f"SKIPPED LOUDLY: {codec.available()}")
    rgb = (smooth_image(321, 203) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(rgb)
    out = codec.decode(codec.encode(img, 30))
    assert out.size == img.size
    assert (torch.from_numpy(np.asarray(out)).float() - torch.from_numpy(rgb).float()).abs().mean() < 8
