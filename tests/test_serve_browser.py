"""The web UI in headless Chromium (Debian's package, driven by Playwright for Python; no browser download)."""

import io
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

from PIL import Image  # noqa: E402

from kandinsky3 import read_metadata  # noqa: E402
from kandinsky3.serve import ServeConfig, create_app  # noqa: E402
from kandinsky3.serve.testing import ServerThread  # noqa: E402
from test_serve import one_thread  # noqa: E402, F401 - the fixture

CHROMIUM = os.environ.get("KANDINSKY3_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]  # fmt: skip

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    from test_serve import nano, tiny_inpainting

    request.getfixturevalue("one_thread")

    cfg = ServeConfig(data_dir=str(tmp_path_factory.mktemp("ui")), devices=["cpu"], upscaler=None)
    app = create_app(cfg, loaders={"nano": nano, "tiny-inpainting": tiny_inpainting})
    with ServerThread(app) as s:
        yield s.wait_ready()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(server.url + "/")
        sync_api.expect(page.locator("#status")).to_have_text("ready", timeout=60_000)
        yield page
        browser.close()


def _png(server, card):
    job, k = card.get_attribute("data-job"), card.get_attribute("data-index")
    return httpx.get(f"{server.url}/v1/jobs/{job}/images/{k}.png").content


def test_type_a_prompt_generate_and_rerun_with_the_seed(server, page):
    page.fill("#prompt", "a large blue star")
    page.fill("#steps", "2")
    page.fill("#seed", "11")
    page.click("#go")
    card = page.locator(".card").first
    sync_api.expect(card).to_be_visible(timeout=60_000)
    sync_api.expect(page.locator("#progress")).to_have_js_property("value", 1)
    assert page.evaluate("() => document.querySelector('.card img').naturalWidth") == 64
    png = _png(server, card)
    image = Image.open(io.BytesIO(png))
    assert image.size == (64, 64) and read_metadata(image)["prompt"] == "a large blue star"
    assert read_metadata(image)["seed"] == 11
    page.fill("#prompt", "something else")
    page.fill("#seed", "")
    card.locator("button.rerun").click()
    assert page.input_value("#prompt") == "a large blue star" and page.input_value("#seed") == "11"
    if os.environ.get("KANDINSKY3_UI_SCREENSHOT"):
        page.screenshot(path=os.environ["KANDINSKY3_UI_SCREENSHOT"])


def test_brush_a_mask_on_an_uploaded_image_and_inpaint_with_paste_back(server, page, tmp_path):
    rng = np.random.default_rng(1)
    picture = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "in.png")
    page.select_option("#task", "inpaint")
    page.set_input_files("#file", str(tmp_path / "in.png"))
    mask = page.locator("#mask")
    sync_api.expect(mask).to_be_visible()
    box = mask.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.25, y)
    page.mouse.down()
    for f in np.linspace(0.25, 0.75, 8):
        page.mouse.move(box["x"] + box["width"] * f, y)
    page.mouse.up()
    page.fill("#prompt", "a red circle")
    page.fill("#steps", "2")
    page.fill("#seed", "5")
    assert page.is_checked("#paste_back")
    n = page.locator(".card").count()
    page.click("#go")
    sync_api.expect(page.locator(".card")).to_have_count(n + 1, timeout=90_000)
    out = np.asarray(Image.open(io.BytesIO(_png(server, page.locator(".card").first))))
    assert read_metadata(Image.open(io.BytesIO(_png(server, page.locator(".card").first))))["task"] == "inpaint"
    # the brush (8 px on a 256-px view of a 64-px image: ≈2 px) crossed the middle rows; far from it, paste-back
    # keeps the upload exactly; on the stroke the model repainted
    assert (out[:24] == picture[:24]).all() and (out[40:] == picture[40:]).all()
    assert (out[30:34, 20:44] != picture[30:34, 20:44]).any()
