"""Golden values for the schedule, timesteps, thresholding, the official DDIM-η step, Flash and guidance."""

import pytest
import torch

from kandinsky3.diffusion import (
    Conditioning,
    Denoiser,
    NoiseSchedule,
    dynamic_threshold,
    flash_timesteps,
    official_timesteps,
    sample_ddim,
    sample_flash,
)


@pytest.fixture(scope="module")
def cosine():
    return NoiseSchedule.named("cosine")


def test_alpha_bar_golden_values(cosine):
    ab = cosine.alphas_cumprod
    assert ab.dtype == torch.float32 and len(ab) == 1000
    for t, value, rel in [
        (0, 0.999959, 1e-6),
        (229, 0.86877, 1e-4),
        (479, 0.52500, 1e-4),
        (729, 0.16685, 1e-4),
        (979, 9.71e-4, 1e-3),
        (999, 2.43e-9, 1e-2),
    ]:
        assert abs(ab[t].item() - value) <= rel * value, t


def test_cosine_equals_diffusers_squaredcos(cosine):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    assert torch.allclose(cosine.alphas_cumprod, ref, rtol=1e-6, atol=0)


def test_linear_alpha_bar_golden_values():
    ab = NoiseSchedule.named("linear").alphas_cumprod
    for t, value in [(979, 6.0e-5), (729, 4.5e-3), (479, 0.0958), (229, 0.578)]:
        assert abs(ab[t].item() - value) <= 0.01 * value


def test_timestep_lists():
    t50 = official_timesteps(50)
    assert t50[:3] == [999, 979, 959] and t50[-3:] == [39, 19, 0] and len(t50) == 51
    t25 = official_timesteps(25)
    assert t25[:2] == [999, 959] and t25[-2:] == [39, 0] and len(t25) == 26
    assert flash_timesteps(4) == [979, 729, 479, 229]
    # steps that do not divide 1000: the official `-1000 // steps` is a ceil stride (30 → 34, not 33)
    t30 = official_timesteps(30)
    assert t30 == [999 - 34 * k for k in range(30)] + [0] and t30[-2] == 13
    assert official_timesteps(7) == [999, 856, 713, 570, 427, 284, 141, 0]  # stride 143
    assert all(len(official_timesteps(n)) - 1 <= n for n in range(1, 101))  # never more U-Net calls than steps
    assert flash_timesteps(3) == [979, 645, 311]  # stride 334
    with pytest.raises(ValueError, match="steps"):
        official_timesteps(0)


def test_dynamic_threshold():
    """s = max(quantile(|x0|, p), 1) per sample, x0 → clip(x0, ±s)/s, with data where every part shows:
    sample 0 has |x| = 1, 2, …, 100 (quantile 0.99 = 1 + 0.99·99 = 99.01, not the maximum 100), sample 1 stays
    within ±0.5 (s clamps to 1: unchanged), sample 2 is small but for one outlier (quantile < 1, so s = 1 and the
    outlier is clipped to −1, nothing rescaled)."""
    signs = torch.tensor([1.0, -1.0]).repeat(50)
    big = torch.arange(1.0, 101.0) * signs
    small = torch.linspace(-0.5, 0.5, 100)
    outliers = small.clone()
    outliers[90] = -7.0  # 1 value in 100: the 0.99 quantile is 0.5 + 0.01·6.5 = 0.565 < 1
    x = torch.stack([big, small, outliers]).reshape(3, 1, 1, 100)
    y = dynamic_threshold(x, 0.99)

    s = 1 + 0.99 * 99  # linear-interpolated quantile of 1..100 at 0.99
    assert torch.allclose(y[0].flatten(), big.clamp(-s, s) / s, atol=1e-6)
    assert y[0].flatten()[99].item() == pytest.approx(-1.0) and y[0].flatten()[49].item() == pytest.approx(-50 / s)
    assert torch.equal(y[1], x[1])
    assert torch.equal(y[2].flatten(), outliers.clamp(-1, 1))
    # a lower percentile clips more: 0.5 → s = 50.5
    assert dynamic_threshold(x, 0.5)[0].flatten()[49].item() == pytest.approx(-50 / 50.5)


def test_ddim_eta1_step_is_the_official_formula(cosine):
    """One step with a constant ε: compare with the hand-written formula of spec §4.2."""
    eps_value = torch.full((1, 4, 2, 2), 0.3)
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out = sample_ddim(lambda x_t, t: eps_value, x, cosine, [999, 979], g1, eta=1.0, threshold_percentile=None)
    a_t, a_p = cosine.alphas_cumprod[999], cosine.alphas_cumprod[979]
    x0 = (x - (1 - a_t).sqrt() * eps_value) / a_t.sqrt()
    var = (1 - a_t / a_p) * (1 - a_p) / (1 - a_t)
    expected = a_p.sqrt() * x0 + (1 - a_p - var).sqrt() * eps_value + var.sqrt() * torch.randn(x.shape, generator=g2)
    assert torch.allclose(out, expected, atol=1e-5)


def test_last_step_uses_alpha_bar_0_and_no_noise(cosine):
    x0 = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1)) * 0.5
    x_t = cosine.q_sample(x0, 19, torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(2)))
    true_eps = cosine.eps_from_x0(x_t, 19, x0)
    out = sample_ddim(lambda x, t: true_eps, x_t, cosine, [19, 0], None, threshold_percentile=None)
    a0, a19 = cosine.alphas_cumprod[0], cosine.alphas_cumprod[19]
    var = (1 - a19 / a0) * (1 - a0) / (1 - a19)
    assert torch.allclose(out, a0.sqrt() * x0 + (1 - a0 - var).sqrt() * true_eps, atol=1e-5)  # no noise term
    assert (out - x0).abs().max() < (1 - a0).sqrt() * true_eps.abs().max()  # ≈ 0.99998·x0 + a tiny ε term


def test_flash_renoises_with_fresh_noise_each_step(cosine):
    seen = []

    def denoise(x_t, t):
        seen.append((t, x_t.clone()))
        return torch.zeros_like(x_t)

    x = torch.zeros(1, 4, 2, 2)
    g = torch.Generator().manual_seed(3)
    out = sample_flash(denoise, x, cosine, [979, 729, 479, 229], g)
    assert [t for t, _ in seen] == [979, 729, 479, 229]
    # ε = 0 means x0 = x_t/√ᾱ_t; the next x_t must be √ᾱ·x0 + √(1−ᾱ)·z with a NEW z
    g_ref = torch.Generator().manual_seed(3)
    img = x
    for t, x_t in seen:
        z = torch.randn(x.shape, generator=g_ref)
        assert torch.allclose(x_t, cosine.q_sample(img, t, z), atol=1e-6)
        img = x_t / cosine.alphas_cumprod[t].sqrt()
    assert torch.allclose(out, img)


class _RecordingUNet(torch.nn.Module):
    """ε = 1 for rows whose context starts with +1 (cond), −1 otherwise; records the batch it saw."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, x, time, context=None, context_mask=None, **other_inputs):
        mask = context_mask
        self.calls.append((x.shape[0], context[:, 0, 0].clone(), mask.clone()))
        return torch.ones_like(x) * context[:, 0, 0].reshape(-1, 1, 1, 1)


def test_guidance_formula_and_cond_first_order():
    unet = _RecordingUNet()
    cond = Conditioning(
        torch.ones(2, 3, 4),
        torch.ones(2, 3, dtype=torch.long),
        -torch.ones(2, 3, 4),
        torch.tensor([[1, 0, 0], [1, 0, 0]]),
    )
    eps = Denoiser(unet, cond, guidance_weight=3.0)(torch.zeros(2, 4, 2, 2), 500)
    batch, first_values, mask = unet.calls[0]
    assert batch == 4
    assert first_values.tolist() == [1, 1, -1, -1]  # condition first, then unconditional
    assert mask.dtype == torch.long and mask[2:].sum() == 2
    assert torch.allclose(eps, torch.full_like(eps, 3.0 + 1.0 + 3.0))  # (w+1)·1 − w·(−1)


def test_no_guidance_runs_one_batch():
    unet = _RecordingUNet()
    cond = Conditioning(torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.long))
    Denoiser(unet, cond, guidance_weight=3.0)(torch.zeros(2, 4, 2, 2), 500)
    assert unet.calls[0][0] == 2


def test_one_timestep_needs_no_copy_to_the_latents_device():
    """The sampler loop makes no host-to-device copy for ᾱ_t (a blocking copy syncs the GPU stream every step):
    one timestep gives a 0-dim CPU tensor that ops on any device take as a scalar. Here the latents live on the meta
    device, where no copy could be hidden; per-sample timesteps (training) still gather on their own device."""
    from kandinsky3.diffusion.schedule import NoiseSchedule

    schedule = NoiseSchedule.named("cosine")
    x = torch.empty(2, 4, 8, 8, device="meta")
    a = schedule.abar(500, x)
    assert a.device.type == "cpu" and a.ndim == 0 and a.dtype == torch.float32
    assert a.item() == schedule.alphas_cumprod[500].item()
    assert schedule.q_sample(x, 500, x).device.type == "meta"  # the scalar mixes with the meta latents
    per_sample = schedule.abar(torch.tensor([1, 999]), torch.empty(2, 4, 8, 8))
    assert per_sample.shape == (2, 1, 1, 1) and per_sample[1, 0, 0, 0] == schedule.alphas_cumprod[999]
    # the training recipes' and the inpainting eval's (B,) values: the table's own entries, from one copy per device
    t = torch.tensor([3, 3, 700])
    flat = schedule.abar_per_sample(t)
    assert flat.shape == (3,) and torch.equal(flat, schedule.alphas_cumprod[t])
    assert torch.equal(schedule.abar_per_sample(t.float()), flat)  # float timesteps, as the U-Net wrapper gets them
    assert list(schedule._tables) == [torch.device("cpu")]  # one copy of the table, reused
