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
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy or not (Path(comfy) / "main.py").is_file():
        msg = "SKIPPED LOUDLY: COMFYUI_PATH does not point at a ComfyUI checkout; the real-ComfyUI test did not run"
        print(msg)
        pytest.skip(msg)
    harness = shared_path("tools", "comfy_acceptance.py")
    from diffo import pipeline
    from diffo.tools.demo import sample_photo
    from diffo.image import load_image

    plugin = _clean_copy(tmp_path / "ComfyUI-DiffO")
    # the shipped workflows, plus one that must fail: a stream from another model, with its expected message
    workflows = tmp_path / "workflows"
    shutil.copytree(plugin / "workflows", workflows)
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
    assert len(plugin_report["nodes"]) == 12, plugin_report
    assert not report["import_failed_lines"], report["import_failed_lines"]
    results = {w["name"]: w for w in report["workflows"]}
    assert set(results) == {p.stem for p in (ROOT / "workflows").glob("*.json")} | {"wrong_model"}
    for name, w in results.items():
        assert not w["missing_node_types"], (name, w["missing_node_types"])
        assert w["ok"], (name, w["status"], w["error"])
    assert results["wrong_model"]["status"] == "error"
    for name in ("decompress", "rate_sweep", "roundtrip_compare", "decoder_blocks", "core_chain"):
        assert results[name]["outputs"], f"{name} produced no output file"
    assert "compress_00001.diffo" in json.dumps(results["compress"]["ui_outputs"])
    assert proc.returncode == 0, summary
