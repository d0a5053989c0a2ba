"""Every shipped workflow, run through the node classes the way ComfyUI's frontend maps its widgets, with
outputs checked. (test_comfyui.py runs the same files in a real ComfyUI when COMFYUI_PATH is set.)"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_core import NODES as CORE_NODES
from conftest import ROOT
from workflow_runner import run_workflow

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
EXPECTED = {"compress", "decompress", "roundtrip_compare", "rate_sweep", "decoder_blocks", "core_chain"}
# on the user's own SD checkpoint: run in a real ComfyUI only (tests/test_comfyui.py), the core sampling and VAE
# nodes they use have no stand-ins here
CHECKPOINT = {"osdiff_compress_checkpoint", "osdiff_decompress_checkpoint", "osdiff_decode_refine"}
CHECKPOINT_CORE = {"CheckpointLoaderSimple", "BasicScheduler", "KSamplerSelect", "BasicGuider", "SamplerCustomAdvanced",
                   "VAEDecode", "CLIPTextEncode", "KSampler"}


def test_the_promised_workflows_ship_and_use_every_node(plugin):
    assert {p.stem for p in WORKFLOWS} == EXPECTED | CHECKPOINT
    used = set()
    for p in WORKFLOWS:
        wf = json.loads(p.read_text())
        assert wf["version"] >= 0.4 and wf["nodes"] and wf["links"]
        types = {n["type"] for n in wf["nodes"]}
        core = set(CORE_NODES) | (CHECKPOINT_CORE if p.stem in CHECKPOINT else set())
        assert types <= set(plugin.NODE_CLASS_MAPPINGS) | core, types
        used |= types
    assert set(plugin.NODE_CLASS_MAPPINGS) <= used, set(plugin.NODE_CLASS_MAPPINGS) - used


def test_workflows_match_their_specs():
    """workflows/*.json are what tools/make_workflows.py makes from the nodes' current INPUT_TYPES."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("make_workflows", ROOT / "tools" / "make_workflows.py")
    mod = sys.modules["make_workflows"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--check"]) == 0


def _saved(run, node_id) -> list[Path]:
    return [Path(p) for p in run.ui[node_id]["images"]]


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _only(run, node_type):
    ids = run.of_type(node_type)
    assert len(ids) == 1, (node_type, ids)
    return ids[0]


def test_compress(plugin, comfy_dirs, photo, embedded_model):
    from diffo import pipeline

    run = run_workflow(ROOT / "workflows" / "compress.json", plugin, CORE_NODES)
    files = list((comfy_dirs["output"] / "diffo").glob("*.diffo"))
    assert [f.name for f in files] == ["compress_00001.diffo"]
    data = files[0].read_bytes()
    bpp = 8 * len(data) / (photo.shape[1] * photo.shape[2])
    assert abs(bpp - 0.1) < 0.015, bpp  # the workflow's target
    assert run.ui[_only(run, "DiffOSaveBitstream")]["text"][0].startswith(f"diffo/compress_00001.diffo: {len(data)} bytes")
    assert pipeline.decode(embedded_model, data).shape == photo.shape
    run_workflow(ROOT / "workflows" / "compress.json", plugin, CORE_NODES)  # a second run never overwrites
    assert sorted(f.name for f in (comfy_dirs["output"] / "diffo").glob("*.diffo")) == \
        ["compress_00001.diffo", "compress_00002.diffo"]


def test_decompress(plugin, comfy_dirs, embedded_model):
    from diffo import pipeline
    from diffo.image import to_uint8

    run = run_workflow(ROOT / "workflows" / "decompress.json", plugin, CORE_NODES)
    (png,) = _saved(run, _only(run, "SaveImage"))
    data = (comfy_dirs["input"] / "diffo_example.diffo").read_bytes()
    expected = to_uint8(pipeline.decode(embedded_model, data)).permute(1, 2, 0).numpy()
    assert np.array_equal(_png(png), expected)
    info = run.outputs[_only(run, "PreviewAny")][0]
    assert f"{len(data)} bytes" in info and embedded_model.fingerprint.hex() in info


def test_roundtrip_compare(plugin, comfy_dirs, photo):
    run = run_workflow(ROOT / "workflows" / "roundtrip_compare.json", plugin, CORE_NODES)
    encode = run.outputs[_only(run, "DiffOEncode")]
    avif = run.outputs[_only(run, "DiffOClassicalCodec")]
    assert avif[1] <= encode[2]  # AVIF at DiffO's real size, never above it
    reports = [run.outputs[i][0] for i in run.of_type("DiffOCompare")]
    assert [r.split(" ")[0] for r in reports] == ["DiffO", "AVIF"]
    for r in reports:
        psnr = float(re.search(r"PSNR ([\d.]+) dB", r).group(1))
        assert 10 < psnr < 60, r
        assert "MS-SSIM 0." in r and "HaarPSI 0." in r
    assert f"{encode[1]} bytes" in reports[0]
    (png,) = _saved(run, _only(run, "SaveImage"))
    sheet = _png(png)
    h, w = photo.shape[1:]
    assert sheet.shape[1] == 2 * w and sheet.shape[0] > 2 * h  # (original | reconstruction) x 2, with captions


def test_rate_sweep(plugin, comfy_dirs):
    run = run_workflow(ROOT / "workflows" / "rate_sweep.json", plugin, CORE_NODES)
    table = run.outputs[_only(run, "PreviewAny")][0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| codec")]
    codecs = [r.split("|")[1].strip() for r in rows]
    assert codecs.count("diffo") == 4
    diffo_bpp = [float(r.split("|")[3]) for r in rows if "diffo" in r]
    assert diffo_bpp == sorted(diffo_bpp) and diffo_bpp[0] < diffo_bpp[-1]  # more rate, more bits
    assert {"avif", "jpeg2000"} <= set(codecs)  # JPEG 2000 reaches every size; AVIF the larger ones
    (plot,) = _saved(run, _only(run, "SaveImage"))
    assert _png(plot).std() > 10  # a drawn plot, not a blank image


def test_decoder_blocks(plugin, comfy_dirs, photo, embedded_model):
    from diffo import pipeline

    run = run_workflow(ROOT / "workflows" / "decoder_blocks.json", plugin, CORE_NODES)
    (stream,) = run.outputs[_only(run, "DiffOEncode")][0]
    to_image = run.of_type("DiffOLatentToImage")
    direct, upscaled = (run.outputs[i][0] for i in to_image)
    # the four blocks give exactly what the one-call decoder gives
    assert torch.equal(direct[0], pipeline.decode(embedded_model, stream).permute(1, 2, 0))
    h, w = photo.shape[1:]
    assert tuple(upscaled.shape[1:3]) == (round(h * 1.5), round(w * 1.5))  # the crop followed the core node
    assert run.outputs[_only(run, "DiffOCompare")][0].startswith("DiffO blocks image 1:")


def test_core_chain(plugin, comfy_dirs):
    run = run_workflow(ROOT / "workflows" / "core_chain.json", plugin, CORE_NODES)
    (stream,) = run.outputs[_only(run, "DiffOEncode")][0]
    assert len(stream) <= 1500  # the workflow's byte budget
    (png,) = _saved(run, _only(run, "SaveImage"))
    assert _png(png).shape == (320, 384, 3)  # Upscale Image's size, through the codec
    assert run.ui[_only(run, "PreviewImage")]["images"] == [(1, 320, 768, 3)]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_widget_values_map_onto_declared_widgets(path, plugin, comfy_dirs):
    """No workflow carries a stale widget list (a value for an input a node no longer has, or too few)."""
    from workflow_runner import extra_widget_values, input_specs, is_widget

    classes = {**CORE_NODES, **plugin.NODE_CLASS_MAPPINGS}
    for node in json.loads(path.read_text())["nodes"]:
        if node["type"] in CHECKPOINT_CORE:
            continue  # no stand-in: their widget order is checked against the real ComfyUI (test_comfyui.py)
        cls = classes[node["type"]]
        n = sum(1 + extra_widget_values(name, kind, opts) for name, kind, opts, _ in input_specs(cls)
                if is_widget(kind, opts))
        assert len(node["widgets_values"]) == n, node["type"]
