"""Triton max/avg pooling kernels against float64 references, forward and backward.

On CPU these run under TRITON_INTERPRET=1 (set by conftest.py) on small shapes; with a GPU the
same tests run on CUDA, plus a few real-sized shapes. Every output the kernels allocate is
poisoned (NaN, or an impossible tap/index), and forward outputs go through a NaN-filled `out=`,
so an element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from cases import AVG_POOL_CASES, MAX_POOL_CASES, Case
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gapnet import _shapes, kernels, reference
from gapnet.kernels import window_pool as wp

pytestmark = [pytest.mark.triton]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (rtol, atol) against float64 on the same (rounded) input: float32 sums of a few terms, then
# one rounding to the output dtype. Max outputs and indices are compared exactly.
TOL = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (1e-2, 1e-3),
}
GEOMETRY = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Fill every tensor the launchers allocate with a value no kernel should leave behind."""
    empty_like_format, empty_strided = wp.empty_like_format, wp._empty_strided

    def poisoned_like(x, shape, dtype):
        return empty_like_format(x, shape, dtype).fill_(float("nan"))

    def poisoned_strided(shape, strides, dtype, device):
        out = empty_strided(shape, strides, dtype, device)
        return out.fill_(255 if dtype == torch.uint8 else -1)  # no window has tap 255 here

    monkeypatch.setattr(wp, "empty_like_format", poisoned_like)
    monkeypatch.setattr(wp, "_empty_strided", poisoned_strided)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, seed, channels_last=False) -> torch.Tensor:
    x = torch.randn(shape, generator=_gen(seed), dtype=torch.float64).to(DEVICE, dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _nan_like(shape, x: torch.Tensor) -> torch.Tensor:
    """A NaN-filled `out=` in x's memory format."""
    fmt = torch.channels_last if kernels.is_channels_last(x) else torch.contiguous_format
    return torch.full(shape, float("nan"), dtype=x.dtype, device=x.device).contiguous(
        memory_format=fmt
    )


def _window(op: str, x: torch.Tensor, kwargs: dict) -> _shapes.Window2d:
    geometry = {k: v for k, v in kwargs.items() if k in GEOMETRY}
    return _shapes.window2d(op, tuple(x.shape[2:]), **geometry)


def _np64(t: torch.Tensor):
    return t.detach().double().cpu().numpy()


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same layout: equal strides on every axis longer than 1 (others' strides mean nothing)."""
    assert a.shape == b.shape
    assert [s for s, n in zip(a.stride(), a.shape, strict=True) if n > 1] == [
        s for s, n in zip(b.stride(), b.shape, strict=True) if n > 1
    ], (a.stride(), b.stride())


def _same_format(result: torch.Tensor, x: torch.Tensor) -> None:
    """Outputs follow the input's memory format, as PyTorch's pools."""
    if kernels.is_channels_last(x):
        assert result.is_contiguous(memory_format=torch.channels_last), result.stride()
    else:
        assert result.is_contiguous(), result.stride()


def _max_reference(x: torch.Tensor, grad: torch.Tensor, kwargs: dict):
    """float64 (y, flat indices, grad_x): the NumPy spec, or PyTorch's float64 autograd for
    real-sized shapes on a GPU (integer padding only)."""
    if x.numel() <= 200_000:
        y, idx = reference.max_pool2d(_np64(x), **kwargs, return_indices=True)
        gx = reference.max_pool2d_backward(_np64(grad), _np64(x), **kwargs)
        return torch.from_numpy(y), torch.from_numpy(idx), torch.from_numpy(gx)
    x64 = x.detach().double().requires_grad_(True)
    y, idx = F.max_pool2d(x64, **kwargs, return_indices=True)
    (gx,) = torch.autograd.grad(y, x64, grad.double())
    return y.detach(), idx, gx


def _avg_reference(x: torch.Tensor, grad: torch.Tensor, kwargs: dict):
    if x.numel() <= 200_000:
        y = reference.avg_pool2d(_np64(x), **kwargs)
        gx = reference.avg_pool2d_backward(_np64(grad), _np64(x), **kwargs)
        return torch.from_numpy(y), torch.from_numpy(gx)
    x64 = x.detach().double().requires_grad_(True)
    y = F.avg_pool2d(x64, **kwargs)
    (gx,) = torch.autograd.grad(y, x64, grad.double())
    return y.detach(), gx


def check_max(x: torch.Tensor, kwargs: dict, seed: int = 0, inference: bool = True) -> None:
    """max_pool2d_forward (y, offsets, indices) and max_pool2d_backward on x against float64."""
    win = _window("max_pool2d", x, kwargs)
    n, c, _, w = x.shape
    oh, ow = win.out_size
    out = _nan_like((n, c, oh, ow), x)
    y, offsets, indices = wp.max_pool2d_forward(
        x, win, need_offsets=True, return_indices=True, out=out
    )
    assert y is out
    grad = _randn(y.shape, x.dtype, seed + 1)
    ref_y, ref_idx, ref_gx = _max_reference(x, grad, kwargs)
    # The maximum is one of the inputs: exact, NaN where the window holds one.
    torch.testing.assert_close(y.double().cpu(), ref_y.cpu(), rtol=0, atol=0, equal_nan=True)
    assert indices is not None and offsets is not None
    assert indices.dtype == torch.int64 and indices.stride() == y.stride()
    assert torch.equal(indices.cpu(), ref_idx.cpu())
    # The saved tap a*KW + b names the same input cell as PyTorch's index.
    assert offsets.dtype == kernels.offsets_dtype(win) and offsets.stride() == y.stride()
    (kh, kw), (sh, sw), (dh, dw) = win.kernel, win.stride, win.dilation
    tap = offsets.long().cpu()
    rows = (
        torch.arange(oh).view(-1, 1) * sh
        - win.pad_before[0]
        + tap.div(kw, rounding_mode="floor") * dh
    )
    cols = torch.arange(ow) * sw - win.pad_before[1] + tap.remainder(kw) * dw
    assert bool((tap < kh * kw).all())
    assert torch.equal(rows * w + cols, ref_idx.cpu())
    _same_format(y, x)
    if inference:  # the path without offsets or indices computes the same maximum
        y2, none1, none2 = wp.max_pool2d_forward(x, win, need_offsets=False, return_indices=False)
        assert none1 is None and none2 is None
        torch.testing.assert_close(y2, y, rtol=0, atol=0, equal_nan=True)
        _same_format(y2, x)
    gx = wp.max_pool2d_backward(grad, offsets, x, win)
    assert gx.dtype == x.dtype
    _same_strides(gx, x)
    _close(gx, ref_gx, x.dtype)


def check_avg(x: torch.Tensor, kwargs: dict, seed: int = 0) -> None:
    """avg_pool2d_forward and avg_pool2d_backward on x against float64."""
    win = _window("avg_pool2d", x, kwargs)
    cip = kwargs.get("count_include_pad", True)
    div = kwargs.get("divisor_override")
    n, c = x.shape[:2]
    out = _nan_like((n, c, *win.out_size), x)
    y = wp.avg_pool2d_forward(x, win, cip, div, out=out)
    assert y is out
    grad = _randn(y.shape, x.dtype, seed + 1)
    ref_y, ref_gx = _avg_reference(x, grad, kwargs)
    _close(y, ref_y, x.dtype)
    _same_format(y, x)
    gx = wp.avg_pool2d_backward(grad, x, win, cip, div)
    assert gx.dtype == x.dtype
    _same_strides(gx, x)
    _close(gx, ref_gx, x.dtype)


def _dtype_of(i: int) -> torch.dtype:
    """Rotate the dtypes over a case table: every dtype meets every kind of row, in ~1/3 of
    the interpreter time of the full product."""
    return DTYPES[i % len(DTYPES)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(
    ("i", "case"), list(enumerate(MAX_POOL_CASES)), ids=[str(c) for c in MAX_POOL_CASES]
)
def test_max_pool_cases(i: int, case: Case, channels_last: bool):
    # N = 2, C = 3: several planes per program (planar), a partial channel block (channels_last)
    x = _randn((2, 3, *case.hw), _dtype_of(i + channels_last), i, channels_last)
    check_max(x, case.kwargs, seed=i, inference=i % 4 == 0)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(
    ("i", "case"), list(enumerate(AVG_POOL_CASES)), ids=[str(c) for c in AVG_POOL_CASES]
)
def test_avg_pool_cases(i: int, case: Case, channels_last: bool):
    x = _randn((2, 3, *case.hw), _dtype_of(i + channels_last), 100 + i, channels_last)
    check_avg(x, case.kwargs, seed=i)


def _values(row) -> tuple:
    """(shape, kwargs) of a case row, plain or wrapped in pytest.param."""
    return tuple(row.values) if hasattr(row, "values") else row


# Rows the shared case tables leave out, (N, C, H, W) and the op's arguments.
EXTRA_MAX = [
    # a 2x3 kernel with stride (1, 3): columns have 3 phases (the generic backward path)
    ((2, 3, 7, 11), {"kernel_size": (2, 3), "stride": (1, 3), "padding": (1, 1)}),
    # a dilated 3x3 (d=2) with stride 3 and padding: taps land on every third cell only
    ((1, 2, 11, 12), {"kernel_size": 3, "stride": 3, "padding": 1, "dilation": 2}),
    # stride 3 with padding pairs in ceil_mode, windows run past the padding
    ((2, 2, 10, 8), {"kernel_size": (3, 2), "stride": 3, "padding": (1, 1), "ceil_mode": True}),
    # wider than one column tile (planar): 150 columns, several row tiles
    ((1, 2, 20, 150), {"kernel_size": 3, "stride": 2, "padding": 1}),
    # many small planes in one program (planar), C = 37 fits no block
    ((3, 37, 4, 4), {"kernel_size": 2}),
    # 17x17 window: 289 taps do not fit a uint8 offset, so int16 is saved. The taps unroll, and
    # Triton 3.6 takes minutes to compile that: interpreter only.
    pytest.param(
        (1, 2, 17, 18),
        {"kernel_size": 17, "stride": 1},
        marks=pytest.mark.skipif(DEVICE == "cuda", reason="minutes of compile on a GPU"),
    ),
]
EXTRA_AVG = [
    # a 2x3 kernel with stride (1, 3) and per-axis padding
    ((2, 3, 7, 11), {"kernel_size": (2, 3), "stride": (1, 3), "padding": (1, 1)}),
    # stride 3 in ceil_mode with padding: the count clips at the padded edge, not counted
    (
        (2, 2, 10, 8),
        {
            "kernel_size": 3,
            "stride": 3,
            "padding": 1,
            "ceil_mode": True,
            "count_include_pad": False,
        },
    ),
    # many small planes in one program, C = 37
    ((3, 37, 4, 4), {"kernel_size": 2, "count_include_pad": False}),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(
    ("shape", "kwargs"), EXTRA_MAX, ids=[f"{s}-{k}" for s, k in map(_values, EXTRA_MAX)]
)
def test_max_pool_extra(shape, kwargs, channels_last):
    check_max(_randn(shape, torch.float32, sum(shape), channels_last), kwargs)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(("shape", "kwargs"), EXTRA_AVG, ids=[str(k) for _, k in EXTRA_AVG])
def test_avg_pool_extra(shape, kwargs, channels_last):
    check_avg(_randn(shape, torch.bfloat16, sum(shape), channels_last), kwargs)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_channels_last_two_channel_blocks(channels_last):
    # C = 130: two channel blocks of 128, the second holding 2 (channels_last); in NCHW many
    # planes per program
    x = _randn((1, 130, 5, 6), torch.float16, 7, channels_last)
    check_max(x, {"kernel_size": 3, "stride": 2, "padding": 1})
    check_avg(x, {"kernel_size": 3, "stride": 1, "padding": 1})


def _dilated_avg_reference(x64: torch.Tensor, win: _shapes.Window2d, cip: bool):
    """Sum over the real taps of each (dilated) window, over Window2d.divisors: avg_pool2d has
    no dilation in PyTorch, so the windows are unfolded from a zero-padded input."""
    (pt, pl), (pb, pr) = win.pad_before, win.pad_after
    padded = F.pad(x64, (pl, pr, pt, pb))
    n, c = x64.shape[:2]
    cols = F.unfold(padded.flatten(0, 1)[:, None], win.kernel, win.dilation, 0, win.stride)
    sums = cols.sum(1).view(n, c, *win.out_size)
    rows = torch.tensor(win.divisors(cip, 0), dtype=torch.float64)
    colc = torch.tensor(win.divisors(cip, 1), dtype=torch.float64)
    return sums / torch.outer(rows, colc)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(
    ("padding", "cip"),
    [
        (1, True),  # padding counted, the window clipped at the padded edge
        ("same", False),  # Keras "same" over a dilated window: real cells only
    ],
)
def test_avg_pool_dilated(padding, cip, channels_last):
    # Window2d allows dilation for averages too (the kernels implement whatever it resolves)
    x = _randn((2, 3, 9, 8), torch.float32, 11, channels_last)
    win = _shapes.window2d("avg_pool2d", (9, 8), 3, 2, padding, 2, False)
    y = wp.avg_pool2d_forward(x, win, cip, None, out=_nan_like((2, 3, *win.out_size), x))
    x64 = x.detach().double().cpu().requires_grad_(True)
    ref = _dilated_avg_reference(x64, win, cip)
    _close(y, ref, x.dtype)
    grad = _randn(y.shape, x.dtype, 12)
    (ref_gx,) = torch.autograd.grad(ref, x64, grad.double().cpu())
    _close(wp.avg_pool2d_backward(grad, x, win, cip, None), ref_gx, x.dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_ties_nan_and_minus_inf(dtype, channels_last):
    """Ties go to the first maximum, a NaN wins (the last NaN of a window), and a window whose
    real cells are all -inf points at its first real cell, as PyTorch's scan."""
    shape = (2, 3, 9, 10)
    x = torch.randint(0, 3, shape, generator=_gen(5)).double()  # three values: many ties
    x[0, 0, 1, 1] = x[0, 0, 2, 2] = x[1, 2, 5, 3] = float("nan")  # two NaNs share a window
    x[0, 1, :4, :4] = float("-inf")  # padded border windows of only -inf
    x[1, 1] = float("-inf")  # a whole plane
    x = x.to(DEVICE, dtype)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    for kwargs in (
        {"kernel_size": 3, "stride": 2, "padding": 1},  # the stem pool, overlapping windows
        {"kernel_size": 3, "stride": 1, "padding": 1, "dilation": 2},  # every cell in 9 windows
    ):
        check_max(x, kwargs)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_backward_is_deterministic(channels_last):
    # k3 s1: every cell sums up to 9 gradients, the case where atomics would reorder sums
    x = _randn((2, 4, 10, 9), torch.float16, 21, channels_last)
    win = _shapes.window2d("max_pool2d", (10, 9), 3, 1, 1)
    y, offsets, _ = wp.max_pool2d_forward(x, win, need_offsets=True, return_indices=False)
    grad = _randn(y.shape, x.dtype, 22)
    first = wp.max_pool2d_backward(grad, offsets, x, win)
    assert torch.equal(first, wp.max_pool2d_backward(grad, offsets, x, win))
    first = wp.avg_pool2d_backward(grad, x, win, False, None)
    assert torch.equal(first, wp.avg_pool2d_backward(grad, x, win, False, None))


def test_strided_input_and_expanded_grad():
    """Neither NCHW- nor channels_last-contiguous: a sliced, transposed view is read through its
    strides (no copy), the output is NCHW-contiguous; grad_y may be an expanded tensor."""
    base = _randn((2, 5, 14, 12), torch.float32, 31)
    x = base[:, 1:4, ::2, 1:].transpose(2, 3)  # (2, 3, 11, 7), strides (840, 168, 1, 24)
    assert not x.is_contiguous() and not kernels.is_channels_last(x)
    win = _shapes.window2d("max_pool2d", (11, 7), 3, 2, 1)
    y, offsets, _ = wp.max_pool2d_forward(x, win, need_offsets=True, return_indices=False)
    grad = _randn((2, 3, 1, win.out_size[1]), torch.float32, 32).expand(y.shape)  # stride 0
    ref_y, _, ref_gx = _max_reference(x, grad, {"kernel_size": 3, "stride": 2, "padding": 1})
    torch.testing.assert_close(y.double().cpu(), ref_y, rtol=0, atol=0)
    assert y.is_contiguous()
    gx = wp.max_pool2d_backward(grad, offsets, x, win)
    assert gx.is_contiguous()
    _close(gx, ref_gx, x.dtype)
    ya = wp.avg_pool2d_forward(x, win, True, None)
    ref_ya, ref_gxa = _avg_reference(x, grad, {"kernel_size": 3, "stride": 2, "padding": 1})
    _close(ya, ref_ya, x.dtype)
    _close(wp.avg_pool2d_backward(grad, x, win, True, None), ref_gxa, x.dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_empty_batch(channels_last):
    x = _randn((0, 3, 8, 8), torch.float32, 0, channels_last)
    win = _shapes.window2d("max_pool2d", (8, 8), 2)
    y, offsets, indices = wp.max_pool2d_forward(x, win, need_offsets=True, return_indices=True)
    assert y.shape == offsets.shape == indices.shape == (0, 3, 4, 4)
    assert wp.max_pool2d_backward(y, offsets, x, win).shape == x.shape
    assert wp.avg_pool2d_forward(x, win, True, None).shape == (0, 3, 4, 4)
    assert wp.avg_pool2d_backward(y, x, win, True, None).shape == x.shape


def test_grid_split_along_axis_2(monkeypatch):
    # CUDA caps grid axis 2 at 65535: _launch slices taller grids; a cap of 2 exercises it here
    monkeypatch.setattr(wp, "_MAX_GRID_Z", 2)
    check_max(_randn((5, 3, 6, 6), torch.float32, 41), {"kernel_size": 3, "stride": 2})
    check_avg(_randn((3, 2, 6, 6), torch.float32, 42, True), {"kernel_size": 2})


def test_rejects_other_dtypes_and_bad_out():
    win = _shapes.window2d("max_pool2d", (4, 4), 2)
    x64 = torch.randn(1, 1, 4, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        wp.max_pool2d_forward(x64, win, need_offsets=False, return_indices=False)
    with pytest.raises(TypeError, match="float64"):
        wp.avg_pool2d_forward(x64, win, True, None)
    x = x64.float()
    with pytest.raises(ValueError, match="out must be"):
        wp.avg_pool2d_forward(x, win, True, None, out=torch.empty(1, 1, 3, 3, device=DEVICE))


@st.composite
def geometries(draw, op: str):
    """Random (shape, kwargs) with a valid window; "same" or PyTorch-style integer padding."""
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2))) if op == "max" else (1, 1)
    if draw(st.booleans()):
        padding: object = "same"
        ceil_mode = False
    else:
        padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
        ceil_mode = draw(st.booleans())
    hw = (draw(st.integers(1, 10)), draw(st.integers(1, 10)))
    kwargs = {"kernel_size": kernel, "stride": stride, "padding": padding, "ceil_mode": ceil_mode}
    if op == "max":
        kwargs["dilation"] = dilation
    else:
        kwargs["count_include_pad"] = draw(st.booleans())
        if draw(st.integers(0, 3)) == 0:
            kwargs["divisor_override"] = draw(st.integers(1, 7))
    try:
        _shapes.window2d(op, hw, kernel, stride, padding, dilation, ceil_mode)
    except ValueError:
        assume(False)
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 4)), *hw)
    return shape, kwargs


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(geometries("max"), st.booleans(), st.integers(0, 2**16))
def test_random_max_geometries(geometry, channels_last, seed):
    shape, kwargs = geometry
    check_max(_randn(shape, torch.float32, seed, channels_last), kwargs, seed, inference=False)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(geometries("avg"), st.booleans(), st.integers(0, 2**16))
def test_random_avg_geometries(geometry, channels_last, seed):
    shape, kwargs = geometry
    check_avg(_randn(shape, torch.float32, seed, channels_last), kwargs, seed)


# Real-sized shapes, CUDA only (float64 PyTorch on the GPU is the reference).
REAL = [
    # ResNet stem max pool (a batch slice)
    ("max", (4, 64, 112, 112), {"kernel_size": 3, "stride": 2, "padding": 1}),
    # VGG-style 2x2 max pool
    ("max", (2, 128, 112, 112), {"kernel_size": 2, "stride": 2}),
    # Inception-style 3x3 stride-1 average
    ("avg", (2, 256, 56, 56), {"kernel_size": 3, "stride": 1, "padding": 1}),
    # DenseNet transition 2x2 average
    ("avg", (2, 256, 56, 56), {"kernel_size": 2, "stride": 2}),
    # ResNet-50 head size map with a 3x3 max (many small planes)
    ("max", (8, 2048, 7, 7), {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}),
]


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("op", "shape", "kwargs"), REAL, ids=[f"{o}{s}" for o, s, _ in REAL])
def test_real_shapes_cuda(op, shape, kwargs, dtype, channels_last):
    x = _randn(shape, dtype, 1, channels_last)
    if op == "max":
        check_max(x, kwargs, inference=True)
    else:
        check_avg(x, kwargs)
