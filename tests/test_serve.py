"""Tests for gapnet.serve: the JSON API over a real server on 127.0.0.1, bad input, load.

A tiny gap model (convnet-tiny, 1 epoch on 200 mnist-5k images) is served by uvicorn from a
background thread on a free loopback port; clients are httpx. What a response should say is
computed here from the same bytes with `gapnet.data.read_image` and the model itself.
"""

import asyncio
import base64
import concurrent.futures
import io
import json
import math
import os
import pickle
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from gapnet import data, models, serve
from gapnet.cli import build_parser, main
from gapnet.serve.predictor import Predictor
from gapnet.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(data="mnist-5k", model="convnet-tiny", epochs=1, train_size=200, threads=1)


@pytest.fixture(scope="module")
def predictor(tiny_gap_run):
    return serve.load_predictor(tiny_gap_run)


@pytest.fixture(scope="module")
def base_url(predictor):
    with serve.serving(serve.create_app(predictor)) as url:
        yield url


@pytest.fixture
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=30) as c:
        yield c


def encode(x, mode, fmt):
    """A (1, H, W) image in [0, 1] as the bytes of a `mode` image file in format `fmt`."""
    gray = (x[0].clamp(0, 1) * 255).round().byte().numpy()
    img = Image.fromarray(gray, "L")
    if mode == "RGB":  # a digit in red on black
        img = Image.merge("RGB", (img, Image.new("L", img.size), Image.new("L", img.size)))
    elif mode == "RGBA":  # the digit opaque, the background transparent (composited on white)
        rgb = Image.merge("RGB", (img, img, img))
        rgb.putalpha(img)
        img = rgb
    elif mode == "I;16":  # 16-bit gray, the full range
        img = Image.fromarray(gray.astype(np.uint16) * 257)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def digit(index, h, w):
    """Test digit `index` rescaled to h x w, (1, H, W)."""
    return data.rescale(data.load("mnist-5k").test.images[index : index + 1], (h, w))[0]


def expected_probs(model, image):
    """Softmax of the model on the image file as the server must decode it."""
    x, _ = data.read_image(image, 1, invert="auto")
    with torch.no_grad():
        return model(x[None])[0].softmax(0).numpy()


# ----------------------------------------------------------------------------- good images

GOOD = [
    # MNIST's own size and mode: 28x28 grayscale PNG
    ("L", "PNG", 28, 28),
    # grayscale at a non-square size of its own
    ("L", "PNG", 37, 45),
    # RGB JPEG, larger than any training image
    ("RGB", "JPEG", 64, 40),
    # RGBA PNG: transparency is composited over white, so the page's light background inverts
    ("RGBA", "PNG", 50, 50),
    # 16-bit grayscale PNG: scaled by its full range
    ("I;16", "PNG", 33, 29),
    # grayscale JPEG, tall and narrow
    ("L", "JPEG", 90, 31),
]


@pytest.mark.parametrize("mode, fmt, h, w", GOOD)
def test_good_images_get_the_model_answer_at_their_own_size(client, predictor, mode, fmt, h, w):
    image = encode(digit(h + w, h, w), mode, fmt)
    r = client.post("/api/predict", files={"file": (f"d.{fmt.lower()}", image)})
    assert r.status_code == 200, r.text
    out = r.json()
    want = expected_probs(predictor.model, image)
    assert np.abs(np.array(out["probs"]) - want).max() <= 1e-6
    assert abs(sum(out["probs"]) - 1) <= 1e-5
    assert out["top_k"][0]["class"] == int(want.argmax()) and len(out["top_k"]) == 3
    assert out["input"] == [1, h, w] and out["resized"] is None
    assert out["image"]["size"] == [w, h] and out["image"]["mode"] == mode
    # the overlay is a PNG of the input's size; the box lies inside it
    png = out["cam"]["overlay"].removeprefix("data:image/png;base64,")
    overlay = Image.open(io.BytesIO(base64.b64decode(png)))
    assert overlay.size == (w, h) and overlay.mode == "RGB"
    x0, y0, x1, y1 = out["cam"]["box"]
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


def test_top_k_lists_that_many_and_never_more_than_the_classes(client):
    image = encode(digit(0, 28, 28), "L", "PNG")
    for asked, listed in [(1, 1), (10, 10), (50, 10)]:
        r = client.post("/api/predict", files={"file": ("d.png", image)}, data={"top_k": asked})
        probs = [t["prob"] for t in r.json()["top_k"]]
        assert len(probs) == listed and probs == sorted(probs, reverse=True)


def test_health_page_and_docs(client, tiny_gap_run):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["max_bytes"] == serve.MAX_BYTES
    assert health["model"]["head"] == "gap" and health["model"]["fixed_size"] is None
    assert health["model"]["source"].startswith(str(tiny_gap_run))
    page = client.get("/")
    assert page.status_code == 200 and '<canvas id="canvas"' in page.text
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/api/predict", "/api/health"} <= set(spec["paths"])


# ----------------------------------------------------------------------------- bad input


def _bomb():
    """A 24 KB PNG that decodes to 5000x5000 = 25 M pixels."""
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, "PNG")
    return buf.getvalue()


def _corrupt():
    """A PNG whose compressed pixel data is overwritten (its header is intact)."""
    good = bytearray(encode(digit(1, 28, 28), "L", "PNG"))
    start = good.index(b"IDAT") + 8
    good[start : start + 40] = b"\xff" * 40
    return bytes(good)


def _chunks():
    """6 MB in 100 KB chunks, with no Content-Length (chunked transfer encoding)."""
    for _ in range(60):
        yield b"\0" * 100_000


PNG = encode(digit(2, 28, 28), "L", "PNG")
BAD = [
    # a body over the 5 MB limit: refused before anything parses it
    ("body over the limit", dict(files={"file": ("big.png", b"\0" * 6_000_000)}), 413,
     "over the limit of 5,000,000"),
    # the same without a Content-Length: counted as it arrives
    ("chunked body over the limit", dict(content=_chunks(), headers={
        "content-type": "multipart/form-data; boundary=x"}), 413, "over the limit"),
    # a decompression bomb: refused from its header, before decoding
    ("decompression bomb", dict(files={"file": ("bomb.png", _bomb())}), 422,
     "25,000,000 pixels, more than the limit of 4,000,000"),
    # the first half of a PNG
    ("truncated image", dict(files={"file": ("half.png", PNG[: len(PNG) // 2])}), 422,
     "truncated"),
    # a PNG with garbage in its pixel data
    ("corrupt image", dict(files={"file": ("bad.png", _corrupt())}), 422,
     "cannot read image 'bad.png'"),
    # a text file
    ("not an image", dict(files={"file": ("notes.txt", b"hello, world\n" * 20)}), 422,
     "cannot identify image file"),
    # a multipart form without the file field
    ("no file", dict(data={"top_k": "3"}), 400, "no image file"),
    # no body at all
    ("empty request", {}, 400, "no image file"),
    # JSON instead of a form
    ("not a form", dict(json={"file": "digit.png"}), 400, "no image file"),
    # a file field that is a plain string
    ("file field without a file", dict(data={"file": "digit.png"}), 400, "no image file"),
    # an empty file
    ("empty file", dict(files={"file": ("empty.png", b"")}), 400, "'empty.png' is empty"),
    # smaller than the backbone takes (convnet-tiny needs 4x4)
    ("image too small", dict(files={"file": ("tiny.png", encode(torch.rand(1, 3, 2), "L",
     "PNG"))}), 422, "needs at least 4x4"),
    # top_k must be a positive integer
    ("top_k of 0", dict(files={"file": ("d.png", PNG)}, data={"top_k": "0"}), 400, "top_k"),
    # ... and a number at all
    ("top_k not a number", dict(files={"file": ("d.png", PNG)}, data={"top_k": "many"}), 400,
     "top_k"),
]  # fmt: skip


@pytest.mark.parametrize("what, request_args, status, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_its_status_and_a_json_error(client, what, request_args, status, message):
    r = client.post("/api/predict", **request_args)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status"] == status and message in body["error"], body
    # the server keeps answering
    assert client.get("/api/health").status_code == 200
    ok = client.post("/api/predict", files={"file": ("d.png", PNG)})
    assert ok.status_code == 200


def test_unknown_routes_are_json_errors(client):
    r = client.get("/api/nothing")
    assert r.status_code == 404 and r.json() == {"error": "Not Found", "status": 404}


# ----------------------------------------------------------------------------- safety


def test_serve_binds_to_localhost_unless_told(monkeypatch):
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1" == serve.HOST
    seen = {}
    monkeypatch.setattr(serve, "load_predictor", lambda *a, **k: "predictor")
    monkeypatch.setattr(serve, "run", lambda predictor, **kw: seen.update(kw))
    assert main(["serve", "--checkpoint", "x"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8000


def test_the_server_never_unpickles(monkeypatch, tiny_gap_run):
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    app = serve.create_app(serve.load_predictor(tiny_gap_run))
    with serve.serving(app) as url:
        r = httpx.post(f"{url}/api/predict", files={"file": ("d.png", PNG)}, timeout=30)
    assert r.status_code == 200


def test_the_model_runs_off_the_event_loop(monkeypatch, predictor):
    threads = []

    def predict(self, image, **kwargs):
        try:
            asyncio.get_running_loop()
            threads.append("event loop")
        except RuntimeError:  # no loop runs in this thread: a worker thread
            threads.append(threading.current_thread().name)
        return original(self, image, **kwargs)

    original = Predictor.predict
    monkeypatch.setattr(Predictor, "predict", predict)
    with serve.serving(serve.create_app(predictor)) as url:
        assert httpx.post(f"{url}/api/predict", files={"file": ("d.png", PNG)}).status_code == 200
    assert len(threads) == 1 and threads[0] != "event loop"


def test_an_fc_model_resizes_and_says_so(client):
    model = models.create("convnet-tiny", head="fc").eval()
    app = serve.create_app(Predictor(model, [str(i) for i in range(10)], source="fc"))
    with serve.serving(app) as url:
        health = httpx.get(f"{url}/api/health").json()
        image = encode(digit(3, 40, 52), "L", "PNG")
        out = httpx.post(f"{url}/api/predict", files={"file": ("d.png", image)}).json()
    assert health["model"]["fixed_size"] == 28
    assert out["input"] == [1, 28, 28]
    assert out["resized"] == "resized from 52x40 to 28x28: this fc model takes one input size only"
    assert out["cam"] is None and "no class activation map" in out["cam_note"]


def test_without_a_checkpoint_the_demo_model_is_trained_once(tmp_path, capsys):
    cfg = TrainConfig(head="gem", out_dir=str(tmp_path / "demo" / "gem-robust"), **TINY)
    first = serve.load_predictor(demo=cfg, progress=False)
    assert "training the demo's gem model first" in capsys.readouterr().err
    path = tmp_path / "demo" / "gem-robust" / "checkpoint.safetensors"
    stamp = path.stat().st_mtime_ns
    second = serve.load_predictor(demo=cfg, progress=False)
    assert path.stat().st_mtime_ns == stamp and capsys.readouterr().err == ""
    assert first.source == second.source == str(path) and second.model.config.head == "gem"


def test_importing_serve_loads_no_web_framework():
    code = (
        "import sys, gapnet.serve; print([m for m in ('fastapi', 'uvicorn') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_onnx_file_is_refused_by_serve():
    with pytest.raises(ValueError, match="needs a checkpoint, got the ONNX file"):
        serve.load_predictor("model.onnx")


def test_export_and_serve_help_describe_them_with_an_example(capsys):
    for command in ("export", "serve"):
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert "example:" in out and f"gapnet {command}" in out


# ----------------------------------------------------------------------------- load

LOAD_REQUESTS = 400
LOAD_CLIENTS = 16
LOAD_SECONDS = 120  # the whole run must finish in this (it takes seconds)


@pytest.fixture(scope="module")
def served_command(tiny_gap_run):
    """`gapnet serve` as a user runs it, in its own process (so that its latencies are not
    the test's clients' GIL), on a free loopback port; stopped with SIGTERM."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "gapnet", "serve", "--checkpoint", str(tiny_gap_run),
            "--port", str(port), "--threads", "1"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"gapnet serve did not start: {proc.communicate()[0]}")
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(30)


def test_load_every_response_is_for_its_own_image(
    served_command, predictor, tmp_path, record_property, capsys
):
    # 40 different images: digits of every class at different sizes, modes and formats
    images = []
    for i in range(40):
        h, w = 28 + 3 * (i % 9), 28 + 5 * (i % 7)
        image = encode(digit(i, h, w), ("L", "RGB")[i % 2], ("PNG", "JPEG")[i % 3 == 0])
        images.append((image, expected_probs(predictor.model, image), [1, h, w]))

    def client_run(k):
        """Client k: its share of the requests, one after another, on one connection."""
        done = []
        with httpx.Client(base_url=served_command, timeout=30) as c:
            for n in range(k, LOAD_REQUESTS, LOAD_CLIENTS):
                image = images[n % len(images)][0]
                start = time.perf_counter()
                r = c.post("/api/predict", files={"file": (f"{n}.img", image)})
                done.append((n, r, time.perf_counter() - start))
        return done

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        runs = list(pool.map(client_run, range(LOAD_CLIENTS), timeout=LOAD_SECONDS))
    elapsed = time.perf_counter() - start
    results = [done for run in runs for done in run]
    assert sorted(n for n, _, _ in results) == list(range(LOAD_REQUESTS))
    for n, r, _ in results:
        _, want, shape = images[n % len(images)]
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["input"] == shape and out["image"]["name"] == f"{n}.img"
        assert np.abs(np.array(out["probs"]) - want).max() <= 1e-6, n
    latencies = sorted(t for _, _, t in results)
    p50 = statistics.median(latencies)
    p99 = latencies[math.ceil(0.99 * len(latencies)) - 1]
    summary = {
        "requests": LOAD_REQUESTS, "clients": LOAD_CLIENTS, "seconds": round(elapsed, 2),
        "requests_per_s": round(LOAD_REQUESTS / elapsed, 1), "p50_ms": round(1000 * p50, 1),
        "p99_ms": round(1000 * p99, 1), "server_torch_threads": 1,
        "images": "40 digits, 28-52 x 28-58 px, L/RGB, PNG/JPEG", "cpus": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }  # fmt: skip
    (tmp_path / "load.json").write_text(json.dumps(summary))
    for key, value in summary.items():
        record_property(key, value)
    with capsys.disabled():  # printed in every run, not only on failure
        print(f"\nload test: {json.dumps(summary)} ({tmp_path / 'load.json'})")
    assert elapsed < LOAD_SECONDS
