"""Workers: one thread per device, holding that device's loaded pipelines, taking jobs from the store."""

from __future__ import annotations

import dataclasses

import io
import json
import logging
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from PIL import Image

from ..diffusion.sampling import GenerationCancelled
from ..images import read_metadata, save_image, with_metadata
from ..requests import GenerationSettings, TextToImage
from .schemas import IMAGE_FIELDS, TASKS
from .store import CANCELLED, DONE, FAILED, JobStore

log = logging.getLogger("kandinsky3.serve")

UPSCALER = "upscaler"  # the model name of upscale jobs

#: the request fields that may differ between the jobs of one batched sampler run (every other field must agree)
PER_JOB_FIELDS = ("prompt", "seed")


def batch_key(task: str, model: str, fields: dict) -> str | None:
    """Jobs with equal keys may run as one batch, each image with its solo run's noise: text→image with one prompt
    and per-image seeds (one image, or a seed list), one negative prompt, no upscaling; the same model and every
    other field (settings, negative prompt, images per prompt). ``None``: the job runs alone."""
    if task != "generate" or not isinstance(fields.get("prompt", ""), str) or fields.get("upscale"):
        return None
    if isinstance(fields.get("negative_prompt"), list):
        return None
    if fields.get("num_images", 1) != 1 and not isinstance(fields.get("seed"), list):
        return None
    shared = {k: v for k, v in fields.items() if k not in PER_JOB_FIELDS}
    return json.dumps([model, shared], sort_keys=True)


class Worker(threading.Thread):
    """Loads its models on its device once, then runs jobs until stopped."""

    def __init__(
        self,
        device: str,
        store: JobStore,
        loaders: dict[str, Callable[[str], object]],
        upscaler_loader: Callable[[str], object] | None,
        max_batch: int,
        metrics=None,
    ):
        super().__init__(name=f"kandinsky3-worker-{device}", daemon=True)
        self.device, self.store, self.loaders, self.upscaler_loader = device, store, loaders, upscaler_loader
        self.max_batch, self.metrics = max_batch, metrics
        self.pipes: dict[str, object] = {}
        self.upscaler = None
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.load_error: BaseException | None = None

    def stop(self):
        self.stopping.set()
        with self.store.changed:
            self.store.changed.notify_all()

    def run(self):
        try:
            for name, load in self.loaders.items():
                log.info("loading %s on %s", name, self.device)
                self.pipes[name] = load(self.device)
            if self.upscaler_loader is not None:
                self.upscaler = self.upscaler_loader(self.device)
        except BaseException as exc:  # noqa: BLE001 - reported by /readyz and the log
            self.load_error = exc
            log.error("loading the models on %s failed:\n%s", self.device, traceback.format_exc())
            return
        self.ready.set()
        models = set(self.pipes) | ({UPSCALER} if self.upscaler is not None else set())
        while not self.stopping.is_set():
            jobs = []
            try:
                jobs = self.store.claim(self.name, self.max_batch, models)
                if jobs:
                    self.execute(jobs)
                    continue
            except Exception:  # noqa: BLE001 - a bug or a busy database must not kill the worker
                log.error("worker error:\n%s", traceback.format_exc())
                self._fail_unfinished(jobs)
                self.stopping.wait(1.0)  # no hot loop while the database is unavailable
                continue
            with self.store.changed:
                self.store.changed.wait(0.5)

    def _fail_unfinished(self, jobs: list[dict]):
        """After an internal error: the claimed jobs still running fail (a job already done stays done)."""
        for j in jobs:
            try:
                self.store.finish(j["id"], FAILED, error="internal error")
            except Exception:  # noqa: BLE001 - left running: the next start requeues it
                log.error("could not mark job %s failed:\n%s", j["id"], traceback.format_exc())

    # -- one claimed batch ---------------------------------------------------------------------------------------

    def _request(self, job: dict, **override):
        cls = TASKS[job["task"]]
        images = {k: Image.open(io.BytesIO(v)) for k, v in self.store.inputs(job["id"]).items() if k in IMAGE_FIELDS}
        return cls(**{**job["fields"], **override}, **images)

    def _total_steps(self, job: dict, pipe) -> int | None:
        if job["task"] == "upscale":
            return None
        # resolved as plain settings: ``resolve`` on a request with fixed fields (Outpaint: width, height) fails
        s = GenerationSettings(**self._request(job).to_dict()).resolve(pipe.variant)
        return max(1, int(s.steps * s.strength)) if s.strength < 1 else s.steps

    def execute(self, jobs: list[dict]):
        ids = [j["id"] for j in jobs]
        first = jobs[0]
        started = time.perf_counter()
        try:
            if first["task"] == "upscale":
                results = [self._upscale(first)]
            else:
                pipe = self.pipes[first["model"]]
                total = self._total_steps(first, pipe)
                self.store.progress(ids, 0, total)

                def callback(step, t, latents):
                    self.store.progress(ids, step + 1, total)
                    if self.stopping.is_set() or any(self.store.cancel_requested(i) for i in ids):
                        return False
                    return None

                if len(jobs) == 1:
                    results = [pipe.run(self._request(first), callback=callback, progress=False)]
                else:
                    results = self._batched(pipe, jobs, callback)
        except GenerationCancelled:
            cancelled = [i for i in ids if self.store.cancel_requested(i)]
            for i in cancelled:
                self.store.finish(i, CANCELLED)
            self.store.requeue([i for i in ids if i not in cancelled])  # the rest of a batch, or a shutdown
            self._count("cancelled", len(cancelled))
            return
        except Exception as exc:  # noqa: BLE001 - the job fails, the worker goes on
            log.warning("job(s) %s failed: %s", ids, exc)
            for i in ids:
                self.store.finish(i, FAILED, error=f"{type(exc).__name__}: {exc}")
            self._count("failed", len(ids))
            if self.metrics is not None:
                self.metrics.errors.labels("job_failed").inc(len(ids))
            return
        elapsed = time.perf_counter() - started
        for job, images in zip(jobs, results):
            for k, image in enumerate(images):
                save_image(image, self.store.result_path(job["id"], k))
            _fsync_dir(self.store.result_path(job["id"], 0).parent)  # the renames are durable before "done"
            self.store.finish(job["id"], DONE, settings=_settings(images))
            if self.metrics is not None:
                self.metrics.job_done(job, len(images), elapsed, len(jobs))
        self._count("done", len(jobs))

    def _count(self, state, n):
        if self.metrics is not None and n:
            self.metrics.jobs.labels(state).inc(n)

    def _batched(self, pipe, jobs: list[dict], callback) -> list[list[Image.Image]]:
        """Compatible text→image jobs as one run: a prompt list and the concatenated per-image seeds."""
        f0 = jobs[0]["fields"]
        n = f0.get("num_images", 1)
        seeds = []
        for j in jobs:
            s = j["fields"]["seed"]
            seeds += s if isinstance(s, list) else [s]
        request = TextToImage(
            **{**f0, "prompt": [j["fields"].get("prompt", "") for j in jobs], "seed": seeds, "num_images": n}
        )
        images = pipe.run(request, callback=callback, progress=False)
        out = []
        for b in range(len(jobs)):
            part = []
            for k, image in enumerate(images[b * n : (b + 1) * n]):
                meta = read_metadata(image)
                meta["index"] = k  # the index within the job, as its solo run records it
                part.append(with_metadata(image, meta))
            out.append(part)
        return out

    def _upscale(self, job: dict) -> list[Image.Image]:
        req = self._request(job)
        return [self.upscaler.upscale(req.image, req.scale, req.steps, req.seed, progress=False)]


def _fsync_dir(folder: Path):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _settings(images: list[Image.Image]) -> dict:
    metas = [read_metadata(im) for im in images]
    if not metas:
        return {}
    names = {f.name for f in dataclasses.fields(GenerationSettings)} | {"task", "model", "scale", "mode", "window"}
    out = {k: v for k, v in metas[0].items() if k in names}
    out["seed"] = [m.get("seed") for m in metas] if len(metas) > 1 else metas[0].get("seed")
    return out
