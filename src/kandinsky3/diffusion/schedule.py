"""Beta schedules, ᾱ, forward noising and ε ↔ x0 conversions (spec §4.1)."""

from __future__ import annotations

import math

import torch


def cosine_betas(num_timesteps: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    """β_i = min(1 − ā((i+1)/T)/ā(i/T), 0.999), ā(u) = cos²(((u+0.008)/1.008)·π/2); diffusers' squaredcos_cap_v2."""

    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), max_beta) for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float32)


def linear_betas(num_timesteps: int = 1000) -> torch.Tensor:
    scale = 1000 / num_timesteps
    return torch.linspace(1e-4 * scale, 0.02 * scale, num_timesteps, dtype=torch.float64).float()


class NoiseSchedule:
    """ᾱ_t and the conversions that use it. ε-prediction; latents are not rescaled."""

    def __init__(self, betas: torch.Tensor):
        self.betas = betas.float()
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # float32, as the official code
        self._tables: dict[torch.device, torch.Tensor] = {}  # ᾱ on each device per-sample timesteps live on

    @classmethod
    def named(cls, name: str = "cosine", num_timesteps: int = 1000) -> "NoiseSchedule":
        makers = {"cosine": cosine_betas, "linear": linear_betas}
        if name not in makers:
            raise ValueError(f"unknown beta schedule {name!r}; choose one of {sorted(makers)}")
        return cls(makers[name](num_timesteps))

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def abar(self, t, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t broadcast to ``like``'s rank (t: int or (B,) tensor).

        One timestep (sampling) gives a 0-dim float32 CPU tensor, which ops on CUDA tensors take as a scalar: no
        host-to-device copy, so no stream sync in the sampler loop (a blocking copy of even 4 bytes waits for every
        kernel queued before it). Per-sample timesteps (training) are gathered on their own device."""
        if isinstance(t, torch.Tensor) and t.ndim:
            a = self.abar_per_sample(t).to(like.device)
            return a.reshape(-1, *([1] * (like.ndim - 1)))
        return self.alphas_cumprod[int(t)]

    def abar_per_sample(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ of (B,) timesteps as a (B,) float32 tensor on their device (the table is copied there once)."""
        return self._table(t.device)[t.long()]

    def _table(self, device: torch.device) -> torch.Tensor:
        if device not in self._tables:
            self._tables[device] = self.alphas_cumprod.to(device)
        return self._tables[device]

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        a = self.abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def x0_from_eps(self, x_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        a = self.abar(t, x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def eps_from_x0(self, x_t: torch.Tensor, t, x0: torch.Tensor) -> torch.Tensor:
        a = self.abar(t, x_t)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def dynamic_threshold(x0: torch.Tensor, percentile: float) -> torch.Tensor:
    """s = max(quantile(|x0|, p) per sample, 1); x0 → clip(x0, −s, s)/s (the official ``process_x_start``)."""
    flat = x0.reshape(x0.shape[0], -1).abs().float()
    s = torch.quantile(flat, percentile, dim=1).clamp(min=1.0).to(x0.dtype)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s
