"""Finding and loading DiffO models: one resolver and one per-process cache for every caller.

The CLI, the library (`diffo.load_model`) and the ComfyUI nodes all go through `resolve_model_dir` (what folder
does a model name mean) and `load_model` (the one loaded copy of that folder per device and dtype), so a model
is read from disk once per process, however many nodes or calls ask for it.

A *source* is one of:

* nothing / ``"default"`` / ``"embedded"`` / ``"diffo-tiny"``: the model shipped inside the package;
* a local folder in Hub layout (``config.json``, ``diffusion_pytorch_model.safetensors``, ``README.md``);
* a Hugging Face Hub repo id (``owner/name``), downloaded into (or, offline, read from) the local Hugging Face
  cache. ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` and ``HF_HOME`` are read when a model is resolved, not only when
  huggingface_hub is first imported.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ModelLoadError

if TYPE_CHECKING:  # torch and the codec are imported when a model is loaded, so `import diffo.hub` stays cheap
    import torch

    from .models import CodecBase

logger = logging.getLogger(__name__)

EMBEDDED_NAME = "diffo-tiny"
EMBEDDED_DIR = Path(__file__).resolve().parent / "weights" / "diffo-tiny"
DEFAULT_ALIASES = {None, "", "default", "embedded", "diffo-tiny"}
MODEL_FILES = ["config.json", "*.safetensors", "README.md"]

_TRUE = {"1", "on", "yes", "true"}


# ------------------------------------------------------------------------------------------------ resolving
def resolve_model_dir(source: str | Path | None, revision: str | None = None,
                      allow_patterns: list[str] | None = None) -> Path:
    """The local folder a model source names (see the module docstring); raises `ModelLoadError` with the
    reason and the fix when there is none. `revision` (branch, tag or commit) applies to Hub repo ids only;
    `allow_patterns` picks the files to download from the Hub (default: `MODEL_FILES`)."""
    if isinstance(source, str):
        source = source.strip()
    if not isinstance(source, Path) and source in DEFAULT_ALIASES:
        if not EMBEDDED_DIR.is_dir():
            raise ModelLoadError(
                f"the embedded model {EMBEDDED_NAME!r} is missing from this installation (expected in "
                f"{EMBEDDED_DIR}): reinstall the package, or pass a model folder or a Hub repo id instead")
        return EMBEDDED_DIR

    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return path.resolve()
    if isinstance(source, Path) or _looks_like_path(text):
        if path.exists():
            raise ModelLoadError(f"model folder not found: {text} is a file; pass the folder that holds "
                                 "config.json and diffusion_pytorch_model.safetensors")
        hint = "" if text.count("/") < 2 else " (nor is it a Hub repo id: those look like 'owner/name')"
        raise ModelLoadError(f"model folder not found: {text}{hint}")
    return _download(text, revision, allow_patterns or MODEL_FILES)


def _looks_like_path(text: str) -> bool:
    """Whether a source string is meant as a filesystem path rather than a Hub repo id ('name' or 'owner/name').
    A repo id has at most one '/', so a string with two is a path."""
    return (os.path.isabs(text) or text.startswith((".", "~")) or "\\" in text
            or (os.sep != "/" and os.sep in text) or text.count("/") >= 2 or os.path.isfile(text))


def _env_true(*names: str) -> bool:
    return any((os.environ.get(n) or "").strip().lower() in _TRUE for n in names)


def _hub_cache_dir() -> str | None:
    """The Hugging Face cache folder as the environment says *now* (huggingface_hub reads it once, at import);
    None: huggingface_hub's own setting."""
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return os.path.expandvars(os.path.expanduser(env[name]))
    if env.get("HF_HOME"):
        return os.path.join(os.path.expandvars(os.path.expanduser(env["HF_HOME"])), "hub")
    return None


def _hub_errors():
    """Exception classes of huggingface_hub, wherever this version keeps them (`errors` since 0.23-ish)."""
    import importlib

    mods = []
    for name in ("huggingface_hub.errors", "huggingface_hub.utils"):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            pass

    def get(name):
        for mod in mods:
            cls = getattr(mod, name, None)
            if isinstance(cls, type):
                return cls
        return type(f"_Missing{name}", (Exception,), {})  # never raised: an except clause that matches nothing

    return {n: get(n) for n in ("HFValidationError", "LocalEntryNotFoundError", "RepositoryNotFoundError",
                                "GatedRepoError", "RevisionNotFoundError", "OfflineModeIsEnabled")}


def _download(repo_id: str, revision: str | None, allow_patterns: list[str]) -> Path:
    import huggingface_hub
    from huggingface_hub import constants

    err = _hub_errors()
    offline = bool(getattr(constants, "HF_HUB_OFFLINE", False)) or _env_true("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    cache_dir = _hub_cache_dir() or getattr(constants, "HF_HUB_CACHE", None)
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns,
                                                   cache_dir=cache_dir, local_files_only=offline)
    except err["HFValidationError"] as e:
        raise ModelLoadError(f"{repo_id!r} is neither a local folder nor a valid Hub repo id ('owner/name'): "
                             f"{e}") from e
    except err["LocalEntryNotFoundError"] as e:
        state = ("offline mode is on (HF_HUB_OFFLINE=1)" if offline
                 else "the Hugging Face Hub could not be reached (no network?)")
        fix = ("unset HF_HUB_OFFLINE and download it once with network access" if offline
               else "download it once where the network is reachable")
        raise ModelLoadError(
            f"model {where} is not in the local Hugging Face cache ({cache_dir}) and {state}: {fix}, point "
            f"HF_HUB_CACHE / HF_HOME at a cache that holds it, or pass a local model folder. ({e})") from e
    except err["GatedRepoError"] as e:
        raise ModelLoadError(f"Hub repo {repo_id!r} is gated: accept its terms on huggingface.co and log in "
                             f"(`hf auth login` or HF_TOKEN). ({e})") from e
    except err["RepositoryNotFoundError"] as e:
        raise ModelLoadError(f"Hub repo {repo_id!r} not found (or it is private and no valid token was given): "
                             f"check the name, or log in. ({e})") from e
    except err["RevisionNotFoundError"] as e:
        raise ModelLoadError(f"Hub repo {repo_id!r} has no revision {revision!r} (branch, tag or commit). "
                             f"({e})") from e
    except (OSError, ConnectionError, TimeoutError, err["OfflineModeIsEnabled"]) as e:
        raise ModelLoadError(f"cannot download model {where} from the Hugging Face Hub: "
                             f"{type(e).__name__}: {e}") from e
    except Exception as e:  # e.g. network library errors that are not OSError subclasses
        if type(e).__module__.split(".")[0] in ("huggingface_hub", "httpx", "httpx2", "requests", "urllib3"):
            raise ModelLoadError(f"cannot download model {where} from the Hugging Face Hub: "
                                 f"{type(e).__name__}: {e}") from e
        raise
    return Path(folder).resolve()


# ------------------------------------------------------------------------------------------------ caching
_CACHE: dict[tuple[str, str, "torch.dtype"], "CodecBase"] = {}
_LOCK = threading.Lock()


def load_model(source: str | Path | None = None, revision: str | None = None, *,
               device: "str | torch.device" = "cpu", dtype: "torch.dtype | None" = None) -> "CodecBase":
    """The model (any family) `source` names (see `resolve_model_dir`), in eval mode without gradients, on `device`
    in `dtype` (default float32) except its latent codec, which stays float32 (integer-exact entropy coding).
    Loaded once per (folder, device, dtype) and process: later calls, whatever the spelling of the same source,
    return the same object, so do not modify it in place."""
    import torch

    from .models import load_codec

    dtype = torch.float32 if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, not {dtype!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())  # "cuda" and "cuda:0" are one cache entry
    folder = resolve_model_dir(source, revision)
    key = (str(folder), str(dev), dtype)
    model = _CACHE.get(key)
    if model is not None:
        return model
    with _LOCK:
        model = _CACHE.get(key)
        if model is None:
            try:
                model = load_codec(folder)
            except (RuntimeError, AttributeError, OSError) as e:  # e.g. weight shapes that do not fit config.json
                raise ModelLoadError(f"cannot load the DiffO model in {folder}: {type(e).__name__}: {e}") from e
            model.eval().requires_grad_(False)
            place(model, dev, dtype)
            _CACHE[key] = model
            logger.info("loaded DiffO model %r from %s (fingerprint %s) on %s as %s",
                        model.config.name, folder, model.fingerprint.hex(), dev, dtype)
    return model


def place(model, device, dtype) -> None:
    """Move `model` to `device` and its float networks to `dtype`, never casting the latent codec: its exact
    layers need every bit of their float32 weights (casting to float16 and back would round them, and the copy
    would code other symbols than the file's weights, under the same fingerprint)."""
    import torch

    torch.nn.Module.to(model, device=device)  # nn.Module.to: diffusers' ModelMixin.to warns about dtype casts
    for name, child in model.named_children():
        if name != "latent_codec":
            torch.nn.Module.to(child, dtype=dtype)
    for name, buf in list(model._buffers.items()):
        if buf is not None and buf.is_floating_point():
            model._buffers[name] = buf.to(dtype)


def clear_cache() -> None:
    """Forget every loaded model (they are freed once nothing else holds them)."""
    with _LOCK:
        _CACHE.clear()


def cached_models() -> list[tuple[str, str, "torch.dtype"]]:
    """The keys (folder, device, dtype) of the models loaded so far, oldest first."""
    with _LOCK:
        return list(_CACHE)
