"""Captions in varied English phrasings, and the parser that reads them back into stated attributes."""

from __future__ import annotations

import random
import re

from ..vocabulary import ParsedCaption, SceneVocabulary, Stated
from .scene import BACKGROUNDS, COLORS, HELD_OUT_PAIRS, POSITIONS, SHAPES, SIZES, Scene, WorldObject

POSITION_PHRASES = {
    "top left": ["in the top left", "at the top left", "in the top left corner"],
    "top": ["at the top", "in the top middle"],
    "top right": ["in the top right", "at the top right", "in the top right corner"],
    "left": ["on the left", "at the left"],
    "center": ["in the center", "in the middle"],
    "right": ["on the right", "at the right"],
    "bottom left": ["in the bottom left", "at the bottom left", "in the bottom left corner"],
    "bottom": ["at the bottom", "in the bottom middle"],
    "bottom right": ["in the bottom right", "at the bottom right", "in the bottom right corner"],
}
SIZE_WORDS = {"small": ["small", "little"], "large": ["large", "big"]}
OPENERS = ["", "", "", "a picture of ", "an image of ", "there is "]
BACKGROUND_TEMPLATES = ["on a {} background", ", {} background", "with a {} background", "over a {} background"]


def describe_object(obj: WorldObject, rng: random.Random, p_size: float, p_position: float, p_color: float) -> str:
    words = ["a"]
    if rng.random() < p_size:
        words.append(rng.choice(SIZE_WORDS[obj.size]))
    if rng.random() < p_color:
        words.append(obj.color)
    words.append(obj.shape)
    if words[1][0] in "aeiou":
        words[0] = "an"
    phrase = " ".join(words)
    if rng.random() < p_position:
        phrase += " " + rng.choice(POSITION_PHRASES[obj.position])
    return phrase


def caption_scene(
    scene: Scene,
    rng: random.Random,
    p_size: float = 0.6,
    p_position: float = 0.85,
    p_color: float = 0.92,
    p_background: float = 0.7,
    complete: bool = False,
) -> str:
    """A caption for ``scene``. ``complete=True`` states every colour, shape, position and the background."""
    if complete:
        p_size = p_position = p_color = p_background = 1.0
    parts = [describe_object(o, rng, p_size, p_position, p_color) for o in scene.objects]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    text = rng.choice(OPENERS) + text
    if rng.random() < p_background:
        template = rng.choice(BACKGROUND_TEMPLATES)
        text += ("" if template.startswith(",") else " ") + template.format(scene.background)
    return re.sub(r"\s+", " ", text).strip()


WORLD_VOCABULARY = SceneVocabulary(
    shapes=SHAPES,
    colors=tuple(COLORS),
    backgrounds=tuple(BACKGROUNDS),
    sizes={s: tuple(SIZE_WORDS[s]) for s in SIZES},
    positions={p: tuple(POSITION_PHRASES[p]) for p in POSITIONS},
    excluded=HELD_OUT_PAIRS,
)


def parse_caption(text: str) -> ParsedCaption:
    """Read back the stated attributes of a caption written by :func:`caption_scene` (or by hand, same words)."""
    return WORLD_VOCABULARY.parse(text)


def vocabulary() -> list[str]:
    """Every word a caption can contain (for the word-level tokenizer)."""
    words = set(COLORS) | set(BACKGROUNDS) | set(SHAPES) | set(SIZES) | {"a", "and", ",", "background"}
    for group in (POSITION_PHRASES.values(), SIZE_WORDS.values()):
        for phrases in group:
            for p in phrases:
                words.update(p.split())
    for t in OPENERS + BACKGROUND_TEMPLATES:
        words.update(t.replace("{}", " ").replace(",", " , ").split())
    words.update(POSITIONS[4].split())
    return sorted(words)


__all__ = ["ParsedCaption", "Stated", "WORLD_VOCABULARY", "caption_scene", "parse_caption", "vocabulary"]
