"""The IP-Adapter's per-step adapter: image tokens for each guidance branch (spec §8.2).

The released guidance pair is (text + image embedding) vs (zero text + zero-image embedding): ``cond`` reads the
tokens of the (mixed) image embedding, ``uncond`` those of the all-zero normalised image's embedding, both at the
same ``image_weight``. The adapter can also replace a branch's text (``text``): with ``"zeros"`` the branch gets an
all-zero context and mask shaped like the encoded prompt (the released IP pipeline's empty / unconditional text:
with the official hard mask, cross-attention and pooling then add exactly 0), or given (context, mask) tensors
(nano's null context, which its adapter was trained with).

**Early boost.** ``boost`` multiplies the image weight in the first ``boost_steps`` steps of the run (counted by a
:class:`~.steps.StepClock`), the noisy ones in which the picture's shapes and layout form. An adapter trained on
the ε loss learns least where the noise is heaviest (there the loss hardly depends on the condition), so its
tokens carry less of a small object's shape there than the words would; a stronger image prompt for those steps
only makes up for it without over-steering the later, detail-forming ones (docs/ip_adapter.md measures it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .conditioning import _move
from .steps import StepClock, check_fraction

TEXT_MODES = ("zeros", "null")


def _check_weight(name: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")


def check_image_prompt(image_weight=1.0, early_boost=None, early_fraction=None):
    """The rules of an image prompt's settings, in one place (a request's fields, an adapter's recorded
    ``sampling``): weights finite and ≥ 0, the fraction in [0, 1]; ``None`` early settings are not given."""
    _check_weight("image_weight", image_weight)
    if early_boost is not None:
        _check_weight("early_boost", early_boost)
    if early_fraction is not None:
        check_fraction("early_fraction", early_fraction)


def mix_embeddings(embeddings: torch.Tensor, weights, rule: str = "sum") -> torch.Tensor:
    """Mix K image embeddings (K, D) with K weights → (1, D).

    ``sum``: Σ wᵢ·eᵢ, the released rule (unnormalised embeddings; weights (1, 0) give e₁ exactly);
    ``mean``: each embedding scaled to unit length, Σ wᵢ·ê / Σ wᵢ, rescaled to Σ wᵢ‖eᵢ‖ / Σ wᵢ — a weighted mean of
    directions at the weighted mean norm, so weights that do not sum to 1 do not change the embedding's scale.
    """
    w = torch.as_tensor(weights, dtype=torch.float32, device=embeddings.device)
    e = embeddings.float()
    if w.ndim != 1 or w.shape[0] != e.shape[0]:
        raise ValueError(f"{w.numel()} weights for {e.shape[0]} images: give one weight per image")
    if rule == "sum":
        return (w[:, None] * e).sum(0, keepdim=True)
    if rule == "mean":
        total = w.sum()
        if total <= 0:
            raise ValueError("the mean rule needs weights with a positive sum")
        norms = e.norm(dim=-1, keepdim=True)
        direction = (w[:, None] * e / norms.clamp(min=1e-12)).sum(0, keepdim=True) / total
        scale = (w[:, None] * norms).sum() / total
        return direction / direction.norm().clamp(min=1e-12) * scale
    raise ValueError(f"unknown mixing rule {rule!r}: sum (released) or mean")


@dataclass
class ImagePrompt:
    """``image_tokens`` (B, N, C) for ``cond``, ``uncond_tokens`` for ``uncond``, ``weight`` (B,) for both; ``text``
    maps a branch to ``"zeros"`` (all-zero context and mask), a null embedding (D,) (the null context: that vector
    at position 0, the only attended one) or a (context, mask) pair, which replaces the branch's text inputs.
    ``module``: the IP-Adapter whose layers the U-Net borrows; it is moved with the tokens (offload). ``boost``:
    the image weight's factor for the first ``boost_steps`` steps (1: the same weight at every step, as released)."""

    tokens: torch.Tensor
    uncond_tokens: torch.Tensor
    weight: torch.Tensor
    text: dict = field(default_factory=dict)
    module: torch.nn.Module | None = None
    boost: float = 1.0
    boost_steps: int = 0
    clock: StepClock = field(default_factory=StepClock, repr=False)

    def bind(self, conditioning) -> "ImagePrompt":
        """Resolve the text replacements against the encoded prompt's shape (called once by the Denoiser)."""
        text = {}
        like = conditioning.context
        for branch, value in self.text.items():
            if isinstance(value, str) and value == "zeros":
                value = (torch.zeros_like(like), torch.zeros(like.shape[:2], dtype=torch.long, device=like.device))
            elif torch.is_tensor(value):  # a null embedding → the null context
                context = torch.zeros_like(like)
                context[:, 0] = value.to(like)
                mask = torch.zeros(like.shape[:2], dtype=torch.long, device=like.device)
                mask[:, 0] = 1
                value = (context, mask)
            text[branch] = value
        return replace(self, text=text, clock=StepClock())

    def __call__(self, x_t, t, branch: str) -> dict:
        weight = self.weight
        if self.boost != 1.0 and self.boost_steps > 0 and self.clock.tick(t) < self.boost_steps:
            weight = weight * self.boost
        out = {"image_tokens": self.tokens if branch == "cond" else self.uncond_tokens, "image_weight": weight}
        if branch in self.text:
            context, mask = self.text[branch]
            out.update(context=context, context_mask=mask)
        return out

    def to(self, device, dtype) -> "ImagePrompt":
        text = {b: v if isinstance(v, str) else _move(v, device, dtype) for b, v in self.text.items()}
        if self.module is not None:
            self.module.to(device=device, dtype=dtype)
        return replace(
            self,
            tokens=_move(self.tokens, device, dtype),
            uncond_tokens=_move(self.uncond_tokens, device, dtype),
            weight=_move(self.weight, device, dtype),
            text=text,
            clock=StepClock(),
        )
