"""The controlnet recipe (issue #15): initialisation from the base U-Net's encoder, the base frozen, hints made as
``control()`` makes them, checkpoints + resume, export; and the eval's cases."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from kandinsky3.checkpoints.controlnet import load_controlnet
from kandinsky3.edges import extract_edges, image_to_unit
from kandinsky3.images import pil_to_tensor
from kandinsky3.registry import VARIANTS
from kandinsky3.training import TrainConfig, train
from kandinsky3.training.recipes import make_recipe
from kandinsky3.training.protocol import RandomStreams, StepContext
from kandinsky3.training.object_weighting import object_coverage
from kandinsky3.training.recipes.controlnet import hints_from_images, strip_positions
from kandinsky3.world import world_sample


def _config(out, **model) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "recipe": "controlnet",
            "output_dir": str(out),
            "model": {"base": "tiny", **model},
            "data": {"length": 8, "size": 64},
            "steps": 4,
            "batch_size": 2,
            "warmup_steps": 1,
            "checkpoint_every": 2,
            "sample_every": 1000,
            "log_every": 1,
            "seed": 0,
            "ema_decay": 0.9,
        }
    )


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a red circle in the top left on a gray background", "a red circle on a gray background"),
        ("a big blue star on the right and a green square at the bottom", "a big blue star and a green square"),
        (
            "there is a small white triangle in the middle, black background",
            "there is a small white triangle, black background",
        ),
        ("a purple star", "a purple star"),
    ],
)
def test_position_phrases_are_stripped(caption, expected):
    assert strip_positions(caption) == expected


def test_training_hints_are_the_inference_hints():
    """The recipe's hint of a render = what control() extracts from that render (8-bit soft edges)."""
    images = [world_sample(i, "val").image for i in range(3)]
    train_hints = hints_from_images(torch.cat([pil_to_tensor(im) for im in images]))
    assert train_hints.dtype == torch.uint8 and train_hints.shape == (3, 1, 64, 64)
    for im, hint in zip(images, train_hints):
        inference = image_to_unit(extract_edges(im))  # (1, 3, H, W), three equal channels
        assert torch.equal((inference[0, 0] * 255).round().to(torch.uint8), hint[0])


def test_recipe_starts_from_the_encoder_and_trains_only_the_controlnet(tmp_path):
    recipe = make_recipe(_config(tmp_path), "cpu")
    net = recipe.modules["controlnet"]
    unet = recipe.unet
    for name, value in net.state_dict().items():
        if name.startswith(("convs.", "input_hint_block.out")):
            assert torch.count_nonzero(value) == 0, name
        elif not name.startswith("input_hint_block."):
            assert torch.equal(value, unet.state_dict()[name]), name
    assert not any(p.requires_grad for p in unet.parameters())
    assert all(p.requires_grad for p in net.parameters())
    assert set(recipe.modules) == {"controlnet"}
    assert recipe.dataset.tensors["hint"].dtype == torch.uint8 and "image" not in recipe.dataset.tensors


def test_short_run_resumes_exactly_and_exports_a_loadable_controlnet(tmp_path):
    whole = train(_config(tmp_path / "whole"), progress=False)
    train(_config(tmp_path / "split"), max_steps=2, progress=False)
    resumed = train(_config(tmp_path / "split"), progress=False)
    assert whole["step"] == resumed["step"] == 4 and np.isfinite(whole["losses"]["loss"])
    a = load_controlnet(tmp_path / "whole" / "export", VARIANTS["tiny"].unet)
    b = load_controlnet(tmp_path / "split" / "export", VARIANTS["tiny"].unet)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert any(torch.count_nonzero(v) for k, v in a.state_dict().items() if k.startswith("convs."))  # it learnt


def test_object_coverage_is_the_share_of_each_latent_pixel_off_the_background():
    image = torch.full((2, 3, 32, 32), -0.2)  # gray
    image[0, :, 8:16, 0:8] = torch.tensor([0.9, -0.9, -0.9])[:, None, None]  # a red square on latent pixel (1, 0)
    image[0, :, 24:28, 24:32] = -0.15  # within the threshold of the background: not an object
    image[1, :, 0:4, 0:8] = 0.5  # half of latent pixel (0, 0), on the border (the median is still the background)
    coverage = object_coverage(image, 8)
    expected = torch.zeros(2, 1, 4, 4)
    expected[0, 0, 1, 0] = 1.0
    expected[1, 0, 0, 0] = 0.5
    assert torch.equal(coverage, expected)
    many = image.repeat(600, 1, 1, 1)  # 1200 images: computed in two parts, the same per image
    assert torch.equal(object_coverage(many, 8), expected.repeat(600, 1, 1, 1))
    # a world render: its objects cover some of it, the plain background the rest
    render = pil_to_tensor(world_sample(0, "val").image)
    share = object_coverage(render, 8).mean().item()
    assert 0.02 < share < 0.6


def test_object_weight_weights_the_loss_by_coverage_and_keeps_its_scale(tmp_path):
    recipe = make_recipe(_config(tmp_path, object_weight=5.0), "cpu", RandomStreams(0))
    objects = recipe.dataset.tensors["objects"]
    assert objects.shape == (8, 1, 8, 8) and objects.max() > 0.5 and objects.min() == 0
    batch = recipe.collate([recipe.dataset[i] for i in range(4)])
    prepared = recipe.prepare(batch, StepContext(1, RandomStreams(0)))
    weight = prepared["pixel_weight"]
    assert torch.allclose(weight.mean(dim=(1, 2, 3)), torch.ones(4))
    expected = 1 + 4 * batch["objects"]
    assert torch.allclose(weight, expected / expected.mean(dim=(1, 2, 3), keepdim=True))
    # the step's loss is the weighted ε-MSE: recomputed here from the same noise and t
    modules = recipe.modules
    loss = recipe.step(modules, prepared, StepContext(1, RandomStreams(0)))["loss"]
    plain = recipe.step(
        modules, {k: v for k, v in prepared.items() if k != "pixel_weight"}, StepContext(1, RandomStreams(0))
    )
    assert not torch.allclose(loss, plain["loss"])
    g = StepContext(1, RandomStreams(0)).generator("cpu")
    x0 = prepared["latents"]
    t = torch.randint(*recipe.params.timestep_range, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = recipe.schedule.q_sample(x0, t, noise)
    text = dict(context=prepared["context"], context_mask=prepared["mask"], context_lengths=prepared["lengths"])
    with torch.no_grad():
        residuals = modules["controlnet"](x_t, t.float(), prepared["hint"], **text)
        eps = recipe.unet(x_t, t.float(), control_residuals=residuals, **text)
    reference = ((eps - noise).square() * weight).mean()
    assert torch.allclose(loss.detach(), reference, rtol=1e-5)
    # object_weight 1 (the default) is the plain loss and keeps no coverage
    recipe = make_recipe(_config(tmp_path / "plain"), "cpu", RandomStreams(0))
    assert "objects" not in recipe.dataset.tensors
    assert "pixel_weight" not in recipe.prepare(batch, StepContext(1, RandomStreams(0)))


def test_eval_cases_recolour_every_object_and_drop_positions():
    from kandinsky3.eval.controlnet import control_cases
    from kandinsky3.world import parse_caption

    for case in control_cases(20):
        layout = parse_caption(case.layout_caption)
        assert all(o.position is None for o in layout.objects)
        assert [(o.color, o.shape) for o in layout.objects] == [(o.color, o.shape) for o in case.objects]
        look = parse_caption(case.look_caption)
        assert [o.shape for o in look.objects] == [o.shape for o in case.objects]
        assert all(new.color != old.color for new, old in zip(case.look_objects, case.objects))
        assert len({o.color for o in case.look_objects}) == len(case.objects)
        assert [o.position for o in case.look_objects] == [o.position for o in case.objects]


def test_eval_tally_splits_the_cells_measure_by_object_count():
    from kandinsky3.eval.controlnet import Tally, control_table
    from kandinsky3.vocabulary import Stated
    from kandinsky3.world.judge import ObjectVerdict, Verdict

    def verdict(cells):
        stated = Stated("red", "circle", None, "top")
        return Verdict([ObjectVerdict(stated, True, True, None, ok) for ok in cells], None)

    tally = Tally()
    scenes = ([True], [True], [True, False], [True, True], [True, True, False])
    for cells, twins in zip(scenes, (False, False, True, False, True)):
        tally.add(verdict(cells), twins)
    d = tally.to_dict()
    assert d["positions"] == 3 / 5 and d["n"] == 5
    assert d["positions_by_count"] == {"1": 1.0, "2": 0.5, "3": 0.0}
    assert (d["positions_twins"], d["positions_distinct"], d["n_twins"]) == (0.0, 1.0, 2)
    assert d["hint_fair"] == 3 / 5  # no hint-fair verdict given: the strict one
    table = control_table({"layout": {"controlnet": tally}})
    assert table.splitlines()[0].split()[-8:] == ["pos", "1", "pos", "2", "pos", "3", "twins", "distinct"]
    assert table.splitlines()[1].split()[-5:] == ["100.0%", "50.0%", "0.0%", "0.0%", "100.0%"]
    # the hint-fair column (a twin scene read fairly) and a run with no twin scene: "–" in the table, None in JSON
    fair = Tally()
    fair.add(verdict([True, False]), twins=True, hint_fair=True)
    fair.add(verdict([True]))
    assert fair.to_dict()["hint_fair"] == 1.0 and fair.to_dict()["positions"] == 0.5
    line = control_table({"layout": {"controlnet": fair}}).splitlines()[1].split()
    assert line[2:5] == ["100.0%", "50.0%", "100.0%"]  # colours, strict positions, hint-fair
    lonely = Tally()
    lonely.add(verdict([True]))
    assert lonely.to_dict()["positions_twins"] is None
    json.dumps(lonely.to_dict(), allow_nan=False)
    assert control_table({"layout": {"controlnet": lonely}}).splitlines()[1].split()[-2:] == ["–", "100.0%"]


def test_eval_cases_mark_twins_exactly_where_two_objects_share_shape_and_size():
    from kandinsky3.eval.controlnet import control_cases
    from kandinsky3.world import world_sample

    cases = control_cases(60)
    for case in cases:
        scene = world_sample(case.index, "test", 64, num_objects=len(case.objects), complete_caption=True).scene
        keys = [(o.shape, o.size) for o in scene.objects]
        assert case.twins == any(keys.count(k) > 1 for k in keys)
    assert not any(c.twins for c in cases if len(c.objects) == 1)
    assert any(c.twins for c in cases)


def test_hint_fair_reading_lets_twins_swap_colours_and_nothing_else():
    """A render with two twin circles' colours exchanged has every colour in a cell its outline allows (hint-fair)
    but not in the scene's own cells (strict); exchanging the colours of objects of different shapes fails both."""
    from kandinsky3.eval.controlnet import hint_assignments
    from kandinsky3.vocabulary import ParsedCaption, Stated
    from kandinsky3.world import judge, render
    from kandinsky3.world.scene import Scene, WorldObject

    objs = [
        WorldObject("red", "circle", "small", "top left"),
        WorldObject("blue", "circle", "small", "bottom right"),
        WorldObject("yellow", "star", "large", "center"),
    ]
    stated = tuple(Stated(o.color, o.shape, None, o.position) for o in objs)
    sizes = tuple(o.size for o in objs)
    placements = hint_assignments(stated, sizes)
    assert placements[0] == stated and len(placements) == 2
    assert [o.position for o in placements[1]] == ["bottom right", "top left", "center"]
    # a large circle is no twin of a small one, and an object alone has one placement
    assert len(hint_assignments(stated, ("small", "large", "large"))) == 1

    def reads(scene_objects):
        image = render(Scene("gray", tuple(scene_objects)), 64).image
        strict = all(o.position for o in judge(image, ParsedCaption(stated, None)).objects)
        fair = any(all(o.position for o in judge(image, ParsedCaption(p, None)).objects) for p in placements)
        return strict, fair

    twins_swapped = [
        WorldObject(o.color, o.shape, o.size, p) for o, p in zip(objs, ["bottom right", "top left", "center"])
    ]
    assert reads(objs) == (True, True)
    assert reads(twins_swapped) == (False, True)
    star_swapped = [
        WorldObject("yellow", "circle", "small", "top left"),
        objs[1],
        WorldObject("red", "star", "large", "center"),
    ]
    assert reads(star_swapped) == (False, False)


def test_evaluate_control_reads_twins_both_ways_end_to_end():
    """A stand-in ControlNet that draws every scene exactly but with its twins' colours exchanged: the strict layout
    measure fails exactly the scenes with twins, the hint-fair one passes every scene."""
    import types

    from kandinsky3.eval.controlnet import control_cases, evaluate_control
    from kandinsky3.world import render, world_sample
    from kandinsky3.world.scene import Scene

    num = 30
    scenes = {}
    for i in range(num):
        scene = world_sample(i, "test", 64, num_objects=(1, 2, 1, 2, 3)[i % 5], complete_caption=True).scene
        objects = list(scene.objects)
        for a in range(len(objects)):
            for b in range(a + 1, len(objects)):
                if (objects[a].shape, objects[a].size) == (objects[b].shape, objects[b].size):
                    pa, pb = objects[a].position, objects[b].position
                    objects[a], objects[b] = replace(objects[a], position=pb), replace(objects[b], position=pa)
        scenes[render(scene, 64).image.tobytes()] = Scene(scene.background, tuple(objects))

    def control(hints, prompts, **_):
        return [render(scenes[h.tobytes()], 64).image for h in hints]

    pipe = types.SimpleNamespace(variant=types.SimpleNamespace(size=64), control=control)
    tally = evaluate_control(pipe, num, baseline=False, progress=False, rows=("layout",))["layout"]["controlnet"]
    twins = [c.twins for c in control_cases(num)]
    assert any(twins) and not all(twins)
    assert tally.positions == [int(not t) for t in twins]
    assert tally.hint_fair == [1] * num
