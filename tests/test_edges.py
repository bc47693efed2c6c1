"""Edge extractors (issue #15): the soft extractor's formula and properties, the HED network against an independent
layer-by-layer reference, its ``ControlNetHED.pth`` layout and safe loading, the CLI, the outline F-score."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kandinsky3.checkpoints import CheckpointError, save_safetensors
from kandinsky3.cli import main
from kandinsky3.edges import extract_edges, hed_edges, load_hed, resolve_hed_weights, safe_step, soft_edges
from kandinsky3.eval.edges import evaluate_edges, format_table, match_counts, thin
from kandinsky3.models.hed import HED
from kandinsky3.world import render, world_sample
from kandinsky3.world.render import outlines
from kandinsky3.world.scene import Scene, WorldObject

# ---------------------------------------------------------------------------------------------------------------
# the soft extractor


def _gauss(sigma=1.0):
    r = 3  # ceil(3σ)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return k / k.sum()


def test_soft_edges_golden_values_of_a_step():
    """A vertical 0 → 1 step between columns 3 and 4: Sobel marks columns 3 and 4 with magnitude 4 (1 after the
    step normalisation), the Gaussian spreads that along x only (rows are all alike), the peak is scaled to 1."""
    img = torch.zeros(1, 3, 8, 10)
    img[..., 4:] = 1.0
    row = np.zeros(10)
    row[[3, 4]] = 1.0
    padded = np.pad(row, 3, mode="edge")
    blurred = np.convolve(padded, _gauss(), mode="valid")
    expected = blurred / blurred.max()
    out = soft_edges(img)
    assert out.shape == (1, 1, 8, 10)
    for y in range(8):
        np.testing.assert_allclose(out[0, 0, y].numpy(), expected, atol=1e-6)


def test_soft_edges_uses_the_strongest_channel_and_keeps_dtype():
    img = torch.zeros(2, 3, 6, 6)
    img[0, 1, :, 3:] = 0.5  # green only, half contrast: still the strongest edge of its image → 1
    assert soft_edges(img)[0].max() == pytest.approx(1.0)
    assert soft_edges(img)[1].abs().max() == 0  # a flat image has no edges (not stretched noise)
    faint = torch.zeros(1, 3, 6, 6)
    faint[..., 3:] = 0.01  # below min_contrast: stays faint
    assert 0 < soft_edges(faint).max() < 0.25
    assert soft_edges(img.half()).dtype == torch.float16


def test_soft_edges_shapes_range_determinism():
    x = torch.rand(5, 3, 33, 47, generator=torch.Generator().manual_seed(0))
    a, b = soft_edges(x), soft_edges(x.clone())
    assert a.shape == (5, 1, 33, 47) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(soft_edges(x[2:3]), a[2:3], atol=1e-6, rtol=0)  # batch-independent (to rounding)
    for bad in (torch.rand(3, 8, 8), torch.rand(1, 4, 8, 8), torch.randint(0, 255, (1, 3, 8, 8))):
        with pytest.raises(ValueError, match="soft_edges"):
            soft_edges(bad)


def test_soft_edges_high_on_rendered_outlines_and_zero_in_flat_regions():
    scenes = [world_sample(i, "test", 64).scene for i in range(8)]
    images = torch.stack([torch.from_numpy(np.asarray(render(s, 64).image, np.float32) / 255) for s in scenes])
    edges = soft_edges(images.permute(0, 3, 1, 2))[:, 0]
    truth = torch.from_numpy(np.stack([outlines(s, 64) for s in scenes]))
    near = F.max_pool2d(truth[:, None].float(), 9, stride=1, padding=4)[:, 0] > 0  # within 4 px of an outline
    assert edges[truth].median() > 0.6 and (edges[truth] > 0.2).float().mean() > 0.95
    assert edges[~near].abs().max() == 0  # flat regions: exactly 0


def test_safe_step_golden_values():
    x = torch.tensor([0.0, 0.3, 0.34, 0.6, 0.67, 0.99, 1.0])
    assert safe_step(x).tolist() == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------------------------
# HED: layout, independent reference, loading

#: ControlNetHED.pth as the annotators ship it: (name, shape), written out from the published architecture
BLOCKS = [(3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3)]
HED_LAYOUT = [("norm", (1, 3, 1, 1))]
for _i, (_cin, _cout, _n) in enumerate(BLOCKS, start=1):
    for _j in range(_n):
        HED_LAYOUT += [
            (f"block{_i}.convs.{_j}.weight", (_cout, _cin if _j == 0 else _cout, 3, 3)),
            (f"block{_i}.convs.{_j}.bias", (_cout,)),
        ]
    HED_LAYOUT += [(f"block{_i}.projection.weight", (1, _cout, 1, 1)), (f"block{_i}.projection.bias", (1,))]


def _random_hed_state(seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) * scale for name, shape in HED_LAYOUT}


def _reference_sides(state, pixels):
    """The annotators' forward written out layer by layer on the raw tensors (no module of ours)."""
    h = pixels - state["norm"]
    sides = []
    for i, (_, _, n) in enumerate(BLOCKS, start=1):
        if i > 1:
            h = F.max_pool2d(h, 2, 2)
        for j in range(n):
            h = F.relu(F.conv2d(h, state[f"block{i}.convs.{j}.weight"], state[f"block{i}.convs.{j}.bias"], padding=1))
        sides.append(F.conv2d(h, state[f"block{i}.projection.weight"], state[f"block{i}.projection.bias"]))
    return sides


def test_hed_module_has_the_controlnethed_layout():
    sd = HED().state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == HED_LAYOUT
    assert len(sd) == 37 and sum(v.numel() for v in sd.values()) == 14_716_168


def test_hed_forward_matches_the_layer_by_layer_reference():
    state = _random_hed_state(1)
    model = HED()
    model.load_state_dict(state)
    images = torch.rand(2, 3, 37, 52, generator=torch.Generator().manual_seed(2))
    pixels = images * 255
    ours, ref = model(pixels), _reference_sides(state, pixels)
    assert [tuple(s.shape[-2:]) for s in ours] == [(37, 52), (18, 26), (9, 13), (4, 6), (2, 3)]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    resized = [F.interpolate(s, size=(37, 52), mode="bilinear", align_corners=False) for s in ref]
    fused = torch.sigmoid(torch.stack(resized).mean(dim=0))
    torch.testing.assert_close(hed_edges(model, images), fused, atol=1e-5, rtol=1e-5)


def test_controlnethed_pth_loads_strictly_and_safetensors_too(tmp_path):
    state = _random_hed_state(3)
    torch.save(state, tmp_path / "ControlNetHED.pth")
    model = load_hed(tmp_path / "ControlNetHED.pth")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    save_safetensors(state, tmp_path / "hed.safetensors")
    assert torch.equal(
        load_hed(tmp_path / "hed.safetensors").block5.projection.weight, state["block5.projection.weight"]
    )
    assert resolve_hed_weights(tmp_path) == tmp_path / "ControlNetHED.pth"  # a folder holding the file


def test_hed_loading_refuses_wrong_layouts(tmp_path):
    state = _random_hed_state(4)
    del state["block3.convs.2.bias"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"1 missing .*block3\.convs\.2\.bias"):
        load_hed(tmp_path / "missing.pth")
    state = _random_hed_state(4)
    state["block1.convs.0.weight"] = torch.zeros(64, 4, 3, 3)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="other shapes"):
        load_hed(tmp_path / "shape.pth")


class Payload:  # a pickled object: torch.load(weights_only=True) must refuse it
    def __reduce__(self):
        return (print, ("this must not run",))


def test_pickled_objects_are_refused(tmp_path):
    state = _random_hed_state(5)
    state["extra"] = Payload()
    torch.save(state, tmp_path / "ControlNetHED.pth")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_hed(tmp_path / "ControlNetHED.pth")


def test_missing_weights_and_offline_hub_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="HED weights not found.*--method soft"):
        load_hed(tmp_path / "nope.pth")
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no connection")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(CheckpointError, match=r"hf download lllyasviel/Annotators ControlNetHED\.pth"):
        load_hed()  # the default hub id

    asked = []  # an unreachable hub: the cache only, which fails at once instead of after the client's retries

    def cache_only(*args, local_files_only=False, **kwargs):
        asked.append(local_files_only)
        raise OSError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cache_only)
    monkeypatch.setattr("kandinsky3.checkpoints.loading.hub_reachable", lambda timeout=2.0: False)
    with pytest.raises(CheckpointError, match="--hed-weights"):
        load_hed()
    monkeypatch.setattr("kandinsky3.checkpoints.loading.hub_reachable", lambda timeout=2.0: True)
    with pytest.raises(CheckpointError):
        load_hed()
    assert asked == [True, False]


# ---------------------------------------------------------------------------------------------------------------
# extract_edges and the CLI


def _scene_png(path, size=64):
    scene = Scene(
        "gray", (WorldObject("red", "star", "large", "top left"), WorldObject("blue", "square", "small", "center"))
    )
    render(scene, size).image.save(path)
    return path


def test_extract_edges_output_and_bad_arguments(tmp_path):
    image = Image.open(_scene_png(tmp_path / "in.png"))
    out = extract_edges(image)
    arr = np.asarray(out)
    assert out.mode == "RGB" and out.size == image.size
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all() and arr.max() == 255
    expected = soft_edges(torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)[None])
    assert np.array_equal(arr[..., 0], (expected[0, 0] * 255).round().to(torch.uint8).numpy())
    assert set(np.unique(np.asarray(extract_edges(image, safe=True)))) <= {0, 127, 128, 255}
    grey = extract_edges(image.convert("L"))
    assert grey.mode == "RGB" and grey.size == image.size
    with pytest.warns(UserWarning, match="transparency"):
        assert extract_edges(image.convert("RGBA")).size == image.size
    with pytest.raises(ValueError, match="unknown edge method 'canny'"):
        extract_edges(image, "canny")
    with pytest.raises(ValueError, match="only used by method='hed'"):
        extract_edges(image, hed_weights="x.pth")


def test_cli_round_trip_soft_and_hed(tmp_path, capsys):
    src = _scene_png(tmp_path / "in.png", 48)
    assert main(["edges", str(src), str(tmp_path / "soft.png")]) == 0
    soft = Image.open(tmp_path / "soft.png")
    assert soft.size == (48, 48) and np.array_equal(np.asarray(soft), np.asarray(extract_edges(Image.open(src))))
    assert main(["edges", str(src), str(tmp_path / "soft.png")]) == 2  # exists
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["edges", str(src), str(tmp_path / "soft.png"), "--overwrite", "--safe"]) == 0

    save_safetensors(_random_hed_state(6), tmp_path / "hed.safetensors")  # random weights: the path runs end to end
    assert (
        main(
            [
                "edges",
                str(src),
                str(tmp_path / "hed.png"),
                "--method",
                "hed",
                "--hed-weights",
                str(tmp_path / "hed.safetensors"),
            ]
        )
        == 0
    )
    hed = np.asarray(Image.open(tmp_path / "hed.png"))
    assert hed.shape == (48, 48, 3) and (hed[..., 0] == hed[..., 2]).all()


def test_cli_bad_input(tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    assert main(["edges", str(tmp_path / "notes.png"), str(tmp_path / "o.png")]) == 2
    assert "is not an image" in capsys.readouterr().err
    assert main(["edges", str(tmp_path / "absent.png"), str(tmp_path / "o.png")]) == 2
    assert "image not found" in capsys.readouterr().err
    src = _scene_png(tmp_path / "in.png", 32)
    Image.open(src).convert("LA").save(tmp_path / "la.png")
    assert main(["edges", str(tmp_path / "la.png"), str(tmp_path / "la_edges.png")]) == 0
    assert "transparency" in capsys.readouterr().err
    args = ["edges", str(src), str(tmp_path / "o.png"), "--method", "hed", "--hed-weights", str(tmp_path / "none.pth")]
    assert main(args) == 2
    assert re.search(r"HED weights not found: .*none\.pth", capsys.readouterr().err)
    assert main(["edges", str(src), str(tmp_path / "o.png"), "--hed-weights", "x.pth"]) == 2
    assert "only used with --method hed" in capsys.readouterr().err
    assert main(["edges", str(src), str(tmp_path / "o.txt")]) == 2
    assert not (tmp_path / "o.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# outlines and the F-score


def test_outlines_follow_the_rendered_boundaries():
    for i in range(6):
        scene = world_sample(i, "test", 64).scene
        rendered, truth = render(scene, 64), torch.from_numpy(outlines(scene, 64))
        coverage = torch.from_numpy(np.max(np.stack(rendered.masks), axis=0))
        partial = (coverage > 0.05) & (coverage < 0.95)  # anti-aliased pixels: the boundary passes through them
        hard = coverage > 0.5
        step = torch.zeros_like(hard)  # or between two pixels (a grid-aligned side of a square)
        step[:, :-1] |= hard[:, :-1] != hard[:, 1:]
        step[:-1] |= hard[:-1] != hard[1:]
        near_truth = F.max_pool2d(truth[None, None].float(), 3, 1, 1)[0, 0] > 0
        near_partial = F.max_pool2d((partial | step)[None, None].float(), 3, 1, 1)[0, 0] > 0
        assert near_truth[partial].all()
        assert near_partial[truth].float().mean() > 0.95
    assert not outlines(Scene("gray", ()), 32).any()


def test_match_counts_and_thin_golden_values():
    truth = torch.zeros(1, 1, 7, 7, dtype=torch.bool)
    truth[..., 3] = True
    shifted = torch.roll(truth, 1, dims=-1)
    assert match_counts(shifted, truth, 1) == (7, 7, 7, 7)
    assert match_counts(shifted, truth, 0) == (0, 7, 0, 7)
    assert match_counts(truth | shifted, truth, 0) == (7, 14, 7, 7)
    ridge = torch.tensor([[0.1, 0.5, 0.9, 0.5, 0.1]]).expand(5, 5)[None, None]
    assert thin(ridge)[0, 0].tolist() == [[0.0, 0.0, pytest.approx(0.9), 0.0, 0.0]] * 5
    assert thin(ridge.transpose(-1, -2))[0, 0, :, 0].tolist() == [0.0, 0.0, pytest.approx(0.9), 0.0, 0.0]


def test_eval_edges_scores_the_soft_extractor_and_notes_hed(capsys):
    rows = evaluate_edges(6, sizes=(64,), noises=(0.0,), progress=False)
    assert rows[0].startswith("hed: needs the downloaded weights")
    soft = [r for r in rows[1:] if r.method == "soft"]
    assert len(soft) == 2 and all(r.f > 0.9 for r in soft)  # clean renders: a statistic, not a formula test
    assert "soft" in format_table(rows)
    assert main(["eval", "edges", "--num", "2"]) == 0
    assert "F-score at 1-px tolerance" in capsys.readouterr().out


def test_control_extracts_hed_edges_with_the_given_weights(tmp_path):
    """`control --edges hed --hed-weights FILE` works offline: the picture is the one made from that file's edges."""
    from kandinsky3 import Kandinsky3

    src = _scene_png(tmp_path / "in.png", 64)
    save_safetensors(_random_hed_state(6), tmp_path / "hed.safetensors")
    argv = ["control", str(src), "a red circle", "--model", "tiny", "--steps", "2", "--seed", "0", "--no-progress"]
    argv += ["--edges", "hed", "--hed-weights", str(tmp_path / "hed.safetensors"), "--out", str(tmp_path / "c.png")]
    assert main(argv) == 0
    edges = extract_edges(Image.open(src), "hed", tmp_path / "hed.safetensors")
    pipe = Kandinsky3.from_pretrained("tiny", device="cpu")
    [api] = pipe.control(edges, "a red circle", hint_is_edges=True, seed=0, steps=2, progress=False)
    [soft] = pipe.control(Image.open(src), "a red circle", seed=0, steps=2, progress=False)
    made = np.asarray(Image.open(tmp_path / "c.png"))
    assert np.array_equal(made, np.asarray(api)) and not np.array_equal(made, np.asarray(soft))
