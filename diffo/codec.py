"""`DiffoCodec`: the whole model, composed from diffusers blocks and our entropy models.

    image ─ VAE encoder ─ latent ─ DiffoLatentCodec ─ streams        (encoder side)
    streams ─ DiffoLatentCodec ─ ĉ ─ OneStepDenoiser(strength(rate)) ─ ẑ₀ ─ VAE decoder ─ image

One class, two scales: `DiffoCodec.from_preset("tiny")` (trains on a CPU; the embedded default) and
`DiffoCodec.from_sd(path_or_repo)` (VAE and UNet of a Stable Diffusion 2.1 / SD-Turbo checkpoint).
A saved model is a folder in Hub layout: `config.json`, `diffusion_pytorch_model.safetensors`, `README.md`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .tiling import configure_vae
from .denoiser import ControlOutput, OneStepDenoiser
from .entropy import entropy_tables_ready, resize_table_buffers
from .errors import ModelLoadError
from .latent_codec import DiffoLatentCodec
from .layers import use_contiguous_group_norm, zero_module
from .noise import check_noise_map, strength_for_rate, timestep_for_strength

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[32, 64, 64, 64], mid_block_add_attention=False, scaling_factor=1.0,
)
TINY_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[48, 96, 128],
    down_block_types=["DownBlock2D"] * 3, up_block_types=["UpBlock2D"] * 3, norm_num_groups=16,
    cross_attention_dim=32, attention_head_dim=8, mid_block_type="UNetMidBlock2DCrossAttn",
)
TINY_LATENT_CODEC = dict(hidden=64, code_dim=8, codebook_size=256, y_channels=64, z_channels=32, num_gains=8)
# Stable Diffusion 2.1's VAE and UNet shapes (diffusers configs of stabilityai/stable-diffusion-2-1), for
# random-weight timing of the paper-scale model where no checkpoint can be downloaded.
SD21_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=768,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], scaling_factor=0.18215,
)
SD21_UNET = dict(
    sample_size=96, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
)
SD_LATENT_CODEC = dict(hidden=192, code_dim=16, codebook_size=1024, y_channels=320, z_channels=192, num_gains=8)


class DiffoCodec(ModelMixin, ConfigMixin):
    """The DiffO codec. Constructor arguments are its `config.json`."""

    config_name = CONFIG_NAME

    @register_to_config
    def __init__(
        self,
        vae_config: dict | None = None,
        unet_config: dict | None = None,
        latent_codec_config: dict | None = None,
        control_embedding_channels: int = 32,
        prediction_type: str = "sample",
        num_train_timesteps: int = 1000,
        prompt_length: int = 1,
        noise_rates: list = (0.0, 1.0),
        noise_strengths: list = (0.5, 0.15),
        pad_multiple: int = 64,
        name: str = "diffo-tiny",
    ):
        super().__init__()
        check_noise_map(list(noise_rates), list(noise_strengths))
        self.vae = AutoencoderKL.from_config(dict(vae_config or TINY_VAE))
        latent_channels = self.vae.config.latent_channels
        self.latent_codec = DiffoLatentCodec(latent_channels=latent_channels,
                                             **dict(latent_codec_config or TINY_LATENT_CODEC))
        self.denoiser = OneStepDenoiser(dict(unet_config or TINY_UNET), latent_channels, control_embedding_channels,
                                        prediction_type, num_train_timesteps, prompt_length)
        use_contiguous_group_norm(self)  # thread-count-independent pixels (see layers.ContiguousGroupNorm)
        configure_vae(self.vae)  # large images in tiles (tiling.py)
        self._fingerprint: bytes | None = None

    # ----------------------------------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str = "tiny", **overrides) -> "DiffoCodec":
        """A randomly initialised model of a named configuration ('tiny' is the only pixel-space preset)."""
        if name != "tiny":
            raise ValueError(f"unknown preset {name!r}: use 'tiny', or DiffoCodec.from_sd(...) for the 'sd' scale")
        overrides.setdefault("prediction_type", "residual")
        model = cls(vae_config=TINY_VAE, unet_config=TINY_UNET, latent_codec_config=TINY_LATENT_CODEC, **overrides)
        if model.config.prediction_type == "residual":
            zero_module(model.denoiser.unet.conv_out)  # start as the identity ẑ₀ = ĉ
        return model

    @classmethod
    def sd21_sized(cls, **overrides) -> "DiffoCodec":
        """Randomly initialised at Stable Diffusion 2.1 size (what `from_sd` builds from a real checkpoint):
        for timing and memory measurements only."""
        kwargs = dict(latent_codec_config=SD_LATENT_CODEC, prediction_type="v_prediction", prompt_length=77,
                      control_embedding_channels=64, name="diffo-sd21-random")
        kwargs.update(overrides)
        return cls(vae_config=SD21_VAE, unet_config=SD21_UNET, **kwargs)

    @classmethod
    def from_sd(cls, pretrained: str | Path, revision: str | None = None, **overrides) -> "DiffoCodec":
        """The 'sd' scale: VAE and UNet of a diffusers Stable Diffusion 2.1 / SD-Turbo checkpoint (local folder
        or Hub repo id), a fresh latent codec and a control module copied from the UNet (ControlNet init)."""
        from .hub import resolve_model_dir

        root = resolve_model_dir(pretrained, revision, allow_patterns=["vae/*", "unet/*", "scheduler/*"])
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", use_safetensors=True)
        prediction_type = "epsilon"
        sched = root / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            prediction_type = json.loads(sched.read_text()).get("prediction_type", prediction_type)
        kwargs = dict(latent_codec_config=SD_LATENT_CODEC, prediction_type=prediction_type, prompt_length=77,
                      noise_rates=[0.0, 1.0], noise_strengths=[0.5, 0.15], control_embedding_channels=64,
                      name=f"diffo-sd:{Path(str(pretrained)).name}")
        kwargs.update(overrides)
        model = cls(vae_config=_public(vae.config), unet_config=_public(unet.config), **kwargs)
        model.vae.load_state_dict(vae.state_dict())
        model.denoiser.unet.load_state_dict(unet.state_dict())
        model.denoiser.controlnet.load_state_dict(model.denoiser.controlnet.from_unet(
            unet, conditioning_channels=vae.config.latent_channels,
            conditioning_embedding_out_channels=(kwargs["control_embedding_channels"],)).state_dict())
        return model

    # ------------------------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | Path, half_precision: bool = False, model_card: str | None = None,
                        **_ignored) -> Path:
        """Write config.json + safetensors (+ README.md model card). `half_precision` stores the VAE and
        denoiser weights as float16 (loaded back as float32); the latent codec always stays float32 because
        its integer-exact layers need every bit. A half-precision copy is a (slightly) different model with
        its own fingerprint: encode with the loaded copy, not with the float32 model that wrote it."""
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
        save_file(state, out / WEIGHTS_NAME, metadata={"format": "pt", "diffo_name": self.config.name})
        if model_card is not None:
            (out / "README.md").write_text(model_card, encoding="utf-8")
        return out

    @classmethod
    def from_pretrained(cls, pretrained: str | Path, revision: str | None = None, **_ignored) -> "DiffoCodec":
        """Load from a local folder in Hub layout or a Hub repo id (see `diffo.hub.resolve_model_dir`)."""
        from .hub import resolve_model_dir

        return cls.from_dir(resolve_model_dir(pretrained, revision))

    @classmethod
    def from_dir(cls, folder: Path) -> "DiffoCodec":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

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
            if not isinstance(config, dict):
                raise ModelLoadError(f"cannot load the DiffO model in {folder}: {cfg_path.name} is not a JSON object")
            if config.get("_class_name") not in (None, cls.__name__):
                raise ModelLoadError(f"{cfg_path} describes a {config.get('_class_name')}, not a DiffO model")
            model = cls.from_config(config)
            state = load_file(w_path)
            model._load_exact_state(state)
        except (ValueError, TypeError, KeyError, RuntimeError, OSError, SafetensorError) as e:
            raise ModelLoadError(f"cannot load the DiffO model in {folder}: {e}") from e
        model._fingerprint = fingerprint_of(model.config, state)
        return model.eval()

    def _load_exact_state(self, state: dict) -> None:
        resize_table_buffers(self, state)
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ModelLoadError(f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
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

    def update(self, force: bool = True) -> None:
        """Build the entropy coders' CDF tables from the learned distributions (once, when finalising).
        Table construction is CompressAI's: this needs the `train` extra; coding with the tables does not."""
        from .training.entropy_models import build_tables

        build_tables(self.latent_codec, force=force)
        self._fingerprint = None

    # ------------------------------------------------------------------------------- the stages
    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def strength_for_rate(self, rate: float) -> float:
        return strength_for_rate(rate, list(self.config.noise_rates), list(self.config.noise_strengths))

    def timestep_for_strength(self, strength: float) -> int:
        return timestep_for_strength(strength, self.config.num_train_timesteps)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch [B,3,H,W] in [0,1] (H, W multiples of 8) → scaled latent [B,C,H/8,W/8]."""
        dist = self.vae.encode(x.to(self.dtype) * 2 - 1).latent_dist
        return dist.mode() * self.vae.config.scaling_factor

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent → image batch in [0, 1]."""
        return self.decode_raw_latent(latent.float() / self.vae.config.scaling_factor)

    def decode_raw_latent(self, raw: torch.Tensor) -> torch.Tensor:
        """Latent in the VAE's own units (ComfyUI's LATENT convention) → image batch in [0, 1]."""
        img = self.vae.decode(raw.to(self.dtype)).sample
        return ((img.float() + 1) / 2).clamp(0, 1)

    def control(self, c_hat: torch.Tensor, strength: float, noise: torch.Tensor) -> ControlOutput:
        t = torch.full((len(c_hat),), self.timestep_for_strength(strength), dtype=torch.long, device=c_hat.device)
        return self.denoiser.control(c_hat.to(self.dtype), t, noise.to(c_hat.device, self.dtype))

    def denoise(self, ctrl: ControlOutput) -> torch.Tensor:
        return self.denoiser.denoise(ctrl)


def _public(config) -> dict:
    """A diffusers config without its private bookkeeping keys (`_name_or_path`, `_diffusers_version`, …)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def fingerprint_of(config, state: dict) -> bytes:
    """SHA-256 over the canonical config and every stored tensor (name, dtype, shape, bytes); first 8 bytes."""
    h = hashlib.sha256()
    h.update(json.dumps(_public(config), sort_keys=True, default=str).encode())
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.digest()[:8]
