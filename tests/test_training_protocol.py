"""The training step protocol (issue #13 item 6) and safe outputs (issue #20): strict typed configs, the recipe
table, named losses and optimizers (the toy GAN), exact resume, checkpoints that are complete or absent, exports
that never land in the package unless asked, and no global-RNG or private-API shortcuts in the recipes."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import yaml

from kandinsky3.models.config import ConfigError
from kandinsky3.training import TrainConfig, train
from kandinsky3.training.checkpointing import MANIFEST, CheckpointStore
from kandinsky3.training.recipes import RECIPES

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "kandinsky3"


def gan_config(out, **over) -> dict:
    cfg = {
        "recipe": "toy_gan",
        "output_dir": str(out),
        "model": {"hidden": 16, "num_points": 256},
        "steps": 12,
        "batch_size": 32,
        "lr": 2e-3,
        "warmup_steps": 2,
        "ema_decay": 0.9,
        "checkpoint_every": 100,
        "sample_every": 1000,
        "log_every": 1,
        "seed": 3,
    }
    cfg.update(over)
    return cfg


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {
        f"{f.relative_to(folder)}:{k}": v
        for f in sorted(folder.rglob("*.safetensors"))
        for k, v in load_file(f).items()
    }


def losses_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# -- strict configs --------------------------------------------------------------------------------------------------

DIFFUSION = {"recipe": "diffusion", "model": {"movq": "m"}}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"recipe": "movq", "stepz": 3}, "unknown key 'stepz'; did you mean 'steps'?"),
        (
            {"recipe": "movq", "model": {"edge_wieght": 3}},
            "unknown key 'model.edge_wieght'; did you mean 'edge_weight'?",
        ),
        (
            {"recipe": "movq", "model": {"movq": {"num_res_block": 1}}},
            "unknown key 'model.movq.num_res_block'; did you mean 'num_res_blocks'?",
        ),
        (
            {**DIFFUSION, "model": {"movq": "m", "unet": {"grups": 8}}},
            "unknown key 'model.unet.grups'; did you mean 'groups'?",
        ),
        (
            {**DIFFUSION, "model": {"movq": "m", "text_encoder": {"d_modle": 8}}},
            "unknown key 'model.text_encoder.d_modle'; did you mean 'd_model'?",
        ),
        (
            {**DIFFUSION, "model": {"movq": "m", "sampler": {"guidence": 1.0}}},
            "unknown key 'model.sampler.guidence'; did you mean 'guidance'?",
        ),
        (
            {"recipe": "superres", "model": {"unet": {"dim_mul": [1, 2]}}},
            "unknown key 'model.unet.dim_mul'; did you mean 'dim_mult'?",
        ),
        ({"recipe": "movq", "data": {"sise": 64}}, "unknown key 'data.sise'; did you mean 'size'?"),
        (
            {"recipe": "toy_gan", "optimizers": {"generator": {"weight_decy": 0.1}}},
            "unknown key 'optimizers.generator.weight_decy'; did you mean 'weight_decay'?",
        ),
        ({"recipe": "gan"}, "unknown recipe 'gan'; did you mean 'toy_gan'?"),
        (
            {**DIFFUSION, "cfg_dropout": 0.2},
            "'cfg_dropout' is a parameter of the diffusion recipe: put it under model:",
        ),
        ({"recipe": "movq", "steps": "ten"}, "steps must be an integer, got 'ten'"),
        ({"recipe": "movq", "model": {"train_encoder": "no"}}, "model.train_encoder must be true or false"),
        ({"recipe": "diffusion"}, "model.movq is required"),
        ({"recipe": "movq", "steps": 0}, "steps must be ≥ 1, got 0"),
        ({"recipe": "movq", "data": {"source": "folder"}}, "data.source=folder needs data.path"),
    ],
)
def test_a_bad_key_or_value_anywhere_is_a_one_line_error_naming_it(data, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(data)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: movq\nmodel:\n  movq: {ch: 8, chmult: [1, 2]}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'model\.movq\.chmult'; did you mean 'ch_mult'\?"):
        TrainConfig.from_yaml(bad)
    bad.write_text("recipe: movq\nsteps: [1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML \(line \d+"):
        TrainConfig.from_yaml(bad)
    (tmp_path / "ok.yaml").write_text("recipe: movq\n")
    with pytest.raises(ConfigError, match="steps must be ≥ 1"):  # `--steps 0` is an error, not an untrained export
        TrainConfig.from_yaml(tmp_path / "ok.yaml", steps=0)


def test_the_recipe_parameters_are_typed_dataclasses():
    cfg = TrainConfig.from_dict(
        {**DIFFUSION, "model": {"movq": "m", "min_snr_gamma": 5, "unet": {"groups": 8}, "sampler": {"guidance": 1}}}
    )
    assert type(cfg.model) is RECIPES["diffusion"].Params
    assert cfg.model.min_snr_gamma == 5.0 and isinstance(cfg.model.min_snr_gamma, float)
    assert cfg.model.unet.groups == 8 and cfg.model.sampler.guidance == 1.0 and cfg.model.cfg_dropout == 0.1
    # config.json round-trips
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_model_configs_reject_unknown_keys_and_the_committed_ones_load():
    from kandinsky3.checkpoints.loading import load_components
    from kandinsky3.models import MoVQConfig
    from kandinsky3.models.superres import SuperResUNetConfig
    from kandinsky3.models.unet import UNetConfig

    with pytest.raises(ConfigError, match="unknown key 'grups' in UNetConfig; did you mean 'groups'"):
        UNetConfig.from_dict({"grups": 8})
    with pytest.raises(ConfigError, match="unknown key 'use_tilling' in MoVQConfig; did you mean 'use_tiling'"):
        MoVQConfig.from_dict({"use_tilling": True})
    with pytest.raises(ConfigError, match="unknown key 'dropuot' in SuperResUNetConfig; did you mean 'dropout'"):
        SuperResUNetConfig.from_dict({"dropuot": 0.0})
    jsons = sorted((PACKAGE / "weights").rglob("*.json"))
    checked = 0
    for path in jsons:
        meta = json.loads(path.read_text())
        for key, cls in (("unet", SuperResUNetConfig if "superres" in path.name else UNetConfig), ("movq", MoVQConfig)):
            if isinstance(meta, dict) and key in meta:
                assert cls.from_dict(meta[key]).to_dict() == cls(**meta[key]).to_dict()
                checked += 1
    assert checked >= 3  # nano's U-Net and MoVQ, nano-sr's U-Net
    assert load_components("nano").variant.name == "nano"


def _configs():  # training configs (configs/accelerate/ holds `accelerate launch` configs)
    return sorted(p for p in (REPO / "configs").rglob("*.yaml") if "accelerate" not in p.parts)


def _available_on_a_fresh_clone(value: str) -> bool:
    from kandinsky3.registry import SUPERRES_VARIANTS, VARIANTS

    if value in VARIANTS or value in SUPERRES_VARIANTS:
        return True
    return not value.startswith("runs/") and (REPO / value).exists()


@pytest.mark.parametrize("path", _configs(), ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_parses_strictly_and_says_in_its_first_line_what_it_needs(path):
    cfg = TrainConfig.from_yaml(path)
    assert cfg.recipe in RECIPES
    needed = [getattr(cfg.model, key, None) for key in ("movq", "init", "teacher", "image_encoder")] + [cfg.data.path]
    missing = [v for v in needed if isinstance(v, str) and not _available_on_a_fresh_clone(v)]
    first = path.read_text().splitlines()[0]
    if missing:
        assert first.startswith("# Needs:"), f"{path.name} reads {missing}: its first line must say so"
        assert all(v in first for v in missing), f"{path.name}'s first line does not name {missing}"
    else:
        assert not first.startswith("# Needs:"), f"{path.name} runs on a fresh clone: no '# Needs:' line"
    # nothing writes into the package unless the command line asks for it (--export-dir)
    export = Path(cfg.export_dir or Path(cfg.output_dir) / "export")
    assert PACKAGE not in (REPO / export).resolve().parents, f"{path.name} exports into the package"


# -- the recipe table and the step protocol ----------------------------------------------------------------------------


def test_recipes_are_registered_in_one_table():
    assert set(RECIPES) >= {"movq", "diffusion", "superres", "toy_gan"}
    from kandinsky3.training.recipes import make_recipe

    class Twice(RECIPES["toy_gan"]):  # a recipe defined outside the package: one entry makes it trainable
        pass

    RECIPES["twice"] = Twice
    try:
        recipe = make_recipe(TrainConfig.from_dict({**gan_config("unused"), "recipe": "twice"}), "cpu")
        assert isinstance(recipe, Twice)
    finally:
        del RECIPES["twice"]


def test_two_optimizers_step_their_own_losses_in_order_and_log_them_by_name(tmp_path):
    """The discriminator's loss moves only the discriminator (its optimizer steps first, then the generator's
    against the updated discriminator); each loss is logged under its name; the EMA is the generator's."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    events, optimizers = [], {}

    def grads(optimizer):
        return [p.grad for g in optimizer.param_groups for p in g["params"]]

    def pre(optimizer, args, kwargs):
        group = optimizer.param_groups[0]["group"]
        optimizers[group] = optimizer
        others = [gr for g, o in optimizers.items() if g != group for gr in grads(o)]
        events.append((group, all(gr is not None for gr in grads(optimizer)), all(gr is None for gr in others)))

    handle = register_optimizer_step_pre_hook(pre)
    try:
        summary = train(TrainConfig.from_dict(gan_config(tmp_path, steps=3)), progress=False)
    finally:
        handle.remove()
    # each optimizer steps with gradients in its own parameters only, the discriminator first
    assert events == [("discriminator", True, True), ("generator", True, True)] * 3
    assert set(summary["losses"]) == {"discriminator", "generator"}
    log = losses_of(tmp_path)
    assert [e["step"] for e in log] == [1, 2, 3] and {"discriminator", "generator"} <= set(log[0])
    assert set(log[0]["lr"]) == {"discriminator", "generator"}
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["generator.json", "generator.safetensors"]


def test_optimizer_overrides_by_name(tmp_path):
    cfg = gan_config(tmp_path, steps=1000, warmup_steps=0, optimizers={"generator": {"lr": 1e-4, "betas": [0.0, 0.9]}})
    train(TrainConfig.from_dict(cfg), max_steps=1, progress=False)
    log = losses_of(tmp_path)[0]["lr"]
    assert log["generator"] == pytest.approx(1e-4, rel=1e-3) and log["discriminator"] == pytest.approx(2e-3, rel=1e-3)
    with pytest.raises(ConfigError, match="unknown optimizer 'optimizers.generatr'; did you mean 'generator'"):
        train(TrainConfig.from_dict(gan_config(tmp_path / "b", optimizers={"generatr": {"lr": 1e-4}})), progress=False)


def test_the_toy_gan_learns_the_ring(tmp_path):
    from safetensors.torch import load_file

    from kandinsky3.training.recipes.toy_gan import mlp

    cfg = gan_config(
        tmp_path,
        model={"hidden": 32, "num_points": 1024},
        steps=600,
        batch_size=64,
        warmup_steps=10,
        ema_decay=0.99,
        log_every=100,
        seed=0,
    )
    train(TrainConfig.from_dict(cfg), progress=False)
    g = mlp(4, 32, 2)
    g.load_state_dict(load_file(tmp_path / "export" / "generator.safetensors"))
    with torch.no_grad():
        r = g(torch.randn(2000, 4, generator=torch.Generator().manual_seed(1))).norm(dim=1)
    assert (r - 2.0).abs().mean() < 0.5  # 1.76 untrained: the points moved onto the ring of radius 2


# -- exact resume ----------------------------------------------------------------------------------------------------


def test_a_stopped_and_resumed_gan_ends_bit_identical(tmp_path):
    whole = train(TrainConfig.from_dict(gan_config(tmp_path / "a", steps=12)), progress=False)
    cfg = TrainConfig.from_dict(gan_config(tmp_path / "b", steps=12, checkpoint_every=4))
    assert train(cfg, max_steps=5, progress=False)["step"] == 5  # saves step 4 and, stopping, step 5
    assert train(cfg, max_steps=2, progress=False)["step"] == 7
    resumed = train(cfg, progress=False)
    assert resumed["step"] == 12 and resumed["losses"] == whole["losses"]
    a, b = tensors_of(tmp_path / "a" / "export"), tensors_of(tmp_path / "b" / "export")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses_of(tmp_path / "a") == losses_of(tmp_path / "b")


@pytest.mark.parametrize("name", ["movq", "diffusion", "superres"])
def test_the_recipes_resume_bit_identical_across_an_epoch_boundary(name, tmp_path):
    """The golden runs' tiny configs (6 batches an epoch), 8 steps straight vs 4 + 4: same weights, same log.
    (Before the protocol the superres recipe counted its own steps, so a resumed run cropped and degraded
    differently; the data order restarted too.)"""
    from test_training_golden import _config

    def run(folder, stop=None):
        cfg = _config(name, folder)
        cfg.update(steps=8, output_dir=str(folder / name), checkpoint_every=100)
        if stop:
            train(TrainConfig.from_dict(cfg), max_steps=stop, progress=False)
        return train(TrainConfig.from_dict(cfg), progress=False)

    a, b = run(tmp_path / "a"), run(tmp_path / "b", stop=4)
    assert a["losses"] == b["losses"]
    ta, tb = tensors_of(Path(a["export_dir"])), tensors_of(Path(b["export_dir"]))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert losses_of(tmp_path / "a" / name) == losses_of(tmp_path / "b" / name)


# -- checkpoints and exports ------------------------------------------------------------------------------------------


def test_checkpoints_are_new_directories_the_newest_complete_one_wins(tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig.from_dict(gan_config(out, steps=8, checkpoint_every=1, keep_checkpoints=3))
    train(cfg, max_steps=6, progress=False)
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004", "step-00000005", "step-00000006"]
    assert (root / "latest").read_text() == "step-00000006\n"
    manifest = json.loads((root / "step-00000006" / MANIFEST).read_text())
    assert manifest["step"] == 6 and "loop-0.pt" in manifest["files"] and "optimizer_1.bin" in manifest["files"]
    store = CheckpointStore(root)
    assert store.latest() == root / "step-00000006"
    # a killed save (a .tmp directory), a newer directory whose file was cut short, and a stale pointer: the
    # newest *complete* checkpoint is still step 6
    (root / ".step-00000007.tmp").mkdir()
    (root / ".step-00000007.tmp" / "model.safetensors").write_bytes(b"partial")
    import shutil

    shutil.copytree(root / "step-00000006", root / "step-00000008")
    (root / "step-00000008" / MANIFEST).write_text(json.dumps({**manifest, "step": 8}))
    with open(root / "step-00000008" / "optimizer.bin", "r+b") as f:
        f.truncate(10)
    (root / "latest").write_text("step-00000008\n")
    assert store.latest() == root / "step-00000006"
    # and the run resumes from it: 2 more steps, the same result as a run that never saw the debris
    assert train(cfg, progress=False)["step"] == 8
    clean = train(TrainConfig.from_dict(gan_config(tmp_path / "clean", steps=8)), progress=False)
    a, b = tensors_of(out / "export"), tensors_of(tmp_path / "clean" / "export")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert clean["losses"] == train(cfg, progress=False)["losses"]  # (a finished run only re-exports)


def test_an_old_single_checkpoint_directory_is_refused_clearly(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "step.json").write_text('{"step": 3}')
    with pytest.raises(ConfigError, match="old layout"):
        train(TrainConfig.from_dict(gan_config(tmp_path)), progress=False)


def test_exports_go_under_the_output_dir_unless_named(tmp_path):
    summary = train(TrainConfig.from_dict(gan_config(tmp_path / "run", steps=2)), progress=False)
    assert summary["export_dir"] == str(tmp_path / "run" / "export")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("unrelated")
    (target / "generator.json").write_text("old")
    cfg = TrainConfig.from_yaml(
        _write(tmp_path / "c.yaml", gan_config(tmp_path / "run2", steps=2)), export_dir=str(target)
    )
    assert train(cfg, progress=False)["export_dir"] == str(target)
    assert (target / "keep.txt").read_text() == "unrelated"  # files the export does not write are left alone
    assert json.loads((target / "generator.json").read_text())["recipe"] == "toy_gan"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind
    with pytest.raises(ConfigError, match="max_steps must be ≥ 1"):
        train(cfg, max_steps=0, progress=False)


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# -- no shortcuts -----------------------------------------------------------------------------------------------------


def _calls(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            parts, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                parts.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name):
                parts.append(base.id)
            names.add(".".join(reversed(parts)))
        elif isinstance(node, ast.FunctionDef):
            names.add(f"def {node.name}")
    return names


def test_no_global_rng_seeding_or_private_text_api_in_training():
    files = sorted((PACKAGE / "training").rglob("*.py")) + [PACKAGE / "checkpoints" / "superres.py"]
    for path in files:
        calls = _calls(path)
        for forbidden in ("torch.manual_seed", "torch.random.manual_seed", "torch.seed", "torch.set_rng_state"):
            assert forbidden not in calls, f"{path.name} calls {forbidden}"
        assert not any(c.endswith("._encode_ids") for c in calls), f"{path.name} calls TextEncoder._encode_ids"
        if path.parent.name != "checkpoints":
            assert "def build_text_encoder" not in calls, f"{path.name} has a second build_text_encoder"


def test_loading_the_tiny_upscaler_leaves_the_global_rng_alone():
    from kandinsky3 import SuperRes

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a = SuperRes.from_pretrained("tiny", device="cpu")
    assert torch.equal(torch.rand(3), expected)
    b = SuperRes.from_pretrained("tiny", device="cpu")
    assert all(torch.equal(x, y) for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values()))


def test_building_a_recipe_leaves_the_global_rng_alone_and_is_deterministic():
    from kandinsky3.training.recipes import make_recipe

    cfg = TrainConfig.from_dict(gan_config("unused"))
    state = torch.random.get_rng_state()
    a, b = make_recipe(cfg, "cpu"), make_recipe(cfg, "cpu")
    assert torch.equal(torch.random.get_rng_state(), state)
    for name in a.modules:
        assert all(torch.equal(x, y) for x, y in zip(a.modules[name].parameters(), b.modules[name].parameters()))


def test_text_conditioning_in_training_is_the_inference_null_context(tiny):
    """The diffusion trainable's CFG-dropout context is ``TextEncoder.null_context`` — the same function inference
    calls through ``unconditional`` — with the trainable null embedding in the graph."""
    te = tiny.text_encoder
    context, mask, _, _ = te.encode(["a red circle", "a cat"])
    null, null_mask = te.unconditional(context)
    param = torch.nn.Parameter(te.null_embedding.clone())
    trained, trained_mask = te.null_context(context, param)
    assert torch.equal(null, trained.detach()) and torch.equal(null_mask, trained_mask)
    trained.sum().backward()
    assert param.grad is not None and torch.equal(param.grad, torch.full_like(param, 2.0))
    ids, ids_mask = te.tokenize(["a red circle", "a cat"])
    with torch.no_grad():  # (with gradients the attention kernels may differ in the last bits)
        again, again_mask = te.encode_ids(ids, ids_mask)
    assert torch.equal(again, context) and torch.equal(again_mask, mask)


def test_training_progress_in_a_log_file_is_plain_lines(tmp_path, capsys):
    """stderr not a terminal (a log file, CI): one plain line per logged step, no carriage-return bar."""
    from kandinsky3.cli import main

    config = tmp_path / "gan.yaml"
    config.write_text(yaml.safe_dump(gan_config(tmp_path / "run", steps=10, log_every=5)))
    assert main(["train", "toy_gan", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train toy_gan: step ")]
    assert [line.split(",")[0] for line in lines] == ["train toy_gan: step 5/10", "train toy_gan: step 10/10"]
    assert "\r" not in err and "discriminator" in lines[0]
    assert (
        main(["train", "toy_gan", "--config", str(config), "--output-dir", str(tmp_path / "quiet"), "--no-progress"])
        == 0
    )
    assert "train toy_gan: step" not in capsys.readouterr().err
