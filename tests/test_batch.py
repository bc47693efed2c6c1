"""Batch generation: one PNG per (prompt, seed), a manifest with sha256, resumable, sharded."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from kandinsky3 import Kandinsky3, TextToImage, read_metadata, save_image
from kandinsky3.batch import generate_batch, largest_runs, merge_manifests, plan, read_prompts


@pytest.fixture(scope="module")
def nano():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # several times faster than two on a small shared CPU
    yield Kandinsky3.from_pretrained("nano", device="cpu")
    torch.set_num_threads(threads)


def _manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_prompts_files_and_errors(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\n\n# a comment\na blue star\n")
    assert read_prompts(txt) == [{"prompt": "a red circle"}, {"prompt": "a blue star"}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a red circle", "seeds": [5, 6], "steps": 3}\n{"prompt": "x"}\n')
    items = plan(read_prompts(jsonl), [0], {"steps": 1})
    assert [(it.index, it.seed, it.fields["steps"]) for it in items] == [(0, 5, 3), (0, 6, 3), (1, 0, 1)]
    for bad, match in (('{"prompt": 1}', "string 'prompt'"), ('{"prompt": "x", "colour": 1}', "colour"),
                       ('{"prompt": "x", "steps": 0}', "steps"), ("{oops", "not JSON")):  # fmt: skip
        jsonl.write_text(bad + "\n")
        with pytest.raises(ValueError, match=match):
            read_prompts(jsonl)
    with pytest.raises(FileNotFoundError):
        read_prompts(tmp_path / "missing.txt")


def test_one_png_per_prompt_and_seed_resumable_and_sharded(nano, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na large blue star\na green square\n")
    out = tmp_path / "out"
    summary = generate_batch(nano, prompts, out, seeds=[0, 1], settings={"steps": 1}, progress=False)
    assert summary == {"items": 6, "mine": 6, "generated": 6, "skipped": 0}
    manifest = _manifest(out)
    assert [m["key"] for m in manifest] == ["000000-0", "000000-1", "000001-0", "000001-1", "000002-0", "000002-1"]
    for m in manifest:
        data = (out / m["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == m["sha256"] and m["settings"]["steps"] == 1
    solo = nano.run(TextToImage(prompt="a large blue star", seed=1, steps=1), progress=False)[0]
    save_image(solo, tmp_path / "solo.png")
    assert (out / "000001-1.png").read_bytes() == (tmp_path / "solo.png").read_bytes()
    assert manifest[3]["prompt"] == "a large blue star" and manifest[3]["seed"] == 1

    # several items per sampler run: the same files and metadata, pixels up to float rounding
    batched = tmp_path / "batched"
    generate_batch(nano, prompts, batched, seeds=[0, 1], settings={"steps": 1}, batch_size=4, progress=False)
    for m in manifest:
        a, b = Image.open(out / m["file"]), Image.open(batched / m["file"])
        assert read_metadata(a) == read_metadata(b)
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1

    # resume: a missing and a corrupted image are redone, nothing else
    before = {m["file"]: m["sha256"] for m in manifest}
    (out / "000000-1.png").unlink()
    (out / "000002-0.png").write_bytes(b"broken")
    summary = generate_batch(nano, prompts, out, seeds=[0, 1], settings={"steps": 1}, progress=False)
    assert summary["generated"] == 2 and summary["skipped"] == 4
    assert {m["file"]: m["sha256"] for m in _manifest(out)} == before

    # resumed with another setting: the finished images are kept, with a warning that names the change
    with pytest.warns(UserWarning, match=r"6 finished image\(s\).*steps 1 → 2"):
        summary = generate_batch(nano, prompts, out, seeds=[0, 1], settings={"steps": 2}, progress=False)
    assert summary["generated"] == 0 and {m["file"]: m["sha256"] for m in _manifest(out)} == before
    edited = tmp_path / "edited.txt"  # the first line's prompt changed, same keys
    edited.write_text(prompts.read_text().replace("a red circle", "a small green square", 1))
    with pytest.warns(UserWarning, match=r"2 finished image\(s\).*prompt .* → 'a small green square'"):
        generate_batch(nano, edited, out, seeds=[0, 1], settings={"steps": 1}, progress=False)

    # two processes (as under accelerate launch) share the items; the merged result is the same
    sharded = tmp_path / "sharded"
    runs = [generate_batch(nano, prompts, sharded, seeds=[0, 1], settings={"steps": 1}, process_index=r,
                           num_processes=2, progress=False) for r in (0, 1)]  # fmt: skip
    assert [r["mine"] for r in runs] == [3, 3] and not (sharded / "manifest.jsonl").exists()
    merge_manifests(sharded, plan(read_prompts(prompts), [0, 1], {"steps": 1}))
    assert [(m["key"], m["sha256"]) for m in _manifest(sharded)] == [(m["key"], m["sha256"]) for m in manifest]


def test_generate_prompts_on_the_command_line(nano, tmp_path):
    from kandinsky3.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle", "seeds": [4]}\n{"prompt": "a blue star", "guidance": 0}\n')
    argv = ["generate", "--prompts", str(prompts), "--out-dir", str(tmp_path / "o"), "--seed", "3", "--steps", "1",
            "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    manifest = _manifest(tmp_path / "o")
    assert [(m["key"], m["settings"]["guidance"]) for m in manifest] == [("000000-4", 1.0), ("000001-3", 0.0)]
    assert "fixed" not in manifest[0]["settings"]  # the shared settings only
    solo = nano.run(TextToImage(prompt="a blue star", seed=3, steps=1, guidance=0), progress=False)[0]
    save_image(solo, tmp_path / "solo.png")
    assert (tmp_path / "o" / "000001-3.png").read_bytes() == (tmp_path / "solo.png").read_bytes()


def _launch(prompts, out, processes: int, stop_after: int | None = None):
    """``accelerate launch --num_processes N --cpu -m kandinsky3.cli generate --prompts …`` in a subprocess;
    ``stop_after``: SIGKILL the launcher once that many PNGs exist (a crash half-way)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--cpu",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kandinsky3.cli",
           "generate", "--prompts", str(prompts), "--out-dir", str(out), "--seed", "0", "--steps", "1",
           "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    if stop_after is None:
        output = proc.communicate(timeout=600)[0].decode()
        assert proc.returncode == 0, output
        return
    deadline = time.monotonic() + 600
    while len(list(out.glob("*.png"))) < stop_after:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_equal_one_and_resume_after_a_kill(tmp_path):
    """The issue's check: 40 prompts, `accelerate launch --num_processes 2` (CPU) → exactly 40 files, no duplicates,
    identical to a 1-process run; killed half-way and started again, it finishes without redoing finished images."""
    prompts = tmp_path / "prompts.txt"
    shapes, colours = ["circle", "square", "triangle", "star"], ["red", "blue", "green", "yellow", "purple"]
    prompts.write_text("\n".join(f"a {c} {s} in the center" for c in colours for s in shapes for _ in (0, 1)) + "\n")
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(prompts, one, 1)
    _launch(prompts, two, 2, stop_after=20)
    recorded = [json.loads(line)["file"] for shard in two.glob("manifest.rank*.jsonl") for line in shard.open()]
    done = {f: (two / f).stat().st_mtime_ns for f in recorded}
    assert 20 <= len(list(two.glob("*.png"))) < 40 and not (two / "manifest.jsonl").exists()
    _launch(prompts, two, 2)
    a, b = _manifest(one), _manifest(two)
    assert len(a) == len(b) == 40 and len({m["key"] for m in b}) == 40
    assert sorted(p.name for p in two.glob("*.png")) == sorted(m["file"] for m in b)
    assert [(m["key"], m["sha256"]) for m in a] == [(m["key"], m["sha256"]) for m in b]
    assert len(done) >= 18 and all((two / f).stat().st_mtime_ns == done[f] for f in done)  # finished: not redone


def test_largest_runs_group_as_the_batch_does():
    """The memory check's runs: up to batch_size items per setting, equal by value as ``generate_batch`` compares
    them (guidance 3 from a jsonl line and 3.0 from the command line are one run)."""
    entries = [
        {"prompt": "a"},
        {"prompt": "b", "guidance": 3},
        {"prompt": "c", "seeds": [1, 2]},
        {"prompt": "d", "width": 128},
    ]
    items = plan(entries, [0], {"guidance": 3.0})
    runs = largest_runs(items, batch_size=3)
    assert [(r.prompt, r.seed, r.width) for r in runs] == [(["a", "b", "c"], [0, 0, 1], None), (["d"], [0], 128)]
    assert [len(r.prompt) for r in largest_runs(items, batch_size=1)] == [1, 1]
