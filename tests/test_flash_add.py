"""Flash by ADD (issue #16): the latent discriminator at full size, one D step + one G step of the recipe on the tiny
preset (gradients where they belong), the penalties, and a short run through the training loop with resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kandinsky3.models.discriminator import LatentDiscriminator, parameter_counts
from kandinsky3.models.unet import UNet, UNetConfig
from kandinsky3.training import TrainConfig, train
from kandinsky3.training.protocol import RandomStreams, StepContext
from kandinsky3.training.recipes import RECIPES, make_recipe
from kandinsky3.training.recipes.flash_add import gradient_penalty, r1_penalty


def _head_params(channels: int, width: int, context_dim: int | None) -> int:
    """One head written out: conv3×3 (+bias), GroupNorm (weight, bias), Q/K/V/out without biases, 1×1 to a logit."""
    conv, norm, logits = channels * width * 9 + width, 2 * width, width + 1
    attention = 0 if context_dim is None else width * width * 2 + context_dim * width * 2
    return conv + norm + attention + logits


@pytest.mark.parametrize("text_attention", [True, False])
def test_full_size_discriminator_counts_on_meta(text_attention):
    with torch.device("meta"):
        teacher = UNet(UNetConfig())
        d = LatentDiscriminator(teacher, head_width=256, text_attention=text_attention)
    counts = parameter_counts(d)
    down_half = sum(
        v.numel()
        for k, v in teacher.state_dict().items()
        if k.startswith(("to_time_embed.", "feature_pooling.", "in_layer.", "down_samples."))
    )
    heads = sum(_head_params(384 * m, 256, 4096 if text_attention else None) for m in (1, 2, 4, 8))
    print(f"full-size discriminator: frozen half {counts['frozen']:,}, heads {counts['heads']:,}")
    assert counts == {"frozen": down_half, "heads": heads}
    assert not any(p.requires_grad for p in d.backbone.parameters())
    assert all(p.requires_grad for p in d.heads.parameters())
    assert d.backbone.state_dict().keys() == {
        k
        for k in teacher.state_dict()
        if k.startswith(("to_time_embed.", "feature_pooling.", "in_layer.", "down_samples."))
    }


def _tiny_flash_config(out, sample_every=1000, **model) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "recipe": "flash",
            "output_dir": str(out),
            "model": {"teacher": "tiny", "head_width": 32, "probe_captions": 4, **model},
            "data": {"length": 8, "size": 64},
            "steps": 4,
            "batch_size": 2,
            "warmup_steps": 1,
            "checkpoint_every": 2,
            "sample_every": sample_every,
            "log_every": 1,
            "seed": 0,
            "ema_decay": 0.9,
        }
    )


@pytest.mark.parametrize("loss", ["wasserstein", "hinge"])
def test_one_d_step_and_one_g_step_send_gradients_where_they_belong(tmp_path, loss):
    cfg = _tiny_flash_config(tmp_path, loss=loss, distillation_weight=0.5)
    rng = RandomStreams(0, "cpu")
    recipe = make_recipe(cfg, "cpu", rng)
    assert RECIPES["flash"] is type(recipe)
    student, d = recipe.modules["student"], recipe.modules["discriminator"]
    items = [recipe.dataset[i] for i in range(2)]
    batch = recipe.prepare(recipe.collate(items), StepContext(1, rng))
    steps = recipe.step(recipe.modules, batch, StepContext(1, rng))

    name, d_loss = next(steps)
    assert name == "discriminator" and torch.isfinite(d_loss)
    heads = recipe.parameter_groups()["heads"]
    grads = torch.autograd.grad(d_loss, heads + list(student.parameters()), allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in grads[: len(heads)])  # every head learns
    assert all(g is None for g in grads[len(heads) :])  # the student's sample is detached in the critic's loss
    assert all(p.grad is None and not p.requires_grad for p in d.backbone.parameters())  # the frozen half

    name, g_loss = next(steps)
    assert name == "generator" and torch.isfinite(g_loss)
    g_grads = torch.autograd.grad(g_loss, list(student.parameters()), allow_unused=True)
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in g_grads) > len(g_grads) // 2


def test_penalties_are_finite_and_differentiable():
    torch.manual_seed(0)
    critic_net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    critic = lambda x: critic_net(x).squeeze(1)  # noqa: E731
    real, fake = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    gp = gradient_penalty(critic, real, fake, torch.Generator().manual_seed(1))
    r1 = r1_penalty(critic, real)
    assert torch.isfinite(gp) and torch.isfinite(r1) and gp > 0 and r1 > 0
    for penalty in (gp, r1):
        grads = torch.autograd.grad(penalty, list(critic_net.parameters()), retain_graph=True, allow_unused=True)
        grads = [g for g in grads if g is not None]  # the last bias does not move ∇x
        assert len(grads) == 3 and all(torch.isfinite(g).all() for g in grads) and all(g.abs().sum() > 0 for g in grads)
    # a linear critic of slope exactly 1 per sample has zero gradient penalty (‖∇‖ = 1 everywhere)
    unit = torch.zeros(12)
    unit[0] = 1.0
    assert gradient_penalty(lambda x: x.flatten(1) @ unit, real, fake, torch.Generator()).item() == pytest.approx(0)


def test_short_run_checkpoints_resumes_and_exports_a_flash_model(tmp_path):
    from kandinsky3 import Kandinsky3

    whole = train(_tiny_flash_config(tmp_path / "whole"), progress=False)
    train(_tiny_flash_config(tmp_path / "split"), max_steps=2, progress=False)
    resumed = train(_tiny_flash_config(tmp_path / "split"), progress=False)
    assert whole["step"] == resumed["step"] == 4
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "export" / "unet.safetensors")
    b = load_file(tmp_path / "split" / "export" / "unet.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resume is exact
    # the log carries the penalty and the critic's lead per step, and the probe's alignment at the end (the curves)
    log = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "metrics" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert all(set(e["metrics"]) == {"critic_gap", "gradient_penalty"} for e in steps)
    assert all(math.isfinite(v) and e["metrics"]["gradient_penalty"] >= 0 for e in steps for v in e["metrics"].values())
    (probe,) = [e for e in log if "probe" in e]
    assert probe["step"] == 4 and set(probe["probe"]) == {f"alignment_{n}obj_{s}steps" for n in (1, 2) for s in (4, 2)}
    assert all(0 <= v <= 1 for v in probe["probe"].values())
    split_log = (tmp_path / "split" / "log.jsonl").read_text()
    assert split_log == (tmp_path / "whole" / "log.jsonl").read_text()  # a resumed run logs what an unbroken one does
    # sample grids and probes at every step (docs/flash.md's curves) leave the training itself unchanged
    train(_tiny_flash_config(tmp_path / "probed", sample_every=1), progress=False)
    c = load_file(tmp_path / "probed" / "export" / "unet.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)
    probed = [json.loads(line) for line in (tmp_path / "probed" / "log.jsonl").read_text().splitlines()]
    assert [e for e in probed if "probe" not in e] == [e for e in log if "probe" not in e]
    assert [e["step"] for e in probed if "probe" in e] == [1, 2, 3, 4]
    pipe = Kandinsky3.from_pretrained(str(tmp_path / "whole" / "export"), device="cpu")
    assert pipe.variant.sampler.kind == "flash" and pipe.variant.sampler.guidance == 0
    image = pipe.generate("a red circle", seed=0, progress=False)[0]
    assert image.size == (64, 64)


def test_flash_eval_rows_share_captions_and_use_each_rows_sampler(tiny):
    from kandinsky3.eval.flash import flash_rows, flash_table

    rows = flash_rows(tiny, tiny, num=2, steps=2, progress=False)
    settings = [(r.sampler, r.guidance, r.steps) for r in rows.values()]
    assert settings == [("k3", 3.0, 50), ("flash", 0.0, 2), ("flash", 0.0, 2), ("ddim", 3.0, 2)]
    assert len({tuple(g for g, _ in r.aligned) for r in rows.values()}) == 1  # the same captions, in order
    table = flash_table(rows)
    assert all(name in table for name in rows) and len(table.splitlines()) == 5


def test_nano_flash_is_registered_shares_nanos_parts_and_follows_the_prompt():
    from kandinsky3 import Kandinsky3
    from kandinsky3.eval.alignment import evaluate_alignment
    from kandinsky3.registry import VARIANTS

    folder = VARIANTS["nano-flash"].local_dir
    assert sorted(p.name for p in folder.iterdir()) == ["kandinsky3.json", "unet.safetensors"]  # T5, MoVQ: nano's
    pipe = Kandinsky3.from_pretrained("nano-flash", device="cpu")
    s = pipe.variant.sampler
    assert (s.kind, s.steps, s.guidance) == ("flash", 4, 0.0) and pipe.variant.beautifier == "template"
    report = evaluate_alignment(pipe, 40, held_out=0, progress=False)
    assert report.steps == 4 and report.rate("1 object") >= 0.75  # 97 % on the 500-caption eval (docs/flash.md)
