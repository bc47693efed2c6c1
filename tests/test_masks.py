"""The inpainting mask sampler: the mixture's shares and coverage at a fixed seed, and each kind's geometry."""

import numpy as np
import pytest
import torch

from kandinsky3.models.config import ConfigError
from kandinsky3.training.masks import KINDS, MaskMixture, MaskSampler, extend_box
from kandinsky3.world.dataset import world_sample
from kandinsky3.world.render import OBJECT_RIM, grow_box, render

N = 1200


@pytest.fixture(scope="module")
def draws():
    scenes = [render(world_sample(i, "train").scene, 64) for i in range(40)]
    sampler, rng = MaskSampler(), np.random.default_rng(0)
    out = []
    for i in range(N):
        r = scenes[i % len(scenes)]
        out.append((r, sampler.sample(64, 64, r.boxes, rng)))
    return out


def test_share_of_each_kind_follows_the_default_mixture(draws):
    counts = {k: sum(m.kind == k for _, m in draws) for k in KINDS}
    # default: 25 % box + 25 % shape (50 % box-based), 45 % random strokes/boxes, 5 % whole image
    expected = {"box": 0.25, "shape": 0.25, "random": 0.45, "whole": 0.05}
    for kind, share in expected.items():
        sd = (share * (1 - share) / N) ** 0.5
        assert abs(counts[kind] / N - share) < 4 * sd, (kind, counts)
    assert sum(counts.values()) == N


def test_mean_coverage_per_kind_at_a_fixed_seed(draws):
    coverage = {k: np.mean([m.coverage for _, m in draws if m.kind == k]) for k in KINDS}
    # the values at seed 0 (a change in any mask's geometry moves them)
    assert coverage["whole"] == 1.0
    assert 0.16 < coverage["box"] < 0.24, coverage
    assert 0.10 < coverage["shape"] < 0.17, coverage
    assert 0.20 < coverage["random"] < 0.30, coverage
    assert coverage["shape"] < coverage["box"]  # the irregular shape lies inside the extended box
    overall = np.mean([m.coverage for _, m in draws])
    assert 0.22 < overall < 0.30, overall


def test_box_based_masks_cover_their_object_and_stay_in_the_extended_box(draws):
    for r, m in draws:
        assert set(np.unique(m.mask)) <= {0.0, 1.0}
        if m.kind not in ("box", "shape"):
            assert m.object_index is None
            continue
        x0, y0, x1, y1 = r.boxes[m.object_index]
        assert m.mask[y0:y1, x0:x1].all(), "a box-based mask must cover its whole object box"
        ys, xs = np.nonzero(m.mask)
        if m.kind == "box":  # a rectangle
            assert m.mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].all()


def test_tight_box_masks_are_the_object_box_plus_its_rim_in_their_share():
    """``tight``: that share of box masks is the object's box + OBJECT_RIM exactly (as the eval removes an object);
    ``grow_box`` clips to the image."""
    scenes = [render(world_sample(i, "train").scene, 64) for i in range(40)]
    sampler, rng = MaskSampler(MaskMixture(box=1, shape=0, random=0, whole=0, tight=0.3)), np.random.default_rng(1)
    tight = 0
    for i in range(600):
        r = scenes[i % len(scenes)]
        m = sampler.sample(64, 64, r.boxes, rng)
        expected = np.zeros((64, 64), np.float32)
        x0, y0, x1, y1 = grow_box(r.boxes[m.object_index], OBJECT_RIM, 64, 64)
        expected[y0:y1, x0:x1] = 1
        tight += np.array_equal(m.mask, expected)
    sd = (0.3 * 0.7 / 600) ** 0.5
    assert abs(tight / 600 - 0.3) < 4 * sd, tight
    assert grow_box((0, 5, 10, 64), 1, 64, 64) == (0, 4, 11, 64)  # clipped to the image


def test_small_bias_draws_objects_by_inverse_area_and_zero_keeps_the_uniform_draw():
    """``small_bias`` b: an object is chosen with probability ∝ area^−b — with boxes of area 100 and 400 at b 1,
    the small one 4 / 5 of the time (within 4σ over 2 000 draws); b 0 draws every object alike."""
    boxes = [(5, 5, 15, 15), (30, 30, 50, 50)]
    biased = MaskSampler(MaskMixture(box=1, shape=0, random=0, whole=0, small_bias=1.0))
    rng = np.random.default_rng(3)
    small = sum(biased.sample(64, 64, boxes, rng).object_index == 0 for _ in range(2000))
    assert abs(small / 2000 - 0.8) < 4 * (0.8 * 0.2 / 2000) ** 0.5, small
    uniform = MaskSampler(MaskMixture(box=1, shape=0, random=0, whole=0))
    small = sum(uniform.sample(64, 64, boxes, rng).object_index == 0 for _ in range(2000))
    assert abs(small / 2000 - 0.5) < 4 * (0.25 / 2000) ** 0.5, small


def test_extended_box_moves_each_side_into_its_free_margin_only():
    rng = np.random.default_rng(1)
    for _ in range(200):
        ex = extend_box((20, 10, 30, 40), 64, 48, 0.5, rng)
        assert 10 <= ex[0] <= 20 and 5 <= ex[1] <= 10 and 30 <= ex[2] <= 47 and 40 <= ex[3] <= 44
    assert extend_box((20, 10, 30, 40), 64, 48, 0.0, rng) == (20, 10, 30, 40)


def test_seeded_and_torch_generators_are_reproducible():
    s = MaskSampler()
    boxes = [(10, 10, 20, 20)]
    a = [s.sample(64, 64, boxes, np.random.default_rng(5)).mask for _ in range(3)]
    b = [s.sample(64, 64, boxes, np.random.default_rng(5)).mask for _ in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    t1 = s.sample(64, 64, boxes, torch.Generator().manual_seed(3))
    t2 = s.sample(64, 64, boxes, torch.Generator().manual_seed(3))
    assert np.array_equal(t1.mask, t2.mask) and t1.kind == t2.kind


def test_without_boxes_the_box_shares_go_to_random_masks():
    s = MaskSampler()
    rng = np.random.default_rng(0)
    kinds = {s.sample(32, 32, [], rng).kind for _ in range(300)}
    assert kinds == {"random", "whole"}
    # degenerate boxes count as none; the index refers to the caller's list
    m = MaskSampler(MaskMixture(box=1, shape=0, random=0, whole=0)).sample(32, 32, [(0, 0, 0, 0), (4, 4, 9, 9)], rng)
    assert m.object_index == 1


def test_random_only_mixture_is_the_30_regime():
    s = MaskSampler(MaskMixture(box=0, shape=0, random=0.9, whole=0.1))
    rng = np.random.default_rng(2)
    assert {s.sample(64, 64, [(5, 5, 20, 20)], rng).object_index for _ in range(200)} == {None}


@pytest.mark.parametrize(
    "bad, words",
    [
        (dict(box=-1), "shares ≥ 0"),
        (dict(box=0, shape=0, random=0, whole=0), "positive sum"),
        (dict(extend_max=2), "extend_max"),
        (dict(tight=1.5), "tight is a share"),
        (dict(small_bias=-1), "small_bias is an exponent"),
        (dict(stroke_width=(0.3, 0.1)), "stroke_width"),
    ],
)
def test_bad_mixture_is_a_clear_error(bad, words):
    with pytest.raises(ConfigError, match=words):
        MaskSampler(MaskMixture(**bad))
