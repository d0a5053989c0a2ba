"""Measurements that must not share a process (peak memory, thread count): run one function call in a fresh
interpreter and read back the JSON it prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # so the child imports this copy of diffo


def run_json(code: str, env: dict | None = None) -> dict:
    """Run `code` (which prints one JSON object last) with `python -c`; its object, or {"error": stderr tail}."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-600:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])
