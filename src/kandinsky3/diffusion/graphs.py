"""The U-Net step replayed from CUDA graphs (``Kandinsky3(..., cuda_graph=True)``).

On an H200 the 3 B U-Net step at 1024² is 63.8 ms eager and 42.9 ms replayed from a graph (docs/performance.md): a
third of the eager step is the host launching kernels. :class:`GraphedStep` captures one graph per input signature
(shapes, dtypes, devices and non-tensor values of the arguments), copies each call's tensors into that graph's
static inputs, replays it and returns a copy of its static output. The U-Net makes no host sync
(``models.unet.hard_mask_attention``), so a whole step is one capture.

Weights are read from their addresses at every replay: in-place updates are seen, but swapping a parameter's
storage (offload's leases) is not — the pipeline refuses ``cuda_graph`` with ``offload``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def _signature(value: Any):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, str(value.device))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_signature(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _signature(v)) for k, v in sorted(value.items())))
    return ("value", value)


def _static_copy(value: Any):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_static_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: _static_copy(v) for k, v in value.items()}
    return value


def _copy_into(static: Any, value: Any):
    if isinstance(static, torch.Tensor):
        static.copy_(value)
    elif isinstance(static, (list, tuple)):
        for s, v in zip(static, value):
            _copy_into(s, v)
    elif isinstance(static, dict):
        for k in static:
            _copy_into(static[k], value[k])


class CudaCapture:
    """Capture ``fn`` (warmed up on a side stream first, as CUDA graphs need) into a graph sharing one memory pool."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.pool = None

    def __call__(self, fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[Callable[[], None], torch.Tensor]:
        with torch.cuda.device(device):  # streams and capture on the inputs' device, not the current one
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(self.warmup):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = fn()
        if self.pool is None:
            self.pool = graph.pool()
        return graph.replay, out


class GraphedStep:
    """``module(*args, **kwargs)`` replayed from a graph captured for the arguments' signature.

    ``capture(fn, device) -> (replay, static_output)`` makes the graph: :class:`CudaCapture` on CUDA; tests pass
    a stand-in that runs ``fn`` at each replay, which checks the static-input bookkeeping on a CPU.

    Every prompt length (the context is cropped to the longest prompt) and batch size is a signature of its own;
    the newest ``max_graphs`` are kept (their memory pool stays reserved for the pipeline's life).
    ``reset()`` drops them all: the pipeline calls it when the U-Net moves or gains an adapter."""

    def __init__(self, module: torch.nn.Module, capture: Callable | None = None, max_graphs: int = 8):
        self.module = module
        self.capture = capture if capture is not None else CudaCapture()
        self.max_graphs = max_graphs
        self.graphs: dict = {}

    def reset(self):
        self.graphs.clear()

    def parameters(self, recurse: bool = True):
        return self.module.parameters(recurse)

    @torch.no_grad()
    def __call__(self, *args, **kwargs) -> torch.Tensor:
        key = (_signature(args), _signature(kwargs))
        entry = self.graphs.get(key)
        if entry is None:
            while len(self.graphs) >= self.max_graphs:
                del self.graphs[next(iter(self.graphs))]  # the oldest
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            static_args, static_kwargs = _static_copy(args), _static_copy(kwargs)
            replay, out = self.capture(lambda: self.module(*static_args, **static_kwargs), device)
            entry = self.graphs[key] = (static_args, static_kwargs, replay, out)
        static_args, static_kwargs, replay, out = entry
        _copy_into(static_args, args)
        _copy_into(static_kwargs, kwargs)
        replay()
        return out.clone()  # the static output is overwritten by the next replay
