"""The training loop really applies gradient clipping and EMA (issue #21), observed from outside the loop.

One short MoVQ run (a 16-px autoencoder, 4 steps) with global optimizer hooks: the pre-step hook sees the gradient
the optimizer is about to use (so its norm is the clipped one), the post-step hook sees each step's weights, from
which the test computes the EMA the export must hold. Nothing here reaches into the loop's internals, so it keeps
guarding any rewrite of the loop (optimizer or loss registries, another EMA implementation).
"""

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from kandinsky3.training import TrainConfig, train

MOVQ = {"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "resolution": 16, "num_groups": 4}
STEPS, CLIP, DECAY = 4, 1e-3, 0.2


def _params(optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("guards")
    seen = {"grad_norms": [], "before": [], "after": []}

    def pre(optimizer, args, kwargs):
        params = _params(optimizer)
        grads = [p.grad.detach().double().flatten() for p in params if p.grad is not None]
        seen["grad_norms"].append(float(torch.cat(grads).norm()))
        seen["before"].append([p.detach().clone() for p in params])

    def post(optimizer, args, kwargs):
        seen["after"].append([p.detach().clone() for p in _params(optimizer)])

    handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    try:
        cfg = TrainConfig.from_dict(
            {
                "recipe": "movq",
                "output_dir": str(out),
                "model": {"movq": MOVQ},
                "data": {"size": 16, "length": 8},
                "steps": STEPS,
                "batch_size": 4,
                "lr": 1e-2,
                "warmup_steps": 1,
                "grad_clip": CLIP,
                "ema_decay": DECAY,
                "checkpoint_every": 100,
                "sample_every": 100,
            }
        )
        summary = train(cfg, progress=False)
    finally:
        for h in handles:
            h.remove()
    from kandinsky3.training.recipes.movq import load_movq_export

    seen["exported"] = load_movq_export(summary["export_dir"]).state_dict()
    return seen


def test_gradients_are_clipped_to_the_configured_norm(run):
    """grad_clip = 1e-3, far below the O(0.1–1) gradient norm of a random autoencoder's L1 loss: every step the
    optimizer receives a gradient of norm exactly 1e-3 (clip_grad_norm_ rescales by max_norm / (norm + 1e-6))."""
    assert len(run["grad_norms"]) == STEPS
    for norm in run["grad_norms"]:
        assert abs(norm - CLIP) <= 1e-3 * CLIP, run["grad_norms"]


def _expected_ema(after: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """e_1 = p_1 (the first update copies the weights), then e_k = d·e_(k−1) + (1 − d)·p_k with the warm-up decay
    d = min(decay, (1 + n)/(10 + n)), n = k − 1 the number of updates so far (n = 1: 0.18, then 0.2 = decay)."""
    ema = [p.double() for p in after[0]]
    for n, params in enumerate(after[1:], start=1):
        d = min(DECAY, (1 + n) / (10 + n))
        ema = [d * e + (1 - d) * p.double() for e, p in zip(ema, params)]
    return ema


def test_export_holds_the_ema_of_the_trained_weights(run):
    """The exported weights are the EMA of the weights after each step: not the initial ones (EMA never
    updated), not the last step's (EMA not exported), and exactly the warm-up formula."""
    assert len(run["after"]) == STEPS
    initial, final, expected = run["before"][0], run["after"][-1], _expected_ema(run["after"])
    exported = run["exported"]
    assert len(exported) == len(expected)  # every trainable tensor is exported, nothing else
    unused, trained = set(range(len(expected))), 0
    for name, value in exported.items():
        match = [
            i
            for i in unused
            if expected[i].shape == value.shape and torch.allclose(value.double(), expected[i], rtol=0, atol=2e-6)
        ]
        assert match, f"{name} is not the EMA of any trained tensor"
        i = match[0]
        unused.discard(i)
        if (final[i] - initial[i]).abs().max() < 1e-3:
            continue  # no gradient reaches it (e.g. an attention key bias): nothing to average
        trained += 1
        assert (value - initial[i]).abs().max() > 1e-3, f"{name} still holds its initial weights"
        if (final[i] - run["after"][-2][i]).abs().max() > 1e-3:  # it moved on the last step: EMA lags behind it
            assert (value - final[i]).abs().max() > 1e-4, f"{name} is the last step's weights, not their EMA"
    assert trained >= 0.9 * len(exported)
