"""Weights that live in CPU memory and are lent to the compute device only while a module runs.

``lent(module, device)`` lends a whole component (the U-Net for a sampling run); ``streamed(module, device)`` lends
a transformer's blocks one at a time as its forward reaches them (the 8.6 B FLAN-UL2 encoder: 17.7 GB in bf16, so a
16 GB card never holds more than one 0.5 GB block of it). A lease swaps each parameter's and buffer's ``.data`` for a
device copy and back to the untouched CPU master at the end: nothing is copied back to the CPU, unlike
``module.to("cpu")``. On CUDA the masters are pinned once, so the copies are fast and asynchronous (torch's pinned
allocator rounds each tensor up to a power of two and keeps the memory for the process's life).

Each block is copied on the compute stream just before it runs; prefetching the next block on a side stream would
overlap the copies with compute (not done: the GPU suite's streamed-encoder row says whether it is worth it).
"""

from __future__ import annotations

import contextlib

import torch


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds bitsandbytes 8/4-bit weights (which cannot be moved: they stay where loaded)."""
    return any(type(p).__name__ in ("Int8Params", "Params4bit") for p in module.parameters())


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The one transfer of a lease (tests replace it to watch what is lent when)."""
    return tensor.to(device, non_blocking=True)


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


class _Lease:
    """Device copies of ``tensors`` for the length of a ``with``; the CPU masters come back at its end."""

    def __init__(self, tensors: list[torch.Tensor], device: torch.device):
        self.tensors, self.device = tensors, device
        if device.type == "cuda":  # once: pinned masters make every later copy a fast asynchronous DMA
            for t in tensors:
                if t.device.type == "cpu" and not t.data.is_pinned():
                    try:
                        t.data = t.data.pin_memory()
                    except RuntimeError:  # no pinnable memory (locked-memory limits, some VMs): plain copies then
                        break
        self.masters: list[torch.Tensor] | None = None

    def __enter__(self):
        self.masters = [t.data for t in self.tensors]
        done = 0
        try:
            for t, m in zip(self.tensors, self.masters):
                t.data = _to_device(m, self.device)
                done += 1
        except BaseException:  # out of device memory halfway: give back what was lent, keep the masters
            for t, m in zip(self.tensors[:done], self.masters):
                t.data = m
            self.masters = None
            raise
        return self

    def __exit__(self, *exc):
        for t, m in zip(self.tensors, self.masters):
            t.data = m
        self.masters = None
        return False


@contextlib.contextmanager
def lent(module: torch.nn.Module, device):
    """``module``'s weights on ``device`` inside the ``with``, its CPU masters again after it."""
    lease = _Lease(_tensors(module), torch.device(device))
    try:
        with lease:
            yield module
    finally:
        _release_cache(lease.device)


def stream_blocks(module: torch.nn.Module) -> torch.nn.ModuleList:
    """The blocks ``streamed`` lends one at a time: the ``ModuleList`` holding most of ``module``'s parameters."""
    lists = [m for m in module.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(module).__name__} has no ModuleList of blocks to stream")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


@contextlib.contextmanager
def streamed(module: torch.nn.Module, device):
    """``module`` runs on ``device`` with only one of its blocks (:func:`stream_blocks`) there at a time: each block
    is lent by a forward pre-hook and returned by a forward hook; the rest of the module (embeddings, final norm,
    projection) is lent for the whole ``with``."""
    device = torch.device(device)
    if getattr(module, "_kandinsky3_streamed", False):
        raise RuntimeError(f"{type(module).__name__} is already streamed: streamed() does not nest")
    blocks = stream_blocks(module)
    in_blocks = {id(t) for t in _tensors(blocks)}
    rest = _Lease([t for t in _tensors(module) if id(t) not in in_blocks], device)
    leases = [_Lease(_tensors(block), device) for block in blocks]
    active: dict[int, _Lease] = {}

    def lend(index):
        def pre_hook(_module, _args):
            active[index] = leases[index].__enter__()

        def post_hook(_module, _args, _output):
            active.pop(index).__exit__(None, None, None)

        return pre_hook, post_hook

    handles = []
    for i, block in enumerate(blocks):
        pre, post = lend(i)
        handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    module._kandinsky3_streamed = True
    try:
        with rest:
            yield module
    finally:
        module._kandinsky3_streamed = False
        for h in handles:
            h.remove()
        for lease in active.values():  # a forward that raised inside a block: its lease never reached the post-hook
            lease.__exit__(None, None, None)
        _release_cache(device)


def _release_cache(device: torch.device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
