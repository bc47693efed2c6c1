"""One typed settings object shared by the Python API, the CLI and the PNG metadata."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .registry import Variant

SAMPLERS = ("k3", "flash", "ddpm", "ddim", "dpm++", "euler")


@dataclass(frozen=True)
class GenerationSettings:
    """``None`` means "the variant's default" (see :meth:`resolve`)."""

    steps: int | None = None
    guidance: float | None = None  # w: ε = (w+1)·ε_cond − w·ε_uncond; 0 disables guidance
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    seed: int | None = None
    sampler: str | None = None  # k3 (official), flash, or a diffusers scheduler: ddpm, ddim, dpm++, euler
    eta: float | None = None
    threshold_percentile: float | None = None
    strength: float = 1.0  # image→image: how much of the schedule is run (1 = from pure noise)

    def resolve(self, variant: Variant) -> "GenerationSettings":
        d = variant.sampler
        sampler = self.sampler or d.kind
        default_guidance = 0.0 if sampler == "flash" else (d.guidance if d.kind != "flash" else 3.0)
        out = replace(
            self,
            steps=self.steps if self.steps is not None else (d.steps if sampler == d.kind else
                                                             (4 if sampler == "flash" else 50)),
            guidance=self.guidance if self.guidance is not None else default_guidance,
            width=self.width or variant.size,
            height=self.height or variant.size,
            sampler=sampler,
            eta=self.eta if self.eta is not None else d.eta,
            threshold_percentile=self.threshold_percentile if self.threshold_percentile is not None
            else d.threshold_percentile,
        )
        out.validate()
        return out

    def validate(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {self.num_images}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if self.guidance is not None and self.guidance < 0:
            raise ValueError(f"guidance must be ≥ 0, got {self.guidance}")

    def to_dict(self) -> dict:
        return asdict(self)
