"""Stand-ins for what ComfyUI hands the "your checkpoint" nodes (nodes/checkpoint.py) in CI, where there is no
ComfyUI: a ModelPatcher over a diffusers UNet that calls the hooks and `control` as ComfyUI's LDM UNet does,
its discrete EPS model sampling, and a VAE. The real ones run in test_comfyui.py."""

import torch


class FakeModelSampling:
    """ComfyUI's EPS model sampling for SD (discrete, scaled linear), enough for one step from any of its sigmas."""

    def __init__(self):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        ac = torch.cumprod(1 - betas, 0)
        self.sigmas = ((1 - ac) / ac).sqrt().float()

    def calculate_input(self, sigma, x):
        return x / (sigma ** 2 + 1) ** 0.5

    def timestep(self, sigma):
        return (self.sigmas - sigma.reshape(-1, 1)).abs().argmin(dim=1).float()


class FakeModelPatcher:
    """The ModelPatcher methods the nodes use; `sample_one_step` walks a diffusers UNet the way ComfyUI's LDM UNet
    calls its hooks (transformer_options["block"], input/middle/output patches), then one Euler step."""

    def __init__(self, unet, unet_config, latent_scale: float = 0.18215):
        from types import SimpleNamespace as NS

        self.unet, self.model_options, self.latent_scale = unet, {"transformer_options": {}}, latent_scale
        self.model = NS(model_type=NS(name="EPS"), model_config=NS(unet_config={
            "context_dim": unet_config["cross_attention_dim"], "model_channels": unet_config["block_out_channels"][0],
            "adm_in_channels": None}))
        self.sampling = FakeModelSampling()

    def clone(self):
        c = FakeModelPatcher.__new__(FakeModelPatcher)
        c.__dict__.update(self.__dict__)
        c.model_options = {"transformer_options": {"patches": {}}}
        return c

    def get_model_object(self, name):
        assert name == "model_sampling"
        return self.sampling

    def set_model_unet_function_wrapper(self, fn):
        self.model_options["model_function_wrapper"] = fn

    def set_model_patch(self, fn, name):
        self.model_options["transformer_options"]["patches"].setdefault(name, []).append(fn)

    def set_model_input_block_patch(self, fn):
        self.set_model_patch(fn, "input_block_patch")

    def set_model_output_block_patch(self, fn):
        self.set_model_patch(fn, "output_block_patch")

    def _diffusion_model(self, xc, t, context, transformer_options, control=None):
        from diffo.models.osdiff.cddm import _base_input_blocks, _run

        def apply_control(h, name):  # as ComfyUI's openaimodel: pop the last residual of that kind, add it
            if control is not None and control.get(name):
                ctrl = control[name].pop()
                if ctrl is not None:
                    h = h + ctrl
            return h

        u, patches = self.unet, transformer_options["patches"]
        emb = u.time_embedding(u.time_proj(t).to(xc.dtype))
        h, hs = xc, []
        for i, parts in enumerate(_base_input_blocks(u)):
            transformer_options["block"] = ("input", i)
            h = _run(parts, h, emb, context)
            for p in patches.get("input_block_patch", []):
                h = p(h, transformer_options)
            hs.append(h)
        h = apply_control(u.mid_block(h, emb, encoder_hidden_states=context), "middle")
        for p in patches.get("middle_block_after_patch", []):
            h = p({"h": h, "transformer_options": transformer_options})["h"]
        k = 0
        for block in u.up_blocks:
            attns = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                transformer_options["block"] = ("output", k)
                hsp = apply_control(hs.pop(), "output")
                for p in patches.get("output_block_patch", []):
                    h, hsp = p(h, hsp, transformer_options)
                h = resnet(torch.cat([h, hsp], 1), emb)
                if attns is not None:
                    h = attns[j](h, encoder_hidden_states=context, return_dict=False)[0]
                k += 1
            if block.upsamplers is not None:
                for up in block.upsamplers:
                    h = up(h, output_size=hs[-1].shape[-2:] if hs else None)
        return u.conv_out(u.conv_act(u.conv_norm_out(h)))

    def sample_one_step(self, latent, positive, noise, sigmas=None):
        """Core sampling's one Euler step over SIGMAS [σ, 0] (default: σ_max, as BasicScheduler simple/1 gives):
        the LATENT scaled in (process_latent_in), noise added (×√(1+σ²) at max denoise, else ×σ), ε̂ through the
        wrapper, Euler to σ = 0. Returns the denoised latent, scaled."""
        sigma = (sigmas[:1] if sigmas is not None else self.sampling.sigmas[-1:]).float()
        at_max = bool(sigma >= self.sampling.sigmas[-1])
        start = latent["samples"] * self.latent_scale
        x = start + noise.generate_noise(latent) * ((1 + sigma ** 2) ** 0.5 if at_max else sigma)

        def apply_model(x, sigma, c_crossattn, transformer_options, control=None):
            xc = self.sampling.calculate_input(sigma, x)
            return self._diffusion_model(xc, self.sampling.timestep(sigma), c_crossattn,
                                         dict(transformer_options), control)

        c = {"c_crossattn": positive[0][0], "transformer_options": self.model_options["transformer_options"]}
        eps = self.model_options["model_function_wrapper"](apply_model, {"input": x, "timestep": sigma, "c": c})
        return x - eps * sigma  # the denoised latent (scaled): Euler's single step lands on it


class FakeVAE:
    """ComfyUI's VAE interface (encode: [B, H, W, C] in 0..1 → latent in the VAE's own units)."""

    def __init__(self, model):
        self.model = model

    def encode(self, pixels):
        return self.model.encode_latent(pixels.permute(0, 3, 1, 2)) / self.model.vae.config.scaling_factor
