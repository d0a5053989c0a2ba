"""What every model family shares: its folder format (config.json + safetensors + model card), safe loading,
its fingerprint, Hub upload, and the small interface through which the pipeline runs a family's steps.

    image ─ encode_latent ─ analyse ─ streams(rate_q) ──────────────► .diffo sub-streams   (encoder side)
    sub-streams ─ entropy_decode ─ c_hat ─ control(strength, noise) ─ denoise ─ latent ─ decode_latent ─ image

`c_hat` is what the family's decoder is conditioned on (DiffO: the decoded latent ĉ; OSDiff: the hint). The
pipeline (`diffo.pipeline`) knows only this interface; each family's internals live in its own folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin

from ..entropy import entropy_tables_ready, resize_table_buffers
from ..errors import ModelLoadError

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class CodecBase(ModelMixin, ConfigMixin):
    """Base of the model families. A subclass sets `family`, `family_id` (the container's family field) and
    `format_version` (the `.diffo` format it writes), has a `latent_codec` (integer-exact entropy coding: kept
    float32 in every precision) and implements the stages below."""

    config_name = CONFIG_NAME
    family: str = ""
    family_id: int = -1
    format_version: int = 2
    has_rate_levels: bool = True  # False: one rate per checkpoint (rate and bpp choose nothing)
    _fingerprint: bytes | None = None

    # --------------------------------------------------------------------------------- the stages
    def analyse(self, x: torch.Tensor, size: tuple[int, int]):
        """Padded image [1, 3, H, W] in [0, 1] → the family's analysis (what every rate level reuses)."""
        raise NotImplementedError

    def streams(self, analysis, rate_q: int, coder=None) -> tuple[bytes, ...]:
        """The sub-streams of rate level `rate_q` (`coder`: code afresh with that coder instead of the
        format's own, reusing nothing cached)."""
        raise NotImplementedError

    def check_streams(self, bs) -> None:
        """Raise BitstreamError when a parsed container's sub-streams do not fit this family."""

    def entropy_decode(self, bs, coder) -> torch.Tensor:
        """Parsed container → c_hat [1, C, h, w] at the padded latent size."""
        raise NotImplementedError

    def decode_symbols(self, bs, coder) -> tuple[torch.Tensor | None, ...]:
        """The entropy-decoded integer symbols of a stream (identical on every machine)."""
        raise NotImplementedError

    def strength_for_rate(self, rate: float) -> float:
        raise NotImplementedError

    def control(self, c_hat: torch.Tensor, strength: float, noise: torch.Tensor):
        raise NotImplementedError

    def denoise(self, ctrl) -> torch.Tensor:
        raise NotImplementedError

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch [B,3,H,W] in [0,1] (H, W multiples of 8) → scaled latent [B,C,H/8,W/8]."""
        dist = self.vae.encode(x.to(self.dtype) * 2 - 1).latent_dist
        return dist.mode() * self.vae.config.scaling_factor

    def set_latent_scale(self, scale: float) -> None:
        """Set the VAE's latent scaling factor in the VAE and in this model's own `vae_config`, which is what
        `save_pretrained` writes (registering it on the VAE alone is lost on saving)."""
        self.vae.register_to_config(scaling_factor=scale)
        if self.config.get("vae_config"):
            self.register_to_config(vae_config={**dict(self.config.vae_config), "scaling_factor": scale})
        self._fingerprint = None

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent → image batch in [0, 1]."""
        return self.decode_raw_latent(latent.float() / self.vae.config.scaling_factor)

    def decode_raw_latent(self, raw: torch.Tensor) -> torch.Tensor:
        """Latent in the VAE's own units (ComfyUI's LATENT convention) → image batch in [0, 1]."""
        return ((self.decode_raw_latent_signed(raw).float() + 1) / 2).clamp(0, 1)

    def decode_raw_latent_signed(self, raw: torch.Tensor) -> torch.Tensor:
        """The decoder network alone: raw latent → image in [-1, 1], not clamped (differentiable; training)."""
        return self.vae.decode(raw.to(self.dtype)).sample

    # ------------------------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | Path, half_precision: bool = False, model_card: str | None = None,
                        **_ignored) -> Path:
        """Write config.json + safetensors (+ README.md model card). `half_precision` stores the float networks
        as float16 (loaded back as float32); the latent codec always stays float32 because its integer-exact
        layers need every bit. A half-precision copy is a (slightly) different model with its own fingerprint:
        encode with the loaded copy, not with the float32 model that wrote it."""
        from safetensors.torch import save_file

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        if not entropy_tables_ready(self):
            raise ValueError("entropy tables are not built: call model.update() before saving")
        state = {}
        for k, v in self.state_dict().items():
            v = v.detach().cpu().contiguous()
            if half_precision and v.is_floating_point() and not k.startswith("latent_codec."):
                v = v.half()
            state[k] = v
        self.save_config(out)
        save_file(state, out / WEIGHTS_NAME, metadata={"format": "pt", "diffo_name": self.config.name,
                                                       "diffo_family": self.family})
        if model_card is not None:
            (out / "README.md").write_text(model_card, encoding="utf-8")
        return out

    @classmethod
    def from_pretrained(cls, pretrained: str | Path, revision: str | None = None, **_ignored):
        """Load from a local folder in Hub layout or a Hub repo id (see `diffo.hub.resolve_model_dir`)."""
        from ..hub import resolve_model_dir

        return cls.from_dir(resolve_model_dir(pretrained, revision))

    @classmethod
    def from_dir(cls, folder: Path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        config = read_config(folder)
        if config.get("_class_name") not in (None, cls.__name__):
            raise ModelLoadError(f"{folder / CONFIG_NAME} describes a {config.get('_class_name')}, "
                                 f"not a DiffO model ({cls.__name__})")
        try:
            model = cls.from_config(config)
            state = load_file(folder / WEIGHTS_NAME)
            model._load_exact_state(state)
        except (ValueError, TypeError, KeyError, RuntimeError, OSError, SafetensorError) as e:
            raise ModelLoadError(f"cannot load the {cls.family or 'DiffO'} model in {folder}: {e}") from e
        model._fingerprint = fingerprint_of(model.config, state)
        return model.eval()

    def _load_exact_state(self, state: dict) -> None:
        resize_table_buffers(self, state)
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ModelLoadError(f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
        if bad:  # a ValueError: from_dir says which folder
            raise ValueError(f"weights do not match the config: {bad[0]} is {tuple(state[bad[0]].shape)}, "
                             f"expected {tuple(own[bad[0]].shape)}")
        self.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})

    def push_to_hub(self, repo_id: str, model_card: str | None = None, private: bool = False,
                    token: str | None = None, commit_message: str = "Upload DiffO model", **_ignored) -> str:
        """Save to a temporary folder and upload it with huggingface_hub (needs network and a token)."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, model_card=model_card or f"# {self.config.name}\n\nA DiffO model.\n")
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
        return str(info)

    # ---------------------------------------------------------------------------------- identity
    @property
    def fingerprint(self) -> bytes:
        """8 bytes identifying config + weights: written into every bitstream, checked on decode."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_of(self.config, self.state_dict())
        return self._fingerprint


def load_parts_from_dir(parts, folder: Path, prefixes: tuple[str, ...]) -> bytes:
    """Read only the tensors named under `prefixes` from a model folder's weights into `parts` (a module whose
    state has exactly those names: checked), and return the whole model's fingerprint, computed by streaming the
    file one tensor at a time (the codec-only loaders of the families, for running on a user's own UNet/VAE)."""
    from safetensors import SafetensorError, safe_open

    own = parts.state_dict()
    state = {}

    def tensors(f):  # every tensor once, in name order: the parts are kept, the rest only hashed
        for key in sorted(f.keys()):
            t = f.get_tensor(key)
            if key.startswith(prefixes):
                state[key] = t
            yield key, t

    try:
        with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
            fingerprint = fingerprint_stream(parts.config, tensors(f))
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"cannot read {folder / WEIGHTS_NAME}: {e}") from e
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ModelLoadError(f"the codec weights in {folder} do not match its config: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    resize_table_buffers(parts, state)  # CDF tables are sized by update(): take the stored shapes
    own = parts.state_dict()
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ModelLoadError(f"the codec weights in {folder} do not match its config: {bad[0]} is "
                             f"{tuple(state[bad[0]].shape)}, expected {tuple(own[bad[0]].shape)}")
    parts.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return fingerprint


def padded_latent_shape(h: int, w: int, multiple: int) -> tuple[int, int]:
    """The latent size a codec works on: an H x W image padded to `multiple` pixels, over the VAE's factor 8."""
    return -(-h // multiple) * multiple // 8, -(-w // multiple) * multiple // 8


def read_config(folder: Path) -> dict:
    """The config.json of a model folder, after refusing pickle weight files and incomplete folders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder not found: {folder}")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(f"{folder} holds pickle weight files ({', '.join(pickles)}); DiffO loads "
                             "safetensors only, since pickle files can run code: remove them")
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise ModelLoadError(f"{folder} is not a DiffO model folder: {p.name} is missing")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"cannot load the DiffO model in {folder}: {cfg_path.name}: {e}") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"cannot load the DiffO model in {folder}: {cfg_path.name} is not a JSON object")
    return config


def public_config(config) -> dict:
    """A diffusers config without its private bookkeeping keys (`_name_or_path`, `_diffusers_version`, …)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


# Config keys added after models were published, left out of the fingerprint while unset, so that those models
# keep the fingerprint their files carry.
LATER_OPTIONAL_KEYS = {"decoder_config"}


def fingerprint_of(config, state: dict) -> bytes:
    """SHA-256 over the canonical config and every stored tensor (name, dtype, shape, bytes); first 8 bytes."""
    return fingerprint_stream(config, ((k, state[k]) for k in sorted(state)))


def fingerprint_stream(config, items) -> bytes:
    """`fingerprint_of` over (name, tensor) pairs given in sorted name order, one at a time (a file streamed)."""
    h = hashlib.sha256()
    canonical = {k: v for k, v in public_config(config).items() if not (k in LATER_OPTIONAL_KEYS and v is None)}
    h.update(json.dumps(canonical, sort_keys=True, default=str).encode())
    for k, v in items:
        v = v.detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.digest()[:8]
