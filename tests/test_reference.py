"""gapnet.reference against PyTorch (values, indices, autograd gradients), central finite
differences, and hand-worked Keras/TensorFlow ``padding="same"`` cases."""

from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import ADAPTIVE_CASES, AVG_POOL_CASES, GLOBAL_CASES, MAX_POOL_CASES, Case
from hypothesis import given, settings
from hypothesis import strategies as st

from gapnet import reference as ref

LAYOUTS = ("NCHW", "NHWC", "CHW", "HWC")
KINDS = ("avg", "max", "avgmax", "catavgmax", "gem")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors (conftest.py)


# ----------------------------------------------------------------------------- layouts


def to_layout(a: np.ndarray, layout: str) -> np.ndarray:
    """An NCHW array, or an (N, C) result, in `layout`; unbatched layouts drop N = 1."""
    if a.ndim == 4 and layout in ("NHWC", "HWC"):
        a = a.transpose(0, 2, 3, 1)
    return a if layout in ("NCHW", "NHWC") else a[0]


def to_nchw(a: np.ndarray, layout: str) -> np.ndarray:
    """The inverse of `to_layout`."""
    if layout in ("CHW", "HWC"):
        a = a[None]
    return a.transpose(0, 3, 1, 2) if a.ndim == 4 and layout in ("NHWC", "HWC") else a


def random_input(rng: np.random.Generator, hw: tuple[int, int], layout: str) -> np.ndarray:
    """A float64 NCHW input: 2 images of 3 channels, or 1 image for an unbatched layout."""
    n = 2 if layout in ("NCHW", "NHWC") else 1
    return rng.standard_normal((n, 3, *hw))


# ----------------------------------------------------------------------------- PyTorch's ops


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def tf_same_pads(size: int, k: int, s: int, d: int = 1) -> tuple[int, int]:
    """TensorFlow's documented "SAME" padding along one axis, as (before, after)."""
    k = (k - 1) * d + 1
    total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
    return total // 2, total - total // 2


def same_pads(x: torch.Tensor, kernel_size: Any, stride: Any, dilation: Any) -> tuple[int, ...]:
    """F.pad's (left, right, top, bottom) for "same" on an NCHW tensor."""
    k, d = _pair(kernel_size), _pair(dilation)
    s = k if stride is None else _pair(stride)
    (top, bottom), (left, right) = (tf_same_pads(x.shape[2 + a], k[a], s[a], d[a]) for a in (0, 1))
    return left, right, top, bottom


def torch_max_pool2d(
    x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
):
    """F.max_pool2d, with "same" as an explicit -inf pad: (values, indices)."""
    if padding == "valid":
        padding = 0
    if padding != "same":
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, True)
    left, _, top, _ = pads = same_pads(x, kernel_size, stride, dilation)
    padded = F.pad(x, pads, value=-math.inf)
    y, idx = F.max_pool2d(padded, kernel_size, stride, 0, dilation, False, True)
    width = padded.shape[-1]
    return y, (idx // width - top) * x.shape[-1] + idx % width - left


def torch_avg_pool2d(
    x,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    divisor_override=None,
):
    """F.avg_pool2d, with "same" as a zero pad and a count of the real cells: (values, None)."""
    if padding == "valid":
        padding = 0
    if padding != "same":
        args = (kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        return F.avg_pool2d(x, *args), None
    pads = same_pads(x, kernel_size, stride, 1)
    sums = F.avg_pool2d(F.pad(x, pads), kernel_size, stride, divisor_override=1)
    ones = F.pad(torch.ones_like(x), pads)
    counts = divisor_override or F.avg_pool2d(ones, kernel_size, stride, divisor_override=1)
    return sums / counts, None


def torch_global_pool2d(x, kind="avg", keepdim=False, p=3.0, eps=1e-6):
    """timm's formulas; max as adaptive_max_pool2d(x, 1), whose gradient goes to one cell."""
    if kind == "gem":
        y = x.clamp(min=eps).pow(p).mean((2, 3)).pow(1 / p)
    else:
        avg, peak = x.mean((2, 3)), F.adaptive_max_pool2d(x, 1).flatten(1)
        y = {
            "avg": avg,
            "max": peak,
            "avgmax": 0.5 * (avg + peak),
            "catavgmax": torch.cat([avg, peak], dim=1),
        }[kind]
    return (y[:, :, None, None] if keepdim else y), None


TORCH_OPS = {  # name -> f(NCHW tensor, **kwargs) -> (NCHW output, NCHW indices or None)
    "max_pool2d": torch_max_pool2d,
    "avg_pool2d": torch_avg_pool2d,
    "adaptive_avg_pool2d": lambda x, output_size: (F.adaptive_avg_pool2d(x, output_size), None),
    "adaptive_max_pool2d": lambda x, output_size, return_indices=False: F.adaptive_max_pool2d(
        x, output_size, return_indices=True
    ),
    "global_pool2d": torch_global_pool2d,
    "global_avg_pool2d": lambda x, keepdim=False: torch_global_pool2d(x, "avg", keepdim),
    "global_max_pool2d": lambda x, keepdim=False: torch_global_pool2d(x, "max", keepdim),
}


def check_against_torch(
    rng: np.random.Generator, name: str, x_nchw: np.ndarray, layout: str = "NCHW", **kwargs: Any
) -> None:
    """`reference.<name>` and `<name>_backward` in `layout` against PyTorch's float64 autograd:
    values, dtype, shape, indices (with return_indices), grad_x, and grad_p for GeM."""
    x = to_layout(x_nchw, layout)
    xt = torch.tensor(x_nchw, requires_grad=True)
    torch_kwargs = dict(kwargs)
    p = None
    if kwargs.get("kind") == "gem":
        p = torch.tensor(kwargs.get("p", 3.0), dtype=torch.float64, requires_grad=True)
        torch_kwargs["p"] = p
    y_t, idx_t = TORCH_OPS[name](xt, **torch_kwargs)

    out = getattr(ref, name)(x, layout=layout, **kwargs)
    y = out[0] if kwargs.get("return_indices") else out
    expected = to_layout(y_t.detach().numpy(), layout)
    assert y.shape == expected.shape and y.dtype == x.dtype
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    if kwargs.get("return_indices"):
        assert out[1].dtype == np.int64
        np.testing.assert_array_equal(out[1], to_layout(idx_t.numpy(), layout))

    g = rng.standard_normal(y.shape)
    y_t.backward(torch.from_numpy(to_nchw(g, layout)))
    grad = getattr(ref, name + "_backward")(g, x, layout=layout, **kwargs)
    if p is not None:
        grad, grad_p = grad
        assert isinstance(grad_p, float)
        np.testing.assert_allclose(grad_p, p.grad.item(), rtol=1e-10, atol=1e-12)
    torch_grad = np.zeros_like(x_nchw) if xt.grad is None else xt.grad.numpy()
    assert grad.shape == x.shape and grad.dtype == x.dtype
    np.testing.assert_allclose(grad, to_layout(torch_grad, layout), rtol=1e-12, atol=1e-12)


def check_or_both_refuse(
    rng: np.random.Generator, name: str, x_nchw: np.ndarray, layout: str, kwargs: dict
) -> None:
    """Where PyTorch refuses the arguments the reference must too; elsewhere they must agree.

    The one allowed difference: the reference refuses a window made only of padding, which
    PyTorch pools to -inf (and whose max backward writes out of bounds).
    """
    x = to_layout(x_nchw, layout)
    try:
        with torch.no_grad():
            TORCH_OPS[name](torch.from_numpy(x_nchw), **kwargs)
    except RuntimeError:
        with pytest.raises(ValueError):
            getattr(ref, name)(x, layout=layout, **kwargs)
        return
    try:
        getattr(ref, name)(x, layout=layout, **kwargs)
    except ValueError as error:
        assert "only padding" in str(error)
        probe = torch.ones((1, 1, *x_nchw.shape[2:]), dtype=torch.float64)
        assert torch.isneginf(TORCH_OPS[name](probe, **kwargs)[0]).any()
        return
    check_against_torch(rng, name, x_nchw, layout, **kwargs)


# ----------------------------------------------------------------------------- case tables


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", MAX_POOL_CASES, ids=str)
def test_max_pool2d_cases(case: Case, layout: str, rng: np.random.Generator) -> None:
    x = random_input(rng, case.hw, layout)
    check_against_torch(rng, "max_pool2d", x, layout, return_indices=True, **case.kwargs)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", AVG_POOL_CASES, ids=str)
def test_avg_pool2d_cases(case: Case, layout: str, rng: np.random.Generator) -> None:
    check_against_torch(
        rng, "avg_pool2d", random_input(rng, case.hw, layout), layout, **case.kwargs
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", ADAPTIVE_CASES, ids=str)
def test_adaptive_pool2d_cases(case: Case, layout: str, rng: np.random.Generator) -> None:
    x = random_input(rng, case.hw, layout)
    check_against_torch(rng, "adaptive_avg_pool2d", x, layout, **case.kwargs)
    check_against_torch(rng, "adaptive_max_pool2d", x, layout, return_indices=True, **case.kwargs)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", GLOBAL_CASES, ids=str)
def test_global_pool2d_cases(case: Case, layout: str, rng: np.random.Generator) -> None:
    check_against_torch(
        rng, "global_pool2d", random_input(rng, case.hw, layout), layout, **case.kwargs
    )


@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["global_avg_pool2d", "global_max_pool2d"])
def test_global_wrappers(name: str, layout: str, keepdim: bool, rng: np.random.Generator) -> None:
    check_against_torch(rng, name, random_input(rng, (4, 5), layout), layout, keepdim=keepdim)


# ----------------------------------------------------------------------------- random arguments


def _ints(lo: int, hi: int) -> st.SearchStrategy:
    """An int or a pair of ints in [lo, hi]."""
    return st.integers(lo, hi) | st.tuples(st.integers(lo, hi), st.integers(lo, hi))


@st.composite
def _input(draw: st.DrawFn, max_hw: int = 9) -> tuple[np.ndarray, str]:
    """A small float64 NCHW input (N may be 0) and a layout to pass it in."""
    layout = draw(st.sampled_from(LAYOUTS))
    n = draw(st.integers(0, 2)) if layout in ("NCHW", "NHWC") else 1
    shape = (n, draw(st.integers(1, 3)), draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw)))
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(shape), layout


@st.composite
def _window_kwargs(draw: st.DrawFn, op: str) -> dict:
    kwargs: dict[str, Any] = {"kernel_size": draw(_ints(1, 4))}
    stride = draw(st.none() | _ints(1, 3))
    if stride is not None:
        kwargs["stride"] = stride
    kwargs["padding"] = draw(st.sampled_from(["valid", "same"]) | _ints(0, 2))
    if kwargs["padding"] != "same":
        kwargs["ceil_mode"] = draw(st.booleans())
    if op == "max_pool2d":
        kwargs["dilation"] = draw(_ints(1, 3))
        kwargs["return_indices"] = draw(st.booleans())
    else:
        kwargs["count_include_pad"] = draw(st.booleans())
        kwargs["divisor_override"] = draw(st.sampled_from([None, None, 1, 3, -2]))
    return kwargs


@settings(max_examples=80, deadline=None)
@given(data=_input(), kwargs=_window_kwargs("max_pool2d"), seed=st.integers(0, 2**32 - 1))
def test_max_pool2d_random(data: tuple, kwargs: dict, seed: int) -> None:
    check_or_both_refuse(np.random.default_rng(seed), "max_pool2d", *data, kwargs)


@settings(max_examples=80, deadline=None)
@given(data=_input(), kwargs=_window_kwargs("avg_pool2d"), seed=st.integers(0, 2**32 - 1))
def test_avg_pool2d_random(data: tuple, kwargs: dict, seed: int) -> None:
    check_or_both_refuse(np.random.default_rng(seed), "avg_pool2d", *data, kwargs)


@settings(max_examples=60, deadline=None)
@given(
    data=_input(),
    output_size=st.integers(1, 9) | st.tuples(st.none() | st.integers(1, 9), st.integers(1, 9)),
    seed=st.integers(0, 2**32 - 1),
)
def test_adaptive_pool2d_random(data: tuple, output_size: Any, seed: int) -> None:
    rng = np.random.default_rng(seed)
    check_against_torch(rng, "adaptive_avg_pool2d", *data, output_size=output_size)
    check_against_torch(
        rng, "adaptive_max_pool2d", *data, output_size=output_size, return_indices=True
    )


@settings(max_examples=60, deadline=None)
@given(
    data=_input(max_hw=6),
    kind=st.sampled_from(KINDS),
    keepdim=st.booleans(),
    p=st.floats(0.5, 4.0),
    eps=st.sampled_from([1e-6, 0.1, 0.5]),
    seed=st.integers(0, 2**32 - 1),
)
def test_global_pool2d_random(
    data: tuple, kind: str, keepdim: bool, p: float, eps: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    check_against_torch(rng, "global_pool2d", *data, kind=kind, keepdim=keepdim, p=p, eps=eps)


# ----------------------------------------------------------------------------- dtypes

DTYPE_CALLS = [  # (op, keyword arguments): one call per op family
    ("max_pool2d", {"kernel_size": 3, "stride": 2, "padding": 1}),
    ("avg_pool2d", {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}),
    ("avg_pool2d", {"kernel_size": 3, "stride": 2, "padding": "same"}),
    ("adaptive_avg_pool2d", {"output_size": (3, 2)}),
    ("adaptive_max_pool2d", {"output_size": 3}),
    *[("global_pool2d", {"kind": kind}) for kind in KINDS],
]


def _forward_backward(name: str, x: np.ndarray, g: np.ndarray | None, kwargs: dict) -> tuple:
    y = getattr(ref, name)(x, **kwargs)
    if g is None:
        return y, None
    grad = getattr(ref, name + "_backward")(g, x, **kwargs)
    return y, grad[0] if kwargs.get("kind") == "gem" else grad


@pytest.mark.parametrize(("dtype", "tol"), [(np.float32, 1e-5), (np.float16, 2e-3)])
@pytest.mark.parametrize(("name", "kwargs"), DTYPE_CALLS)
def test_low_precision(
    name: str, kwargs: dict, dtype: type, tol: float, rng: np.random.Generator
) -> None:
    x = rng.standard_normal((2, 3, 7, 7)).astype(dtype)
    y_shape = _forward_backward(name, x, None, kwargs)[0].shape
    g = rng.standard_normal(y_shape).astype(dtype)
    y, grad = _forward_backward(name, x, g, kwargs)
    y64, grad64 = _forward_backward(name, x.astype(np.float64), g.astype(np.float64), kwargs)
    assert y.dtype == dtype and grad.dtype == dtype
    np.testing.assert_allclose(y, y64, rtol=tol, atol=tol)
    np.testing.assert_allclose(grad, grad64, rtol=tol, atol=tol)


@pytest.mark.parametrize(("name", "kwargs"), DTYPE_CALLS)
def test_bfloat16(name: str, kwargs: dict, rng: np.random.Generator) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="NumPy has bfloat16 only via ml_dtypes")
    x = rng.standard_normal((2, 3, 7, 7)).astype(ml_dtypes.bfloat16)
    y, _ = _forward_backward(name, x, None, kwargs)
    y64, _ = _forward_backward(name, x.astype(np.float64), None, kwargs)
    assert y.dtype == x.dtype
    np.testing.assert_allclose(y.astype(np.float64), y64, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------- finite differences

FD_CALLS = [  # (op, keyword arguments incl. layout)
    ("max_pool2d", {"kernel_size": 3, "stride": 2, "padding": 1}),
    ("max_pool2d", {"kernel_size": 2, "stride": 1, "dilation": 2, "padding": "same"}),
    ("max_pool2d", {"kernel_size": (2, 3), "stride": 2, "ceil_mode": True, "layout": "NHWC"}),
    ("avg_pool2d", {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}),
    ("avg_pool2d", {"kernel_size": 3, "padding": 1, "count_include_pad": False}),
    ("avg_pool2d", {"kernel_size": 3, "stride": 2, "padding": "same", "layout": "NHWC"}),
    ("avg_pool2d", {"kernel_size": 2, "divisor_override": 3}),
    ("adaptive_avg_pool2d", {"output_size": (3, 2)}),
    ("adaptive_max_pool2d", {"output_size": (2, 4), "layout": "NHWC"}),
    *[("global_pool2d", {"kind": kind}) for kind in KINDS],
    ("global_pool2d", {"kind": "gem", "p": 2.5, "eps": 1.075, "layout": "NHWC"}),
]


def _numeric_grad(f: Any, x: np.ndarray, g: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """d(sum(f(x) * g))/dx by central differences, one element at a time."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = h
        grad[i] = ((f(x + step) - f(x - step)) * g).sum() / (2 * h)
    return grad


@pytest.mark.parametrize(("name", "kwargs"), FD_CALLS)
def test_backward_matches_finite_differences(
    name: str, kwargs: dict, rng: np.random.Generator
) -> None:
    # Distinct values 0.1 apart (plus a common offset in (0, 0.05)): no ties among maxima, and
    # all above GeM's clamp or 0.025 away from it, so every derivative exists.
    x = 0.5 + 0.1 * rng.permutation(50).reshape(1, 2, 5, 5) + rng.uniform(0, 0.05)
    x = to_layout(x, kwargs.get("layout", "NCHW"))
    forward = getattr(ref, name)
    g = rng.standard_normal(forward(x, **kwargs).shape)
    grad = getattr(ref, name + "_backward")(g, x, **kwargs)
    if kwargs.get("kind") == "gem":
        grad, grad_p = grad
        p = kwargs.get("p", 3.0)

        def f_of_p(p_: np.ndarray) -> np.ndarray:
            return forward(x, **{**kwargs, "p": float(p_[0])})

        numeric_p = _numeric_grad(f_of_p, np.array([p]), g)[0]
        np.testing.assert_allclose(grad_p, numeric_p, rtol=1e-6, atol=1e-8)
    numeric = _numeric_grad(lambda x_: forward(x_, **kwargs), x, g)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- Keras "same"

A = [[1, 9, 2, 0, 5], [4, 3, 8, 7, 1], [6, 2, 0, 3, 9], [5, 1, 7, 4, 2], [3, 8, 6, 0, 4]]
B = [[1, 2, 3, 4], [8, 7, 6, 5], [9, 10, 11, 12], [16, 15, 14, 13]]
C = [[4, 0, 7, 2, 9], [1, 6, 3, 8, 5], [7, 2, 9, 0, 4], [3, 5, 1, 6, 2]]
D = [[1, 5, 2], [7, 3, 8], [4, 9, 6]]

# Per axis, Keras/TensorFlow "same": out = ceil(in / s), total padding
# max((out - 1) * s + k - in, 0), of which total // 2 before and the rest after. An average
# divides by the real cells of its window only, written below as sum / count.
KERAS_SAME_CASES = [
    # 5x5, k=2, s=2 (odd size): out 3, pad 2*2 + 2 - 5 = 1 -> 0 before, 1 after;
    # windows cover rows/cols {0,1}, {2,3}, {4}
    pytest.param(
        A, 2, 2,
        [[9, 8, 5], [6, 7, 9], [8, 6, 4]],
        [[17 / 4, 17 / 4, 6 / 2], [14 / 4, 14 / 4, 11 / 2], [11 / 2, 6 / 2, 4 / 1]],
        id="5x5-k2-s2",
    ),
    # 4x4, k=3, s=1 (even size, stride 1): out 4, pad 3*1 + 3 - 4 = 2 -> 1 before, 1 after;
    # windows cover {0,1}, {0,1,2}, {1,2,3}, {2,3}
    pytest.param(
        B, 3, 1,
        [[8, 8, 7, 6], [10, 11, 12, 12], [16, 16, 15, 14], [16, 16, 15, 14]],
        [
            [18 / 4, 27 / 6, 27 / 6, 18 / 4],
            [37 / 6, 57 / 9, 60 / 9, 41 / 6],
            [65 / 6, 96 / 9, 93 / 9, 61 / 6],
            [50 / 4, 75 / 6, 75 / 6, 50 / 4],
        ],
        id="4x4-k3-s1",
    ),
    # 4x4, k=3, s=2 (even size, stride 2): out 2, pad 1*2 + 3 - 4 = 1 -> 0 before, 1 after;
    # windows cover {0,1,2}, {2,3}
    pytest.param(
        B, 3, 2,
        [[11, 12], [16, 14]],
        [[57 / 9, 41 / 6], [75 / 6, 50 / 4]],
        id="4x4-k3-s2",
    ),
    # 4x5, k=3, s=3: rows out 2, pad 1*3 + 3 - 4 = 2 -> 1 before, 1 after: {0,1}, {2,3};
    # columns out 2, pad 1*3 + 3 - 5 = 1 -> 0 before, 1 after: {0,1,2}, {3,4}
    pytest.param(
        C, 3, 3,
        [[7, 9], [9, 6]],
        [[21 / 6, 24 / 4], [27 / 6, 12 / 4]],
        id="4x5-k3-s3",
    ),
    # 3x3, k=2, s=1 (odd size, even kernel): out 3, pad 2*1 + 2 - 3 = 1 -> 0 before, 1 after;
    # windows cover {0,1}, {1,2}, {2}
    pytest.param(
        D, 2, 1,
        [[7, 8, 8], [9, 9, 8], [9, 9, 6]],
        [[16 / 4, 18 / 4, 10 / 2], [23 / 4, 26 / 4, 14 / 2], [13 / 2, 15 / 2, 6 / 1]],
        id="3x3-k2-s1",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("x", "k", "s", "expected_max", "expected_avg"), KERAS_SAME_CASES)
def test_same_padding_matches_keras(
    x: list, k: int, s: int, expected_max: list, expected_avg: list
) -> None:
    image = np.array(x, dtype=np.float64)[:, :, None]  # (H, W, C=1), Keras's layout
    y_max = ref.max_pool2d(image, k, s, "same", layout="HWC")
    y_avg = ref.avg_pool2d(image, k, s, "same", layout="HWC")
    np.testing.assert_array_equal(y_max[:, :, 0], expected_max)
    np.testing.assert_allclose(y_avg[:, :, 0], expected_avg, rtol=1e-15)
    # count_include_pad has no say: "same" never counts padding
    np.testing.assert_array_equal(
        ref.avg_pool2d(image, k, s, "same", count_include_pad=False, layout="HWC"), y_avg
    )


# ----------------------------------------------------------------------------- seed examples


def test_max_pool_2x2_halves_and_keeps_each_window_max(rng: np.random.Generator) -> None:
    x = rng.standard_normal((2, 3, 6, 8))
    y = ref.max_pool2d(x, 2, 2)
    assert y.shape == (2, 3, 3, 4)
    np.testing.assert_array_equal(y, x.reshape(2, 3, 3, 2, 4, 2).max(axis=(3, 5)))


def test_avg_pool_2x2_keeps_each_window_mean(rng: np.random.Generator) -> None:
    x = rng.standard_normal((2, 3, 6, 8))
    y = ref.avg_pool2d(x, 2)
    assert y.shape == (2, 3, 3, 4)
    np.testing.assert_allclose(y, x.reshape(2, 3, 3, 2, 4, 2).mean(axis=(3, 5)), rtol=1e-14)


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), c=st.integers(1, 5), seed=st.integers(0, 2**32))
def test_gap_turns_hwc_into_channel_means(h: int, w: int, c: int, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((h, w, c))
    y = ref.global_avg_pool2d(x, layout="HWC")
    assert y.shape == (c,)
    np.testing.assert_allclose(y, x.mean(axis=(0, 1)), rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- ties and NaN

NAN = math.nan


def test_max_pool_ties_go_to_the_first_max(rng: np.random.Generator) -> None:
    x = np.array([[[[1.0, 7.0, 7.0, 2.0], [7.0, 3.0, 7.0, 7.0]]]])  # two 2x2 windows
    y, index = ref.max_pool2d(x, 2, return_indices=True)
    np.testing.assert_array_equal(y, [[[[7.0, 7.0]]]])
    np.testing.assert_array_equal(index, [[[[1, 2]]]])  # first 7 of each window, row-major
    grad = ref.max_pool2d_backward(np.array([[[[10.0, 20.0]]]]), x, 2)
    np.testing.assert_array_equal(grad, [[[[0, 10, 20, 0], [0, 0, 0, 0]]]])
    check_against_torch(rng, "max_pool2d", x, kernel_size=2, return_indices=True)


def test_max_pool_nan_gives_nan_and_the_last_nan(rng: np.random.Generator) -> None:
    x = np.array([[[[NAN, 1.0, 5.0, NAN], [2.0, NAN, NAN, 3.0]]]])
    y, index = ref.max_pool2d(x, 2, return_indices=True)
    assert np.isnan(y).all()
    np.testing.assert_array_equal(index, [[[[5, 6]]]])  # h*W + w of each window's last NaN
    grad = ref.max_pool2d_backward(np.array([[[[10.0, 20.0]]]]), x, 2)
    np.testing.assert_array_equal(grad, [[[[0, 0, 0, 0], [0, 10, 20, 0]]]])
    check_against_torch(rng, "max_pool2d", x, kernel_size=2, return_indices=True)


def test_adaptive_and_global_max_ties_and_nan(rng: np.random.Generator) -> None:
    ties = np.array([[[[3.0, 9.0, 9.0, 1.0], [9.0, 2.0, 9.0, 0.0]]]])
    nans = np.array([[[[3.0, NAN, 9.0, 1.0], [9.0, 2.0, NAN, 0.0]]]])
    assert ref.adaptive_max_pool2d(ties, (1, 2), return_indices=True)[1].tolist() == [[[[1, 2]]]]
    assert ref.adaptive_max_pool2d(nans, 1, return_indices=True)[1].tolist() == [[[[6]]]]
    np.testing.assert_array_equal(
        ref.global_max_pool2d_backward(np.array([[5.0]]), ties), [[[[0, 5, 0, 0], [0, 0, 0, 0]]]]
    )
    assert np.isnan(ref.global_max_pool2d(nans)).all()
    np.testing.assert_array_equal(
        ref.global_max_pool2d_backward(np.array([[5.0]]), nans), [[[[0, 0, 0, 0], [0, 0, 5, 0]]]]
    )


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("max_pool2d", {"kernel_size": 3, "stride": 1, "padding": 1, "return_indices": True}),
        ("max_pool2d", {"kernel_size": 2, "stride": 2, "dilation": 2, "return_indices": True}),
        ("adaptive_max_pool2d", {"output_size": (3, 4), "return_indices": True}),
        ("global_pool2d", {"kind": "max"}),
        ("global_pool2d", {"kind": "avgmax"}),
        ("global_pool2d", {"kind": "catavgmax"}),
    ],
)
def test_ties_and_nan_match_torch(name: str, kwargs: dict, rng: np.random.Generator) -> None:
    # Few distinct values: most windows hold ties, many hold one or more NaNs.
    x = rng.choice([0.0, 1.0, 2.0, NAN], size=(2, 3, 7, 7), p=[0.3, 0.3, 0.3, 0.1])
    for layout in ("NCHW", "HWC"):
        check_against_torch(rng, name, x[:1] if layout == "HWC" else x, layout, **kwargs)


def test_max_pool_of_only_minus_inf_points_at_the_first_real_cell(
    rng: np.random.Generator,
) -> None:
    x = np.full((1, 1, 3, 3), -np.inf)
    _, index = ref.max_pool2d(x, 3, 2, 1, return_indices=True)
    np.testing.assert_array_equal(index, [[[[0, 1], [3, 4]]]])
    check_against_torch(rng, "max_pool2d", x, kernel_size=3, stride=2, padding=1)


# ----------------------------------------------------------------------------- empty batch


@pytest.mark.parametrize(
    ("name", "kwargs", "out_shape"),
    [
        ("max_pool2d", {"kernel_size": 2, "return_indices": True}, (0, 2, 3, 3)),
        ("avg_pool2d", {"kernel_size": 3, "stride": 1, "padding": "same"}, (0, 5, 6, 3)),
        ("adaptive_avg_pool2d", {"output_size": (2, 4)}, (0, 2, 4, 3)),
        ("adaptive_max_pool2d", {"output_size": 1, "return_indices": True}, (0, 1, 1, 3)),
        ("global_pool2d", {"kind": "catavgmax"}, (0, 6)),
        ("global_pool2d", {"kind": "gem", "keepdim": True}, (0, 1, 1, 3)),
    ],
)
def test_empty_batch(name: str, kwargs: dict, out_shape: tuple, rng: np.random.Generator) -> None:
    x = rng.standard_normal((0, 3, 5, 6))
    out = getattr(ref, name)(to_layout(x, "NHWC"), layout="NHWC", **kwargs)
    y = out[0] if kwargs.get("return_indices") else out
    assert y.shape == out_shape
    check_against_torch(rng, name, x, "NHWC", **kwargs)


# ----------------------------------------------------------------------------- bad input


BAD_CALLS = [  # (call on a (2, 3, 5, 5) input x, error type, regex the message must match)
    # wrong rank for the layout
    pytest.param(
        lambda x: ref.max_pool2d(x[0], 2), ValueError, "layout='NCHW' expects a 4-d", id="rank"
    ),
    pytest.param(
        lambda x: ref.global_avg_pool2d(x, layout="HWC"),
        ValueError,
        "layout='HWC' expects a 3-d",
        id="rank-hwc",
    ),
    # unknown layout
    pytest.param(
        lambda x: ref.avg_pool2d(x, 2, layout="NWHC"),
        ValueError,
        "layout must be one of .* got 'NWHC'",
        id="layout",
    ),
    # unknown kind
    pytest.param(
        lambda x: ref.global_pool2d(x, "median"),
        ValueError,
        "kind must be one of .* got 'median'",
        id="kind",
    ),
    # kernel, stride or dilation < 1
    pytest.param(
        lambda x: ref.max_pool2d(x, 0), ValueError, "kernel_size must be >= 1, got 0", id="kernel"
    ),
    pytest.param(
        lambda x: ref.avg_pool2d(x, 2, (1, 0)),
        ValueError,
        r"stride must be >= 1, got \(1, 0\)",
        id="stride",
    ),
    pytest.param(
        lambda x: ref.max_pool2d(x, 2, dilation=0),
        ValueError,
        "dilation must be >= 1, got 0",
        id="dilation",
    ),
    # a kernel that is not an int or a pair of ints
    pytest.param(
        lambda x: ref.max_pool2d(x, 2.0),
        TypeError,
        "kernel_size must be an int or a pair",
        id="kernel-type",
    ),
    # too much padding, negative padding
    pytest.param(
        lambda x: ref.max_pool2d(x, 3, padding=2),
        ValueError,
        "padding must be at most half of kernel_size",
        id="padding",
    ),
    pytest.param(
        lambda x: ref.avg_pool2d(x, 3, padding=-1),
        ValueError,
        "padding must be >= 0, got -1",
        id="padding-negative",
    ),
    # a padding string other than "valid" and "same"
    pytest.param(
        lambda x: ref.avg_pool2d(x, 3, padding="full"),
        ValueError,
        "padding must be .* got 'full'",
        id="padding-string",
    ),
    # "same" with ceil_mode
    pytest.param(
        lambda x: ref.max_pool2d(x, 3, padding="same", ceil_mode=True),
        ValueError,
        "ceil_mode",
        id="same-ceil",
    ),
    # an output that would be empty
    pytest.param(
        lambda x: ref.max_pool2d(x, 6), ValueError, "output would be empty", id="empty-output"
    ),
    pytest.param(
        lambda x: ref.global_pool2d(x[:, :, :0]),
        ValueError,
        "H and W must be >= 1",
        id="empty-plane",
    ),
    # a window made only of padding (dilation steps over the 2x2 input)
    pytest.param(
        lambda x: ref.max_pool2d(x[:, :, :2, :2], 2, 1, 1, 3),
        ValueError,
        "only padding",
        id="padding-window",
    ),
    # adaptive output size < 1
    pytest.param(
        lambda x: ref.adaptive_avg_pool2d(x, (2, 0)),
        ValueError,
        "output_size must be >= 1",
        id="output-size",
    ),
    # integer and bool input
    pytest.param(
        lambda x: ref.max_pool2d(x.astype(np.int64), 2),
        TypeError,
        "floating-point input .* got int64",
        id="int",
    ),
    pytest.param(
        lambda x: ref.global_pool2d(x > 0), TypeError, "floating-point input .* got bool", id="bool"
    ),
    pytest.param(
        lambda x: ref.avg_pool2d_backward(
            np.ones((2, 3, 2, 2)), np.ones((2, 3, 5, 5), np.int32), 2
        ),
        TypeError,
        "got int32",
        id="int-backward",
    ),
    # GeM's p <= 0 and eps <= 0
    pytest.param(
        lambda x: ref.global_pool2d(x, "gem", p=0.0),
        ValueError,
        "p must be > 0, got 0.0",
        id="p-zero",
    ),
    pytest.param(
        lambda x: ref.global_pool2d(x, "gem", p=-2.0),
        ValueError,
        "p must be > 0, got -2.0",
        id="p-negative",
    ),
    pytest.param(
        lambda x: ref.global_pool2d_backward(np.ones((2, 3)), x, "gem", p=0.0),
        ValueError,
        "p must be > 0",
        id="p-backward",
    ),
    pytest.param(
        lambda x: ref.global_pool2d(x, "gem", eps=0.0),
        ValueError,
        "eps must be > 0, got 0.0",
        id="eps",
    ),
    # divisor_override of 0 or not an int
    pytest.param(
        lambda x: ref.avg_pool2d(x, 2, divisor_override=0),
        ValueError,
        "divisor_override must be nonzero",
        id="divisor-zero",
    ),
    pytest.param(
        lambda x: ref.avg_pool2d(x, 2, divisor_override=2.5),
        TypeError,
        "divisor_override must be an int",
        id="divisor-type",
    ),
    # a grad_out that is not shaped as the output
    pytest.param(
        lambda x: ref.max_pool2d_backward(np.ones((2, 3, 3, 3)), x, 2),
        ValueError,
        "grad_out must have the output's shape",
        id="grad-shape",
    ),
    pytest.param(
        lambda x: ref.global_pool2d_backward(np.ones((2, 3)), x, "catavgmax"),
        ValueError,
        r"grad_out .* \(2, 6\)",
        id="grad-shape-global",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_CALLS)
def test_bad_input_raises(call: Any, error: type, match: str, rng: np.random.Generator) -> None:
    x = rng.standard_normal((2, 3, 5, 5))
    with pytest.raises(error, match=match):
        call(x)


# ----------------------------------------------------------------------------- the module


def test_imports_only_numpy_and_shapes() -> None:
    # `import gapnet` loads torch (functional, nn), so the rule is checked on the source itself.
    tree = ast.parse(Path(ref.__file__).read_text())
    imported = {
        name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for name in (
            [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
        )
    }
    assert imported <= {"__future__", "typing", "numpy", "gapnet", "gapnet._shapes"}, imported
