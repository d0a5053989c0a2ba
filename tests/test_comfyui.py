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


def random_diffo_sd_folder(base_file: Path, out: Path) -> Path:
    """A DiffO model folder at the 'sd' scale on the UNet and VAE of `base_file`, with random latent-codec and
    ControlNet weights (the ControlNet copied from the UNet, as `DiffoCodec.from_sd` starts training) and the
    empty-prompt embedding: what `train --config sd` writes, without the training."""
    import torch

    from diffo.models.diffo.codec import SD_LATENT_CODEC, DiffoCodec
    from diffo.models.osdiff.convert import _diffusers_base, load_base
    from diffo.models.osdiff.prompt import empty_prompt_embedding
    from diffo.models.sd import SD21_BASE_UNET, SD21_VAE

    base = load_base(base_file)
    unet, vae = _diffusers_base(base)
    prompt = empty_prompt_embedding(base)
    del base
    torch.manual_seed(0)
    model = DiffoCodec(vae_config=SD21_VAE, unet_config=SD21_BASE_UNET, latent_codec_config=SD_LATENT_CODEC,
                       prediction_type="epsilon", prompt_length=77, control_embedding_channels=64,
                       noise_rates=[0.0, 1.0], noise_strengths=[0.5, 0.15], name="diffo-sd-random-test").eval()
    den = model.denoiser
    with torch.no_grad():
        den.unet.load_state_dict({k: v.float() for k, v in unet.items()})
        model.vae.load_state_dict({k: v.float() for k, v in vae.items()})
        den.controlnet.load_state_dict(den.controlnet.from_unet(
            den.unet, conditioning_channels=4, conditioning_embedding_out_channels=(64,)).state_dict())
        for p in den.controlnet.parameters():  # zero-initialised joins and hint embedding output would make
            if p.abs().max() == 0:  # the control module a no-op and hide a wrongly fed hint
                p.normal_(0, 0.02)
        den.prompt_embeds.copy_(prompt)
    model.update()
    model.save_pretrained(out, half_precision=True, model_card="# A random DiffO sd-scale model for tests\n")
    return out


def _retarget(workflow: dict, codec: str, stream: str, prefix: str) -> dict:
    """The same workflow on another codec folder and stream, saving under another prefix."""
    for node in workflow["nodes"]:
        kind, values = node["type"], node.get("widgets_values")
        if kind == "DiffOLoadCodec":
            values[0] = f"models/diffo/{codec}"
        elif kind == "DiffOLoadBitstream":
            values[0] = stream
        elif kind in ("SaveImage", "DiffOSaveBitstream"):
            values[0] = values[0].replace("osdiff", prefix)
    return workflow


def test_checkpoint_workflows_run_in_real_comfyui(tmp_path):
    """The checkpoint workflows on the user's own checkpoint, for both SD-scale families: a random-weight SD
    2.1-base single file written with ComfyUI's classes (its Load Checkpoint must detect it as SD 2.x, epsilon), an
    OSDiff folder and a DiffO 'sd' folder on the same weights, every workflow run in the real frontend once per
    family (the DiffO copies differ only in the codec folder, stream and output prefix they name); the one-step result against the
    library's decode of the same stream."""
    comfy = _comfy_or_skip()
    comfy_python = os.environ.get("COMFY_PYTHON")
    if not comfy_python:
        pytest.skip("SKIPPED LOUDLY: COMFY_PYTHON (ComfyUI's Python) is needed to write the test checkpoint")
    harness = shared_path("tools", "comfy_acceptance.py")
    import gc

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
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    photo = load_image(sample_photo())[:, :192, :256]
    to_pil(photo).save(inputs / "diffo_example.png")
    families = {"osdiff": (random_osdiff_folder, "osdiff-lambda1"), "diffo_sd": (random_diffo_sd_folder, "diffo-sd")}
    library = {}
    for family, (build, folder) in families.items():
        codec = build(ckpt, models / folder)
        model = load_model(codec)
        stream = pipeline.encode(model, photo, rate=1.0, seed=3)
        (inputs / f"{family}_example.diffo").write_bytes(stream)
        # ComfyUI's Save Image truncates to 8 bits (np.clip(255 * x).astype(uint8)); compare like with like
        library[family] = (pipeline.decode(model, stream) * 255).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        del model
        gc.collect()  # two SD-size models in turn, not at once

    plugin = _clean_copy(tmp_path / "ComfyUI-DiffO")
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    for name in CHECKPOINT_WORKFLOWS:
        shutil.copy2(plugin / "workflows" / f"{name}.json", workflows)
        flow = json.loads((plugin / "workflows" / f"{name}.json").read_text())
        (workflows / f"{name.replace('osdiff', 'diffo_sd')}.json").write_text(
            json.dumps(_retarget(flow, families["diffo_sd"][1], "diffo_sd_example.diffo", "diffo_sd")))
    python = _harness_python()
    report_dir = Path(os.environ.get("DIFFO_HARNESS_REPORT_CHECKPOINT") or tmp_path / "report")
    cmd = [python, str(harness), "--plugin", str(plugin), "--workflows", str(workflows), "--report-dir",
           str(report_dir), "--timeout", "900", "--expect-nodes", "DiffOLoadCodec,DiffOApplyToModel",
           "--input-files", *map(str, sorted(inputs.iterdir())), "--model-file", f"checkpoints={ckpt}",
           *(a for _, folder in families.values() for a in ("--model-file", f"diffo={models / folder}"))]
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
    assert set(results) == {n.replace("osdiff", f) for n in CHECKPOINT_WORKFLOWS for f in families}
    for name, w in results.items():
        assert not w["missing_node_types"], (name, w["missing_node_types"])
        assert w["ok"], (name, w["status"], w["error"])
    equivalence = {}
    for family in families:
        assert f"{family}_00001.diffo" in json.dumps(results[f"{family}_compress_checkpoint"]["ui_outputs"])
        (png,) = [Path(o["copied_to"]) for o in results[f"{family}_decompress_checkpoint"]["outputs"]
                  if o["filename"].endswith(".png")]
        with Image.open(png) as im:
            comfy_pixels = np.asarray(im.convert("RGB")).astype(np.int16)
        assert comfy_pixels.shape == library[family].shape
        diff = np.abs(comfy_pixels - library[family].astype(np.int16))
        print(f"{family}: ComfyUI one step vs library decode: max {diff.max()} levels, mean {diff.mean():.4f}, "
              f"{int((diff > 0).sum())} of {diff.size} values differ")
        equivalence[family] = {"max_levels": int(diff.max()), "mean_levels": float(diff.mean()),
                               "values_differing": int((diff > 0).sum()), "values": int(diff.size)}
        assert diff.max() <= 2 and diff.mean() < 0.05, (family, equivalence[family])
    (report_dir / "equivalence.json").write_text(json.dumps(equivalence, indent=1))
    assert proc.returncode == 0, summary
