"""The one training loop, on ``accelerate``: CPU, one GPU, or many GPUs / nodes (DDP; FSDP via accelerate config).

A recipe (``recipes.RECIPES``) declares its trainable modules, parameter groups, named optimizers and a ``step`` that
yields named losses, each bound to the optimizer it steps (docs/training.md, "The training step protocol"). The
loop adds what every run needs: mixed precision, an EMA per module, warm-up + cosine learning rate per optimizer,
gradient clipping per optimizer, crash-safe checkpoints with exact resume (``checkpointing``), sample grids, a log
of every loss by name, a progress bar and the export of the final weights.

Randomness: the run's stream is explicit (``protocol.RandomStreams``, seeded with ``seed``): model initialisation,
the data order and every draw of a step come from it, and every checkpoint holds it, so a resumed run ends
bit-identical (CPU) to an uninterrupted one. The global python / numpy / torch RNGs are seeded too, and
checkpointed, for code that cannot take a generator (dropout).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

from ..models.config import ConfigError, unknown_key
from .checkpointing import CheckpointStore, export_atomically, fsync_path
from .config import TrainConfig
from .data import DataOrder
from .protocol import OptimizerSpec, RandomStreams, StepContext


class Plan:
    """The planned number of steps. A time budget may shorten it; the config itself is never changed."""

    def __init__(self, steps: int):
        self.steps = steps


def lr_factor(warmup_steps: int, plan: Plan):
    """Linear warm-up over ``warmup_steps``, then cosine decay to 10 % at ``plan.steps`` (read at every step, so a
    plan shortened by a time budget still ends its schedule)."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, plan.steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def ema_update(decay: float):
    """EMA with the usual warm-up, decay_n = min(decay, (1 + n) / (10 + n)): a constant decay would keep
    decay^n of the random initial weights in the average (37 % after 1000 steps at 0.999)."""

    def update(ema_params, params, num_averaged):
        n = float(num_averaged)
        floating = [(e, p) for e, p in zip(ema_params, params) if e.is_floating_point()]
        for e, p in zip(ema_params, params):  # integer buffers (e.g. CLIP's position ids) are copied, not averaged
            if not e.is_floating_point():
                e.copy_(p)
        if floating:
            ema, new = zip(*floating)
            torch._foreach_lerp_(list(ema), list(new), 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

    return update


class TimeBudget:
    """Fit a run into a wall-clock budget (a lent GPU for N minutes): the planned ``steps`` are shortened, never
    lengthened, from the measured speed, so the cosine schedule still ends and the export still happens in time.

    The speed is measured from the ``skip``-th step of this invocation (past start-up and first-step costs) and
    re-measured every ``every`` steps (sample grids and checkpoints count). All ranks take rank 0's verdict.
    """

    def __init__(self, minutes: float, skip: int = 10, first: int = 50, every: int = 200, reserve: float = 0.03):
        self.deadline = time.monotonic() + 60 * minutes
        self.skip, self.first, self.every, self.reserve_s = skip, first, every, 60 * minutes * reserve + 5
        self.mark = None  # (steps done in this invocation, time) where the speed measurement starts

    def fit(self, done: int, step: int, planned: int) -> int | None:
        """The new total if this is a measuring step (``done`` steps into this invocation), else None."""
        now = time.monotonic()
        if done == self.skip:
            self.mark = (done, now)
        if self.mark is None or done - self.mark[0] < self.first or (done - self.mark[0] - self.first) % self.every:
            return None
        rate = (done - self.mark[0]) / max(now - self.mark[1], 1e-9)
        return min(planned, step + max(0, int(rate * (self.deadline - now - self.reserve_s))))


# -- setting up the recipe's optimizers -------------------------------------------------------------------------


def _optimizer_specs(recipe, cfg: TrainConfig) -> dict[str, OptimizerSpec]:
    """The recipe's optimizers with the YAML's ``optimizers:`` overrides applied (unknown names are errors)."""
    specs = dict(recipe.optimizers())
    for name, override in cfg.optimizers.items():
        if name not in specs:
            raise unknown_key(name, specs, "optimizers", what="optimizer")
        changes = {k: v for k, v in vars(override).items() if v is not None}
        specs[name] = OptimizerSpec(**{**vars(specs[name]), **changes})
    return specs


def _check_protocol(recipe, groups: dict, specs: dict[str, OptimizerSpec]):
    """Every trainable parameter is in exactly one optimizer; every loss names a declared optimizer."""
    owner: dict[int, str] = {}
    for opt_name, spec in specs.items():
        for group in spec.groups:
            if group not in groups:
                raise ValueError(
                    f"optimizer {opt_name!r} names parameter group {group!r}, which "
                    f"{type(recipe).__name__}.parameter_groups() lacks ({', '.join(groups)})"
                )
            for p in groups[group]:
                if id(p) in owner and owner[id(p)] != opt_name:
                    raise ValueError(f"a parameter of group {group!r} is also stepped by optimizer {owner[id(p)]!r}")
                owner[id(p)] = opt_name
    for module_name, module in recipe.modules.items():
        loose = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in owner]
        if loose:
            raise ValueError(
                f"{len(loose)} trainable parameters of module {module_name!r} are in no optimizer "
                f"(e.g. {loose[0]}): add them to a parameter group or set requires_grad=False"
            )
    for loss, opt_name in recipe.losses.items():
        if loss in ("step", "lr"):
            raise ValueError(f"a loss may not be called {loss!r} (the log uses that key)")
        if opt_name not in specs:
            raise ValueError(f"loss {loss!r} steps optimizer {opt_name!r}, which the recipe does not declare")


def _losses(result):
    """A step's output as an iterator of (name, loss): a dict's items, or the pairs a generator yields."""
    return iter(result.items()) if isinstance(result, Mapping) else iter(result)


class _Training:
    """One run's live objects; ``train`` drives it."""

    def __init__(self, cfg: TrainConfig, accelerator, rng: RandomStreams, plan: Plan):
        from .recipes import make_recipe

        self.cfg, self.accelerator, self.rng, self.plan = cfg, accelerator, rng, plan
        self.recipe = recipe = make_recipe(cfg, accelerator.device, rng)
        rng.fork_for_rank(accelerator.process_index)
        if cfg.gradient_checkpointing:
            recipe.enable_gradient_checkpointing()
        groups = recipe.parameter_groups()
        specs = _optimizer_specs(recipe, cfg)
        _check_protocol(recipe, groups, specs)
        self.params = {name: [p for g in spec.groups for p in groups[g]] for name, spec in specs.items()}
        optimizers = {
            name: torch.optim.AdamW(
                [{"params": groups[g], "group": g} for g in spec.groups],
                lr=spec.lr,
                betas=spec.betas,
                weight_decay=spec.weight_decay,
                eps=spec.eps,
            )
            for name, spec in specs.items()
        }
        self.schedulers = {
            name: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.warmup_steps, plan))
            for name, opt in optimizers.items()
        }
        names, opt_names = list(recipe.modules), list(optimizers)
        prepared = accelerator.prepare(*recipe.modules.values(), *optimizers.values())
        self.modules = dict(zip(names, prepared[: len(names)]))
        self.optimizers = dict(zip(opt_names, prepared[len(names) :]))
        self.emas = {}
        unknown = set(recipe.ema_modules or ()) - set(names)
        if unknown:
            raise ValueError(f"{type(recipe).__name__}.ema_modules names {sorted(unknown)}, not in its modules {names}")
        if cfg.ema_decay:
            for name in recipe.ema_modules or names:
                ema = AveragedModel(
                    accelerator.unwrap_model(self.modules[name]),
                    multi_avg_fn=ema_update(cfg.ema_decay),
                    use_buffers=True,
                )
                accelerator.register_for_checkpointing(ema)
                self.emas[name] = ema
        from accelerate.utils import broadcast

        self.data = DataOrder(
            recipe.dataset,
            cfg.batch_size,
            recipe.collate,
            cfg.data.num_workers,
            accelerator.process_index,
            accelerator.num_processes,
            broadcast=lambda t: broadcast(t.to(accelerator.device)).cpu(),
        )
        self.step, self.running, self.metrics = 0, {}, {}

    # -- one step ---------------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        acc, recipe, cfg = self.accelerator, self.recipe, self.cfg
        ctx = StepContext(self.step + 1, self.rng)
        batch = recipe.prepare(self.data.next_batch(self.rng.cpu), ctx)
        order, last, values = list(recipe.losses), -1, {}
        with acc.autocast():
            losses = _losses(recipe.step(self.modules, batch, ctx))
        while True:
            with acc.autocast():  # the recipe computes each loss after the previous optimizer stepped
                try:
                    name, loss = next(losses)
                except StopIteration:
                    break
            if name not in recipe.losses or order.index(name) <= last:
                raise RuntimeError(
                    f"{type(recipe).__name__}.step gave loss {name!r}; it declares "
                    f"{order} and must give each at most once, in that order"
                )
            last = order.index(name)
            opt_name = recipe.losses[name]
            optimizer, params = self.optimizers[opt_name], self.params[opt_name]
            acc.backward(loss, **({"inputs": params} if len(self.optimizers) > 1 else {}))
            if cfg.grad_clip:
                acc.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            if not getattr(optimizer, "step_was_skipped", False):  # fp16 overflow: the schedule waits too
                self.schedulers[opt_name].step()
            optimizer.zero_grad(set_to_none=True)
            values[name] = loss.detach().float().item()
        for name, value in ctx.metrics.items():
            old = self.metrics.get(name)
            self.metrics[name] = value if old is None else 0.98 * old + 0.02 * value
        if not values:
            raise RuntimeError(f"{type(recipe).__name__}.step gave no loss")
        for name, ema in self.emas.items():
            ema.update_parameters(acc.unwrap_model(self.modules[name]))
        self.step += 1
        for name, value in values.items():
            old = self.running.get(name)
            self.running[name] = value if old is None else 0.98 * old + 0.02 * value
        return values

    def eval_modules(self) -> dict[str, torch.nn.Module]:
        """The EMA modules where there are any, else the trained ones."""
        return {
            name: self.emas[name].module if name in self.emas else self.accelerator.unwrap_model(module)
            for name, module in self.modules.items()
        }

    def lrs(self) -> dict[str, float]:
        return {name: s.get_last_lr()[0] for name, s in self.schedulers.items()}

    # -- checkpoint state ------------------------------------------------------------------------------------------

    def write_rank_state(self, folder: Path):
        path = folder / f"loop-{self.accelerator.process_index}.pt"
        torch.save(
            {
                "step": self.step,
                "planned_steps": self.plan.steps,
                "data": self.data.state_dict(),
                "rng": self.rng.state_dict(),
                "running": dict(self.running),
                "metrics": dict(self.metrics),
                "schedulers": {name: s.state_dict() for name, s in self.schedulers.items()},
            },
            path,
        )
        fsync_path(path)

    def resume(self, folder: Path, manifest: dict):
        acc = self.accelerator
        if manifest.get("num_processes", 1) != acc.num_processes:
            raise ConfigError(
                f"{folder} was written by {manifest.get('num_processes')} processes; resume it with "
                f"the same number (this run has {acc.num_processes})"
            )
        acc.load_state(str(folder))
        state = torch.load(folder / f"loop-{acc.process_index}.pt", weights_only=True)
        if set(state["schedulers"]) != set(self.schedulers):
            raise ConfigError(
                f"{folder} holds optimizers {sorted(state['schedulers'])}, this recipe has {sorted(self.schedulers)}"
            )
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state["schedulers"][name])
        self.step, self.running = state["step"], dict(state["running"])
        self.metrics = dict(state.get("metrics", {}))
        self.data.load_state_dict(state["data"])
        self.rng.load_state_dict(state["rng"])


def _refuse_old_layout(out: Path, store: CheckpointStore):
    if (out / "checkpoint" / "step.json").is_file() and store.latest() is None:
        raise ConfigError(
            f"{out}/checkpoint is a checkpoint of the old layout (one directory overwritten in place), "
            "which this version cannot resume; start a new output_dir, or begin from its weights "
            f"with model.init: {out}/checkpoint/model.safetensors (diffusion)"
        )


def train(cfg: TrainConfig, max_steps: int | None = None, progress: bool = True) -> dict:
    """Run (or resume) a training run; returns a summary with the final losses and where things were written."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast, set_seed
    from tqdm.auto import tqdm

    cfg.validate()  # (from_dict / from_yaml did already; a TrainConfig built by hand is checked here)
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"max_steps must be ≥ 1, got {max_steps}")
    budget = TimeBudget(cfg.time_budget_minutes) if cfg.time_budget_minutes else None  # start-up counts too
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    set_seed(cfg.seed, device_specific=False)  # python, numpy, global torch: only for draws without a generator
    out = Path(cfg.output_dir)
    store = CheckpointStore(out / "checkpoints", keep=cfg.keep_checkpoints)
    _refuse_old_layout(out, store)
    plan = Plan(cfg.steps)
    run = _Training(cfg, accelerator, RandomStreams(cfg.seed, accelerator.device), plan)

    latest = store.latest()
    if latest is not None:
        run.resume(latest, store.manifest(latest))
        accelerator.print(f"resumed from {latest} at step {run.step}")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _write_config(cfg, out, plan.steps)
        _trim_log(out / "log.jsonl", run.step)

    total = plan.steps if max_steps is None else min(plan.steps, run.step + max_steps)
    done = 0  # steps in this invocation
    # a terminal gets a bar; a log file gets one plain line per logged step (no carriage-return walls)
    plain = progress and accelerator.is_main_process and not sys.stderr.isatty()
    bar = tqdm(
        total=total,
        initial=run.step,
        desc=f"train {cfg.recipe}",
        disable=plain or not (progress and accelerator.is_main_process),
    )
    for module in run.modules.values():
        module.train()
    while run.step < total:
        run.train_step()
        step, done = run.step, done + 1
        fitted = budget.fit(done, step, plan.steps) if budget is not None else None
        if fitted is not None:
            fitted = int(broadcast(torch.tensor([fitted], device=accelerator.device)).item())  # ranks agree
            if fitted < plan.steps:
                plan.steps, total = fitted, min(total, fitted)  # the schedules read plan.steps: they end there now
                bar.total = total
                if accelerator.is_main_process:
                    _write_config(cfg, out, plan.steps)
        bar.update(1)
        first_lr = next(iter(run.lrs().values()))
        bar.set_postfix({**{k: f"{v:.4f}" for k, v in run.running.items()}, "lr": f"{first_lr:.2e}"})
        if step % cfg.log_every == 0 and accelerator.is_main_process:
            with open(out / "log.jsonl", "a") as f:
                metrics = {"metrics": dict(run.metrics)} if run.metrics else {}
                f.write(json.dumps({"step": step, **run.running, "lr": run.lrs(), **metrics}) + "\n")
            if plain:
                losses = ", ".join(f"{k} {v:.4f}" for k, v in run.running.items())
                print(
                    f"train {cfg.recipe}: step {step}/{total}, {losses}, lr {first_lr:.2e}", file=sys.stderr, flush=True
                )
        if step % cfg.checkpoint_every == 0 or step == total:
            store.save(accelerator, step, run.write_rank_state)
        if accelerator.is_main_process and (step % cfg.sample_every == 0 or step == plan.steps):
            grid = run.recipe.sample_grid(run.eval_modules())
            if grid is not None:
                (out / "samples").mkdir(exist_ok=True)
                grid.save(out / "samples" / f"step_{step:06d}.png")
            probe = run.recipe.probe(run.eval_modules())
            if probe:
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "probe": probe}) + "\n")
    bar.close()
    accelerator.wait_for_everyone()
    summary = {"step": run.step, "steps": plan.steps, "losses": dict(run.running), "output_dir": str(out)}
    if "loss" in run.running:
        summary["loss"] = run.running["loss"]
    if run.step >= plan.steps and accelerator.is_main_process:
        export_dir = Path(cfg.export_dir) if cfg.export_dir else out / "export"
        modules = run.eval_modules()
        export_atomically(lambda folder: run.recipe.export(modules, folder), export_dir)
        summary["export_dir"] = str(export_dir)
    summary["params_checksum"] = float(
        sum(p.detach().double().sum() for m in run.modules.values() for p in accelerator.unwrap_model(m).parameters())
    )
    summary["rank"] = accelerator.process_index
    summary["world_size"] = accelerator.num_processes
    return summary


def _trim_log(path: Path, step: int):
    """Drop log lines past the step a run (re)starts from — written after its last checkpoint by a run that was
    then killed, the last one perhaps cut short — so a resumed run's log reads as an uninterrupted one's."""
    if not path.is_file():
        return
    from .checkpointing import write_atomically

    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= step:
            kept.append(line)
    write_atomically(path, "".join(f"{line}\n" for line in kept))


def _write_config(cfg: TrainConfig, out: Path, steps: int):
    """``OUTPUT_DIR/config.json``: the config as run, with the planned steps (a time budget may have fitted them)."""
    from .checkpointing import write_atomically

    write_atomically(out / "config.json", json.dumps(cfg.with_steps(steps).to_dict(), indent=2, default=str))


__all__ = ["TimeBudget", "ema_update", "lr_factor", "train"]
