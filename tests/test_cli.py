"""The command line as a user meets it: outputs, one-line errors, nothing overwritten."""

import json

import pytest
import torch
from PIL import Image

from diffo.cli import main


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    return tiny_model.save_pretrained(tmp_path_factory.mktemp("cli") / "model")


@pytest.fixture
def png(tmp_path):
    p = tmp_path / "in.png"
    Image.fromarray((torch.rand(40, 56, 3) * 255).byte().numpy()).save(p)
    return p


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_compress_decompress_info(capsys, png, model_dir, tmp_path):
    code, out, _ = run(capsys, "compress", png, "--model", model_dir, "--rate", "0.5")
    assert code == 0 and "bpp" in out
    stream = png.with_suffix(".diffo")
    assert stream.is_file()
    code, out, _ = run(capsys, "info", stream, "--json", "--model", model_dir)
    head = json.loads(out)
    assert code == 0 and head["width"] == 56 and head["height"] == 40 and head["made_by_this_model"]
    assert head["total_bytes"] == stream.stat().st_size
    code, out, _ = run(capsys, "decompress", stream, "--model", model_dir)  # beside the original, not over it
    assert code == 0
    assert Image.open(png.with_name("in_diffo.png")).size == (56, 40)
    code, out, _ = run(capsys, "decompress", stream, "--model", model_dir, "-o", tmp_path / "fast.png", "--fast")
    assert code == 0 and Image.open(tmp_path / "fast.png").size == (56, 40)


def test_max_bytes_and_bpp_modes(capsys, png, model_dir, tmp_path):
    code, _, _ = run(capsys, "compress", png, "--model", model_dir, "--max-bytes", "400", "-o", tmp_path / "a.diffo")
    assert code == 0 and (tmp_path / "a.diffo").stat().st_size <= 400
    code, _, _ = run(capsys, "compress", png, "--model", model_dir, "--bpp", "0.5", "-o", tmp_path / "b.diffo")
    assert code == 0


def _assert_one_line_error(code, err, word):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffo: error:") and word in lines[0].lower(), err
    assert "Traceback" not in err


def test_errors_are_one_clear_line(capsys, png, model_dir, tmp_path, tiny_model):
    code, _, err = run(capsys, "compress", tmp_path / "missing.png", "--rate", "0.1", "--model", model_dir)
    _assert_one_line_error(code, err, "not found")
    notimg = tmp_path / "notes.png"
    notimg.write_text("hello")
    code, _, err = run(capsys, "compress", notimg, "--rate", "0.1", "--model", model_dir)
    _assert_one_line_error(code, err, "not an image")

    run(capsys, "compress", png, "--model", model_dir, "--rate", "0.3")
    good = png.with_suffix(".diffo").read_bytes()
    cases = {"magic": b"GIF89a" + good[6:], "truncated": good[:20], "checksum": good[:-1] + bytes([good[-1] ^ 1]),
             "newer": good[:4] + b"\x07" + good[5:]}
    for word, data in cases.items():
        bad = tmp_path / f"{word}.diffo"
        bad.write_bytes(data)
        code, _, err = run(capsys, "decompress", bad, "--model", model_dir, "-o", tmp_path / f"{word}.png")
        _assert_one_line_error(code, err, word)
        assert not (tmp_path / f"{word}.png").exists()

    from diffo.models.diffo.codec import DiffoCodec

    torch.manual_seed(11)
    other = DiffoCodec.from_preset("tiny").eval()
    other.update()
    other_dir = other.save_pretrained(tmp_path / "other")
    code, _, err = run(capsys, "decompress", png.with_suffix(".diffo"), "--model", other_dir, "-o", tmp_path / "x.png")
    _assert_one_line_error(code, err, "made by model")
    code, _, err = run(capsys, "decompress", png.with_suffix(".diffo"), "--model", tmp_path / "nowhere", "-o",
                       tmp_path / "y.png")
    _assert_one_line_error(code, err, "not found")


def test_existing_output_is_left_untouched(capsys, png, model_dir, tmp_path):
    target = tmp_path / "keep.diffo"
    target.write_bytes(b"precious")
    code, _, err = run(capsys, "compress", png, "--model", model_dir, "--rate", "0.2", "-o", target)
    _assert_one_line_error(code, err, "exists")
    assert target.read_bytes() == b"precious"
    code, _, _ = run(capsys, "compress", png, "--model", model_dir, "--rate", "0.2", "-o", target, "--force")
    assert code == 0 and target.read_bytes()[:4] == b"DIFO"
    picture = tmp_path / "keep.png"
    picture.write_bytes(b"precious")
    code, _, err = run(capsys, "decompress", target, "--model", model_dir, "-o", picture)
    _assert_one_line_error(code, err, "exists")
    assert picture.read_bytes() == b"precious"


def test_rate_modes_are_exclusive(capsys, png):
    with pytest.raises(SystemExit):
        main(["compress", str(png), "--rate", "0.1", "--bpp", "0.1"])


def test_a_model_with_rate_levels_needs_a_rate_mode(capsys, png, tmp_path):
    code, _, err = run(capsys, "compress", png, "-o", tmp_path / "x.diffo")
    _assert_one_line_error(code, err, "give one of --rate, --bpp or --max-bytes")
    assert not (tmp_path / "x.diffo").exists()


def test_demo_writes_streams_pictures_and_refuses_to_overwrite(capsys, png, model_dir, tmp_path):
    out = tmp_path / "demo"
    code, text, _ = run(capsys, "demo", "--image", png, "--model", model_dir, "--out", out, "--rates", "0,1")
    assert code == 0 and "PSNR" in text
    names = sorted(p.name for p in out.iterdir())
    assert names == ["in_comparison.png", "in_rate0.diffo", "in_rate0.png", "in_rate1.diffo", "in_rate1.png"]
    assert Image.open(out / "in_comparison.png").size[0] == 3 * 56
    before = (out / "in_rate0.diffo").read_bytes()
    code, _, err = run(capsys, "demo", "--image", png, "--model", model_dir, "--out", out, "--rates", "0,1")
    _assert_one_line_error(code, err, "exists")
    assert (out / "in_rate0.diffo").read_bytes() == before


def test_alpha_is_refused_unless_dropped_and_conversions_warn(capsys, model_dir, tmp_path):
    rgba = tmp_path / "alpha.png"
    arr = (torch.rand(24, 32, 4) * 255).byte().numpy()
    arr[..., 3] = 128
    Image.fromarray(arr, "RGBA").save(rgba)
    code, _, err = run(capsys, "compress", rgba, "--model", model_dir, "--rate", "0.3")
    _assert_one_line_error(code, err, "alpha")
    assert not rgba.with_suffix(".diffo").exists()
    code, _, err = run(capsys, "compress", rgba, "--model", model_dir, "--rate", "0.3", "--drop-alpha")
    assert code == 0 and "diffo: warning:" in err
    gray = tmp_path / "gray.png"
    Image.fromarray((torch.rand(24, 32) * 255).byte().numpy(), "L").save(gray)
    code, _, err = run(capsys, "compress", gray, "--model", model_dir, "--rate", "0.3")
    assert code == 0 and "grayscale" in err.lower()
    code, _, err = run(capsys, "info", tmp_path / "none.diffo")
    _assert_one_line_error(code, err, "not found")
