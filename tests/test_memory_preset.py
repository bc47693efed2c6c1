"""The 16 GB preset (issue #19) and the offload it relies on, checked on the CPU: which dtypes and options the preset
sets, that a component's weights are on the compute device only while it runs (lent, never copied back), that the
text encoder is streamed one block at a time, and that quantized modules stay where they were loaded.

A CPU "device" makes every transfer a no-op, so the tests replace the one transfer of a lease
(``offload._to_device``) by a recorded clone: a lent tensor is then a different tensor from its CPU master."""

import pytest
import torch

from kandinsky3 import Kandinsky3, offload
from kandinsky3.offload import is_quantized, lent, stream_blocks, streamed
from kandinsky3.pipeline import MEMORY_PRESETS


@pytest.fixture
def transfers(monkeypatch):
    """Every tensor a lease puts on the device (as clones), in order."""
    lent_tensors = []

    def clone(tensor, device):
        out = tensor.clone()
        lent_tensors.append(out)
        return out

    monkeypatch.setattr(offload, "_to_device", clone)
    return lent_tensors


def _is_lent(module: torch.nn.Module, masters: dict) -> bool:
    """Whether every tensor of ``module`` is a device copy (not its CPU master)."""
    return all(p.data_ptr() != masters[id(p)] for p in module.parameters())


def _masters(module):
    return {id(p): p.data_ptr() for p in module.parameters()}


def test_the_16gb_preset_sets_bf16_streaming_and_tiling_and_explicit_options_win():
    pipe = Kandinsky3.from_pretrained("tiny", device="cpu", memory="16gb")
    assert next(pipe.unet.parameters()).dtype == torch.bfloat16 and next(pipe.movq.parameters()).dtype == torch.bfloat16
    assert pipe.stream_text_encoder and pipe.movq_tiling and not pipe.offload
    preset = MEMORY_PRESETS["16gb"](torch.device("cuda"))
    assert preset["stream_text_encoder"] and not preset["offload"] and "text_encoder_quantization" not in preset
    fp32 = Kandinsky3.from_pretrained("tiny", device="cpu", memory="16gb", dtype="fp32")
    assert next(fp32.unet.parameters()).dtype == torch.float32
    image = pipe.generate("a red circle", seed=0, steps=2, progress=False)[0]
    assert image.size == (64, 64)
    with pytest.raises(ValueError, match="unknown memory preset 'huge'"):
        Kandinsky3.from_pretrained("tiny", device="cpu", memory="huge")
    with pytest.raises(ValueError, match="quantized text encoder cannot be streamed"):
        Kandinsky3.from_pretrained("tiny", device="cpu", stream_text_encoder=True, text_encoder_quantization="8bit")


def test_offload_lends_each_component_only_while_it_runs_and_copies_nothing_back(transfers):
    pipe = Kandinsky3.from_pretrained("tiny", device="cpu", offload=True)
    parts = {"text_encoder": pipe.text_encoder, "unet": pipe.unet, "movq": pipe.movq}
    masters = {name: _masters(m) for name, m in parts.items()}
    seen = []  # (the component whose layer ran, which components were on the device then)
    for name, module in parts.items():

        def watch(_module, _args, _name=name):
            seen.append((_name, sorted(n for n, m in parts.items() if _is_lent(m, masters[n]))))

        for leaf in module.modules():
            if not list(leaf.children()) and list(leaf.parameters(recurse=False)):
                leaf.register_forward_pre_hook(watch)
    pipe.generate("a red circle", seed=0, steps=2, progress=False)
    order = [name for i, (name, _) in enumerate(seen) if i == 0 or seen[i - 1][0] != name]
    assert order == ["text_encoder", "unet", "movq"]
    assert all(on == [name] for name, on in seen)  # only the running component is on the device
    assert all(_masters(m) == masters[name] for name, m in parts.items())  # every CPU master back in place
    n_params = sum(len(list(m.parameters())) + len(list(m.buffers())) for m in parts.values())
    assert len(transfers) == n_params  # each tensor lent once per run (the text encoder for both prompts at once)


def test_the_streamed_text_encoder_holds_one_block_at_a_time_and_encodes_the_same(transfers):
    pipe = Kandinsky3.from_pretrained("tiny", device="cpu")
    te = pipe.text_encoder
    reference = te.encode(["a red circle", "two blue squares"], None)[0]
    blocks = stream_blocks(te)
    assert len(blocks) == te.encoder.config.num_layers  # the T5 stack's blocks, not a block's own layer list
    masters = [_masters(b) for b in blocks]
    resident = []

    def watch(index):
        def hook(_module, _args):
            resident.append([i for i, b in enumerate(blocks) if _is_lent(b, masters[i])])

        return hook

    with streamed(te, "cpu"):  # (the watchers after streamed's own hooks: they see what a block runs with)
        handles = [b.register_forward_pre_hook(watch(i)) for i, b in enumerate(blocks)]
        out = te.encode(["a red circle", "two blue squares"], None)[0]
    for h in handles:
        h.remove()
    assert resident == [[i] for i in range(len(blocks))]  # block i, and only block i, while block i runs
    assert torch.equal(out, reference)
    assert all(not _is_lent(b, masters[i]) for i, b in enumerate(blocks))  # all returned
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in blocks)  # hooks removed


def test_the_16gb_pipeline_streams_the_encoder_and_gives_the_same_image(transfers):
    plain = Kandinsky3.from_pretrained("tiny", device="cpu", dtype="bf16", movq_tiling=True)
    preset = Kandinsky3.from_pretrained("tiny", device="cpu", memory="16gb")
    a = plain.generate("a red circle", seed=3, steps=2, progress=False)[0]
    n = len(transfers)
    b = preset.generate("a red circle", seed=3, steps=2, progress=False)[0]
    te_tensors = len(list(preset.text_encoder.parameters())) + len(list(preset.text_encoder.buffers()))
    assert n == 0 and len(transfers) == te_tensors  # only the text encoder is lent, each tensor once
    assert a.tobytes() == b.tobytes()


def test_a_block_that_raises_still_returns_its_weights(transfers):
    net = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)]))
    blocks = stream_blocks(net)
    masters = [_masters(b) for b in blocks]
    blocks[1].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"), streamed(net, "cpu"):
        x = torch.ones(1, 3)
        for b in blocks:
            x = b(x)
    assert all(not _is_lent(b, masters[i]) for i, b in enumerate(blocks))
    with pytest.raises(ValueError, match="no ModuleList"):
        stream_blocks(torch.nn.Linear(2, 2))


def test_a_lend_that_fails_halfway_gives_back_what_it_lent(monkeypatch):
    net = torch.nn.Module()
    net.blocks = torch.nn.ModuleList([torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)])
    masters = _masters(net)
    calls = []

    def third_fails(tensor, device):
        calls.append(tensor)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("synthetic: device full")
        return tensor.clone()

    monkeypatch.setattr(offload, "_to_device", third_fails)
    with pytest.raises(torch.OutOfMemoryError), lent(net, "cpu"):
        pass
    assert _masters(net) == masters  # the two tensors lent before the failure are back on their masters
    with pytest.raises(RuntimeError, match="does not nest"), streamed(net, "cpu"), streamed(net, "cpu"):
        pass


def test_lent_swaps_and_restores_and_quantized_modules_stay(transfers):
    module = torch.nn.Linear(2, 2)
    master = module.weight.data
    with lent(module, "cpu"):
        assert module.weight.data_ptr() != master.data_ptr() and torch.equal(module.weight.data, master)
    assert module.weight.data_ptr() == master.data_ptr()

    class Int8Params(torch.nn.Parameter):  # stands in for bitsandbytes' class (matched by name)
        pass

    assert not is_quantized(module)
    module.weight = Int8Params(module.weight.data)
    assert is_quantized(module)
    pipe = Kandinsky3.from_pretrained("tiny", device="cpu", offload=True)
    n = len(transfers)
    with pipe.placed(module):
        pass
    assert len(transfers) == n


def test_quantization_is_checked_before_loading(monkeypatch):
    import importlib.util

    from kandinsky3.pipeline import check_quantization

    with pytest.raises(ValueError, match="needs a CUDA device"):
        check_quantization("8bit", torch.device("cpu"))
    with pytest.raises(ValueError, match="'8bit' or '4bit'"):
        check_quantization("2bit", torch.device("cuda"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match=r"\.\[quantization\]") as info:
        check_quantization("4bit", torch.device("cuda"))
    assert info.value.name == "bitsandbytes"
    check_quantization(None, torch.device("cpu"))  # nothing asked, nothing checked
