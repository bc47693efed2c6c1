"""The request → plan → denoise path: requests as the one description of a task (API, CLI), plans with adapters,
the sampler and task tables, per-sample seeds, step callbacks, one run at a time per pipeline."""

import dataclasses
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky3 import TextToImage
from kandinsky3.cli import build_parser, request_from_args
from kandinsky3.diffusion import SAMPLERS, GenerationCancelled, Sampler, sample_ddim
from kandinsky3.requests import REQUESTS, GenerationSettings, ImageToImage, Inpaint, Outpaint
from kandinsky3.registry import VARIANTS
from kandinsky3.tasks import TASKS, Plan, plan_text_to_image


def _subparser(name):
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    return action.choices[name]


@pytest.mark.parametrize("request_cls", REQUESTS, ids=lambda r: r.command)
def test_cli_options_are_the_request_fields(request_cls):
    parser = _subparser(request_cls.command)
    [group] = [g for g in parser._action_groups if g.title == "request"]
    by_dest = {a.dest: a for a in group._group_actions}
    fields = {f.name: f for f in request_cls.task_fields()}
    assert set(by_dest) == set(fields)  # every field has its option, and the group has nothing else
    for name, f in fields.items():
        default = None if f.default is dataclasses.MISSING else f.default
        assert by_dest[name].default == default, name
        assert by_dest[name].help == f.metadata["help"], name
    for fixed in request_cls.fixed:  # fields that are not this task's inputs have no option at all
        assert all(a.dest != fixed for a in parser._actions)


def test_cli_builds_the_same_request_as_the_api():
    args = build_parser().parse_args(
        [
            "edit",
            "in.png",
            "a star",
            "--strength",
            "0.5",
            "--seed",
            "7",
            "--steps",
            "9",
            "--negative",
            "blur",
            "--pixel-rounding",
            "round",
        ]
    )
    assert request_from_args(ImageToImage, args) == ImageToImage(
        image="in.png", prompt="a star", strength=0.5, seed=7, steps=9, negative_prompt="blur", pixel_rounding="round"
    )
    args = build_parser().parse_args(["generate", "x", "--seed", "1", "2", "3"])
    assert request_from_args(TextToImage, args).seed == [1, 2, 3]


@pytest.mark.parametrize(
    "bad, field",
    [
        (dict(guidance=float("nan")), "guidance"),
        (dict(guidance=float("inf")), "guidance"),
        (dict(eta=-0.1), "eta"),
        (dict(steps=0), "steps"),
        (dict(width=0), "width"),
        (dict(num_images=0), "num_images"),
        (dict(seed=-1), "seed"),
        (dict(seed=[]), "seed"),
        (dict(threshold_percentile=1.5), "threshold_percentile"),
        (dict(sampler="heun"), "sampler"),
        (dict(pixel_rounding="ceil"), "pixel_rounding"),
        (dict(strength=0.5), "strength"),
    ],
)
def test_bad_settings_are_refused_when_the_request_is_made(bad, field):
    with pytest.raises(ValueError, match=field):
        TextToImage(prompt="x", **bad)


def test_outpaint_needs_a_margin():
    with pytest.raises(ValueError, match="margins"):
        Outpaint(image="x.png")
    with pytest.raises(ValueError, match="margins"):
        Outpaint(image="x.png", left=-4)


def test_requests_resolve_to_the_variant_defaults(tiny):
    s = TextToImage(prompt="x").resolve(tiny.variant)
    d = tiny.variant.sampler
    assert (s.steps, s.guidance, s.width, s.sampler, s.eta) == (d.steps, d.guidance, tiny.variant.size, d.kind, d.eta)
    flash = TextToImage(prompt="x", sampler="flash").resolve(tiny.variant)
    assert (flash.steps, flash.guidance) == (4, 0.0)
    assert SAMPLERS["flash"].guided is False and SAMPLERS["k3"].guided is True


def test_image_k_of_a_batch_regenerates_alone_with_its_own_seed(tiny):
    seeds = [11, 22, 33, 44]
    batch = tiny.generate("a red circle", seed=seeds, num_images=4, steps=4, progress=False)
    alone = tiny.generate("a red circle", seed=[seeds[3]], num_images=1, steps=4, progress=False)
    assert np.array_equal(np.asarray(batch[3]), np.asarray(alone[0]))
    assert not np.array_equal(np.asarray(batch[2]), np.asarray(batch[3]))
    assert [__import__("json").loads(im.info["kandinsky3"])["seed"] for im in batch] == seeds
    with pytest.raises(ValueError, match="3 seeds for 4 images"):
        tiny.generate("a red circle", seed=[1, 2, 3], num_images=4, steps=2, progress=False)


def test_step_callback_sees_every_step_and_can_stop(tiny):
    seen = []
    tiny.generate("x", seed=0, steps=5, progress=False, callback=lambda i, t, x: seen.append((i, t, x.shape)))
    assert [(i, t) for i, t, _ in seen] == [(0, 999), (1, 799), (2, 599), (3, 399), (4, 199)]
    stopped = []

    def stop_after_two(i, t, x):
        stopped.append(i)
        return i < 1

    with pytest.raises(GenerationCancelled, match="after step 2"):
        tiny.generate("x", seed=0, steps=5, progress=False, callback=stop_after_two)
    assert stopped == [0, 1]


def test_threads_share_one_pipeline_safely(tiny):
    expected = {seed: np.asarray(tiny.generate("x", seed=seed, steps=3, progress=False)[0]) for seed in range(4)}
    results, errors = {}, []

    def work(seed):
        try:
            results[seed] = np.asarray(tiny.generate("x", seed=seed, steps=3, progress=False)[0])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(np.array_equal(results[s], expected[s]) for s in expected)


def test_a_sampler_is_one_table_entry(tiny, monkeypatch):
    """Worked example of docs/architecture.md: plain DDIM (η = 0, no thresholding) added from outside."""
    from kandinsky3.diffusion.sampling import official_timesteps

    def sample_plain_ddim(denoise, x, run):
        return sample_ddim(
            denoise,
            x,
            run.schedule,
            official_timesteps(run.steps),
            run.noise,
            eta=0.0,
            threshold_percentile=None,
            callback=run.callback,
        )

    monkeypatch.setitem(SAMPLERS, "plain-ddim", Sampler(sample_plain_ddim))
    [a] = tiny.run(TextToImage(prompt="x", seed=0, steps=4, sampler="plain-ddim"), progress=False)
    [b] = tiny.run(
        TextToImage(prompt="x", seed=0, steps=4, sampler="k3", eta=0.0, threshold_percentile=1.0), progress=False
    )
    assert a.size == b.size and __import__("json").loads(a.info["kandinsky3"])["sampler"] == "plain-ddim"
    assert not np.array_equal(np.asarray(a), np.asarray(b))  # thresholding at p = 1 still rescales; plain does not


def test_a_task_is_one_request_and_one_builder(tiny, monkeypatch):
    """Worked example of docs/architecture.md: a toy "grayscale" task defined outside the package."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Grayscale(TextToImage):
        command = "grayscale"

    def plan_grayscale(pipe, req: Grayscale) -> Plan:
        plan = plan_text_to_image(pipe, req)
        plan.task = "grayscale"
        plan.finish = lambda images: [im.convert("L").convert("RGB") for im in images]
        return plan

    monkeypatch.setitem(TASKS, Grayscale, plan_grayscale)
    [gray] = tiny.run(Grayscale(prompt="x", seed=0, steps=3), progress=False)
    [color] = tiny.generate("x", seed=0, steps=3, progress=False)
    arr = np.asarray(gray)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert np.array_equal(arr[..., 0], np.asarray(color.convert("L")))
    with pytest.raises(TypeError, match="no task for"):
        tiny.run(GenerationSettings())


def test_inpainting_channels_come_from_an_adapter(tiny_inpainting):
    from kandinsky3.diffusion import ExtraChannels

    image = Image.new("RGB", (64, 64), (120, 30, 200))
    mask = np.zeros((64, 64), np.float32)
    mask[:, 32:] = 1
    plan = TASKS[Inpaint](tiny_inpainting, Inpaint(image=image, mask=mask, prompt="x", seed=0, steps=2))
    [adapter] = plan.adapters
    assert isinstance(adapter, ExtraChannels)
    keep = adapter.channels[0, 0]
    assert keep[:, :4].eq(1).all() and keep[:, 4:].eq(0).all()  # 1 = keep on the left half of the 8-wide latent
    assert adapter(torch.zeros(1), torch.zeros(1), "uncond")["extra_channels"] is adapter.channels


def test_concurrent_saves_to_one_path_leave_a_complete_png(tmp_path):
    """Unique temporary files: 20 processes writing one path → the file decodes, no temp file is left."""
    import subprocess
    import sys

    code = (
        "import sys; from PIL import Image; from kandinsky3 import save_image; "
        "save_image(Image.new('RGB', (256, 256), (int(sys.argv[1]), 0, 0)), sys.argv[2])"
    )
    target = tmp_path / "same.png"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i * 10), str(target)]) for i in range(20)]
    assert all(p.wait() == 0 for p in procs)
    with Image.open(target) as im:
        im.load()
        assert im.size == (256, 256) and im.getpixel((0, 0))[0] in {i * 10 for i in range(20)}
    assert [p.name for p in tmp_path.iterdir()] == ["same.png"]


def test_inpainting_is_the_variants_fact_not_the_channel_count(tiny_inpainting):
    from dataclasses import replace

    from kandinsky3.registry import VARIANTS

    assert VARIANTS["inpainting"].is_inpainting and not VARIANTS["base"].is_inpainting
    assert tiny_inpainting.is_inpainting
    undeclared = replace(tiny_inpainting.variant, inpainting=None)  # a folder that doesn't say: read the config
    assert undeclared.is_inpainting
    assert not replace(undeclared, unet=replace(undeclared.unet, num_channels=4)).is_inpainting
    tiny_inpainting.variant = replace(tiny_inpainting.variant, inpainting=False)
    try:
        with pytest.raises(ValueError, match="inpainting needs"):
            tiny_inpainting.inpaint(Image.new("RGB", (64, 64)), np.ones((64, 64), np.float32), "x", steps=1)
    finally:
        tiny_inpainting.variant = replace(tiny_inpainting.variant, inpainting=True)


def test_settings_the_run_will_not_read_are_named():
    nano, flash = VARIANTS["nano"], VARIANTS["nano-flash"]
    assert TextToImage(prompt="x", negative_prompt="blue", eta=0.5).ignored(nano) == []  # k3, guided: all read
    [negative] = TextToImage(prompt="x", negative_prompt="blue", guidance=0).ignored(nano)
    assert negative == "the negative prompt has no effect at guidance 0"
    [unguided] = TextToImage(prompt="x", negative_prompt="blue").ignored(flash)  # flash takes no guidance at all
    assert "flash sampler uses no classifier-free guidance" in unguided
    assert TextToImage(prompt="x", guidance=3).ignored(flash) == [unguided]  # a guidance given to it too
    assert TextToImage(prompt="x", sampler="flash").ignored(nano) == []
    assert Outpaint(image="x.png", prompt="x", left=32, eta=0.5, sampler="euler").ignored(nano)  # fixed size: fine
    eta, threshold = TextToImage(prompt="x", sampler="euler", eta=0.5, threshold_percentile=0.9).ignored(nano)
    assert eta.startswith("eta is read by the k3 sampler only") and "euler" in eta and "threshold" in threshold


def test_the_pipeline_warns_about_ignored_settings(tiny):
    with pytest.warns(UserWarning, match="negative prompt has no effect"):
        tiny.generate("x", negative_prompt="blue", guidance=0, steps=1, seed=0, progress=False)
