"""Foils: scenes that differ from a scene in exactly one attribute (an object's colour, shape, size or position, or
the background), for contrastive hard negatives and zero-shot caption retrieval."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from .captions import caption_scene
from .dataset import world_sample
from .scene import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Scene

ATTRIBUTES = ("color", "shape", "size", "position", "background")


def foil_scene(scene: Scene, rng: random.Random, attribute: str | None = None) -> tuple[Scene, str]:
    """A valid scene (distinct object colours and cells, background unlike every object) that differs from
    ``scene`` in one attribute → (foil, the attribute changed)."""
    attribute = attribute or rng.choice(ATTRIBUTES)
    objects = list(scene.objects)
    if attribute == "background":
        used = {o.color for o in objects} | {scene.background}
        return replace(scene, background=rng.choice([b for b in BACKGROUNDS if b not in used])), attribute
    i = rng.randrange(len(objects))
    obj = objects[i]
    if attribute == "color":
        used = {o.color for o in objects} | {scene.background}
        objects[i] = replace(obj, color=rng.choice([c for c in COLORS if c not in used]))
    elif attribute == "shape":
        objects[i] = replace(obj, shape=rng.choice([s for s in SHAPES if s != obj.shape]))
    elif attribute == "size":
        objects[i] = replace(obj, size=next(s for s in SIZES if s != obj.size))
    elif attribute == "position":
        used = {o.position for o in objects}
        objects[i] = replace(obj, position=rng.choice([p for p in POSITIONS if p not in used]))
    else:
        raise ValueError(f"unknown attribute {attribute!r}; one of {ATTRIBUTES}")
    return replace(scene, objects=tuple(objects)), attribute


def foil_captions(scene: Scene, rng: random.Random, k: int) -> list[tuple[str, str]]:
    """``k`` complete captions of distinct one-attribute foils of ``scene`` → [(caption, attribute)]."""
    out, seen = [], {scene}
    for _ in range(100 * k):
        foil, attribute = foil_scene(scene, rng)
        if foil in seen:
            continue
        seen.add(foil)
        out.append((caption_scene(foil, rng, complete=True), attribute))
        if len(out) == k:
            break
    return out


@dataclass
class RetrievalReport:
    """Zero-shot caption retrieval: how often the true caption ranks first among it and its foils."""

    scenes: int
    foils: int
    top1: float
    by_attribute: dict[str, float]  # per changed attribute: how often the true caption beat that foil

    def to_dict(self) -> dict:
        return asdict(self)


def retrieval_scenes(num: int, split: str = "test", size: int = 64, foils: int = 7, seed: int = 0):
    """``num`` renders of ``split`` with their complete caption and ``foils`` one-attribute foil captions →
    [(image, true caption, [(foil caption, attribute)])], the same on every machine."""
    out = []
    for i in range(num):
        s = world_sample(i, split, size)
        rng = random.Random(seed * 1_000_003 + i)
        out.append((s.image, caption_scene(s.scene, rng, complete=True), foil_captions(s.scene, rng, foils)))
    return out


@torch.no_grad()
def retrieval_accuracy(
    embed_images: Callable, embed_texts: Callable, num: int, split: str = "test", size: int = 64, foils: int = 7
) -> RetrievalReport:
    """Rank the true caption of each of ``num`` renders against ``foils`` one-attribute foils by cosine similarity
    (``embed_images(list of PIL) → (N, D)``, ``embed_texts(list of str) → (M, D)``, any norm)."""
    items = retrieval_scenes(num, split, size, foils)
    wins, beats = 0, {}
    for chunk in range(0, len(items), 50):
        part = items[chunk : chunk + 50]
        img = torch.nn.functional.normalize(embed_images([im for im, _, _ in part]).float(), dim=-1)
        texts = [t for _, true, fs in part for t in [true] + [c for c, _ in fs]]
        txt = torch.nn.functional.normalize(embed_texts(texts).float(), dim=-1).view(len(part), -1, img.shape[-1])
        sims = torch.einsum("nd,nkd->nk", img, txt)
        for row, (_, _, fs) in zip(sims, part):
            wins += int(row[0] > row[1:].max())
            for (_, attribute), sim in zip(fs, row[1:]):
                beats.setdefault(attribute, []).append(bool(row[0] > sim))
    by = {a: sum(v) / len(v) for a, v in sorted(beats.items())}
    return RetrievalReport(len(items), foils, wins / max(1, len(items)), by)


SHAPE_PROMPTS = tuple(f"a {shape}" for shape in SHAPES)  # context-free prompts, in SHAPES order (the clip recipe's too)


def shape_prompt_accuracy(embed_images: Callable, embed_texts: Callable, num: int, split: str = "val", size: int = 64):
    """Zero-shot shape of ``num`` one-object renders from the prompts "a <shape>": a context-free prompt is one fixed
    vector, so this is how well one linear map reads shape from the image embedding (what the IP-Adapter's linear
    projection has to do; the one-attribute foils only test shape within a caption's context)."""
    samples = [world_sample(i, split, size, num_objects=1) for i in range(num)]
    prompts = torch.nn.functional.normalize(embed_texts(list(SHAPE_PROMPTS)).float(), dim=-1)
    right = 0
    for chunk in range(0, num, 100):
        part = samples[chunk : chunk + 100]
        img = torch.nn.functional.normalize(embed_images([s.image for s in part]).float(), dim=-1)
        guess = (img @ prompts.T).argmax(dim=1).tolist()
        right += sum(SHAPES[g] == s.scene.objects[0].shape for g, s in zip(guess, part))
    return right / max(1, num)
