"""`python -m diffo matrix`: every image kind loads, encodes and decodes to its size, and the determinism
matrix agrees across processes and thread counts (the README's tables come from this command)."""

import pytest
import torch

from diffo.tools import matrix


def test_image_matrix_covers_every_kind_and_each_round_trips(tiny_model):
    rows = {r["case"]: r for r in matrix.image_matrix(tiny_model)}
    modes = {r["stored_mode"] for r in rows.values()}
    assert {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I;16", "I", "F"} <= modes, modes
    for case, row in rows.items():
        assert row["ok"], row
        assert row["bytes"] > 0
    exif = rows["EXIF orientation 6 (phone JPEG)"]
    assert exif["stored_size"] == "64x48" and exif["loaded_size"] == "48x64"  # turned upright
    assert any("first frame" in w for w in rows["animated GIF, 2 frames"]["warnings"])
    assert any("alpha" in w or "transparen" in w for w in rows["mode RGBA, partly transparent (PNG)"]["warnings"])
    assert rows["mode RGB (PNG)"]["warnings"] == [] and rows["sRGB ICC profile (PNG)"]["warnings"] == []
    assert {rows[k]["loaded_size"] for k in ("1x1 (PNG)", "1x300 (PNG)", "7x5 (PNG)")} == {"1x1", "1x300", "7x5"}


def test_determinism_matrix_agrees_across_processes(tiny_model, tmp_path):
    model_dir = tiny_model.save_pretrained(tmp_path / "model")
    report = matrix.determinism_matrix(tiny_model, str(model_dir))
    assert [r.get("threads") for r in report["processes"]] == list(matrix.THREADS), report
    assert report["identical"], report


def test_device_matrix_crosses_every_encoder_with_every_decoder(tiny_model, tmp_path):
    """The cross-device plumbing, on two CPU processes (no GPU here): each stream decodes on each device to the
    same symbols and pixels, and a device that cannot run is reported, not crashed on."""
    model_dir = str(tiny_model.save_pretrained(tmp_path / "model"))
    report = matrix.device_matrix(model_dir, ["cpu", "cpu"])
    assert report["identical_symbols"], report
    assert [(p["encoded_on"], p["decoded_on"]) for p in report["pairs"]] == [("cpu", "cpu")] * 4
    assert {p["max_pixel_diff_vs_first"] for p in report["pairs"]} == {0}
    assert len({p["indices"] for p in report["pairs"]}) == 1  # both processes encoded the same stream
    bad = matrix.device_matrix(model_dir, ["cpu", "no-such-device"])
    assert not bad["identical_symbols"] and "no-such-device" in bad["errors"][0], bad


def test_cpu_and_gpu_decode_each_others_streams(tiny_model, tmp_path):
    """Encode on the CPU, decode on the GPU and the reverse: identical symbols, pixels within 8 levels (the VAE and
    UNet are ordinary float networks, whose kernels differ between devices). Runs only where CUDA is available."""
    if not torch.cuda.is_available():
        msg = "SKIPPED LOUDLY: no CUDA device; the CPU <-> GPU decoding check did not run"
        print(msg)
        pytest.skip(msg)
    model_dir = str(tiny_model.save_pretrained(tmp_path / "model"))
    report = matrix.device_matrix(model_dir, ["cpu", "cuda"])
    assert report["identical_symbols"], report
    assert max(p["max_pixel_diff_vs_first"] for p in report["pairs"]) <= 8, report


def test_matrix_command_writes_its_report(tmp_path, tiny_model, monkeypatch):
    from diffo.cli import main

    model_dir = tiny_model.save_pretrained(tmp_path / "model")
    out = tmp_path / "matrix.json"
    out.write_text("keep")
    assert main(["matrix", "--model", str(model_dir), "--out", str(out)]) == 2  # never overwritten silently
    assert out.read_text() == "keep"
    monkeypatch.setattr(matrix, "determinism_matrix", lambda m, s: {"identical": True})
    monkeypatch.setattr(matrix, "image_matrix", lambda m: [{"ok": True}])
    assert main(["matrix", "--model", str(model_dir), "--out", str(out), "--force"]) == 0
    assert '"identical": true' in out.read_text()
    monkeypatch.setattr(matrix, "device_matrix", lambda s, d: {"identical_symbols": False})
    assert main(["matrix", "--model", str(model_dir), "--out", str(out), "--force", "--devices", "cpu,cpu"]) == 1
    monkeypatch.setattr(matrix, "image_matrix", lambda m: [{"ok": False}])
    assert main(["matrix", "--model", str(model_dir), "--out", str(out), "--force"]) == 1  # a failed case fails
