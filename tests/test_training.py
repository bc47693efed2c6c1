"""The training engine: MoVQ + diffusion recipes end to end, resume, and 2-process DDP on CPU (gloo)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kandinsky3 import Kandinsky3
from kandinsky3.training import TrainConfig, train

MOVQ = {
    "ch": 32,
    "ch_mult": [1, 2, 2, 4],
    "num_res_blocks": 1,
    "attn_resolutions": [8],
    "resolution": 64,
    "tile_sample_min_size": 64,
}
UNET = {
    "model_channels": 32,
    "init_channels": 16,
    "time_embed_dim": 64,
    "context_dim": 32,
    "groups": 8,
    "head_dim": 16,
    "dim_mult": [1, 2, 4],
    "num_blocks": [2, 2, 2],
    "add_cross_attention": [False, True, True],
    "add_self_attention": [False, True, True],
}
T5 = {"tokenizer": "world", "d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 1}


@pytest.fixture(scope="module")
def movq_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("movq")
    cfg = TrainConfig.from_dict(
        {
            "recipe": "movq",
            "output_dir": str(out),
            "model": {"movq": MOVQ},
            "data": {"length": 48},
            "steps": 6,
            "batch_size": 8,
            "lr": 1e-3,
            "warmup_steps": 1,
            "checkpoint_every": 3,
            "sample_every": 6,
        }
    )
    summary = train(cfg, progress=False)
    assert (out / "samples" / "step_000006.png").is_file()
    return Path(summary["export_dir"])


def _diffusion_cfg(out, movq_export, **extra):
    return {
        "recipe": "diffusion",
        "output_dir": str(out),
        "export_dir": str(out / "model"),
        "model": {"name": "nano-test", "movq": str(movq_export), "unet": UNET, "text_encoder": T5},
        "data": {"length": 48},
        "steps": 4,
        "batch_size": 8,
        "warmup_steps": 1,
        "checkpoint_every": 2,
        "sample_every": 100,
        **extra,
    }


def test_diffusion_training_exports_a_loadable_model(movq_export, tmp_path):
    cfg = _diffusion_cfg(tmp_path, movq_export, gradient_checkpointing=True)
    cfg["model"]["export_dtype"] = "fp16"
    summary = train(TrainConfig.from_dict(cfg), progress=False)
    assert summary["step"] == 4 and summary["loss"] > 0
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(tmp_path / "model" / "unet.safetensors").values()} == {torch.float16}
    pipe = Kandinsky3.from_pretrained(tmp_path / "model", device="cpu")
    assert next(pipe.unet.parameters()).dtype == torch.float32
    image = pipe.generate("a red circle", seed=0, steps=3, progress=False)[0]
    assert image.size == (64, 64) and pipe.variant.name == "nano-test"


def test_resume_continues_from_the_checkpoint(movq_export, tmp_path):
    cfg = TrainConfig.from_dict(_diffusion_cfg(tmp_path, movq_export))
    first = train(cfg, max_steps=2, progress=False)
    assert first["step"] == 2 and "export_dir" not in first
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert json.loads((tmp_path / "checkpoints" / "step-00000002" / "checkpoint.json").read_text())["step"] == 2
    second = train(cfg, progress=False)
    assert second["step"] == 4 and Path(second["export_dir"]).is_dir()
    # the encoded latents were kept for the resume, and they are the MoVQ's encoding of the dataset
    from safetensors.torch import load_file

    from kandinsky3.training.data import make_dataset
    from kandinsky3.training.recipes.movq import load_movq_export

    (cache,) = tmp_path.glob("latents-*.safetensors")
    images = make_dataset(cfg.data).tensors["image"]
    expected = load_movq_export(movq_export).encode_untiled(images)
    assert torch.allclose(load_file(cache)["latents"], expected, atol=1e-5)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown key 'stepz'; did you mean 'steps'"):
        TrainConfig.from_dict({"recipe": "movq", "stepz": 3})
    with pytest.raises(ValueError, match="unknown recipe 'gan'; did you mean 'toy_gan'"):
        TrainConfig.from_dict({"recipe": "gan"})


def test_two_processes_agree(movq_export, tmp_path):
    """DDP over gloo on 2 CPU processes: both ranks end with identical parameters after different data."""
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(_diffusion_cfg(tmp_path / "run", movq_export, steps=3)))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29561",
            "-m",
            "kandinsky3.cli",
            "train",
            "diffusion",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(s["rank"] for s in summaries) == [0, 1]
    assert all(s["world_size"] == 2 and s["step"] == 3 for s in summaries)
    assert summaries[0]["params_checksum"] == summaries[1]["params_checksum"]


def test_ema_forgets_the_initial_weights():
    """With the warm-up decay the average follows training; a constant 0.999 would still hold 82 % of step 0."""
    import torch
    from torch.optim.swa_utils import AveragedModel

    from kandinsky3.training.loop import ema_update

    model = torch.nn.Linear(2, 2)
    ema = AveragedModel(model, multi_avg_fn=ema_update(0.999), use_buffers=True)
    for step in range(200):
        with torch.no_grad():
            model.weight.fill_(float(step))
        ema.update_parameters(model)
    assert 150 < ema.module.weight[0, 0].item() < 199


def test_latent_rescale_is_an_exact_reparametrisation():
    import torch

    from kandinsky3.models import MoVQ, MoVQConfig
    from kandinsky3.training.recipes.movq import rescale_latents

    movq = MoVQ(MoVQConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=16)).eval()
    for p in movq.parameters():
        p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z, recon = movq.encode(x), movq(x)
        rescale_latents(movq, 2.5)
        assert torch.allclose(movq.encode(x), z / 2.5, atol=1e-6)
        assert torch.allclose(movq(x), recon, atol=1e-5)


def test_decoder_fine_tune_keeps_the_latent_space(movq_export, tmp_path):
    """train_encoder: false changes the decoder only, so latents (and a U-Net trained on them) stay valid."""
    import torch

    from kandinsky3.training.recipes.movq import load_movq_export

    cfg = TrainConfig.from_dict(
        {
            "recipe": "movq",
            "output_dir": str(tmp_path),
            "data": {"length": 16},
            "model": {"init": str(movq_export), "train_encoder": False, "edge_weight": 10.0, "latent_noise": 0.1},
            "steps": 3,
            "batch_size": 8,
            "lr": 1e-2,
            "warmup_steps": 1,
            "ema_decay": None,
            "checkpoint_every": 3,
            "sample_every": 100,
        }
    )
    before, after = load_movq_export(movq_export), load_movq_export(train(cfg, progress=False)["export_dir"])
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(before.encode(x), after.encode(x))
    changed = [k for k, v in before.decoder.state_dict().items() if not torch.equal(v, after.decoder.state_dict()[k])]
    assert changed


def test_edge_map_marks_pixels_near_colour_changes():
    import torch

    from kandinsky3.training.recipes.movq import edge_map

    x = -torch.ones(1, 3, 16, 16)
    x[:, 0, 6:10, 6:10] = 1.0  # a red 4×4 square
    m = edge_map(x, radius=1)[0, 0]
    assert m[0, 0] == 0 and m[15, 15] == 0 and m[8, 3] == 0  # far from the square
    assert m[5, 7] == 1 and m[8, 10] == 1 and m[6, 6] == 1  # on or next to its border


def test_min_snr_weight():
    import torch

    from kandinsky3.diffusion import NoiseSchedule
    from kandinsky3.training.recipes.diffusion import min_snr_weight

    abar = NoiseSchedule.named("cosine").alphas_cumprod
    w = min_snr_weight(abar, 5.0)
    snr = abar / (1 - abar)
    assert torch.isfinite(w).all() and (w <= 1).all() and (w > 0).all()
    assert torch.allclose(w[snr > 5], 5 / snr[snr > 5]) and (w[snr <= 5] == 1).all()
    assert w[0] < 0.01 and w[999] == 1  # nearly clean steps count little, noisy ones fully


def test_known_region_weight():
    import torch

    from kandinsky3.diffusion import NoiseSchedule
    from kandinsky3.training.recipes.diffusion import known_region_weight

    abar = NoiseSchedule.named("cosine").alphas_cumprod[[0, 500, 900, 999]]
    keep = torch.zeros(4, 1, 2, 2)
    keep[:, :, 0] = 1  # top row known, bottom row the hole
    w = known_region_weight(keep, abar, 20.0)
    assert w.shape == (4, 1, 2, 2) and (w[:, :, 1] == 1).all()  # the hole always counts once
    boost = w[:, 0, 0, 0]
    snr = abar / (1 - abar)
    assert boost[0] == 1 and boost[-1] == 20  # nearly clean: 1; pure noise: γ
    assert torch.allclose(boost, (1 / snr).clamp(1, 20))


def test_hole_share_weight():
    """A small hole is raised to exactly its share of the sample's total weight; a hole that already has more, and
    a sample with nothing known, keep their weights; the known region is never touched."""
    import torch

    from kandinsky3.training.recipes.diffusion import hole_share_weight

    keep = torch.ones(3, 1, 8, 8)
    keep[0, :, 3:5, 3:5] = 0  # 4 of 64 cells: a small object's box
    keep[1, :, :, :5] = 0  # 40 of 64: a large random mask
    keep[2] = 0  # the whole image
    weight = 1 + keep * torch.tensor([20.0, 3.0, 7.0]).view(3, 1, 1, 1)  # a known-region boost per sample
    w = hole_share_weight(keep, weight, 0.25)
    hole_total = (w * (1 - keep)).sum(dim=(1, 2, 3))
    total = w.sum(dim=(1, 2, 3))
    assert torch.isclose(hole_total[0] / total[0], torch.tensor(0.25))  # was 4 / (4 + 60·21) < 0.4 %
    assert torch.equal(w[1:], weight[1:])  # the large hole has > 25 % already; nothing known: unchanged
    assert torch.equal(w[keep == 1], weight[keep == 1])


def test_known_region_drift():
    """The drift offsets only the known region of the chosen samples, is clipped in ε units, vanishes where the noise
    drowns the picture, and keeps the x0 target: x0 from (x_t + √(1−ᾱ)·o, ε + o) is still the true latent."""
    import torch

    from kandinsky3.diffusion import NoiseSchedule
    from kandinsky3.training.recipes.diffusion import DRIFT_CLIP, known_region_drift

    schedule = NoiseSchedule.named("cosine")
    t = torch.tensor([0, 100, 500, 999] * 4)
    abar = schedule.alphas_cumprod[t]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(16, 4, 8, 8, generator=g)
    keep = torch.ones(16, 1, 8, 8)
    keep[:, :, 2:6, 2:6] = 0  # the hole
    none = known_region_drift(latents, keep, abar, 0.0, torch.Generator().manual_seed(1))
    assert not none.any()
    o = known_region_drift(latents, keep, abar, 1.0, torch.Generator().manual_seed(1))
    assert o.shape == latents.shape and not o[:, :, 2:6, 2:6].any()  # the hole is never drifted
    assert o.abs().max() <= DRIFT_CLIP and (o[t == 0].abs() == DRIFT_CLIP).any()  # nearly clean: clipped
    assert o[t == 999].abs().max() < 1e-2 and o[t == 500].abs().mean() > 1e-2
    some = known_region_drift(latents, keep, abar, 0.5, torch.Generator().manual_seed(1))
    drifted = some.flatten(1).any(1)
    assert 0 < drifted.sum() < 16
    noise = torch.randn(latents.shape, generator=g)
    x_t = schedule.q_sample(latents, t, noise) + (1 - abar).sqrt().view(-1, 1, 1, 1) * o
    x0 = (x_t - (1 - abar).sqrt().view(-1, 1, 1, 1) * (noise + o)) / abar.sqrt().view(-1, 1, 1, 1)
    sure = t < 999  # at ᾱ ≈ 0 dividing by √ᾱ magnifies float rounding
    assert torch.allclose(x0[sure], latents[sure], atol=1e-4)


def test_config_extends_another(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "recipe: diffusion\nsteps: 10\nmodel: {name: a, unet: {groups: 8}}\ndata: {length: 5}\n"
    )
    (tmp_path / "stage2.yaml").write_text("extends: base.yaml\nsteps: 20\nmodel: {min_snr_gamma: 5}\n")
    (tmp_path / "base.yaml").write_text(
        "recipe: diffusion\nsteps: 10\nmodel: {name: a, movq: m, unet: {groups: 8}}\ndata: {length: 5}\n"
    )
    cfg = TrainConfig.from_yaml(tmp_path / "stage2.yaml")
    assert cfg.steps == 20 and cfg.data.length == 5
    assert (cfg.model.name, cfg.model.unet.groups, cfg.model.min_snr_gamma) == ("a", 8, 5.0)
    assert isinstance(cfg.model.min_snr_gamma, float)
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\nrecipe: movq\n")
    with pytest.raises(ValueError, match="extends itself"):
        TrainConfig.from_yaml(tmp_path / "loop.yaml")


def test_diffusion_init_from_another_runs_weights(movq_export, tmp_path):
    from safetensors.torch import load_file

    from kandinsky3.training.recipes import make_recipe

    train(TrainConfig.from_dict(_diffusion_cfg(tmp_path / "a", movq_export, steps=2)), progress=False)
    weights = tmp_path / "a" / "checkpoints" / "step-00000002" / "model.safetensors"
    for init in (weights, tmp_path / "a"):  # the file, or the run folder (its newest complete checkpoint)
        cfg = _diffusion_cfg(tmp_path / "b", movq_export)
        cfg["model"]["init"] = str(init)
        recipe = make_recipe(TrainConfig.from_dict(cfg), "cpu")
        state = recipe.trainable.state_dict()
        assert all(torch.equal(state[k], v) for k, v in load_file(weights).items())
    cfg["model"]["init"] = str(movq_export / "movq.safetensors")  # the wrong kind of weights
    with pytest.raises(Exception, match="missing"):
        make_recipe(TrainConfig.from_dict(cfg), "cpu")


def test_diffusion_init_from_an_exported_model(movq_export, tmp_path):
    from kandinsky3.training.recipes import make_recipe

    train(TrainConfig.from_dict(_diffusion_cfg(tmp_path / "a", movq_export, steps=2)), progress=False)
    exported = Kandinsky3.from_pretrained(tmp_path / "a" / "model", device="cpu")
    cfg = _diffusion_cfg(tmp_path / "b", movq_export)
    cfg["model"]["init"] = str(tmp_path / "a" / "model")
    trainable = make_recipe(TrainConfig.from_dict(cfg), "cpu").trainable
    assert all(torch.equal(v, trainable.unet.state_dict()[k]) for k, v in exported.unet.state_dict().items())
    assert torch.equal(trainable.null_embedding.detach(), exported.text_encoder.null_embedding)
    ids = torch.tensor([[5, 6, 1]])
    assert torch.allclose(
        trainable.text.encoder(ids).last_hidden_state, exported.text_encoder.encoder(ids).last_hidden_state, atol=1e-5
    )


def test_grown_model_starts_as_its_source(movq_export, tmp_path):
    """Cross-attention added at the first level and a second T5 layer: the grown model predicts exactly what the
    source did at step 0; a config change that is not an added block is refused."""
    from kandinsky3.checkpoints.io import CheckpointError
    from kandinsky3.training.recipes import make_recipe

    train(TrainConfig.from_dict(_diffusion_cfg(tmp_path / "a", movq_export, steps=2)), progress=False)
    cfg = _diffusion_cfg(tmp_path / "s", movq_export)
    cfg["model"]["init"] = str(tmp_path / "a" / "model")
    source = make_recipe(TrainConfig.from_dict(cfg), "cpu").trainable
    cfg = _diffusion_cfg(tmp_path / "b", movq_export)
    cfg["model"].update(
        init=str(tmp_path / "a" / "model"),
        grow=True,
        unet={**UNET, "add_cross_attention": [True, True, True]},
        text_encoder={**T5, "num_layers": 2},
    )
    grown = make_recipe(TrainConfig.from_dict(cfg), "cpu").trainable
    new = set(grown.state_dict()) - set(source.state_dict())
    assert any(k.startswith("unet.down_samples.0.") for k in new) and any(".block.1." in k for k in new)
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0])
    ids, mask = torch.tensor([[5, 6, 7, 1], [8, 1, 0, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    outputs = []
    for model in (source, grown):
        context, _ = model.text.encode_ids(ids, mask)
        outputs.append((context, model.unet(x, t, context, mask)))
    assert torch.allclose(outputs[0][0], outputs[1][0], atol=1e-6)
    assert torch.allclose(outputs[0][1], outputs[1][1], atol=1e-5)
    assert outputs[1][1].abs().mean() > 0.01
    # the new blocks learn: their zeroed output layers get gradients
    grown.train()
    batch = {"ids": ids, "mask": mask, "latents": x, "drop": torch.tensor([False, False])}
    grown(batch, torch.Generator().manual_seed(0)).backward()
    assert grown.unet.down_samples[0].resnet_attn_blocks[0][1].attention.output_layer.weight.grad.abs().sum() > 0

    from kandinsky3.training.growth import grow_into

    weights = source.state_dict()
    with pytest.raises(CheckpointError, match="only add blocks"):  # growing never drops blocks
        grow_into(source, grown.state_dict(), "grown weights")
    del weights["unet.in_layer.weight"]  # a missing weight outside an added block cannot start from zero
    with pytest.raises(CheckpointError, match="not in a new attention block"):
        grow_into(grown, weights, "source weights")


SR_UNET = {
    "init_channels": 8,
    "model_channels": 8,
    "time_embed_dim": 32,
    "groups": 4,
    "dim_mult": [1, 2],
    "num_resnet_blocks": [1, 1],
    "dropout": 0.0,
}


def _superres_cfg(out, **model):
    return {
        "recipe": "superres",
        "output_dir": str(out),
        "export_dir": str(out / "model"),
        "model": {"name": "sr-test", "scale": 4, "crop": 32, "unet": SR_UNET, **model},
        "data": {"source": "world", "size": 16, "length": 8},
        "steps": 3,
        "batch_size": 4,
        "warmup_steps": 1,
        "checkpoint_every": 3,
        "sample_every": 3,
    }


@pytest.mark.parametrize("degrade", [False, True])
def test_superres_training_exports_a_loadable_upscaler(tmp_path, degrade):
    from PIL import Image

    from kandinsky3 import SuperRes
    from kandinsky3.training.recipes import make_recipe

    summary = train(TrainConfig.from_dict(_superres_cfg(tmp_path, degrade=degrade)), progress=False)
    assert summary["step"] == 3 and summary["loss"] > 0
    assert (tmp_path / "samples" / "step_000003.png").is_file()
    sr = SuperRes.from_pretrained(tmp_path / "model", device="cpu")
    assert sr.upscale(Image.new("RGB", (12, 8), (200, 40, 40)), steps=2, progress=False).size == (48, 32)
    # a stage 2 that starts from the export starts from exactly its weights
    trainable = make_recipe(
        TrainConfig.from_dict(_superres_cfg(tmp_path / "b", init=str(tmp_path / "model"))), "cpu"
    ).trainable
    assert all(torch.equal(v, trainable.unet.state_dict()[k]) for k, v in sr.unet.state_dict().items())


def test_degradation_is_seeded_and_shrinks_by_the_scale():
    import torch.nn.functional as F

    from kandinsky3.training.degradations import degrade, gaussian_kernel

    hr = torch.rand(2, 3, 64, 48) * 2 - 1
    low = degrade(hr, 4, seed=3)
    assert low.shape == (2, 3, 16, 12) and low.min() >= -1 and low.max() <= 1
    assert torch.equal(low, degrade(hr, 4, seed=3)) and not torch.equal(low, degrade(hr, 4, seed=4))
    clean = F.interpolate(hr, size=(16, 12), mode="area")
    assert (low - clean).abs().mean() > 0.01  # blur, noise and JPEG did something
    k = gaussian_kernel(3.0, 1.0, 0.0)  # wide along x, narrow along y
    ax = torch.arange(21.0) - 10
    assert torch.isclose(k.sum(), torch.tensor(1.0))
    assert (k.sum(0) * ax**2).sum() > 4 * (k.sum(1) * ax**2).sum()


def test_time_budget_fits_the_steps_to_the_measured_speed(monkeypatch):
    from kandinsky3.training import loop

    clock = [0.0]
    monkeypatch.setattr(loop.time, "monotonic", lambda: clock[0])
    budget = loop.TimeBudget(minutes=1, skip=2, first=10, every=5, reserve=0.0)  # 60 s, 5 s kept for the export
    verdicts = {}
    for done in range(1, 40):
        clock[0] += 0.1  # 10 steps a second
        verdicts[done] = budget.fit(done, 1000 + done, planned=5000)
    assert [d for d, v in verdicts.items() if v is not None] == [12, 17, 22, 27, 32, 37]
    # at step 12 of this invocation 1.2 s have passed: 60 - 1.2 - 5 s left at 10 steps/s
    assert verdicts[12] == 1012 + int(10 * (60 - 1.2 - 5))
    assert budget.fit(42, 1042, planned=1100) == 1100  # never longer than planned


def test_a_run_over_its_time_budget_ends_early_and_still_exports(movq_export, tmp_path):
    cfg = TrainConfig.from_dict(_diffusion_cfg(tmp_path, movq_export, steps=500, time_budget_minutes=1e-4))
    summary = train(cfg, progress=False)
    assert summary["step"] == 60 and summary["steps"] == 60  # the first measurement (step 10 + 50) finds no time
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 60
    assert cfg.steps == 500  # the loop plans with its own copy: the caller's config is not changed
    assert Kandinsky3.from_pretrained(summary["export_dir"], device="cpu").variant.name == "nano-test"


def test_rendering_in_worker_processes_gives_the_same_dataset():
    from kandinsky3.training.config import DataConfig
    from kandinsky3.training.data import make_dataset

    serial = make_dataset(DataConfig(length=40))
    parallel = make_dataset(DataConfig(length=40, num_workers=2))
    assert parallel.captions == serial.captions and len(set(serial.captions)) > 30
    assert torch.equal(parallel.tensors["image"], serial.tensors["image"])


def test_world_data_object_counts_and_complete_captions():
    """``data.object_counts`` cycles the scenes' object counts, ``data.complete_captions`` states every attribute;
    the pictures are the world's own samples for those arguments (so a cache keyed by the images stays exact)."""
    from kandinsky3.training.config import DataConfig
    from kandinsky3.training.data import make_dataset
    from kandinsky3.world import parse_caption, world_sample
    from kandinsky3.world.dataset import to_tensor

    data = make_dataset(DataConfig(length=10, object_counts=(1, 3, 2), complete_captions=True))
    for i, caption in enumerate(data.captions):
        expected = world_sample(i, "train", 64, num_objects=(1, 3, 2)[i % 3], complete_caption=True)
        assert caption == expected.caption
        assert torch.equal(data.tensors["image"][i], to_tensor(expected.image))
        stated = parse_caption(caption)
        assert len(stated.objects) == (1, 3, 2)[i % 3]
        assert stated.background == expected.scene.background
        assert sorted((o.color, o.shape, o.size, o.position) for o in stated.objects) == sorted(
            (o.color, o.shape, o.size, o.position) for o in expected.scene.objects
        )
    default = make_dataset(DataConfig(length=40))  # the world's own draw and varied captions
    assert {len(parse_caption(c).objects) for c in default.captions} == {1, 2, 3}
    assert any(o.color is None or o.size is None for c in default.captions for o in parse_caption(c).objects)


def test_world_data_twins_share():
    """``data.twins_share`` makes that share of the multi-object scenes hold twins (first two objects of one shape
    and size) and leaves every other scene — and every scene at share 0 — exactly the world's own draw; twins keep
    the world's rules (distinct colours and cells, no held-out colour + shape pair in train)."""
    from kandinsky3.training.config import DataConfig
    from kandinsky3.training.data import make_dataset
    from kandinsky3.world import world_sample
    from kandinsky3.world.dataset import ShapesDataset, to_tensor
    from kandinsky3.world.scene import HELD_OUT_PAIRS

    counts = (2, 3)
    plain = ShapesDataset(200, object_counts=counts)
    half = ShapesDataset(200, object_counts=counts, twins_share=0.5)
    made, kept = 0, 0
    for i in range(200):
        own = world_sample(i, "train", 64, num_objects=counts[i % 2])
        twinned = world_sample(i, "train", 64, num_objects=counts[i % 2], twins=True)
        a, b = twinned.scene.objects[:2]
        assert (a.shape, a.size) == (b.shape, b.size)
        assert (
            len({o.color for o in twinned.scene.objects})
            == len({o.position for o in twinned.scene.objects})
            == counts[i % 2]
        )
        assert not any((o.color, o.shape) in HELD_OUT_PAIRS for o in twinned.scene.objects)
        assert plain[i]["caption"] == own.caption
        if half[i]["caption"] == twinned.caption and torch.equal(half[i]["image"], to_tensor(twinned.image)):
            made += 1
        elif half[i]["caption"] == own.caption and torch.equal(half[i]["image"], to_tensor(own.image)):
            kept += 1
    assert made + kept == 200 and 70 <= made <= 130  # 0.5 of 200, within ≈ 4 sd
    everyone = make_dataset(DataConfig(length=6, object_counts=(1, 2), twins_share=1.0))
    for i, caption in enumerate(everyone.captions):
        assert caption == world_sample(i, "train", 64, num_objects=(1, 2)[i % 2], twins=True).caption
    # one object: nothing to twin, the scene is the world's own
    assert world_sample(0, "train", 64, num_objects=1, twins=True).scene == world_sample(0, "train", 64, 1).scene


@pytest.mark.parametrize(
    "recipe, data, message",
    [
        ("movq", {"twins_share": 1.5}, "data.twins_share must be a share from 0 to 1"),
        ("movq", {"source": "folder", "path": "x", "twins_share": 0.5}, "options of data.source=world"),
        ("clip", {"twins_share": 0.5}, "the clip recipe builds its own world samples"),
        ("movq", {"object_counts": [0, 2]}, "data.object_counts must list object counts from 1 to 3"),
        ("movq", {"object_counts": [4]}, "data.object_counts must list object counts from 1 to 3"),
        ("movq", {"object_counts": []}, "data.object_counts must list object counts"),
        ("movq", {"source": "folder", "path": "x", "complete_captions": True}, "options of data.source=world"),
        ("movq", {"source": "folder", "path": "x", "object_counts": [2]}, "options of data.source=world"),
        ("clip", {"complete_captions": True}, "the clip recipe builds its own world samples"),
        ("toy_gan", {"object_counts": [2]}, "the toy_gan recipe builds its own world samples"),
    ],
)
def test_bad_world_data_options_are_clear_errors(recipe, data, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({"recipe": recipe, "data": data})
