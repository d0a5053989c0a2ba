"""Resumable training checkpoints, all in safetensors (plus a small JSON of progress)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..entropy import resize_table_buffers


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"{pid}.{k}"] = t.detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: Path, modules: dict, optimizers: dict, progress: dict) -> None:
    """Write every module/optimizer state and progress.json into `folder`, atomically per file."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, m in modules.items():
        tmp = folder / f".{name}.safetensors.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}, tmp)
        os.replace(tmp, folder / f"{name}.safetensors")
    metas = {}
    for name, opt in optimizers.items():
        tensors, metas[name] = _flatten_optimizer(opt)
        tmp = folder / f".opt_{name}.safetensors.tmp"
        save_file(tensors or {"_empty": torch.zeros(0)}, tmp)
        os.replace(tmp, folder / f"opt_{name}.safetensors")
    tmp = folder / ".progress.json.tmp"
    tmp.write_text(json.dumps({"progress": progress, "optimizers": metas}, indent=1))
    os.replace(tmp, folder / "progress.json")


def load_progress(folder: Path) -> dict | None:
    p = folder / "progress.json"
    return json.loads(p.read_text())["progress"] if p.is_file() else None


def load_module(folder: Path, name: str, module: torch.nn.Module) -> bool:
    p = folder / f"{name}.safetensors"
    if not p.is_file():
        return False
    state = load_file(p)
    resize_table_buffers(module, state)
    module.load_state_dict(state)
    return True


def load_optimizer(folder: Path, name: str, opt: torch.optim.Optimizer) -> bool:
    p = folder / f"opt_{name}.safetensors"
    if not p.is_file():
        return False
    meta = json.loads((folder / "progress.json").read_text())["optimizers"].get(name)
    if meta is None:
        return False
    tensors = {k: v for k, v in load_file(p).items() if k != "_empty"}
    opt.load_state_dict(_unflatten_optimizer(tensors, meta))
    return True
