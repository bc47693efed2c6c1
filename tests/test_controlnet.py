"""The HED ControlNet (issue #15, spec §8.4): released names and counts, the zero-init property, the injection
against a reference written here from the spec, the adapter's step window and scale maps, files, the task."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kandinsky3.checkpoints.controlnet import (
    config_to_fork,
    load_controlnet,
    read_controlnet,
    save_controlnet,
    tiny_controlnet,
    write_released,
)
from kandinsky3.diffusion import Conditioning, Denoiser
from kandinsky3.diffusion.control import ControlAdapter, control_window, scale_at
from kandinsky3.diffusion.steps import run_length
from kandinsky3.models.controlnet import ControlNet, ControlNetConfig
from kandinsky3.models.unet import UNet, UNetConfig
from kandinsky3.registry import VARIANTS
from kandinsky3.requests import Control
from recording import UNetCalls

# spec §8.4 / §12.3: the hint encoder's convs (in, out, stride) and the residual convs' widths, as released
HINT_SPEC = [(3, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 96, 2), (96, 96, 1), (96, 256, 2)]
RELEASED_PARAMS, RELEASED_TENSORS = 469_613_584, 418


def released_shapes() -> dict[str, tuple]:
    """The released ControlNet's tensor names and shapes, assembled from the spec: the official U-Net's encoder
    names (its first three down levels) + ``input_hint_block.conv1..7/out`` + ``convs.0..2``."""
    with torch.device("meta"):
        unet = UNet(UNetConfig())
    prefixes = (
        "to_time_embed.",
        "feature_pooling.",
        "in_layer.",
        "down_samples.0.",
        "down_samples.1.",
        "down_samples.2.",
    )
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items() if k.startswith(prefixes)}
    for i, (a, b, _) in enumerate(HINT_SPEC, start=1):
        shapes[f"input_hint_block.conv{i}.weight"], shapes[f"input_hint_block.conv{i}.bias"] = (b, a, 3, 3), (b,)
    shapes["input_hint_block.out.weight"], shapes["input_hint_block.out.bias"] = (192, 256, 3, 3), (192,)
    for i, c in enumerate((384, 768, 1536)):
        shapes[f"convs.{i}.weight"], shapes[f"convs.{i}.bias"] = (c, c, 1, 1), (c,)
    return shapes


def test_full_size_names_counts_and_strict_load_on_the_meta_device():
    with torch.device("meta"):
        net = ControlNet()
    sd = net.state_dict()
    assert len(sd) == RELEASED_TENSORS
    assert sum(v.numel() for v in sd.values()) == RELEASED_PARAMS
    expected = released_shapes()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    # a released-layout state dict (names and shapes from the spec) loads strictly, by assignment on meta
    released = {k: torch.empty(s, device="meta") for k, s in expected.items()}
    result = net.load_state_dict(released, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert sum(p.numel() for p in net.parameters()) == RELEASED_PARAMS


def tiny_unet(seed=0, **overrides) -> UNet:
    g = torch.Generator().manual_seed(seed)
    config = UNetConfig(**{**VARIANTS["tiny"].unet.to_dict(), **overrides})
    unet = UNet(config).eval()
    for p in unet.parameters():
        p.data.normal_(0, 0.05, generator=g)
    return unet


def inputs(b=2, size=8, ctx=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, size, size, generator=g)
    t = torch.tensor([999.0, 321.0][:b])
    context = torch.randn(b, 5, ctx, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]][:b])
    hint = torch.rand(b, 3, size * 8, size * 8, generator=g)
    return x, t, context, mask, hint


def test_a_fresh_controlnet_leaves_the_unet_bit_identical():
    unet = tiny_unet()
    net = ControlNet.from_unet(unet).eval()
    x, t, context, mask, hint = inputs()
    with torch.no_grad():
        residuals = net(x, t, hint, context, mask)
        plain = unet(x, t, context, mask)
        controlled = unet(x, t, context, mask, control_residuals=residuals)
    assert len(residuals) == len(unet.config.dim_mult) - 1
    assert all(torch.count_nonzero(r) == 0 for r in residuals)
    assert torch.equal(plain, controlled)
    # the copy is the U-Net's encoder, weight for weight; the zero layers are zero
    for name, value in net.state_dict().items():
        if name.startswith(("input_hint_block.out", "convs.")):
            assert torch.count_nonzero(value) == 0, name
        elif not name.startswith("input_hint_block."):
            assert torch.equal(value, unet.state_dict()[name]), name


def reference_controlnet(net: ControlNet, x, t, hint, context, mask):
    """Spec §8.4 written out: h = in_layer(x) + hint_block(hint), then per level h = down(h), residual = conv(h)."""
    h = hint
    for i in range(1, 8):
        conv = getattr(net.input_hint_block, f"conv{i}")
        h = F.silu(F.conv2d(h, conv.weight, conv.bias, stride=HINT_SPEC[i - 1][2], padding=1))
    out = net.input_hint_block.out
    h = F.conv2d(h, out.weight, out.bias, padding=1)
    emb = net.to_time_embed[0](t)
    te = net.to_time_embed[3](F.silu(net.to_time_embed[1](emb)))
    te = net.feature_pooling(te, context, mask)
    h = F.conv2d(x, net.in_layer.weight, net.in_layer.bias, padding=1) + h
    residuals = []
    for down, conv in zip(net.down_samples, net.convs):
        h = down(h, te, context, mask)
        residuals.append(F.conv2d(h, conv.weight, conv.bias))
    return residuals


def reference_injection(unet: UNet, x, t, context, mask, residuals):
    """Spec §3.3 + §8.4: skips of down levels 0..L-2; up level 0 takes x, up level l ≥ 1 takes
    cat[x, skip + residual] (the fork's ``skip + control.pop()``); nothing enters the deepest level."""
    emb = unet.to_time_embed[0](t)
    te = unet.to_time_embed[3](F.silu(unet.to_time_embed[1](emb)))
    te = unet.feature_pooling(te, context, mask)
    h = unet.in_layer(x)
    skips = []
    for level, down in enumerate(unet.down_samples):
        h = down(h, te, context, mask)
        if level < len(unet.down_samples) - 1:
            skips.append(h)
    controls = list(residuals)
    for level, up in enumerate(unet.up_samples):
        if level > 0:
            h = torch.cat([h, skips.pop() + controls.pop()], dim=1)
        h = up(h, te, context, mask)
    return unet.out_layer(h)


@pytest.mark.parametrize("levels", [4, 3])
def test_injection_matches_the_spec_reference_on_random_weights(levels):
    """Random weights everywhere (zero layers included): ControlNet + U-Net against the reference (≤ 1e-5); also
    the nano shape (3 levels → 2 residuals)."""
    extra = (
        {}
        if levels == 4
        else dict(
            dim_mult=(1, 2, 3),
            num_blocks=(2, 2, 2),
            add_cross_attention=(True,) * 3,
            add_self_attention=(False, True, True),
        )
    )
    unet = tiny_unet(**extra)
    net = tiny_controlnet(unet.config, seed=3)
    x, t, context, mask, hint = inputs()
    with torch.no_grad():
        ours = net(x, t, hint, context, mask)
        ref = reference_controlnet(net, x, t, hint, context, mask)
        assert len(ours) == levels - 1
        for a, b in zip(ours, ref):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
        assert max(r.abs().max() for r in ours) > 1e-3  # the residuals are not trivially zero
        out = unet(x, t, context, mask, control_residuals=ours)
        expected = reference_injection(unet, x, t, context, mask, ref)
        plain = unet(x, t, context, mask)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, plain, atol=1e-3)


def test_the_hint_must_be_eight_times_the_latent():
    net = tiny_controlnet(VARIANTS["tiny"].unet)
    x, t, context, mask, hint = inputs()
    with pytest.raises(ValueError, match="8× the latent"):
        net(x, t, hint[..., :32, :32], context, mask)


# -- the adapter ---------------------------------------------------------------------------------------------------


def test_step_clock_counts_new_timesteps_not_calls():
    from kandinsky3.diffusion.steps import StepClock

    clock = StepClock()
    ticks = [clock.tick(torch.tensor([t, t])) for t in (999.0, 999.0, 979.0, 979.0, 500.0, 999.0)]
    assert ticks == [0, 0, 1, 1, 2, 3]  # both branches of a step share it; a re-noised (larger) t is a new step


def test_control_window_and_run_length():
    assert list(control_window(10, 0.0, 1.0)) == list(range(10))
    assert list(control_window(10, 0.25, 0.75)) == [2, 3, 4, 5, 6]  # [int(N·start), int(N·end))
    assert list(control_window(3, 0.5, 1.0)) == [1, 2]
    assert run_length("k3", 50) == 50 and run_length("k3", 50, 0.3) == 15 and run_length("ddim", 10, 0.05) == 1
    assert run_length("flash", 4, 0.5) == 2  # 479, 229 are below 500
    assert run_length("k3", 60) == 59 and run_length("k3", 60, 0.5) == 30  # stride 17: 59 gaps in its timesteps
    assert list(control_window(50, 0.0, 0.58)) == list(range(29))  # 50 · 0.58 = 28.999… in floats


def test_spatial_scale_is_resized_nearest_exact():
    k = torch.tensor([[0.0, 1.0], [2.0, 0.5]])
    resized = scale_at(k, (1, 3, 4, 4))
    assert resized.shape == (1, 1, 4, 4)
    assert torch.equal(resized[0, 0], torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 0.5, 0.5], [2, 2, 0.5, 0.5]]))
    assert scale_at(0.7, (1, 3, 4, 4)) == 0.7


class CountingNet(torch.nn.Module):
    """A stand-in ControlNet that records its calls and returns ones."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, x, t, hint, context=None, context_mask=None, context_lengths=None):
        self.calls.append(float(t[0]))
        return [torch.ones(x.shape[0], 1, 2, 2)]


def test_adapter_counts_steps_by_timestep_for_both_branches():
    net = CountingNet()
    cond = Conditioning(torch.zeros(1, 3, 4), torch.ones(1, 3), torch.zeros(1, 3, 4), torch.ones(1, 3))
    adapter = ControlAdapter(net, torch.zeros(1, 3, 8, 8), 2.0, 0.4, 0.8, steps=5).to("cpu", torch.float32).bind(cond)
    x = torch.zeros(1, 4, 1, 1)
    seen = []
    for t in (999, 799, 599, 399, 199):
        out_cond, out_uncond = adapter(x, torch.tensor([t]), "cond"), adapter(x, torch.tensor([t]), "uncond")
        seen.append(bool(out_cond))
        assert bool(out_cond) == bool(out_uncond)
        if out_cond:
            assert torch.equal(out_cond["control_residuals"][0], torch.full((1, 1, 2, 2), 2.0))
    assert seen == [False, False, True, True, False]  # steps 2, 3 = [int(5·0.4), int(5·0.8))
    assert net.calls == [599.0, 599.0, 399.0, 399.0]  # outside the window the ControlNet is not run


def _denoiser_pair(unet, adapter, cond):
    return Denoiser(unet, cond, 3.0, [adapter]), Denoiser(unet, cond, 3.0)


def test_scale_zero_and_steps_outside_the_window_leave_the_output_bit_identical():
    unet = tiny_unet()
    net = tiny_controlnet(unet.config, seed=2)
    x, _, context, mask, hint = inputs(b=1)
    cond = Conditioning(context, mask, torch.zeros_like(context), mask)
    zero = ControlAdapter(net, hint, 0.0, steps=3)
    controlled, plain = _denoiser_pair(unet, zero, cond)
    assert torch.equal(controlled(x, 999), plain(x, 999))
    late = ControlAdapter(net, hint, 1.0, start=0.5, end=1.0, steps=2)  # controls step 1 only
    controlled, plain = _denoiser_pair(unet, late, cond)
    assert torch.equal(controlled(x, 999), plain(x, 999))
    assert not torch.allclose(controlled(x, 499), plain(x, 499), atol=1e-4)
    zero_map = ControlAdapter(net, hint, torch.zeros(8, 8), steps=1)  # a spatial map of zeros: residuals × 0
    controlled, plain = _denoiser_pair(unet, zero_map, cond)
    assert torch.equal(controlled(x, 999), plain(x, 999))


# -- files ---------------------------------------------------------------------------------------------------------


def test_released_folder_loads_strictly_and_converts_bit_identically(tmp_path):
    from kandinsky3.cli import main

    config = ControlNetConfig(VARIANTS["tiny"].unet)
    net = tiny_controlnet(config.unet, seed=5).half()
    sd = net.state_dict()
    write_released(config, sd, tmp_path / "released")  # controlnet/config.json + diffusion_pytorch_model.safetensors
    fork_config = json.loads((tmp_path / "released" / "controlnet" / "config.json").read_text())
    assert fork_config["hint_channels"] == 3 and "out_channels" not in fork_config and "model_dim" in fork_config
    loaded = load_controlnet(tmp_path / "released", VARIANTS["tiny"].unet)
    assert loaded.hint_method == "hed"  # the released ControlNet was trained on HED maps: control() extracts those
    assert all(torch.equal(loaded.state_dict()[k], v.float()) for k, v in sd.items())
    assert main(["convert", str(tmp_path / "released"), str(tmp_path / "native"), "--to", "native"]) == 0
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "back"), "--to", "diffusers"]) == 0
    for folder in ("native", "back"):
        cfg, back, _ = read_controlnet(tmp_path / folder)
        assert cfg == config
        assert sorted(back) == sorted(sd) and all(
            torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd
        )
    assert json.loads((tmp_path / "back" / "controlnet" / "config.json").read_text()) == json.loads(
        json.dumps(config_to_fork(config))
    )
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "x"), "--to", "official"]) == 2
    save_controlnet(tiny_controlnet(config.unet), tmp_path / "ours", hint_method="soft")
    assert load_controlnet(tmp_path / "ours").hint_method == "soft"


def test_a_controlnet_for_another_unet_size_is_refused(tmp_path):
    save_controlnet(tiny_controlnet(VARIANTS["tiny"].unet), tmp_path / "cn")
    with pytest.raises(ValueError, match="another U-Net size"):
        load_controlnet(tmp_path / "cn", VARIANTS["nano"].unet)


# -- the task --------------------------------------------------------------------------------------------------------


def _picture(size=64, mode="RGB"):
    arr = np.zeros((size, size, 3), np.uint8)
    arr[size // 4 : size // 2, size // 4 : size // 2] = (220, 40, 40)
    return Image.fromarray(arr).convert(mode)


def test_control_with_a_fresh_controlnet_is_text_to_image(tiny):
    pipe = copy.copy(tiny)
    pipe.controlnet = ControlNet.from_unet(tiny.unet).eval()
    controlled = pipe.control(_picture(), "a red circle", seed=3, steps=3, progress=False)
    plain = tiny.generate("a red circle", seed=3, steps=3, progress=False)
    assert np.array_equal(np.asarray(controlled[0]), np.asarray(plain[0]))


def test_control_runs_the_controlnet_inside_the_window_only(tiny):
    pipe = copy.copy(tiny)
    pipe.controlnet = tiny_controlnet(tiny.unet.config, seed=1)
    with UNetCalls(tiny.unet) as rec:
        pipe.control(_picture(), "a star", seed=0, steps=5, start=0.2, end=0.6, progress=False)
    assert [c.get("control_residuals") is not None for c in rec.calls] == [False, True, True, False, False]
    scaled = [c["control_residuals"] for c in rec.calls if c.get("control_residuals") is not None]
    assert scaled[0][0].shape[0] == 2  # guided: cond and uncond rows


def test_hints_of_another_size_mode_are_resized_and_converted(tiny):
    pipe = copy.copy(tiny)
    pipe.controlnet = tiny_controlnet(tiny.unet.config, seed=1)
    for image in (_picture(96, "RGBA"), _picture(80, "L"), _picture(128).resize((128, 96))):
        with UNetCalls(tiny.unet) as rec:
            [out] = pipe.control(image, "a star", width=64, height=64, seed=0, steps=1, progress=False)
        assert out.size == (64, 64) and rec.calls[0]["x"].shape[-2:] == (8, 8)
    [out] = pipe.control(_picture(128), "a star", hint_is_edges=True, seed=0, steps=1, progress=False)
    assert out.size == (64, 64)  # no size given: the model's size (nano/tiny: 64)


def test_one_hint_per_prompt_follows_the_prompt_order(tiny):
    from kandinsky3.tasks import control_hint, plan_control

    pipe = copy.copy(tiny)
    pipe.controlnet = tiny_controlnet(tiny.unet.config, seed=1)
    a, b = _picture(), _picture().transpose(Image.FLIP_LEFT_RIGHT)
    plan = plan_control(pipe, Control(image=[a, b], prompt=["x", "y"], num_images=2))
    hints = plan.adapters[0].hint
    expected = [control_hint(im, 64, 64, False) for im in (a, a, b, b)]
    assert hints.shape == (4, 3, 64, 64) and all(torch.equal(h, e[0]) for h, e in zip(hints, expected))
    assert not torch.equal(hints[0], hints[2])
    with pytest.raises(ValueError, match="3 control images for 2 prompts"):
        plan_control(pipe, Control(image=[a, b, a], prompt=["x", "y"]))


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(scale=2.5), "scale"),
        (dict(scale=-0.1), "scale"),
        (dict(scale=float("nan")), "scale"),
        (dict(scale=np.full((4, 4), 3.0)), "spatial scale map"),
        (dict(start=0.8, end=0.2), "start"),
        (dict(start=0.5, end=0.5), "empty"),
        (dict(end=1.5), "end"),
        (dict(strength=0.5), "init_image"),
        (dict(edges="canny"), "edges"),
        (dict(init_image="y.png"), "no effect at strength 1"),  # image→image needs strength < 1
        (dict(hed_weights="h.pth", edges="soft"), "hed_weights"),
        (dict(hed_weights="h.pth", hint_is_edges=True), "hed_weights"),
        (dict(hint_is_edges=True, edges="hed"), "hint_is_edges"),
    ],
)
def test_bad_control_requests_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        Control(image="x.png", prompt="x", **bad)


def test_control_from_the_command_line(tmp_path):
    from kandinsky3.cli import main

    _picture().save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    argv = ["control", str(tmp_path / "in.png"), "a red circle", "--model", "tiny", "--steps", "2", "--scale", "0.8"]
    assert main(argv + ["--end", "0.5", "--seed", "1", "--out", str(out), "--no-progress"]) == 0
    assert Image.open(out).size == (64, 64)
    assert main(argv + ["--start", "0.9", "--end", "0.1", "--out", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()


def test_the_command_line_loads_the_controlnet_folder_it_is_given(tmp_path):
    """``--controlnet FOLDER`` replaces the model's own ControlNet: the picture is the one the API makes with it."""
    from kandinsky3 import Kandinsky3
    from kandinsky3.cli import main

    save_controlnet(tiny_controlnet(VARIANTS["tiny"].unet, seed=4), tmp_path / "cn")
    _picture().save(tmp_path / "in.png")
    argv = ["control", str(tmp_path / "in.png"), "a red circle", "--model", "tiny", "--steps", "2", "--seed", "0"]
    argv += ["--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "own.png")]) == 0
    assert main(argv + ["--controlnet", str(tmp_path / "cn"), "--out", str(tmp_path / "given.png")]) == 0
    pipe = Kandinsky3.from_pretrained("tiny", device="cpu", controlnet=tmp_path / "cn")
    [api] = pipe.control(_picture(), "a red circle", seed=0, steps=2, progress=False)
    own, given = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("own", "given"))
    assert np.array_equal(given, np.asarray(api)) and not np.array_equal(own, given)
    assert main(argv + ["--controlnet", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()


def test_nano_controls_out_of_the_box(nano):
    """``from_pretrained("nano")`` finds the committed nano ControlNet on first use — or, while this release ships
    none (docs/controlnet.md), says so and how to make one."""
    from kandinsky3.checkpoints.io import CheckpointError
    from kandinsky3.registry import NANO_CONTROLNET_DIR

    pipe = copy.copy(nano)
    pipe.controlnet = None
    if not (NANO_CONTROLNET_DIR / "controlnet.json").is_file():
        with pytest.raises(CheckpointError, match="ships no trained nano-controlnet yet.*kandinsky3 train controlnet"):
            pipe.control(_picture(), "a red square", seed=0, steps=2, progress=False)
        return
    [image] = pipe.control(_picture(), "a red square", seed=0, steps=2, progress=False)
    assert image.size == (64, 64)
    assert pipe.controlnet is not None and pipe.controlnet.config.unet == nano.unet.config
