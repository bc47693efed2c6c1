"""The 16 GB preset (issue #19) and the offload order it relies on, checked on the CPU: which dtypes and options the
preset sets, that each component is on the compute device only while it runs, and that quantized modules stay."""

import pytest
import torch

from kandinsky3 import Kandinsky3
from kandinsky3.pipeline import MEMORY_PRESETS, is_quantized


def test_the_16gb_preset_sets_bf16_offload_and_tiling_and_explicit_options_win():
    pipe = Kandinsky3.from_pretrained("tiny", device="cpu", memory="16gb")
    assert next(pipe.unet.parameters()).dtype == torch.bfloat16 and next(pipe.movq.parameters()).dtype == torch.bfloat16
    assert pipe.offload and pipe.movq_tiling
    assert MEMORY_PRESETS["16gb"](torch.device("cuda"))["text_encoder_quantization"] == "8bit"
    assert MEMORY_PRESETS["16gb"](torch.device("cpu"))["text_encoder_quantization"] is None  # bitsandbytes: CUDA
    fp32 = Kandinsky3.from_pretrained("tiny", device="cpu", memory="16gb", dtype="fp32")
    assert next(fp32.unet.parameters()).dtype == torch.float32
    image = pipe.generate("a red circle", seed=0, steps=2, progress=False)[0]
    assert image.size == (64, 64)
    with pytest.raises(ValueError, match="unknown memory preset 'huge'"):
        Kandinsky3.from_pretrained("tiny", device="cpu", memory="huge")


def test_offload_moves_each_component_in_only_while_it_runs(monkeypatch):
    pipe = Kandinsky3.from_pretrained("tiny", device="cpu", offload=True)
    moves = []
    for name in ("text_encoder", "unet", "movq"):
        module = getattr(pipe, name)
        original = module.to

        def recording_to(*args, _name=name, _original=original, **kwargs):
            moves.append((_name, str(args[0]) if args else str(kwargs.get("device"))))
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "to", recording_to)
    pipe.generate("a red circle", seed=0, steps=2, progress=False)
    assert moves == [
        ("text_encoder", "cpu"),  # in (the compute device is the CPU here) …
        ("text_encoder", "cpu"),  # … and out
        ("unet", "cpu"),
        ("unet", "cpu"),
        ("movq", "cpu"),
        ("movq", "cpu"),
    ]


def test_quantized_modules_stay_where_they_were_loaded():
    class Int8Params(torch.nn.Parameter):  # stands in for bitsandbytes' class (matched by name)
        pass

    module = torch.nn.Linear(2, 2)
    assert not is_quantized(module)
    module.weight = Int8Params(module.weight.data)
    assert is_quantized(module)
    pipe = Kandinsky3.from_pretrained("tiny", device="cpu", offload=True)
    calls = []
    module.to = lambda *a, **k: calls.append(a)
    with pipe.placed(module):
        pass
    assert calls == []
