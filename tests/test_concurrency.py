"""Several workflows sharing one model at the same time give what they give one by one (ComfyUI queues
prompts; a server or a second ComfyUI worker thread may run them concurrently), and the process-wide
oneDNN switch of `pipeline.reproducible` is not flipped under a running exact decode by a `fast` one."""

import threading
from pathlib import Path

import torch

from comfy_core import NODES as CORE_NODES
from conftest import ROOT
from workflow_runner import run_workflow

WORKFLOWS = ["compress", "decompress", "decoder_blocks"]


def _images(run) -> dict:
    """Every IMAGE/LATENT tensor and every bitstream a DiffO node returned, by (node id, output)."""
    out = {}
    for node_id, values in run.outputs.items():
        if run.types[node_id].startswith("DiffO"):
            for k, v in enumerate(values):
                if torch.is_tensor(v):
                    out[(node_id, k)] = v
                elif isinstance(v, dict) and torch.is_tensor(v.get("samples")):
                    out[(node_id, k)] = v["samples"]
                elif isinstance(v, list) and v and all(isinstance(b, bytes) for b in v):
                    out[(node_id, k)] = list(v)
    return out


def _in_threads(jobs):
    results, errors = [None] * len(jobs), []

    def work(i, job):
        try:
            results[i] = job()
        except BaseException as e:  # noqa: BLE001 - reported below with the thread's job
            errors.append((i, e))

    threads = [threading.Thread(target=work, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not errors, errors
    return results


def test_queued_workflows_sharing_one_model_match_serial_runs(plugin, comfy_dirs):
    from diffo import pipeline

    serial = {name: _images(run_workflow(ROOT / "workflows" / f"{name}.json", plugin, CORE_NODES))
              for name in WORKFLOWS}
    saved_before = set(Path(comfy_dirs["output"]).rglob("*.diffo"))
    data = (comfy_dirs["input"] / "diffo_example.diffo").read_bytes()
    from diffo.hub import load_model

    model = load_model()  # the loader node's shared copy: the same object every workflow uses

    def fast_decodes():  # oneDNN on and off around the exact decodes of the workflows
        return [pipeline.decode(model, data, fast=True) for _ in range(2)]

    jobs = [lambda n=n: _images(run_workflow(ROOT / "workflows" / f"{n}.json", plugin, CORE_NODES))
            for n in WORKFLOWS * 2]
    results = _in_threads(jobs + [fast_decodes])
    for name, got in zip(WORKFLOWS * 2, results[:-1]):
        assert got.keys() == serial[name].keys()
        for key, tensor in serial[name].items():
            same = torch.equal(got[key], tensor) if torch.is_tensor(tensor) else got[key] == tensor
            assert same, (name, key)
    assert torch.backends.mkldnn.enabled  # restored once the last exact section ended
    saved = set(Path(comfy_dirs["output"]).rglob("*.diffo")) - saved_before
    assert len(saved) == 2  # the two concurrent Save Bitstream runs each took their own file
    (streams,) = [v for v in serial["compress"].values() if isinstance(v, list)]  # the Encode node's bitstreams
    assert all(p.read_bytes() == streams[0] for p in saved)


def test_onednn_stays_off_until_the_last_overlapping_exact_section_ends():
    """Exact section A starts, B starts, A ends while B runs: B must still run without oneDNN (a plain
    save/restore of the process-wide flag would turn it back on under B). A fast section around them
    never turns it on either."""
    from diffo import pipeline

    b_inside, a_done = threading.Event(), threading.Event()
    seen = []

    def b():
        with pipeline.reproducible():
            b_inside.set()
            a_done.wait(30)
            seen.append(torch.backends.mkldnn.enabled)

    with pipeline.reproducible(fast=True):
        with pipeline.reproducible():  # A
            t = threading.Thread(target=b)
            t.start()
            b_inside.wait(30)
        a_done.set()
        t.join(30)
    assert seen == [False]
    assert torch.backends.mkldnn.enabled  # back to the setting before the first exact section
