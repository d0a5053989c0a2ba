"""The training command end to end on a handful of synthetic photos: every stage, checkpoints, resume."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffo.models.diffo.codec import DiffoCodec
from diffo.training import train as train_mod
from diffo.training.train import TrainConfig, Trainer


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        low = torch.rand(3, 6, 8, generator=g)
        img = torch.nn.functional.interpolate(low[None], size=(96, 128), mode="bilinear")[0]
        Image.fromarray((img.permute(1, 2, 0) * 255).byte().numpy()).save(d / f"p{i}.png")
    return d


def _spy_backward(monkeypatch) -> list:
    """The value of every loss the training stages back-propagate, in order."""
    from accelerate import Accelerator

    losses, real_backward = [], Accelerator.backward
    monkeypatch.setattr(Accelerator, "backward", lambda self, loss, **kw: losses.append(loss.item())
                        or real_backward(self, loss, **kw))
    return losses


def _stage_done(run, stage) -> dict:
    """The `done` row a stage wrote to the run's train_log.jsonl."""
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("stage") == stage and r.get("done")][0]


def _cfg(data_dir, out):
    return TrainConfig(data=[str(data_dir)], out=str(out),
                       steps={"vae": 2, "decoder": 2, "codec": 3, "denoiser": 3, "realism": 2},
                       minutes={k: 5 for k in ("vae", "decoder", "codec", "denoiser", "realism")}, vae_crop=64,
                       vae_batch=2, decoder_crop=64, decoder_batch=2, latent_crop=8, latent_batch=2, realism_batch=2,
                       checkpoint_minutes=0.0, adv_start=0.3)


def test_train_stops_and_resumes_to_a_loadable_model(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = _cfg(data_dir, out)

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "stage_denoiser", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(cfg)
    progress = json.loads((out / "checkpoint" / "progress.json").read_text())["progress"]
    assert progress["stage"] == "denoiser"
    assert progress["steps_done"] == {"vae": 2, "latents": 0, "decoder": 2, "codec": 3}
    codec_state = {k: v.clone() for k, v in Trainer(cfg).model.latent_codec.state_dict().items()}

    monkeypatch.undo()
    logged_before = len((out / "train_log.jsonl").read_text().splitlines())
    folder = train_mod.train(cfg)
    after = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()[logged_before:]]
    assert {row["stage"] for row in after} == {"denoiser", "realism"}  # no earlier stage redone
    model = DiffoCodec.from_pretrained(folder)
    for k, v in codec_state.items():  # the resumed run started from the checkpointed codec
        if not k.endswith(("_quantized_cdf", "_offset", "_cdf_length")):
            assert torch.equal(v, model.latent_codec.state_dict()[k].to(v.dtype)), k
    assert (folder / "README.md").read_text().startswith("---")
    # the latent scale the codec was trained at is the one saved (it was once lost on saving: registered on the
    # VAE only, while save_pretrained writes the model's vae_config)
    trained_scale = json.loads((out / "checkpoint" / "progress.json").read_text())["progress"]["scaling_factor"]
    assert trained_scale != 1.0
    assert model.vae.config.scaling_factor == pytest.approx(trained_scale)
    assert json.loads((folder / "config.json").read_text())["vae_config"]["scaling_factor"] == pytest.approx(trained_scale)

    from diffo import pipeline

    data = pipeline.encode(model, torch.rand(3, 40, 40), rate=0.5)
    assert pipeline.decode(model, data).shape == (3, 40, 40)


def test_refuses_kodak_and_empty_folders(tmp_path):
    from diffo.training.data import list_images

    kodak = tmp_path / "kodak"
    kodak.mkdir()
    with pytest.raises(ValueError, match="Kodak"):
        list_images([kodak])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images([empty])


def test_sd_config_trains_codec_and_control_with_frozen_unet(data_dir, tmp_path, sd_checkpoint):
    from diffusers import UNet2DConditionModel

    cfg = _cfg(data_dir, tmp_path / "sd")
    cfg.config, cfg.sd_path = "sd", str(sd_checkpoint)
    folder = train_mod.train(cfg)
    progress = json.loads((tmp_path / "sd" / "checkpoint" / "progress.json").read_text())["progress"]
    assert "vae" not in progress["steps_done"]  # SD's VAE is kept as it is
    model = DiffoCodec.from_pretrained(folder)
    ref = UNet2DConditionModel.from_pretrained(sd_checkpoint / "unet")
    for k, v in ref.state_dict().items():  # frozen UNet (stored in half precision)
        assert torch.equal(v.half().float(), model.denoiser.unet.state_dict()[k]), k


def test_noise_map_choice_never_rises_with_the_rate_and_maximises_the_sum():
    from diffo.training.noise_tuning import best_non_increasing

    strengths = [0.0, 0.2, 0.5]
    # each level alone would pick 0.0 at rate 0 and 0.5 at rate 1: not allowed (more rate, more noise)
    scores = [[0.60, 0.55, 0.50], [0.70, 0.71, 0.72]]
    assert best_non_increasing(scores, strengths) == [0.0, 0.0]  # 0.60+0.70 > 0.55+0.71 > 0.50+0.72
    scores = [[0.40, 0.50, 0.60], [0.70, 0.75, 0.72]]
    assert best_non_increasing(scores, strengths) == [0.5, 0.2]
    assert best_non_increasing([[0.1, 0.3, 0.2]] * 3, strengths) == [0.2, 0.2, 0.2]


def test_strongest_criterion_takes_the_most_noise_the_psnr_tolerance_allows():
    from diffo.training.noise_tuning import strongest_within

    strengths = (0.0, 0.2, 0.5)
    psnr = [[20.0, 19.9, 19.8], [24.0, 23.8, 23.0], [25.0, 24.0, 23.0]]
    plain = [20.0, 24.0, 25.0]
    assert strongest_within(psnr, plain, strengths, 0.3) == [0.5, 0.2, 0.0]
    # never rising with the rate, even where a higher rate would allow more
    assert strongest_within([[20.0, 19.0, 18.0], [24.0, 24.0, 24.0]], [20.0, 24.0], strengths, 0.3) == [0.0, 0.0]


def test_the_card_says_where_the_noise_map_comes_from():
    """Tuned in this run (and by which criterion), kept from --init, or the preset's: a run that skips the noise
    stage, or finds no held-out photos to tune on, must not claim a tuning it did not do."""
    from types import SimpleNamespace

    origin = lambda progress, **cfg: Trainer._noise_origin(SimpleNamespace(progress=progress,  # noqa: E731
                                                                           cfg=TrainConfig(**cfg)))
    assert origin({"noise_tuned": True}) == "tuned on the held-out photos, criterion: HaarPSI"
    assert "the strongest noise within 0.3 dB" in origin({"noise_tuned": True}, noise_criterion="strongest")
    assert origin({}, init="x").startswith("kept from the model this run started from")
    assert origin({"steps_done": {"noise": 0}}).startswith("the preset's default")  # stage ran, nothing held out


def test_noise_stage_tunes_the_map_on_held_out_photos(data_dir, tmp_path, monkeypatch):
    from diffo.training import noise_tuning

    monkeypatch.setattr(train_mod, "split_holdout", lambda files: (files[1:], files[:1]))
    monkeypatch.setattr(noise_tuning, "RATES", (0.0, 1.0))
    monkeypatch.setattr(noise_tuning, "STRENGTHS", (0.0, 0.3))
    cfg = _cfg(data_dir, tmp_path / "run")
    cfg.tune_crop = 64
    folder = train_mod.train(cfg)
    table = json.loads((tmp_path / "run" / "noise_tuning.json").read_text())
    assert table["rates"] == [0.0, 1.0] and len(table["haarpsi"]) == 2 and len(table["nodenoise"]) == 2
    model = DiffoCodec.from_pretrained(folder)
    assert list(model.config.noise_strengths) == table["chosen"]
    assert table["chosen"][0] >= table["chosen"][1] and set(table["chosen"]) <= {0.0, 0.3}
    card = (folder / "README.md").read_text()
    assert "Noise map" in card and "| NIQE |" in card  # NaN here: the 64 px crops are below NIQE's two blocks
    assert "tuned on the held-out photos, criterion: HaarPSI" in card
    ceiling = json.loads((tmp_path / "run" / "holdout_ceiling.json").read_text())
    assert set(ceiling) == {"psnr_true_latent", "niqe_true_latent", "niqe_original"}
    assert 5 < ceiling["psnr_true_latent"] < 60 and f"{ceiling['psnr_true_latent']:.2f} dB" in card
    assert "Decoded from their true latent" in card


def test_stages_continue_a_saved_model_with_a_fast_decoder_and_the_realism_stage(data_dir, tmp_path, monkeypatch):
    """`--init M --stages latents,decoder,realism`: the codec is kept bit for bit, a fast decoder is added
    and trained, and an interrupted realism stage resumes with its patch discriminator's checkpoint."""
    init = DiffoCodec.from_preset("tiny")
    init.update()
    init.save_pretrained(tmp_path / "init")
    cfg = _cfg(data_dir, tmp_path / "run")
    cfg.init, cfg.stages = str(tmp_path / "init"), ["latents", "decoder", "realism"]
    cfg.steps["realism"] = 4
    calls = []
    real_loop = Trainer._loop

    def stop_after_two(self, stage, params, step_fn, **kw):
        if stage == "realism" and not calls:
            calls.append(stage)
            self.cfg.steps["realism"] = 2
            real_loop(self, stage, params, step_fn, **kw)  # checkpoints after every step (checkpoint_minutes=0)
            raise KeyboardInterrupt
        return real_loop(self, stage, params, step_fn, **kw)

    monkeypatch.setattr(Trainer, "_loop", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(cfg)
    assert (tmp_path / "run" / "checkpoint" / "patch_disc.safetensors").is_file()
    dec_state = {k: v.clone() for k, v in Trainer(cfg).model.decoder.state_dict().items()}
    cfg.steps["realism"] = 4
    folder = train_mod.train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    realism = [r["step"] for r in rows if r.get("stage") == "realism" and r.get("done")]
    assert realism == [2, 4]  # the second run went on from step 2
    model = DiffoCodec.from_pretrained(folder)
    assert model.config.decoder_config and model.decoder is not None
    for k, v in dec_state.items():  # the decoder stage was not run again
        assert torch.equal(v.half().float(), model.decoder.state_dict()[k]), k
    for k, v in init.latent_codec.state_dict().items():
        assert torch.equal(v, model.latent_codec.state_dict()[k].to(v.dtype)), k
    # the decoder is what decodes now
    lat = torch.randn(1, 4, 4, 4)
    assert not torch.allclose(model.decode_latent(lat), init.decode_latent(lat))


def _train_spying_on_features(cfg, monkeypatch, stage):
    """Train `cfg` recording each pass through the patch discriminator's features, and check what both
    feature-matching stages share: per step the generator's output (carrying its gradient), then the photo crops
    (8-bit levels). Returns the model folder, the stage's `done` row, the losses and the recorded passes."""
    from diffo.models.diffo.discriminator import PatchDiscriminator

    seen, real_features = [], PatchDiscriminator.forward_features
    monkeypatch.setattr(PatchDiscriminator, "forward_features",
                        lambda self, x: seen.append((x.detach().clone(), x.requires_grad)) or real_features(self, x))
    losses = _spy_backward(monkeypatch)
    folder = train_mod.train(cfg)
    assert len(seen) == 4 and [g for _, g in seen[:2]] == [True, False] and not torch.equal(seen[0][0], seen[1][0])
    levels = (seen[1][0] + 1) / 2 * 255
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    return folder, _stage_done(Path(cfg.out), stage), losses, seen


def _photo_realism_cfg(data_dir, tmp_path) -> TrainConfig:
    """A realism-stage run judged against the photos, from a fresh tiny model with its fast decoder."""
    init = DiffoCodec.from_preset("tiny")
    init.update()
    init.add_fast_decoder()
    init.save_pretrained(tmp_path / "init")
    cfg = _cfg(data_dir, tmp_path / "run")
    cfg.init, cfg.stages, cfg.realism_real, cfg.realism_crop = str(tmp_path / "init"), ["latents", "realism"], \
        "photo", 8
    return cfg


def test_realism_stage_can_judge_against_the_photos(data_dir, tmp_path, monkeypatch):
    """`--realism-real photo`: the discriminator's real crops are the photo crops themselves (encoded on the
    fly for the generator), not the decoded true latents; a wrong choice is refused by name."""
    from diffo.models.diffo.discriminator import PatchDiscriminator
    from diffo.training import data

    cfg = _photo_realism_cfg(data_dir, tmp_path)
    photos, seen = [], []
    real_batch = data.CropSampler.batch
    monkeypatch.setattr(data.CropSampler, "batch", lambda self, n: photos.append(real_batch(self, n)) or photos[-1])
    real_forward = PatchDiscriminator.forward
    monkeypatch.setattr(PatchDiscriminator, "forward", lambda self, img: seen.append(img.detach().clone())
                        or real_forward(self, img))
    train_mod.train(cfg)
    assert len(photos) == 2 and photos[0].shape == (2, 3, 64, 64)
    # per step: the generator's fake, then the real crops, then the fake again for the discriminator's update
    assert torch.equal(seen[1].cpu(), photos[0] * 2 - 1) and torch.equal(seen[4].cpu(), photos[1] * 2 - 1)
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "real crops: the photos" in card and "--realism-real photo --realism-adv-schedule flat" in card
    cfg.realism_adv_schedule = "strength"
    assert "0.1·(strength / 0.6)·pixel patch discriminator" in cfg.losses()
    for bad in ({"realism_real": "pixels"}, {"realism_adv_schedule": "rising"}):  # refused before any stage runs
        with pytest.raises(ValueError, match=next(iter(bad))):
            Trainer(TrainConfig(data=[str(data_dir)], out=str(tmp_path / "run2"), **bad))
    assert not (tmp_path / "run2").exists()


def test_realism_stage_feature_matching_follows_the_adversarial_schedule(data_dir, tmp_path, monkeypatch):
    """`--realism-fm-weight`: the one step's loss gains W·scale·(mean L1 between the patch discriminator's activations
    on the decoded output and on the photo crops), scale being the adversarial term's strength schedule."""
    cfg = _photo_realism_cfg(data_dir, tmp_path)
    cfg.realism_fm_weight, cfg.realism_adv_schedule = 2.0, "strength"
    folder, done, losses, seen = _train_spying_on_features(cfg, monkeypatch, "realism")
    assert seen[1][0].shape == (2, 3, 64, 64)
    scale = done["s"] / 0.6
    assert scale < 0.99  # a scale of 1 could not tell the schedule from none
    assert done["fm"] > 0 and losses[-1] == pytest.approx(
        done["mse"] + done["l1"] + 0.1 * scale * done["g_adv"] + 2.0 * scale * done["fm"], rel=1e-4)
    assert "--realism-fm-weight 2" in (folder / "README.md").read_text()
    assert "2·(strength / 0.6)·feature matching" in cfg.losses()
    assert "feature matching" not in TrainConfig().losses()
    with pytest.raises(ValueError, match="realism_fm_weight"):
        Trainer(TrainConfig(data=[str(data_dir)], out=str(tmp_path / "run2"), realism_fm_weight=-1.0))


def test_realism_stage_can_weigh_the_latent_mse_and_adapt_the_adversarial_weight(data_dir, tmp_path, monkeypatch):
    """`--realism-mse-weight W --realism-adv-adaptive`: the one step's loss is W·MSE + L1 + a·g_adv + fm, where a is
    the adversarial weight times the ratio of the reconstruction terms' gradient norm at the step's output to the
    adversarial term's (logged as `w`); both reach the card, and impossible settings are refused by name."""
    cfg = _photo_realism_cfg(data_dir, tmp_path)
    cfg.realism_mse_weight, cfg.realism_adv_adaptive, cfg.realism_adv_weight = 0.1, True, 0.5
    cfg.realism_fm_weight = 2.0
    grads = []
    real_adaptive = train_mod.adaptive_weight
    monkeypatch.setattr(train_mod, "adaptive_weight", lambda rec, adv, last: grads.append(
        (rec.item(), tuple(last.shape))) or real_adaptive(rec, adv, last))
    folder, done, losses, _ = _train_spying_on_features(cfg, monkeypatch, "realism")
    assert len(grads) == 2 and grads[-1][1] == (2, 4, 8, 8)  # at the step's output latent (batch, C, H, W)
    assert grads[-1][0] == pytest.approx(0.1 * done["mse"] + done["l1"], rel=1e-4)
    assert done["w"] > 0 and done["w"] != pytest.approx(0.5)  # the ratio, not the bare weight
    assert losses[-1] == pytest.approx(0.1 * done["mse"] + done["l1"] + done["w"] * done["g_adv"] + 2.0 * done["fm"],
                                       rel=1e-4)
    card = (folder / "README.md").read_text()
    assert "--realism-mse-weight 0.1 --realism-adv-adaptive" in card
    assert "0.1·latent MSE" in card and "0.5·adaptive weight·pixel patch discriminator" in card
    assert "adaptive" not in TrainConfig().losses() and "--realism-adv-adaptive" not in TrainConfig().command()
    for bad, name in (({"realism_mse_weight": -1.0}, "realism_mse_weight"),
                      ({"realism_adv_adaptive": True, "mixed_precision": "fp16"}, "realism_adv_adaptive"),
                      ({"realism_adv_adaptive": True, "realism_mse_weight": 0.0, "realism_l1_weight": 0.0},
                       "realism_adv_adaptive")):
        with pytest.raises(ValueError, match=name):  # as `python -m diffo train` runs it: nothing written
            train_mod.train(TrainConfig(data=[str(data_dir)], out=str(tmp_path / "run2"), **bad))
    assert not (tmp_path / "run2").exists()


def test_realism_stage_can_add_the_energy_score_of_two_draws(data_dir, tmp_path, monkeypatch):
    """`--realism-energy-weight W`: the step runs twice per batch from independent starting noises, both decodes
    (carrying their gradient) are scored against the photo crops by the patch energy score, and W times that score
    joins the loss; the card records it, and a negative weight is refused by name with nothing written."""
    from diffo.training import data

    cfg = _photo_realism_cfg(data_dir, tmp_path)
    cfg.realism_energy_weight = 0.5
    photos, scored = [], []
    real_batch, real_score = data.CropSampler.batch, train_mod.patch_energy_score
    monkeypatch.setattr(data.CropSampler, "batch", lambda self, n: photos.append(real_batch(self, n)) or photos[-1])
    monkeypatch.setattr(train_mod, "patch_energy_score", lambda a, b, real: scored.append(
        (a.detach().clone(), b.detach().clone(), real.detach().clone(), a.requires_grad, b.requires_grad))
        or real_score(a, b, real))
    losses = _spy_backward(monkeypatch)
    folder = train_mod.train(cfg)
    done = _stage_done(Path(cfg.out), "realism")
    assert len(scored) == 2
    a, b, real, grad_a, grad_b = scored[-1]
    assert grad_a and grad_b and a.shape == real.shape == (2, 3, 64, 64)
    assert not torch.equal(a, b)  # two draws: the second from its own noise
    assert torch.equal(real.cpu(), photos[-1] * 2 - 1)  # against the photo crops
    assert done["energy"] > 0 and done["spread"] > 0
    assert losses[-1] == pytest.approx(done["mse"] + done["l1"] + 0.1 * done["g_adv"] + 0.5 * done["energy"],
                                       rel=1e-4)
    card = (folder / "README.md").read_text()
    assert "--realism-energy-weight 0.5" in card and "0.5·energy score of two decodes" in card
    assert "energy" not in TrainConfig().losses() and "energy" not in TrainConfig().command()
    with pytest.raises(ValueError, match="realism_energy_weight"):
        train_mod.train(TrainConfig(data=[str(data_dir)], out=str(tmp_path / "run2"), init=cfg.init,
                                    stages=["latents", "realism"], steps={"realism": 1},  # fails fast if not refused
                                    realism_energy_weight=-1.0))
    assert not (tmp_path / "run2").exists()


def test_realism_stage_can_train_the_fast_decoder_with_the_step(data_dir, tmp_path, monkeypatch):
    """`--realism-train-decoder`: the generator is the step and the fast decoder; the decoder's decode of the true
    latent adds L1 + MSE against the photos and is judged by the discriminator too (its generator term is added to
    the step's); the adaptive weight is taken at the decoder's last layer; without the option the decoder stays as
    it was; settings it cannot work with are refused by name, with nothing written."""
    from diffo.models.diffo.discriminator import PatchDiscriminator

    cfg = _photo_realism_cfg(data_dir, tmp_path)
    cfg.realism_train_decoder, cfg.realism_adv_adaptive, cfg.realism_mse_weight = True, True, 0.1
    cfg.realism_fm_weight = 2.0
    lasts, judged = [], []
    real_adaptive, real_forward = train_mod.adaptive_weight, PatchDiscriminator.forward
    monkeypatch.setattr(train_mod, "adaptive_weight", lambda rec, adv, last: lasts.append(tuple(last.shape))
                        or real_adaptive(rec, adv, last))
    monkeypatch.setattr(PatchDiscriminator, "forward", lambda self, img: judged.append(tuple(img.shape))
                        or real_forward(self, img))
    losses = _spy_backward(monkeypatch)
    folder = train_mod.train(cfg)
    done = _stage_done(Path(cfg.out), "realism")
    init = DiffoCodec.from_pretrained(tmp_path / "init")
    convs = [m for m in init.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert init.decoder.last_layer is convs[-1].weight
    assert lasts == [tuple(convs[-1].weight.shape)] * 2  # the decoder's last layer, not the step's output latent
    assert judged[-1] == (4, 3, 64, 64)  # the discriminator's update: the step's decode and the plain one
    assert done["anchor"] > 0 and done["g_plain"] > 0 and done["g_adv"] > done["g_plain"]
    assert losses[-1] == pytest.approx(0.1 * done["mse"] + done["l1"] + done["anchor"] + done["w"] * done["g_adv"]
                                       + 2.0 * done["fm"], rel=1e-4)
    trained = DiffoCodec.from_pretrained(folder)
    stored = lambda m: [v.half().float() for v in m.decoder.state_dict().values()]  # noqa: E731  (saved as fp16)
    assert any(not torch.equal(a, b) for a, b in zip(stored(init), stored(trained)))
    card = (folder / "README.md").read_text()
    assert "--realism-train-decoder" in card and "the fast decoder trained with the step" in card
    assert "gradient at the decoder's last layer" in card
    assert "--realism-train-decoder" not in TrainConfig().command() and "decoder trained" not in TrainConfig().losses()

    cfg.realism_train_decoder, cfg.out = False, str(tmp_path / "frozen")  # the option off: the decoder is not trained
    frozen = DiffoCodec.from_pretrained(train_mod.train(cfg))
    assert all(torch.equal(a, b) for a, b in zip(stored(init), stored(frozen)))

    no_decoder = DiffoCodec.from_preset("tiny")
    no_decoder.update()
    no_decoder.save_pretrained(tmp_path / "no_decoder")
    for bad in ({"realism_real": "decoded"}, {"realism_adv_schedule": "strength"},
                {"init": str(tmp_path / "no_decoder")}):
        with pytest.raises(ValueError, match="realism_train_decoder"):
            train_mod.train(TrainConfig(data=[str(data_dir)], out=str(tmp_path / "run2"), realism_train_decoder=True,
                                        stages=["latents", "realism"], steps={"realism": 1},  # fails fast if not refused
                                        **{"init": cfg.init, "realism_real": "photo", **bad}))
    assert not (tmp_path / "run2").exists()


def test_stages_are_checked(tmp_path):
    cfg = TrainConfig(data=[str(tmp_path)], stages=["decoder", "realism"], init=str(tmp_path))
    with pytest.raises(ValueError, match="latent cache"):
        Trainer._stage_list(cfg)
    with pytest.raises(ValueError, match="needs --init"):
        Trainer._stage_list(TrainConfig(stages=["latents", "codec"]))
    with pytest.raises(ValueError, match="inapplicable"):
        Trainer._stage_list(TrainConfig(config="sd", stages=["decoder"], init="x"))
    assert Trainer._stage_list(TrainConfig(stages=["latents", "realism"], init="x")) == ["latents", "realism", "final"]


def test_decoder_stage_can_train_against_a_patch_discriminator(data_dir, tmp_path, monkeypatch):
    """`--decoder-adv-weight`: the fast decoder's loss gains the discriminator's term at the adaptive weight; the
    discriminator sees the photos as real and trains, is checkpointed, and the card records the option."""
    from safetensors.torch import load_file

    from diffo.models.diffo.discriminator import PatchDiscriminator

    init = DiffoCodec.from_preset("tiny")
    init.update()
    init.save_pretrained(tmp_path / "init")
    cfg = _cfg(data_dir, tmp_path / "run")
    cfg.init, cfg.stages, cfg.decoder_adv_weight = str(tmp_path / "init"), ["decoder"], 0.5
    seen, first_state = [], {}
    real_forward = PatchDiscriminator.forward

    def spy(self, img):
        if not first_state:
            first_state.update({k: v.clone() for k, v in self.state_dict().items()})
        seen.append(img.detach().clone())
        return real_forward(self, img)

    monkeypatch.setattr(PatchDiscriminator, "forward", spy)
    losses = _spy_backward(monkeypatch)
    folder = train_mod.train(cfg)
    done = _stage_done(tmp_path / "run", "decoder")
    assert done["step"] == 2 and len(losses) == 2
    # the generator's loss is the reconstruction plus the weighted adversarial term (the last step's figures)
    mse = 4 / 10 ** (done["psnr"] / 10)
    assert done["w"] > 0 and losses[-1] == pytest.approx(done["l1"] + mse + done["w"] * done["g_adv"], rel=1e-4)
    # per step: the generator's fake, then the real crops (the photos: 8-bit values in [-1, 1]), then the same fake
    assert len(seen) == 6 and seen[1].shape == (2, 3, 64, 64) and torch.equal(seen[0], seen[2])
    levels = (seen[1] + 1) / 2 * 255
    assert torch.allclose(levels, levels.round(), atol=1e-3) and not torch.equal(seen[1], seen[0])
    saved = load_file(tmp_path / "run" / "checkpoint" / "decoder_disc.safetensors")  # resumable, and it trained
    assert any(not torch.equal(saved[k], v) for k, v in first_state.items())
    assert "--decoder-adv-weight 0.5" in (folder / "README.md").read_text()
    assert "0.5·adaptive weight·pixel patch discriminator" in cfg.losses()
    assert "patch discriminator" not in TrainConfig().losses().split("realism:")[0]  # off by default
    for bad in ({"decoder_adv_weight": -1.0}, {"decoder_adv_weight": 0.5, "mixed_precision": "fp16"}):
        with pytest.raises(ValueError, match="decoder_adv_weight"):
            Trainer(TrainConfig(data=[str(data_dir)], out=str(tmp_path / "run2"), **bad))


def test_decoder_stage_feature_matching_adds_the_discriminators_feature_distance(data_dir, tmp_path, monkeypatch):
    """`--decoder-fm-weight`: the fast decoder's loss gains W·(mean L1 between the patch discriminator's activations on
    the decoded and the real crops); it needs the discriminator, and the card records it."""
    from diffo.models.diffo.discriminator import PatchDiscriminator, feature_matching_loss

    disc, img = PatchDiscriminator().eval().requires_grad_(False), torch.rand(2, 3, 64, 64) * 2 - 1
    logits, feats = disc.forward_features(img)
    assert torch.equal(logits, disc(img)) and len(feats) == 4 and feats[0].shape == (2, 32, 32, 32)
    other = disc.forward_features(img.flip(-1) * 0.5)[1]
    assert feature_matching_loss(other, feats).item() == pytest.approx(
        sum((a - b).abs().mean() for a, b in zip(other, feats)).item() / 4, rel=1e-5)

    init = DiffoCodec.from_preset("tiny")
    init.update()
    init.save_pretrained(tmp_path / "init")
    cfg = _cfg(data_dir, tmp_path / "run")
    cfg.init, cfg.stages, cfg.decoder_adv_weight, cfg.decoder_fm_weight = str(tmp_path / "init"), ["decoder"], 0.5, 3.0
    folder, done, losses, _ = _train_spying_on_features(cfg, monkeypatch, "decoder")
    mse = 4 / 10 ** (done["psnr"] / 10)
    assert done["fm"] > 0 and losses[-1] == pytest.approx(
        done["l1"] + mse + done["w"] * done["g_adv"] + 3.0 * done["fm"], rel=1e-4)
    card = (folder / "README.md").read_text()
    assert "--decoder-fm-weight 3" in card
    assert "kept from the model this run started from" in card  # no noise stage
    card_losses = card.split("Losses of the stages this run trained: ")[1].splitlines()[0]  # the decoder's only
    assert card_losses.startswith("fast decoder: L1 + MSE")
    assert "latent codec" not in card_losses and "realism" not in card_losses
    assert "3·feature matching" in cfg.losses()
    assert "feature matching" not in TrainConfig(decoder_adv_weight=1).losses()
    for bad in ({"decoder_fm_weight": -1.0, "decoder_adv_weight": 1.0}, {"decoder_fm_weight": 1.0}):
        with pytest.raises(ValueError, match="decoder_fm_weight"):
            Trainer(TrainConfig(data=[str(data_dir)], out=str(tmp_path / "run2"), **bad))


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    w = torch.ones(3, requires_grad=True)
    rec = (w * torch.tensor([3.0, 0.0, 4.0])).sum()  # gradient norm 5
    adv = (w * torch.tensor([0.0, 0.5, 0.0])).sum()  # gradient norm 0.5
    assert train_mod.adaptive_weight(rec, adv, w).item() == pytest.approx(10.0, rel=1e-3)


def test_the_generators_pass_leaves_the_discriminator_without_gradients_and_its_flags_as_they_were():
    from diffo.models.diffo.discriminator import discriminator_loss, frozen, generator_loss

    disc = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 1, 1))
    disc[0].requires_grad_(False)  # a frozen backbone, as in the UNet-feature discriminator
    fake = torch.randn(2, 3, 8, 8, requires_grad=True)
    with frozen(disc):
        generator_loss([disc(fake), disc(fake)]).backward()
    assert fake.grad is not None and all(p.grad is None for p in disc.parameters())
    assert [p.requires_grad for p in disc.parameters()] == [False, False, True, True]
    real_logits, fake_logits = torch.full((1, 1, 2, 2), 3.0), torch.full((1, 1, 2, 2), -3.0)
    assert discriminator_loss(real_logits, fake_logits).item() == pytest.approx(2 * math.log1p(math.exp(-3.0)))


def test_a_wider_latent_is_warm_started_and_every_stage_trains_again(data_dir, tmp_path):
    """`--init M --latent-channels 8`: the widened model starts out computing what M did (the old channels'
    weights in place, the weights reading new channels at zero, the denoiser the identity on them), a partial
    stage list is refused, and the trained model codes and decodes 8-channel latents."""
    from diffo import pipeline
    from diffo.training.warm_start import widen_latent

    torch.manual_seed(0)
    init = DiffoCodec.from_preset("tiny")
    init.add_fast_decoder()
    for p in init.parameters():  # a "trained" model: no zero layers to hide a wrong copy
        p.data.add_(0.02 * torch.randn_like(p))
    init.set_latent_scale(0.5)  # a trained scale, which the widened model must keep
    init.update()
    init.save_pretrained(tmp_path / "init")
    init.eval()
    wide, widened = widen_latent(init, 8)
    wide.eval()
    assert wide.latent_channels == 8 and wide.vae.encoder.conv_out.out_channels == 16
    assert {"vae.encoder.conv_out.weight", "vae.quant_conv.weight", "vae.decoder.conv_in.weight",
            "denoiser.unet.conv_in.weight", "denoiser.unet.conv_out.weight", "decoder.net.0.weight",
            "latent_codec.residual.g_a.0.weight"} <= set(widened)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        z_old, z_wide = init.encode_latent(x), wide.encode_latent(x)
        assert torch.allclose(z_wide[:, :4], z_old, atol=1e-5)  # the old channels: the same latent
        post = wide.vae.encode(x * 2 - 1).latent_dist  # the new channels' posterior: nearly deterministic
        assert post.std[:, 4:].max() < 0.01 and post.mean[:, 4:].std() > 0.01
        assert torch.allclose(post.logvar[:, :4], init.vae.encode(x * 2 - 1).latent_dist.logvar, atol=1e-4)
        from diffo.training import entropy_models

        for m in (init, wide):  # the training forward pass (CompressAI's entropy models)
            entropy_models.trainable(m)
            m.latent_codec.eval()
        for rq in (0, 40000):  # the codec codes the old channels as before, base code and residual alike
            c_old = init.latent_codec(z_old, rq).c_hat
            c_new = wide.latent_codec(torch.cat([z_old, torch.randn_like(z_old)], 1), rq).c_hat
            assert torch.allclose(c_new[:, :4], c_old, atol=1e-4), rq
        z = torch.randn(1, 8, 8, 8)  # whatever the new channels hold, the decoders read only the old ones
        assert torch.allclose(wide.decode_latent(z), init.decode_latent(z[:, :4]), atol=1e-5)
        assert torch.allclose(wide.vae.decode(z).sample, init.vae.decode(z[:, :4]).sample, atol=1e-5)
        noise = torch.randn_like(z)
        old = init.denoise(init.control(z[:, :4], 0.5, noise[:, :4]))
        new = wide.denoise(wide.control(z, 0.5, noise))
        assert torch.allclose(new[:, :4], old, atol=1e-4) and torch.allclose(new[:, 4:], z[:, 4:], atol=1e-5)
    with pytest.raises(ValueError, match="more than the model's 4"):
        widen_latent(init, 4)

    cfg = _cfg(data_dir, tmp_path / "run")
    cfg.init, cfg.latent_channels, cfg.stages = str(tmp_path / "init"), 8, ["latents", "codec", "denoiser"]
    with pytest.raises(ValueError, match="new latent space.*vae, decoder, noise"):
        Trainer(cfg)
    cfg.stages = ["vae", "latents", "decoder", "codec", "denoiser", "noise"]
    folder = train_mod.train(cfg)
    model = DiffoCodec.from_pretrained(folder)
    assert model.latent_channels == 8 and model.decoder.net[0].in_channels == 8
    assert "--latent-channels 8" in (folder / "README.md").read_text()
    img = torch.rand(3, 64, 64)
    out = pipeline.decode(model, pipeline.encode(model, img, rate=1.0))
    assert out.shape == img.shape and torch.isfinite(out).all()
    cfg.latent_channels = None  # resuming that run as a 4-channel one is refused, naming the option
    with pytest.raises(ValueError, match="has 8 latent channels.*--latent-channels 8"):
        Trainer(cfg)
    with pytest.raises(ValueError, match="config tiny"):
        Trainer(TrainConfig(config="sd", data=[str(data_dir)], latent_channels=8, sd_path="x"))
    fresh = Trainer(TrainConfig(data=[str(data_dir)], out=str(tmp_path / "fresh"), latent_channels=8))
    assert fresh.model.latent_channels == 8 and fresh.model.denoiser.unet.config.in_channels == 8


@pytest.mark.parametrize("backbone", ["frozen", "trained"])
def test_the_denoisers_adversarial_weight_is_an_option_the_loss_and_the_card_carry(data_dir, tmp_path, monkeypatch,
                                                                                 backbone):
    """`--denoiser-adv-weight W`: the denoiser's loss is latent MSE + the HaarPSI term + W x the UNet-feature
    discriminator's generator loss; the card's command records W; a negative W is refused.
    `--denoiser-disc-backbone`: the discriminator's copy of the UNet stays as it was copied, or trains."""
    from diffo.models.diffo.discriminator import UNetFeatureDiscriminator

    made = []

    class RecordedDiscriminator(UNetFeatureDiscriminator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(train_mod, "UNetFeatureDiscriminator", RecordedDiscriminator)
    init = DiffoCodec.from_preset("tiny")
    init.update()
    init.save_pretrained(tmp_path / "init")
    cfg = _cfg(data_dir, tmp_path / "run")
    cfg.init, cfg.stages, cfg.adv_weight, cfg.adv_start = str(tmp_path / "init"), ["latents", "denoiser"], 0.3, 0.0
    cfg.disc_backbone = backbone
    losses = _spy_backward(monkeypatch)
    folder = train_mod.train(cfg)
    done = _stage_done(tmp_path / "run", "denoiser")
    assert done["g_adv"] > 0 and "d_loss" in done
    expected = done["mse"] + cfg.pixel_weight * (1 - done["hp"]) + 0.3 * done["g_adv"]
    assert losses[-1] == pytest.approx(expected, rel=1e-3)
    # copied from the model before its first update (adv_start 0); the denoiser's own UNet is never its backbone
    copied = torch.equal(made[0].backbone.conv_in.weight, init.denoiser.unet.conv_in.weight)
    assert len(made) == 1 and copied == (backbone == "frozen")
    card = (folder / "README.md").read_text()
    assert f"--denoiser-adv-weight 0.3 --denoiser-disc-backbone {backbone}" in card
    assert f"a {backbone} copy of the UNet" in card
    with pytest.raises(ValueError, match="adversarial weight must be >= 0"):
        Trainer(TrainConfig(data=[str(data_dir)], out=str(tmp_path / "run2"), adv_weight=-0.1))
    with pytest.raises(ValueError, match="disc_backbone must be 'frozen' or 'trained'"):
        Trainer(TrainConfig(data=[str(data_dir)], out=str(tmp_path / "run3"), disc_backbone="thawed"))


@pytest.mark.parametrize("train_backbone", [False, True])
def test_the_unet_feature_discriminator_learns_and_leaves_the_denoiser_alone(train_backbone):
    """The OSDiff discriminator: a copy of the UNet's encoder and middle block (frozen, or trained with the
    heads), one trainable head per level (four maps for the tiny UNet, so chance is 8 ln 2 for its loss). On
    noised latents that differ plainly (real: structured, fake: flat) it learns to beat chance, and the
    denoiser is left untouched."""
    from diffo.models.diffo.discriminator import UNetFeatureDiscriminator, discriminator_loss

    torch.manual_seed(0)
    den = DiffoCodec.from_preset("tiny").denoiser
    before = {k: v.clone() for k, v in den.state_dict().items()}
    disc = UNetFeatureDiscriminator(den, train_backbone=train_backbone)
    trainable = {n.split(".")[0] for n, p in disc.named_parameters() if p.requires_grad}
    assert trainable == ({"heads", "backbone"} if train_backbone else {"heads"})
    opt = torch.optim.AdamW([p for p in disc.parameters() if p.requires_grad], lr=2e-3, betas=(0.5, 0.999))
    losses = []
    for _ in range(40):
        z = torch.randn(4, 4, 16, 16) * 1.5
        td = torch.randint(0, den.num_train_timesteps // 10, (4,))
        noise = torch.randn_like(z)
        real, fake = den.add_noise(z, td, noise), den.add_noise(torch.zeros_like(z), td, noise)
        loss = discriminator_loss(disc(real, td), disc(fake, td))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    chance = 8 * math.log(2)
    assert losses[0] == pytest.approx(chance, abs=0.5)
    assert sum(losses[-10:]) / 10 < chance - 1.0
    assert all(torch.equal(before[k], v) for k, v in den.state_dict().items())
