"""What the U-Net is actually given by each task (issue #21): context rows for a batch, the inpainting keep-mask,
the timesteps of an image→image edit, the negative prompt's branch.

A forward pre-hook on the tiny preset's U-Net records every call's arguments; the expectations are computed here
from the text encoder, the MoVQ and the spec's timestep rule, independently of the pipeline's own code.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky3 import read_metadata
from recording import UNetCalls


@pytest.fixture(autouse=True)
def skip_decoding(monkeypatch):
    """These tests look at the U-Net's inputs only: the MoVQ decode (seconds on a busy CPU) returns grey."""
    from kandinsky3.models.movq import MoVQ

    def decode(self, z, *args, **kwargs):
        f = self.config.downsample_factor
        return torch.zeros(z.shape[0], 3, z.shape[-2] * f, z.shape[-1] * f)

    monkeypatch.setattr(MoVQ, "decode", decode)


def test_num_images_repeats_each_prompt_in_place(tiny):
    """2 prompts × 2 images: the condition rows are [p0, p0, p1, p1] (repeat_interleave), matching the metadata's
    prompt order; the unconditional rows follow, all the null context."""
    prompts = ["a red circle", "a blue star"]
    with UNetCalls(tiny.unet) as rec:
        images = tiny.generate(prompts, num_images=2, seed=0, steps=1, guidance=3.0, progress=False)
    context, mask = rec.calls[0]["context"], rec.calls[0]["context_mask"]
    expected, expected_mask, _, _ = tiny.text_encoder.encode(prompts)
    null, null_mask = tiny.text_encoder.unconditional(expected[:1])
    assert context.shape[0] == 8  # 4 images, condition then unconditional
    for row, p in enumerate([0, 0, 1, 1]):
        assert torch.allclose(context[row], expected[p], atol=1e-6), row
        assert torch.equal(mask[row].cpu(), expected_mask[p].cpu()), row
        assert torch.allclose(context[4 + row], null[0], atol=1e-6) and torch.equal(mask[4 + row].cpu(), null_mask[0])
    assert not torch.allclose(expected[0], expected[1])  # the two prompts are distinguishable
    assert [read_metadata(im)["prompt"] for im in images] == [prompts[0], prompts[0], prompts[1], prompts[1]]


def test_negative_prompt_is_the_unconditional_branch(tiny):
    """A negative prompt replaces the null context in the second half of the guided batch (per prompt, repeated
    like the prompts), encoded with the official quirk (the prompt's mask); each row keeps its own crop length."""
    prompts, negatives = ["a red circle", "a big blue star on the left"], ["green", "a white square"]
    with UNetCalls(tiny.unet) as rec:
        tiny.generate(prompts, negative_prompt=negatives, num_images=2, seed=0, steps=1, guidance=3.0, progress=False)
    context, mask = rec.calls[0]["context"], rec.calls[0]["context_mask"]
    _, pos_mask, neg, neg_mask = tiny.text_encoder.encode(prompts, negatives)
    null, _ = tiny.text_encoder.unconditional(neg)
    for row, p in enumerate([0, 0, 1, 1]):
        assert torch.allclose(context[4 + row], neg[p], atol=1e-6), row
        assert torch.equal(mask[4 + row].cpu(), pos_mask[p].cpu()), row
        assert not torch.allclose(context[4 + row], null[p])
    # prompts of different lengths: each row pools over its own prompt's crop (3 words + EOS + 1, 7 + EOS + 1)
    assert rec.calls[0]["context_lengths"].tolist() == [5, 5, 9, 9] * 2


def test_inpainting_keep_channel_and_masked_latent(tiny_inpainting):
    """The U-Net's extra channels are [keep-mask (1 = keep, 0 = repaint), latent of the image with the repainted
    area set to mid-grey]: for a centre mask, keep is 1 at the corners and 0 in the centre."""
    pipe = tiny_inpainting
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[16:48, 16:48] = 1  # repaint the centre
    with UNetCalls(pipe.unet) as rec:
        pipe.inpaint(image, mask, "a red square", seed=0, steps=1, progress=False)
    c = pipe.latent_channels
    x = rec.channels(0)
    assert x.shape[1] == 2 * c + 1
    keep = x[:, c]
    expected = torch.ones(8, 8)
    expected[2:6, 2:6] = 0  # pixels 16..47 → latent cells 2..5
    for row in keep:
        assert torch.equal(row.cpu(), expected)
    assert keep[0, 0, 0] == 1 and keep[0, 7, 7] == 1 and keep[0, 0, 7] == 1 and keep[0, 4, 4] == 0
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    pixels[..., 16:48, 16:48] = 0.0
    with torch.no_grad():
        masked_latent = pipe.movq.encode(pixels)
    assert torch.allclose(x[0, c + 1 :], masked_latent[0], atol=1e-4)


def test_outpainting_marks_the_new_border_for_repainting(tiny_inpainting):
    pipe = tiny_inpainting
    image = Image.new("RGB", (64, 64), (200, 60, 60))
    with UNetCalls(pipe.unet) as rec:
        [wide] = pipe.outpaint(image, "sky", left=64, seed=0, steps=1, progress=False)
    assert wide.size == (128, 64)
    keep = rec.channels(0)[0, pipe.latent_channels]
    assert keep.shape == (8, 16)
    assert (keep[:, :8] == 0).all() and (keep[:, 8:] == 1).all()  # new left half repainted, the original kept


@pytest.mark.parametrize("strength", [0.1, 0.5])
def test_edit_runs_the_last_strength_fraction_of_the_schedule(tiny, strength):
    """steps = 20: the official grid is 999, 949, …, 49, 0; an edit at strength s makes int(20·s) U-Net calls at
    the last nonzero timesteps (0.1 → 99, 49), starting from the image's latent noised to the first of them."""
    source = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3)))
    with UNetCalls(tiny.unet) as rec:
        tiny.edit(source, "a cat", strength=strength, seed=3, steps=20, guidance=0.0, progress=False)
    n = int(round(20 * strength))
    expected = [49 + 50 * k for k in reversed(range(n))]
    assert rec.timesteps() == expected
    # the first input is x_t = √ᾱ·z0 + √(1−ᾱ)·noise at t = expected[0], noise the seed's first draw
    from kandinsky3.diffusion import NoiseSchedule

    abar = float(NoiseSchedule.named("cosine").alphas_cumprod[expected[0]])
    pixels = torch.from_numpy(np.asarray(source, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        z0 = tiny.movq.encode(pixels)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(3))
    x_t = abar**0.5 * z0 + (1 - abar) ** 0.5 * noise
    assert torch.allclose(rec.calls[0]["x"][:1], x_t, atol=1e-4)
