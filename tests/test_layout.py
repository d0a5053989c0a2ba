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
