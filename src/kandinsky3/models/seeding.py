"""Initial weights from an explicit ``torch.Generator``.

Module constructors draw their initial weights from the global RNG (``torch.nn.init`` takes no generator), so code
that must not touch the caller's random stream (a loader, a training recipe) builds modules inside
``drawing_from(generator)``: the global CPU RNG is forked and set to the generator's state for the block, the
generator then continues after what the block drew, and on exit the global RNG is exactly as it was. The result is
the same as seeding the global RNG with the generator's seed — weights are bit-identical to that older habit —
without its side effect on everyone else's stream.

Not thread-safe against *other* code drawing from the global RNG during the block (no generator API can be).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def drawing_from(generator: torch.Generator):
    """Inside the block, global-RNG draws on the CPU (module initialisation) come from ``generator``."""
    if generator.device.type != "cpu":
        raise ValueError(
            f"drawing_from needs a CPU generator (module initialisation draws on the CPU), "
            f"got one on {generator.device}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.set_state(generator.get_state())
        yield generator
        generator.set_state(torch.random.default_generator.get_state())
