"""Tests for gapnet.cam: the CAM identities, one-pass maps, boxes, IoU, overlays, localization."""

import statistics
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gapnet import cam as C
from gapnet import data as D
from gapnet import models as M

K = 7  # classes: not 10, so a stray default shows
NONLINEAR = ["gmp", "avgmax", "catavgmax", "gem"]  # maps exist, their means are not the logits
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: on a shared 2-core machine, intra-op thread hand-offs cost more than the
    convolutions (as in test_models)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    """Fresh non-negative images in [0, 1] (never zeros)."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def tiny(head: str = "gap", num_classes: int = K, seed: int = 0, **overrides) -> M.GapNet:
    """convnet-tiny (widths 8, 16, 32; depth 1), seeded, left in train mode on purpose:
    class_activation_maps must switch to eval itself."""
    torch.manual_seed(seed)
    return M.create("convnet-tiny", num_classes=num_classes, head=head, **overrides)


def ink_model(predicted: int = 3) -> M.GapNet:
    """convnet-tiny wired to pass the input's ink through channel 0 (each conv's centre tap), so
    every class map is the max-pooled image and the CAM box is the digit's box; the head's bias
    makes `predicted` the prediction for every image."""
    model = M.create("convnet-tiny", head="gap")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, M.ConvBnAct):
                module.conv.weight.zero_()
                module.conv.weight[0, 0, 1, 1] = 1.0
        model.head.conv.weight.zero_()
        model.head.conv.weight[:, 0] = 1.0
        model.head.conv.bias.zero_()
        model.head.conv.bias[predicted] = 1.0
    return model.eval()


def raw_maps(model: M.GapNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All K class maps and the logits, computed independently in eval mode."""
    model.eval()
    with torch.no_grad():
        return model.class_maps(x), model(x)


# --------------------------------------------------------------------------- the CAM identity


@pytest.mark.parametrize(
    "h, w",
    [
        (28, 28),  # MNIST size: 7x7 feature map
        (37, 45),  # non-square, not a multiple of the pooling: 9x11
        (4, 4),  # the smallest input: one feature cell
    ],
)
@pytest.mark.parametrize("cls", [None, 2])
def test_gap_map_mean_is_the_logit(h, w, cls):
    model = tiny("gap")
    cam = C.class_activation_maps(model, rand(3, 1, h, w), cls, upsample=False, normalize=False)
    assert cam.maps.shape == (3, h // 4, w // 4) and cam.maps.dtype == torch.float32
    picked = cam.logits.gather(1, cam.classes[:, None])[:, 0]
    torch.testing.assert_close(cam.maps.mean((1, 2)), picked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h, w", [(28, 28), (36, 52)])
def test_gap_fc_map_mean_plus_bias_is_the_logit(h, w):
    model = tiny("gap-fc")
    cam = C.class_activation_maps(model, rand(3, 1, h, w), upsample=False, normalize=False)
    bias = model.head.fc.bias[cam.classes]
    picked = cam.logits.gather(1, cam.classes[:, None])[:, 0]
    torch.testing.assert_close(cam.maps.mean((1, 2)) + bias, picked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", ["gap", "gap-fc", *NONLINEAR])
def test_logits_and_maps_are_the_models(head):
    """The one-pass result equals the model's own logits and class_maps, whatever the head."""
    model = tiny(head)
    x = rand(4, 1, 32, 28, seed=1)
    all_maps, logits = raw_maps(model, x)
    cam = C.class_activation_maps(model, x, upsample=False, normalize=False)
    torch.testing.assert_close(cam.logits, logits)
    torch.testing.assert_close(cam.classes, logits.argmax(1))
    torch.testing.assert_close(cam.maps, all_maps[torch.arange(4), cam.classes])


def test_float64_model_gives_float32_maps():
    model = tiny("gap").double()
    cam = C.class_activation_maps(model, rand(2, 1, 28, 28).double(), normalize=False)
    assert cam.maps.dtype == torch.float32 and cam.logits.dtype == torch.float64


# --------------------------------------------------------------------------- upsample, normalize


@pytest.mark.parametrize("head", ["gap", "gap-fc", "gem"])
@pytest.mark.parametrize("h, w", [(28, 28), (30, 41), (56, 56)])
def test_upsampled_normalized_maps(head, h, w):
    model = tiny(head)
    cam = C.class_activation_maps(model, rand(3, 1, h, w, seed=2))
    assert cam.maps.shape == (3, h, w) and cam.maps.dtype == torch.float32
    assert torch.isfinite(cam.maps).all()
    assert cam.maps.min() >= 0 and cam.maps.max() <= 1
    # min-max per map: each non-constant map spans exactly [0, 1]
    assert torch.equal(cam.maps.amin((1, 2)), torch.zeros(3))
    assert torch.equal(cam.maps.amax((1, 2)), torch.ones(3))


def test_upsample_is_bilinear_without_align_corners():
    model = tiny("gap")
    x = rand(2, 1, 40, 36, seed=3)
    small = C.class_activation_maps(model, x, upsample=False, normalize=False).maps
    big = C.class_activation_maps(model, x, normalize=False).maps
    expected = F.interpolate(small[:, None], size=(40, 36), mode="bilinear", align_corners=False)
    torch.testing.assert_close(big, expected[:, 0])
    lo, hi = big.amin((1, 2), keepdim=True), big.amax((1, 2), keepdim=True)
    torch.testing.assert_close(C.class_activation_maps(model, x).maps, (big - lo) / (hi - lo))


def test_normalize_maps_constant_map_is_zeros():
    maps = torch.stack([torch.full((3, 4), 5.0), torch.full((3, 4), -2.0), rand(3, 4)])
    out = C.normalize_maps(maps)
    assert torch.equal(out[:2], torch.zeros(2, 3, 4))
    assert out[2].min() == 0 and out[2].max() == 1


def test_channels_last_gives_the_same_maps():
    model = tiny("gap")
    x = rand(3, 1, 36, 44, seed=4)
    ref = C.class_activation_maps(model, x)
    cl = C.class_activation_maps(model, x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl.maps, ref.maps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cl.logits, ref.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(cl.classes, ref.classes)


def test_channels_last_three_channels():
    torch.manual_seed(0)
    model = M.create("convnet-tiny", in_chans=3, num_classes=K, head="gap-fc")
    x = rand(2, 3, 32, 40, seed=5)
    ref = C.class_activation_maps(model, x)
    cl = C.class_activation_maps(model, x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl.maps, ref.maps, rtol=1e-5, atol=1e-5)


def test_nin_gap_head():
    torch.manual_seed(0)
    model = M.create("nin", num_classes=K, head="gap")
    x = rand(2, 3, 32, 32, seed=6)
    raw = C.class_activation_maps(model, x, 4, upsample=False, normalize=False)
    assert raw.maps.shape == (2, 8, 8)
    torch.testing.assert_close(raw.maps.mean((1, 2)), raw.logits[:, 4], rtol=1e-5, atol=1e-5)
    assert C.class_activation_maps(model, x).maps.shape == (2, 32, 32)


# --------------------------------------------------------------------------- classes


@pytest.mark.parametrize(
    "classes, expected",
    [
        (5, [5, 5, 5]),  # one int for every image
        ([0, 6, 2], [0, 6, 2]),  # a list
        ((1, 1, 3), [1, 1, 3]),  # a tuple
        (torch.tensor([6, 0, 4]), [6, 0, 4]),  # a tensor
        (np.array([2, 3, 4], dtype=np.int32), [2, 3, 4]),  # an array of another int type
    ],
)
def test_given_classes_are_honoured(classes, expected):
    model = tiny("gap")
    x = rand(3, 1, 28, 28, seed=7)
    all_maps, _ = raw_maps(model, x)
    cam = C.class_activation_maps(model, x, classes, upsample=False, normalize=False)
    assert cam.classes.tolist() == expected and cam.classes.dtype == torch.int64
    torch.testing.assert_close(cam.maps, all_maps[torch.arange(3), torch.tensor(expected)])


@pytest.mark.parametrize(
    "classes, error, match",
    [
        ([1, 2], ValueError, r"N=3 ints .* got shape \(2,\)"),  # one too few
        (7, ValueError, r"in \[0, 7\) .* got 7"),  # K is out of range
        ([0, -1, 2], ValueError, "got -1"),  # negative
        (1.0, TypeError, "got 1.0"),  # a float is not a class
        (True, TypeError, "got True"),  # nor a bool
        (torch.tensor([0.0, 1.0, 2.0]), TypeError, "torch.float32"),  # float tensor
    ],
)
def test_bad_classes(classes, error, match):
    with pytest.raises(error, match=match):
        C.class_activation_maps(tiny("gap"), rand(3, 1, 28, 28), classes)


# --------------------------------------------------------------------------- one pass, eval


def test_one_backbone_pass_no_grad_and_train_flag_restored(monkeypatch):
    model = tiny("gap")  # train mode, BatchNorm would update its running stats
    stats = [b.clone() for b in model.buffers()]
    calls = []
    forward = model.backbone.forward

    def counted(x):
        calls.append(x.shape)
        return forward(x)

    monkeypatch.setattr(model.backbone, "forward", counted)
    x = rand(2, 1, 28, 28).requires_grad_()
    cam = C.class_activation_maps(model, x)
    assert len(calls) == 1
    assert model.training  # restored
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers(), strict=True))
    assert not cam.maps.requires_grad and not cam.logits.requires_grad
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(cam.logits, model(x))


@pytest.mark.parametrize("head", M.FC_HEADS)
def test_fc_heads_are_refused(head):
    with pytest.raises(TypeError) as err:
        C.class_activation_maps(tiny(head), rand(2, 1, 28, 28))
    msg = str(err.value)
    for part in (head, "fully connected", "per-location class scores", "where things are", "gap"):
        assert part in msg, (part, msg)


@pytest.mark.parametrize(
    "model, x, error, match",
    [
        ("not a model", rand(1, 1, 28, 28), TypeError, "GapNet, got str"),  # wrong model type
        (None, np.zeros((1, 1, 28, 28)), TypeError, "x must be a torch.Tensor"),  # numpy input
        (None, rand(1, 3, 28, 28), ValueError, r"in_chans=1"),  # wrong channels
        (None, rand(1, 1, 2, 2), ValueError, "at least 4x4"),  # too small for the backbone
    ],
)
def test_bad_model_or_input(model, x, error, match):
    with pytest.raises(error, match=match):
        C.class_activation_maps(tiny("gap") if model is None else model, x)


def test_no_classifier_is_refused():
    with pytest.raises(ValueError, match="num_classes=0"):
        C.class_activation_maps(tiny("gap", num_classes=0), rand(1, 1, 28, 28))


@pytest.mark.cuda
def test_cuda_matches_cpu():
    model = tiny("gap-fc").eval()
    x = rand(4, 1, 40, 40, seed=8)
    ref = C.class_activation_maps(model, x)
    got = C.class_activation_maps(model.cuda(), x.cuda())
    assert got.maps.is_cuda and got.classes.is_cuda
    torch.testing.assert_close(got.maps.cpu(), ref.maps, rtol=1e-4, atol=1e-4)
    assert torch.equal(C.cam_boxes(got.maps).cpu(), C.cam_boxes(got.maps.cpu()))


# --------------------------------------------------------------------------- boxes


def reference_largest_box(m: np.ndarray, threshold: float) -> list[int]:
    """BFS over pixels >= threshold * max in raster order; the first largest region's box."""
    h, w = m.shape
    mask = m >= threshold * m.max()
    seen = np.zeros_like(mask)
    best, best_size = [0, 0, w, h], 0
    for y in range(h):
        for x in range(w):
            if not mask[y, x] or seen[y, x]:
                continue
            seen[y, x] = True
            queue, pixels = deque([(y, x)]), []
            while queue:
                cy, cx = queue.popleft()
                pixels.append((cy, cx))
                for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            if len(pixels) > best_size:
                ys, xs = zip(*pixels, strict=True)
                best, best_size = [min(xs), min(ys), max(xs) + 1, max(ys) + 1], len(pixels)
    return best


def blob_map(h: int, w: int, blobs: list[tuple[int, int, int, int, float]]) -> torch.Tensor:
    """A (H, W) map of rectangles (x0, y0, x1, y1, value) on zero."""
    m = torch.zeros(h, w)
    for x0, y0, x1, y1, v in blobs:
        m[y0:y1, x0:x1] = v
    return m


@pytest.mark.parametrize(
    "blobs, threshold, expected",
    [
        ([(3, 2, 9, 7, 1.0)], 0.2, [3, 2, 9, 7]),  # one blob: its box
        ([(3, 2, 9, 7, 0.1)], 0.2, [3, 2, 9, 7]),  # the level is relative to the map's max
        ([(0, 0, 3, 3, 1.0), (6, 4, 12, 10, 0.5)], 0.2, [6, 4, 12, 10]),  # larger wins, not max
        ([(0, 0, 3, 3, 1.0), (6, 4, 12, 10, 0.5)], 0.6, [0, 0, 3, 3]),  # threshold drops it
        ([(0, 0, 3, 3, 1.0), (6, 4, 12, 10, 0.5)], 0.5, [6, 4, 12, 10]),  # >= includes the level
        ([(1, 1, 4, 4, 1.0), (6, 6, 9, 9, 1.0)], 0.2, [1, 1, 4, 4]),  # a tie: first in raster
        ([(0, 0, 12, 10, 0.0)], 0.2, [0, 0, 12, 10]),  # all zero: full image
        ([(0, 0, 12, 10, 3.0)], 0.2, [0, 0, 12, 10]),  # constant: full image
        ([(0, 0, 12, 10, -1.0)], 0.2, [0, 0, 12, 10]),  # max <= 0, nothing passes: full image
        ([(2, 3, 3, 4, 1.0)], 0.2, [2, 3, 3, 4]),  # a single pixel
        ([(0, 9, 12, 10, 1.0)], 0.2, [0, 9, 12, 10]),  # the last row, full width
    ],
)
def test_cam_boxes_cases(blobs, threshold, expected):
    m = blob_map(10, 12, blobs)
    assert C.cam_boxes(m[None], threshold).tolist() == [expected]
    assert C.cam_boxes(m, threshold).tolist() == expected  # a single (H, W) map
    assert reference_largest_box(m.numpy(), threshold) == expected


def test_cam_boxes_diagonal_is_not_connected():
    m = torch.zeros(1, 6, 6)
    for i in range(5):
        m[0, i, i] = 1.0  # 5 pixels touching only at corners: 5 regions of 1
    m[0, 4:6, 0:2] = 0.5  # a 2x2 block: the largest 4-connected region
    assert C.cam_boxes(m).tolist() == [[0, 4, 2, 6]]


def test_cam_boxes_spiral_converges():
    """A 1-pixel-wide snake, the worst case for propagation: one region, the whole box."""
    h = w = 31
    m = torch.zeros(1, h, w)
    m[0, ::2, :] = 1.0
    for i, r in enumerate(range(1, h, 2)):
        m[0, r, w - 1 if i % 2 == 0 else 0] = 1.0
    labels = C.label_components(m > 0)
    assert labels[m > 0].unique().tolist() == [0]
    assert C.cam_boxes(m).tolist() == [[0, 0, w, h]]


def test_cam_boxes_batch_and_numpy():
    maps = torch.stack(
        [
            blob_map(8, 8, [(1, 1, 3, 3, 1.0)]),
            blob_map(8, 8, [(4, 2, 8, 5, 1.0)]),
            torch.zeros(8, 8),
        ]
    )
    boxes = C.cam_boxes(maps)
    assert boxes.dtype == torch.int64 and boxes.shape == (3, 4)
    assert boxes.tolist() == [[1, 1, 3, 3], [4, 2, 8, 5], [0, 0, 8, 8]]
    assert torch.equal(C.cam_boxes(maps.numpy()), boxes)
    assert C.cam_boxes(torch.zeros(0, 5, 5)).shape == (0, 4)


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 14),
    w=st.integers(1, 14),
    n=st.integers(1, 3),
    levels=st.integers(2, 6),  # few distinct values: plateaus and ties
    threshold=st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_cam_boxes_match_bfs(h, w, n, levels, threshold, seed):
    rng = np.random.default_rng(seed)
    maps = rng.integers(0, levels, size=(n, h, w)).astype(np.float32) / (levels - 1)
    got = C.cam_boxes(torch.from_numpy(maps), threshold).tolist()
    assert got == [reference_largest_box(m, threshold) for m in maps]
    every = C.cam_boxes(torch.from_numpy(maps), threshold, "all").tolist()
    assert every == [reference_all_box(m, threshold) for m in maps]


def reference_all_box(m: np.ndarray, threshold: float) -> list[int]:
    """The box around every pixel >= threshold * max; the full map where none passes."""
    ys, xs = np.nonzero(m >= threshold * m.max())
    if len(ys) == 0:
        return [0, 0, m.shape[1], m.shape[0]]
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_cam_boxes_all_keeps_a_split_digit():
    """A map that splits into two blobs (a 2's top and base): "largest" boxes one, "all" both."""
    m = torch.zeros(20, 20)
    m[2:6, 4:12] = 1.0  # the top, 32 pixels
    m[12:18, 3:14] = 0.8  # the base, 66 pixels
    assert C.cam_boxes(m, 0.5).tolist() == [3, 12, 14, 18]
    assert C.cam_boxes(m, 0.5, "all").tolist() == [3, 2, 14, 18]
    with pytest.raises(ValueError, match="region must be one of largest, all, got 'any'"):
        C.cam_boxes(m, 0.5, "any")


def test_label_components_is_the_smallest_index():
    rng = np.random.default_rng(0)
    mask = torch.from_numpy(rng.random((4, 16, 16)) < 0.55)
    labels = C.label_components(mask)
    assert (labels[~mask] == 256).all()
    for i in range(4):  # one label per region, and it is the region's first pixel
        for label in labels[i][mask[i]].unique().tolist():
            region = (labels[i] == label).flatten().nonzero()[:, 0]
            assert region.min().item() == label


@pytest.mark.parametrize(
    "maps, threshold, error, match",
    [
        (torch.zeros(2, 3, 4, 4), 0.2, ValueError, r"\(N, H, W\) or \(H, W\)"),  # 4-d
        (torch.zeros(2, 4, 4), 1.5, ValueError, "threshold must be in"),  # > 1
        (torch.zeros(2, 4, 4), -0.1, ValueError, "got -0.1"),  # < 0
        (torch.full((1, 4, 4), float("nan")), 0.2, ValueError, "finite"),  # NaN
        (torch.zeros(1, 4, 4, dtype=torch.bool), 0.2, TypeError, "torch.bool"),  # a mask
        (torch.zeros(1, 0, 4), 0.2, ValueError, "empty"),  # no pixels
    ],
)
def test_cam_boxes_bad_input(maps, threshold, error, match):
    with pytest.raises(error, match=match):
        C.cam_boxes(maps, threshold)


# --------------------------------------------------------------------------- IoU


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ((0, 0, 4, 4), (0, 0, 4, 4), 1.0),  # identical
        ((0, 0, 4, 4), (2, 0, 6, 4), 8 / 24),  # half overlap: 8 / (16 + 16 - 8)
        ((0, 0, 4, 4), (1, 1, 3, 3), 4 / 16),  # one inside the other
        ((0, 0, 2, 2), (2, 0, 4, 2), 0.0),  # touching edges: x1 is exclusive, no overlap
        ((0, 0, 2, 2), (5, 5, 7, 7), 0.0),  # disjoint
        ((3, 3, 3, 3), (3, 3, 3, 3), 0.0),  # two empty boxes
        ((0, 0, 10, 1), (0, 0, 1, 10), 1 / 19),  # a cross: 1 / (10 + 10 - 1)
    ],
)
def test_box_iou_cases(a, b, expected):
    got = C.box_iou(torch.tensor([a]), torch.tensor([b]))
    assert got.shape == (1,) and got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert C.box_iou(torch.tensor([b]), torch.tensor([a])).item() == pytest.approx(expected)


def test_box_iou_batch_and_errors():
    a = np.array([[0, 0, 4, 4], [0, 0, 2, 2]])
    assert C.box_iou(a, a).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"\(2, 4\) and \(1, 4\)"):
        C.box_iou(a, a[:1])
    with pytest.raises(ValueError, match="boxes"):
        C.box_iou(torch.zeros(2, 3), torch.zeros(2, 3))


# --------------------------------------------------------------------------- drawing


@pytest.mark.parametrize(
    "shape",
    [
        (1, 20, 30),  # grayscale with a channel
        (20, 30),  # grayscale without
        (3, 20, 30),  # RGB
    ],
)
def test_overlay_is_rgb_of_the_input_size(shape):
    img = C.overlay(rand(*shape), rand(20, 30, seed=1))
    assert img.mode == "RGB" and img.size == (30, 20)


def test_overlay_alpha_ends():
    image, cam = rand(3, 6, 5), rand(6, 5, seed=1)
    plain = np.asarray(C.overlay(image, cam, alpha=0.0))
    np.testing.assert_array_equal(plain, np.round(image.permute(1, 2, 0).numpy() * 255))
    heat = np.asarray(C.overlay(image.numpy(), cam.numpy(), alpha=1.0))
    np.testing.assert_array_equal(heat, C.colorize(cam))
    gray = np.asarray(C.overlay(image[0], cam, alpha=0.0))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_overlay_resizes_a_small_cam_and_draws_boxes():
    img = C.overlay(
        rand(1, 28, 28),
        rand(7, 7),
        alpha=0.0,
        boxes=[((2, 3, 10, 12), "red"), ((0, 0, 0, 0), "blue")],
    )
    assert img.size == (28, 28)
    assert img.getpixel((2, 3)) == (255, 0, 0) and img.getpixel((9, 11)) == (255, 0, 0)
    assert img.getpixel((10, 12)) != (255, 0, 0)  # x1, y1 exclusive: outside the outline
    assert img.getpixel((5, 6)) != (255, 0, 0)  # inside: not filled


def test_draw_boxes_colors_and_copy():
    from PIL import Image

    base = Image.new("RGB", (10, 10))
    boxes = C.cam_boxes(torch.stack([blob_map(10, 10, [(1, 1, 4, 4, 1.0)])] * 2))
    out = C.draw_boxes(base, [boxes[0], (5, 5, 9, 9)], ["lime", (0, 0, 255)], width=2)
    assert out.getpixel((1, 1)) == (0, 255, 0) and out.getpixel((5, 5)) == (0, 0, 255)
    assert base.getpixel((1, 1)) == (0, 0, 0)  # the input is untouched
    with pytest.raises(ValueError, match="2 boxes but 1 colors"):
        C.draw_boxes(base, [(0, 0, 1, 1), (0, 0, 2, 2)], ["red"])


@pytest.mark.parametrize(
    "image, cam, alpha, match",
    [
        (rand(2, 8, 8), rand(8, 8), 0.5, "C = 1 or 3"),  # two channels
        (rand(8, 8), rand(1, 8, 8), 0.5, r"one \(H, W\) map"),  # a batch of maps
        (rand(8, 8), rand(8, 8), 1.5, "alpha must be in"),  # alpha > 1
    ],
)
def test_overlay_bad_input(image, cam, alpha, match):
    with pytest.raises(ValueError, match=match):
        C.overlay(image, cam, alpha=alpha)


def test_colormap_runs_blue_to_red():
    assert C.JET.shape == (256, 3) and C.JET.dtype == np.uint8
    assert C.JET[0].argmax() == 2 and C.JET[-1].argmax() == 0  # blue at 0, red at 1


def test_save_png_roundtrip(tmp_path):
    from PIL import Image

    img = C.overlay(rand(1, 24, 36), rand(24, 36))
    path = C.save_png(img, tmp_path / "sub" / "cam.png")
    assert path == tmp_path / "sub" / "cam.png"
    C.save_png(img, path)  # overwrites
    with Image.open(path) as back:
        assert back.format == "PNG" and back.size == (36, 24) and back.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(back), np.asarray(img))
    assert sorted(p.name for p in path.parent.iterdir()) == ["cam.png"]  # no temporary left


def test_import_loads_no_matplotlib():
    code = "import sys, gapnet, gapnet.cam; print(sorted({m.split('.')[0] for m in sys.modules}))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert "'matplotlib'" not in out


# --------------------------------------------------------------------------- localization


def test_localize_rows():
    rows = C.localize(tiny("gap"), (28, 40), n=12, source="digits", batch_size=5)
    assert [r["size"] for r in rows] == [28, 40]
    for r in rows:
        assert tuple(r) == C.ROW_KEYS
        assert r["n"] == 12 and r["seconds"] >= 0
        for key in ("acc", "loc_acc", "top1_loc", "mean_iou"):
            assert 0.0 <= r[key] <= 1.0, (key, r)
        assert r["top1_loc"] <= min(r["acc"], r["loc_acc"])


def test_localize_scores_an_ink_detector():
    """Every class map of `ink_model` is the digit's ink, so its boxes fit the true boxes while
    it always predicts class 3: loc_acc is high, acc is class 3's share, top1_loc within it."""
    rows = C.localize(ink_model(3), (28, 56), n=50, threshold=0.4)
    for r in rows:
        assert r["loc_acc"] >= 0.9 and r["mean_iou"] >= 0.6, r
        assert abs(r["acc"] - 0.1) <= 0.021, r  # stratified: 5 +- 1 of the 50 are 3s
        assert r["top1_loc"] <= r["acc"]


def test_localize_errors():
    with pytest.raises(TypeError, match="fully connected"):
        C.localize(tiny("fc"), 28, n=4, source="digits")
    with pytest.raises(ValueError, match="threshold must be in"):
        C.localize(tiny("gap"), 28, threshold=2.0, source="digits")
    with pytest.raises(ValueError, match="batch_size must be"):
        C.localize(tiny("gap"), 28, batch_size=0, source="digits")
    with pytest.raises(ValueError, match="sizes must be"):
        C.localize(tiny("gap"), "28", source="digits")


def test_choose_threshold_uses_training_digits(monkeypatch):
    calls = []
    canvas_mnist = D.canvas_mnist

    def spy(size, **kwargs):
        calls.append((size, kwargs))
        return canvas_mnist(size, **kwargs)

    monkeypatch.setattr(D, "canvas_mnist", spy)
    choice = C.choose_threshold(ink_model(), (28, 40), (0.2, 0.5, 0.7), n=30, source="digits")
    assert [size for size, _ in calls] == [28, 40]
    assert all(kw["split"] == "train" for _, kw in calls)  # never the test set
    assert choice.threshold in (0.2, 0.5, 0.7) and choice.region in C.REGIONS
    assert sorted(choice.scores) == [(r, t) for r in ("all", "largest") for t in (0.2, 0.5, 0.7)]
    chosen = (choice.region, choice.threshold)
    assert choice.scores[chosen] == max(choice.scores.values())
    assert [r["size"] for r in choice.rows] == [28, 40]
    mean = sum(r["loc_acc"] for r in choice.rows) / 2
    assert mean == pytest.approx(choice.scores[chosen])
    paper = C.choose_threshold(ink_model(), 28, (0.2, 0.5), regions=("largest",), n=10,
                               source="digits")  # fmt: skip
    assert paper.region == "largest" and sorted(paper.scores) == [
        ("largest", 0.2),
        ("largest", 0.5),
    ]
    calls.clear()
    C.localize(ink_model(), 28, n=5, source="digits")
    assert calls[0][1]["split"] == "test"  # localize stays on held-out digits


def test_choose_threshold_errors():
    with pytest.raises(ValueError, match="must each name at least one"):
        C.choose_threshold(tiny("gap"), 28, (), source="digits")
    with pytest.raises(ValueError, match="must each name at least one"):
        C.choose_threshold(tiny("gap"), 28, regions=(), source="digits")
    with pytest.raises(ValueError, match="regions must be among largest, all, got 'biggest'"):
        C.choose_threshold(tiny("gap"), 28, regions=("biggest",), source="digits")
    with pytest.raises(TypeError, match="regions must be a sequence of names, got 'all'"):
        C.choose_threshold(tiny("gap"), 28, regions="all", source="digits")
    gen = C.choose_threshold(tiny("gap"), 28, iter([0.2, 0.5]), n=4, source="digits")
    assert len(gen.scores) == 4  # an iterator of thresholds serves every region
    with pytest.raises(ValueError, match="threshold must be in"):
        C.choose_threshold(tiny("gap"), 28, (0.2, 1.2), source="digits")


# --------------------------------------------------------------------------- cost


@pytest.mark.parametrize("size", [28, pytest.param(56, marks=pytest.mark.slow)])
def test_cam_costs_about_one_forward(size, record_property):
    """CAM is one forward plus a 1x1 conv, a resize and a min-max: measured on a shared 2-core
    CPU at about 1.03-1.15x a plain forward (convnet, batch 256); asserted loosely."""
    torch.manual_seed(0)
    model = M.create("convnet", head="gap").eval()
    x = rand(256, 1, size, size)
    forward, cam = [], []
    with torch.no_grad():
        model(x)
    C.class_activation_maps(model, x)
    for _ in range(3):  # interleaved, so both see the same machine load
        start = time.perf_counter()
        with torch.no_grad():
            model(x)
        forward.append(time.perf_counter() - start)
        start = time.perf_counter()
        C.class_activation_maps(model, x)
        cam.append(time.perf_counter() - start)
    ratio = min(cam) / min(forward)
    record_property("cam_over_forward", ratio)
    print(
        f"\nconvnet batch 256 {size}x{size}, {torch.get_num_threads()} thread(s): forward "
        f"{min(forward) * 1e3:.0f} ms (median {statistics.median(forward) * 1e3:.0f}), CAM "
        f"{min(cam) * 1e3:.0f} ms (median {statistics.median(cam) * 1e3:.0f}), ratio {ratio:.2f}"
    )
    assert ratio < 2.0
