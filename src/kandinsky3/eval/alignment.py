"""Text→image alignment on the shapes world: generate from held-out captions, let the judge read the images."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..world import HELD_OUT_PAIRS, judge, world_sample
from ..world.judge import CORE_ATTRIBUTES as ATTRIBUTES
from ..world.judge import Verdict


@dataclass
class AlignmentReport:
    guidance: float
    steps: int
    misses: dict = field(default_factory=dict)  # group → {attribute: objects whose stated attribute is wrong, objects}
    aligned: list = field(default_factory=list)  # (group, 0 | 1) per caption, in order: for paired comparisons
    sampler: str = "k3"

    @property
    def counts(self) -> dict:
        """group → (aligned captions, captions)."""
        counts = {}
        for group, ok in self.aligned:
            a, n = counts.get(group, (0, 0))
            counts[group] = (a + ok, n + 1)
        return counts

    def add(self, group: str, verdict: Verdict):
        self.aligned.append((group, int(verdict.aligned)))
        misses = self.misses.setdefault(group, dict.fromkeys((*ATTRIBUTES, "objects"), 0))
        for obj in verdict.objects:
            misses["objects"] += 1
            for attribute in ATTRIBUTES:
                misses[attribute] += getattr(obj, attribute) is False

    def rate(self, group: str) -> float:
        a, n = self.counts.get(group, (0, 0))
        return a / n if n else float("nan")

    def table(self) -> str:
        """Aligned captions per group, and which stated attributes were wrong (as a share of the group's objects)."""
        lines = [
            f"{self.sampler} sampler, guidance {self.guidance}, {self.steps} steps",
            f"{'captions':<28}{'aligned':>10}{'n':>6}   wrong per object: colour / shape / position",
        ]
        counts = self.counts
        for group in sorted(counts):
            a, n = counts[group]
            m = self.misses.get(group, {})
            wrong = " / ".join(f"{m[k] / m['objects']:.1%}" for k in ATTRIBUTES) if m.get("objects") else "-"
            lines.append(f"{group:<28}{a / n:>10.1%}{n:>6}   {wrong}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        counts = self.counts
        return {
            "guidance": self.guidance,
            "steps": self.steps,
            "sampler": self.sampler,
            "rates": {g: a / n for g, (a, n) in counts.items()},
            "counts": counts,
            "misses": self.misses,
            "aligned": self.aligned,
        }


MULTI_OBJECT = ("2 objects", "3 objects", "held-out pairs")


def paired_comparison(a: AlignmentReport, b: AlignmentReport, groups=MULTI_OBJECT) -> tuple[int, int, float]:
    """Two settings on the same captions and seeds: (captions right only under ``a``, right only under ``b``, exact
    two-sided McNemar p-value). Pairing removes the captions both get right or wrong, so a few points of
    difference between rates can be told from noise."""
    import math

    if [g for g, _ in a.aligned] != [g for g, _ in b.aligned]:
        raise ValueError("paired comparison needs the same captions in the same order (same --num / --held-out)")
    pairs = [(x, y) for (g, x), (_, y) in zip(a.aligned, b.aligned) if g in groups]
    only_a = sum(x > y for x, y in pairs)
    only_b = sum(y > x for x, y in pairs)
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n if n else 0.5
    return only_a, only_b, min(1.0, 2 * tail)


def object_count_group(sample) -> str:
    """The report group of a sample: ``1 object``, ``2 objects``, ..."""
    n = len(sample.scene.objects)
    return f"{n} object{'s' if n > 1 else ''}"


def alignment_captions(num: int, split: str = "val"):
    """``num`` scenes with complete captions, a third each of 1, 2 and 3 objects... weighted to 1 and 2 objects."""
    samples = []
    for i in range(num):
        n = (1, 2, 1, 2, 3)[i % 5]
        samples.append(world_sample(i, split, num_objects=n, complete_caption=True))
    return samples


def evaluate_alignment(
    pipe,
    num: int = 500,
    guidance: float | None = None,
    steps: int | None = None,
    batch: int = 25,
    seed: int = 0,
    split: str = "val",
    held_out: int | None = None,
    progress: bool = True,
    sampler: str | None = None,
) -> AlignmentReport:
    """Alignment = every stated colour, shape and position holds in the judge's reading of the image.

    Groups: ``1 object``, ``2 objects``, ``3 objects`` on ``split`` captions, and ``held-out pairs`` on captions
    whose scene contains a colour+shape pair never seen in training (``held_out`` of them, default num // 5).
    """
    from tqdm.auto import tqdm

    from ..requests import TextToImage

    samples = [(s, object_count_group(s)) for s in alignment_captions(num, split)]
    samples += [
        (s, "held-out pairs") for s in alignment_captions(held_out if held_out is not None else num // 5, "held_out")
    ]
    settings = TextToImage(guidance=guidance, steps=steps, sampler=sampler).resolve(pipe.variant)
    report = AlignmentReport(settings.guidance, settings.steps, sampler=settings.sampler)
    bar = tqdm(total=len(samples), desc=f"alignment (guidance {settings.guidance})", disable=not progress)
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        images = pipe.generate(
            [s.caption for s, _ in chunk],
            seed=seed + start,
            guidance=settings.guidance,
            steps=settings.steps,
            sampler=settings.sampler,
            progress=False,
        )
        for (sample, group), image in zip(chunk, images):
            report.add(group, judge(image, sample.caption))
        bar.update(len(chunk))
    bar.close()
    return report


@torch.no_grad()
def reconstruction_alignment(
    movq, num: int = 500, latent_noise: float = 0.0, seed: int = 0, split: str = "val", batch: int = 50
) -> AlignmentReport:
    """The judge on MoVQ round trips of the alignment captions' own renders: the ceiling the autoencoder puts on
    text→image alignment (a decoder that rounds small squares into blobs caps every U-Net). ``latent_noise``
    adds N(0, σ²) to the latents first — how fragile decoding is to a denoiser's small errors."""
    from ..images import pil_to_tensor, tensor_to_pil

    samples = alignment_captions(num, split)
    p = next(movq.parameters())
    gen = torch.Generator().manual_seed(seed)
    report = AlignmentReport(guidance=float("nan"), steps=0)
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        z = movq.encode(torch.cat([pil_to_tensor(s.image) for s in chunk]).to(p.device, p.dtype))
        if latent_noise:
            z = z + latent_noise * torch.randn(z.shape, generator=gen).to(z)
        for sample, image in zip(chunk, tensor_to_pil(movq.decode(z).float())):
            report.add(object_count_group(sample), judge(image, sample.caption))
    return report


__all__ = ["HELD_OUT_PAIRS", "AlignmentReport", "evaluate_alignment", "reconstruction_alignment"]
