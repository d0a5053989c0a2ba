"""The decoder, as separate blocks and as one node:

    DIFFO_BITSTREAM ─ Entropy Decode ─ DIFFO_LATENT ─ Control ─ DIFFO_CONTROL ─ One-Step Denoise ─ LATENT
                    ─ Latent to Image ─ IMAGE                 (DiffO Decode = the whole chain, same pixels)

Each block runs the `diffo.pipeline` function of its stage inside `pipeline.reproducible()`, the same calls
`pipeline.decode` makes, so the split chain and DiffO Decode give identical pixels."""

from __future__ import annotations

from ..diffo import pipeline
from . import comfy_env
from .types import (BITSTREAM, CODED_LATENT, CONTROL, MODEL, CodedLatents, Controls, images_to_comfy,
                    latent_from_comfy, latent_to_comfy)

MODEL_INPUT = (MODEL, {"tooltip": "From DiffO Load Model: the model that made the streams."})
STRENGTH_OVERRIDE = ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.01, "tooltip":
                     "Noise strength of the denoising step; -1 = the one stored in the stream. More noise: "
                     "more invented detail, less faithful."})
SEED_OVERRIDE = ("INT", {"default": -1, "min": -1, "max": 2**32 - 1, "tooltip":
                 "Seed of the starting noise; -1 = the one stored in the stream (same pixels every time)."})


def _control(model, coded: CodedLatents, strength: float, seed: int) -> Controls:
    strengths = [h.strength if strength < 0 else strength for h in coded.headers]
    seeds = [h.seed if seed < 0 else seed for h in coded.headers]
    outputs = [pipeline.control(model, c, s, n) for c, s, n in zip(coded.c_hat, strengths, seeds)]
    return Controls(coded.headers, coded.c_hat, outputs, strengths, seeds)


class DiffOEntropyDecode:
    DESCRIPTION = ("Block 1 of the decoder: reads the streams' entropy-coded symbols (exact on every machine) "
                   "and rebuilds the compressed latent ĉ. Checks that the model is the one that made them.")
    CATEGORY = "DiffO/decode blocks"
    SEARCH_ALIASES = ["entropy decoding", "bitstream to latent", "range decode"]
    RETURN_TYPES = (CODED_LATENT,)
    RETURN_NAMES = ("coded_latent",)
    OUTPUT_TOOLTIPS = ("The compressed latent ĉ of each stream, for DiffO Control.",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"bitstream": (BITSTREAM, {"tooltip": "From DiffO Encode or Load Bitstream."}),
                             "diffo_model": MODEL_INPUT}}

    def run(self, bitstream, diffo_model):
        progress = comfy_env.Progress(len(bitstream))
        headers, c_hats = [], []
        with pipeline.reproducible():
            for data in bitstream:
                bs, c_hat = pipeline.entropy_decode(diffo_model, data)
                headers.append(bs)
                c_hats.append(c_hat)
                progress.step()
        return (CodedLatents(headers, c_hats),)


class DiffOControl:
    DESCRIPTION = ("Block 2 of the decoder: the control module (ControlNet-style) reads ĉ and the noisy start "
                   "latent and computes the residuals that steer the denoising UNet. The noise level follows "
                   "the stream's rate (lower rate, more noise).")
    CATEGORY = "DiffO/decode blocks"
    SEARCH_ALIASES = ["controlnet", "control module", "diffo condition"]
    RETURN_TYPES = (CONTROL,)
    RETURN_NAMES = ("control",)
    OUTPUT_TOOLTIPS = ("Noisy start latent, timestep and control residuals, for DiffO One-Step Denoise.",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"coded_latent": (CODED_LATENT, {"tooltip": "From DiffO Entropy Decode."}),
                             "diffo_model": MODEL_INPUT}}

    def run(self, coded_latent, diffo_model):
        comfy_env.check_interrupt()
        with pipeline.reproducible():
            return (_control(diffo_model, coded_latent, -1.0, -1),)


class DiffOOneStepDenoise:
    DESCRIPTION = ("Block 3 of the decoder: one UNet step from the noisy start to the clean latent, steered "
                   "by the control residuals. Outputs a standard LATENT (in the VAE's units, like core VAE "
                   "nodes), so core latent nodes can work on it before DiffO Latent to Image.")
    CATEGORY = "DiffO/decode blocks"
    SEARCH_ALIASES = ["one step diffusion", "denoise", "diffo sampler", "single step"]
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The clean latent of each image (one size per batch).",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"control": (CONTROL, {"tooltip": "From DiffO Control."}),
                             "diffo_model": MODEL_INPUT,
                             "strength_override": STRENGTH_OVERRIDE,
                             "seed_override": SEED_OVERRIDE}}

    def run(self, control, diffo_model, strength_override, seed_override):
        progress = comfy_env.Progress(len(control.outputs))
        with pipeline.reproducible():
            if (strength_override >= 0 and any(s != strength_override for s in control.strength)) or \
                    (seed_override >= 0 and any(s != seed_override for s in control.seed)):
                # the control module reads the noisy start, so other noise means running it again
                control = _control(diffo_model, CodedLatents(control.headers, control.c_hat),
                                   strength_override, seed_override)
            latents = []
            for ctrl in control.outputs:
                latents.append(pipeline.denoise_latent(diffo_model, ctrl))
                progress.step()
        return (latent_to_comfy(diffo_model, latents, control.headers),)


class DiffOLatentToImage:
    DESCRIPTION = ("Block 4 of the decoder: the DiffO model's decoder (its fast decoder, or the VAE's) turns a "
                   "LATENT into pixels and crops the coding padding away (when a core node resized the latent, "
                   "the crop scales with it).")
    CATEGORY = "DiffO/decode blocks"
    SEARCH_ALIASES = ["vae decode diffo", "latent to pixels", "diffo vae"]
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The decoded images.",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent": ("LATENT", {"tooltip": "From DiffO One-Step Denoise (or a core latent "
                                                              "node after it)."}),
                             "diffo_model": MODEL_INPUT}}

    def run(self, latent, diffo_model):
        samples, sizes = latent_from_comfy(diffo_model, latent)
        progress = comfy_env.Progress(len(samples))
        images = []
        with pipeline.reproducible():
            for i in range(len(samples)):
                images.append(pipeline.latent_to_image(diffo_model, samples[i:i + 1],
                                                       sizes[i] if sizes else None, raw=True)[0])
                progress.step()
        return (images_to_comfy(images),)


class DiffODecode:
    DESCRIPTION = ("Decodes .diffo streams to images in one node: entropy decode → control → one-step "
                   "denoise → decoder (the same pixels as the four DiffO decode blocks).")
    CATEGORY = "DiffO/decode"
    SEARCH_ALIASES = ["decompress image", "diffo decompress", "bitstream to image", "decode image"]
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The decoded images (streams of one size per batch).",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"bitstream": (BITSTREAM, {"tooltip": "From DiffO Encode or Load Bitstream."}),
                             "diffo_model": MODEL_INPUT,
                             "strength_override": STRENGTH_OVERRIDE,
                             "seed_override": SEED_OVERRIDE,
                             "denoise": ("BOOLEAN", {"default": True, "tooltip":
                                         "Off: skip the diffusion step and decode ĉ directly (the "
                                         "ablation that shows what the step adds)."})}}

    def run(self, bitstream, diffo_model, strength_override, seed_override, denoise):
        progress = comfy_env.Progress(sum(pipeline.decode_steps(diffo_model, d, denoise) for d in bitstream))
        images = []
        for data in bitstream:
            comfy_env.check_interrupt()
            images.append(pipeline.decode(diffo_model, data, on_step=progress.step, denoise=denoise,
                                          strength=None if strength_override < 0 else strength_override,
                                          seed=None if seed_override < 0 else seed_override))
        return (images_to_comfy(images),)
