"""The FastAPI application: jobs API, synchronous generation, health, metrics and the web UI."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import random
import time
from typing import Callable

from fastapi import Depends, FastAPI, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .config import ServeConfig
from .metrics import Metrics
from .schemas import IMAGE_FIELDS, INPAINTING_TASKS, TASKS, FieldError, JobBody, api_fields, decode_image
from .schemas import field_of_message
from .store import CANCELLED, DONE, FINISHED, QUEUED, RUNNING, JobStore, QueueFull
from .worker import UPSCALER, Worker, batch_key

SYNC_POLL_S = 0.1  # how often POST /v1/generate looks at its job
JOB_ID = Path(pattern=r"^[0-9a-f]{32}$", description="a job id (32 hex digits)")


def _pipeline_loader(source: str, dtype: str | None) -> Callable[[str], object]:
    def load(device):
        from ..pipeline import Kandinsky3

        return Kandinsky3.from_pretrained(source, device=device, dtype=dtype)

    return load


def _upscaler_loader(source: str, dtype: str | None) -> Callable[[str], object]:
    def load(device):
        from ..superres import SuperRes

        return SuperRes.from_pretrained(None if source == "nano" else source, device=device, dtype=dtype)

    return load


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413, by Content-Length before anything is
    read, and while reading a body sent without one (chunked): the 413 goes out at once, the app then sees a
    disconnect and whatever it would answer is dropped."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(send)
        seen, refused = 0, False

        async def limited_receive():
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    refused = True
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not refused:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused:  # after a 413 the app's complaint about the cut-off body is moot
                raise

    async def _refuse(self, send):
        body = b'{"detail":[{"loc":["body"],"field":"body","msg":"request body too large","type":"too_large"}]}'
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _error(status: int, field: str, msg: str, kind: str = "value_error", headers=None) -> JSONResponse:
    return JSONResponse(
        {
            "detail": [
                {"loc": ["body", field] if field != "body" else ["body"], "field": field, "msg": msg, "type": kind}
            ]
        },
        status_code=status,
        headers=headers,
    )


def create_app(
    config: ServeConfig | None = None,
    loaders: dict[str, Callable[[str], object]] | None = None,
    upscaler_loader: Callable[[str], object] | None = None,
) -> FastAPI:
    """The server. ``loaders`` (name → ``load(device)``) replace ``config.models`` (tests, custom models);
    ``upscaler_loader`` replaces ``config.upscaler``."""
    config = config or ServeConfig()
    if loaders is None:
        loaders = {name: _pipeline_loader(src, config.dtype) for name, src in config.model_sources().items()}
    if upscaler_loader is None and config.upscaler:
        upscaler_loader = _upscaler_loader(config.upscaler, config.dtype)
    from ..devices import default_device

    devices = config.devices or [default_device().type]
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if config.threads:
            import torch

            torch.set_num_threads(config.threads)
        store = JobStore(config.data_dir, config.max_queue, config.retention)
        store.lock()
        store.recover()
        metrics = Metrics(store)
        workers = [Worker(d, store, loaders, upscaler_loader, config.max_batch, metrics) for d in devices]
        state.update(store=store, metrics=metrics, workers=workers)
        for w in workers:
            w.start()
        try:
            yield
        finally:
            for w in workers:
                w.stop()
            for w in workers:
                w.join(timeout=60)
            store.close()

    app = FastAPI(
        title="Kandinsky 3 server",
        version="0.1.0",
        description="Jobs API over a durable SQLite queue. Request fields are those of kandinsky3.requests; images "
        "are base64 strings. See docs/serve.md.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    app.state.serve = state
    app.state.config = config

    def store() -> JobStore:
        return state["store"]

    def metrics() -> Metrics:
        return state["metrics"]

    # -- errors ----------------------------------------------------------------------------------------------------

    @app.exception_handler(FieldError)
    async def field_error(request, exc: FieldError):
        metrics().rejected.labels(str(exc.status)).inc()
        return _error(exc.status, exc.field, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        metrics().rejected.labels("422").inc()
        detail = []
        for e in exc.errors():
            loc = list(e.get("loc", ()))
            if len(loc) > 1 and loc[0] == "body" and loc[1] in TASKS:
                del loc[1]  # the union's tag (the task), not a field
            names = [p for p in loc[1:] if isinstance(p, str)]
            if e.get("type") in ("union_tag_invalid", "union_tag_not_found"):
                names = ["task"]
            field = names[0] if names else (loc[-1] if loc and isinstance(loc[-1], str) else "body")
            if e.get("type") == "extra_forbidden":
                msg = f"unknown field {field!r} for this task"
            else:
                msg = f"{field}: {e.get('msg')}"
            detail.append({"loc": loc, "field": field, "msg": msg, "type": e.get("type")})
        return JSONResponse({"detail": detail}, status_code=422)

    # -- auth ------------------------------------------------------------------------------------------------------

    def require_key(request: Request):
        if not config.api_key:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode(), config.api_key.encode()):
            metrics().rejected.labels("401").inc()
            raise HTTPException(401, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(require_key)]

    # -- readiness / catalog ---------------------------------------------------------------------------------------

    def ready() -> bool:
        return bool(state.get("workers")) and all(w.ready.is_set() and w.is_alive() for w in state["workers"])

    def catalog() -> dict:
        w = state["workers"][0]
        out = {}
        for name, pipe in w.pipes.items():
            out[name] = {
                "variant": pipe.variant.name,
                "description": pipe.variant.description,
                "inpainting": pipe.is_inpainting,
                "tasks": list(INPAINTING_TASKS) if pipe.is_inpainting else ["generate", "edit"],
                "default_size": pipe.variant.size,
                "size_multiple": pipe.size_multiple,
                "sampler": pipe.variant.sampler.to_dict(),
            }
        if w.upscaler is not None:
            out[UPSCALER] = {"variant": w.upscaler.name, "tasks": ["upscale"], "scale": w.upscaler.scale}
        return out

    # -- submission ------------------------------------------------------------------------------------------------

    def prepare(body) -> tuple[str, str, dict, dict, int]:
        """Validate a request body against the task, the limits and the loaded models; resolve its seed."""
        if not ready():
            raise HTTPException(503, "models are loading; try again (GET /readyz)", headers={"Retry-After": "5"})
        task = body.task
        cls = TASKS[task]
        data = body.model_dump(exclude={"task", "model"})
        names = [f.name for f in api_fields(cls)]
        images, raw = {}, {}
        for name in IMAGE_FIELDS:
            if name in data:
                images[name], raw[name] = decode_image(name, data.pop(name), config.max_body_bytes, config.max_side)
        cat = catalog()
        model = body.model
        if task == "upscale":
            if model not in (None, UPSCALER) or UPSCALER not in cat:
                raise FieldError(
                    "model" if model else "task",
                    "this server has no upscaler"
                    if UPSCALER not in cat
                    else f"model: the upscale task uses {UPSCALER!r}",
                )
            model = UPSCALER
        elif model is not None:
            if model not in cat or task not in cat[model]["tasks"]:
                able = [m for m, c in cat.items() if task in c["tasks"]]
                raise FieldError("model", f"model {model!r} cannot {task} here; models that can: {able or 'none'}")
        else:
            model = next((m for m, c in cat.items() if task in c["tasks"]), None)
            if model is None:
                raise FieldError("task", f"no loaded model can {task} (GET /v1/models)")
        _check_limits(task, data, images, cat[model])
        if data.get("seed") is None:
            if task == "upscale":
                data["seed"] = random.randrange(2**32)
            else:
                n = _count_images(data)
                seeds = [random.randrange(2**32) for _ in range(n)]
                data["seed"] = seeds[0] if n == 1 else seeds
        try:
            cls(**data, **images)
        except (ValueError, TypeError) as exc:
            raise FieldError(field_of_message(str(exc), names), str(exc)) from None
        if task == "inpaint" and images["mask"].size != images["image"].size:
            w, h = images["image"].size
            raise FieldError(
                "mask", f"mask is {images['mask'].width}x{images['mask'].height}; it must be the image's size {w}x{h}"
            )
        return task, model, data, raw, _count_images(data) if task != "upscale" else 1

    def _count_images(data) -> int:
        prompt = data.get("prompt", "")
        return (1 if isinstance(prompt, str) else len(prompt)) * data.get("num_images", 1)

    def _check_limits(task, data, images, model_info):
        for name in ("prompt", "negative_prompt"):
            value = data.get(name)
            for p in [value] if isinstance(value, str) else value or []:
                if len(p) > config.max_prompt_length:
                    raise FieldError(name, f"{name} has {len(p)} characters; the limit is {config.max_prompt_length}")
            if isinstance(value, list) and not value:
                raise FieldError(name, f"{name}: give a string or a non-empty list")
        if task == "upscale":
            scale = data.get("scale") or model_info["scale"]
            side = max(images["image"].size) * scale
            if side > config.max_upscale_side:
                raise FieldError(
                    "image", f"image upscaled {scale}x would be {side} px; the limit is {config.max_upscale_side}"
                )
            if data.get("steps") and data["steps"] > config.max_steps:
                raise FieldError("steps", f"steps {data['steps']} is over the limit {config.max_steps}")
            return
        steps = data.get("steps")
        if isinstance(steps, int) and steps > config.max_steps:
            raise FieldError("steps", f"steps {steps} is over the limit {config.max_steps}")
        n = _count_images(data)
        if n > config.max_images:
            raise FieldError("num_images", f"num_images: {n} images in one request; the limit is {config.max_images}")
        seed = data.get("seed")
        if isinstance(seed, list) and len(seed) != n:
            raise FieldError("seed", f"seed: {len(seed)} seeds for {n} images; give one seed, or one per image")
        multiple = model_info["size_multiple"]
        for name in ("width", "height"):
            v = data.get(name)
            if isinstance(v, int) and v > config.max_side:
                raise FieldError(name, f"{name} {v} is over the limit {config.max_side}")
            if isinstance(v, int) and v >= 1 and v % multiple:
                raise FieldError(name, f"{name} {v} is not a multiple of {multiple}")
        if task == "outpaint":
            w, h = images["image"].size
            for name, base, a, b in (("left", w, "left", "right"), ("top", h, "top", "bottom")):
                for side in (a, b):
                    v = data.get(side, 0)
                    if isinstance(v, int) and not isinstance(v, bool) and v > config.max_side:
                        raise FieldError(side, f"{side} {v} is over the limit {config.max_side}")
                total = base + sum(data.get(s, 0) or 0 for s in (a, b) if isinstance(data.get(s, 0), int))
                if total > config.max_side:
                    raise FieldError(b, f"the outpainted canvas would be {total} px; the limit is {config.max_side}")
        upscale = data.get("upscale")
        if (
            upscale
            and max(data.get("width") or model_info["default_size"], data.get("height") or model_info["default_size"])
            * upscale
            > config.max_upscale_side
        ):
            raise FieldError("upscale", f"upscale: the result would be over {config.max_upscale_side} px")

    def submit(body) -> str:
        task, model, data, raw, n = prepare(body)
        key = batch_key(task, model, data) if config.max_batch > 1 else None
        try:
            return store().submit(task, model, data, raw, n, key)
        except QueueFull:
            metrics().rejected.labels("429").inc()
            depth = store().queue_depth()
            wait = max(1, min(600, math.ceil(depth * metrics().seconds_per_job() / max(1, len(devices)))))
            raise HTTPException(
                429, f"the queue is full ({config.max_queue} jobs); retry later", headers={"Retry-After": str(wait)}
            ) from None

    def job_view(request: Request, job: dict) -> dict:
        base = str(request.url_for("get_job", job_id=job["id"]))
        images = []
        if job["state"] == DONE:
            images = [f"{base}/images/{k}.png" for k in range(job["num_images"])]
        fields = job["fields"]
        timings = {}
        if job["started"]:
            timings["queued_s"] = round(job["started"] - job["created"], 3)
        if job["finished"] and job["started"]:
            timings["run_s"] = round(job["finished"] - job["started"], 3)
        if job["finished"]:
            timings["total_s"] = round(job["finished"] - job["created"], 3)
        total = job["total_steps"]
        view = {
            "id": job["id"],
            "task": job["task"],
            "model": job["model"],
            "state": job["state"],
            "progress": {
                "step": job["step"],
                "total": total,
                "fraction": 1.0 if job["state"] == DONE else (round(job["step"] / total, 4) if total else 0.0),
            },
            "created": job["created"],
            "started": job["started"],
            "finished": job["finished"],
            "timings": timings,
            "seed": fields.get("seed"),
            "request": fields,
            "settings": job["settings"],
            "batch_size": job["batch_size"],
            "attempts": job["attempts"],
            "error": job["error"],
            "images": images,
        }
        if job["state"] == QUEUED:
            view["queue_position"] = store().ahead_of(job["id"])
        return view

    def find(job_id: str) -> dict:
        job = store().get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    # -- routes ----------------------------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def ui():
        from .ui import PAGE

        return HTMLResponse(PAGE)

    @app.get("/healthz", tags=["health"])
    def healthz():
        """The process is up (it may still be loading models)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz():
        """200 once every worker has loaded its models; 503 before (or if loading failed)."""
        workers = state.get("workers", [])
        errors = {w.device: repr(w.load_error) for w in workers if w.load_error is not None}
        errors |= {w.device: "the worker stopped" for w in workers if w.ready.is_set() and not w.is_alive()}
        body = {"ready": ready(), "devices": [w.device for w in workers], "errors": errors}
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics", tags=["health"])
    def metrics_endpoint():
        """Prometheus text format."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics().registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth, tags=["jobs"])
    def models():
        """The loaded models, the tasks each serves, and the server's limits."""
        if not ready():
            raise HTTPException(503, "models are loading", headers={"Retry-After": "5"})
        limits = {
            k: getattr(config, k)
            for k in (
                "max_side",
                "max_upscale_side",
                "max_steps",
                "max_images",
                "max_prompt_length",
                "max_body_bytes",
                "max_queue",
                "max_batch",
            )
        }
        return {"models": catalog(), "tasks": list(TASKS), "limits": limits}

    @app.post("/v1/jobs", status_code=202, dependencies=auth, tags=["jobs"])
    def create_job(body: JobBody, request: Request):
        """Queue a job. 202 with its id and URL; 422 naming the field of a bad request; 429 (Retry-After) when the
        queue is full; 503 while models load."""
        job_id = submit(body)
        url = str(request.url_for("get_job", job_id=job_id))
        return JSONResponse({"id": job_id, "state": QUEUED, "url": url}, status_code=202, headers={"Location": url})

    @app.get("/v1/jobs/{job_id}", dependencies=auth, tags=["jobs"], name="get_job")
    def get_job(request: Request, job_id: str = JOB_ID):
        """State, progress (from the step callback), timings, seed, settings and result URLs."""
        return job_view(request, find(job_id))

    @app.get(
        "/v1/jobs/{job_id}/images/{k}.png",
        dependencies=auth,
        tags=["jobs"],
        response_class=FileResponse,
        responses={200: {"content": {"image/png": {}}}},
    )
    def get_image(job_id: str = JOB_ID, k: int = Path(ge=0, le=10_000)):
        """Result image k (PNG with the generation settings in its metadata)."""
        job = find(job_id)
        if job["state"] != DONE:
            raise HTTPException(409, f"job {job_id} is {job['state']}")
        path = store().result_path(job_id, k)
        if k >= job["num_images"] or not path.is_file():
            raise HTTPException(404, f"job {job_id} has no image {k}")
        return FileResponse(path, media_type="image/png")

    @app.delete("/v1/jobs/{job_id}", dependencies=auth, tags=["jobs"])
    def delete_job(job_id: str = JOB_ID):
        """Cancel a queued job, or stop a running one at its next step; a finished job is deleted with its images."""
        job = find(job_id)
        if job["state"] in FINISHED:
            store().delete(job_id)
            return {"id": job_id, "state": "deleted"}
        state_after = store().cancel(job_id)
        if state_after == CANCELLED and job["state"] == QUEUED:
            metrics().jobs.labels("cancelled").inc()
        return JSONResponse(
            {"id": job_id, "state": "cancelling" if state_after == RUNNING else state_after},
            status_code=202 if state_after == RUNNING else 200,
        )

    @app.post(
        "/v1/generate",
        dependencies=auth,
        tags=["jobs"],
        response_class=Response,
        responses={200: {"content": {"image/png": {}}, "description": "the first image"}},
    )
    async def generate_sync(body: JobBody):
        """Run any task through the same queue and wait: the first image as PNG (header X-Job-Id names the job,
        whose other images and settings are at /v1/jobs/{id})."""
        # async, polling the store from the thread pool: a waiting request holds no server thread
        job_id = await run_in_threadpool(submit, body)
        deadline = time.monotonic() + config.sync_timeout
        s = store()
        while (job := await run_in_threadpool(s.get, job_id)) is not None and job["state"] not in FINISHED:
            if time.monotonic() > deadline:
                raise HTTPException(
                    504, f"job {job_id} is still {job['state']}; poll /v1/jobs/{job_id}", headers={"X-Job-Id": job_id}
                )
            await asyncio.sleep(SYNC_POLL_S)
        if job is None:
            raise HTTPException(410, f"job {job_id} was deleted", headers={"X-Job-Id": job_id})
        if job["state"] != DONE:
            code = 409 if job["state"] == CANCELLED else 500
            raise HTTPException(
                code, f"job {job_id} {job['state']}: {job['error'] or ''}".strip(), headers={"X-Job-Id": job_id}
            )
        try:
            data = await run_in_threadpool(s.result_path(job_id, 0).read_bytes)
        except FileNotFoundError:  # deleted (DELETE, retention) between "done" and here
            raise HTTPException(410, f"job {job_id} was deleted", headers={"X-Job-Id": job_id}) from None
        return Response(data, media_type="image/png", headers={"X-Job-Id": job_id})

    return app
