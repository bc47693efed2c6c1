"""The inpainting recipe: one builder of the extra channels for training and inference, the widened init, the
data with boxes, a short run that resumes exactly, and the inpaint task's bad inputs."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kandinsky3 import Kandinsky3, tasks
from kandinsky3.diffusion.inpainting import inpainting_channels
from kandinsky3.models.unet import UNet
from kandinsky3.registry import VARIANTS
from kandinsky3.training import TrainConfig, train
from kandinsky3.training.recipes import inpainting as recipe_module
from kandinsky3.training.recipes.inpainting import widen_in_layer
from kandinsky3.training.region_data import CocoRegions, WorldRegions, read_coco_boxes

REPO = Path(__file__).parent.parent
NANO = str(REPO / "src" / "kandinsky3" / "weights" / "nano")


def _official_extra(encode, pixels, repaint):
    """Spec §6 written out: keep = 1 − mask; zero every pixel whose keep ≠ 1; encode; nearest-resize keep."""
    keep = 1 - repaint
    hole = keep != 1
    masked = pixels.clone()
    masked[hole.expand_as(pixels)] = 0.0
    latent = encode(masked)
    small = F.interpolate(keep, size=latent.shape[-2:], mode="nearest")
    return torch.cat([small, latent], 1)


def test_builder_matches_the_official_rule(tiny):
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    repaint = torch.zeros(2, 1, 64, 64)
    repaint[0, :, 8:30, 10:50] = 1
    repaint[1, :, 40:, :20] = 0.3  # fractional: a hole in the masked image, 0.7 in the keep channel
    with torch.no_grad():
        got = inpainting_channels(tiny.movq.encode, pixels, repaint)
        want = _official_extra(tiny.movq.encode, pixels, repaint)
    assert got.shape == (2, 5, 8, 8)
    assert torch.equal(got, want)


def test_inference_path_feeds_the_unet_what_the_builder_returns(tiny_inpainting, monkeypatch):
    calls = []
    real = tasks.inpainting_channels

    def spy(encode, pixels, repaint):
        out = real(encode, pixels, repaint)
        calls.append((pixels.clone(), repaint.clone(), out.clone()))
        return out

    monkeypatch.setattr(tasks, "inpainting_channels", spy)
    image = Image.new("RGB", (64, 64), (30, 120, 200))
    mask = np.zeros((64, 64), np.float32)
    mask[10:40, 20:50] = 1
    from kandinsky3.requests import Inpaint

    plan = tasks.plan_inpaint(tiny_inpainting, Inpaint(image=image, mask=mask, prompt=["a", "b"], steps=2))
    assert len(calls) == 1
    pixels, repaint, out = calls[0]
    assert torch.equal(plan.adapters[0].channels, out.expand(2, -1, -1, -1))
    assert torch.equal(repaint[0, 0], torch.from_numpy(mask))
    # the U-Net receives exactly these channels after x_t in both guidance branches
    seen = []
    unet = tiny_inpainting.unet
    hook = unet.in_layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        tiny_inpainting.inpaint(image, mask, "a", steps=1, seed=0, progress=False)
    finally:
        hook.remove()
    assert torch.equal(seen[0][:, 4:], torch.cat([out, out]).to(seen[0].dtype))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    out = tmp_path_factory.mktemp("inpaint")
    return _make(out)


def _cfg_dict(out, **extra):
    unet = dict(VARIANTS["nano"].unet.to_dict(), num_channels=9)
    return {
        "recipe": "inpainting",
        "output_dir": str(out),
        "export_dir": str(out / "model"),
        "model": {
            "name": "nano-inpainting-test",
            "movq": NANO,
            "init": "nano",
            "shares": "nano",
            "unet": unet,
            "text_encoder": {
                "tokenizer": "world",
                "d_model": 128,
                "d_ff": 256,
                "d_kv": 32,
                "num_heads": 4,
                "num_layers": 2,
            },
            "train_text_encoder": False,
        },
        "data": {"length": 16},
        "steps": 4,
        "batch_size": 4,
        "warmup_steps": 1,
        "checkpoint_every": 2,
        "sample_every": 100,
        **extra,
    }


def _cfg(out, **extra):
    return TrainConfig.from_dict(_cfg_dict(out, **extra))


def _make(out):
    from kandinsky3.training.recipes import make_recipe

    return make_recipe(_cfg(out), "cpu")


def test_widened_init_starts_as_exactly_the_base_model(recipe, nano):
    unet = recipe.trainable.unet.eval()
    assert unet.in_channels == 9
    assert torch.count_nonzero(unet.in_layer.weight[:, 4:]) == 0
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    extra = torch.randn(2, 5, 8, 8)
    ctx, cmask = nano.text_encoder.encode(["a red circle", "a blue star"])[:2]
    with torch.no_grad():
        a = unet(x, torch.tensor([500.0, 20.0]), ctx, cmask, extra_channels=extra)
        b = nano.unet(x, torch.tensor([500.0, 20.0]), ctx, cmask)
    assert torch.allclose(a, b, atol=1e-5)
    # T5 and projection are nano's and frozen (they are shared, not exported)
    assert not any(p.requires_grad for p in recipe.trainable.text.parameters())
    assert recipe.trainable.null_embedding.requires_grad


def test_widen_in_layer_refuses_to_narrow():
    from kandinsky3.models.config import ConfigError

    w = {"unet.in_layer.weight": torch.ones(8, 9, 3, 3)}
    assert widen_in_layer(w, 9) is w
    with pytest.raises(ConfigError, match="9 input channels, more than the config's 4"):
        widen_in_layer(w, 4)
    wide = widen_in_layer({"unet.in_layer.weight": torch.ones(8, 4, 3, 3)}, 9)["unet.in_layer.weight"]
    assert wide.shape == (8, 9, 3, 3) and wide[:, 4:].abs().sum() == 0 and wide[:, :4].eq(1).all()


def test_training_batch_is_built_by_the_same_function(recipe, monkeypatch):
    calls = []
    real = recipe_module.inpainting_channels
    monkeypatch.setattr(recipe_module, "inpainting_channels", lambda *a: calls.append(a) or real(*a))

    class Ctx:
        def generator(self, device):
            return torch.Generator().manual_seed(4)

    batch = recipe.collate([recipe.dataset[i] for i in range(4)])
    prepared = recipe.prepare(batch, Ctx())
    assert len(calls) == 1
    repaint, prompts, kinds = recipe.sample_masks(batch, Ctx().generator("cpu"))
    pixels = batch["pixels"].float() / 127.5 - 1
    with torch.no_grad():
        want = real(recipe.movq.encode, pixels, repaint)
    assert torch.equal(prepared["extra_channels"], want)
    # a box-based mask is prompted with its object's region caption, the others with the whole caption
    for i, (p, k) in enumerate(zip(prompts, kinds)):
        if k in ("box", "shape"):
            assert p in batch["regions"][i]
        else:
            assert p == batch["caption"][i]


def _gen():
    """The timesteps and noise every loss comparison below draws (the same for both sides)."""
    return torch.Generator().manual_seed(4)


def _sampled_and_nothing_known(recipe):
    """A prepared batch of 4 with its sampled masks, and the same batch with nothing known (keep-mask all 0)."""

    class Ctx:
        def generator(self, device):
            return _gen()

    prepared = recipe.prepare(recipe.collate([recipe.dataset[i] for i in range(4)]), Ctx())
    nothing_known = {**prepared, "extra_channels": prepared["extra_channels"].clone()}
    nothing_known["extra_channels"][:, :1] = 0
    return prepared, nothing_known


def test_known_region_weighting_reaches_the_loss(recipe, tmp_path):
    """``model.known_region_gamma`` reaches the trainable and scales only the known region's error: with nothing
    known the loss is the plain one, with the sampled masks it is larger (the same timesteps and noise); γ < 1 is
    refused."""
    from kandinsky3.models.config import ConfigError
    from kandinsky3.training.recipes import make_recipe

    prepared, nothing_known = _sampled_and_nothing_known(recipe)
    trainable = recipe.trainable
    assert trainable.known_region_gamma is None
    with torch.no_grad():
        plain, plain_unknown = trainable(prepared, _gen()), trainable(nothing_known, _gen())
        try:
            trainable.known_region_gamma = 20.0
            assert torch.allclose(trainable(nothing_known, _gen()), plain_unknown)
            assert trainable(prepared, _gen()) > 1.05 * plain
        finally:
            trainable.known_region_gamma = None
    model = _cfg_dict(tmp_path)["model"]
    assert (
        make_recipe(_cfg(tmp_path, model={**model, "known_region_gamma": 20}), "cpu").trainable.known_region_gamma == 20
    )
    with pytest.raises(ConfigError, match="known_region_gamma must be ≥ 1"):
        _cfg(tmp_path, model={**model, "known_region_gamma": 0.5})


def test_hole_share_reaches_the_loss(recipe, tmp_path):
    """``model.hole_share`` reaches the trainable and changes the loss of the sampled masks (same timesteps and
    noise) but not of a sample with nothing known (the hole is everything already); a share outside (0, 1) is
    refused."""
    from kandinsky3.models.config import ConfigError
    from kandinsky3.training.recipes import make_recipe

    prepared, nothing_known = _sampled_and_nothing_known(recipe)
    trainable = recipe.trainable
    assert trainable.hole_share is None
    with torch.no_grad():
        plain, plain_unknown = trainable(prepared, _gen()), trainable(nothing_known, _gen())
        try:
            trainable.hole_share = 0.5
            assert torch.allclose(trainable(nothing_known, _gen()), plain_unknown)
            assert not torch.allclose(trainable(prepared, _gen()), plain)
        finally:
            trainable.hole_share = None
    model = _cfg_dict(tmp_path)["model"]
    assert make_recipe(_cfg(tmp_path, model={**model, "hole_share": 0.25}), "cpu").trainable.hole_share == 0.25
    for bad in (0.0, 1.0):
        with pytest.raises(ConfigError, match="hole_share is a share in"):
            _cfg(tmp_path, model={**model, "hole_share": bad})


def test_strictly_known_cells_are_the_cells_with_no_repainted_pixel():
    """Written out per cell: known iff none of its 8×8 pixels is repainted. A box off the latent grid leaves cells
    the U-Net's keep-mask (one sampled pixel per cell, the released rule) calls known and this rule does not."""
    from kandinsky3.diffusion.inpainting import latent_keep_mask
    from kandinsky3.training.recipes.inpainting import strictly_known_cells

    repaint = torch.zeros(2, 1, 64, 64)
    repaint[0, :, 13:24, 13:24] = 1  # a small object's box + rim, off the grid
    repaint[1, :, 40:, :20] = 0.3  # fractional values count as repainted
    got = strictly_known_cells(repaint, (8, 8))
    want = torch.ones(2, 1, 8, 8)
    for b in range(2):
        for i in range(8):
            for j in range(8):
                if repaint[b, 0, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8].any():
                    want[b, 0, i, j] = 0
    assert torch.equal(got, want)
    nearest = latent_keep_mask(repaint, (8, 8))
    assert (got <= nearest).all()  # strictly known cells are known to the U-Net too …
    assert int((nearest - got)[0].sum()) == 3  # … but the box's cells at rows/columns 1 are not strictly known
    assert got[0, 0, 1:3, 1:3].sum() == 0 and nearest[0, 0, 2, 2] == 0


def test_strict_known_reaches_the_loss(recipe, tmp_path):
    """``model.strict_known`` puts the strictly known cells in the batch (never more than the U-Net's keep-mask)
    and the known-region weighting then uses them: with γ set, the loss of the same batch, timesteps and noise
    changes; without the option the batch has no such cells and nothing changes."""
    from kandinsky3.training.recipes import make_recipe

    plain_batch, _ = _sampled_and_nothing_known(recipe)
    assert "known_cells" not in plain_batch
    trainable = recipe.trainable
    try:
        recipe.params.strict_known = True
        strict_batch, _ = _sampled_and_nothing_known(recipe)
    finally:
        recipe.params.strict_known = False
    keep = plain_batch["extra_channels"][:, :1]
    known = strict_batch["known_cells"]
    assert torch.equal(strict_batch["extra_channels"], plain_batch["extra_channels"])  # the U-Net's inputs are kept
    assert (known <= keep).all() and (known < keep).any()
    with torch.no_grad():
        try:
            trainable.known_region_gamma = 20.0
            assert not torch.allclose(trainable(strict_batch, _gen()), trainable(plain_batch, _gen()))
            no_partial = {**strict_batch, "known_cells": keep}
            assert torch.allclose(trainable(no_partial, _gen()), trainable(plain_batch, _gen()))
        finally:
            trainable.known_region_gamma = None
    model = _cfg_dict(tmp_path)["model"]
    assert make_recipe(_cfg(tmp_path, model={**model, "strict_known": True}), "cpu").params.strict_known


def test_known_region_drift_reaches_the_unet_and_the_target(recipe, tmp_path, monkeypatch):
    """``model.known_region_drift`` reaches the trainable; with it the U-Net sees x_t moved in the known region only,
    and the loss is taken against ε plus the same offset; a share outside [0, 1] is refused."""
    from kandinsky3.models.config import ConfigError
    from kandinsky3.training.recipes import diffusion, make_recipe

    class Ctx:
        def generator(self, device):
            return torch.Generator().manual_seed(4)

    prepared = recipe.prepare(recipe.collate([recipe.dataset[i] for i in range(4)]), Ctx())
    trainable, seen = recipe.trainable, []
    real_unet = trainable.unet.forward

    def spy(x, *args, **kwargs):
        seen.append(x.clone())
        return real_unet(x, *args, **kwargs)

    offsets = []
    real_drift = diffusion.known_region_drift
    monkeypatch.setattr(diffusion, "known_region_drift", lambda *a: offsets.append(real_drift(*a)) or offsets[-1])
    monkeypatch.setattr(trainable.unet, "forward", spy)
    assert trainable.known_region_drift == 0.0
    with torch.no_grad():
        plain = trainable(prepared, torch.Generator().manual_seed(4))
        assert not offsets
        try:
            trainable.known_region_drift = 1.0
            drifted = trainable(prepared, torch.Generator().manual_seed(4))
        finally:
            trainable.known_region_drift = 0.0
    [o] = offsets
    keep = prepared["extra_channels"][:, :1]
    assert o.any() and not (o * (keep != 1)).any()
    moved = seen[1] - seen[0]  # same timesteps and noise: the difference is the offset, √(1−ᾱ)-scaled
    assert moved.abs().sum() > 0 and not moved[o == 0].any()
    assert not torch.allclose(drifted, plain)
    model = _cfg_dict(tmp_path)["model"]
    assert make_recipe(_cfg(tmp_path, model={**model, "known_region_drift": 0.5}), "cpu").trainable.known_region_drift
    with pytest.raises(ConfigError, match="known_region_drift is a share in"):
        _cfg(tmp_path, model={**model, "known_region_drift": 1.5})


def test_world_regions_give_boxes_and_exact_region_captions():
    from kandinsky3.world.captions import parse_caption

    ds = WorldRegions(12, "train", 64)
    cls = WorldRegions(12, "train", 64, region_prompts="class")
    item = ds[3]
    n = len(item["regions"])
    assert item["image"].dtype == torch.uint8 and item["boxes"].shape == (3, 4)
    assert (item["boxes"][:n] >= 0).all() and (item["boxes"][n:] == -1).all()
    from kandinsky3.world.dataset import world_sample

    scene = world_sample(3, "train").scene
    for obj, text, name in zip(scene.objects, item["regions"], cls[3]["regions"]):
        (stated,) = parse_caption(text).objects
        assert (stated.color, stated.shape) == (obj.color, obj.shape)
        assert name == obj.shape


def test_short_run_exports_a_shared_unet_only_model_and_resumes_exactly(tmp_path):
    full = train(_cfg(tmp_path / "a"), progress=False)
    train(_cfg(tmp_path / "b"), max_steps=2, progress=False)
    resumed = train(_cfg(tmp_path / "b"), progress=False)
    assert full["step"] == resumed["step"] == 4
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "model" / "unet.safetensors")
    b = load_file(tmp_path / "b" / "model" / "unet.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    folder = tmp_path / "a" / "model"
    assert sorted(p.name for p in folder.iterdir()) == ["kandinsky3.json", "unet.safetensors"]
    exported = json.loads((folder / "kandinsky3.json").read_text())
    assert exported["shares"] == "nano"
    # it samples as the official inpainting pipeline (spec §4.2: x0 thresholded at the 0.95 quantile, not nano's 0.99)
    official = VARIANTS["inpainting"].sampler.threshold_percentile
    assert exported["sampler"]["threshold_percentile"] == 0.95 == official
    assert VARIANTS["nano-inpainting"].sampler.threshold_percentile == official
    pipe = Kandinsky3.from_pretrained(folder)
    assert pipe.is_inpainting and pipe.unet.in_channels == 9
    mask = np.zeros((64, 64), np.float32)
    mask[20:40, 20:40] = 1
    (out,) = pipe.inpaint(Image.new("RGB", (64, 64), "gray"), mask, "a red circle", steps=2, progress=False)
    assert out.size == (64, 64)


def test_coco_boxes_outside_the_image_name_the_file(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "cat.png")
    ann = {
        "images": [{"id": 1, "file_name": "cat.png", "width": 40, "height": 30}],
        "annotations": [{"id": 7, "image_id": 1, "bbox": [30, 5, 20, 10], "category_id": 1}],
        "categories": [{"id": 1, "name": "cat"}],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(ann))
    with pytest.raises(ValueError, match=r"cat\.png is outside its 40x30 image"):
        read_coco_boxes(tmp_path / "annotations.json", tmp_path)
    ann["annotations"][0]["bbox"] = [10, 5, 20, 10]
    (tmp_path / "annotations.json").write_text(json.dumps(ann))
    (tmp_path / "cat.txt").write_text("a cat on a sofa")
    (tmp_path / "regions.jsonl").write_text(json.dumps({"file": "cat.png", "box": 0, "caption": "a tabby cat"}) + "\n")
    item = CocoRegions(tmp_path, 16)[0]
    assert item["regions"] == ["a tabby cat"] and item["caption"] == "a cat on a sofa"
    # centre crop 30×30 from x = 5, then ×16/30
    assert torch.allclose(item["boxes"][0], torch.tensor([5, 5, 25, 15]) * 16 / 30)
    assert CocoRegions(tmp_path, 16, region_prompts="class")[0]["regions"] == ["cat"]


# -- the inpaint task's bad inputs -------------------------------------------------------------------------------


def test_non_binary_mask_is_thresholded_at_one_half(tiny_inpainting):
    image = Image.new("RGB", (64, 64), (90, 160, 20))
    soft = np.zeros((64, 64), np.float32)
    soft[8:40, 8:40] = 0.7
    soft[40:50, 40:50] = 0.3  # below the threshold: kept
    hard = (soft >= 0.5).astype(np.float32)
    a = tiny_inpainting.inpaint(image, soft, "x", steps=2, seed=1, progress=False)[0]
    b = tiny_inpainting.inpaint(image, hard, "x", steps=2, seed=1, progress=False)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    grey = Image.fromarray((soft * 255).astype(np.uint8))  # 178 and 76 of 255
    c = tiny_inpainting.inpaint(image, grey, "x", steps=2, seed=1, progress=False)[0]
    assert np.array_equal(np.asarray(a), np.asarray(c))


def test_empty_mask_returns_the_input_without_sampling(tiny_inpainting, monkeypatch):
    image = Image.new("RGB", (64, 64), (90, 160, 20))
    monkeypatch.setattr(tiny_inpainting, "_execute", lambda *a, **k: pytest.fail("sampled"))
    with pytest.warns(UserWarning, match="mask is empty"):
        out = tiny_inpainting.inpaint(image, np.zeros((64, 64)), ["x", "y"], progress=False)
    assert len(out) == 2 and all(np.array_equal(np.asarray(o), np.asarray(image)) for o in out)


def test_full_mask_works_as_text_to_image(tiny_inpainting):
    image = Image.new("RGB", (64, 64), (90, 160, 20))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (out,) = tiny_inpainting.inpaint(image, np.ones((64, 64)), "x", steps=2, seed=0, progress=False)
    assert out.size == (64, 64)
    assert not [w for w in caught if "mask" in str(w.message)]  # a full mask is not an error or a warning
    # nothing of the input is kept: the masked image is all mid-grey, so any input gives the same picture
    (other,) = tiny_inpainting.inpaint(
        Image.new("RGB", (64, 64), "white"), np.ones((64, 64)), "x", steps=2, seed=0, progress=False
    )
    assert np.array_equal(np.asarray(out), np.asarray(other))


def test_unet_of_nano_inpainting_variant_is_nine_channels():
    v = VARIANTS["nano-inpainting"]
    assert v.is_inpainting and v.unet.num_channels == 9 and isinstance(UNet, type)


def test_faster_new_inputs_keep_true_weights_in_state_dicts():
    import copy

    from torch import nn

    from kandinsky3.training.recipes.inpainting import ScaledInputConv

    torch.manual_seed(0)
    conv = nn.Conv2d(9, 8, 3, padding=1)
    scaled = ScaledInputConv(conv, 4, 10.0)
    x = torch.randn(2, 9, 8, 8)
    assert torch.allclose(scaled(x), conv(x), atol=1e-6)
    assert torch.allclose(scaled.state_dict()["weight"], conv.weight.detach(), atol=1e-7)
    assert torch.allclose(copy.deepcopy(scaled)(x), conv(x), atol=1e-6)
    plain = nn.Conv2d(9, 8, 3, padding=1)
    plain.load_state_dict(scaled.state_dict())
    assert torch.allclose(plain(x), conv(x), atol=1e-6)
    # one AdamW step moves the true weights of channels 4.. ten times as far as the others
    before = scaled.state_dict()["weight"].clone()
    opt = torch.optim.AdamW(scaled.parameters(), lr=1e-3, weight_decay=0.0)
    scaled(x).square().mean().backward()
    opt.step()
    moved = (scaled.state_dict()["weight"] - before).abs()
    assert torch.allclose(moved[:, :4], torch.full_like(moved[:, :4], 1e-3), rtol=1e-2)
    assert torch.allclose(moved[:, 4:], torch.full_like(moved[:, 4:], 1e-2), rtol=1e-2)
