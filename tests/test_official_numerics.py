"""Where the official Kandinsky 3 code's numerics are easy to miss: the timestep stride, the 8-bit conversion and
untiled MoVQ (issue #12). Each expectation is written out here from the official expressions, not from the package."""

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky3 import save_image
from kandinsky3.diffusion import flash_timesteps, official_timesteps


@pytest.mark.parametrize("steps", range(1, 101))
def test_base_timesteps_are_the_official_expression(steps):
    # The official T2I and inpainting pipelines: range(999, 0, -1000 // steps), which Python reads as (-1000) // steps.
    official = list(range(999, 0, -1000 // steps)) + [0]
    assert official_timesteps(steps) == official
    assert len(official) - 1 <= steps  # never more U-Net calls than asked for


def test_thirty_steps_run_thirty_calls():
    assert official_timesteps(30)[:3] == [999, 965, 931]
    assert official_timesteps(30)[-2:] == [13, 0]
    assert len(official_timesteps(30)) == 31


@pytest.mark.parametrize("steps", range(1, 11))
def test_flash_timesteps_follow_the_same_rule(steps):
    assert flash_timesteps(steps) == list(range(979, 0, -1000 // steps))


def test_flash_default_is_the_released_schedule():
    assert flash_timesteps(4) == list(range(979, 0, -250)) == [979, 729, 479, 229]


def _capture_decoded(pipe, monkeypatch):
    """Record the latents the MoVQ decoder gets and the floats it returns (where the 8-bit conversion starts)."""
    seen = []
    decode = pipe.movq.decode

    def recording(z, tiled=None):
        out = decode(z, tiled=tiled)
        seen.append((z.detach().clone(), out.detach().float().clone(), tiled))
        return out

    monkeypatch.setattr(pipe.movq, "decode", recording)
    return seen


def test_nano_at_30_steps_calls_the_unet_30_times(nano):
    calls = []
    handle = nano.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        nano.generate("a red circle", seed=0, steps=30, progress=False)
    finally:
        handle.remove()
    assert len(calls) == 30  # guidance pair batched: one call per step


def test_default_png_is_the_truncated_decode_and_rounding_rounds(nano, monkeypatch, tmp_path):
    seen = _capture_decoded(nano, monkeypatch)
    [default] = nano.generate("a blue star on a white background", seed=3, steps=5, progress=False)
    [rounded] = nano.generate(
        "a blue star on a white background", seed=3, steps=5, progress=False, pixel_rounding="round"
    )
    assert torch.equal(seen[0][1], seen[1][1]) and seen[0][2] is False
    # torchvision's ToPILImage on a float tensor: clip((x+1)/2, 0, 1), then mul(255).byte() (truncation)
    levels = (((seen[0][1][0] + 1) / 2).clamp(0, 1) * 255).permute(1, 2, 0).numpy()
    truncated, nearest = np.floor(levels).astype(np.uint8), np.round(levels).astype(np.uint8)
    assert (truncated != nearest).mean() > 0.2  # the two conversions really differ on this image

    save_image(default, tmp_path / "default.png")
    save_image(rounded, tmp_path / "rounded.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "default.png")), truncated)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "rounded.png")), nearest)
    assert default.info["kandinsky3"] != rounded.info["kandinsky3"]  # the choice is in the metadata


def test_unknown_pixel_rounding_is_refused(nano):
    with pytest.raises(ValueError, match="pixel_rounding"):
        nano.generate("a star", seed=0, steps=1, pixel_rounding="ceil", progress=False)


def test_large_images_are_decoded_untiled_unless_asked(nano, monkeypatch):
    seen = _capture_decoded(nano, monkeypatch)
    nano.generate("a red circle", seed=0, steps=1, guidance=0, width=1088, height=640, progress=False)
    ((z, untiled, asked),) = seen
    assert asked is False and z.shape == (1, 4, 80, 136)
    with torch.no_grad():
        assert torch.equal(untiled, nano.movq.decode_untiled(z))  # the whole latent at once, as official
    # asked for: tiles wherever a side exceeds one tile (nano's MoVQ tile is 64 px; smaller size to keep it quick)
    nano.movq_tiling = True
    try:
        nano.generate("a red circle", seed=0, steps=1, guidance=0, width=192, height=128, progress=False)
    finally:
        nano.movq_tiling = False
    z, tiled, asked = seen[1]
    assert asked is True and tiled.shape == (1, 3, 128, 192)
    with torch.no_grad():
        assert torch.equal(tiled, nano.movq.decode(z, tiled=True))
        assert (tiled - nano.movq.decode_untiled(z)).abs().max() > 1e-3  # tiling really changes this image
