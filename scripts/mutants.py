#!/usr/bin/env python
"""Mutation check for the test suite (issue #21): plant one plausible bug at a time, run the tests that should
catch it, report which mutants survive. A developer tool, not part of CI (minutes of CPU per run).

    python scripts/mutants.py --list                  # the mutants, their files and tests
    python scripts/mutants.py                         # every mutant against its own tests
    python scripts/mutants.py --only ddim-eta-sqrt --only judge-any-colour
    python scripts/mutants.py --area training         # the mutants of one area (see --list)
    python scripts/mutants.py --full --only no-grad-clip   # against the whole suite instead (slow)

The working tree's ``src/``, ``tests/`` and ``pyproject.toml`` are copied once to a temporary directory (your
uncommitted edits included, the checkout itself is never touched); each mutant replaces one exact source snippet
there, runs pytest with ``PYTHONPATH`` on the copy's ``src``, and is restored before the next. Before anything
runs, every snippet must occur exactly once in the current source: when code moves (#7), a stale mutant stops
the run with an error naming it, so the list is updated with the code. A baseline run of the same tests on the
unmutated copy comes first (a failing baseline would make every mutant look caught).

Exit status: 0 every mutant caught, 1 some survived, 2 stale snippet / failing baseline / a mutant that broke
the run (import or collection error) rather than failing a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "src/kandinsky3"


@dataclass(frozen=True)
class Mutant:
    name: str
    area: str
    file: str  # relative to src/kandinsky3
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids or files, relative to the repo root
    why: str

    @property
    def path(self) -> str:
        return f"{PKG}/{self.file}"


MUTANTS: list[Mutant] = [
    # -- the 7 that survived the whole suite in issue #21 ---------------------------------------------------------
    Mutant(
        "ddim-eta-sqrt",
        "sampling",
        "diffusion/sampling.py",
        "variance = eta * (1 - a_t / a_prev)",
        "variance = eta ** 0.5 * (1 - a_t / a_prev)",
        ("tests/test_golden_units.py::test_ddim_step_with_eta_below_one",),
        "η enters the DDIM variance as √η",
    ),
    Mutant(
        "judge-any-colour",
        "world",
        "world/judge.py",
        "MAX_COLOR_DISTANCE = 70.0",
        "MAX_COLOR_DISTANCE = 1e9",
        ("tests/test_world.py::test_judge_rejects_a_near_miss_colour",),
        "the judge accepts any colour as the nearest palette entry",
    ),
    Mutant(
        "ema-never-applied",
        "training",
        "training/loop.py",
        "ema.update_parameters(acc.unwrap_model(self.modules[name]))",
        "pass",
        ("tests/test_training_guards.py",),
        "the loop never updates the EMA, so the export is the initial weights",
    ),
    Mutant(
        "no-grad-clip",
        "training",
        "training/loop.py",
        "acc.clip_grad_norm_(params, cfg.grad_clip)",
        "pass",
        ("tests/test_training_guards.py",),
        "gradient clipping removed",
    ),
    Mutant(
        "num-images-repeat",
        "pipeline",
        "pipeline.py",
        "t.repeat_interleave(n, dim=0)",
        "t.repeat(n, *([1] * (t.dim() - 1)))",
        (
            "tests/test_unet_inputs.py::test_num_images_repeats_each_prompt_in_place",
            "tests/test_unet_inputs.py::test_negative_prompt_is_the_unconditional_branch",
        ),
        "num_images tiles the prompts (p0 p1 p0 p1) instead of repeating each in place",
    ),
    Mutant(
        "inpaint-keep-inverted",
        "tasks",
        "diffusion/inpainting.py",
        "torch.cat([keep_latent, masked_latent], dim=1)",
        "torch.cat([1 - keep_latent, masked_latent], dim=1)",
        (
            "tests/test_unet_inputs.py::test_inpainting_keep_channel_and_masked_latent",
            "tests/test_unet_inputs.py::test_outpainting_marks_the_new_border_for_repainting",
        ),
        "the inpainting mask channel says 1 = repaint instead of 1 = keep",
    ),
    Mutant(
        "img2img-one-step-short",
        "sampling",
        "diffusion/sampling.py",
        "timesteps = timesteps[-(partial_steps(run.steps, run.strength) + 1) :]",
        "timesteps = timesteps[-partial_steps(run.steps, run.strength) :]",
        ("tests/test_unet_inputs.py::test_edit_runs_the_last_strength_fraction_of_the_schedule",),
        "image→image runs one U-Net step fewer than strength·steps",
    ),
    # -- the 4 that only the nano end-to-end statistics caught ------------------------------------------------------
    Mutant(
        "threshold-percentile-fixed",
        "sampling",
        "diffusion/sampling.py",
        "x0 = dynamic_threshold(x0, threshold_percentile)",
        "x0 = dynamic_threshold(x0, 1.0)",
        ("tests/test_golden_units.py::test_thresholding_uses_the_percentile_and_recomputes_eps",),
        "the sampler thresholds at the maximum whatever the percentile",
    ),
    Mutant(
        "text-mask-dropped",
        "text",
        "models/text.py",
        "self.encoder(input_ids=ids, attention_mask=mask_dev)",
        "self.encoder(input_ids=ids)",
        ("tests/test_golden_units.py::test_text_encoder_masks_its_padding",),
        "T5 runs without its attention mask (attends to the padding)",
    ),
    Mutant(
        "eps-not-recomputed",
        "sampling",
        "diffusion/sampling.py",
        "            eps = schedule.eps_from_x0(x, t, x0)\n",
        "            pass\n",
        ("tests/test_golden_units.py::test_thresholding_uses_the_percentile_and_recomputes_eps",),
        "ε is not recomputed from the thresholded x0",
    ),
    Mutant(
        "bgr-on-save",
        "images",
        "images.py",
        'image.save(f, format="PNG", pnginfo=info)',
        'Image.merge("RGB", image.convert("RGB").split()[::-1]).save(f, format="PNG", pnginfo=info)',
        (
            "tests/test_golden_units.py::test_save_image_keeps_rgb_order",
            "tests/test_golden_units.py::test_generated_colour_survives_to_the_png",
        ),
        "save_image writes BGR",
    ),
    Mutant(
        "bgr-in-tensor-to-pil",
        "images",
        "images.py",
        "a.permute(1, 2, 0).cpu().numpy()",
        "a.flip(0).permute(1, 2, 0).cpu().numpy()",
        (
            "tests/test_golden_units.py::test_tensor_to_pil_keeps_rgb_order",
            "tests/test_golden_units.py::test_generated_colour_survives_to_the_png",
        ),
        "decoded tensors become BGR images",
    ),
    # -- others, caught before issue #21 or by the tests it added -------------------------------------------------
    Mutant(
        "cfg-sign",
        "sampling",
        "diffusion/conditioning.py",
        "(w + 1.0) * eps_cond - w * eps_uncond",
        "(w + 1.0) * eps_cond + w * eps_uncond",
        ("tests/test_sampling.py::test_guidance_formula_and_cond_first_order",),
        "classifier-free guidance adds the unconditional ε",
    ),
    Mutant(
        "cond-uncond-order",
        "sampling",
        "diffusion/conditioning.py",
        "eps_cond, eps_uncond = self.unet(",
        "eps_uncond, eps_cond = self.unet(",
        ("tests/test_sampling.py::test_guidance_formula_and_cond_first_order",),
        "the halves of the guided batch are read in the wrong order",
    ),
    Mutant(
        "threshold-no-clamp-min",
        "sampling",
        "diffusion/schedule.py",
        "torch.quantile(flat, percentile, dim=1).clamp(min=1.0)",
        "torch.quantile(flat, percentile, dim=1)",
        ("tests/test_sampling.py::test_dynamic_threshold",),
        "dynamic thresholding rescales small x0 up (s not clamped at 1)",
    ),
    Mutant(
        "q-sample-swapped",
        "sampling",
        "diffusion/schedule.py",
        "return a.sqrt() * x0 + (1 - a).sqrt() * noise",
        "return (1 - a).sqrt() * x0 + a.sqrt() * noise",
        (
            "tests/test_unet_inputs.py::test_edit_runs_the_last_strength_fraction_of_the_schedule",
            "tests/test_sampling.py",
        ),
        "forward noising with the coefficients swapped",
    ),
    Mutant(
        "flash-timesteps",
        "sampling",
        "diffusion/sampling.py",
        "return list(range(979, 0, -official_stride(steps)))",
        "return list(range(999, 0, -official_stride(steps)))",
        ("tests/test_sampling.py::test_timestep_lists",),
        "Flash starts at 999 instead of the released 979",
    ),
    Mutant(
        "official-stride",
        "sampling",
        "diffusion/sampling.py",
        "return -((-num_timesteps) // steps)",
        "return num_timesteps // steps",
        ("tests/test_sampling.py::test_timestep_lists",),
        "the timestep stride floors instead of the official ceil (steps that do not divide 1000)",
    ),
    Mutant(
        "ddim-noise-on-last-step",
        "sampling",
        "diffusion/sampling.py",
        "if t_prev != 0 else mean",
        "if t_prev >= 0 else mean",
        ("tests/test_sampling.py::test_last_step_uses_alpha_bar_0_and_no_noise",),
        "the last DDIM step adds noise",
    ),
    Mutant(
        "dilation-two-passes",
        "images",
        "images.py",
        "passes: int = 3",
        "passes: int = 2",
        ("tests/test_pipeline.py::test_dilate_mask_grows_by_six_pixels",),
        "the official mask dilation runs two passes instead of three",
    ),
    Mutant(
        "negative-prompt-ignored",
        "pipeline",
        "pipeline.py",
        "plan.prompts, plan.negative_prompts if guided else None\n",
        "plan.prompts, None\n",
        ("tests/test_unet_inputs.py::test_negative_prompt_is_the_unconditional_branch",),
        "negative prompts are dropped (the null context is used)",
    ),
    Mutant(
        "context-lengths-dropped",
        "pipeline",
        "pipeline.py",
        "context_lengths=rep(lengths),",
        "context_lengths=None,",
        ("tests/test_unet_inputs.py::test_negative_prompt_is_the_unconditional_branch",),
        "mixed-length prompts in one batch are pooled over the longest crop",
    ),
    Mutant(
        "paste-back-inverted",
        "tasks",
        "tasks.py",
        "keep = (1.0 - mask)[..., None]",
        "keep = mask[..., None]",
        ("tests/test_pipeline.py::test_inpaint_paste_back_and_outpaint",),
        "paste-back restores the original inside the mask instead of outside",
    ),
    Mutant(
        "movq-tiling-blend",
        "models",
        "models/tiles.py",
        "above[..., -extent:, :] * (1 - w) + below[..., :extent, :] * w",
        "above[..., -extent:, :] * w + below[..., :extent, :] * (1 - w)",
        ("tests/test_models_parity.py::test_tiled_decode_shape_and_blend",),
        "tile seams cross-fade the wrong way",
    ),
    Mutant(
        "null-context-unmasked",
        "text",
        "models/text.py",
        "        mask[:, 0] = 1\n",
        "        pass\n",
        ("tests/test_text.py::test_null_context",),
        "the null context attends to nothing (its embedding masked out)",
    ),
    Mutant(
        "negative-quirk-no-eos",
        "text",
        "models/text.py",
        "            ids[-1] = self.tokenizer.eos_token_id\n",
        "            pass\n",
        ("tests/test_text.py::test_negative_prompt_quirk",),
        "a truncated negative prompt does not end in EOS",
    ),
    Mutant(
        "ema-constant-decay",
        "training",
        "training/loop.py",
        "1.0 - min(decay, (1.0 + n) / (10.0 + n))",
        "1.0 - decay",
        ("tests/test_training.py::test_ema_forgets_the_initial_weights", "tests/test_training_guards.py"),
        "EMA without the warm-up decay",
    ),
]


def _select(args) -> list[Mutant]:
    names = {m.name for m in MUTANTS}
    unknown = set(args.only or []) - names
    if unknown:
        sys.exit(f"unknown mutant(s) {sorted(unknown)}; see --list")
    chosen = [m for m in MUTANTS if (not args.only or m.name in args.only) and (not args.area or m.area in args.area)]
    if not chosen:
        sys.exit("no mutant selected")
    return chosen


def check_snippets(mutants: list[Mutant], root: Path) -> list[str]:
    """Every snippet must occur exactly once in its file (else the mutant is stale: the code moved)."""
    problems = []
    for m in mutants:
        path = root / m.path
        if not path.is_file():
            problems.append(f"{m.name}: {m.path} does not exist")
            continue
        count = path.read_text().count(m.old)
        if count != 1:
            problems.append(f"{m.name}: snippet {m.old.strip()!r} occurs {count}× in {m.path} (expected once)")
        for test in m.tests:
            if not (root / test.split("::")[0]).is_file():
                problems.append(f"{m.name}: test file {test.split('::')[0]} does not exist")
    return problems


def _copy_tree(dst: Path):
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache", "*.pyc")
    for part in ("src", "tests"):
        shutil.copytree(ROOT / part, dst / part, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", dst / "pyproject.toml")


def _env(copy: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _pytest(copy: Path, tests: list[str], timeout: float, stop_first: bool = True) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rf", "--no-header", "-W", "ignore"]
    cmd += (["-x"] if stop_first else []) + tests
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return -1, out + "\n(timed out)", time.monotonic() - start


def _first_failure(output: str) -> str:
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return match.group(1) if match else ""


def _verify_import(copy: Path):
    probe = subprocess.run(
        [sys.executable, "-c", "import kandinsky3; print(kandinsky3.__file__)"],
        cwd=copy,
        env=_env(copy),
        capture_output=True,
        text=True,
    )
    where = probe.stdout.strip()
    if probe.returncode != 0 or not Path(where).resolve().is_relative_to(copy.resolve()):
        sys.exit(
            f"the copy's package is not the one imported (got {where or probe.stderr.strip()}); "
            "mutants would run against the checkout"
        )


def run(mutants: list[Mutant], full: bool, timeout: float, baseline: bool, keep: bool) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="k3-mutants-"))
    try:
        _copy_tree(tmp)
        _verify_import(tmp)
        problems = check_snippets(mutants, tmp)
        if problems:
            sys.exit("stale mutants (update scripts/mutants.py):\n  " + "\n  ".join(problems))
        if baseline:
            tests = ["tests"] if full else sorted({t for m in mutants for t in m.tests})
            print(f"baseline: {len(tests)} test selection(s) on the unmutated copy …", flush=True)
            rc, out, secs = _pytest(tmp, tests, timeout * max(1, len(mutants)), stop_first=False)
            if rc != 0:
                print(out[-4000:])
                sys.exit(f"baseline failed (exit {rc}): fix the tests before judging mutants")
            print(f"baseline passed in {secs:.0f} s", flush=True)
        results = []
        for i, m in enumerate(mutants, 1):
            path = tmp / m.path
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new, 1))
            try:
                rc, out, secs = _pytest(tmp, ["tests"] if full else list(m.tests), timeout)
            finally:
                path.write_text(original)
            status = {0: "SURVIVED", 1: "caught"}.get(rc, "error")
            if rc == -1:
                status = "timeout"
            result = {
                "name": m.name,
                "area": m.area,
                "file": m.path,
                "status": status,
                "exit": rc,
                "seconds": round(secs, 1),
                "failed": _first_failure(out),
                "why": m.why,
            }
            results.append(result)
            print(f"[{i}/{len(mutants)}] {m.name:28s} {status:9s} {secs:6.1f} s  {result['failed']}", flush=True)
            if status in ("error", "timeout"):
                print("\n".join(out.strip().splitlines()[-15:]), flush=True)
        return results
    finally:
        if keep:
            print(f"kept the copy in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def table(results: list[dict]) -> str:
    lines = ["| mutant | file | result | first failing test |", "|---|---|---|---|"]
    for r in results:
        failed = r["failed"].replace("tests/", "") if r["failed"] else "—"
        lines.append(f"| `{r['name']}` | `{r['file'].replace(PKG + '/', '')}` | {r['status']} | `{failed}` |")
    caught = sum(r["status"] == "caught" for r in results)
    lines.append(f"\n{caught} of {len(results)} caught")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--only", action="append", metavar="NAME", help="run only this mutant (repeatable)")
    p.add_argument("--area", action="append", help="run only the mutants of this area (repeatable)")
    p.add_argument("--full", action="store_true", help="run the whole suite per mutant instead of its own tests")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated baseline run")
    p.add_argument("--timeout", type=float, default=900, help="seconds per mutant run (default 900)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the temporary copy (to debug a mutant)")
    args = p.parse_args(argv)

    mutants = _select(args)
    if args.list:
        problems = check_snippets(mutants, ROOT)
        for m in mutants:
            print(f"{m.name:28s} {m.area:9s} {m.path}\n    {m.why}\n    tests: {', '.join(m.tests)}")
        if problems:
            print("\nstale:\n  " + "\n  ".join(problems))
            return 2
        return 0
    results = run(mutants, args.full, args.timeout, not args.no_baseline, args.keep)
    print("\n" + table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if any(r["status"] in ("error", "timeout") for r in results):
        return 2
    return 1 if any(r["status"] == "SURVIVED" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
