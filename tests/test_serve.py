"""``kandinsky3 serve`` against a real uvicorn server on 127.0.0.1 (nano + a tiny inpainting model, CPU)."""

import base64
import io
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from kandinsky3 import ImageToImage, Inpaint, Outpaint, TextToImage, read_metadata, save_image  # noqa: E402
from kandinsky3.serve import ServeConfig, create_app  # noqa: E402
from kandinsky3.serve.schemas import api_fields  # noqa: E402
from kandinsky3.serve.testing import ServerThread  # noqa: E402

KEY = "test-key-0123456789"
STEPS = 2


def tiny_inpainting(device):
    from kandinsky3 import Kandinsky3
    from kandinsky3.checkpoints import tiny_components
    from kandinsky3.registry import VARIANTS

    v = VARIANTS["tiny"]
    v = replace(v, name="tiny-inpainting", unet=replace(v.unet, num_channels=9))
    return Kandinsky3(tiny_components(v, seed=1), device=device)


def nano(device):
    from kandinsky3 import Kandinsky3

    return Kandinsky3.from_pretrained("nano", device=device)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread while these tests run: on a small shared CPU it is several times faster than two (and the
    reference runs in this process use the same count, so the server's PNGs stay comparable byte for byte)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_thread):
    cfg = ServeConfig(
        data_dir=str(tmp_path_factory.mktemp("serve")),
        devices=["cpu"],
        api_key=KEY,
        max_queue=16,
        max_batch=8,
        max_side=256,
        max_upscale_side=512,
        max_steps=60,
        max_images=4,
        max_prompt_length=200,
        max_body_bytes=300_000,
    )
    app = create_app(cfg, loaders={"nano": nano, "tiny-inpainting": tiny_inpainting})
    with ServerThread(app) as s:
        s.wait_ready()
        s.config = cfg
        s.worker = app.state.serve["workers"][0]
        s.store = app.state.serve["store"]
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=120) as c:
        yield c


def png_bytes(image, tmp_path, name="ref.png"):
    save_image(image, tmp_path / name)
    return (tmp_path / name).read_bytes()


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def wait(client, job_id, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        view = client.get(f"/v1/jobs/{job_id}").json()
        if view["state"] in ("done", "failed", "cancelled"):
            return view
        assert time.monotonic() < deadline, view
        time.sleep(0.05)


def submit(client, body):
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def result(client, body):
    view = wait(client, submit(client, body))
    assert view["state"] == "done", view
    return view, [client.get(u).content for u in view["images"]]


def test_health_models_docs_and_schema_from_the_dataclasses(server, client):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").status_code == 200
    models = client.get("/v1/models").json()
    assert models["models"]["nano"]["tasks"] == ["generate", "edit"]
    assert models["models"]["tiny-inpainting"]["tasks"] == ["inpaint", "outpaint"]
    assert models["models"]["upscaler"]["tasks"] == ["upscale"]
    assert models["limits"]["max_steps"] == 60
    assert "swagger" in httpx.get(server.url + "/docs").text.lower()
    spec = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]
    for name, cls in (("GenerateJob", TextToImage), ("EditJob", ImageToImage), ("InpaintJob", Inpaint),
                      ("OutpaintJob", Outpaint)):  # fmt: skip
        fields = {f.name for f in api_fields(cls)}  # generate's IP-Adapter image prompt is not served
        assert set(spec[name]["properties"]) == fields | {"task", "model"}, name
        for f in api_fields(cls):
            if f.name != "beautify":  # the server's narrower help: the template only
                assert f.metadata["help"] in spec[name]["properties"][f.name]["description"]
    beautify = spec["GenerateJob"]["properties"]["beautify"]["anyOf"]
    assert {"const": "template", "type": "string"} in beautify or {"enum": ["template"], "type": "string"} in beautify
    ui = httpx.get(server.url + "/")
    assert ui.status_code == 200 and "/v1/jobs" in ui.text


def test_api_key(server):
    body = {"task": "generate", "prompt": "x"}
    assert httpx.post(server.url + "/v1/jobs", json=body).status_code == 401
    assert httpx.post(server.url + "/v1/jobs", json=body, headers={"X-API-Key": KEY + "x"}).status_code == 401
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_generate_png_is_byte_identical_to_the_cli(server, client, tmp_path):
    from kandinsky3.cli import main

    body = {"task": "generate", "prompt": "a red circle in the top left on a gray background", "steps": STEPS,
            "seed": 7}  # fmt: skip
    view, [png] = result(client, body)
    out = tmp_path / "cli.png"
    argv = ["generate", body["prompt"], "--seed", "7", "--steps", str(STEPS), "--device", "cpu", "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    assert png == out.read_bytes()
    meta = read_metadata(Image.open(io.BytesIO(png)))
    assert meta["prompt"] == body["prompt"] and meta["seed"] == 7 and meta["model"] == "nano"
    assert view["progress"] == {"step": STEPS, "total": STEPS, "fraction": 1.0}
    assert view["seed"] == 7 and view["settings"]["steps"] == STEPS and view["settings"]["width"] == 64
    assert set(view["timings"]) == {"queued_s", "run_s", "total_s"}
    # the synchronous endpoint: the same image through the same queue
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == png
    assert client.get(f"/v1/jobs/{r.headers['x-job-id']}").json()["state"] == "done"


def test_every_task_matches_the_python_api(server, client, tmp_path):
    nano_pipe, inpainting = server.worker.pipes["nano"], server.worker.pipes["tiny-inpainting"]
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:40, 20:44] = 255
    mask_image = Image.fromarray(mask)

    # edit: two images with a seed list
    body = {"task": "edit", "image": "data:image/png;base64," + b64(picture), "prompt": "a blue square",
            "steps": STEPS, "strength": 0.6, "num_images": 2, "seed": [3, 4]}  # fmt: skip
    _, pngs = result(client, body)
    ref = nano_pipe.run(ImageToImage(image=picture, prompt="a blue square", steps=STEPS, strength=0.6,
                                     num_images=2, seed=[3, 4]), progress=False)  # fmt: skip
    assert pngs == [png_bytes(im, tmp_path, f"e{k}.png") for k, im in enumerate(ref)]

    # inpaint with paste-back: outside the mask the picture is untouched
    body = {"task": "inpaint", "image": b64(picture), "mask": b64(mask_image), "prompt": "a star", "steps": STEPS,
            "seed": 5, "paste_back": True}  # fmt: skip
    view, [png] = result(client, body)
    assert view["model"] == "tiny-inpainting"
    ref = inpainting.run(Inpaint(image=picture, mask=mask_image, prompt="a star", steps=STEPS, seed=5,
                                 paste_back=True), progress=False)  # fmt: skip
    assert png == png_bytes(ref[0], tmp_path)
    out = np.asarray(Image.open(io.BytesIO(png)))
    assert (out[mask == 0] == np.asarray(picture)[mask == 0]).all()

    # outpaint
    body = {"task": "outpaint", "image": b64(picture), "prompt": "a blue circle", "left": 32, "steps": STEPS, "seed": 6}
    _, [png] = result(client, body)
    ref = inpainting.run(Outpaint(image=picture, prompt="a blue circle", left=32, steps=STEPS, seed=6), progress=False)
    assert png == png_bytes(ref[0], tmp_path) and Image.open(io.BytesIO(png)).size == (128, 64)  # sides round up to 64

    # generate with the template beautifier (the only one a request may ask the server for)
    body = {"task": "generate", "prompt": "a star", "beautify": "template", "steps": STEPS, "seed": 8}
    _, [png] = result(client, body)
    ref = nano_pipe.run(TextToImage(prompt="a star", beautify="template", steps=STEPS, seed=8), progress=False)
    assert png == png_bytes(ref[0], tmp_path) and read_metadata(Image.open(io.BytesIO(png)))["prompt"] != "a star"

    # upscale
    small = picture.resize((32, 32))
    body = {"task": "upscale", "image": b64(small), "scale": 2, "steps": 1, "seed": 9}
    _, [png] = result(client, body)
    ref = server.worker.upscaler.upscale(small, 2, 1, 9, progress=False)
    assert png == png_bytes(ref, tmp_path) and read_metadata(Image.open(io.BytesIO(png)))["task"] == "upscale"


def test_batched_jobs_match_their_solo_runs(server, client, tmp_path):
    """Compatible jobs queued together share one sampler run with per-image seeds. Each image has its solo run's
    noise, prompt and metadata; its pixels agree up to float rounding (the U-Net's CPU kernels are not
    batch-invariant: at most 1 of 255 levels in a few pixels). Bit-exact results: --max-batch 1 (the default)."""
    blocker = submit(client, {"task": "generate", "prompt": "a red circle", "steps": 6, "seed": 1})
    prompts = ["a red circle", "a large blue star on a white background", "a green square", ""]
    ids = [submit(client, {"task": "generate", "prompt": p, "steps": STEPS, "seed": 100 + i})
           for i, p in enumerate(prompts)]  # fmt: skip
    wait(client, blocker)
    views = [wait(client, j) for j in ids]
    assert all(v["state"] == "done" for v in views)
    assert max(v["batch_size"] for v in views) > 1, [v["batch_size"] for v in views]
    pipe = server.worker.pipes["nano"]
    for i, (p, v) in enumerate(zip(prompts, views)):
        solo = pipe.run(TextToImage(prompt=p, steps=STEPS, seed=100 + i), progress=False)[0]
        got = Image.open(io.BytesIO(client.get(v["images"][0]).content))
        assert read_metadata(got) == read_metadata(solo)
        diff = np.abs(np.asarray(got, np.int16) - np.asarray(solo, np.int16))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (p, diff.max(), (diff > 0).mean())


def test_cancel_running_and_queued(server, client):
    long = submit(client, {"task": "generate", "prompt": "slow", "steps": 60, "seed": 2})
    queued = submit(client, {"task": "generate", "prompt": "never", "steps": 60, "seed": 2, "num_images": 2})
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{long}").json()["progress"]["step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert client.delete(f"/v1/jobs/{queued}").json()["state"] == "cancelled"
    r = client.delete(f"/v1/jobs/{long}")
    assert r.status_code == 202 and r.json()["state"] == "cancelling"
    view = wait(client, long)
    assert view["state"] == "cancelled" and view["progress"]["step"] < 60 and view["images"] == []
    assert client.get(f"/v1/jobs/{queued}").json()["state"] == "cancelled"
    assert client.get(f"/v1/jobs/{long}/images/0.png").status_code == 409
    # a finished job is deleted
    assert client.delete(f"/v1/jobs/{long}").json()["state"] == "deleted"
    assert client.get(f"/v1/jobs/{long}").status_code == 404


def _gray(size=(64, 64)):
    return b64(Image.new("RGB", size, (128, 128, 128)))


def _malformed():
    """(body, status, field) — every case names the field at fault."""
    g = {"task": "generate", "prompt": "x"}
    img = _gray()
    jpeg_in_text = base64.b64encode(b"GIF89a not really").decode()
    return [
        ({"prompt": "x"}, 422, "task"),
        ({"task": "paint", "prompt": "x"}, 422, "task"),
        ({**g, "steps": 0}, 422, "steps"),
        ({**g, "steps": -3}, 422, "steps"),
        ({**g, "steps": "10"}, 422, "steps"),
        ({**g, "steps": 2.5}, 422, "steps"),
        ({**g, "steps": 1000}, 422, "steps"),
        ({**g, "guidance": -1}, 422, "guidance"),
        ({**g, "guidance": "high"}, 422, "guidance"),
        ({**g, "width": 100}, 422, "width"),
        ({**g, "height": 4096}, 422, "height"),
        ({**g, "width": True}, 422, "width"),
        ({**g, "num_images": 0}, 422, "num_images"),
        ({**g, "num_images": 50}, 422, "num_images"),
        ({**g, "seed": -1}, 422, "seed"),
        ({**g, "seed": 2**64}, 422, "seed"),
        ({**g, "seed": [1, 2]}, 422, "seed"),
        ({**g, "seed": []}, 422, "seed"),
        ({**g, "sampler": "nope"}, 422, "sampler"),
        ({**g, "eta": -0.5}, 422, "eta"),
        ({**g, "threshold_percentile": 1.5}, 422, "threshold_percentile"),
        ({**g, "pixel_rounding": "floor"}, 422, "pixel_rounding"),
        ({**g, "prompt": "x" * 500}, 422, "prompt"),
        ({**g, "prompt": 12}, 422, "prompt"),
        ({**g, "prompt": []}, 422, "prompt"),
        ({**g, "strength": 0.5}, 422, "strength"),
        ({**g, "beautify": "local"}, 422, "beautify"),
        ({**g, "upscale": 3}, 422, "upscale"),
        ({**g, "colour": "red"}, 422, "colour"),
        ({**g, "model": "base"}, 422, "model"),
        ({"task": "generate", "prompt": "x", "model": "tiny-inpainting"}, 422, "model"),
        ({"task": "edit", "prompt": "x"}, 422, "image"),
        ({"task": "edit", "image": "not base64 !!"}, 422, "image"),
        ({"task": "edit", "image": jpeg_in_text}, 422, "image"),
        ({"task": "edit", "image": img, "strength": 0}, 422, "strength"),
        ({"task": "edit", "image": _gray((512, 64))}, 422, "image"),
        ({"task": "inpaint", "image": img}, 422, "mask"),
        ({"task": "inpaint", "image": img, "mask": _gray((32, 32))}, 422, "mask"),
        ({"task": "outpaint", "image": img}, 422, "left"),
        ({"task": "outpaint", "image": img, "left": -5}, 422, "left"),
        ({"task": "outpaint", "image": img, "right": 1000}, 422, "right"),
        ({"task": "outpaint", "image": img, "left": 8, "width": 64}, 422, "width"),
        ({"task": "upscale", "image": img, "scale": 3}, 422, "scale"),
        ({"task": "upscale", "image": img, "steps": 0}, 422, "steps"),
        ({"task": "upscale", "image": _gray((256, 256)), "scale": 4, "steps": 1}, 422, "image"),
        ({"task": "upscale", "image": img, "prompt": "x"}, 422, "prompt"),
        ({"task": "upscale", "image": img, "model": "nano"}, 422, "model"),
    ]


def test_malformed_requests_name_the_field_and_write_nothing(server, client):
    cases = _malformed()
    assert len(cases) >= 25
    before = (server.store.counts(), sorted(p.name for p in server.store.results.iterdir()))
    for body, status, field in cases:
        for path in ("/v1/jobs", "/v1/generate"):
            r = client.post(path, json=body)
            assert r.status_code == status, (body, r.text)
            fields = [d["field"] for d in r.json()["detail"]]
            assert field in fields, (body, r.text)
            assert any(field in d["msg"] or field in d["loc"] for d in r.json()["detail"]), r.text
    # not JSON, an empty body, too large a body
    r = client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert client.post("/v1/jobs", content=b"").status_code == 422
    big = {"task": "edit", "image": "A" * 400_000}
    r = client.post("/v1/jobs", json=big)
    assert r.status_code == 413 and r.json()["detail"][0]["field"] == "body"
    chunks = (b'{"task": "edit", "image": "' if k == 0 else b"A" * 50_000 for k in range(10))  # no Content-Length
    r = client.post("/v1/jobs", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["detail"][0]["field"] == "body"
    after = (server.store.counts(), sorted(p.name for p in server.store.results.iterdir()))
    assert after == before
    # and the server keeps serving
    view, [png] = result(client, {"task": "generate", "prompt": "ok", "steps": 1, "seed": 0})
    assert png.startswith(b"\x89PNG")


def test_job_ids_are_validated(server, client):
    for bad in ("..%2F..%2Fjobs.sqlite3", "abc", "0" * 31 + "G", "%2E%2E", "0" * 33):
        assert client.get(f"/v1/jobs/{bad}").status_code in (404, 422), bad
        assert client.get(f"/v1/jobs/{bad}/images/0.png").status_code in (404, 422), bad
        assert client.delete(f"/v1/jobs/{bad}").status_code in (404, 405, 422), bad
    assert client.get("/v1/jobs/" + "0" * 32).status_code == 404
    assert client.get("/v1/jobs/../jobs.sqlite3").status_code == 404
    job = submit(client, {"task": "generate", "prompt": "x", "steps": 1, "seed": 0})
    wait(client, job)
    assert client.get(f"/v1/jobs/{job}/images/1.png").status_code == 404
    assert client.get(f"/v1/jobs/{job}/images/-1.png").status_code in (404, 422)


def test_load_bounded_queue_429_nothing_lost_or_duplicated(server, client):
    """32 clients × 4 jobs against a 16-job queue: accepted jobs all finish, the rest got 429 with Retry-After."""
    accepted, rejected, lock = [], [], threading.Lock()

    def one_client(c):
        with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as http:
            for j in range(4):
                r = http.post("/v1/jobs", json={"task": "generate", "prompt": f"load {c} {j}", "steps": 1,
                                                "seed": c * 10 + j})  # fmt: skip
                with lock:
                    if r.status_code == 202:
                        accepted.append((c, j, r.json()["id"]))
                    else:
                        assert r.status_code == 429, r.text
                        assert int(r.headers["retry-after"]) >= 1
                        rejected.append((c, j))

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(one_client, range(32)))
    assert len(accepted) + len(rejected) == 128 and rejected and len(accepted) >= 16
    ids = [a[2] for a in accepted]
    assert len(set(ids)) == len(ids)
    views = [wait(client, j) for j in ids]
    assert all(v["state"] == "done" and v["attempts"] == 1 for v in views)
    for (c, j, _), v in zip(accepted, views):
        assert v["request"]["prompt"] == f"load {c} {j}"
    db = sqlite3.connect(server.store.path)
    rows = db.execute("SELECT id, state FROM jobs WHERE fields LIKE '%\"load %'").fetchall()
    assert sorted(r[0] for r in rows) == sorted(ids) and {r[1] for r in rows} == {"done"}
    metrics = httpx.get(server.url + "/metrics").text
    assert 'kandinsky3_rejected_total{status="429"}' in metrics
    line = next(ln for ln in metrics.splitlines() if ln.startswith('kandinsky3_images_total{task="generate"}'))
    assert float(line.split()[-1]) >= len(ids)
    assert "kandinsky3_job_latency_seconds_bucket" in metrics and "kandinsky3_queue_depth 0.0" in metrics


def test_store_retention_and_recovery(tmp_path):
    from kandinsky3.serve.store import CANCELLED, DONE, MAX_ATTEMPTS, QUEUED, RUNNING, JobStore

    store = JobStore(tmp_path, max_queue=10, retention=2)
    ids = [store.submit("generate", "nano", {"prompt": str(i)}, {"image": b"x"}, 1) for i in range(4)]
    claimed = store.claim("w", 1)
    assert [c["id"] for c in claimed] == ids[:1] and store.get(ids[0])["state"] == RUNNING
    store.result_path(ids[0], 0).parent.mkdir()
    store.result_path(ids[0], 0).write_bytes(b"partial")
    orphan = store.results / ("f" * 32)  # a job deleted by a delete / prune that crashed before its rmtree
    orphan.mkdir()
    assert JobStore(tmp_path).recover() == 1  # as after kill -9: the running job is queued again, its files gone
    assert store.get(ids[0])["state"] == QUEUED and not store.result_path(ids[0], 0).exists()
    assert not orphan.exists()
    for _ in ids:
        (job,) = store.claim("w", 1)
        store.finish(job["id"], DONE)
    assert [store.get(j) is None for j in ids] == [True, True, False, False]  # retention 2
    assert store.inputs(ids[3]) == {} and store.integrity_check() == "ok"
    assert store.counts() == {QUEUED: 0, RUNNING: 0, DONE: 2, "failed": 0, CANCELLED: 0}

    # a running job whose cancellation was asked for is cancelled by recovery, not re-run; delete() leaves a
    # running job (and its files) alone
    cancelled, kept = (store.submit("generate", "nano", {"prompt": p}, {"image": b"x"}, 1) for p in "ab")
    assert [j["id"] for j in store.claim("w", 1)] == [cancelled] and [j["id"] for j in store.claim("w", 1)] == [kept]
    assert store.cancel(cancelled) == RUNNING
    store.result_path(kept, 0).parent.mkdir()
    assert store.delete(kept) is False and store.result_path(kept, 0).parent.is_dir()
    assert JobStore(tmp_path).recover() == 1
    assert store.get(cancelled)["state"] == CANCELLED and store.get(kept)["state"] == QUEUED
    assert store.inputs(cancelled) == {} and store.inputs(kept) == {"image": b"x"}
    # a job that was running at each of MAX_ATTEMPTS crashes fails instead of crash-looping the server
    for attempt in range(2, MAX_ATTEMPTS + 1):  # its first run ended in the crash above
        assert [j["id"] for j in store.claim("w", 1)] == [kept]
        assert JobStore(tmp_path).recover() == (1 if attempt < MAX_ATTEMPTS else 0)
    assert store.get(kept)["state"] == "failed" and store.get(kept)["attempts"] == MAX_ATTEMPTS
    assert store.inputs(kept) == {} and "each of its" in store.get(kept)["error"]


def test_one_server_per_data_dir(tmp_path):
    from kandinsky3.serve.store import JobStore

    first = JobStore(tmp_path)
    first.lock()
    with pytest.raises(RuntimeError, match="in use"):
        JobStore(tmp_path).lock()
    first.close()
    JobStore(tmp_path).lock()  # released


def test_batch_key_derives_from_the_request_fields():
    from kandinsky3.serve.worker import batch_key

    defaults = {f.name: f.default for f in TextToImage.task_fields() if f.name != "beautify"}
    one = {**defaults, "prompt": "a", "seed": 1}
    key = batch_key("generate", "nano", one)
    assert key is not None and key == batch_key("generate", "nano", {**one, "prompt": "b", "seed": 2})
    for change in ({"steps": 3}, {"guidance": 0.0}, {"negative_prompt": "x"}, {"pixel_rounding": "round"}):
        assert batch_key("generate", "nano", {**one, **change}) not in (None, key), change
    for alone in ({"prompt": ["a", "b"]}, {"upscale": 2}, {"num_images": 2}, {"negative_prompt": ["x"]}):
        assert batch_key("generate", "nano", {**one, **alone}) is None, alone
    assert batch_key("generate", "other", one) != key and batch_key("edit", "nano", one) is None


def test_readyz_is_false_until_the_models_are_loaded_and_cors_is_off(server, tmp_path):
    loaded = threading.Event()

    def slow_nano(device):
        loaded.wait(60)
        return server.worker.pipes["nano"]

    app = create_app(ServeConfig(data_dir=str(tmp_path), devices=["cpu"], upscaler=None), loaders={"nano": slow_nano})
    with ServerThread(app) as s:
        assert httpx.get(s.url + "/healthz").status_code == 200
        r = httpx.get(s.url + "/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False
        r = httpx.post(s.url + "/v1/jobs", json={"task": "generate", "prompt": "x"})
        assert r.status_code == 503 and "retry-after" in r.headers
        loaded.set()
        s.wait_ready(30)
        r = httpx.options(
            s.url + "/v1/jobs", headers={"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}
        )
        assert "access-control-allow-origin" not in r.headers
        r = httpx.get(s.url + "/healthz", headers={"Origin": "https://elsewhere.example"})
        assert "access-control-allow-origin" not in r.headers
