"""What a recipe and the loop exchange each step (docs/training.md, "The training step protocol").

- :class:`OptimizerSpec` — one named optimizer: which of the recipe's parameter groups it steps, its learning rate,
  betas, weight decay.
- :class:`RandomStreams` — the run's random numbers as explicit ``torch.Generator`` s (one on the CPU, one on the
  accelerator when training there), checkpointed with the run.
- :class:`StepContext` — what the loop hands a recipe's ``prepare`` and ``step``: the step number and the streams.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class OptimizerSpec:
    """AdamW over the named parameter ``groups`` (keys of ``Recipe.parameter_groups()``)."""

    groups: tuple[str, ...]
    lr: float
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    eps: float = 1e-8


class RandomStreams:
    """The run's random stream: a CPU generator seeded with the config's ``seed`` (model initialisation draws from
    it through ``models.seeding.drawing_from``, then the data order and every draw of a step), and a generator on
    the training device when that is not the CPU (noise drawn there). Under several processes each rank continues
    from its own seed after initialisation (``fork_for_rank``), so ranks draw different noise."""

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        device = torch.device(device)
        self.seed = seed
        self.cpu = torch.Generator().manual_seed(seed)
        self.accelerator = None if device.type == "cpu" else torch.Generator(device).manual_seed(seed)

    def on(self, device: torch.device | str) -> torch.Generator:
        """The generator for draws made on ``device``."""
        if torch.device(device).type == "cpu" or self.accelerator is None:
            return self.cpu
        return self.accelerator

    def fork_for_rank(self, rank: int):
        if rank:
            seed = (self.seed * 1_000_003 + rank) % 2**63
            self.cpu.manual_seed(seed)
            if self.accelerator is not None:
                self.accelerator.manual_seed(seed)

    def state_dict(self) -> dict:
        return {
            "cpu": self.cpu.get_state(),
            "accelerator": None if self.accelerator is None else self.accelerator.get_state(),
        }

    def load_state_dict(self, state: dict):
        self.cpu.set_state(state["cpu"])
        if self.accelerator is not None and state.get("accelerator") is not None:
            self.accelerator.set_state(state["accelerator"])


@dataclass
class StepContext:
    """``step``: the 1-based number of the step being computed (a pure function of it is safe across resumes);
    ``rng``: the run's streams — draw with ``generator=ctx.generator(device)``, never from the global RNG;
    ``metrics``: scalars a step records beside its losses (:meth:`record`; logged, never back-propagated)."""

    step: int
    rng: RandomStreams
    metrics: dict[str, float] = field(default_factory=dict)

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        return self.rng.on(device)

    def record(self, name: str, value) -> None:
        """Log ``value`` (a number or a one-element tensor) under ``metrics.name`` in the run's log.jsonl."""
        self.metrics[name] = float(value.detach().float().item() if torch.is_tensor(value) else value)
