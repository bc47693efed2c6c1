"""The scene vocabulary as data: the world's words, the file nano ships, and a template beautifier fed another one."""

import random

import pytest

from kandinsky3.prompts import TemplateBeautifier
from kandinsky3.registry import NANO_DIR
from kandinsky3.vocabulary import SceneVocabulary
from kandinsky3.world import caption_scene
from kandinsky3.world.captions import WORLD_VOCABULARY
from kandinsky3.world.scene import sample_scene


def test_the_shipped_vocabulary_is_the_worlds():
    shipped = SceneVocabulary.load(NANO_DIR / "vocabulary.json")
    assert shipped == WORLD_VOCABULARY
    assert SceneVocabulary.from_dict(shipped.to_dict()) == shipped


def test_parse_reads_back_every_stated_attribute_of_world_captions():
    rng = random.Random(0)
    for _ in range(200):
        scene = sample_scene(rng)
        parsed = WORLD_VOCABULARY.parse(caption_scene(scene, rng, complete=True))
        assert parsed.background == scene.background
        assert [(o.color, o.shape, o.size, o.position) for o in parsed.objects] == [
            (o.color, o.shape, o.size, o.position) for o in scene.objects
        ]


def test_template_beautifier_takes_any_vocabulary():
    animals = SceneVocabulary(
        shapes=("cat", "dog"),
        colors=("ginger", "black"),
        backgrounds=("grass", "sand"),
        sizes={"tiny": ("tiny",), "huge": ("huge", "giant")},
        positions={"left": ("on the left",), "right": ("on the right",)},
        excluded=frozenset({("ginger", "dog")}),
    )
    beautifier = TemplateBeautifier(animals)
    out = beautifier.expand("a giant dog and a cat")
    parsed = animals.parse(out)
    assert [o.shape for o in parsed.objects] == ["dog", "cat"]
    assert parsed.objects[0].size == "huge" and parsed.objects[0].color == "black"  # ginger dogs are excluded
    assert {o.position for o in parsed.objects} == {"left", "right"} and parsed.background in ("grass", "sand")
    assert beautifier.expand("a red circle") == "a red circle"  # nothing of this vocabulary: left alone
    assert TemplateBeautifier().expand("a red circle").startswith("a ")  # the default: nano's (world) words


def test_unknown_vocabulary_keys_are_named():
    data = WORLD_VOCABULARY.to_dict() | {"colours": []}
    with pytest.raises(ValueError, match="colours"):
        SceneVocabulary.from_dict(data)
