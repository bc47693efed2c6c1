"""The one training loop, on ``accelerate``: CPU, one GPU, or many GPUs / nodes (DDP; FSDP via accelerate config).

A recipe supplies the trainable module (whose ``forward(batch)`` returns the loss), how a batch is prepared,
sample grids and the export of the final weights. The loop adds what every run needs: mixed precision, EMA,
warm-up + cosine learning rate, gradient clipping, checkpoint + resume, sample grids and a progress bar.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

from .config import TrainConfig


def _lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def ema_update(decay: float):
    """EMA with the usual warm-up, decay_n = min(decay, (1 + n) / (10 + n)): a constant decay would keep
    decay^n of the random initial weights in the average (37 % after 1000 steps at 0.999)."""

    def update(ema_params, params, num_averaged):
        n = float(num_averaged)
        torch._foreach_lerp_(ema_params, params, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

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


def _cycle(loader):
    for epoch in itertools.count():
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader


def train(cfg: TrainConfig, max_steps: int | None = None, progress: bool = True) -> dict:
    """Run (or resume) a training run; returns a summary with the final loss and where things were written."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast, set_seed
    from tqdm.auto import tqdm

    from .recipes import make_recipe

    budget = TimeBudget(cfg.time_budget_minutes) if cfg.time_budget_minutes else None  # start-up counts too
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    set_seed(cfg.seed, device_specific=False)
    out = Path(cfg.output_dir)
    recipe = make_recipe(cfg, accelerator.device)
    model = recipe.trainable
    if cfg.gradient_checkpointing:
        recipe.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    loader = torch.utils.data.DataLoader(recipe.dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         num_workers=cfg.data.num_workers, collate_fn=recipe.collate,
                                         persistent_workers=cfg.data.num_workers > 0)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    ema = None
    if cfg.ema_decay:
        ema = AveragedModel(accelerator.unwrap_model(model), multi_avg_fn=ema_update(cfg.ema_decay),
                            use_buffers=True)
        accelerator.register_for_checkpointing(ema)

    step = 0
    state_dir = out / "checkpoint"
    if (state_dir / "step.json").is_file():  # resume
        accelerator.load_state(str(state_dir))
        step = json.loads((state_dir / "step.json").read_text())["step"]
        accelerator.print(f"resumed from {state_dir} at step {step}")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _write_config(cfg, out)

    total = cfg.steps if max_steps is None else min(cfg.steps, step + max_steps)
    done = 0  # steps in this invocation
    bar = tqdm(total=total, initial=step, desc=f"train {cfg.recipe}", disable=not (progress and accelerator.is_main_process))
    batches = _cycle(loader)
    model.train()
    running, losses = None, []
    while step < total:
        batch = recipe.prepare(next(batches))
        with accelerator.autocast():
            loss = model(batch)
        accelerator.backward(loss)
        if cfg.grad_clip:
            accelerator.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update_parameters(accelerator.unwrap_model(model))
        step, done = step + 1, done + 1
        fitted = budget.fit(done, step, cfg.steps) if budget is not None else None
        if fitted is not None:
            fitted = int(broadcast(torch.tensor([fitted], device=accelerator.device)).item())  # ranks agree
            if fitted < cfg.steps:
                cfg.steps, total = fitted, min(total, fitted)  # the schedule reads cfg.steps: it ends there now
                bar.total = total
                if accelerator.is_main_process:
                    _write_config(cfg, out)
        value = loss.detach().float().item()
        running = value if running is None else 0.98 * running + 0.02 * value
        losses.append(value)
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if step % cfg.log_every == 0 and accelerator.is_main_process:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": running}) + "\n")
        if step % cfg.checkpoint_every == 0 or step == total:
            _checkpoint(accelerator, state_dir, step)
        if accelerator.is_main_process and (step % cfg.sample_every == 0 or step == cfg.steps):
            grid = recipe.sample_grid(_eval_module(ema, accelerator, model))
            if grid is not None:
                (out / "samples").mkdir(exist_ok=True)
                grid.save(out / "samples" / f"step_{step:06d}.png")
    bar.close()
    accelerator.wait_for_everyone()
    summary = {"step": step, "loss": running, "output_dir": str(out)}
    if step >= cfg.steps and accelerator.is_main_process:
        export_dir = Path(cfg.export_dir or out / "export")
        recipe.export(_eval_module(ema, accelerator, model), export_dir)
        summary["export_dir"] = str(export_dir)
    summary["params_checksum"] = float(sum(p.detach().double().sum() for p in accelerator.unwrap_model(model).parameters()))
    summary["rank"] = accelerator.process_index
    summary["world_size"] = accelerator.num_processes
    return summary


def _write_config(cfg: TrainConfig, out: Path):
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))


def _eval_module(ema, accelerator, model):
    return ema.module if ema is not None else accelerator.unwrap_model(model)


def _checkpoint(accelerator, state_dir: Path, step: int):
    accelerator.save_state(str(state_dir))
    if accelerator.is_main_process:
        (state_dir / "step.json").write_text(json.dumps({"step": step}))
    accelerator.wait_for_everyone()
