"""DiffO Load Model: the one loader every other DiffO node takes its model from."""

from __future__ import annotations

import torch

from ..diffo.hub import EMBEDDED_NAME, load_model
from . import comfy_env
from .types import MODEL

EMBEDDED = f"{EMBEDDED_NAME} (embedded)"
HUB = "Hugging Face Hub (repo id below)"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def local_models() -> dict[str, str]:
    """'models/diffo/<name>' → folder, for every model folder (one with a config.json) ComfyUI knows."""
    found = {}
    for base in comfy_env.model_folders():
        if base.is_dir():
            for sub in sorted(base.iterdir()):
                if (sub / "config.json").is_file():
                    found.setdefault(f"models/diffo/{sub.name}", str(sub))
    return found


class DiffOLoadModel:
    DESCRIPTION = ("Loads a DiffO codec: the small model embedded in this plugin, a model folder in "
                   "ComfyUI/models/diffo/, or a Hugging Face Hub repo. Loaded once and shared: every loader "
                   "of the same model, device and dtype returns the same copy.")
    CATEGORY = "DiffO/loaders"
    SEARCH_ALIASES = ["diffo model", "codec model", "load codec", "compression model"]
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("diffo_model",)
    OUTPUT_TOOLTIPS = ("The codec; connect it to every DiffO node of this workflow.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        comfy_env.register_model_folder()
        return {"required": {
            "model": ([EMBEDDED, *local_models(), HUB], {
                "default": EMBEDDED,
                "tooltip": "Which model. Streams decode only with the model that made them. Put model folders "
                           "(config.json + safetensors) in ComfyUI/models/diffo/."}),
            "hub_repo_id": ("STRING", {
                "default": "", "tooltip": "Hub repo id (owner/name), used when model is the Hub entry. "
                                          "Downloaded once into the Hugging Face cache."}),
            "revision": ("STRING", {
                "default": "", "tooltip": "Hub branch, tag or commit (empty: main). Pin a commit for "
                                          "reproducible workflows."}),
            "device": (["auto", "cpu", "gpu"], {
                "default": "auto", "tooltip": "auto follows ComfyUI's device choice (--cpu included)."}),
            "dtype": (["auto", *DTYPES], {
                "default": "auto", "tooltip": "Precision of the VAE and denoiser (entropy coding is always "
                                              "exact). auto: float32 on the CPU, ComfyUI's choice on a GPU."}),
        }}

    def load(self, model, hub_repo_id, revision, device, dtype):
        if model == HUB:
            if not hub_repo_id.strip():
                raise ValueError("model is the Hugging Face Hub entry but hub_repo_id is empty: "
                                 "write the repo id (owner/name)")
            source = hub_repo_id.strip()
        elif model == EMBEDDED:
            source = EMBEDDED_NAME
        else:
            folders = local_models()
            if model not in folders:
                raise ValueError(f"{model} is not in ComfyUI/models/diffo/ any more; refresh the node (press r)")
            source = folders[model]
        dev = comfy_env.torch_device(device)
        dt = comfy_env.default_dtype(dev) if dtype == "auto" else DTYPES[dtype]
        return (load_model(source, revision.strip() or None, device=dev, dtype=dt),)
