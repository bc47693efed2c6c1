"""A scene-prompt vocabulary (objects with colour, size and position on a background) and its parser.

The shapes world's captions are one instance (``world.captions.WORLD_VOCABULARY``); the template beautifier takes
a vocabulary as data (the nano model ships its own as ``vocabulary.json``), so inference never imports the world.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Stated:
    """What a caption says of one object; None = left unsaid."""

    color: str | None
    shape: str | None
    size: str | None
    position: str | None


@dataclass(frozen=True)
class ParsedCaption:
    objects: tuple[Stated, ...]
    background: str | None


@dataclass(frozen=True)
class SceneVocabulary:
    """The words of scene prompts; lists keep their order (the template beautifier draws from them by index)."""

    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    backgrounds: tuple[str, ...]
    sizes: dict[str, tuple[str, ...]]  # canonical size → the words that say it
    positions: dict[str, tuple[str, ...]]  # canonical position → the phrases that say it (the first is canonical)
    excluded: frozenset[tuple[str, str]] = field(default_factory=frozenset)  # (colour, shape) never drawn

    def to_dict(self) -> dict:
        return {
            "shapes": list(self.shapes),
            "colors": list(self.colors),
            "backgrounds": list(self.backgrounds),
            "sizes": {k: list(v) for k, v in self.sizes.items()},
            "positions": {k: list(v) for k, v in self.positions.items()},
            "excluded": sorted(list(pair) for pair in self.excluded),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SceneVocabulary":
        known = {"shapes", "colors", "backgrounds", "sizes", "positions", "excluded"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown vocabulary keys {unknown}: expected {sorted(known)}")
        return cls(
            shapes=tuple(data["shapes"]),
            colors=tuple(data["colors"]),
            backgrounds=tuple(data["backgrounds"]),
            sizes={k: tuple(v) for k, v in data["sizes"].items()},
            positions={k: tuple(v) for k, v in data["positions"].items()},
            excluded=frozenset(tuple(pair) for pair in data.get("excluded", ())),
        )

    @classmethod
    def load(cls, path: str | Path) -> "SceneVocabulary":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def parse(self, text: str) -> ParsedCaption:
        """The stated attributes of a prompt: objects are the chunks between "and"/commas that name a shape."""
        size_words = {w: s for s, words in self.sizes.items() for w in words}
        position_phrases = sorted(
            ((p, pos) for pos, phrases in self.positions.items() for p in phrases), key=lambda x: -len(x[0])
        )
        text = " " + text.lower().replace(",", " , ") + " "
        background = None
        m = re.search(r"(?:on an?|with an?|over an?|,)\s+(\w+)\s+background", text)
        if m and m.group(1) in self.backgrounds:
            background = m.group(1)
            text = text[: m.start()] + " " + text[m.end() :]
        objects = []
        for chunk in re.split(r"\s(?:and|,)\s", text):
            words = chunk.split()
            shape = next((w for w in words if w in self.shapes), None)
            if shape is None:
                continue
            color = next((w for w in words if w in self.colors), None)
            size = next((size_words[w] for w in words if w in size_words), None)
            position = next((pos for phrase, pos in position_phrases if f" {phrase} " in f" {chunk} "), None)
            objects.append(Stated(color, shape, size, position))
        return ParsedCaption(tuple(objects), background)
