"""The demo page in a real browser: Playwright drives headless Chromium against `gapnet serve`.

The server (a tiny gap model, uvicorn in a background thread) listens on 127.0.0.1; each test
draws with mouse events or uploads a file, presses predict, and checks what the page shows
against the API's own answer. Screenshots are saved in each test's tmp dir.

Needs Chromium (Debian's ``chromium``; ``make test`` installs it): without it these tests fail
and say how to install it, they never skip.
"""

import io
import os
import shutil

import httpx
import pytest
from PIL import Image

from gapnet import data, serve

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("one_torch_thread")]

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]  # fmt: skip
TIMEOUT_MS = 30_000


def chromium_path():
    """Chromium's executable: $GAPNET_CHROMIUM, or chromium / chromium-browser on the PATH."""
    candidates = [os.environ.get("GAPNET_CHROMIUM"), shutil.which("chromium"),
                  shutil.which("chromium-browser"), "/usr/bin/chromium"]  # fmt: skip
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    pytest.fail(
        "Chromium not found: the browser tests drive headless Chromium. Install it with "
        "`sudo apt-get install -y chromium` (Debian; `make test` does it for you), or set "
        "GAPNET_CHROMIUM to a Chromium executable"
    )


@pytest.fixture(scope="module")
def base_url(tiny_gap_run):
    with serve.serving(serve.create_app(serve.load_predictor(tiny_gap_run))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, base_url):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(base_url + "/")
    page.wait_for_function("document.getElementById('model').textContent.startsWith('Model:')")
    yield page
    page.close()


def draw_seven(page):
    """A 7 with the mouse: the top bar, then the diagonal stroke down."""
    box = page.locator("#canvas").bounding_box()

    def at(fx, fy):
        return box["x"] + fx * box["width"], box["y"] + fy * box["height"]

    page.mouse.move(*at(0.25, 0.25))
    page.mouse.down()
    page.mouse.move(*at(0.75, 0.25), steps=12)
    page.mouse.move(*at(0.45, 0.85), steps=16)
    page.mouse.up()


def lit_pixels(page):
    """How many canvas pixels the drawing lit."""
    return page.evaluate(
        """() => { const c = document.getElementById('canvas');
           const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
           let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i] > 0; return n; }"""
    )


def predict(page, trigger):
    """Run `trigger` (a click, an upload), wait for the answer; the API's JSON answer."""
    with page.expect_response("**/api/predict") as response:
        trigger()
    page.wait_for_selector("#overlay[src^='data:image/png']", state="visible")
    assert response.value.ok
    return response.value.json()


def shown(page):
    """What the page shows: (answer text, [probabilities of the listed rows], seen text)."""
    probs = [
        float(v)
        for v in page.eval_on_selector_all(".prob-row", "rs => rs.map(r => r.dataset.prob)")
    ]
    return page.inner_text("#answer"), probs, page.inner_text("#seen")


def test_draw_a_digit_and_see_the_answer_and_the_map(page, tmp_path):
    draw_seven(page)
    assert lit_pixels(page) > 100
    out = predict(page, lambda: page.click("#predict"))
    answer, probs, seen = shown(page)
    best = out["top_k"][0]
    assert answer == f"Answer: {best['name']} ({100 * best['prob']:.1f}%)"
    # five classes by name and one row for the other five: together every probability
    assert len(probs) == 6 and abs(sum(probs) - 1) <= 1e-6
    assert probs[0] == best["prob"]
    # the drawing reached the model at the size it was drawn
    assert out["input"] == [1, 64, 64] and out["resized"] is None
    assert "sent the drawing at 64x64 px, as drawn; the model saw 1x64x64" in seen
    assert page.evaluate("document.getElementById('overlay').naturalWidth") == 64
    assert "box x" in page.inner_text("#box")
    page.screenshot(path=tmp_path / "draw.png", full_page=True)
    assert Image.open(tmp_path / "draw.png").size[0] >= 1000


def test_upload_a_file_and_see_the_same(page, base_url, tmp_path):
    x = data.rescale(data.load("mnist-5k").test.images[:1], (37, 45))[0, 0]
    path = tmp_path / "digit.png"
    Image.fromarray((255 - (x.clamp(0, 1) * 255).round()).byte().numpy(), "L").save(path)
    out = predict(page, lambda: page.set_input_files("#upload", str(path)))
    answer, probs, seen = shown(page)
    # the page shows what the API says for that file
    direct = httpx.post(f"{base_url}/api/predict", files={"file": ("digit.png", path.read_bytes())})
    assert direct.json()["probs"] == out["probs"]
    assert answer.startswith(f"Answer: {out['top_k'][0]['name']} (")
    assert abs(sum(probs) - 1) <= 1e-6
    assert "sent digit.png; the model saw 1x37x45 (inverted: dark on light)" in seen
    page.screenshot(path=tmp_path / "upload.png", full_page=True)


def test_resize_the_canvas_and_predict_again(page, tmp_path):
    draw_seven(page)
    first = predict(page, lambda: page.click("#predict"))
    lit = lit_pixels(page)
    page.fill("#width", "120")
    page.fill("#height", "80")
    page.click("#resize")
    size = page.evaluate("(c => [c.width, c.height])(document.getElementById('canvas'))")
    assert size == [120, 80]
    assert lit_pixels(page) == lit  # the drawing is kept at its size, centred
    second = predict(page, lambda: page.click("#predict"))
    assert first["input"] == [1, 64, 64] and second["input"] == [1, 80, 120]
    _, probs, seen = shown(page)
    assert "sent the drawing at 120x80 px, as drawn; the model saw 1x80x120" in seen
    assert abs(sum(probs) - 1) <= 1e-6
    overlay = page.evaluate(
        "(i => [i.naturalWidth, i.naturalHeight])(document.getElementById('overlay'))"
    )
    assert overlay == [120, 80]
    page.screenshot(path=tmp_path / "resized.png", full_page=True)
    png = io.BytesIO(page.locator("#overlay").screenshot())
    assert Image.open(png).size[0] > 120  # shown enlarged, pixelated
