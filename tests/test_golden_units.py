"""Golden values for behaviour the nano end-to-end tests only see statistically (issue #21).

Each expectation is written out here from the spec (docs/sampling.md), not read back from the package: the DDIM
variance with η ≠ 1, dynamic thresholding at a percentile whose quantile differs from the maximum, ε recomputed
from the clipped x0, the T5 attention mask, and the RGB channel order from a decoded tensor to a saved PNG.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky3.diffusion import NoiseSchedule, sample_ddim


@pytest.fixture(scope="module")
def cosine():
    return NoiseSchedule.named("cosine")


def _abar(schedule, t) -> float:
    return float(schedule.alphas_cumprod[t].double())


# -- DDIM with η ≠ 1 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 0.25, 0.5])
def test_ddim_step_with_eta_below_one(cosine, eta):
    """σ² = η·(1 − ᾱ_t/ᾱ_prev)·(1 − ᾱ_prev)/(1 − ᾱ_t): η multiplies the variance (not √η, not η²). At η = 1 and
    η = 0 those all agree, so only a fractional η pins it."""
    t, t_prev = 500, 450
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, 4, generator=g)
    eps = 0.5 * torch.randn(1, 4, 4, 4, generator=g)
    out = sample_ddim(
        lambda x_t, tt: eps,
        x,
        cosine,
        [t, t_prev],
        torch.Generator().manual_seed(9),
        eta=eta,
        threshold_percentile=None,
    )

    a_t, a_p = _abar(cosine, t), _abar(cosine, t_prev)
    x64, e64 = x.double(), eps.double()
    x0 = (x64 - (1 - a_t) ** 0.5 * e64) / a_t**0.5
    var = eta * (1 - a_t / a_p) * (1 - a_p) / (1 - a_t)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).double()
    expected = a_p**0.5 * x0 + (1 - a_p - var) ** 0.5 * e64 + var**0.5 * z
    assert torch.allclose(out.double(), expected, atol=1e-5)
    if eta == 0.5:  # the test can tell η from √η here: the two differ by far more than the tolerance
        var_sqrt = eta**0.5 * (1 - a_t / a_p) * (1 - a_p) / (1 - a_t)
        wrong = a_p**0.5 * x0 + (1 - a_p - var_sqrt) ** 0.5 * e64 + var_sqrt**0.5 * z
        assert (wrong - expected).abs().max() > 1e-2


# -- dynamic thresholding inside the sampler ----------------------------------------------------------------------


def _threshold_step(schedule, x, x0_target, t, t_prev, percentile):
    """One deterministic (η = 0) DDIM step whose U-Net predicts exactly ``x0_target``, as the spec writes it:
    s = max(quantile(|x0|, p), 1); x0 ← clip(x0, ±s)/s; ε ← (x_t − √ᾱ_t·x0)/√(1 − ᾱ_t); x_prev = √ᾱ_prev·x0 +
    √(1 − ᾱ_prev)·ε. Quantile: NumPy's linear interpolation, computed per sample."""
    a_t, a_p = _abar(schedule, t), _abar(schedule, t_prev)
    x0 = x0_target.double().numpy()
    s = np.maximum(np.quantile(np.abs(x0.reshape(x0.shape[0], -1)), percentile, axis=1), 1.0)[:, None, None, None]
    clipped = np.clip(x0, -s, s) / s
    x64 = x.double().numpy()
    eps = (x64 - a_t**0.5 * clipped) / (1 - a_t) ** 0.5
    return torch.from_numpy(a_p**0.5 * clipped + (1 - a_p) ** 0.5 * eps), torch.from_numpy(clipped)


def test_thresholding_uses_the_percentile_and_recomputes_eps(cosine):
    """The sampler clips x0 at the requested percentile (here 0.9, whose quantile is well below the maximum) and
    continues with the ε of the clipped x0, not the U-Net's ε."""
    t, t_prev, p = 600, 550, 0.9
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    x0_target = 3.0 * torch.randn(2, 4, 8, 8, generator=g)
    a_t = cosine.alphas_cumprod[t]
    eps_net = (x - a_t.sqrt() * x0_target) / (1 - a_t).sqrt()  # the ε whose x0 is x0_target
    out = sample_ddim(lambda x_t, tt: eps_net, x, cosine, [t, t_prev], None, eta=0.0, threshold_percentile=p)

    expected, clipped = _threshold_step(cosine, x, x0_target, t, t_prev, p)
    assert torch.allclose(out.double(), expected, atol=1e-4)

    # the data can tell the alternatives apart: p = 1.0 (the maximum), and the U-Net's own ε after clipping
    at_max, _ = _threshold_step(cosine, x, x0_target, t, t_prev, 1.0)
    assert (at_max - expected).abs().max() > 0.05
    a_p = _abar(cosine, t_prev)
    stale = a_p**0.5 * clipped + (1 - a_p) ** 0.5 * eps_net.double()
    assert (stale - expected).abs().max() > 0.05


# -- the text encoder's attention mask ------------------------------------------------------------------------------


def test_text_encoder_masks_its_padding(tiny):
    """The 128-token padded prompt encodes exactly as the unpadded tokens alone (T5 attends to real tokens only);
    without the mask the 124 pad tokens would change every position."""
    te = tiny.text_encoder
    prompts = ["a red circle", "a large blue star in the top left"]
    ids, mask = te.tokenize(prompts)
    context, out_mask, _, _ = te.encode(prompts)
    with torch.no_grad():
        for i in range(len(prompts)):
            n = int(mask[i].sum())
            alone = te.projection(te.encoder(input_ids=ids[i : i + 1, :n]).last_hidden_state)
            assert torch.allclose(context[i : i + 1, :n], alone, atol=1e-5), prompts[i]
            assert context[i, n:].abs().sum() == 0  # padding positions are exactly zero
            unmasked = te.projection(te.encoder(input_ids=ids[i : i + 1]).last_hidden_state)[:, :n]
            assert (unmasked - alone).abs().max() > 1e-2  # the mask matters for these weights
    assert out_mask[0].tolist()[:5] == [1, 1, 1, 1, 0]


# -- RGB order from a decoded tensor to a PNG on disk ---------------------------------------------------------------

COLOUR = (230, 40, 110)  # three different channel values: any channel swap shows


def _within_one_level(a: np.ndarray, expected) -> bool:
    """8-bit conversion may truncate or round: allow one level."""
    return bool(np.abs(a.astype(int) - np.asarray(expected, dtype=int)).max() <= 1)


def test_tensor_to_pil_keeps_rgb_order():
    from kandinsky3.images import tensor_to_pil

    x = torch.tensor(COLOUR, dtype=torch.float32).reshape(1, 3, 1, 1).expand(1, 3, 4, 6) / 127.5 - 1.0
    [image] = tensor_to_pil(x)
    assert image.mode == "RGB" and image.size == (6, 4)
    assert _within_one_level(np.asarray(image), COLOUR)


def test_save_image_keeps_rgb_order(tmp_path):
    from kandinsky3 import save_image

    image = Image.new("RGB", (5, 3), COLOUR)
    save_image(image, tmp_path / "c.png")
    back = Image.open(tmp_path / "c.png")
    assert back.mode == "RGB" and np.array_equal(np.asarray(back)[0, 0], COLOUR)


def test_generated_colour_survives_to_the_png(tiny, tmp_path, monkeypatch):
    """Whatever the MoVQ decodes is what lands in the file: decode stubbed to a known colour, then the public
    generate → save_image path, read back from disk."""
    from kandinsky3 import save_image

    colour = torch.tensor(COLOUR, dtype=torch.float32).reshape(1, 3, 1, 1) / 127.5 - 1.0
    factor = tiny.latent_factor

    def decode(self, z, *args, **kwargs):
        return colour.expand(z.shape[0], 3, z.shape[-2] * factor, z.shape[-1] * factor).clone()

    monkeypatch.setattr(type(tiny.movq), "decode", decode)
    [image] = tiny.generate("a red circle", seed=0, steps=1, progress=False)
    save_image(image, tmp_path / "g.png")
    back = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    assert back.shape == (64, 64, 3) and _within_one_level(back, COLOUR)
