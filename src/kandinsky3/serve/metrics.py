"""Prometheus metrics (prometheus_client), one registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, store):
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("kandinsky3_queue_depth", "jobs queued or running", registry=r)
        self.queue_depth.set_function(store.queue_depth)
        self.latency = Histogram(
            "kandinsky3_job_latency_seconds",
            "submission → result, per finished job",
            ["task"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, float("inf")),
            registry=r,
        )
        self.run_time = Histogram(
            "kandinsky3_run_seconds",
            "time of the sampler run that made a job (a batch is counted once per job)",
            ["task"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, float("inf")),
            registry=r,
        )
        self.images = Counter("kandinsky3_images", "images generated (rate(): images/s)", ["task"], registry=r)
        self.jobs = Counter("kandinsky3_jobs", "jobs finished, by final state", ["state"], registry=r)
        self.batch = Histogram(
            "kandinsky3_batch_jobs", "jobs per sampler run", buckets=(1, 2, 4, 8, 16, 32, float("inf")), registry=r
        )
        self.errors = Counter(
            "kandinsky3_errors",
            "errors by kind (job_failed: a job raised; refused requests are in kandinsky3_rejected)",
            ["kind"],
            registry=r,
        )
        self.rejected = Counter("kandinsky3_rejected", "requests refused, by status", ["status"], registry=r)
        self._mean_run = None  # seconds per job, exponential average (for Retry-After)

    def job_done(self, job: dict, images: int, elapsed: float, batch: int):
        import time

        self.latency.labels(job["task"]).observe(max(0.0, time.time() - job["created"]))
        self.images.labels(job["task"]).inc(images)
        self.run_time.labels(job["task"]).observe(elapsed)
        self.batch.observe(batch)
        per_job = elapsed / max(1, batch)
        self._mean_run = per_job if self._mean_run is None else 0.8 * self._mean_run + 0.2 * per_job

    def seconds_per_job(self) -> float:
        return self._mean_run or 1.0
