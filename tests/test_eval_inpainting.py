"""The inpainting eval: the scenes and prompts, the judge as a detector, COCO AP50 against hand-counted values,
PSNR outside the mask, and the latent-blending baseline's step rule."""

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky3.diffusion import NoiseSchedule
from kandinsky3.eval.inpainting import (
    LatentBlending,
    average_precision_50,
    detections_in_mask,
    inpaint_cases,
    make_cases,
    psnr_outside,
    region_caption,
)
from kandinsky3.world.captions import parse_caption
from kandinsky3.world.judge import Detection, detect
from kandinsky3.world.render import render


@pytest.fixture(scope="module")
def cases():
    return make_cases(40)


def test_cases_remove_one_object_by_its_box_and_ask_for_a_different_one(cases):
    from kandinsky3.world.dataset import world_sample

    for c in cases:
        scene = world_sample(c.index, "test").scene
        (stated,) = parse_caption(c.prompt).objects
        (other,) = parse_caption(c.other_prompt).objects
        assert f"{stated.color} {stated.shape}" == c.label and f"{other.color} {other.shape}" == c.other_label
        assert other.shape != stated.shape and other.position == stated.position and other.size == stated.size
        assert other.color not in {o.color for o in scene.objects} | {scene.background}
        x0, y0, x1, y1 = c.box
        assert c.mask[y0:y1, x0:x1].all() and c.mask.sum() <= (x1 - x0 + 2) * (y1 - y0 + 2)
    assert {c.size for c in cases} == {"small", "large"}
    assert [c.prompt for c in make_cases(5)] == [c.prompt for c in cases[:5]]  # deterministic
    val = make_cases(5, split="val")  # what diagnostics tune on: other scenes
    assert all(not np.array_equal(np.asarray(v.image), np.asarray(c.image)) for v, c in zip(val, cases))


def test_region_caption_states_every_attribute():
    from kandinsky3.world.scene import WorldObject

    assert region_caption(WorldObject("orange", "star", "large", "top left")) == "a large orange star in the top left"
    assert region_caption(WorldObject("red", "circle", "small", "center")) == "a small red circle in the center"


def test_judge_detects_the_rendered_objects_with_their_boxes(cases):
    for c in cases[:15]:
        found = {d.label: d for d in detect(c.image)}
        assert c.label in found
        d = found[c.label]
        assert max(abs(a - b) for a, b in zip(d.box, c.box)) <= 1 and 0.5 < d.score <= 1
        # the object is centred in its own mask, so it is a candidate; others are outside
        inside = detections_in_mask(c.image, c.mask)
        assert [x.label for x in inside] == [c.label]


def test_removed_object_is_not_detected_in_an_empty_box(cases):
    c = cases[0]
    arr = np.asarray(c.image).copy()
    from kandinsky3.world.scene import BACKGROUNDS
    from kandinsky3.world.dataset import world_sample

    arr[c.mask > 0] = BACKGROUNDS[world_sample(c.index, "test").scene.background]
    assert detections_in_mask(Image.fromarray(arr), c.mask) == []


def _d(box, label, score):
    color, shape = label.split()
    return Detection(box, color, shape, "small", score)


def test_ap50_against_hand_counted_values():
    box = (10, 10, 20, 20)
    # one class, 4 images: TP(0.9), FP-at-wrong-place(0.8) + miss, TP(0.7), miss → ranked: TP, FP, TP
    items = [
        ([_d(box, "red circle", 0.9)], box, "red circle"),
        ([_d((40, 40, 50, 50), "red circle", 0.8)], box, "red circle"),
        ([_d((11, 11, 21, 21), "red circle", 0.7)], box, "red circle"),  # IoU 81/119 = 0.68 ≥ 0.5
        ([], box, "red circle"),
    ]
    # precision envelope: recall ≤ 0.25 → 1, ≤ 0.5 → 2/3, above → 0; 101-point interpolation
    expected = (26 * 1.0 + 25 * (2 / 3)) / 101
    assert average_precision_50(items) == pytest.approx(expected, abs=1e-9)
    # wrong label at the right place counts for nothing; IoU below 0.5 is a miss
    assert average_precision_50([([_d(box, "blue circle", 0.9)], box, "red circle")]) == 0.0
    assert average_precision_50([([_d((15, 15, 25, 25), "red circle", 0.9)], box, "red circle")]) == 0.0
    # two classes are averaged
    two = [([_d(box, "red circle", 0.9)], box, "red circle"), ([], box, "blue star")]
    assert average_precision_50(two) == pytest.approx(0.5)
    assert np.isnan(average_precision_50([]))


def test_psnr_outside_ignores_the_mask():
    a = np.full((8, 8, 3), 100, np.uint8)
    b = a.copy()
    b[:4] = 0  # changed only inside the mask
    b[7, 7] = 110  # one pixel outside differs by 10 levels in each channel
    mask = np.zeros((8, 8), np.float32)
    mask[:4] = 1
    mse = (10 / 255) ** 2 / 32
    assert psnr_outside(Image.fromarray(b), Image.fromarray(a), mask) == pytest.approx(10 * np.log10(1 / mse))


def test_latent_blending_replaces_the_known_region_of_x0():
    schedule = NoiseSchedule.named("cosine")

    class Const(torch.nn.Module):
        in_channels = 4

        def forward(self, x, t, *args):
            return torch.full_like(x, 0.3)

    blend = LatentBlending(Const(), schedule)
    g = torch.Generator().manual_seed(0)
    x, known = torch.randn(2, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    keep = torch.zeros(1, 1, 4, 4)
    keep[..., :2] = 1
    blend.known = known
    t = torch.tensor([700.0, 700.0])
    eps = blend(x, t, extra_channels=torch.cat([keep, torch.zeros(1, 4, 4, 4)], 1).expand(2, -1, -1, -1))
    abar = schedule.alphas_cumprod[700]
    x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    assert torch.allclose(x0[..., :2], known.expand(2, -1, -1, -1)[..., :2], atol=1e-4)  # known region: the input
    plain = (x - (1 - abar).sqrt() * 0.3) / abar.sqrt()
    assert torch.allclose(x0[..., 2:], plain[..., 2:], atol=1e-5)  # hole: the model's own prediction


def test_eval_runs_end_to_end_on_a_few_scenes(tiny_inpainting, tiny):
    from kandinsky3.eval.inpainting import blending_pipeline, evaluate_inpainting, format_table

    cases = make_cases(3)
    report, same, other = evaluate_inpainting(tiny_inpainting, cases, steps=2, progress=False)
    seen = []
    outputs = inpaint_cases(
        tiny_inpainting, cases, [c.prompt for c in cases], steps=2, progress=False, callback=lambda *a: seen.append(a)
    )
    assert [(step, x.shape[0]) for step, _, x in seen] == [(0, 3), (1, 3)]  # every step of the one batch
    decoded = tiny_inpainting._decode(seen[-1][2], "truncate")  # the last step's x is the final latent
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(decoded, outputs))
    assert len(same) == len(other) == 3 and 0 <= report.ap50 <= 1 and report.psnr_outside > 0
    base, _, _ = evaluate_inpainting(blending_pipeline(tiny), cases, steps=2, progress=False)
    assert "latent blending" in base.model
    table = format_table([report, base])
    assert "AP50" in table and "different dataset" in table and "Kandinsky 3.1 (COCO, seed)" in table
    assert render is not None
