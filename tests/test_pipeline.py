"""End-to-end behaviour of Kandinsky3 on the tiny random preset: determinism, batching, tasks, bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky3 import read_metadata, save_image
from kandinsky3.diffusion import Conditioning, Denoiser
from recording import UNetCalls


def arr(image):
    return np.asarray(image, dtype=np.int16)


def test_same_seed_same_image_different_seed_different(tiny):
    a = tiny.generate("a red circle", seed=7, steps=6, progress=False)[0]
    b = tiny.generate("a red circle", seed=7, steps=6, progress=False)[0]
    c = tiny.generate("a red circle", seed=8, steps=6, progress=False)[0]
    assert np.array_equal(arr(a), arr(b))
    assert np.abs(arr(a) - arr(c)).mean() > 0.5


def test_generator_argument_is_equivalent_to_seed(tiny):
    a = tiny.generate("a cat", seed=11, steps=4, progress=False)[0]
    b = tiny.generate("a cat", generator=torch.Generator().manual_seed(11), steps=4, progress=False)[0]
    assert np.array_equal(arr(a), arr(b))


def test_batch_of_different_prompts_matches_one_at_a_time(tiny):
    """Prompts of different lengths in one U-Net batch give each prompt's own ε (per-sample pooling length)."""
    prompts = ["a red circle", "a large blue star in the top left on a white background"]
    te = tiny.text_encoder
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    singles = []
    for p in prompts:
        ctx, mask, _, _ = te.encode([p])
        null, null_mask = te.unconditional(ctx)
        singles.append(Denoiser(tiny.unet, Conditioning(ctx, mask, null, null_mask), 3.0)(x, 500))
    ctx, mask, _, _ = te.encode(prompts)
    null, null_mask = te.unconditional(ctx)
    lengths = te.crop_lengths(mask)
    assert lengths.tolist() == [5, 14]
    assert te.prompt_lengths(mask).tolist() == [5, 14]  # the training recipes' form: never None, capped by the
    assert te.prompt_lengths(mask, 10).tolist() == [5, 10]  # mask's own width unless told otherwise
    assert te.crop_lengths(te.encode([prompts[0]] * 2)[1]) is None  # one shared length: the plain path
    batch = Denoiser(tiny.unet, Conditioning(ctx, mask, null, null_mask, context_lengths=lengths), 3.0)(
        torch.cat([x, x]), 500
    )
    for i in range(2):
        # float noise of batched GEMMs × guidance 3: ≈ 1e-5 on an EPYC (0.022 for the real difference below)
        assert torch.allclose(batch[i], singles[i][0], atol=5e-5)
    # and without the per-sample length the short prompt would be pooled over the long crop: different ε
    plain = Denoiser(tiny.unet, Conditioning(ctx, mask, null, null_mask), 3.0)(torch.cat([x, x]), 500)
    assert (plain[0] - singles[0][0]).abs().max() > 1e-3


def test_generate_batch_with_num_images_and_metadata(tiny, tmp_path):
    images = tiny.generate(
        ["a red circle", "a blue star"], negative_prompt="green", num_images=2, seed=5, steps=3, progress=False
    )
    assert len(images) == 4 and all(im.size == (64, 64) for im in images)
    meta = [read_metadata(im) for im in images]
    assert [m["prompt"] for m in meta] == ["a red circle", "a red circle", "a blue star", "a blue star"]
    assert meta[0]["seed"] == 5 and meta[0]["negative_prompt"] == "green" and meta[0]["steps"] == 3
    save_image(images[2], tmp_path / "x.png")
    assert read_metadata(tmp_path / "x.png")["prompt"] == "a blue star"
    assert not np.array_equal(arr(images[0]), arr(images[2]))


def test_flash_sampler_ignores_guidance_with_a_warning(tiny):
    with pytest.warns(UserWarning, match="(?i)flash"):
        a = tiny.generate("a star", sampler="flash", guidance=5.0, seed=1, progress=False)[0]
    b = tiny.generate("a star", sampler="flash", seed=1, progress=False)[0]
    assert np.array_equal(arr(a), arr(b))
    assert read_metadata(b)["steps"] == 4


DIFFUSERS_SCHEDULES = {  # class, extra config, the timesteps of 4 steps
    "ddim": ("DDIMScheduler", dict(clip_sample=False, timestep_spacing="trailing"), [999, 749, 499, 249]),
    "dpm++": ("DPMSolverMultistepScheduler", {}, [999, 749, 500, 250]),
}


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_diffusers_schedulers_run(tiny, sampler):
    """A diffusers sampler makes one U-Net call per step at that scheduler's timesteps (the K3 cosine schedule;
    DDIM with trailing spacing), and its loop lands exactly on x0 when ε is exact for that x0."""
    diffusers = pytest.importorskip("diffusers")
    from kandinsky3.diffusion import sample_with_scheduler

    cls, extra, expected = DIFFUSERS_SCHEDULES[sampler]
    with UNetCalls(tiny.unet) as rec:
        image = tiny.generate("a dog", sampler=sampler, steps=4, seed=0, progress=False)[0]
    assert rec.timesteps() == expected
    assert image.size == (64, 64) and read_metadata(image)["sampler"] == sampler

    scheduler = getattr(diffusers, cls)(
        beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000, prediction_type="epsilon", **extra
    )
    abar = scheduler.alphas_cumprod
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-2, 2)

    def oracle(x_t, t):  # the ε that points from x_t exactly at x0
        return (x_t - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    out = sample_with_scheduler(oracle, noise, scheduler, 4, torch.Generator().manual_seed(3))
    assert torch.allclose(out, x0, atol=1e-3)


def test_edit_keeps_more_of_the_image_at_low_strength(tiny):
    source = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3)))
    weak = tiny.edit(source, "a cat", strength=0.1, seed=0, steps=20, progress=False)[0]
    strong = tiny.edit(source, "a cat", strength=1.0, seed=0, steps=20, progress=False)[0]
    assert weak.size == (64, 64)
    from kandinsky3.images import pil_to_tensor, tensor_to_pil

    with torch.no_grad():
        recon = tensor_to_pil(tiny.movq.decode(tiny.movq.encode(pil_to_tensor(source))))[0]
    assert np.abs(arr(weak) - arr(recon)).mean() < np.abs(arr(strong) - arr(recon)).mean()


def test_inpaint_paste_back_and_outpaint(tiny_inpainting):
    """paste_back composes exactly mask·generated + (1 − mask)·original: inside the mask the pixels are those of
    the same run without paste-back, outside the original's, and the model's own output differs outside (so the
    paste did something). What the U-Net is given is checked in test_unet_inputs.py."""
    image = Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8))
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[16:48, 16:48] = 1
    kwargs = dict(seed=0, steps=3, progress=False)
    pasted = tiny_inpainting.inpaint(image, mask, "a red square", paste_back=True, **kwargs)[0]
    raw = tiny_inpainting.inpaint(image, mask, "a red square", **kwargs)[0]
    p, r, inside = arr(pasted), arr(raw), mask.astype(bool)
    assert pasted.size == (64, 64)
    assert np.array_equal(p[inside], r[inside])  # the generated pixels, untouched
    assert (p[~inside] == 200).all()  # the original pixels
    assert np.abs(r[~inside] - 200).mean() > 5  # the random model repaints the kept area too: pasting mattered
    assert read_metadata(pasted)["task"] == "inpaint"
    wide = tiny_inpainting.outpaint(image, "sky", left=32, right=32, seed=0, steps=2, progress=False)[0]
    assert wide.size == (128, 64)


def test_dilate_mask_grows_by_six_pixels():
    from kandinsky3.images import dilate_mask

    m = np.zeros((32, 32), dtype=np.float32)
    m[16, 16] = 1
    d = dilate_mask(m)
    assert d[16, 10:23].all() and not d[16, 9] and not d[16, 23]


def test_bad_inputs_have_clear_errors(tiny, tiny_inpainting):
    with pytest.raises(ValueError, match="width 100 is not a positive multiple of 64"):
        tiny.generate("x", width=100, progress=False)
    image = Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match="mask size 32x32 does not match the image size 64x64"):
        tiny_inpainting.inpaint(image, np.zeros((32, 32)), "x", progress=False)
    with pytest.raises(ValueError, match="inpainting needs a U-Net with 9 input channels"):
        tiny.inpaint(image, np.zeros((64, 64)), "x", progress=False)
    with pytest.raises(ValueError, match="unknown sampler"):
        tiny.generate("x", sampler="magic", progress=False)
    with pytest.raises(TypeError, match="unknown setting"):
        tiny.generate("x", stepz=3)
    with pytest.raises(ValueError, match="strength"):
        tiny.edit(image, "x", strength=0.0)
    with pytest.raises(ValueError, match="empty"):
        tiny.edit(Image.new("RGB", (0, 0)), "x")
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        tiny.generate("x", negative_prompt=["a", "b"], steps=2, progress=False)


def test_empty_prompt_is_the_official_eos_only_condition(tiny):
    """An empty prompt is valid: as in the official code it is encoded as EOS alone (one attended token), and
    guidance steers it against the null branch — it is not replaced by the null context."""
    with UNetCalls(tiny.unet) as rec:
        image = tiny.generate("", seed=0, steps=1, guidance=3.0, progress=False)[0]
    assert image.size == (64, 64)
    context, mask = rec.calls[0]["context"], rec.calls[0]["context_mask"]
    expected, expected_mask, _, _ = tiny.text_encoder.encode([""])
    null, null_mask = tiny.text_encoder.unconditional(expected)
    assert context.shape[0] == 2 and mask[0].sum() == 1  # condition (EOS only), then the null branch
    assert torch.equal(context[0], expected[0]) and torch.equal(mask[0], expected_mask[0])
    assert torch.equal(context[1], null[0]) and torch.equal(mask[1], null_mask[0])
    assert not torch.allclose(context[0], context[1])


def test_offload_gives_the_same_image(tiny):
    """offload=True moves each component to the device only while it runs; the result does not change."""
    from kandinsky3 import Kandinsky3
    from kandinsky3.checkpoints import Components

    offloaded = Kandinsky3(
        Components(tiny.variant, tiny.unet, tiny.movq, tiny.text_encoder), device="cpu", offload=True
    )
    a = tiny.generate("a red circle", seed=2, steps=3, progress=False)[0]
    b = offloaded.generate("a red circle", seed=2, steps=3, progress=False)[0]
    assert np.array_equal(arr(a), arr(b))
    assert next(tiny.unet.parameters()).device.type == "cpu"
