"""Kill tests (issue #20, "Checkpoints are overwritten in place"; issue #13, the two-optimizer toy recipe).

A toy-GAN run that saves a checkpoint after every step is SIGKILLed again and again at random moments — most of them
inside a save, found by watching for the save's ``.step-N.tmp`` directory — and started again each time. After
every kill the newest checkpoint must be complete (every ``step-N`` directory is), resuming must work, and the run
must never go back; when it finally finishes, its weights and its whole loss log equal those of a run that was never
interrupted, bit for bit.

The runs are processes forked from a ``forkserver`` that has imported the package once, so a kill-and-restart
costs a fraction of a second instead of a fresh interpreter.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import signal
import time
from pathlib import Path

import torch

from kandinsky3.training import TrainConfig, train
from kandinsky3.training.checkpointing import CheckpointStore

KILLS, STEPS = 20, 120


def _context():
    ctx = multiprocessing.get_context("forkserver")
    # what a run imports, so a restarted child starts in a fraction of a second (torch's compiler stack is
    # imported lazily by the optimizers and accelerate on first use)
    ctx.set_forkserver_preload(
        [
            "kandinsky3.training.loop",
            "kandinsky3.training.recipes",
            "accelerate",
            "sympy",
            "torch._dynamo",
            "torch._inductor",
            "torch.distributed.fsdp",
            "torch.onnx",
        ]
    )
    return ctx


def _start(ctx, cfg: TrainConfig):
    process = ctx.Process(target=train, args=(cfg,), kwargs={"progress": False})
    process.start()
    return process


def _config(out: Path, checkpoint_every: int = 1) -> TrainConfig:
    """A checkpoint after every step (the runs that are killed), or only at the end (how often a run saves does
    not change what it computes)."""
    return TrainConfig.from_dict(
        {
            "recipe": "toy_gan",
            "output_dir": str(out),
            "model": {"hidden": 16, "num_points": 256},
            "steps": STEPS,
            "batch_size": 32,
            "lr": 2e-3,
            "warmup_steps": 2,
            "ema_decay": 0.9,
            "checkpoint_every": checkpoint_every,
            "keep_checkpoints": 2,
            "sample_every": 1000,
            "log_every": 1,
            "seed": 11,
        }
    )


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "generator.safetensors")


def _saves(root: Path) -> set[str]:
    """The save directories in progress (or left by a killed save)."""
    try:
        return {p.name for p in root.iterdir() if p.name.startswith(".step-")}
    except FileNotFoundError:  # (no checkpoint yet, or one vanished while listing)
        return set()


def _wait_for_saves(process, root: Path, before: set[str], count: int, timeout: float = 60):
    """Until the ``count``-th save of this process (one whose directory was not there before it) has begun."""
    seen, deadline = set(), time.monotonic() + timeout
    while process.is_alive() and len(seen) < count and time.monotonic() < deadline:
        seen |= _saves(root) - before
        time.sleep(0.0005)


def test_sigkill_at_random_moments_always_resumes_from_a_complete_checkpoint(tmp_path):
    ctx = _context()
    reference = _start(ctx, _config(tmp_path / "reference", checkpoint_every=STEPS))
    reference.join(120)
    assert reference.exitcode == 0

    out = tmp_path / "killed"
    cfg, store, rng = _config(out), CheckpointStore(out / "checkpoints"), random.Random(20)
    kills, in_save, newest = 0, 0, 0
    while kills < KILLS:
        before = _saves(out / "checkpoints")
        process = _start(ctx, cfg)
        moment = rng.random()
        if moment < 0.15:  # while it starts up and resumes
            time.sleep(rng.uniform(0, 0.3))
        else:  # inside (mostly) or just after the 1st, 2nd or 3rd save of this process
            _wait_for_saves(process, out / "checkpoints", before, rng.randint(1, 3))
            time.sleep(rng.uniform(0, 0.03 if moment < 0.8 else 0.1))
        if not process.is_alive():  # the run got to its end before the kill
            break
        in_save += bool(_saves(out / "checkpoints") - before)
        process.kill()  # SIGKILL
        process.join()
        assert process.exitcode == -signal.SIGKILL
        kills += 1
        for path in (out / "checkpoints").glob("step-*"):  # a final name always means a complete checkpoint
            assert store.manifest(path) is not None, f"kill {kills} left an incomplete {path.name}"
        latest = store.latest()
        step = CheckpointStore.step_of(latest) if latest is not None else 0
        assert step >= newest, "the newest complete checkpoint went back"
        newest = step

    assert kills == KILLS and in_save >= KILLS // 4 and newest >= 10, (kills, in_save, newest)
    process = _start(ctx, _config(out, checkpoint_every=STEPS))  # and one last time, to the end
    process.join(120)
    assert process.exitcode == 0
    a, b = _weights(tmp_path / "reference" / "export"), _weights(out / "export")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log == [json.loads(line) for line in (tmp_path / "reference" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, STEPS + 1))
