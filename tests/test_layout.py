"""The repository as ComfyUI and a maintainer see it."""

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plugin_imports_by_file_path_like_comfyui():
    # ComfyUI loads custom_nodes/<folder>/__init__.py by path, as a package named after the folder.
    spec = importlib.util.spec_from_file_location("ComfyUI_DiffO_under_test", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    assert isinstance(module.NODE_CLASS_MAPPINGS, dict)
    assert isinstance(module.NODE_DISPLAY_NAME_MAPPINGS, dict)


def test_library_never_imports_comfyui():
    pattern = re.compile(r"^\s*(import|from)\s+(comfy|comfy_extras|folder_paths|nodes)\b", re.M)
    offenders = [p.relative_to(ROOT).as_posix() for p in (ROOT / "diffo").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_requirements_do_not_pin_torch():
    reqs = (ROOT / "requirements.txt").read_text()
    assert not re.search(r"^torch\s*==", reqs, re.M)
