"""`python -m diffo matrix`: every image kind loads, encodes and decodes to its size, and the determinism
matrix agrees across processes and thread counts (the README's tables come from this command)."""

from diffo import matrix


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
    monkeypatch.setattr(matrix, "image_matrix", lambda m: [{"ok": False}])
    assert main(["matrix", "--model", str(model_dir), "--out", str(out), "--force"]) == 1  # a failed case fails
