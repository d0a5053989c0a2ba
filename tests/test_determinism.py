"""Bit-exact decoding across thread counts, batch sizes and separate processes (the CompressAI failure mode:
entropy parameters computed in floating point that differ between machines desynchronise the decoder)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

WORKER = Path(__file__).with_name("determinism_worker.py")
ROOT = WORKER.parents[1]


def _run(threads: int, model_dir: Path, image: Path, stream: Path | str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(WORKER), str(threads), str(model_dir), str(image), str(stream)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("model_kind", ["random-tiny", "embedded"])
def test_threads_batches_processes(tiny_model, tmp_path, model_kind, photo):
    if model_kind == "embedded":
        from diffo.hub import EMBEDDED_DIR

        model_dir = EMBEDDED_DIR
        image = photo[:, :200, :264]  # a real photo crop
    else:
        model_dir = tiny_model.save_pretrained(tmp_path / "model")
        torch.manual_seed(3)
        image = torch.rand(3, 72, 104)
    image_path = tmp_path / "image.safetensors"
    save_file({"image": image.contiguous()}, image_path)
    stream = tmp_path / "one.diffo"
    # the stream made with 1 thread, decoded in a process with 2 threads (and vice versa)
    from diffo import pipeline
    from diffo.models.diffo.codec import DiffoCodec

    model = DiffoCodec.from_pretrained(model_dir)
    stream.write_bytes(pipeline.encode(model, image, rate=0.6, seed=7))
    one = _run(1, model_dir, image_path, stream)
    two = _run(2, model_dir, image_path, stream)
    assert (one["threads"], two["threads"]) == (1, 2)
    assert one["stream"] == two["stream"]  # encoding: same bytes
    for key in ("indices", "y_hat", "pixels"):
        assert one["own"][key] == two["own"][key] == one["foreign"][key] == two["foreign"][key], key
    assert one["own"]["batch_equal"] and two["own"]["batch_equal"]
