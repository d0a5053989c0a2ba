"""The repository as ComfyUI and a maintainer see it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_documents_every_node_and_its_connections(plugin):
    """Each node has a row in the README's node table naming it and every one of its inputs and outputs."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## ComfyUI nodes"):readme.index("## Example workflows")]
    for key, cls in plugin.NODE_CLASS_MAPPINGS.items():
        display = plugin.NODE_DISPLAY_NAME_MAPPINGS[key]
        rows = [line for line in table.splitlines() if line.startswith(f"| **{display}** |")]
        assert len(rows) == 1, display
        names = [n for section in cls.INPUT_TYPES().values() for n in section] + list(getattr(cls, "RETURN_NAMES", ()))
        missing = [n for n in names if f"`{n}`" not in rows[0]]
        assert not missing, (display, missing)
    for wf in (ROOT / "workflows").glob("*.json"):
        assert f"workflows/{wf.name}" in readme, wf.name


def test_requirements_do_not_pin_torch():
    reqs = (ROOT / "requirements.txt").read_text()
    assert not re.search(r"^torch\s*==", reqs, re.M)


def test_no_code_path_can_run_code_from_a_model_file():
    """Model folders are safetensors only: nothing in the library or the nodes unpickles, or lets a Hub repo run
    its own code (the pickle-folder refusal itself is tested in test_hub.py). The one torch.load, for the
    official OSDiff checkpoints, is tensors-only (weights_only=True; its refusal is tested in test_osdiff.py)."""
    forbidden = re.compile(r"trust_remote_code\s*=\s*True|torch\.load\((?!.*weights_only=True)|pickle\.loads?\(|"
                           r"use_safetensors\s*=\s*False|weights_only\s*=\s*False")
    for path in sorted((ROOT / "diffo").rglob("*.py")) + sorted((ROOT / "nodes").rglob("*.py")):
        hits = [line for line in path.read_text().splitlines() if forbidden.search(line)]
        assert not hits, (path, hits)
    sd_loader = (ROOT / "diffo" / "models" / "diffo" / "codec.py").read_text()
    assert sd_loader.count("use_safetensors=True") >= 2  # the SD checkpoint's VAE and UNet


def test_no_file_knows_both_families_internals():
    """Each family's modules live in its folder under diffo/models; the rest of the library (pipeline, hub, nodes,
    tools) reaches them through diffo.models (the registry and CodecBase). A file may know one family (the
    training command trains DiffO; the converter builds OSDiff), never both."""
    families = {"diffo": re.compile(r"models\.diffo\b|from \.diffo\b|models/diffo/"),
                "osdiff": re.compile(r"models\.osdiff\b|from \.osdiff\b|models/osdiff/")}
    registry = ROOT / "diffo" / "models" / "__init__.py"
    for path in sorted((ROOT / "diffo").rglob("*.py")) + sorted((ROOT / "nodes").rglob("*.py")):
        if path == registry:
            continue
        code = "\n".join(line for line in path.read_text().splitlines() if "import" in line)
        knows = [name for name, pattern in families.items() if pattern.search(code)]
        assert len(knows) <= 1, (path, knows)
    for name in ("pipeline.py", "hub.py", "bitstream.py", "collection.py"):
        code = (ROOT / "diffo" / name).read_text()
        assert not re.search(r"models\.(diffo|osdiff)\b", code), name
