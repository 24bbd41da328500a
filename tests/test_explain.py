"""Tests for gapnet.explain and `gapnet explain`: the numbers in the text are the spec's and the
model's, the PNG has the stated size, and the labels drawn on it are the text's numbers."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gapnet import cam, checkpoint, data, models, reference
from gapnet import explain as E
from gapnet.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]


GRID_ROW = re.compile(r"^  [-\d./ ]+$")  # an indented row of numbers, "." and "sum/count"


def grids(text: str) -> list[list[list[str]]]:
    """The blocks of indented rows of numbers in a text version, each as rows of cells."""
    blocks: list[list[list[str]]] = []
    previous = False
    for line in text.splitlines():
        row = GRID_ROW.match(line) is not None
        if row and not previous:
            blocks.append([])
        if row:
            blocks[-1].append(line.split())
        previous = row
    return blocks


def floats(rows: list[list[str]]) -> np.ndarray:
    return np.array([[float(v) for v in row] for row in rows])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The fallback model of `explain gap|cam`, trained by `example_model` in an empty folder
    (no runs/demo/gap there), on 200 images for one epoch: the plumbing, not the accuracy."""
    folder = tmp_path_factory.mktemp("explain")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setattr(E, "TINY_TRAIN", {**E.TINY_TRAIN, "epochs": 1, "train_size": 200})
        _, _, note = E.example_model(None)
        assert "so trained convnet-tiny + gap on mnist-5k for 1 epochs" in note
        _, _, again = E.example_model(None)
        assert "trained earlier" in again  # reused, not retrained
    return folder / E.TINY_RUN


# ----------------------------------------------------------------------------- pooling

POOL_CASES = [
    # (what it checks, op, size, kernel, stride, padding, ceil_mode)
    ("2x2 windows, stride 2: the classic", "max", 6, 2, None, 0, False),
    ("overlapping 3x3 windows, stride 2 (AlexNet)", "max", 7, 3, 2, 0, False),
    ("integer padding: -inf never wins", "max", 5, 3, 2, 1, False),
    ("Keras 'same': odd padding cell at the bottom/right", "max", 6, 3, 2, "same", False),
    ("ceil_mode: a last window running past the input", "max", 5, 2, 2, 0, True),
    ("a 1x1 input", "max", 1, 1, None, 0, False),
    ("average, 2x2 stride 2", "avg", 6, 2, None, 0, False),
    ("average with padding counted in the divisor", "avg", 5, 3, 2, 1, False),
    ("average 'same': padded cells not counted", "avg", 5, 3, 2, "same", False),
    ("average, ceil_mode: the overhang is not counted", "avg", 5, 2, 2, 0, True),
    ("average, stride 1, non-square kernel", "avg", 4, (2, 3), 1, 0, False),
]


@pytest.mark.parametrize("what, op, size, kernel, stride, padding, ceil", POOL_CASES)
def test_pool_text_shows_the_specs_numbers(what, op, size, kernel, stride, padding, ceil):
    ex = E.pool_example(op, size, kernel, stride, padding, ceil, seed=3)
    blocks = grids(ex.text())
    shown_in, shown_out = blocks[0], blocks[1]
    x = np.random.default_rng(3).integers(0, 10, (size, size)).astype(np.float64)
    inside = [[v for v in row if v != E.OUTSIDE] for row in shown_in]
    assert floats([row for row in inside if row]).tolist() == x.tolist()
    fn = reference.max_pool2d if op == "max" else reference.avg_pool2d
    direct = fn(x[None], kernel, stride, padding, ceil_mode=ceil, layout="CHW")[0]
    np.testing.assert_allclose(floats(shown_out), direct, atol=0.005)  # 2 decimals printed
    if op == "avg":  # the "sum/count" grid: its quotients are the means
        fractions = [[v.split("/") for v in row] for row in blocks[2]]
        sums = np.array([[float(s) for s, _ in row] for row in fractions])
        counts = np.array([[int(n) for _, n in row] for row in fractions])
        np.testing.assert_allclose(sums / counts, direct, rtol=1e-12)


@pytest.mark.parametrize("what, op, size, kernel, stride, padding, ceil", POOL_CASES)
def test_pool_windows_are_where_the_outputs_come_from(
    what, op, size, kernel, stride, padding, ceil
):
    ex = E.pool_example(op, size, kernel, stride, padding, ceil, seed=4)
    h, w = ex.x.shape
    for i, (r0, r1) in enumerate(ex.rows):
        for j, (c0, c1) in enumerate(ex.cols):
            cells = ex.x[max(r0, 0) : min(r1, h), max(c0, 0) : min(c1, w)]
            if op == "max":
                assert ex.y[i, j] == cells.max()
                r, c = divmod(int(ex.argmax[i, j]), w)
                assert r0 <= r < r1 and c0 <= c < c1 and ex.x[r, c] == ex.y[i, j]
            else:
                assert ex.sums[i, j] == cells.sum()
                if padding == "same":  # Keras divides by the real cells only
                    assert ex.counts[i, j] == cells.size
    if op == "avg" and padding != "same":  # the counts are PyTorch's, padding included
        ones = torch.ones(1, 1, h, w, dtype=torch.float64)
        t = F.avg_pool2d(ones, kernel, stride, padding, ceil, divisor_override=None)
        sums = F.avg_pool2d(ones, kernel, stride, padding, ceil, divisor_override=1)
        np.testing.assert_allclose(ex.counts, (sums / t)[0, 0].numpy())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        # (what is wrong, exception, its message names the argument and the value)
        (dict(op="min"), ValueError, "op must be 'max' or 'avg', got 'min'"),
        (dict(op="max", size=0), ValueError, r"size must be an int in \[1, 16\], got 0"),
        (dict(op="max", size=17), ValueError, r"size must be an int in \[1, 16\], got 17"),
        (dict(op="max", size=True), ValueError, r"size must be an int in \[1, 16\], got True"),
        (dict(op="max", seed=-1), ValueError, "seed must be an int >= 0, got -1"),
        (dict(op="max", kernel_size=2, padding=2), ValueError, "padding must be at most half"),
        (dict(op="avg", size=2, kernel_size=3), ValueError, "output would be empty"),
        (dict(op="max", padding="full"), ValueError, "padding must be an int, a pair"),
    ],
)
def test_pool_example_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        E.pool_example(**kwargs)


@pytest.mark.parametrize(
    "topic, options, width",
    [
        # (what it checks, ...): every label drawn is the text's, the PNG has the stated size
        ("maxpool", E.Options(), 800),  # the defaults
        ("maxpool", E.Options(size=7, kernel=3, stride=2, padding="same"), 640),
        ("avgpool", E.Options(size=5, kernel=3, stride=2, padding=1), 1000),
        ("avgpool", E.Options(size=5, ceil_mode=True), 333),  # odd width: height rounds
    ],
)
def test_pool_png_has_the_stated_size_and_the_texts_numbers(tmp_path, topic, options, width):
    res = E.explain(topic, options, out=tmp_path / "p.png", width=width, command="cmd")
    assert res.drawn is not None
    size = (width, round(width * E.ASPECT[topic]))
    with Image.open(res.drawn.path) as im:
        im.load()
        assert im.size == size == res.drawn.size
    blocks = grids(res.text)
    assert res.drawn.labels["input"] == blocks[0]
    assert res.drawn.labels["output"] == blocks[1]
    if topic == "avgpool":
        assert res.drawn.labels["fractions"] == blocks[2]
    meta = E.figure_metadata(res.drawn.path)
    assert meta == {"topic": topic, "command": "cmd", "labels": res.drawn.labels}


# ----------------------------------------------------------------------------- head

HEAD_CASES = [
    # (what it checks, model, input size, classes, widths)
    ("the demo's backbone (README: 1,611,274 vs 650)", "convnet", 28, 10, (16, 32, 64)),
    ("twice the input side: 4x the fc head, the same gap head", "convnet", 56, 10, (16, 32, 64)),
    ("another class count and the default widths", "convnet-tiny", 28, 7, None),
]


@pytest.mark.parametrize("what, model, size, k, widths", HEAD_CASES)
def test_head_counts_are_the_models(what, model, size, k, widths):
    ex = E.head_example(model, size, k, widths)
    overrides = {"input_size": size, **({"widths": widths} if widths else {})}
    for kind in E.HEAD_KINDS:
        assert ex.counts[kind] == models.create(model, k, head=kind, **overrides).param_counts()
    c, h, w = ex.feature
    hidden = ex.hidden
    assert ex.counts["fc"]["head"] == c * h * w * hidden + hidden + hidden * k + k
    assert ex.counts["gap"]["head"] == ex.counts["gap-fc"]["head"] == c * k + k
    table = {line.split()[0]: line.split()[1] for line in ex.text().splitlines()[3:6]}
    assert table == {kind: f"{ex.counts[kind]['head']:,}" for kind in E.HEAD_KINDS}


def test_head_png_labels_are_the_texts_counts(tmp_path):
    res = E.explain("head", E.Options(widths=(16, 32, 64)), out=tmp_path / "h.png")
    assert res.drawn.labels == {"backbone": "72,016", "fc": "1,611,274", "gap-fc": "650",
                                "gap": "650"}  # fmt: skip
    assert "backbone: 72,016 parameters" in res.text
    assert "the fc head has 2,479x the parameters of the gap head" in res.text
    with Image.open(res.drawn.path) as im:
        assert im.size == (800, 400)


# ----------------------------------------------------------------------------- gap, cam


def test_gap_means_are_the_specs_average_of_the_models_feature_map(tiny_run, tmp_path):
    res = E.explain("gap", E.Options(checkpoint=str(tiny_run), index=3, channels=4),
                    out=tmp_path / "g.png", width=600)  # fmt: skip
    model, ckpt = checkpoint.load_model(tiny_run)
    image = E.held_out_image(ckpt, 3).image
    with torch.no_grad():
        fmap = model.eval().forward_features(image[None])[0].double().numpy()  # (C, h, w)
    means = reference.global_avg_pool2d(fmap, layout="CHW")  # (C,)
    np.testing.assert_allclose(means, fmap.mean(axis=(1, 2)), rtol=1e-12)
    assert res.text.splitlines()[0] == f"model: {tiny_run}"
    assert "(H, W, C) = (7, 7, 32) -> global average pooling -> (32,)" in res.text
    vector = [v for row in grids(res.text)[-1] for v in row]
    assert vector == [f"{v:.2f}" for v in means]
    for k, block in enumerate(grids(res.text)[:4]):  # the printed maps are the channels
        np.testing.assert_allclose(floats(block), fmap[k], atol=0.005)
    assert res.drawn.labels["means"] == vector[:4]
    np.testing.assert_allclose(res.drawn.labels["bars"], means, rtol=1e-6)
    with Image.open(res.drawn.path) as im:
        assert im.size == (600, 270)


@pytest.mark.parametrize(
    "canvas, index",
    [
        (None, 0),  # the digit as it is: a 7x7 map, numbers written on the picture
        (56, 5),  # on a canvas: a 14x14 map, too many cells to write on
    ],
)
def test_cam_text_and_picture_are_the_maps_and_boxes(tiny_run, tmp_path, canvas, index):
    options = E.Options(checkpoint=str(tiny_run), index=index, canvas=canvas, seed=2)
    res = E.explain("cam", options, out=tmp_path / "c.png")
    model, ckpt = checkpoint.load_model(tiny_run)
    digit = E.held_out_image(ckpt, index).image
    side = 28 if canvas is None else canvas
    placed, true_box = data.place_on_canvas(digit[None], side, torch.Generator().manual_seed(2))
    maps = cam.class_activation_maps(model, placed)
    box = cam.cam_boxes(maps.maps, 0.2)[0].tolist()
    raw = cam.class_activation_maps(model, placed, upsample=False, normalize=False)
    assert f"{tuple(box)}" in res.text and f"{tuple(true_box[0].tolist())}" in res.text
    assert res.drawn.labels["box"] == box and res.drawn.labels["true_box"] == true_box[0].tolist()
    shown = floats(grids(res.text)[0])
    np.testing.assert_allclose(shown, raw.maps[0].numpy(), atol=0.05)  # 1 decimal printed
    logit = float(raw.logits[0, raw.classes[0]])
    assert (
        f"map mean {float(raw.maps[0].double().mean()):.3f} = logit {logit:.3f}" in res.text
    )  # gap
    written = res.drawn.labels["map"]
    assert written == (grids(res.text)[0] if canvas is None else None)
    with Image.open(res.drawn.path) as im:
        assert im.size == (800, 300)


def test_the_default_model_is_the_demos_gap_run_when_there(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / E.DEMO_GAP).mkdir(parents=True)
    (tmp_path / E.DEMO_GAP / checkpoint.CHECKPOINT).write_bytes(
        (tiny_run / checkpoint.CHECKPOINT).read_bytes()
    )
    _, _, note = E.example_model(None)
    assert note == f"model: {E.DEMO_GAP} (gapnet demo's gap head)"


# ----------------------------------------------------------------------------- the command


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "topic, flags",
    [
        # (topic, its flags): each writes a PNG of the size it states
        ("maxpool", ["--kernel", "3", "--stride", "2", "--padding", "same", "--size", "7"]),
        ("avgpool", ["--padding", "1", "--kernel", "3", "--ceil-mode", "--seed", "5"]),
        ("head", ["--widths", "16,32,64", "--input-size", "40", "--num-classes", "5"]),
        ("gap", ["--index", "2", "--channels", "3"]),
        ("cam", ["--canvas", "40", "--threshold", "0.3"]),
    ],
)
def test_explain_command_writes_the_png_it_states(capsys, tiny_run, tmp_path, topic, flags):
    if topic in ("gap", "cam"):
        flags = [*flags, "--checkpoint", tiny_run]
    out_png = tmp_path / f"{topic}.png"
    code, out, err = run(capsys, "explain", topic, *flags, "--out", out_png, "--width", 700)
    assert code == 0, err
    stated = re.search(r"wrote (.+) \((\d+)x(\d+) px\)$", out.strip())
    assert stated is not None and stated.group(1) == str(out_png)
    with Image.open(out_png) as im:
        assert im.size == (int(stated.group(2)), int(stated.group(3))) == E.figure_size(topic, 700)
    meta = E.figure_metadata(out_png)
    assert meta["command"].startswith(f"gapnet explain {topic} ")


@pytest.mark.parametrize(
    "argv, message",
    [
        # (a user mistake, the one line that names it); exit status 2
        (["maxpool", "--padding", "full"], "expected an integer >= 0, 'same' or 'valid'"),
        (["maxpool", "--size", "40"], "size must be an int in [1, 16], got 40"),
        (["maxpool", "--kernel", "2", "--padding", "2"], "padding must be at most half"),
        (["head", "--model", "resnet"], "unknown model 'resnet'"),
        (["gap", "--checkpoint", "no/such/run"], "checkpoint 'no/such/run/checkpoint"),
        (["spline"], "invalid choice: 'spline'"),
        (["maxpool", "--width", "50"], "width must be an int in [200, 4000], got 50"),
    ],
)
def test_explain_command_errors_name_the_mistake(capsys, tmp_path, argv, message):
    code, _, err = run(capsys, "explain", *argv, "--out", tmp_path / "x.png")
    assert code == 2 and message in err
    assert not (tmp_path / "x.png").exists()


def test_explain_without_matplotlib_says_which_extra(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now fails
    code, _, err = run(capsys, "explain", "head", "--out", tmp_path / "x.png")
    assert code == 1 and "pip install 'gapnet[explain]'" in err


def test_import_gapnet_and_the_cli_do_not_import_matplotlib():
    code = ("import sys, gapnet, gapnet.explain, gapnet.cli; gapnet.cli.build_parser(); "
            "print('matplotlib' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize(
    "topic, width, expected",
    [
        # (topic, width, (width, height)): height = round(width * ASPECT[topic])
        ("maxpool", 800, (800, 400)),
        ("gap", 801, (801, 360)),
        ("cam", 1000, (1000, 375)),
        ("head", 200, (200, 100)),  # the smallest width
    ],
)
def test_figure_size(topic, width, expected):
    assert E.figure_size(topic, width) == expected


def test_figure_metadata_refuses_a_png_it_did_not_draw(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="not a PNG drawn by gapnet explain"):
        E.figure_metadata(tmp_path / "plain.png")


def test_explain_help_describes_it_with_an_example(capsys):
    assert main(["explain", "--help"]) == 0
    out = capsys.readouterr().out
    assert "example:\n  gapnet explain maxpool" in out
    assert all(topic in out for topic in E.TOPICS)
    assert main(["--help"]) == 0
    assert "explain" in capsys.readouterr().out  # listed with the other commands
