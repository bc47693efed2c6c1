"""Our U-Net and MoVQ against diffusers' Kandinsky3UNet / VQModel with weights converted by our key maps."""

import pytest
import torch

from kandinsky3.checkpoints import keymaps
from kandinsky3.models import MoVQ, MoVQConfig, UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")

UNET_CFG = UNetConfig(
    model_channels=32,
    init_channels=16,
    time_embed_dim=64,
    context_dim=48,
    groups=8,
    head_dim=16,
    dim_mult=(1, 2, 2, 4),
    num_blocks=(2, 2, 2, 2),
)
MOVQ_CFG = MoVQConfig(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(4,), resolution=32)


def _randomise(module, std):
    g = torch.Generator().manual_seed(0)
    for p in module.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def _diffusers_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def unet_pair():
    ours = _randomise(UNet(UNET_CFG), 0.2)
    g = torch.Generator().manual_seed(1)
    projection = {
        "0.weight": torch.randn(48, 48, generator=g) * 0.1,
        "1.weight": torch.rand(48, generator=g) + 0.5,
        "1.bias": torch.randn(48, generator=g) * 0.1,
    }
    theirs = diffusers.Kandinsky3UNet(**_diffusers_kwargs(keymaps.unet_config_to_diffusers(UNET_CFG))).eval()
    theirs.load_state_dict(keymaps.unet_to_diffusers(ours.state_dict(), projection), strict=True)
    return ours, theirs, projection


def _project(raw, projection):
    return torch.nn.functional.layer_norm(
        raw @ projection["0.weight"].T, (48,), projection["1.weight"], projection["1.bias"]
    )


def test_unet_matches_diffusers(unet_pair):
    ours, theirs, projection = unet_pair
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 16, 24, generator=g)
    t = torch.tensor([999.0, 19.0])
    raw = torch.randn(2, 7, 48, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]])
    with torch.no_grad():
        a = ours(x, t, _project(raw, projection), mask)
        b = theirs(x, t, raw, mask).sample
    assert a.shape == (2, 4, 16, 24)
    assert a.abs().mean() > 0.05  # not a trivially small output
    assert (a - b).abs().max() <= 1e-5


def test_unet_without_mask_matches_diffusers(unet_pair):
    ours, theirs, projection = unet_pair
    g = torch.Generator().manual_seed(3)
    x, raw = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 48, generator=g)
    with torch.no_grad():
        a = ours(x, torch.tensor([500.0]), _project(raw, projection), torch.ones(1, 5, dtype=torch.long))
        b = theirs(x, torch.tensor([500.0]), raw, torch.ones(1, 5, dtype=torch.long)).sample
    assert (a - b).abs().max() <= 1e-5


def test_fully_masked_row_is_uniform_attention():
    """The official -finfo.max fill gives a uniform softmax when no key is attended; SDPA alone would give NaN."""
    from kandinsky3.models.unet import hard_mask_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 3, 4, generator=g) for _ in range(3))
    mask = torch.tensor([[0, 0, 0], [1, 1, 0]])
    out = hard_mask_attention(q, k, v, mask)
    assert torch.allclose(out[0], v[0].mean(dim=1, keepdim=True).expand(2, 3, 4), atol=1e-6)
    logits = (q[1] @ k[1].transpose(-1, -2)) / 2.0
    logits[..., 2] = -torch.finfo(torch.float32).max
    assert torch.allclose(out[1], logits.softmax(-1) @ v[1], atol=1e-6)


@pytest.fixture(scope="module")
def movq_pair():
    ours = _randomise(MoVQ(MOVQ_CFG), 0.1)
    cfg = _diffusers_kwargs(keymaps.movq_config_to_diffusers(MOVQ_CFG))
    cfg["num_vq_embeddings"] = 16
    theirs = diffusers.VQModel(**cfg).eval()
    theirs.load_state_dict(keymaps.movq_to_diffusers(ours.state_dict(), num_vq_embeddings=16), strict=True)
    return ours, theirs


def test_movq_matches_diffusers(movq_pair):
    ours, theirs = movq_pair
    image = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        z, z_ref = ours.encode(image), theirs.encode(image).latents
        x, x_ref = ours.decode(z), theirs.decode(z, force_not_quantize=True).sample
    assert z.shape == (2, 4, 4, 6)
    assert (z - z_ref).abs().max() <= 1e-5
    assert x.abs().mean() > 0.05
    assert (x - x_ref).abs().max() <= 1e-5


def test_tiled_equals_untiled_when_one_tile_covers_everything(movq_pair):
    ours, _ = movq_pair
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(ours.decode(z, tiled=True), ours.decode(z, tiled=False))


def test_tiled_decode_shape_and_blend():
    """Latent larger than one tile: full-size output; rows in an overlap are the linear cross-fade of two tiles.

    Tile = 32 px (4 latents), stride 3 latents, blend 8 px, each tile cropped to 24 px (spec §5.4 scaled down).
    """
    movq = _randomise(MoVQ(MOVQ_CFG, tile_sample_min_size=32), 0.1)
    z = torch.randn(1, 4, 10, 14, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        tiled = movq.decode(z, tiled=True)
        top, below = movq.decode_untiled(z[..., 0:4, 0:4]), movq.decode_untiled(z[..., 3:7, 0:4])
        enc = movq.encode(torch.randn(1, 3, 80, 112, generator=torch.Generator().manual_seed(7)), tiled=True)
    assert tiled.shape == (1, 3, 80, 112)
    assert enc.shape == (1, 4, 10, 14)
    assert torch.allclose(tiled[..., :24, :24], top[..., :24, :24])
    for y in range(8):
        w = y / 8
        expected = top[..., 24 + y, :24] * (1 - w) + below[..., y, :24] * w
        assert torch.allclose(tiled[..., 24 + y, :24], expected, atol=1e-6), y


def test_fast_decode_variants_keep_the_output(movq_pair):
    """channels_last changes nothing beyond float rounding; bf16 changes it only by bf16 rounding."""
    ours, _ = movq_pair
    z = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(8))
    fast = MoVQ(MOVQ_CFG).eval()
    fast.load_state_dict(ours.state_dict())
    with torch.no_grad():
        ref = ours.decode(z)
        fast.to(memory_format=torch.channels_last)
        assert torch.allclose(fast.decode(z.contiguous(memory_format=torch.channels_last)), ref, atol=1e-5)
        fast.to(torch.bfloat16)
        low = fast.decode(z.to(torch.bfloat16)).float()
    scale = ref.abs().max()
    assert (low - ref).abs().max() <= 0.05 * scale  # a few bf16 ulps through ~20 layers
    assert (low - ref).abs().max() > 0  # it did run in bf16


@pytest.mark.parametrize(
    "feature, latent",
    [((8, 12), (8, 12)), ((16, 24), (8, 12)), ((64, 96), (8, 12)), ((24, 36), (8, 12)), ((20, 20), (8, 8)),
     ((12, 12), (9, 9))],
)  # fmt: skip
def test_spatial_norm_modulates_at_the_latents_resolution_like_the_official_order(feature, latent):
    """Whole-number upsampling (×1, ×2, ×8, ×3): the modulation computed at zq's resolution and broadcast; the others
    (20/8, 12/9) take the official order. Both equal the formula GroupNorm(f) · conv_y(up(zq)) + conv_b(up(zq))."""
    from kandinsky3.models.movq import SpatialNorm

    g = torch.Generator().manual_seed(feature[0])
    norm = _randomise(SpatialNorm(16, 4, 4), 0.3)
    f, zq = torch.randn(2, 16, *feature, generator=g), torch.randn(2, 4, *latent, generator=g)
    up = torch.nn.functional.interpolate(zq, size=feature, mode="nearest")
    with torch.no_grad():
        expected = norm.norm_layer(f) * norm.conv_y(up) + norm.conv_b(up)
        out = norm(f, zq)
        last = norm(f.contiguous(memory_format=torch.channels_last), zq)
    assert out.shape == f.shape and out.is_contiguous()
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (last - expected).abs().max() <= 1e-5 * expected.abs().max()
