"""The SD-scale families on the user's own Stable Diffusion checkpoint: core `Load Checkpoint` gives MODEL and
VAE; these nodes load only the codec's weights (latent codec, control module, prompt embedding), patch the MODEL
with the control module through ComfyUI's model hooks, and leave the one step to core sampling and the pixels to
core VAE nodes, so the result is an SD LATENT that chains into any other node.

    Load Checkpoint ─ MODEL ─┐
    DiffO Load Codec ────────┼─ DiffO Apply to Model ─ MODEL, CONDITIONING, LATENT, NOISE, SIGMAS ─
    DiffO Load Bitstream ────┘      SamplerCustomAdvanced (euler) ─ VAE Decode ─ DiffO Crop to Original

OSDiff (published weights) starts from pure noise at t = 999 with an empty LATENT. Its control module adds into
the UNet (see diffo/models/osdiff/cddm.py) after each input block (the `input_block_patch` hook, so also into the
skip), after the middle block (`middle_block_after_patch`), and into the hidden state before each output block's
skip-concat (`output_block_patch`). ComfyUI's ControlNet `control['output']` adds to the skip instead, which is
not where OSDiff adds, so the hooks are used.

DiffO at the 'sd' scale starts from its decoded latent ĉ (the LATENT) noised to the stream's strength (the
SIGMAS: [σ(t), 0]). Its control module is a diffusers ControlNet, whose residuals add to the skips and after the
middle block: exactly ComfyUI's `control['output']` and `control['middle']`, so it passes them that way.

Both control branches need the UNet's input and timestep, so a UNet function wrapper computes them once per model
call and hands them on.
"""

from __future__ import annotations

import torch

from ..diffo import pipeline
from ..diffo.models import load_codec_parts
from . import comfy_env
from .model import local_models
from .types import BITSTREAM, Bitstreams, images_from_comfy

CODEC = "DIFFO_CODEC"
FEATURES_KEY = "diffo_osdiff_features"
_CACHE: dict[str, object] = {}
# ComfyUI's model type for the prediction a codec's UNet makes (OSDiff: epsilon; DiffO 'sd': its base's)
COMFY_PREDICTION = {"epsilon": "EPS", "v_prediction": "V_PREDICTION"}


def load_parts(folder: str):
    """The codec weights of a model folder of either SD-scale family (diffo.models.load_codec_parts), loaded once
    per process (like LoraLoader's one-slot cache)."""
    if folder not in _CACHE:
        _CACHE.clear()
        _CACHE[folder] = load_codec_parts(folder)
    return _CACHE[folder]


def _is_osdiff(parts) -> bool:
    return parts.family == "osdiff"


def _family_name(parts) -> str:
    return "OSDiff" if _is_osdiff(parts) else "DiffO"


def check_base_model(model, parts) -> None:
    """A clear error when the MODEL is not the SD UNet (architecture and prediction) the codec was trained on."""
    inner = getattr(model, "model", None)
    cfg = dict(getattr(getattr(inner, "model_config", None), "unet_config", None) or {})
    kind = getattr(getattr(inner, "model_type", None), "name", None)
    want = parts.unet_config
    family = _family_name(parts)
    prediction = "EPS" if _is_osdiff(parts) else COMFY_PREDICTION[parts.config.prediction_type]
    words = {"EPS": "epsilon", "V_PREDICTION": "v"}[prediction]
    example = ("v2-1_512-ema-pruned" if prediction == "EPS" else "v2-1_768-ema-pruned")
    expected = (f"an SD 2.x checkpoint (context width {want['cross_attention_dim']}, "
                f"{want['block_out_channels'][0]} channels, {words} prediction), e.g. {example}")
    if not cfg:
        raise ValueError(f"this MODEL is not a UNet checkpoint ComfyUI loaded; {family} needs {expected}")
    problems = []
    if cfg.get("context_dim") != want["cross_attention_dim"]:
        problems.append(f"prompt width {cfg.get('context_dim')} (SD 1.x: 768; SDXL: 2048)")
    if cfg.get("model_channels") != want["block_out_channels"][0] or cfg.get("adm_in_channels") is not None:
        problems.append(f"{cfg.get('model_channels')} channels{' and a class embedding (SDXL)' if cfg.get('adm_in_channels') else ''}")
    if kind != prediction:
        problems.append(f"{kind} prediction (the 768 px SD 2.1 is v-prediction; the 512 px base is epsilon)")
    if problems:
        raise ValueError(f"this MODEL is not the base {family} was trained on: {', '.join(problems)}; load {expected} "
                         "with Load Checkpoint")


class StreamNoise:
    """Core sampling's NOISE (like RandomNoise) with the stream's decoder seed: the same x_T as the library draws."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        samples = input_latent["samples"]
        return torch.randn(samples.size(), dtype=torch.float32, generator=torch.Generator("cpu").manual_seed(self.seed),
                           device="cpu").to(samples.dtype)


class _ControlPatch:
    """A UNet function wrapper that runs the codec's control branch once per model call, on the sampled x_t and
    timestep, then calls the UNet (or another node's wrapper, still called after ours) with its output handed on
    (`_hand_on`, by family)."""

    def __init__(self, parts, cond: torch.Tensor, patched, module, previous_wrapper=None):
        self.parts, self.cond, self.patched = parts, cond, patched  # cond: OSDiff's hint, DiffO's ĉ (scaled)
        self.previous_wrapper = previous_wrapper
        self._module, self._copy = module, None  # the control branch; its copy on the sampling device and dtype

    def _module_on(self, device, dtype):
        c = self._copy
        if c is None or next(c.parameters()).device != device or next(c.parameters()).dtype != dtype:
            import copy

            c = self._copy = copy.deepcopy(self._module).to(device=device, dtype=dtype)  # small: not the UNet
        return c

    def _branch(self, module, xc, cond, t, context):
        raise NotImplementedError

    def _hand_on(self, c: dict, out) -> dict:
        raise NotImplementedError

    def unet_wrapper(self, apply_model, args):
        x, sigma, c = args["input"], args["timestep"], args["c"]
        sampling = self.patched.get_model_object("model_sampling")  # now: a later node may have replaced it
        xc = sampling.calculate_input(sigma, x)
        t = sampling.timestep(sigma).float()
        context = c.get("c_crossattn")
        if tuple(x.shape[-2:]) != tuple(self.cond.shape[-2:]):
            raise ValueError(f"the LATENT being sampled is {tuple(x.shape[-2:])} (latent units) but the stream's is "
                             f"{tuple(self.cond.shape[-2:])}: sample the LATENT that DiffO Apply to Model gives")
        dtype = context.dtype if context is not None and context.is_floating_point() else x.dtype
        module = self._module_on(x.device, dtype)
        cond = self.cond.to(x.device, dtype).expand(x.shape[0], -1, -1, -1)
        with torch.no_grad():
            out = self._branch(module, xc.to(dtype), cond, t.to(x.device), context.to(x.device, dtype))
        c = self._hand_on(c, out)
        if self.previous_wrapper is not None:
            return self.previous_wrapper(apply_model, {**args, "c": c})
        return apply_model(x, sigma, **c)


class OSDiffPatch(_ControlPatch):
    """OSDiff's residuals go to the UNet's hooks through `transformer_options` (see the module docstring)."""

    def __init__(self, parts, hint: torch.Tensor, patched, previous_wrapper=None):
        super().__init__(parts, hint, patched, parts.control_module, previous_wrapper)

    def _branch(self, module, xc, cond, t, context):
        return self.parts.features(xc, cond, t, context, module)

    def _hand_on(self, c, feats):
        return {**c, "transformer_options": {**c.get("transformer_options", {}), FEATURES_KEY: feats}}

    @staticmethod
    def input_patch(h, transformer_options):
        feats = transformer_options.get(FEATURES_KEY)
        if feats is None:
            return h
        return h + feats.input[transformer_options["block"][1]].to(h.dtype)

    @staticmethod
    def middle_patch(args):
        feats = args["transformer_options"].get(FEATURES_KEY)
        if feats is None:
            return args
        return {**args, "h": args["h"] + feats.middle.to(args["h"].dtype)}

    @staticmethod
    def output_patch(h, hsp, transformer_options):
        feats = transformer_options.get(FEATURES_KEY)
        if feats is None:
            return h, hsp
        return h + feats.output[transformer_options["block"][1]].to(h.dtype), hsp


class DiffoControlPatch(_ControlPatch):
    """DiffO's ControlNet residuals, handed to the UNet as ComfyUI's `control` (added to those of any ControlNet
    already applied)."""

    def __init__(self, parts, c_hat: torch.Tensor, patched, previous_wrapper=None):
        super().__init__(parts, c_hat, patched, parts.denoiser.controlnet, previous_wrapper)

    def _branch(self, module, xc, cond, t, context):
        return self.parts.control(xc, t, cond, context, module)

    def _hand_on(self, c, out):
        down, mid = out
        control = {"output": list(down), "middle": [mid]}  # ComfyUI pops them from the end, as it pops the skips
        old = c.get("control")
        if old:  # another ControlNet's residuals: add ours to them
            merged = dict(old)
            for key, ours in control.items():
                theirs = list(old.get(key) or [])
                merged[key] = [a if i >= len(theirs) or theirs[i] is None else a + theirs[i]
                               for i, a in enumerate(ours)]
            control = merged
        return {**c, "control": control}


def apply_to_model(model, parts, c_hat: torch.Tensor):
    """A clone of the ComfyUI MODEL with the codec's control module hooked in; the original is untouched.
    `c_hat`: what the stream decodes to (OSDiff's hint, DiffO's latent ĉ), scaled."""
    check_base_model(model, parts)
    patched = model.clone()
    previous = patched.model_options.get("model_function_wrapper")
    if not _is_osdiff(parts):
        patched.set_model_unet_function_wrapper(DiffoControlPatch(parts, c_hat, patched, previous).unet_wrapper)
        return patched
    patch = OSDiffPatch(parts, c_hat, patched, previous)
    patched.set_model_unet_function_wrapper(patch.unet_wrapper)
    patched.set_model_input_block_patch(patch.input_patch)
    patched.set_model_patch(patch.middle_patch, "middle_block_after_patch")
    patched.set_model_output_block_patch(patch.output_patch)
    return patched


def start_sigmas(model, parts, strength: float) -> torch.Tensor:
    """The one step's SIGMAS, [σ(t), 0], from the MODEL's own noise schedule at the codec's start timestep
    (OSDiff: 999; DiffO: the strength's)."""
    t = parts.config.timestep if _is_osdiff(parts) else parts.timestep_for_strength(strength)
    sigmas = model.get_model_object("model_sampling").sigmas
    return torch.stack([sigmas[int(t)].float().cpu(), torch.zeros(())])


def _one_stream(bitstream: Bitstreams) -> bytes:
    if len(bitstream) != 1:
        raise ValueError(f"DiffO Apply to Model decodes one stream at a time, got {len(bitstream)}: use one Load "
                         "Bitstream per image")
    return bitstream[0]


class DiffOLoadCodec:
    DESCRIPTION = ("Loads only the codec weights of an OSDiff or DiffO 'sd' model folder (latent codec, control "
                   "module, prompt embedding), for running it on the Stable Diffusion checkpoint you load with Load "
                   "Checkpoint: no second copy of the UNet or VAE.")
    CATEGORY = "DiffO/your checkpoint"
    SEARCH_ALIASES = ["osdiff codec", "diffo codec weights", "codec for checkpoint"]
    RETURN_TYPES = (CODEC,)
    RETURN_NAMES = ("diffo_codec",)
    OUTPUT_TOOLTIPS = ("The codec weights; connect to DiffO Apply to Model and DiffO Compress (your VAE).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        comfy_env.register_model_folder()
        return {"required": {"model": (sorted(local_models()) or ["(no model folder in models/diffo)"], {
            "tooltip": "An OSDiff model folder (python -m diffo convert osdiff writes one) or a DiffO model "
                       "trained at the 'sd' scale, in ComfyUI/models/diffo/. Only its codec weights are read."})}}

    def load(self, model):
        folders = local_models()
        if model not in folders:
            raise ValueError(f"{model} is not in ComfyUI/models/diffo/: convert an OSDiff checkpoint into that "
                             "folder first (python -m diffo convert osdiff), then refresh the node (press r)")
        return (load_parts(folders[model]),)


class DiffOApplyToModel:
    DESCRIPTION = ("Decodes a .diffo stream and patches your SD 2.x MODEL with the codec's control module. Sample "
                   "the LATENT with core sampling (SamplerCustomAdvanced, euler) with the NOISE and SIGMAS given "
                   "here (the stream's seed and start noise level: one step), then VAE Decode.")
    CATEGORY = "DiffO/your checkpoint"
    SEARCH_ALIASES = ["osdiff model patch", "diffo control model", "one step decode checkpoint"]
    RETURN_TYPES = ("MODEL", "CONDITIONING", "LATENT", "NOISE", "SIGMAS")
    RETURN_NAMES = ("model", "positive", "latent", "noise", "sigmas")
    OUTPUT_TOOLTIPS = ("Your MODEL with the control module hooked in (the input MODEL is unchanged).",
                       "The prompt embedding the codec was trained with (stored with it; no CLIP needed).",
                       "The LATENT to sample, at the stream's padded size (OSDiff: empty; DiffO: its decoded "
                       "latent, which the one step starts from).",
                       "The start noise from the stream's decoder seed.",
                       "One step from the codec's start noise level to 0 on your MODEL's schedule.")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "Your SD 2.1-base MODEL from Load Checkpoint (512 px, epsilon)."}),
            "diffo_codec": (CODEC, {"tooltip": "From DiffO Load Codec."}),
            "bitstream": (BITSTREAM, {"tooltip": "One .diffo stream made by this codec (DiffO Load Bitstream)."}),
        }, "optional": {
            "strength": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.05,
                                   "tooltip": "DiffO: the start noise level (more: more invented texture, less "
                                              "fidelity); -1 uses the stream's. OSDiff always starts from pure "
                                              "noise."}),
        }}

    def apply(self, model, diffo_codec, bitstream, strength=-1.0):
        with pipeline.reproducible():  # g_s is a float network: the same ĉ / hint for any thread count
            bs, c_hat = pipeline.entropy_decode(diffo_codec, _one_stream(bitstream))
        c_hat = c_hat.float().cpu()
        patched = apply_to_model(model, diffo_codec, c_hat)
        if _is_osdiff(diffo_codec):
            samples = torch.zeros((1, *c_hat.shape[1:]))
        else:  # LATENT in the VAE's own units (ComfyUI's convention): core sampling noises it to σ(t)
            samples = c_hat / diffo_codec.latent_scale
        sigmas = start_sigmas(patched, diffo_codec, bs.strength if strength is None or strength < 0 else strength)
        return (patched, [[diffo_codec.prompt_embeds.clone(), {}]], {"samples": samples}, StreamNoise(bs.seed),
                sigmas)


class DiffOCompressWithVAE:
    DESCRIPTION = ("Compresses images with the codec's latent codec (OSDiff or DiffO 'sd'), encoding them with your "
                   "checkpoint's VAE (from Load Checkpoint) instead of a second copy.")
    CATEGORY = "DiffO/your checkpoint"
    SEARCH_ALIASES = ["osdiff compress", "diffo encode vae", "compress with checkpoint"]
    RETURN_TYPES = (BITSTREAM,)
    RETURN_NAMES = ("bitstream",)
    OUTPUT_TOOLTIPS = ("One .diffo stream per image (OSDiff: format 3; DiffO: format 2).",)
    FUNCTION = "compress"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "Images to compress (RGB)."}),
            "vae": ("VAE", {"tooltip": "Your SD 2.x VAE from Load Checkpoint."}),
            "diffo_codec": (CODEC, {"tooltip": "From DiffO Load Codec."}),
            "decoder_seed": ("INT", {"default": 0, "min": 0, "max": 2**32 - 1,
                                     "tooltip": "Seed of the decoder's start noise, stored in the stream."}),
        }, "optional": {
            "rate": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                               "tooltip": "DiffO: the rate level (0: base code only, ~0.01 bpp; 1: the most bits). "
                                          "An OSDiff checkpoint has one rate and ignores it."}),
        }}

    def compress(self, image, vae, diffo_codec, decoder_seed, rate=0.5):
        from ..diffo.image import pad_to_multiple

        out = Bitstreams()
        for img in images_from_comfy(image):
            h, w = img.shape[-2:]
            pipeline.check_size(h, w)
            x, _ = pad_to_multiple(img[None], diffo_codec.config.pad_multiple)
            raw = vae.encode(x.permute(0, 2, 3, 1))  # ComfyUI's VAE: [B, H, W, C] in, latent in its own units out
            latent = raw.float().cpu() * diffo_codec.latent_scale
            if not _is_osdiff(diffo_codec):
                out.append(diffo_codec.compress(latent, (h, w), decoder_seed, rate=rate))
            else:
                out.append(diffo_codec.compress(latent, (h, w), decoder_seed))
            comfy_env.check_interrupt()
        return (out,)


class DiffOCropToOriginal:
    DESCRIPTION = "Crops decoded images to the size stored in their .diffo streams (the codec pads to 64 pixels)."
    CATEGORY = "DiffO/your checkpoint"
    SEARCH_ALIASES = ["diffo crop", "remove padding"]
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The images at their original size.",)
    FUNCTION = "crop"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "Decoded images (e.g. from VAE Decode)."}),
            "bitstream": (BITSTREAM, {"tooltip": "The streams they were decoded from (one, or one per image)."}),
        }}

    def crop(self, image, bitstream):
        heads = [pipeline.read_header(b) for b in bitstream]
        if len(heads) not in (1, image.shape[0]):
            raise ValueError(f"{len(heads)} streams for {image.shape[0]} images: give one stream, or one per image")
        sizes = {(h.height, h.width) for h in heads}
        if len(sizes) != 1:
            raise ValueError("the streams have different sizes: crop them with separate nodes")
        height, width = sizes.pop()
        if image.shape[1] < height or image.shape[2] < width:
            raise ValueError(f"the images are {image.shape[2]}x{image.shape[1]}, smaller than the stream's "
                             f"{width}x{height}: decode the LATENT DiffO Apply to Model gave, without resizing")
        return (image[:, :height, :width, :],)
