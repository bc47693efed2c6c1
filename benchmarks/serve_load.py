"""Server throughput with batching off and on, in the same run: a real uvicorn server on 127.0.0.1, N concurrent
clients submitting compatible text→image jobs, images/s from the first submission to the last result.

    python benchmarks/serve_load.py                                   # nano on this CPU, 32 jobs, 10 steps
    python benchmarks/serve_load.py --device cuda --jobs 64 --batch 16
    python benchmarks/serve_load.py --model base --device cuda --steps 50 --jobs 32 --batch 4

Batching puts compatible queued jobs (same model, size, steps, sampler, guidance) into one sampler run with
per-image seeds; each image keeps its solo run's noise and metadata (pixels equal up to float rounding).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

from kandinsky3.serve import ServeConfig, create_app
from kandinsky3.serve.testing import ServerThread

PROMPTS = ["a red circle", "a large blue star", "a green square on a white background", "a small yellow triangle"]


def measure(args, max_batch: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cfg = ServeConfig(
            data_dir=d,
            models=[args.model],
            upscaler=None,
            devices=[args.device],
            max_queue=args.jobs,
            max_batch=max_batch,
            threads=args.threads,
            dtype=args.dtype,
        )
        with ServerThread(create_app(cfg)) as server:
            server.wait_ready(600)
            url = server.url

            def job(i):
                body = {"task": "generate", "prompt": PROMPTS[i % len(PROMPTS)], "steps": args.steps, "seed": i}
                return httpx.post(url + "/v1/jobs", json=body, timeout=60).json()["id"]

            # warm-up (first-run allocations, kernel selection)
            warm = job(10**6)
            while (state := httpx.get(f"{url}/v1/jobs/{warm}").json()["state"]) not in ("done", "failed"):
                time.sleep(0.05)
            assert state == "done", f"the warm-up job {state}"
            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                ids = list(pool.map(job, range(args.jobs)))
            views = []
            for j in ids:
                while (v := httpx.get(f"{url}/v1/jobs/{j}").json())["state"] not in ("done", "failed"):
                    time.sleep(0.05)
                views.append(v)
            elapsed = time.perf_counter() - start
    assert all(v["state"] == "done" for v in views), [v["error"] for v in views if v["state"] != "done"]
    batches = [v["batch_size"] for v in views]
    return {
        "max_batch": max_batch,
        "seconds": elapsed,
        "images_per_s": len(views) / elapsed,
        "mean_batch": sum(batches) / len(batches),
        "p50_latency_s": sorted(v["timings"]["total_s"] for v in views)[len(views) // 2],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="nano")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    p.add_argument("--jobs", type=int, default=32)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="max images per batched run (the 'on' setting)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    print(
        f"# {args.model} on {args.device} ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads() if args.threads is None else args.threads} threads); {args.jobs} jobs from "
        f"{args.clients} clients, {args.steps} steps, 1 image each"
    )
    results = [measure(args, 1), measure(args, args.batch)]
    print(f"{'batching':<10} {'max_batch':>9} {'seconds':>8} {'images/s':>9} {'mean batch':>10} {'p50 latency':>12}")
    for name, r in zip(("off", "on"), results):
        print(
            f"{name:<10} {r['max_batch']:>9} {r['seconds']:>8.2f} {r['images_per_s']:>9.2f} {r['mean_batch']:>10.1f}"
            f" {r['p50_latency_s']:>11.2f}s"
        )
    print(f"speed-up with batching: {results[1]['images_per_s'] / results[0]['images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
