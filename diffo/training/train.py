"""`python -m diffo train`: the staged training of a DiffO model, resumable at any point.

Stages (as the methods describe them; each has a step count and a time budget, whichever ends first):
  1. vae       latent space: the VAE alone on pixel crops (skipped for the 'sd' config: SD's VAE is kept)
  2. latents   encode every training photo once; set the latent scaling factor (1/std)
  3. decoder   (tiny) a fast latent → pixel decoder (fast_decoder.py) trained from the frozen VAE encoder's
               latents against the photos: L1 + MSE; it replaces the VAE decoder at decode time
  4. codec     latent codec on cached latent crops: rate + λ(rate)·distortion + VQ codebook/commitment,
               rate level sampled per batch (one model for all rates), dead codes restarted
  5. denoiser  control module + one-step UNet on the codec's real (rounded) output ĉ at the noise level of
               the sampled rate: latent MSE + adversarial loss of a discriminator in the UNet's feature space
  6. realism   the same, with a pixel-space patch discriminator on decoded crops at a weight that moves the
               model (distribution matching: what lets one step draw texture instead of the blurry mean),
               plus the decoded crops' L1 against the decoded true latent
  7. noise     the rate-adaptive noise map: per rate level, the strength with the best held-out HaarPSI
  8. final     entropy tables built, model saved (config.json + safetensors + model card)
`--init FOLDER` starts every stage from a saved model's weights (continued training); `--stages` runs only
the named stages (e.g. `latents,decoder,realism,noise,final` on a trained model); `--mixed-precision
bf16` runs the VAE and denoiser stages under accelerate's autocast (faster where the CPU or GPU has bf16; the
codec stage stays float32: its likelihoods need the range).
Checkpoints (safetensors) are written every few minutes into OUT/checkpoint; `--resume` continues there.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..models.diffo.codec import DiffoCodec
from ..models.diffo.discriminator import (PatchDiscriminator, UNetFeatureDiscriminator, discriminator_loss,
                                         frozen, generator_loss, patch_generator_terms)
from ..extras import require
from ..models.diffo.latent_codec import MAX_RATE_Q
from . import checkpoint as ckpt
from . import entropy_models
from . import noise_tuning
from .scoring_rules import patch_energy_score
from .warm_start import widen_latent
from .data import CropSampler, LatentCropSampler, list_images, load_centre_crop, load_rgb, split_holdout

logger = logging.getLogger(__name__)
STAGES = ["vae", "latents", "decoder", "codec", "denoiser", "realism", "noise", "final"]


@dataclass
class TrainConfig:
    config: str = "tiny"
    sd_path: str | None = None
    init: str | None = None  # a saved model folder to start from (same architecture, or see latent_channels)
    latent_channels: int | None = None  # tiny: a latent space of this many channels; more than --init's widens
    # that model (warm_start.widen_latent: it starts out as the old one) and every stage runs again
    mixed_precision: str = "no"  # accelerate: no | bf16 | fp16
    data: list = field(default_factory=list)
    out: str = "runs/diffo-tiny"
    stages: list | None = None  # the stages to run, in STAGES order (None: all that apply to the config)
    minutes: dict = field(default_factory=lambda: {"vae": 22, "decoder": 20, "codec": 14, "denoiser": 18,
                                                   "realism": 40})
    steps: dict = field(default_factory=lambda: {k: 100000 for k in ("vae", "decoder", "codec", "denoiser",
                                                                       "realism")})
    vae_crop: int = 128
    vae_batch: int = 8
    latent_crop: int = 32  # in latent pixels (x8 image pixels)
    latent_batch: int = 16
    lr: dict = field(default_factory=lambda: {"vae": 4e-4, "decoder": 1e-3, "codec": 2e-4, "denoiser": 2e-4,
                                              "realism": 1e-4})
    lambda_min: float = 0.01  # distortion weight at rate level 0 ... (low: the lowest residual level then sits
    # just above the base code alone, ~0.02 bpp, instead of leaving a gap up to ~0.04)
    lambda_max: float = 4.0  # ... and at 1 (geometric in between)
    base_only_prob: float = 0.25
    adv_weight: float = 1e-2
    adv_start: float = 0.4  # fraction of the denoiser stage before the discriminator joins
    disc_backbone: str = "frozen"  # the UNet-feature discriminator's copy of the UNet: "frozen" or "trained"
    random_strength_prob: float = 0.5  # denoiser batches at a random strength (the map is tuned afterwards)
    lr_floor: float = 0.1  # cosine decay over the stage (by steps or minutes, whichever is further) to this
    tune_crop: int = 256
    noise_criterion: str = "haarpsi"  # noise stage: haarpsi | strongest (see noise_tuning)
    pixel_weight: float = 0.05  # denoiser: weight of (1 - HaarPSI) of VAE-decoded latent crops ...
    pixel_crop: int = 16  # ... of this many latent pixels (x8 image pixels), ...
    pixel_batch: int = 2  # ... for this many items of the batch
    decoder_crop: int = 128
    decoder_batch: int = 8
    decoder_adv_weight: float = 0.0  # fast decoder: pixel patch discriminator (non-saturating), its gradient
    # scaled to the reconstruction loss's at the last layer (VQGAN's adaptive weight) times this; 0: L1 + MSE only
    decoder_fm_weight: float = 0.0  # ... plus this times the L1 between its activations on the decoded and real crops
    realism_adv_weight: float = 0.1  # pixel patch discriminator (non-saturating loss) in the realism stage
    realism_l1_weight: float = 1.0  # L1 of decoded crops against the real crops (see realism_real)
    realism_mse_weight: float = 1.0  # latent MSE of the step's output against the true latent (the pull to the
    # conditional mean: lower leaves the adversarial terms more room)
    realism_adv_adaptive: bool = False  # the adversarial weight times VQGAN's adaptive weight (its gradient at the
    # step's output matched to the reconstruction terms'), as the fast decoder's stage does
    realism_fm_weight: float = 0.0  # feature matching: L1 between the patch discriminator's activations on the
    # decoded and the real crops (on the adversarial term's schedule)
    realism_energy_weight: float = 0.0  # energy score (training/scoring_rules.py) of two decodes of the step from
    # independent starting noises against the real crops, over 8x8 pixel patches: a distribution-matching term
    # whose optimum is the photos' variety given the code, not their mean, and needs no discriminator
    realism_crop: int = 16  # decoded crops of this many latent pixels (of latent_crop) ...
    realism_batch: int = 8  # ... for each item of a batch of this many
    realism_strengths: tuple = (0.1, 0.6)  # strength drawn uniformly in this range for every batch
    realism_adv_schedule: str = "flat"  # flat, or "strength": the weight scaled by strength / the top strength,
    # so that the decode-time strength trades fidelity for realism (and the noise map can choose where to sit)
    realism_real: str = "decoded"  # the discriminator's real crops: the decoded true latent, or the photo itself
    # (photo: crops of realism_crop x 8 px encoded on the fly, so the step is judged against real texture, not
    # against the VAE's own smooth reconstruction)
    realism_train_decoder: bool = False  # the fast decoder trains with the step (generator: step + decoder), so the
    # two can learn texture the frozen decoder cannot render; its decode of the true latent keeps the decoder
    # stage's recipe (L1 + MSE against the photos, judged by the same discriminator), so the plain decode the
    # ablation uses is trained too, not left to drift. Needs realism_real "photo", the flat schedule and the fast
    # decoder
    checkpoint_minutes: float = 3.0
    seed: int = 0

    def command(self) -> str:
        """The `python -m diffo train` command line that reproduces this configuration (for the model card)."""
        c = self
        init = f"--init {c.init} " if c.init else ""
        return (f"python -m diffo train --config {c.config} {init}--mixed-precision {c.mixed_precision} "
                f"--data {' '.join(map(str, c.data))} --out {c.out} "
                f"--minutes-vae {c.minutes['vae']} --minutes-codec {c.minutes['codec']} "
                f"--minutes-denoiser {c.minutes['denoiser']} --minutes-decoder {c.minutes['decoder']} "
                f"--minutes-realism {c.minutes['realism']} --noise-criterion {c.noise_criterion} "
                f"--lambda-max {c.lambda_max:g} --realism-adv-weight {c.realism_adv_weight:g} "
                f"--realism-l1-weight {c.realism_l1_weight:g} --realism-fm-weight {c.realism_fm_weight:g} "
                f"--realism-mse-weight {c.realism_mse_weight:g} "
                + ("--realism-adv-adaptive " if c.realism_adv_adaptive else "")
                + ("--realism-train-decoder " if c.realism_train_decoder else "")
                + (f"--realism-energy-weight {c.realism_energy_weight:g} " if c.realism_energy_weight else "") +
                f"--realism-real {c.realism_real} "
                f"--realism-adv-schedule {c.realism_adv_schedule} --decoder-adv-weight {c.decoder_adv_weight:g} "
                f"--decoder-fm-weight {c.decoder_fm_weight:g} --denoiser-adv-weight {c.adv_weight:g} "
                f"--denoiser-disc-backbone {c.disc_backbone}"
                + (f" --latent-channels {c.latent_channels}" if c.latent_channels is not None else "")
                + (f" --stages {','.join(c.stages)}" if c.stages else ""))

    def losses(self, stages=None) -> str:
        """The objectives of the given training stages (default: all) with this configuration's weights, for the
        model card, which names only the stages its run trained."""
        scale = f"·(strength / {self.realism_strengths[1]:g})" if self.realism_adv_schedule == "strength" else ""
        real = "the photos" if self.realism_real == "photo" else "the decoded true latents"
        dec_adv = (f" + {self.decoder_adv_weight:g}·adaptive weight·pixel patch discriminator (non-saturating; "
                   f"the weight matches its gradient at the last layer to the reconstruction loss's)"
                   + (f" + {self.decoder_fm_weight:g}·feature matching (L1 between its activations on the decoded "
                      f"and the real crops)" if self.decoder_fm_weight else "")
                   if self.decoder_adv_weight else "")
        mse = "" if self.realism_mse_weight == 1 else f"{self.realism_mse_weight:g}·"
        adaptive = "·adaptive weight" if self.realism_adv_adaptive else ""
        joint = self.realism_train_decoder
        where = "the decoder's last layer" if joint else "the step's output"
        adaptive_why = (f"; the adaptive weight matches its gradient at {where} to the reconstruction terms'"
                        if self.realism_adv_adaptive else "")
        decoder_too = (" + the fast decoder trained with the step: L1 + MSE of its decode of the true latent against "
                       "the photos, that decode judged by the same discriminator" if joint else "")
        fm = (f" + {self.realism_fm_weight:g}{scale}·feature matching (L1 between its activations on the decoded and "
              f"the real crops)" if self.realism_fm_weight else "")
        energy = (f" + {self.realism_energy_weight:g}·energy score of two decodes from independent starting noises "
                  f"against the real crops, over 8x8 patches" if self.realism_energy_weight else "")
        parts = {
            "vae": "VAE L1 + MSE + 1e-4·KL",
            "codec": f"latent codec bits per pixel + λ·MSE (λ {self.lambda_min:g} at rate level 0 to "
                     f"{self.lambda_max:g} at 1, geometric) + VQ codebook + 0.25·commitment, base code alone in "
                     f"{self.base_only_prob:.0%} of batches, dead codes restarted",
            "denoiser": f"control module + UNet: latent MSE + {self.pixel_weight:g}·(1 − HaarPSI) of decoded crops + "
                        f"{self.adv_weight:g}·adversarial loss of a discriminator on a {self.disc_backbone} copy of "
                        f"the UNet's encoder and middle-block features (from {self.adv_start:.0%} of the stage), "
                        f"strength from the noise map or, in {self.random_strength_prob:.0%} of batches, uniform in "
                        f"[0, {max(noise_tuning.STRENGTHS):g}]",
            "decoder": f"fast decoder: L1 + MSE against the photos from the frozen VAE encoder's latents{dec_adv}",
            "realism": f"realism: {mse}latent MSE + {self.realism_l1_weight:g}·L1 "
                       f"of decoded crops against the real crops + {self.realism_adv_weight:g}{scale}{adaptive}·pixel "
                       f"patch discriminator (non-saturating; real crops: {real}{adaptive_why}){fm}{energy}"
                       f"{decoder_too}, strength uniform in [{self.realism_strengths[0]:g}, "
                       f"{self.realism_strengths[1]:g}]",
        }
        return "; ".join(v for k, v in parts.items() if stages is None or k in stages)


def _lambda(cfg: TrainConfig, rate_q: int) -> float:
    r = rate_q / MAX_RATE_Q
    return cfg.lambda_min * (cfg.lambda_max / cfg.lambda_min) ** r


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's adaptive weight: the ratio of the two losses' gradient norms at the generator's last layer, so
    that the adversarial term pulls as hard as the reconstruction whatever their scales (detached)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0].norm()
    g_adv = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0].norm()
    return (g_rec / (g_adv + 1e-4)).clamp(max=1e4).detach()


def _sample_rate(rng: random.Random, cfg: TrainConfig) -> int:
    return 0 if rng.random() < cfg.base_only_prob else rng.randint(1, MAX_RATE_Q)


def _bits(likelihoods: dict) -> torch.Tensor:
    return sum(-torch.log2(v).sum() for v in likelihoods.values())


class Trainer:
    def __init__(self, cfg: TrainConfig):
        Accelerator = require("accelerate", "Training").Accelerator

        if cfg.realism_real not in ("decoded", "photo") or cfg.realism_adv_schedule not in ("flat", "strength"):
            raise ValueError(f"realism_real must be 'decoded' or 'photo' (got {cfg.realism_real!r}) and "
                             f"realism_adv_schedule 'flat' or 'strength' (got {cfg.realism_adv_schedule!r})")
        if cfg.adv_weight < 0:
            raise ValueError(f"the denoiser's adversarial weight must be >= 0 (got {cfg.adv_weight!r})")
        if cfg.disc_backbone not in ("frozen", "trained"):
            raise ValueError(f"disc_backbone must be 'frozen' or 'trained' (got {cfg.disc_backbone!r})")
        if cfg.decoder_adv_weight < 0 or (cfg.decoder_adv_weight and cfg.mixed_precision == "fp16"):
            # fp16 without loss scaling can underflow the adversarial gradient that sets the adaptive weight
            raise ValueError(f"decoder_adv_weight must be >= 0 (got {cfg.decoder_adv_weight!r}) and needs "
                             f"--mixed-precision bf16 or no (got {cfg.mixed_precision!r})")
        if cfg.decoder_fm_weight < 0 or (cfg.decoder_fm_weight and not cfg.decoder_adv_weight):
            # the features are the patch discriminator's: without it there is nothing to match
            raise ValueError(f"decoder_fm_weight must be >= 0 and needs decoder_adv_weight > 0 (got "
                             f"{cfg.decoder_fm_weight!r} and {cfg.decoder_adv_weight!r})")
        if cfg.realism_fm_weight < 0:
            raise ValueError(f"realism_fm_weight must be >= 0 (got {cfg.realism_fm_weight!r})")
        if min(cfg.realism_mse_weight, cfg.realism_l1_weight, cfg.realism_energy_weight) < 0:
            raise ValueError(f"realism_mse_weight, realism_l1_weight and realism_energy_weight must be >= 0 (got "
                             f"{cfg.realism_mse_weight!r}, {cfg.realism_l1_weight!r} and "
                             f"{cfg.realism_energy_weight!r})")
        if cfg.realism_adv_adaptive and (cfg.mixed_precision == "fp16"
                                         or not (cfg.realism_mse_weight or cfg.realism_l1_weight)):
            # the adaptive weight is a ratio to the reconstruction terms' gradient (and fp16 may underflow it)
            raise ValueError(f"realism_adv_adaptive needs a reconstruction term (realism_mse_weight or "
                             f"realism_l1_weight > 0) and --mixed-precision bf16 or no (got {cfg.realism_mse_weight!r}, "
                             f"{cfg.realism_l1_weight!r} and {cfg.mixed_precision!r})")
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.ckdir = self.out / "checkpoint"
        self.acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision)
        torch.manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)
        if cfg.latent_channels is not None and cfg.config != "tiny":
            raise ValueError("--latent-channels is for --config tiny (the 'sd' config keeps SD's VAE)")
        if cfg.init:
            self.model = DiffoCodec.from_pretrained(cfg.init).float()
        elif cfg.config == "tiny":
            self.model = DiffoCodec.from_preset("tiny", latent_channels=cfg.latent_channels or 4)
        elif cfg.config == "sd":
            if not cfg.sd_path:
                raise ValueError("--config sd needs --sd PATH_OR_REPO (a diffusers SD 2.1 / SD-Turbo checkpoint)")
            self.model = DiffoCodec.from_sd(cfg.sd_path)
        else:
            raise ValueError(f"unknown --config {cfg.config!r}: use tiny or sd")
        widened = cfg.latent_channels not in (None, self.model.latent_channels)
        if widened:
            self.model, names = widen_latent(self.model, cfg.latent_channels)
            logger.info("widened: %s", ", ".join(names))
        entropy_models.trainable(self.model)  # CompressAI's differentiable entropy models (the train extra)
        self.device = self.acc.device  # accelerate picks the GPU when there is one
        self.model.to(self.device)
        files = list_images(cfg.data)
        self.train_files, self.held_files = split_holdout(files)
        logger.info("%d training photos, %d held out", len(self.train_files), len(self.held_files))
        self.stages = self._stage_list(cfg)
        missing = [s for s in ("vae", "latents", "decoder", "codec", "denoiser", "noise") if s not in self.stages
                   and (s != "decoder" or self.model.decoder is not None)] if widened else []
        if missing:
            raise ValueError(f"--latent-channels {cfg.latent_channels} makes a new latent space: every stage must run "
                             f"again (add {', '.join(missing)} to --stages)")
        if "decoder" in self.stages and self.model.decoder is None:
            self.model.add_fast_decoder()
        if cfg.realism_train_decoder and (cfg.realism_real != "photo" or cfg.realism_adv_schedule != "flat"
                                          or self.model.decoder is None):
            # against the decoded true latent the decoder in training would make its own real crops; the decode
            # of the true latent has no strength to schedule its adversarial term by
            raise ValueError(f"realism_train_decoder needs --realism-real photo, --realism-adv-schedule flat and a "
                             f"model with the fast decoder (got {cfg.realism_real!r}, {cfg.realism_adv_schedule!r}; "
                             f"fast decoder: {'yes' if self.model.decoder is not None else 'none'})")
        self.progress = {"stage": self.stages[0], "step": 0, "seconds": {},
                         "latent_channels": self.model.latent_channels}
        self.disc: UNetFeatureDiscriminator | None = None
        self.patch_disc: PatchDiscriminator | None = None
        self.decoder_disc: PatchDiscriminator | None = None
        if (self.ckdir / "progress.json").is_file():
            self._resume()

    @staticmethod
    def _stage_list(cfg: TrainConfig) -> list[str]:
        applicable = [s for s in STAGES if cfg.config == "tiny" or s not in ("vae", "decoder")]
        if cfg.stages is None:
            return applicable
        unknown = [s for s in cfg.stages if s not in applicable]
        if unknown:
            raise ValueError(f"unknown or inapplicable stage(s) {unknown} for --config {cfg.config}: "
                             f"choose from {', '.join(applicable)}")
        chosen = [s for s in applicable if s in cfg.stages]
        if "final" not in chosen:
            chosen.append("final")
        if cfg.init is None and chosen[0] != applicable[0]:
            raise ValueError("--stages without the first stages needs --init (a trained model to start from)")
        needs_latents = {"codec", "denoiser", "realism"} & set(chosen)
        if needs_latents and "latents" not in chosen:
            raise ValueError(f"stage(s) {sorted(needs_latents)} read the latent cache: add 'latents' to --stages")
        return chosen

    # ------------------------------------------------------------------ checkpoints
    def _resume(self):
        self.progress = ckpt.load_progress(self.ckdir)
        channels = self.progress.get("latent_channels", self.model.latent_channels)
        if channels != self.model.latent_channels:
            raise ValueError(f"the checkpoint in {self.ckdir} has {channels} latent channels, this model "
                             f"{self.model.latent_channels}: resume with --latent-channels {channels}")
        ckpt.load_module(self.ckdir, "model", self.model)
        # config values set by earlier stages (checkpoints hold weights only)
        if self.progress.get("scaling_factor"):
            self.model.set_latent_scale(self.progress["scaling_factor"])
        if self.progress.get("noise_strengths"):
            self.model.register_to_config(noise_rates=self.progress["noise_rates"],
                                          noise_strengths=self.progress["noise_strengths"])
        logger.info("resumed at stage %s step %d", self.progress["stage"], self.progress["step"])

    def _save(self, optimizers: dict, extra_modules: dict | None = None):
        mods = {"model": self.model, **(extra_modules or {})}
        ckpt.save_checkpoint(self.ckdir, mods, optimizers, self.progress)

    def _log(self, **row):
        row = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}
        with open(self.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------ generic loop
    def _loop(self, stage: str, params, step_fn, optimizers_extra=None, extra_modules=None, on_resume=None):
        cfg = self.cfg
        opt = torch.optim.AdamW(params, lr=cfg.lr[stage], weight_decay=0.0)
        opts = {stage: opt, **(optimizers_extra or {})}
        resumed = self.progress["stage"] == stage and self.progress["step"] > 0
        if resumed:
            for name, o in opts.items():
                ckpt.load_optimizer(self.ckdir, name, o)
            if on_resume:
                on_resume()
        else:
            self.progress.update(stage=stage, step=0)
        budget = cfg.minutes.get(stage, 10) * 60
        spent = self.progress["seconds"].get(stage, 0.0)
        total = cfg.steps.get(stage, 10**6)
        bar = tqdm(total=total, initial=self.progress["step"], desc=stage, mininterval=5, dynamic_ncols=True)
        last_ck = time.time()
        t0 = time.time() - spent
        stats: dict = {}  # the last step's losses, logged with the stage's end
        while self.progress["step"] < total and time.time() - t0 < budget:
            done = max(self.progress["step"] / total, (time.time() - t0) / budget)
            for group in opt.param_groups:
                group["lr"] = cfg.lr[stage] * (cfg.lr_floor + (1 - cfg.lr_floor) * 0.5 * (1 + math.cos(math.pi * done)))
            self.model.train()
            stats = step_fn(self.progress["step"], opt, opts)
            self.progress["step"] += 1
            bar.update(1)
            if self.progress["step"] % 25 == 0:
                bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items()})
                self._log(stage=stage, step=self.progress["step"], t=round(time.time() - t0), **stats)
            if time.time() - last_ck > cfg.checkpoint_minutes * 60:
                self.progress["seconds"][stage] = time.time() - t0
                self._save(opts, extra_modules() if extra_modules else None)
                last_ck = time.time()
        bar.close()
        self.progress["seconds"][stage] = time.time() - t0
        self._log(stage=stage, step=self.progress["step"], t=round(time.time() - t0), done=True, **stats)
        logger.info("stage %s done: %d steps in %.0f s", stage, self.progress["step"], time.time() - t0)

    def _next_stage(self, stage: str):
        self.progress.setdefault("steps_done", {})[stage] = self.progress["step"]
        self.progress.update(stage=self.stages[self.stages.index(stage) + 1], step=0)
        self._save({})

    # ------------------------------------------------------------------ stages
    def stage_vae(self):
        cfg = self.cfg
        sampler = CropSampler(self.train_files, cfg.vae_crop, seed=cfg.seed + self.progress["step"])
        vae = self.model.vae

        def step(i, opt, _):
            x = sampler.batch(cfg.vae_batch).to(self.device) * 2 - 1
            with self.acc.autocast():
                post = vae.encode(x).latent_dist
                rec = vae.decode(post.sample()).sample.float()
            l1, mse = F.l1_loss(rec, x), F.mse_loss(rec, x)
            kl = post.kl().mean() / x[0].numel()
            loss = l1 + mse + 1e-4 * kl
            opt.zero_grad(set_to_none=True)
            self.acc.backward(loss)
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            return {"l1": l1.item(), "psnr": 10 * math.log10(4 / max(mse.item(), 1e-10)), "kl": kl.item()}

        self._loop("vae", vae.parameters(), step)
        self._next_stage("vae")

    @torch.no_grad()
    def stage_latents(self):
        """Encode every training photo (and a half-size copy of the large ones) once."""
        self.model.eval()
        lat = []
        for p in tqdm(self.train_files, desc="latents", mininterval=5):
            img = load_rgb(p).float()[None].to(self.device) / 255
            views = [img]
            if min(img.shape[-2:]) >= 512:
                views.append(F.interpolate(img, scale_factor=0.5, mode="area"))
            for v in views:
                h, w = (v.shape[-2] // 8) * 8, (v.shape[-1] // 8) * 8
                dist = self.model.vae.encode(v[..., :h, :w] * 2 - 1).latent_dist
                lat.append(dist.mode()[0].cpu())
        std = torch.cat([z.flatten() for z in lat]).std().item()
        self.model.set_latent_scale(1.0 / std)
        sf = self.model.vae.config.scaling_factor
        from safetensors.torch import save_file

        save_file({f"{i}": (z * sf).contiguous() for i, z in enumerate(lat)}, self.out / "latents.safetensors")
        self._log(stage="latents", count=len(lat), scaling_factor=sf)
        self.progress["scaling_factor"] = sf
        self._next_stage("latents")

    def stage_decoder(self):
        """The fast decoder from the frozen VAE encoder's latents (sampled from the posterior, as the VAE's
        decoder was trained) against the photos; with `decoder_adv_weight`, also against a pixel patch
        discriminator, so that it renders texture instead of the blurry mean an L1 + MSE decoder learns."""
        cfg = self.cfg
        sampler = CropSampler(self.train_files, cfg.decoder_crop, seed=cfg.seed + 1 + self.progress["step"])
        vae, dec = self.model.vae, self.model.decoder
        vae.requires_grad_(False)
        adversarial = cfg.decoder_adv_weight > 0
        extra, disc_opt = {}, None
        if adversarial:
            if self.decoder_disc is None:
                self.decoder_disc = PatchDiscriminator().to(self.device)
                ckpt.load_module(self.ckdir, "decoder_disc", self.decoder_disc)
            disc = self.decoder_disc
            disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.lr["decoder"] / 5, betas=(0.5, 0.999))
            extra = {"decoder_disc": disc_opt}
            last = dec.last_layer

        def step(i, opt, _):
            x = sampler.batch(cfg.decoder_batch).to(self.device) * 2 - 1
            with torch.no_grad():
                raw = vae.encode(x).latent_dist.sample()
            with self.acc.autocast():
                rec = dec(raw).float()
            l1, mse = F.l1_loss(rec, x), F.mse_loss(rec, x)
            loss, stats = l1 + mse, {}
            if adversarial:
                g_adv, fm = patch_generator_terms(disc, rec, x, feature_matching=cfg.decoder_fm_weight > 0)
                weight = cfg.decoder_adv_weight * adaptive_weight(loss, g_adv, last)
                loss = loss + weight * g_adv
                stats = {"g_adv": g_adv.item(), "w": weight.item()}
                if fm is not None:  # after the adaptive weight: the adversarial term is matched to L1 + MSE
                    loss = loss + cfg.decoder_fm_weight * fm
                    stats["fm"] = fm.item()
            opt.zero_grad(set_to_none=True)
            self.acc.backward(loss)
            torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
            opt.step()
            if adversarial:
                d_loss = discriminator_loss(disc(x), disc(rec.detach()))
                disc_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                disc_opt.step()
                stats["d_loss"] = d_loss.item()
            return {"l1": l1.item(), "psnr": 10 * math.log10(4 / max(mse.item(), 1e-10)), **stats}

        self._loop("decoder", dec.parameters(), step, optimizers_extra=extra,
                   extra_modules=(lambda: {"decoder_disc": self.decoder_disc}) if adversarial else None)
        self._next_stage("decoder")

    def _latent_sampler(self) -> LatentCropSampler:
        from safetensors.torch import load_file

        # the latent scale is already set: by the latents stage, or from the checkpoint by _resume
        cache = load_file(self.out / "latents.safetensors")
        return LatentCropSampler([cache[k] for k in sorted(cache, key=int)], self.cfg.latent_crop,
                                 seed=self.cfg.seed + self.progress["step"])

    def stage_codec(self):
        cfg = self.cfg
        sampler = self._latent_sampler()
        codec = self.model.latent_codec
        main = [p for n, p in codec.named_parameters() if not n.endswith("quantiles")]
        aux = [p for n, p in codec.named_parameters() if n.endswith("quantiles")]
        aux_opt = torch.optim.Adam(aux, lr=1e-3)

        def step(i, opt, _):
            z = sampler.batch(cfg.latent_batch).to(self.device)
            rate_q = _sample_rate(self.rng, cfg)
            out = codec(z, rate_q)
            pixels = z.shape[0] * (z.shape[-2] * 8) * (z.shape[-1] * 8)
            bpp = _bits(out.likelihoods) / pixels
            mse = F.mse_loss(out.c_hat, z)
            loss = bpp + _lambda(cfg, rate_q) * mse + out.vq.codebook_loss + 0.25 * out.vq.commitment_loss
            opt.zero_grad(set_to_none=True)
            self.acc.backward(loss)
            torch.nn.utils.clip_grad_norm_(main, 1.0)
            opt.step()
            aux_loss = codec.residual.entropy_bottleneck.loss()
            aux_opt.zero_grad(set_to_none=True)
            aux_loss.backward()
            aux_opt.step()
            dead = 0
            if (i + 1) % 100 == 0:
                with torch.no_grad():
                    probe = codec.base.encoder(sampler.batch(64).to(self.device))
                    dead = codec.base.quantizer.restart_dead_codes(probe)
            return {"rate": rate_q / MAX_RATE_Q, "bpp": bpp.item(), "mse": mse.item(), "dead": dead}

        self._loop("codec", main, step, optimizers_extra={"aux": aux_opt})
        self._next_stage("codec")

    def stage_denoiser(self):
        cfg = self.cfg
        sampler = self._latent_sampler()
        den = self.model.denoiser
        self.model.latent_codec.requires_grad_(False)
        if cfg.config == "sd":  # OSDiff: the UNet stays frozen, control module (and prompt) train
            den.unet.requires_grad_(False)
        gen_params = [p for p in den.parameters() if p.requires_grad]
        self.model.vae.requires_grad_(False)

        def pixel_haarpsi(x0, c_hat, z):
            """HaarPSI of the decoded centre crops of the output (differentiable) and of ĉ (a float), both
            against the decoded true latent: the perceptual signal the latent MSE does not give."""
            import piq

            n, c = cfg.pixel_batch, cfg.pixel_crop
            top, left = (z.shape[-2] - c) // 2, (z.shape[-1] - c) // 2
            crop = lambda t: t[:n, :, top:top + c, left:left + c]  # noqa: E731
            to_img = lambda t: self.model.decode_latent(t).float()  # noqa: E731
            with torch.no_grad():
                target, base = to_img(crop(z)), to_img(crop(c_hat))
            with self.acc.autocast():
                out = to_img(crop(x0))
            return piq.haarpsi(out, target, data_range=1.0), piq.haarpsi(base, target, data_range=1.0).item()
        disc_opt = None
        total_steps = cfg.steps["denoiser"]
        budget = cfg.minutes["denoiser"] * 60

        def ensure_disc():
            if self.disc is None:
                self.disc = UNetFeatureDiscriminator(den, train_backbone=cfg.disc_backbone == "trained")
                ckpt.load_module(self.ckdir, "disc", self.disc)
                nonlocal disc_opt
                disc_opt = torch.optim.AdamW([p for p in self.disc.parameters() if p.requires_grad],
                                             lr=cfg.lr["denoiser"], betas=(0.5, 0.999))
                ckpt.load_optimizer(self.ckdir, "disc", disc_opt)
            return self.disc

        def step(i, opt, opts):
            z = sampler.batch(cfg.latent_batch).to(self.device)
            rate_q = _sample_rate(self.rng, cfg)
            with torch.no_grad():
                self.model.latent_codec.eval()
                c_hat = self.model.latent_codec(z, rate_q).c_hat  # eval: real rounding, as at decode time
            strength = self.model.strength_for_rate(rate_q / MAX_RATE_Q)
            if self.rng.random() < cfg.random_strength_prob:  # any strength the noise stage may pick
                strength = self.rng.uniform(0.0, max(noise_tuning.STRENGTHS))
            t = torch.full((len(z),), self.model.timestep_for_strength(strength), dtype=torch.long,
                           device=self.device)
            with self.acc.autocast():
                x0 = den(c_hat, t, torch.randn_like(z)).float()
            mse = F.mse_loss(x0, z)
            loss = mse
            stats = {"rate": rate_q / MAX_RATE_Q, "mse": mse.item(),
                     "mse_in": F.mse_loss(c_hat, z).item()}
            if cfg.pixel_weight > 0:
                hp, hp_in = pixel_haarpsi(x0, c_hat, z)
                loss = loss + cfg.pixel_weight * (1 - hp)
                stats.update(hp=hp.item(), hp_in=hp_in)
            if i >= cfg.adv_start * total_steps or (time.time() - self._den_t0) > cfg.adv_start * budget:
                disc = ensure_disc()
                opts["disc"] = disc_opt
                td = torch.randint(0, den.num_train_timesteps // 2, (len(z),), device=self.device)
                noise = torch.randn_like(z)
                fake = den.add_noise(x0, td, noise)
                with self.acc.autocast(), frozen(disc):
                    g_adv = generator_loss(disc(fake, td))
                loss = loss + cfg.adv_weight * g_adv
                stats["g_adv"] = g_adv.item()
            opt.zero_grad(set_to_none=True)
            self.acc.backward(loss)
            torch.nn.utils.clip_grad_norm_(gen_params, 1.0)
            opt.step()
            if self.disc is not None:
                real = den.add_noise(z, td, noise)
                with self.acc.autocast():
                    d_loss = discriminator_loss(self.disc(real, td), self.disc(fake.detach(), td))
                disc_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                disc_opt.step()
                stats["d_loss"] = d_loss.item()
            return stats

        self._den_t0 = time.time() - self.progress["seconds"].get("denoiser", 0)
        self._loop("denoiser", gen_params, step,
                   extra_modules=lambda: {"disc": self.disc} if self.disc is not None else {})
        self._next_stage("denoiser")

    def stage_realism(self):
        """Denoiser against a pixel-space patch discriminator on decoded crops (real: the decoded true latent, or
        with `realism_real="photo"` the photo crop itself; fake: the decoded output), plus latent MSE and the
        decoded crops' L1 against the same real crops. For the 'sd' config the UNet stays
        frozen (only the control module trains), as in the denoiser stage. With `realism_train_decoder` the fast
        decoder trains too, on both the step's output and the true latent (see TrainConfig); with
        `realism_energy_weight` a second draw of the step, from its own noise, is decoded and the two draws are
        scored against the real crops by the energy score."""
        cfg = self.cfg
        sampler = photos = None  # latent crops from the cache, or photo crops encoded on the fly
        if cfg.realism_real == "photo":
            photos = CropSampler(self.train_files, 8 * cfg.realism_crop, seed=cfg.seed + 2 + self.progress["step"])
        else:
            sampler = self._latent_sampler()
        den, joint = self.model.denoiser, cfg.realism_train_decoder
        self.model.requires_grad_(False)
        gen_params = [p for n, p in den.named_parameters() if cfg.config != "sd" or not n.startswith("unet.")]
        if joint:
            gen_params += list(self.model.decoder.parameters())
        for p_ in gen_params:
            p_.requires_grad_(True)
        if self.patch_disc is None:
            self.patch_disc = PatchDiscriminator().to(self.device)
            ckpt.load_module(self.ckdir, "patch_disc", self.patch_disc)
        disc = self.patch_disc
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=2 * cfg.lr["realism"], betas=(0.5, 0.999))
        sf = self.model.vae.config.scaling_factor
        decode = lambda t: self.model.decode_raw_latent_signed(t / sf)  # noqa: E731  (cached latents are scaled)
        lo, hi = cfg.realism_strengths

        def step(i, opt, opts):
            if photos is None:
                z = sampler.batch(cfg.realism_batch).to(self.device)
            else:
                x = photos.batch(cfg.realism_batch).to(self.device) * 2 - 1
                with torch.no_grad():
                    z = self.model.vae.encode(x).latent_dist.mode() * sf
            rate_q = _sample_rate(self.rng, cfg)
            with torch.no_grad():
                self.model.latent_codec.eval()
                c_hat = self.model.latent_codec(z, rate_q).c_hat
            strength = self.rng.uniform(lo, hi)
            t = torch.full((len(z),), self.model.timestep_for_strength(strength), dtype=torch.long,
                           device=self.device)
            with self.acc.autocast():
                x0 = den(c_hat, t, torch.randn_like(z)).float()
            mse = F.mse_loss(x0, z)
            n, c = cfg.realism_batch, min(cfg.realism_crop, *z.shape[-2:])
            top = self.rng.randrange(z.shape[-2] - c + 1)
            left = self.rng.randrange(z.shape[-1] - c + 1)
            crop = lambda t_: t_[:n, :, top:top + c, left:left + c]  # noqa: E731
            crop8 = lambda t_: t_[:n, :, 8 * top:8 * (top + c), 8 * left:8 * (left + c)]  # noqa: E731  (pixels)
            with torch.no_grad():
                real = decode(crop(z)) if photos is None else crop8(x)
            fm_on = cfg.realism_fm_weight > 0
            with self.acc.autocast():
                fake = decode(crop(x0)).float()
                g_adv, fm = patch_generator_terms(disc, fake, real, feature_matching=fm_on)
                if joint:  # the decoder stage's recipe on the true latent: the plain decode keeps being trained
                    plain = decode(crop(z)).float()
                    g_plain, fm_plain = patch_generator_terms(disc, plain, real, feature_matching=fm_on)
            l1 = F.l1_loss(fake, real)
            scale = strength / hi if cfg.realism_adv_schedule == "strength" else 1.0
            loss = cfg.realism_mse_weight * mse + cfg.realism_l1_weight * l1
            stats = {}
            if joint:
                anchor = F.l1_loss(plain, real) + F.mse_loss(plain, real)
                loss, g_adv = loss + anchor, g_adv + g_plain
                fm = fm + fm_plain if fm_on else None
                stats.update(anchor=anchor.item(), g_plain=g_plain.item())
            weight = cfg.realism_adv_weight * scale
            if cfg.realism_adv_adaptive:  # at the generator's last tensor: the decoder's last layer (as in the
                # decoder stage), or the step's output (the one tensor every config trains towards)
                weight = weight * adaptive_weight(loss, g_adv, self.model.decoder.last_layer if joint else x0)
                stats["w"] = float(weight)
            loss = loss + weight * g_adv
            if fm is not None:  # on the adversarial term's schedule: both pull away from the blurry mean
                loss = loss + cfg.realism_fm_weight * scale * fm
                stats["fm"] = fm.item()
            if cfg.realism_energy_weight:  # a second draw of the step from its own noise, decoded the same way
                with self.acc.autocast():
                    fake_b = decode(crop(den(c_hat, t, torch.randn_like(z)))).float()
                energy, spread = patch_energy_score(fake, fake_b, real)
                loss = loss + cfg.realism_energy_weight * energy
                stats.update(energy=energy.item(), spread=spread.item())
            opt.zero_grad(set_to_none=True)
            self.acc.backward(loss)
            torch.nn.utils.clip_grad_norm_(gen_params, 1.0)
            opt.step()
            fakes = torch.cat([fake, plain]) if joint else fake
            with self.acc.autocast():
                d_real, d_fake = disc(real).float(), disc(fakes.detach()).float()
            d_loss = discriminator_loss(d_real, d_fake)
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
            return {"rate": rate_q / MAX_RATE_Q, "s": strength, "mse": mse.item(), "mse_in": F.mse_loss(c_hat, z).item(),
                    "l1": l1.item(), "g_adv": g_adv.item(), "d_loss": d_loss.item(),
                    "d_real": d_real.mean().item(), "d_fake": d_fake.mean().item(), **stats}

        self._loop("realism", gen_params, step, optimizers_extra={"patch_disc": disc_opt},
                   extra_modules=lambda: {"patch_disc": disc})
        self._next_stage("realism")

    def stage_noise(self):
        """Choose the noise map on the held-out photos (centre crops), as the model will be saved."""
        if not self.held_files:
            logger.warning("no held-out photos: the noise map is left as it is")
            self._next_stage("noise")
            return
        self.model.eval()
        self.model.update()  # the real entropy coder: tuning goes through actual bytes
        crops = [load_centre_crop(p, self.cfg.tune_crop) for p in self.held_files]
        t0 = time.time()
        with entropy_models.runtime_view(self.model):  # real files, coded as users code them
            table = noise_tuning.tune(self.model, crops, criterion=self.cfg.noise_criterion)
        (self.out / "noise_tuning.json").write_text(json.dumps(table, indent=1))
        self.progress.update(noise_rates=list(self.model.config.noise_rates),
                             noise_strengths=list(self.model.config.noise_strengths), noise_tuned=True)
        self.progress["seconds"]["noise"] = time.time() - t0
        self._log(stage="noise", chosen=table["chosen"], t=round(time.time() - t0))
        self._next_stage("noise")

    def stage_final(self) -> Path:
        from .model_card import finalize

        self.model.cpu()
        info = {"command": self.cfg.command(), "data": ", ".join(map(str, self.cfg.data)),
                "stages": {k: {"steps": v} for k, v in self.progress.get("steps_done", {}).items()},
                "seconds": self.progress["seconds"], "hardware": _hardware(), "init": self.cfg.init,
                "losses": self.cfg.losses(stages=self.progress.get("steps_done", {})),
                "cores": torch.get_num_threads(),
                "noise_origin": self._noise_origin(),
                "noise_map": ", ".join(f"{r:g} → {s:g}" for r, s in zip(self.model.config.noise_rates,
                                                                     self.model.config.noise_strengths))}
        folder = finalize(self.model, self.out / "model", self.held_files, info)
        logger.info("saved %s", folder)  # its fingerprint: of the stored (half-precision) weights, see finalize
        return folder

    def _noise_origin(self) -> str:
        """Where the saved noise map comes from, for the model card (a run may skip the noise stage, or find no
        held-out photos to tune on)."""
        if self.progress.get("noise_tuned"):
            return "tuned on the held-out photos, criterion: " + (
                "HaarPSI" if self.cfg.noise_criterion == "haarpsi"
                else "the strongest noise within 0.3 dB of the no-denoise PSNR")
        if self.cfg.init:
            return "kept from the model this run started from (this run did not tune it)"
        return "the preset's default (this run did not tune it)"

    def run(self) -> Path:
        while True:
            stage = self.progress["stage"]
            if stage == "final":
                return self.stage_final()
            getattr(self, f"stage_{stage}")()


def _hardware() -> str:
    import os
    import platform

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {dev}, torch {torch.__version__}"


def train(cfg: TrainConfig) -> Path:
    trainer = Trainer(cfg)  # refuses a bad configuration before anything is written
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    return trainer.run()
