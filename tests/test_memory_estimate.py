"""``pipeline.estimate_memory`` against the truth: the peak of the live tensors of a U-Net forward and of a MoVQ
decode, traced on the meta device (full-size models cost nothing there), for the packaged architectures at several
sizes. The estimate's element counts must match the trace within a few percent; before this test they were up to 7×
too low (a nano batch of 100 000 pictures, ≈ 80 GiB of live tensors, passed the check)."""

from __future__ import annotations

import functools
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kandinsky3.models.movq import MoVQ
from kandinsky3.models.unet import UNet
from kandinsky3.pipeline import _decoder_activations, _unet_activations, estimate_memory
from kandinsky3.registry import VARIANTS


class LivePeak(TorchDispatchMode):
    """The peak bytes of the tensor storages that ops create inside the mode and that are still referenced (views
    share their base's storage; ``known`` storages, the weights and inputs, are not counted)."""

    def __init__(self, known):
        super().__init__()
        self.known = {t.untyped_storage()._cdata for t in known}
        self.live: dict[int, list[int]] = {}  # storage → [bytes, tensors referencing it]
        self.now = self.peak = 0

    def _release(self, key):
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[key]
            self.now -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self.known:
                continue
            if key in self.live:
                self.live[key][1] += 1
            else:
                self.live[key] = [storage.nbytes(), 1]
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
            weakref.finalize(t, self._release, key)
        return out


def _fused_attention(q, k, v, attn_mask=None, **_):
    """A stand-in for a fused SDPA kernel: the output only, no score matrices (on meta, SDPA runs the math path)."""
    return torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)


def _traced_unet(config, h, w, tokens=128):
    with torch.device("meta"):
        net = UNet(config).eval()
        x, t = torch.randn(1, config.num_channels, h, w), torch.zeros(1)
        context, mask = torch.randn(1, tokens, config.context_dim), torch.ones(1, tokens, dtype=torch.bool)
    with torch.no_grad(), LivePeak([*net.parameters(), *net.buffers(), x, t, context, mask]) as trace:
        net(x, t, context, mask)
    return trace.peak / 4  # fp32 elements


def _traced_decode(config, h, w):
    with torch.device("meta"):
        movq = MoVQ(config).eval()
        z = torch.randn(1, config.embed_dim, h, w)
    with torch.no_grad(), LivePeak([*movq.parameters(), z]) as trace:
        movq.decode_untiled(z)
    return trace.peak / 4


CASES = [("nano", 64), ("nano", 256), ("tiny", 128), ("small", 512), ("base", 512), ("base", 1024)]


@pytest.mark.parametrize("name,size", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_element_counts_match_a_live_trace(name, size, monkeypatch):
    variant = VARIANTS[name]
    latent = size // variant.movq.downsample_factor
    monkeypatch.setattr(F, "scaled_dot_product_attention", _fused_attention)
    unet, decode = _traced_unet(variant.unet, latent, latent), _traced_decode(variant.movq, latent, latent)
    assert 0.97 <= _unet_activations(variant.unet, latent, latent, False) / unet <= 1.1
    assert 0.97 <= _decoder_activations(variant.movq, size, size, False) / decode <= 1.1


@pytest.mark.parametrize("name,size", [("nano", 256), ("base", 512)])
def test_score_matrices_are_counted_for_unfused_attention(name, size):
    """On meta, SDPA is the math path: it stores the scores and their softmax, which ``attention_scores`` adds."""
    variant = VARIANTS[name]
    latent = size // variant.movq.downsample_factor
    assert 0.9 <= _unet_activations(variant.unet, latent, latent, True) / _traced_unet(variant.unet, latent, latent)
    assert _unet_activations(variant.unet, latent, latent, True) / _traced_unet(variant.unet, latent, latent) <= 1.1
    decode = _decoder_activations(variant.movq, size, size, True) / _traced_decode(variant.movq, latent, latent)
    assert 0.97 <= decode <= 1.1


def test_batch_dtype_tiles_and_slack():
    nano, base = VARIANTS["nano"], VARIANTS["base"]
    # many pictures: the U-Net's batch dominates and grows with them
    assert 1.95 < estimate_memory(nano, 64, 64, 2000) / estimate_memory(nano, 64, 64, 1000) < 2.05
    # few large ones: the decode dominates and takes two at a time, so a third adds only its finished picture
    third = estimate_memory(base, 1024, 1024, 3) - estimate_memory(base, 1024, 1024, 2)
    assert 0 < third < 10 * 2**20
    assert estimate_memory(base, 1024, 1024, 1, element_bytes=2) < 0.6 * estimate_memory(base, 1024, 1024, 1)
    assert estimate_memory(base, 4096, 4096, 1, tiled=True) < estimate_memory(base, 4096, 4096, 1) / 8
    assert estimate_memory(base, 1024, 1024, 1, device_type="cuda") < estimate_memory(base, 1024, 1024, 1)


@pytest.fixture
def no_loading(monkeypatch):
    """The CLI's check runs before loading: a run that passes it reaches ``from_pretrained``, which raises here."""
    from kandinsky3.pipeline import Kandinsky3

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Kandinsky3, "from_pretrained", must_not_load)


def _refusal(monkeypatch, capsys, tmp_path, gib, *args):
    """``kandinsky3 generate x ARGS`` on a CPU of ``gib`` GiB: the refusal's message, or None when the run got past
    the check (and reached the loader)."""
    from kandinsky3 import cli, pipeline

    monkeypatch.setattr(pipeline, "device_memory", lambda device: gib * 2**30)
    argv = ["generate", "x", "--device", "cpu", "--out", str(tmp_path / "x.png"), *args]
    try:
        status = cli.main(argv)
    except AssertionError as error:
        if "the model was loaded" in str(error):
            return None
        raise
    assert status == 2 and list(tmp_path.iterdir()) == []
    return capsys.readouterr().err


def test_cli_refuses_a_batch_that_cannot_fit_before_loading(monkeypatch, capsys, tmp_path, no_loading):
    """5 000 nano pictures need ≈ 8 GiB (measured on the CPU: 1.55 MB of process memory per 64² picture); the
    old estimate said 0.6 GiB and the run started."""
    err = _refusal(monkeypatch, capsys, tmp_path, 4, "--num-images", "5000")
    assert "5000 × 64x64 needs an estimated" in err and "fewer --num-images" in err
    # one branch at guidance 0: half the U-Net's batch
    assert _refusal(monkeypatch, capsys, tmp_path, 6, "--num-images", "5000") is not None
    assert _refusal(monkeypatch, capsys, tmp_path, 6, "--num-images", "5000", "--guidance", "0") is None


def test_cli_reads_dtype_and_the_memory_preset(monkeypatch, capsys, tmp_path, no_loading):
    """Base at 1024² on 7 GiB: one picture fits in bf16 (the preset's dtype or --dtype), not in fp32; four do not
    fit even with the preset, whose tiling is then not suggested again (its tile is the whole 1024² picture)."""
    refusal = functools.partial(_refusal, monkeypatch, capsys, tmp_path, 7, "--model", "base")
    assert refusal("--memory", "16gb") is None
    assert refusal("--dtype", "bf16") is None
    assert "1 × 1024x1024 needs" in refusal("--memory", "16gb", "--dtype", "fp32")
    assert "fewer --num-images or --movq-tiling" in refusal("--dtype", "bf16", "--num-images", "4")
    err = refusal("--memory", "16gb", "--num-images", "4")
    assert "fewer --num-images" in err and "--movq-tiling" not in err


def test_cli_estimates_a_batch_from_a_prompts_file(monkeypatch, capsys, tmp_path, no_loading):
    """``--prompts FILE --batch-size N`` runs up to N items as one sampler run: 5 000 of them on 4 GiB are refused
    before loading, naming --batch-size; one at a time they pass. An inpainting model is refused before loading."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a red circle {i}\n" for i in range(5000)))
    out = tmp_path / "out"
    batch = ["--prompts", str(prompts), "--out-dir", str(out)]
    from kandinsky3 import cli, pipeline

    monkeypatch.setattr(pipeline, "device_memory", lambda device: 4 * 2**30)
    assert cli.main(["generate", "--device", "cpu", *batch, "--batch-size", "5000"]) == 2
    err = capsys.readouterr().err
    assert "5000 × 64x64 needs an estimated" in err and "a smaller --batch-size" in err and not out.exists()
    with pytest.raises(AssertionError, match="the model was loaded"):
        cli.main(["generate", "--device", "cpu", *batch, "--batch-size", "1"])
    # the model's task is checked before loading too (it used to reach the download of the inpainting U-Net)
    assert cli.main(["generate", "--device", "cpu", *batch, "--model", "inpainting"]) == 2
    assert "kandinsky3 inpaint" in capsys.readouterr().err and not out.exists()
