"""The plugin inside a real ComfyUI, through ../shared/tools/comfy_acceptance.py: it loads with no import
error, registers every node, and every shipped workflow loads in the real web frontend with no missing node,
runs, and produces its outputs. A foreign stream fails with the message that says which model made it.

Runs when COMFYUI_PATH points at a ComfyUI checkout (COMFY_PYTHON: its Python, default this one); otherwise
skipped, loudly. DIFFO_HARNESS_REPORT=DIR keeps the report (screenshots, outputs). Browser mode when the harness's Python (DIFFO_HARNESS_PYTHON, default python3) has playwright
and chromium is installed; else the harness's API mode, and the test says so."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, shared_path

pytestmark = pytest.mark.slow
CHECKPOINT_WORKFLOWS = ("osdiff_compress_checkpoint", "osdiff_decompress_checkpoint", "osdiff_decode_refine")


def _comfy_or_skip() -> str:
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy or not (Path(comfy) / "main.py").is_file():
        msg = "SKIPPED LOUDLY: COMFYUI_PATH does not point at a ComfyUI checkout; the real-ComfyUI test did not run"
        print(msg)
        pytest.skip(msg)
    return comfy


def _harness_python() -> str:
    return os.environ.get("DIFFO_HARNESS_PYTHON") or shutil.which("python3") or sys.executable


def _browser_available(python: str) -> bool:
    has_playwright = subprocess.run([python, "-c", "import playwright"], capture_output=True).returncode == 0
    return has_playwright and bool(os.environ.get("CHROMIUM") or shutil.which("chromium"))


def _clean_copy(dest: Path) -> Path:
    """The plugin as a user gets it: the files git tracks (or would), none of the ignored ones."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    return dest


def test_workflows_run_in_real_comfyui(tmp_path, example_inputs, tiny_model):
    comfy = _comfy_or_skip()
    harness = shared_path("tools", "comfy_acceptance.py")
    from diffo import pipeline
    from diffo.tools.demo import sample_photo
    from diffo.image import load_image

    plugin = _clean_copy(tmp_path / "ComfyUI-DiffO")
    # the shipped workflows (those on a user's SD checkpoint: the next test), plus one that must fail: a stream from
    # another model, with its expected message
    workflows = tmp_path / "workflows"
    shutil.copytree(plugin / "workflows", workflows)
    for name in CHECKPOINT_WORKFLOWS:
        (workflows / f"{name}.json").unlink()
    foreign = tmp_path / "foreign.diffo"
    foreign.write_bytes(pipeline.encode(tiny_model, load_image(sample_photo())[:, :64, :64], rate=0.2))
    wrong = json.loads((workflows / "decompress.json").read_text())
    for node in wrong["nodes"]:
        if node["type"] == "DiffOLoadBitstream":
            node["widgets_values"] = ["foreign.diffo"]
    (workflows / "wrong_model.json").write_text(json.dumps(wrong))
    (workflows / "wrong_model.expect.json").write_text(json.dumps(
        {"status": "error", "error_contains": f"made by model {tiny_model.fingerprint.hex()}"}))

    python = _harness_python()
    browser = _browser_available(python)
    report_dir = Path(os.environ.get("DIFFO_HARNESS_REPORT") or tmp_path / "report")  # keep it to see screenshots
    cmd = [python, str(harness), "--plugin", str(plugin), "--workflows", str(workflows), "--report-dir",
           str(report_dir), "--timeout", "600", "--expect-nodes", "DiffOLoadModel,DiffOEncode,DiffODecode",
           "--input-files", *map(str, sorted(example_inputs.iterdir())), str(foreign)]
    if not browser:
        print("NOTE: playwright/chromium not found: the harness runs in API mode, not in the browser")
        cmd.append("--api-only")
    env = {**os.environ, "COMFYUI_PATH": comfy, "COMFY_PYTHON": os.environ.get("COMFY_PYTHON", sys.executable)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3000)
    summary = proc.stdout[proc.stdout.find("=== ComfyUI acceptance summary"):]
    print(summary)
    report = json.loads((report_dir / "report.json").read_text())
    (plugin_report,) = report["plugins"]
    assert len(plugin_report["nodes"]) == 16, plugin_report
    assert not report["import_failed_lines"], report["import_failed_lines"]
    results = {w["name"]: w for w in report["workflows"]}
    assert set(results) == {p.stem for p in (ROOT / "workflows").glob("*.json")} - set(CHECKPOINT_WORKFLOWS) | {
        "wrong_model"}
    for name, w in results.items():
        assert not w["missing_node_types"], (name, w["missing_node_types"])
        assert w["ok"], (name, w["status"], w["error"])
    assert results["wrong_model"]["status"] == "error"
    for name in ("decompress", "rate_sweep", "roundtrip_compare", "decoder_blocks", "core_chain"):
        assert results[name]["outputs"], f"{name} produced no output file"
    assert "compress_00001.diffo" in json.dumps(results["compress"]["ui_outputs"])
    assert proc.returncode == 0, summary


def random_osdiff_folder(base_file: Path, out: Path) -> Path:
    """An OSDiff model folder on the UNet, VAE and text encoder of `base_file` (a single-file SD 2.1-base), with
    random codec and control weights: what `convert osdiff` writes from a real checkpoint, without one."""
    import torch

    from diffo.models import OSDiffCodec
    from diffo.models.osdiff.convert import _diffusers_base, load_base
    from diffo.models.osdiff.prompt import empty_prompt_embedding

    base = load_base(base_file)
    unet, vae = _diffusers_base(base)
    prompt = empty_prompt_embedding(base)
    del base
    torch.manual_seed(0)
    model = OSDiffCodec(name="osdiff-random-test").eval()
    with torch.no_grad():
        for p in model.control_module.parameters():
            if p.abs().max() == 0:  # zero-initialised joins would make the control module a no-op
                p.normal_(0, 0.02)
        model.unet.load_state_dict({k: v.float() for k, v in unet.items()})
        model.vae.load_state_dict({k: v.float() for k, v in vae.items()})
        model.prompt_embeds.copy_(prompt)
    model.update()
    model.save_pretrained(out, half_precision=True, model_card="# A random OSDiff model for tests\n")
    return out


def test_checkpoint_workflows_run_in_real_comfyui(tmp_path):
    """The OSDiff workflows on the user's own checkpoint: a random-weight SD 2.1-base single file written with
    ComfyUI's classes (its Load Checkpoint must detect it as SD 2.x, epsilon), an OSDiff folder on the same weights,
    every workflow run in the real frontend; the one-step result against the library's decode of the same stream."""
    comfy = _comfy_or_skip()
    comfy_python = os.environ.get("COMFY_PYTHON")
    if not comfy_python:
        pytest.skip("SKIPPED LOUDLY: COMFY_PYTHON (ComfyUI's Python) is needed to write the test checkpoint")
    harness = shared_path("tools", "comfy_acceptance.py")
    import numpy as np
    import torch
    from PIL import Image

    from diffo import pipeline
    from diffo.hub import load_model
    from diffo.image import load_image, to_pil
    from diffo.tools.demo import sample_photo

    models = tmp_path / "models"
    models.mkdir()
    ckpt = models / "v2-1_512-ema-pruned.safetensors"
    subprocess.run([comfy_python, str(ROOT / "tests" / "comfy_random_sd21.py"), comfy, str(ckpt)], check=True,
                   timeout=900)
    codec = random_osdiff_folder(ckpt, models / "osdiff-lambda1")
    model = load_model(codec)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    photo = load_image(sample_photo())[:, :192, :256]
    to_pil(photo).save(inputs / "diffo_example.png")
    stream = pipeline.encode(model, photo, rate=1.0, seed=3)
    (inputs / "osdiff_example.diffo").write_bytes(stream)
    # ComfyUI's Save Image truncates to 8 bits (np.clip(255 * x).astype(uint8)); compare like with like
    library = (pipeline.decode(model, stream) * 255).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()

    plugin = _clean_copy(tmp_path / "ComfyUI-DiffO")
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    for name in CHECKPOINT_WORKFLOWS:
        shutil.copy2(plugin / "workflows" / f"{name}.json", workflows)
    python = _harness_python()
    report_dir = Path(os.environ.get("DIFFO_HARNESS_REPORT_CHECKPOINT") or tmp_path / "report")
    cmd = [python, str(harness), "--plugin", str(plugin), "--workflows", str(workflows), "--report-dir",
           str(report_dir), "--timeout", "900", "--expect-nodes", "DiffOLoadCodec,DiffOApplyToModel",
           "--input-files", *map(str, sorted(inputs.iterdir())),
           "--model-file", f"checkpoints={ckpt}", "--model-file", f"diffo={codec}"]
    if not _browser_available(python):
        print("NOTE: playwright/chromium not found: the harness runs in API mode, not in the browser")
        cmd.append("--api-only")
    env = {**os.environ, "COMFYUI_PATH": comfy, "COMFY_PYTHON": comfy_python}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3000)
    summary = proc.stdout[proc.stdout.find("=== ComfyUI acceptance summary"):]
    print(summary)
    report = json.loads((report_dir / "report.json").read_text())
    assert not report["import_failed_lines"], report["import_failed_lines"]
    results = {w["name"]: w for w in report["workflows"]}
    assert set(results) == set(CHECKPOINT_WORKFLOWS)
    for name, w in results.items():
        assert not w["missing_node_types"], (name, w["missing_node_types"])
        assert w["ok"], (name, w["status"], w["error"])
    assert "osdiff_00001.diffo" in json.dumps(results["osdiff_compress_checkpoint"]["ui_outputs"])
    (png,) = [Path(o["copied_to"]) for o in results["osdiff_decompress_checkpoint"]["outputs"]
              if o["filename"].endswith(".png")]
    with Image.open(png) as im:
        comfy_pixels = np.asarray(im.convert("RGB")).astype(np.int16)
    assert comfy_pixels.shape == library.shape
    diff = np.abs(comfy_pixels - library.astype(np.int16))
    print(f"ComfyUI one step vs library decode: max {diff.max()} levels, mean {diff.mean():.4f}")
    (report_dir / "equivalence.json").write_text(json.dumps({"max_levels": int(diff.max()),
                                                             "mean_levels": float(diff.mean())}))
    assert diff.max() <= 2 and diff.mean() < 0.05
    assert proc.returncode == 0, summary
