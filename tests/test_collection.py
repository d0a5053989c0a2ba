"""Collections (diffo/collection.py, `diffo compress DIR -o OUT`): mirroring, resuming, bad files, the manifest,
exit codes, failing fast before the model loads, and sharded worker processes (one killed, then resumed) giving
the bytes of a single-process run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffo.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _photo(path: Path, seed: int, size=(96, 64)) -> None:
    rng = np.random.default_rng(seed)
    low = rng.random((size[1] // 8, size[0] // 8, 3))
    img = Image.fromarray((low * 255).astype(np.uint8)).resize(size, Image.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "photos"
    _photo(src / "a.png", 0)
    _photo(src / "trip" / "b.jpg", 1)
    _photo(src / "trip" / "deep" / "c.png", 2)
    (src / "notes.txt").write_text("not an image, and not an image suffix: ignored")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # an image suffix, not an image
    return src


@pytest.fixture
def model_dir(tmp_path, tiny_model):
    return str(tiny_model.save_pretrained(tmp_path / "model"))


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_compress_a_folder_mirrors_the_tree_reports_bad_files_and_writes_a_manifest(tree, tmp_path, model_dir,
                                                                                      capsys):
    out = tmp_path / "archive"
    rc = main(["compress", str(tree), "-o", str(out), "--rate", "0.5", "--model", model_dir])
    assert rc == 1  # one file failed
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.diffo")) == [
        "a.diffo", "trip/b.diffo", "trip/deep/c.diffo"]
    text = capsys.readouterr().out
    assert "3 done, 0 already done, 1 failed of 4" in text and "broken.png: not an image" in text
    rows = {Path(r["source"]).name: r for r in _manifest(out)}
    assert rows["broken.png"]["status"] == "failed" and "not an image" in rows["broken.png"]["error"]
    a = rows["a.png"]
    assert a["status"] == "done" and a["bytes"] == (out / "a.diffo").stat().st_size
    assert a["bpp"] == pytest.approx(8 * a["bytes"] / (96 * 64)) and a["rate"] == pytest.approx(0.5, abs=1e-4)
    assert len(a["fingerprint"]) == 16 and a["seconds"] > 0

    # decompress the archive: the same tree of PNGs
    restored = tmp_path / "restored"
    assert main(["decompress", str(out), "-o", str(restored), "--model", model_dir]) == 0
    assert sorted(p.relative_to(restored).as_posix() for p in restored.rglob("*.png")) == [
        "a.png", "trip/b.png", "trip/deep/c.png"]
    with Image.open(restored / "trip" / "deep" / "c.png") as im:
        assert im.size == (96, 64)


def test_a_second_run_skips_what_is_done_and_redoes_what_does_not_parse(tree, tmp_path, model_dir, capsys):
    out = tmp_path / "archive"
    main(["compress", str(tree), "-o", str(out), "--rate", "0.5", "--model", model_dir])
    before = {p: p.read_bytes() for p in out.rglob("*.diffo")}
    damaged = out / "trip" / "b.diffo"
    damaged.write_bytes(before[damaged][:-7])  # an interrupted copy, say
    capsys.readouterr()
    assert main(["compress", str(tree), "-o", str(out), "--rate", "0.5", "--model", model_dir]) == 1
    assert "1 done, 2 already done, 1 failed of 4" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in out.rglob("*.diffo")} == before  # redone to the same bytes
    statuses = [r["status"] for r in _manifest(out)]
    assert statuses.count("skipped") == 2 and statuses.count("done") == 3 + 1


def test_input_problems_are_reported_together_without_loading_the_model(tmp_path, monkeypatch, capsys):
    import diffo.hub

    monkeypatch.setattr(diffo.hub, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "x.png").write_text("text")
    (tmp_path / "y.diffo").write_bytes(b"DIFO\x02garbage")
    rc = main(["compress", str(tmp_path / "x.png"), str(tmp_path / "missing.png"), "-o", str(tmp_path / "o"),
               "--bpp", "0.1"])
    out = capsys.readouterr().out
    assert rc == 1 and "missing.png" in out and "x.png: not an image" in out
    rc = main(["decompress", str(tmp_path / "y.diffo"), str(tmp_path / "no.diffo"), "-o", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert rc == 1 and "y.diffo: truncated" in out and "no.diffo" in out


def test_single_file_errors_come_before_torch_is_imported(tmp_path):
    """`diffo decompress missing.diffo` used to import torch and load the model (about 7 s) to say so."""
    (tmp_path / "bad.diffo").write_bytes(b"DIFO\x02" + b"\0" * 40)
    code = ("import sys; from diffo.cli import main; "
            f"codes = [main(['decompress', {str(tmp_path / 'missing.diffo')!r}]), "
            f"main(['decompress', {str(tmp_path / 'bad.diffo')!r}]), "
            f"main(['compress', {str(tmp_path / 'bad.diffo')!r}, '--bpp', '0.1', '-o', {str(tmp_path / 'x.diffo')!r}])]; "
            "print(codes, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.strip() == "[2, 2, 2] False", proc.stderr
    assert "file not found" in proc.stderr and "checksum mismatch" in proc.stderr and "not an image" in proc.stderr


def test_two_inputs_with_one_output_both_fail(tmp_path, model_dir, capsys):
    _photo(tmp_path / "one" / "p.png", 0)
    _photo(tmp_path / "two" / "p.jpg", 1)
    rc = main(["compress", str(tmp_path / "one" / "p.png"), str(tmp_path / "two" / "p.jpg"), "-o",
               str(tmp_path / "o"), "--rate", "0.5", "--model", model_dir])
    assert rc == 1 and capsys.readouterr().out.count("two inputs would write") == 2


def _worker(tree: Path, out: Path, model_dir: str, shard: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "diffo", "compress", str(tree), "-o", str(out), "--rate", "0.5",
                             "--model", model_dir, "--shard", shard], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


def test_sharded_workers_one_killed_then_resumed_give_the_single_process_bytes(tmp_path, model_dir):
    tree = tmp_path / "many"
    for i in range(8):
        _photo(tree / f"d{i % 2}" / f"p{i}.png", 10 + i, size=(128, 96))
    single = tmp_path / "single"
    assert main(["compress", str(tree), "-o", str(single), "--rate", "0.5", "--model", model_dir]) == 0
    out = tmp_path / "sharded"
    victim = _worker(tree, out, model_dir, "1/3")
    others = [_worker(tree, out, model_dir, s) for s in ("0/3", "2/3")]
    mine = {out / (rel.with_suffix(".diffo")) for rel in
            [p.relative_to(tree) for p in sorted(tree.rglob("*.png"))][1::3]}
    deadline = time.time() + 300
    while not any(p.exists() for p in mine) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)  # mid-run: at most its in-flight file is lost
    victim.wait()
    assert 1 <= sum(p.exists() for p in mine) < len(mine)  # killed after its first file, before its last
    for w in others:
        assert w.wait(timeout=300) == 0, w.stderr.read().decode()[-2000:]
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.diffo*"))  # no partial files
    resumed = _worker(tree, out, model_dir, "1/3")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    got = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.diffo")}
    want = {p.relative_to(single): p.read_bytes() for p in single.rglob("*.diffo")}
    assert got == want and len(got) == 8
    manifests = sorted(p.name for p in out.glob("manifest.shard-*.jsonl"))
    assert manifests == [f"manifest.shard-{i}-of-3.jsonl" for i in range(3)]
    rows = [json.loads(line) for line in (out / "manifest.shard-1-of-3.jsonl").read_text().splitlines()]
    assert "skipped" in [r["status"] for r in rows]  # the resumed worker kept what the killed one finished


def test_force_redoes_a_collection_and_outputs_never_land_in_the_input_folder(tree, tmp_path, model_dir, capsys):
    out = tmp_path / "archive"
    main(["compress", str(tree), "-o", str(out), "--rate", "1", "--model", model_dir])
    capsys.readouterr()
    main(["compress", str(tree), "-o", str(out), "--rate", "0", "--model", model_dir, "--force"])
    assert "3 done, 0 already done" in capsys.readouterr().out  # new settings: every file redone
    from diffo.bitstream import Bitstream

    assert Bitstream.from_bytes((out / "a.diffo").read_bytes()).rate == 0.0
    assert main(["decompress", str(out), "-o", str(out / "restored"), "--model", model_dir]) == 2
    assert "inside the input folder" in capsys.readouterr().err


def test_a_shard_with_no_file_finishes_cleanly(tmp_path, model_dir, capsys):
    _photo(tmp_path / "one" / "p.png", 0)
    assert main(["compress", str(tmp_path / "one"), "-o", str(tmp_path / "o"), "--rate", "0.5",
                 "--model", model_dir, "--shard", "3/4"]) == 0
    assert "0 done, 0 already done, 0 failed of 0" in capsys.readouterr().out
