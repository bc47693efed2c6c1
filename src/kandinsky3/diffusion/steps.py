"""Which step of a run is it? For per-step adapters whose effect depends on the step index (the ControlNet's
control window, the IP-Adapter's early image boost).

An adapter is called with (x_t, t, branch) only, so it counts steps itself (:class:`StepClock`): a step is a new
timestep value (``t`` differs from the last call's). Both guidance branches of one step share their t, so guided
and unguided runs count alike, and so does any sampler that calls the denoiser once per timestep (k3, Flash, the
diffusers schedulers); the count does not depend on the timestep values, so partial (image→image) runs and
Flash's re-noised timesteps are counted the same way. A window ``[start, end)`` of an N-step run is the step
indices ``int(N·start) ≤ i < int(N·end)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .sampling import flash_timesteps, official_timesteps, partial_steps


def run_length(sampler: str, steps: int, strength: float = 1.0) -> int:
    """N: how many denoiser calls (steps) a run of ``sampler`` makes — all ``steps``, or the part an image→image
    run at ``strength`` keeps (k3 and the diffusers schedulers: ``max(1, int(steps·strength))``; Flash: its
    timesteps below ``strength·1000``). k3 makes one call per gap of its official timesteps, which is one fewer
    than ``steps`` where the stride does not divide 1000 evenly (60 steps: stride 17, 59 calls)."""
    if sampler == "k3":
        calls = len(official_timesteps(steps)) - 1
        return calls if strength >= 1.0 else min(calls, partial_steps(steps, strength))
    if strength >= 1.0:
        return steps
    if sampler == "flash":
        return len([t for t in flash_timesteps(steps) if t < strength * 1000]) or 1
    return partial_steps(steps, strength)


def check_fraction(name: str, value):
    """A fraction of a run's steps (a window's start / end, the early boost's share) is a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a fraction of the steps in [0, 1], got {value!r}")


def steps_in(steps: int, fraction: float) -> int:
    """int(N·fraction), robust to the float product landing just under a whole number (50 · 0.58 = 28.999…)."""
    return math.floor(steps * fraction + 1e-9)


def step_window(steps: int, start: float, end: float) -> range:
    """The step indices ``[int(N·start), int(N·end))`` of an N-step run."""
    return range(steps_in(steps, start), steps_in(steps, end))


@dataclass
class StepClock:
    """Counts the steps of one run from the timesteps it is shown; a fresh clock starts before step 0."""

    step: int = -1
    last_t: float | None = None

    def tick(self, t) -> int:
        """The index of the step ``t`` belongs to (a new value of t starts the next step). A number is read as it
        is; a tensor's first value is read from its device (a sync on a GPU: samplers here pass numbers)."""
        value = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)
        if value != self.last_t:
            self.step, self.last_t = self.step + 1, value
        return self.step


__all__ = ["StepClock", "check_fraction", "run_length", "step_window", "steps_in"]
