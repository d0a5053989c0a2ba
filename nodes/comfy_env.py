"""The ComfyUI services the nodes use (folders, devices, progress, interrupts), with plain stand-ins when
ComfyUI is absent, so the nodes import and run in tests and scripts too."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

try:  # inside ComfyUI
    import comfy.model_management as model_management
    import comfy.utils as comfy_utils
    import folder_paths
except ImportError:  # tests, scripts
    model_management = comfy_utils = folder_paths = None

IN_COMFYUI = folder_paths is not None
MODEL_FOLDER = "diffo"  # ComfyUI/models/diffo/<model folder>/{config.json, *.safetensors}

# Stand-in folders outside ComfyUI (tests point them elsewhere with these variables).
_FALLBACK_ROOT = Path(tempfile.gettempdir()) / "comfyui-diffo"


def register_model_folder() -> None:
    if IN_COMFYUI and MODEL_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))


def model_folders() -> list[Path]:
    """Where local DiffO models live: every path registered for `models/diffo` (extra_model_paths.yaml too)."""
    if IN_COMFYUI:
        return [Path(p) for p in folder_paths.get_folder_paths(MODEL_FOLDER)]
    return [Path(os.environ.get("DIFFO_MODELS_DIR", _FALLBACK_ROOT / "models" / MODEL_FOLDER))]


def input_directory() -> Path:
    if IN_COMFYUI:
        return Path(folder_paths.get_input_directory())
    return Path(os.environ.get("DIFFO_INPUT_DIR", _FALLBACK_ROOT / "input"))


def output_directory() -> Path:
    if IN_COMFYUI:
        return Path(folder_paths.get_output_directory())
    return Path(os.environ.get("DIFFO_OUTPUT_DIR", _FALLBACK_ROOT / "output"))


def torch_device(choice: str) -> torch.device:
    """'auto' is ComfyUI's own choice (its --cpu / --gpu flags included); outside ComfyUI, CUDA when present."""
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "gpu":
        if IN_COMFYUI:
            dev = model_management.get_torch_device()
            if dev.type != "cpu":
                return dev
        elif torch.cuda.is_available():
            return torch.device("cuda")
        raise RuntimeError("device 'gpu' was chosen, but no GPU is available (ComfyUI runs on the CPU): choose auto or cpu")
    if IN_COMFYUI:
        return model_management.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 where ComfyUI would run a model in fp16 on this device, else float32."""
    if device.type == "cpu":
        return torch.float32
    if IN_COMFYUI:
        return torch.float16 if model_management.should_use_fp16(device) else torch.float32
    return torch.float16


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel."""
    if IN_COMFYUI:
        model_management.throw_exception_if_processing_interrupted()


class Progress:
    """A node's progress bar (drawn on the node in ComfyUI; updating it also honours Cancel)."""

    def __init__(self, total: int):
        self.total = max(1, int(total))
        self.done = 0
        self._bar = comfy_utils.ProgressBar(self.total) if IN_COMFYUI else None

    def step(self, n: int = 1) -> None:
        self.to(self.done + n)

    def to(self, value: int) -> None:
        """Move the bar to `value` (of `total`), after checking for Cancel."""
        check_interrupt()
        self.done = min(self.total, max(self.done, int(value)))
        if self._bar is not None:
            self._bar.update_absolute(self.done, self.total)
