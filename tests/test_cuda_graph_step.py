"""The CUDA-graph U-Net step (``cuda_graph=True``, issue #19) checked on the CPU: graph capture itself needs CUDA
(the GPU suite's ``unet_graph`` row measures it: identical to eager on an H200), so a stand-in capture that reruns
the captured function at each replay checks everything around it — one capture per input signature, each call's
inputs copied into the graph's static inputs, outputs not aliased to the static output, the same image as eager."""

import pytest
import torch

from kandinsky3 import Kandinsky3
from kandinsky3.checkpoints import Components
from kandinsky3.diffusion.graphs import GraphedStep


class StandInCapture:
    """Runs ``fn`` once to "capture" (as the warm-up and capture would) and again at every replay, writing into the
    static output as a replayed graph does."""

    def __init__(self):
        self.captures = 0

    def __call__(self, fn, device):
        assert device == torch.device("cpu")  # the inputs' device, where the capture must happen
        self.captures += 1
        out = fn()

        def replay():
            out.copy_(fn())

        return replay, out


def _inputs(unet, batch, seed):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(batch, c.num_channels, 8, 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    context = torch.randn(batch, 5, c.context_dim, generator=g)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return x, t, context, mask


def test_one_capture_per_signature_and_every_call_sees_its_own_inputs(tiny):
    unet = tiny.unet
    capture = StandInCapture()
    step = GraphedStep(unet, capture)
    outs = []
    for seed in range(3):
        x, t, context, mask = _inputs(unet, 2, seed)
        out = step(x, t, context, mask)
        with torch.no_grad():
            assert torch.equal(out, unet(x, t, context, mask))
        outs.append(out)
    assert capture.captures == 1  # same shapes: the graph is reused
    assert not torch.equal(outs[0], outs[1])  # earlier results are copies, not the (overwritten) static output
    x, t, context, mask = _inputs(unet, 3, 7)
    with torch.no_grad():
        assert torch.equal(step(x, t, context, mask), unet(x, t, context, mask))
    assert capture.captures == 2 and len(step.graphs) == 2  # a new batch size is a new graph
    step(*_inputs(unet, 2, 9), context_lengths=None)
    assert capture.captures == 3  # a keyword is part of the signature


def test_the_graphed_pipeline_gives_the_eager_image(tiny):
    graphed = Kandinsky3(Components(tiny.variant, tiny.unet, tiny.movq, tiny.text_encoder), device="cpu")
    capture = StandInCapture()
    graphed.graphed_unet = GraphedStep(graphed.unet, capture)
    a = tiny.generate("a red circle", seed=4, steps=4, guidance=3.0, progress=False)[0]
    b = graphed.generate("a red circle", seed=4, steps=4, guidance=3.0, progress=False)[0]
    assert a.tobytes() == b.tobytes()
    assert capture.captures == 1  # the guided pair, one shape for every step


def test_only_the_newest_graphs_are_kept_and_reset_drops_them(tiny):
    step = GraphedStep(tiny.unet, StandInCapture(), max_graphs=2)
    for batch in (1, 2, 3):
        step(*_inputs(tiny.unet, batch, batch))
    assert [k[0][1][0][1][0] for k in step.graphs] == [2, 3]  # batch 1's graph, the oldest, was dropped
    step.reset()
    assert step.graphs == {}


def test_cuda_graph_refuses_a_cpu_and_offload_before_loading_and_on_moves(tiny):
    parts = Components(tiny.variant, tiny.unet, tiny.movq, tiny.text_encoder)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Kandinsky3(parts, device="cpu", cuda_graph=True)
    with pytest.raises(ValueError, match="cannot be combined with offload"):
        Kandinsky3(parts, device="cpu", cuda_graph=True, offload=True)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Kandinsky3.from_pretrained("tiny", device="cpu", cuda_graph=True)
    graphed = Kandinsky3(parts, device="cpu")
    graphed.graphed_unet = GraphedStep(graphed.unet, StandInCapture())
    with pytest.raises(ValueError, match="cannot move to cpu"):
        graphed.to("cpu")
