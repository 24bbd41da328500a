"""Figures of pooling and global average pooling, drawn from real numbers (``gapnet explain``).

Each topic is an *example*: an object that gapnet itself computes, with a ``.text()`` version
for the terminal. `draw` turns the same object into a PNG and returns every label it wrote, so
the picture, the text and the tests read one set of numbers:

- ``maxpool`` / ``avgpool``: `pool_example`, a small seeded grid of integers pooled by the
  specification (`gapnet.reference.max_pool2d` / `avg_pool2d`): the windows outlined on the
  input, each output cell holding its window's maximum or mean.
- ``gap``: `gap_example`, a trained model's feature map (H, W, C) and the (C,) vector of its
  channel means (`gapnet.reference.global_avg_pool2d`).
- ``head``: `head_example`, the parameter counts of an fc, a gap-fc and a gap head on one
  backbone (`GapNet.param_counts`), drawn as squares whose areas are the counts.
- ``cam``: `cam_example`, a digit, the class map of the predicted class and the box it gives
  (`gapnet.cam.class_activation_maps`, `gapnet.cam.cam_boxes`).

`explain(topic, Options(...), out=...)` does all three steps, as the command does. Every PNG
is ``width`` x ``round(width * ASPECT[topic])`` pixels (`figure_size`) and carries, in a PNG
text chunk named `METADATA_KEY`, the command that drew it and the labels it shows.
matplotlib is imported only when drawing (the ``explain`` extra).

Example:
    >>> ex = pool_example("max", size=4, seed=0)
    >>> ex.x
    array([[8., 6., 5., 2.],
           [3., 0., 0., 0.],
           [1., 8., 6., 9.],
           [5., 6., 9., 7.]])
    >>> ex.y
    array([[8., 5.],
           [8., 9.]])
    >>> figure_size("maxpool", 800)
    (800, 400)
"""

from __future__ import annotations

import io
import json
import math
import os
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from gapnet import _shapes, cam, data, models, reference
from gapnet.checkpoint import CHECKPOINT, Checkpoint, atomic_write, load_model
from gapnet.models import GapNet
from gapnet.report import text_table
from gapnet.train import TrainConfig, train

TOPICS = ("maxpool", "avgpool", "gap", "head", "cam")
POOL_OPS = {"maxpool": "max", "avgpool": "avg"}  # topic -> the reference op it draws
# Height / width of each topic's PNG: it is width x round(width * ASPECT[topic]) pixels.
ASPECT = {"maxpool": 0.5, "avgpool": 0.5, "gap": 0.45, "head": 0.5, "cam": 0.375}
WIDTH = 800  # default PNG width in pixels
DPI = 100  # default dots per inch: with the width, it sets how large the lettering is
WIDTH_RANGE = (200, 4000)  # the widths `figure_size` accepts
MAX_GRID = 16  # the largest pool input side: beyond it the numbers are too small to read
OUTSIDE = "."  # the label of a drawn cell outside the input (padding, or past it in ceil_mode)
COUNT_INCLUDE_PAD = True  # PyTorch's default: integer padding counts in an average's divisor
HEAD_KINDS = ("fc", "gap-fc", "gap")  # the heads `head_example` compares
DEMO_GAP = Path("runs/demo/gap")  # the default model of gap and cam (``gapnet demo`` writes it)
TINY_RUN = Path("runs/explain/tiny-gap")  # ... else one trained here first, then reused
# The TrainConfig fields of that model: 89 % test accuracy after 42 s (2 busy CPU cores).
TINY_TRAIN: dict[str, Any] = dict(
    data="mnist-5k", model="convnet-tiny", head="gap", epochs=2, batch_size=32, lr=5e-3
)
METADATA_KEY = "gapnet.explain"  # the PNG text chunk: {"topic", "command", "labels"} as JSON
WRITE_MAP_MAX = 10  # cam: the class map's numbers are written when it is at most this wide

# Window colors (matplotlib's tab10), cycled: the outline of a window on the input, the fill of
# its output cell and, for max pooling, the cell its maximum came from.
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
          "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip


def _num(v: float) -> str:
    """A value as drawn and printed: integers plainly, others to at most 2 decimals."""
    text = f"{float(v):.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    bad = isinstance(value, bool) or not isinstance(value, int) or value < low
    if bad or (high is not None and value > high):
        what = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {what}, got {value!r}")
    return value


def _grid_lines(labels: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """Rows of labels, right-aligned in columns of one width."""
    width = max((len(s) for row in labels for s in row), default=1)
    return [indent + " ".join(s.rjust(width) for s in row) for row in labels]


def _pair(t: tuple[int, int]) -> str:
    return str(t[0]) if t[0] == t[1] else f"{t[0]}x{t[1]}"


# ----------------------------------------------------------------------------- pooling


@dataclass(frozen=True)
class PoolExample:
    """A small grid pooled by the specification: what ``gapnet explain maxpool|avgpool`` shows.

    Made by `pool_example`; `y`, `argmax`, `sums` and `counts` are `gapnet.reference`'s and
    `gapnet._shapes`' (the rules every backend shares), never recomputed here.
    """

    op: str  # "max" or "avg"
    x: np.ndarray  # (H, W) float64 input: random integers 0-9
    y: np.ndarray  # (H_out, W_out) the pooled output
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: int | str  # as given: an int, "valid" or "same"
    ceil_mode: bool
    seed: int
    rows: tuple[tuple[int, int], ...]  # input rows [start, stop) of each output row's windows
    cols: tuple[tuple[int, int], ...]  # input columns [start, stop) of each output column's
    argmax: np.ndarray | None  # max: (H_out, W_out) flat index h*W + w of each window's maximum
    sums: np.ndarray | None  # avg: (H_out, W_out) sum of each window's cells inside the input
    counts: np.ndarray | None  # avg: (H_out, W_out) each window's divisor

    @property
    def topic(self) -> str:
        return f"{self.op}pool"

    def span(self) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of the drawn area: the input and every window."""
        h, w = self.x.shape
        return (
            min(0, self.rows[0][0]), min(0, self.cols[0][0]),
            max(h, self.rows[-1][1]), max(w, self.cols[-1][1]),
        )  # fmt: skip

    def input_labels(self) -> list[list[str]]:
        """Each drawn input cell's label: its value, or `OUTSIDE` for padding."""
        top, left, bottom, right = self.span()
        h, w = self.x.shape
        return [
            [_num(self.x[r, c]) if 0 <= r < h and 0 <= c < w else OUTSIDE
             for c in range(left, right)]
            for r in range(top, bottom)
        ]  # fmt: skip

    def output_labels(self) -> list[list[str]]:
        return [[_num(v) for v in row] for row in self.y]

    def fraction_labels(self) -> list[list[str]] | None:
        """avg: each output as "sum/count"; max: None."""
        if self.sums is None or self.counts is None:
            return None
        return [
            [f"{_num(s)}/{int(n)}" for s, n in zip(srow, nrow, strict=True)]
            for srow, nrow in zip(self.sums, self.counts, strict=True)
        ]

    def header(self) -> str:
        extra = ", ceil_mode" if self.ceil_mode else ""
        name = "max" if self.op == "max" else "average"
        return (
            f"{name} pooling: kernel {_pair(self.kernel)}, stride {_pair(self.stride)}, "
            f"padding {self.padding!r}{extra}"
        )

    def text(self) -> str:
        """The terminal version: the input, the output and where each window lies."""
        h, w = self.x.shape
        oh, ow = self.y.shape
        what = "maximum" if self.op == "max" else "mean"
        lines = [
            self.header(),
            f"input {h}x{w} (random integers 0-9, seed {self.seed}):",
            *_grid_lines(self.input_labels()),
            f"output {oh}x{ow}: the {what} of each window",
            *_grid_lines(self.output_labels()),
        ]
        fractions = self.fraction_labels()
        if fractions is not None:
            lines += ["= sum / count of each window:", *_grid_lines(fractions)]
        if any(OUTSIDE in row for row in self.input_labels()):
            lines.append(f"'{OUTSIDE}' = outside the input: " + _outside_rule(self))
        ranges = [" | ".join(f"{a}..{b - 1}" for a, b in axis) for axis in (self.rows, self.cols)]
        lines.append(f"windows: output rows read input rows {ranges[0]}")
        lines.append(f"         output columns read input columns {ranges[1]}")
        return "\n".join(lines)


def _outside_rule(ex: PoolExample) -> str:
    if ex.op == "max":
        return "never the maximum"
    if ex.padding == "same":
        return "not counted (Keras's 'same')"
    padded = ex.rows[0][0] < 0 or ex.cols[0][0] < 0
    rules = ["padding adds 0 to the sum and counts in the divisor (count_include_pad)"] * padded
    if ex.ceil_mode:
        rules.append("a ceil_mode window's cells past the padding are not counted")
    return "; ".join(rules)


def _windows(win: _shapes.Window2d, axis: int) -> tuple[tuple[int, int], ...]:
    """[start, stop) along one axis of each output's window (dilation 1)."""
    k, s, before = win.kernel[axis], win.stride[axis], win.pad_before[axis]
    return tuple((i * s - before, i * s - before + k) for i in range(win.out_size[axis]))


def pool_example(
    op: str,
    size: int = 6,
    kernel_size: int | tuple[int, int] = 2,
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] | str = 0,
    ceil_mode: bool = False,
    seed: int = 0,
) -> PoolExample:
    """A seeded `size` x `size` grid of integers 0-9, max- or average-pooled by the spec.

    Args:
        op: "max" (`gapnet.reference.max_pool2d`) or "avg" (`avg_pool2d`, PyTorch's
            count_include_pad=True).
        size: the grid's side, 1 to `MAX_GRID`.
        kernel_size, stride, padding, ceil_mode: as `gapnet.reference.max_pool2d`; padding may
            be "same" (Keras: output ceil(size / stride)) or "valid".
        seed: the grid's numbers (NumPy's default_rng).

    Shape:
        x (size, size) -> y (H_out, W_out).

    Example:
        >>> ex = pool_example("avg", size=3, kernel_size=2, stride=1, seed=1)
        >>> ex.x.tolist()
        [[4.0, 5.0, 7.0], [9.0, 0.0, 1.0], [8.0, 9.0, 2.0]]
        >>> ex.y.tolist(), ex.sums.tolist(), ex.counts.tolist()
        ([[4.5, 3.25], [6.5, 3.0]], [[18.0, 13.0], [26.0, 12.0]], [[4, 4], [4, 4]])
    """
    if op not in ("max", "avg"):
        raise ValueError(f"op must be 'max' or 'avg', got {op!r}")
    _check_int(size, "size", 1, MAX_GRID)
    _check_int(seed, "seed", 0)
    x = np.random.default_rng(seed).integers(0, 10, (size, size)).astype(np.float64)
    win = _shapes.window2d(f"{op}_pool2d", x.shape, kernel_size, stride, padding, 1, ceil_mode)
    common = dict(op=op, x=x, kernel=win.kernel, stride=win.stride, padding=padding,
                  ceil_mode=bool(ceil_mode), seed=seed, rows=_windows(win, 0),
                  cols=_windows(win, 1))  # fmt: skip
    if op == "max":
        y, argmax = reference.max_pool2d(
            x[None], kernel_size, stride, padding, 1, ceil_mode, layout="CHW", return_indices=True
        )
        return PoolExample(y=y[0], argmax=argmax[0], sums=None, counts=None, **common)  # type: ignore[arg-type]
    args = (kernel_size, stride, padding, ceil_mode, COUNT_INCLUDE_PAD)
    y = reference.avg_pool2d(x[None], *args, layout="CHW")
    sums = reference.avg_pool2d(x[None], *args, divisor_override=1, layout="CHW")
    counts = np.outer(win.divisors(COUNT_INCLUDE_PAD, 0), win.divisors(COUNT_INCLUDE_PAD, 1))
    return PoolExample(y=y[0], argmax=None, sums=sums[0], counts=counts, **common)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- models and digits


def example_model(
    checkpoint: str | os.PathLike[str] | None = None,
) -> tuple[GapNet, Checkpoint, str]:
    """The trained model that ``explain gap`` and ``explain cam`` draw from, and where it came from.

    Args:
        checkpoint: a checkpoint or run folder. None: `DEMO_GAP` (runs/demo/gap, which
            ``gapnet demo`` writes) when it exists, else `TINY_RUN`: convnet-tiny with a gap head,
            trained there (`TINY_TRAIN`) on first use and reused after.

    Returns:
        the model (eval mode, CPU), its checkpoint, and a line saying which model it is (and
        that it was trained just now, when it was).
    """
    if checkpoint is not None:
        model, ckpt = load_model(checkpoint)
        return model, ckpt, f"model: {checkpoint}"
    if (DEMO_GAP / CHECKPOINT).is_file():
        model, ckpt = load_model(DEMO_GAP)
        return model, ckpt, f"model: {DEMO_GAP} (gapnet demo's gap head)"
    if (TINY_RUN / CHECKPOINT).is_file():
        model, ckpt = load_model(TINY_RUN)
        return model, ckpt, f"model: {TINY_RUN} (no {DEMO_GAP}: the tiny model trained earlier)"
    start = time.perf_counter()
    cfg = TrainConfig(**TINY_TRAIN, out_dir=str(TINY_RUN))
    result = train(cfg, progress=False)
    model, ckpt = load_model(TINY_RUN)
    note = (
        f"model: no --checkpoint and no {DEMO_GAP} (run gapnet demo), so trained {cfg.model} + "
        f"{cfg.head} on {cfg.data} for {cfg.epochs} epochs into {TINY_RUN} "
        f"({time.perf_counter() - start:.0f} s, test accuracy {100 * result.test_acc:.1f}%)"
    )
    return model, ckpt, note


class HeldOutImage(NamedTuple):
    """One image of a checkpoint's test split (see `held_out_image`)."""

    image: Tensor  # (C, H, W) in [0, 1]
    label: int
    classes: list[str]  # class names; label i is classes[i]
    description: str  # e.g. "test image #0 of mnist-5k (a 7)"


def held_out_image(ckpt: Checkpoint, index: int = 0) -> HeldOutImage:
    """Test image `index` of the dataset the checkpoint was trained on, as it was trained.

    Example:
        >>> from gapnet.checkpoint import Checkpoint
        >>> from gapnet.models import ModelConfig
        >>> ckpt = Checkpoint(Path("-"), ModelConfig(), {"data": "digits"}, {}, list("0123456789"),
        ...                   {})
        >>> held_out_image(ckpt, 2).description
        'test image #2 of digits (a 0)'
    """
    cfg = ckpt.train_config
    spec = cfg.get("data", "mnist-5k")
    ds = data.load(spec, seed=cfg.get("split_seed", 0), size=cfg.get("image_size"))
    _check_int(index, "index", 0, len(ds.test) - 1)
    label = int(ds.test.labels[index])
    classes = ckpt.class_names()
    name = classes[label]
    return HeldOutImage(ds.test.images[index], label, classes,
                     f"test image #{index} of {spec} (a {name})")  # fmt: skip


# ----------------------------------------------------------------------------- gap


@dataclass(frozen=True)
class GapExample:
    """A feature map (H, W, C) and its (C,) channel means: what ``gapnet explain gap`` shows."""

    description: str  # which image, of which data
    image: np.ndarray  # (H, W): the input's first channel
    features: np.ndarray  # (h, w, C) the backbone's output (HWC, as the story is told)
    means: np.ndarray  # (C,) = reference.global_avg_pool2d(features, layout="HWC")
    channels: int  # the first `channels` maps are drawn and printed

    topic = "gap"

    def mean_labels(self) -> list[str]:
        return [f"{v:.2f}" for v in self.means]

    def text(self) -> str:
        h, w, c = self.features.shape
        lines = [
            self.description,
            f"feature map (H, W, C) = ({h}, {w}, {c}) -> global average pooling -> ({c},): "
            f"each number is one channel's mean over its {h}x{w} positions",
        ]
        for k in range(self.channels):
            lines.append(f"channel {k}, mean {self.mean_labels()[k]}:")
            lines += _grid_lines([[f"{v:.2f}" for v in row] for row in self.features[:, :, k]])
        lines.append(f"the ({c},) vector:")
        labels = self.mean_labels()
        lines += _grid_lines([labels[i : i + 8] for i in range(0, c, 8)])
        return "\n".join(lines)


def gap_example(
    model: GapNet, image: Tensor, *, description: str = "", channels: int = 6
) -> GapExample:
    """The backbone's feature map of one image and its global average pool, by the spec.

    Args:
        model: a `GapNet` (any head: only the backbone runs).
        image: (C, H, W) input the model takes.
        description: what the image is, for the text's first line.
        channels: how many channel maps (the first ones) to draw and print, 1 to C.

    Shape:
        image (C_in, H, W) -> features (h, w, C), means (C,).

    Example:
        >>> torch.manual_seed(0) and None
        >>> ex = gap_example(models.create("convnet-tiny"), torch.rand(1, 28, 28), channels=2)
        >>> ex.features.shape, ex.means.shape
        ((7, 7, 32), (32,))
        >>> bool(np.allclose(ex.means, ex.features.mean(axis=(0, 1))))
        True
    """
    with models.eval_mode(model):
        fmap = model.forward_features(image[None].float())[0]  # (C, h, w)
    features = fmap.permute(1, 2, 0).double().numpy()  # (h, w, C)
    _check_int(channels, "channels", 1, features.shape[2])
    means = reference.global_avg_pool2d(features, layout="HWC")  # (C,)
    return GapExample(description, image[0].numpy(), features, means, channels)


# ----------------------------------------------------------------------------- head


@dataclass(frozen=True)
class HeadExample:
    """Parameter counts of the heads in `HEAD_KINDS` on one backbone (``gapnet explain head``)."""

    model: str
    widths: tuple[int, ...]
    input_size: int
    num_classes: int
    hidden: int  # the fc head's hidden units (ModelConfig.fc_hidden)
    feature: tuple[int, int, int]  # (C, h, w) of the feature map at input_size
    counts: dict[str, dict[str, int]]  # head -> GapNet.param_counts(): backbone, head, total

    topic = "head"

    def how(self, kind: str) -> str:
        """What the head computes, with its layer sizes."""
        c, h, w = self.feature
        k = self.num_classes
        if kind == "fc":
            flat = f"flatten {c}*{h}*{w} = {c * h * w:,}"
            if not self.hidden:
                return f"{flat} -> Linear({c * h * w}, {k})"
            hidden = f"Linear({c * h * w}, {self.hidden}) -> ReLU -> Linear({self.hidden}, {k})"
            return f"{flat} -> {hidden}"
        if kind == "gap-fc":
            return f"GAP -> ({c},) -> Linear({c}, {k})"
        return f"1x1 conv ({c} -> {k} maps) -> GAP -> ({k},)"

    def count_labels(self) -> dict[str, str]:
        labels = {"backbone": f"{self.counts['gap']['backbone']:,}"}
        labels.update({kind: f"{self.counts[kind]['head']:,}" for kind in HEAD_KINDS})
        return labels

    def text(self) -> str:
        c, h, w = self.feature
        widths = "-".join(map(str, self.widths))
        labels = self.count_labels()
        rows = [[kind, labels[kind], f"{self.counts[kind]['total']:,}", self.how(kind)]
                for kind in HEAD_KINDS]  # fmt: skip
        ratio = self.counts["fc"]["head"] / max(self.counts["gap"]["head"], 1)
        return "\n".join([
            f"{self.model} (widths {widths}) at {self.input_size}x{self.input_size}, "
            f"{self.num_classes} classes: the feature map is (C, h, w) = ({c}, {h}, {w})",
            text_table(["head", "head params", "network", "what it computes"], rows),
            f"backbone: {labels['backbone']} parameters, the same under every head",
            f"the fc head has {ratio:,.0f}x the parameters of the gap head",
        ])  # fmt: skip


def head_example(
    model: str = "convnet",
    input_size: int = 28,
    num_classes: int = 10,
    widths: Sequence[int] | None = None,
) -> HeadExample:
    """Build `model` with each head in `HEAD_KINDS` and count their parameters.

    Args:
        model: a `gapnet.models.list_models()` name.
        input_size: the input side the fc head is sized for (global-pooling heads take any).
        num_classes: classes K.
        widths: convnet channels per stage; None keeps the model's.

    Example:
        >>> ex = head_example("convnet", widths=(16, 32, 64))
        >>> ex.feature, ex.counts["fc"]["head"], ex.counts["gap"]["head"]
        ((64, 7, 7), 1611274, 650)
    """
    overrides: dict[str, Any] = {"input_size": input_size}
    if widths is not None:
        overrides["widths"] = tuple(widths)
    built = {kind: models.create(model, num_classes, head=kind, **overrides) for kind in HEAD_KINDS}
    fc = built["fc"]
    side = fc.backbone.feature_size(input_size)
    return HeadExample(
        model, tuple(fc.config.widths), input_size, num_classes, fc.config.fc_hidden,
        (fc.num_features, side, side), {k: m.param_counts() for k, m in built.items()},
    )  # fmt: skip


# ----------------------------------------------------------------------------- cam


@dataclass(frozen=True)
class CamExample:
    """A digit, its predicted class's map and the CAM box: what ``gapnet explain cam`` shows."""

    description: str
    head: str  # the model's head kind
    image: np.ndarray  # (S, S) the input's first channel (the digit on its canvas)
    predicted: str  # class name
    prob: float  # softmax probability of the predicted class
    logit: float  # its logit
    raw: np.ndarray  # (h, w) the head's score at each position (class map, no resizing)
    heat: np.ndarray  # (S, S) the map resized to the input and scaled to [0, 1]
    box: tuple[int, int, int, int]  # CAM box (x0, y0, x1, y1), ends exclusive
    true_box: tuple[int, int, int, int]  # the digit's tight box
    iou: float
    threshold: float  # the box rule: pixels >= threshold * max, largest region

    topic = "cam"

    def map_labels(self) -> list[list[str]]:
        return [[f"{v:.1f}" for v in row] for row in self.raw]

    def identity(self) -> str:
        """The map's mean against the logit: equal for a gap head (GAP of the map IS the logit)."""
        mean = float(self.raw.mean())
        if self.head == "gap":
            return f"mean {mean:.3f} = logit {self.logit:.3f}"
        return f"mean {mean:.3f}, logit {self.logit:.3f} ({self.head}: not the mean)"

    def text(self) -> str:
        h, w = self.raw.shape
        return "\n".join([
            self.description,
            f"predicted {self.predicted} ({100 * self.prob:.1f}%); its class map ({h}x{w}, the "
            f"head's score at each position); map {self.identity()}:",
            *_grid_lines(self.map_labels()),
            f"CAM box (map >= {self.threshold:g} x its maximum, largest region): {self.box}",
            f"true box of the digit: {self.true_box}; IoU {self.iou:.2f}",
        ])  # fmt: skip


def cam_example(
    model: GapNet,
    image: Tensor,
    *,
    classes: Sequence[str],
    description: str = "",
    canvas: int | None = None,
    seed: int = 0,
    threshold: float = 0.2,
) -> CamExample:
    """One image's class activation map for its predicted class, and the box it gives.

    Args:
        model: a `GapNet` with a global-pooling head.
        image: (C, H, W), background 0 (a digit).
        classes: class names of the model's outputs.
        description: what the image is, for the text's first line.
        canvas: place the image at a random spot (`seed`) on a blank canvas x canvas; None
            keeps it as it is.
        seed: where it lands.
        threshold: `gapnet.cam.cam_boxes`' threshold (largest region).

    Example:
        >>> torch.manual_seed(0) and None
        >>> ex = cam_example(models.create("convnet-tiny"), torch.rand(1, 28, 28),
        ...                  classes=list("0123456789"), canvas=40)
        >>> ex.image.shape, ex.raw.shape, ex.heat.shape
        ((40, 40), (10, 10), (40, 40))
    """
    side = max(image.shape[-2:]) if canvas is None else _check_int(canvas, "canvas", 1)
    placed, true_box = data.place_on_canvas(
        image[None].float(), side, torch.Generator().manual_seed(seed)
    )
    res = cam.class_activation_maps(model, placed)  # maps (1, S, S) in [0, 1]
    c = int(res.classes[0])
    raw = cam.class_activation_maps(model, placed, c, upsample=False, normalize=False).maps[0]
    box = cam.cam_boxes(res.maps, threshold)  # (1, 4)
    return CamExample(
        description, model.config.head, placed[0, 0].numpy(), classes[c],
        float(res.logits[0].float().softmax(0)[c]), float(res.logits[0, c]),
        raw.double().numpy(), res.maps[0].double().numpy(),
        tuple(int(v) for v in box[0]), tuple(int(v) for v in true_box[0]),  # type: ignore[arg-type]
        float(cam.box_iou(box, true_box)[0]), float(threshold),
    )  # fmt: skip


# ----------------------------------------------------------------------------- drawing


class Drawn(NamedTuple):
    """What `draw` wrote."""

    path: Path
    size: tuple[int, int]  # (width, height) in pixels
    labels: dict[str, Any]  # every number and label the picture shows, as written on it


def figure_size(topic: str, width: int = WIDTH) -> tuple[int, int]:
    """(width, height) in pixels of a topic's PNG: height = round(width * ASPECT[topic]).

    Example:
        >>> figure_size("cam", 1000)
        (1000, 375)
    """
    if topic not in ASPECT:
        raise ValueError(f"topic must be one of {', '.join(TOPICS)}, got {topic!r}")
    _check_int(width, "width", *WIDTH_RANGE)
    return width, round(width * ASPECT[topic])


def _new_figure(size: tuple[int, int], dpi: int) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "gapnet explain draws with matplotlib, which is not installed: "
            "pip install 'gapnet[explain]'"
        ) from None
    return Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)


def draw(
    example: Any,
    path: str | os.PathLike[str],
    *,
    width: int = WIDTH,
    dpi: int = DPI,
    command: str | None = None,
) -> Drawn:
    """Draw an example as a PNG of ``figure_size(example.topic, width)`` pixels.

    Args:
        example: a `PoolExample`, `GapExample`, `HeadExample` or `CamExample`.
        path: the PNG to write (atomically; its folder is created).
        width: the PNG's width in pixels (`WIDTH_RANGE`); its height is ``round(width *
            ASPECT[topic])``.
        dpi: dots per inch: at a given width, more dpi means larger lettering.
        command: the command that drew it, kept in the PNG's metadata (`figure_metadata`).

    Returns:
        a `Drawn`: the path, the (width, height) in pixels and the labels written on it.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> out = draw(pool_example("max", size=4), Path(tempfile.mkdtemp()) / "max.png", width=400)
        >>> out.size, Image.open(out.path).size, out.labels["output"]
        ((400, 200), (400, 200), [['8', '5'], ['8', '9']])
    """
    size = figure_size(example.topic, width)
    _check_int(dpi, "dpi", 20, 600)
    fig = _new_figure(size, dpi)
    labels = _DRAWERS[example.topic](fig, example)
    meta = json.dumps({"topic": example.topic, "command": command, "labels": labels})
    png = io.BytesIO()
    # No "Software" entry: the file then depends only on what is drawn and how it renders.
    fig.savefig(png, format="png", dpi=dpi, metadata={"Software": None, METADATA_KEY: meta})
    atomic_write(path, png.getvalue())
    return Drawn(Path(path), size, labels)


def figure_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What `draw` stored in a PNG: ``{"topic", "command", "labels"}``.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "h.png"
        >>> out = draw(head_example("convnet-tiny"), path, command="x")
        >>> meta = figure_metadata(out.path)
        >>> meta["topic"], meta["command"], meta["labels"]["gap"]
        ('head', 'x', '330')
    """
    with Image.open(path) as im:
        text = getattr(im, "text", {}).get(METADATA_KEY)
    if text is None:
        raise ValueError(f"{str(path)!r} is not a PNG drawn by gapnet explain (no {METADATA_KEY})")
    meta: dict[str, Any] = json.loads(text)
    return meta


def _tint(color: str, amount: float = 0.35) -> tuple[float, float, float]:
    """A hex `color` mixed with white: `amount` of the color."""
    r, g, b = (int(color[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return 1 - amount * (1 - r), 1 - amount * (1 - g), 1 - amount * (1 - b)


def _cell_points(fig: Any, ax: Any, ncols: int, nrows: int) -> float:
    """The side in points of one cell of an ncols x nrows grid of square cells in `ax`."""
    box = ax.get_position()  # in figure fractions
    w_in, h_in = fig.get_size_inches()
    return 72 * min(box.width * w_in / ncols, box.height * h_in / nrows)


def _font(cell_pt: float, labels: Sequence[Sequence[str]], share: float = 0.45) -> float:
    """A font size (points) at which the longest label fits a cell (a glyph ~0.6 em wide)."""
    longest = max((len(s) for row in labels for s in row), default=1)
    return cell_pt * min(share, 1.25 / max(longest, 1))


def _draw_grid(
    ax: Any,
    labels: Sequence[Sequence[str]],
    top: int,
    left: int,
    fills: dict[tuple[int, int], Any],
    fontsize: float,
    below: Sequence[Sequence[str]] | None = None,
) -> None:
    """Cells at rows top.., columns left.., each with its label (and a smaller one `below`)."""
    from matplotlib.patches import Rectangle

    for i, row in enumerate(labels):
        for j, label in enumerate(row):
            r, c = top + i, left + j
            outside = label == OUTSIDE
            face = "#eeeeee" if outside else fills.get((r, c), "white")
            ax.add_patch(Rectangle((c, r), 1, 1, facecolor=face, edgecolor="#999999",
                                   linewidth=0.8, hatch="///" if outside else None))  # fmt: skip
            if outside:
                continue
            y = r + (0.4 if below else 0.5)
            ax.text(c + 0.5, y, label, ha="center", va="center", fontsize=fontsize)
            if below:
                ax.text(c + 0.5, r + 0.78, below[i][j], ha="center", va="center",
                        fontsize=0.55 * fontsize, color="#444444")  # fmt: skip
    ax.set_xlim(left, left + len(labels[0]))
    ax.set_ylim(top + len(labels), top)  # row 0 at the top, as printed
    ax.set_aspect("equal")
    ax.axis("off")


def _draw_pool(fig: Any, ex: PoolExample) -> dict[str, Any]:
    from matplotlib.patches import Rectangle

    top, left, bottom, right = ex.span()
    h, w = ex.x.shape
    oh, ow = ex.y.shape
    color = {(i, j): COLORS[(i * ow + j) % len(COLORS)] for i in range(oh) for j in range(ow)}
    picks: dict[tuple[int, int], Any] = {}
    if ex.argmax is not None:  # the input cell each maximum came from, in its window's color
        picks = {divmod(int(ex.argmax[i, j]), w): _tint(col, 0.5) for (i, j), col in color.items()}
    ax_in = fig.add_axes((0.02, 0.03, 0.52, 0.80))
    ax_out = fig.add_axes((0.60, 0.03, 0.38, 0.80))
    labels_in, labels_out = ex.input_labels(), ex.output_labels()
    cell_in = _cell_points(fig, ax_in, right - left, bottom - top)
    _draw_grid(ax_in, labels_in, top, left, picks, _font(cell_in, labels_in))
    for (i, j), col in color.items():
        (r0, r1), (c0, c1) = ex.rows[i], ex.cols[j]
        inset = 0.06 + 0.1 * ((i + j) % 2)  # overlapping windows alternate: both outlines show
        ax_in.add_patch(Rectangle((c0 + inset, r0 + inset), c1 - c0 - 2 * inset,
                                  r1 - r0 - 2 * inset, fill=False, edgecolor=col,
                                  linewidth=2.2))  # fmt: skip
    fractions = ex.fraction_labels()
    cell_out = _cell_points(fig, ax_out, ow, oh)
    fills = {ij: _tint(col) for ij, col in color.items()}
    _draw_grid(ax_out, labels_out, 0, 0, fills, _font(cell_out, labels_out), fractions)
    what = "maximum" if ex.op == "max" else "mean (sum/count)"
    fig.text(0.5, 0.965, ex.header(), ha="center", va="top", fontsize=12, weight="bold")
    fig.text(0.28, 0.89, f"input {h}x{w}: each outlined window gives one output cell",
             ha="center", va="top", fontsize=9)  # fmt: skip
    fig.text(0.79, 0.89, f"output {oh}x{ow}: the {what} of each window", ha="center",
             va="top", fontsize=9)  # fmt: skip
    labels: dict[str, Any] = {"input": labels_in, "output": labels_out}
    if fractions is not None:
        labels["fractions"] = fractions
    return labels


def _draw_gap(fig: Any, ex: GapExample) -> dict[str, Any]:
    h, w, c = ex.features.shape
    k = ex.channels
    means = ex.mean_labels()
    fig.text(0.5, 0.97, f"global average pooling: ({h}, {w}, {c}) -> ({c},), one mean per "
             "channel", ha="center", va="top", fontsize=12, weight="bold")  # fmt: skip
    fig.text(0.40, 0.87, f"the feature map: {c} channels of {h}x{w} (the first {k} shown)",
             ha="center", va="top", fontsize=9)  # fmt: skip
    ax = fig.add_axes((0.01, 0.12, 0.17, 0.66))
    ax.imshow(ex.image, cmap="gray", vmin=0, vmax=1)
    ax.set_title("input", fontsize=9)
    ax.axis("off")
    cols = math.ceil(k / 2) if k > 1 else 1
    rows = 2 if k > 1 else 1
    cw, ch = 0.38 / cols, 0.72 / rows  # one map's cell in figure fractions
    top = max(float(ex.features[:, :, :k].max()), 1e-12)
    for i in range(k):
        r, q = divmod(i, cols)
        axm = fig.add_axes((0.21 + q * cw, 0.80 - (r + 1) * ch, 0.9 * cw, 0.72 * ch))
        axm.imshow(ex.features[:, :, i], cmap="viridis", vmin=0, vmax=top)
        axm.set_title(f"channel {i}\nmean {means[i]}", fontsize=8, color=COLORS[i % len(COLORS)])
        axm.set_xticks([])
        axm.set_yticks([])
    axb = fig.add_axes((0.66, 0.16, 0.32, 0.62))
    bar_colors = [COLORS[i % len(COLORS)] if i < k else "#bbbbbb" for i in range(c)]
    axb.bar(range(c), ex.means, color=bar_colors, width=0.8)
    axb.set_title(f"the ({c},) vector (channels 0-{k - 1} in color)", fontsize=9)
    axb.set_xlabel("channel", fontsize=9)
    axb.tick_params(labelsize=7)
    return {"means": means[:k], "bars": [float(v) for v in ex.means]}


def _draw_head(fig: Any, ex: HeadExample) -> dict[str, Any]:
    from matplotlib.patches import Rectangle

    labels = ex.count_labels()
    counts = {"backbone": ex.counts["gap"]["backbone"]}
    counts.update({kind: ex.counts[kind]["head"] for kind in HEAD_KINDS})
    how = {"backbone": "convolutions (the same under every head)"}
    how.update({kind: ex.how(kind) for kind in HEAD_KINDS})
    biggest = max(counts.values())
    ax = fig.add_axes((0.01, 0.02, 0.98, 0.84))
    x = 0.0
    for (name, n), col in zip(counts.items(), ("#7f7f7f", "#d62728", "#ff7f0e", "#1f77b4"),
                              strict=True):  # fmt: skip
        side = math.sqrt(n / biggest)  # area = count; the largest square is 1 x 1
        slot = max(side, 0.8)  # room for the label under a small square
        ax.add_patch(Rectangle((x + (slot - side) / 2, 0), side, side, facecolor=_tint(col, 0.6),
                               edgecolor=col, linewidth=1.5))  # fmt: skip
        title = name if name == "backbone" else f"{name} head"
        ax.text(x + slot / 2, -0.04, f"{title}: {labels[name]}", ha="center", va="top",
                fontsize=11, weight="bold")  # fmt: skip
        ax.text(x + slot / 2, -0.15, textwrap.fill(how[name], 30), ha="center", va="top",
                fontsize=8, color="#444444")  # fmt: skip
        x += slot + 0.15
    ax.set_xlim(-0.05, x - 0.1)
    ax.set_ylim(-0.45, 1.03)
    ax.set_aspect("equal")
    ax.axis("off")
    c, h, w = ex.feature
    fig.text(0.5, 0.97, f"parameters of each head: {ex.model} ({'-'.join(map(str, ex.widths))})"
             f" at {ex.input_size}x{ex.input_size}, {ex.num_classes} classes", ha="center",
             va="top", fontsize=12, weight="bold")  # fmt: skip
    fig.text(0.5, 0.91, f"area = parameter count; the feature map is (C, h, w) = ({c}, {h}, {w})",
             ha="center", va="top", fontsize=9)  # fmt: skip
    return labels


def _box_patch(box: Sequence[int], color: str) -> Any:
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = box
    return Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=color,
                     linewidth=2)  # fmt: skip


def _draw_cam(fig: Any, ex: CamExample) -> dict[str, Any]:
    from matplotlib import patheffects

    s = ex.image.shape[0]
    h, w = ex.raw.shape
    axes = [fig.add_axes((0.02 + 0.33 * i, 0.03, 0.30, 0.74)) for i in range(3)]
    axes[0].imshow(ex.image, cmap="gray", vmin=0, vmax=1)
    axes[0].add_patch(_box_patch(ex.true_box, "lime"))
    axes[0].set_title(f"input {s}x{s}\nthe digit's box (green)", fontsize=9)
    axes[1].imshow(ex.raw, cmap="jet")
    written = h <= WRITE_MAP_MAX and w <= WRITE_MAP_MAX
    map_labels = ex.map_labels() if written else None
    outline = [patheffects.withStroke(linewidth=1.2, foreground="black")]  # legible on any color
    for r, row in enumerate(map_labels or []):
        for q, label in enumerate(row):
            axes[1].text(q, r, label, ha="center", va="center", fontsize=7, color="white",
                         path_effects=outline)  # fmt: skip
    axes[1].set_title(f"class map of {ex.predicted} ({h}x{w})\n{ex.identity()}", fontsize=9)
    heat = np.asarray(cam.overlay(ex.image[None], ex.heat, alpha=0.5))
    axes[2].imshow(heat)
    axes[2].add_patch(_box_patch(ex.true_box, "lime"))
    axes[2].add_patch(_box_patch(ex.box, "red"))
    axes[2].set_title(f"CAM box (red)\nIoU {ex.iou:.2f} with the digit's box", fontsize=9)
    for ax in axes:
        ax.axis("off")
    title = f"class activation map: predicted {ex.predicted} ({100 * ex.prob:.1f}%)"
    fig.text(0.5, 0.97, title, ha="center", va="top", fontsize=12, weight="bold")
    return {"predicted": ex.predicted, "map": map_labels, "box": list(ex.box),
            "true_box": list(ex.true_box), "iou": f"{ex.iou:.2f}"}  # fmt: skip


_DRAWERS: dict[str, Callable[[Any, Any], dict[str, Any]]] = {
    "maxpool": _draw_pool,
    "avgpool": _draw_pool,
    "gap": _draw_gap,
    "head": _draw_head,
    "cam": _draw_cam,
}


# ----------------------------------------------------------------------------- one call


@dataclass(frozen=True)
class Options:
    """What ``gapnet explain`` can be asked; each field names the topics that read it."""

    size: int = 6  # maxpool, avgpool: the input grid's side
    kernel: int = 2  # maxpool, avgpool: kernel_size
    stride: int | None = None  # maxpool, avgpool: None means the kernel size
    padding: int | str = 0  # maxpool, avgpool: an int, "valid" or "same"
    ceil_mode: bool = False  # maxpool, avgpool
    seed: int = 0  # maxpool, avgpool: the grid's numbers; cam: where the digit lands
    checkpoint: str | None = None  # gap, cam: a run folder or checkpoint (see `example_model`)
    index: int = 0  # gap, cam: which test image
    channels: int = 6  # gap: how many channel maps are drawn
    canvas: int | None = None  # cam: side of the blank canvas; None: the image as it is
    threshold: float = 0.2  # cam: the box threshold
    model: str = "convnet"  # head: the backbone
    widths: tuple[int, ...] | None = None  # head: convnet widths; None: the model's
    input_size: int = 28  # head: the input side the fc head is sized for
    num_classes: int = 10  # head


class Explained(NamedTuple):
    """What `explain` returns."""

    example: Any  # PoolExample | GapExample | HeadExample | CamExample
    text: str  # the terminal version; for gap and cam its first line names the model
    drawn: Drawn | None  # the PNG, when `explain` was given `out`


def make_example(topic: str, options: Options = Options()) -> tuple[Any, str]:
    """The example of `topic` for `options`, and a note on the model used ("" if none)."""
    o = options
    if topic in POOL_OPS:
        args = (o.size, o.kernel, o.stride, o.padding, o.ceil_mode, o.seed)
        return pool_example(POOL_OPS[topic], *args), ""
    if topic == "head":
        return head_example(o.model, o.input_size, o.num_classes, o.widths), ""
    if topic not in TOPICS:
        raise ValueError(f"topic must be one of {', '.join(TOPICS)}, got {topic!r}")
    model, ckpt, note = example_model(o.checkpoint)
    image, _, classes, description = held_out_image(ckpt, o.index)
    if topic == "gap":
        return gap_example(model, image, description=description, channels=o.channels), note
    where = "" if o.canvas is None else f" on a {o.canvas}x{o.canvas} canvas (seed {o.seed})"
    return cam_example(model, image, classes=classes, description=description + where,
                       canvas=o.canvas, seed=o.seed, threshold=o.threshold), note  # fmt: skip


def explain(
    topic: str,
    options: Options = Options(),
    *,
    out: str | os.PathLike[str] | None = None,
    width: int = WIDTH,
    dpi: int = DPI,
    command: str | None = None,
) -> Explained:
    """One topic of ``gapnet explain``: its example, the text version and (with `out`) the PNG.

    Args:
        topic: one of `TOPICS`.
        options: the topic's settings.
        out: the PNG to write; None draws nothing.
        width, dpi, command: as `draw`.

    Example:
        >>> res = explain("head", Options(model="convnet-tiny"))
        >>> print(res.text.splitlines()[0])
        convnet-tiny (widths 8-16-32) at 28x28, 10 classes: the feature map is (C, h, w) = ...
    """
    example, note = make_example(topic, options)
    text = f"{note}\n{example.text()}" if note else example.text()
    drawn = None if out is None else draw(example, out, width=width, dpi=dpi, command=command)
    return Explained(example, text, drawn)
