"""kill -9 in the middle of a run: after a restart every job finishes once, identical to a run without a crash."""

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from kandinsky3 import Kandinsky3, TextToImage, save_image  # noqa: E402

PROMPTS = ["a red circle", "a large blue star", "a green square on a white background", "a small yellow triangle"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(data_dir, port):
    cmd = [sys.executable, "-m", "kandinsky3.serve", "--data-dir", str(data_dir), "--port", str(port),
           "--models", "nano", "--upscaler", "none", "--devices", "cpu", "--threads", "1",
           "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread runs steadier than two on a shared 2-core CPU
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.1)


JOBS = 20  # the number: 20 jobs, kill -9 mid-run, restart


def _jobs():
    out = []
    for i in range(JOBS):
        body = {"task": "generate", "prompt": PROMPTS[i % 4], "steps": 3, "seed": 1000 + i}
        if i % 5 == 4:
            body.update(num_images=2, seed=[i, i + 1])
        out.append(body)
    return out


def test_kill_9_mid_run_then_restart_finishes_every_job_identically(tmp_path):
    port = _free_port()
    proc, url = _start(tmp_path, port)
    try:
        ids = []
        for body in _jobs():
            r = httpx.post(url + "/v1/jobs", json=body, timeout=30)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        deadline = time.monotonic() + 120
        done = 0
        while True:  # FIFO, one job at a time: wait until some are done and the next one is mid-run
            view = httpx.get(f"{url}/v1/jobs/{ids[done]}", timeout=30).json()
            if view["state"] == "done":
                done += 1
                continue
            if done and view["state"] == "running" and view["progress"]["step"] >= 1:
                break
            assert time.monotonic() < deadline and view["state"] in ("queued", "running"), view
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    before = dict(db.execute("SELECT id, state FROM jobs").fetchall())
    db.close()
    assert sorted(before) == sorted(ids)
    killed_running = [j for j, s in before.items() if s == "running"]
    assert killed_running and any(s == "queued" for s in before.values()) and any(s == "done" for s in before.values())

    proc, url = _start(tmp_path, port)
    try:
        deadline = time.monotonic() + 180
        for j in ids:
            while (view := httpx.get(f"{url}/v1/jobs/{j}", timeout=30).json())["state"] != "done":
                assert time.monotonic() < deadline and view["state"] in ("queued", "running"), view
                time.sleep(0.25)
        views = [httpx.get(f"{url}/v1/jobs/{j}", timeout=30).json() for j in ids]
        got = [[httpx.get(u, timeout=30).content for u in v["images"]] for v in views]
        # the job killed mid-run ran again; no other job ran twice
        assert [v["attempts"] for v in views] == [2 if j in killed_running else 1 for j in ids]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    # the reference: solo runs in this process, with the server's one thread (CPU sums depend on the thread count)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = Kandinsky3.from_pretrained("nano", device="cpu")
        for body, pngs in zip(_jobs(), got):
            images = pipe.run(TextToImage(**{k: v for k, v in body.items() if k != "task"}), progress=False)
            for k, image in enumerate(images):
                save_image(image, tmp_path / "ref.png")
                assert pngs[k] == (tmp_path / "ref.png").read_bytes(), (body, k)
    finally:
        torch.set_num_threads(threads)
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT COUNT(*), COUNT(DISTINCT id) FROM jobs").fetchone() == (JOBS, JOBS)
    assert not list((tmp_path / "results").glob("*/.*.part"))
