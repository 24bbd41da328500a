"""gapnet._strided (pools composed from strided views) against PyTorch's own pools.

float64 throughout unless a test says otherwise: values and indices must equal PyTorch's,
gradients match to rounding (overlapping windows add in another order). Every case also runs
with a tiny block size, so that the CPU cache blocking splits the planes into many blocks, and
on channels_last inputs. Outputs are poisoned: every buffer the module allocates starts as NaN
(or a nonsense integer), so an element a pass forgets to write shows.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from cases import AVG_POOL_CASES, MAX_POOL_CASES, Case
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gapnet import _cpu_kernels as cpu_kernels
from gapnet import _strided
from gapnet import functional as GF
from gapnet._shapes import Window2d, window2d

# Rows the shared tables lack, for what is particular to composing pools from strided views.
STRIDED_MAX_CASES = [
    # dilation 2 over padding 1: on both axes no one tap is in bounds for every output, so the
    # max starts from -inf instead of a copy
    Case((3, 3), {"kernel_size": 2, "stride": 1, "padding": 1, "dilation": 2}),
    # 3x3 kernel, padding 1, on a single row: only the middle row tap is real
    Case((1, 4), {"kernel_size": 3, "stride": 1, "padding": 1}),
    # disjoint windows that tile the input exactly: the backward writes without a zero fill
    Case((6, 9), {"kernel_size": (2, 3)}),
    # stride 3 with a 2x3 kernel, padding on the columns only
    Case((10, 11), {"kernel_size": (2, 3), "stride": 3, "padding": (0, 1)}),
    # stride 1, padding 1: every cell is in 9 windows (the late-stage 3x3 pool)
    Case((7, 7), {"kernel_size": 3, "stride": 1, "padding": 1}),
    # a 1x1 input and kernel
    Case((1, 1), {"kernel_size": 1}),
    # a row kernel (1x3): the row pass is a view, no intermediate
    Case((5, 9), {"kernel_size": (1, 3), "stride": (1, 2), "padding": (0, 1)}),
    # a column kernel (3x1): the column pass is a view
    Case((9, 5), {"kernel_size": (3, 1), "stride": (2, 1), "padding": (1, 0)}),
    # a wide dilated kernel with ceil_mode: taps that lie in the padding for every output
    Case((6, 13), {"kernel_size": (2, 4), "stride": 2, "padding": (1, 2), "dilation": (2, 3),
                   "ceil_mode": True}),
]  # fmt: skip

STRIDED_AVG_CASES = [
    # a column kernel (3x1): the column pass is a view, the rows go second
    Case((9, 4), {"kernel_size": (3, 1), "stride": (2, 1), "padding": (1, 0)}),
    # a row kernel (1x3) with stride 2 and padding
    Case((5, 9), {"kernel_size": (1, 3), "stride": (1, 2), "padding": (0, 1)}),
    # stride 1, padding 1, padded cells not counted (Inception's branch pool)
    Case((7, 7), {"kernel_size": 3, "stride": 1, "padding": 1, "count_include_pad": False}),
    # disjoint windows that tile the input: the backward writes without a zero fill
    Case((6, 9), {"kernel_size": (2, 3)}),
    # gaps between windows and a partial last one
    Case((10, 11), {"kernel_size": 2, "stride": 3, "ceil_mode": True}),
]

BLOCKS = [_strided._BLOCK_BYTES, 1]  # default; one plane (or image) per block

# How the module runs: (block bytes, max backward by flat index, worker threads, compiled
# kernel). "default" runs NCHW float32/float64 max pools in the compiled C where it builds
# (`gapnet._cpu_kernels`); the others run strided views only. "by-tap" is the backward that
# devices other than the CPU take, run here with one plane per block in the calling thread, as
# where no OpenMP runtime is found; "blocked" spreads one-plane blocks over the worker threads.
VARIANTS = {
    "default": (BLOCKS[0], True, True, True),
    "blocked": (1, True, True, False),
    "by-tap": (1, False, False, False),
}


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Every output and intermediate buffer of the module starts as garbage, not zeros."""
    empty = _strided.empty

    def poisoned_empty(shape, dtype, device, channels_last):
        t = empty(shape, dtype, device, channels_last)
        if dtype.is_floating_point:
            return t.fill_(math.nan)
        return t.fill_(True if dtype == torch.bool else 77)

    def poisoned_like(x4, shape, dtype):
        return poisoned_empty(shape, dtype, x4.device, _strided.is_channels_last(x4))

    monkeypatch.setattr(_strided, "empty", poisoned_empty)
    monkeypatch.setattr(_strided, "empty_like_format", poisoned_like)


def _set_variant(block_bytes: int, by_index: bool, workers: bool, compiled: bool) -> tuple:
    """Switch the module to a variant; returns what to pass back to restore it."""
    switch = cpu_kernels.ENV_SWITCH
    old = (_strided._BLOCK_BYTES, _strided._by_indices, _strided._pool, os.environ.get(switch))
    _strided._BLOCK_BYTES = block_bytes
    _strided._by_indices = lambda t: by_index
    if not workers:
        _strided._pool = lambda: None
    if not compiled:
        os.environ[switch] = "0"
    return old


def _restore(old: tuple) -> None:
    _strided._BLOCK_BYTES, _strided._by_indices, _strided._pool, switch = old
    if switch is None:
        os.environ.pop(cpu_kernels.ENV_SWITCH, None)
    else:
        os.environ[cpu_kernels.ENV_SWITCH] = switch


@pytest.fixture(params=list(VARIANTS))
def variant(request):
    old = _set_variant(*VARIANTS[request.param])
    yield request.param
    _restore(old)


@pytest.fixture(params=BLOCKS, ids=["default", "blocked"])
def block(request, monkeypatch):
    monkeypatch.setattr(_strided, "_BLOCK_BYTES", request.param)
    return request.param


@pytest.fixture(params=[True, False], ids=["by-index", "by-tap"])
def by_index(request, monkeypatch):
    """Both max backwards: scatter_add by flat index (CPU) and tap by tap (other devices)."""
    monkeypatch.setattr(_strided, "_by_indices", lambda t: request.param)
    return request.param


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _input(shape, seed, channels_last=False, ties=False, dtype=torch.float64) -> torch.Tensor:
    """Fresh random input; with ties, few distinct values (many equal maxima per window)."""
    if ties:
        x = torch.randint(-2, 3, shape, generator=_gen(seed)).to(dtype)
    else:
        x = torch.randn(shape, generator=_gen(seed), dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _window(op: str, hw, kwargs) -> Window2d:
    args = {k: v for k, v in kwargs.items() if k not in ("count_include_pad", "divisor_override")}
    return window2d(op, hw, **args)


def _same_pads(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TensorFlow's "same" padding, written out independently of _shapes."""
    total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _same_format(a: torch.Tensor, b: torch.Tensor) -> bool:
    """A gradient comes back in its input's memory format (strided views: any dense one)."""
    return all(
        a.is_contiguous(memory_format=fmt) or not b.is_contiguous(memory_format=fmt)
        for fmt in (torch.contiguous_format, torch.channels_last)
    )


def torch_max(x: torch.Tensor, kwargs: dict):
    """PyTorch's max pool and indices; "same" as an explicitly -inf-padded F.max_pool2d."""
    kw = dict(kwargs)
    if kw.get("padding") == "valid":
        kw["padding"] = 0
    if kw.get("padding") != "same":
        return F.max_pool2d(x, **kw, return_indices=True)
    k, d = _pair(kw["kernel_size"]), _pair(kw.get("dilation", 1))
    s = _pair(kw.get("stride") or kw["kernel_size"])
    h, w = x.shape[-2:]
    (top, bottom), (left, right) = _same_pads(h, k[0], s[0], d[0]), _same_pads(w, k[1], s[1], d[1])
    padded = F.pad(x, (left, right, top, bottom), value=-math.inf)
    y, idx = F.max_pool2d(padded, k, s, 0, d, return_indices=True)
    wp = padded.shape[-1]
    return y, (idx // wp - top) * w + (idx % wp - left)


def torch_avg(x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """PyTorch's avg pool; "same" as a zero-padded sum over the count of real cells."""
    kw = dict(kwargs)
    if kw.get("padding") == "valid":
        kw["padding"] = 0
    if kw.get("padding") != "same":
        return F.avg_pool2d(x, **kw)
    k = _pair(kw["kernel_size"])
    s = _pair(kw.get("stride") or kw["kernel_size"])
    h, w = x.shape[-2:]
    (top, bottom), (left, right) = _same_pads(h, k[0], s[0], 1), _same_pads(w, k[1], s[1], 1)
    pads = (left, right, top, bottom)
    sums = F.avg_pool2d(F.pad(x, pads), k, s, divisor_override=1)
    if kw.get("divisor_override") is not None:
        return sums / kw["divisor_override"]
    ones = torch.ones(1, 1, h, w, dtype=x.dtype)
    return sums / F.avg_pool2d(F.pad(ones, pads), k, s, divisor_override=1)


def check_max(x: torch.Tensor, kwargs: dict, seed: int = 0) -> None:
    """Values, indices and gradient of _strided.max_pool2d against PyTorch's."""
    win = _window("max_pool2d", x.shape[-2:], kwargs)
    ref = x.detach().clone().requires_grad_()
    y_ref, idx_ref = torch_max(ref, kwargs)
    xg = x.detach().clone().requires_grad_()
    y, idx = _strided.max_pool2d(xg, win, return_indices=True)
    assert y.shape == y_ref.shape == (*x.shape[:2], *win.out_size)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0, equal_nan=True)
    assert idx.dtype == torch.int64
    assert torch.equal(idx, idx_ref)
    gy = torch.randn(y.shape, generator=_gen(seed + 1), dtype=torch.float64).to(x.dtype)
    y_ref.backward(gy)
    y.backward(gy)
    assert xg.grad.shape == x.shape and _same_format(xg.grad, x)
    torch.testing.assert_close(xg.grad, ref.grad, equal_nan=True)
    with torch.no_grad():  # the inference path: values only, then values and indices
        torch.testing.assert_close(_strided.max_pool2d(x, win)[0], y_ref, equal_nan=True)
        assert torch.equal(_strided.max_pool2d(x, win, return_indices=True)[1], idx_ref)


def check_avg(x: torch.Tensor, kwargs: dict, seed: int = 0) -> None:
    """Values and gradient of _strided.avg_pool2d against PyTorch's."""
    win = _window("avg_pool2d", x.shape[-2:], kwargs)
    cip = kwargs.get("count_include_pad", True)
    ref = x.detach().clone().requires_grad_()
    y_ref = torch_avg(ref, kwargs)
    xg = x.detach().clone().requires_grad_()
    y = _strided.avg_pool2d(xg, win, cip, kwargs.get("divisor_override"))
    assert y.shape == y_ref.shape == (*x.shape[:2], *win.out_size)
    torch.testing.assert_close(y, y_ref)
    gy = torch.randn(y.shape, generator=_gen(seed + 1), dtype=torch.float64).to(x.dtype)
    y_ref.backward(gy)
    y.backward(gy)
    assert _same_format(xg.grad, x)
    torch.testing.assert_close(xg.grad, ref.grad)


# ----------------------------------------------------------------------------- case tables


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", MAX_POOL_CASES + STRIDED_MAX_CASES, ids=str)
def test_max_pool_cases(case, channels_last, variant):
    check_max(_input((2, 3, *case.hw), 1, channels_last), case.kwargs)


@pytest.mark.parametrize("case", MAX_POOL_CASES + STRIDED_MAX_CASES, ids=str)
def test_max_pool_ties_go_to_the_first_maximum(case, variant):
    """Inputs of 5 distinct values: most windows hold several maxima; PyTorch picks the first."""
    check_max(_input((2, 3, *case.hw), 2, ties=True), case.kwargs)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", AVG_POOL_CASES + STRIDED_AVG_CASES, ids=str)
def test_avg_pool_cases(case, channels_last, block):
    check_avg(_input((2, 3, *case.hw), 3, channels_last), case.kwargs)


# ----------------------------------------------------------------------------- random geometry


@st.composite
def geometries(draw, op: str):
    h, w = draw(st.integers(1, 11)), draw(st.integers(1, 11))
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    s = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    d = (draw(st.integers(1, 3)), draw(st.integers(1, 3))) if op == "max" else (1, 1)
    kwargs: dict = {"kernel_size": k, "stride": s}
    if op == "max":
        kwargs["dilation"] = d
    if draw(st.booleans()):
        kwargs["padding"] = "same"
    else:
        kwargs["padding"] = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
        kwargs["ceil_mode"] = draw(st.booleans())
    if op == "avg":
        kwargs["count_include_pad"] = draw(st.booleans())
        if draw(st.integers(0, 3)) == 0:
            kwargs["divisor_override"] = draw(st.integers(1, 7))
    try:
        _window(f"{op}_pool2d", (h, w), kwargs)
    except ValueError:
        assume(False)  # an empty output or a window of padding only: the op refuses it
    shape = (draw(st.integers(0, 2)), draw(st.integers(1, 3)), h, w)
    return shape, kwargs, draw(st.booleans()), draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None)
@given(geometries("max"), st.sampled_from(list(VARIANTS.values())), st.booleans())
def test_max_pool_random_geometry(geometry, variant, ties):
    shape, kwargs, channels_last, seed = geometry
    old = _set_variant(*variant)
    try:
        check_max(_input(shape, seed, channels_last, ties), kwargs, seed)
    finally:
        _restore(old)


@settings(max_examples=40, deadline=None)
@given(geometries("avg"), st.sampled_from(BLOCKS))
def test_avg_pool_random_geometry(geometry, block_bytes):
    shape, kwargs, channels_last, seed = geometry
    old, _strided._BLOCK_BYTES = _strided._BLOCK_BYTES, block_bytes
    try:
        check_avg(_input(shape, seed, channels_last), kwargs, seed)
    finally:
        _strided._BLOCK_BYTES = old


# ----------------------------------------------------------------------------- NaN, inf


def test_nan_window_is_nan_and_its_gradient_goes_to_the_last_nan(variant):
    x = _input((1, 2, 4, 4), 4)
    x[0, 0, 0, 1] = x[0, 0, 1, 0] = math.nan  # two NaNs in the first 2x2 window
    x[0, 1, 3, 3] = math.nan  # one NaN, in the last window of channel 1
    xg = x.clone().requires_grad_()
    y, idx = _strided.max_pool2d(xg, window2d("max_pool2d", (4, 4), 2), return_indices=True)
    assert torch.isnan(y[0, 0, 0, 0]) and torch.isnan(y[0, 1, 1, 1])
    assert not torch.isnan(y).sum() > 2
    assert idx[0, 0, 0, 0] == 1 * 4 + 0  # the last NaN in row-major window order
    y.sum().backward()
    assert xg.grad[0, 0, 1, 0] == 1 and xg.grad[0, 0, 0, 1] == 0
    check_max(x, {"kernel_size": 2})


def test_nan_inf_and_ties_mixed(variant):
    """NaN, +-inf and repeated values everywhere, against PyTorch, overlapping windows."""
    x = _input((2, 3, 9, 8), 5, ties=True)
    g = _gen(6)
    for value, p in ((math.nan, 0.1), (math.inf, 0.05), (-math.inf, 0.05)):
        x[torch.rand(x.shape, generator=g) < p] = value
    for kwargs in ({"kernel_size": 3, "stride": 1, "padding": 1}, {"kernel_size": 3, "stride": 2},
                   {"kernel_size": 2, "padding": "same"}):  # fmt: skip
        check_max(x, kwargs)


def test_windows_of_minus_inf_choose_their_first_real_cell():
    """All real cells -inf: PyTorch's scan never updates, keeping its first in-bounds tap."""
    x = torch.full((1, 1, 3, 3), -math.inf, dtype=torch.float64)
    check_max(x, {"kernel_size": 3, "stride": 1, "padding": 1})


def test_non_finite_output_gradient_stays_in_its_cell(variant):
    """An inf in grad_y must not turn 0 * inf into NaN in the cells that were not chosen."""
    x = _input((1, 2, 6, 6), 7)
    kwargs = {"kernel_size": 3, "stride": 1, "padding": 1}  # overlapping: accumulating path
    for k in (kwargs, {"kernel_size": 2}):  # and the disjoint, writing path
        win = _window("max_pool2d", x.shape[-2:], k)
        ref, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
        gy = torch.randn((1, 2, *win.out_size), generator=_gen(8), dtype=torch.float64)
        gy[0, 0, 1, 1], gy[0, 1, 0, 0] = math.inf, math.nan
        torch_max(ref, k)[0].backward(gy)
        _strided.max_pool2d(xg, win)[0].backward(gy)
        torch.testing.assert_close(xg.grad, ref.grad, equal_nan=True)


# ----------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("kwargs", [
    {"kernel_size": 3, "stride": 2, "padding": 1},  # overlapping, padded
    {"kernel_size": 2},  # disjoint
    {"kernel_size": (2, 3), "stride": 1, "padding": "same", "dilation": 2},  # asymmetric
])  # fmt: skip
def test_max_pool_gradcheck_and_gradgradcheck(kwargs, by_index):
    x = _input((1, 2, 6, 7), 9).requires_grad_()  # distinct values: the max is differentiable
    win = _window("max_pool2d", (6, 7), kwargs)
    fn = lambda t: _strided.max_pool2d(t, win)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("kwargs", [
    {"kernel_size": 3, "stride": 2, "padding": 1, "count_include_pad": False},
    {"kernel_size": 2, "divisor_override": 3},
    {"kernel_size": 3, "stride": 2, "padding": "same"},
])  # fmt: skip
def test_avg_pool_gradcheck_and_gradgradcheck(kwargs):
    x = _input((1, 2, 6, 7), 10).requires_grad_()
    win = _window("avg_pool2d", (6, 7), kwargs)
    cip, div = kwargs.get("count_include_pad", True), kwargs.get("divisor_override")
    fn = lambda t: _strided.avg_pool2d(t, win, cip, div)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_inference_path_skips_the_chosen_tap(monkeypatch):
    """Without grad or indices only the values are computed: the tap pass never runs."""

    def fail(*args):
        raise AssertionError("_choose_taps ran on the inference path")

    monkeypatch.setattr(_strided, "_choose_taps", fail)
    x = _input((2, 3, 9, 9), 11)
    win = window2d("max_pool2d", (9, 9), 3, 2, 1)
    _strided.max_pool2d(x, win)
    with torch.no_grad():  # an input that wants grad, in grad-free code
        _strided.max_pool2d(x.requires_grad_(), win)


@pytest.mark.parametrize("op", ["max", "avg"])
def test_worker_threads_under_inference_mode(op, monkeypatch):
    """Blocks run on worker threads, whose grad and inference modes follow the caller's."""
    monkeypatch.setattr(_strided, "_BLOCK_BYTES", 1)
    x = _input((2, 8, 9, 9), 20)
    win = window2d(f"{op}_pool2d", (9, 9), 3, 2, 1)
    pool = _strided.max_pool2d if op == "max" else _strided.avg_pool2d
    with torch.inference_mode():
        y = pool(x, win)
    y = y[0] if op == "max" else y
    ref = F.max_pool2d(x, 3, 2, 1) if op == "max" else F.avg_pool2d(x, 3, 2, 1)
    torch.testing.assert_close(y, ref)


def test_workers_run_single_threaded_and_leave_pytorch_threads_alone():
    if _strided._pool() is None:
        pytest.skip("one PyTorch thread, or no OpenMP runtime: blocks run in the caller")
    threads = torch.get_num_threads()
    assert _strided._pool().submit(torch.get_num_threads).result() == 1
    assert torch.get_num_threads() == threads


def test_indices_are_not_differentiable():
    x = _input((1, 1, 4, 4), 12).requires_grad_()
    y, idx = _strided.max_pool2d(x, window2d("max_pool2d", (4, 4), 2), return_indices=True)
    assert y.requires_grad and not idx.requires_grad


def test_backward_is_deterministic(by_index):
    x = _input((4, 8, 17, 17), 13, ties=True).requires_grad_()
    win = window2d("max_pool2d", (17, 17), 3, 1, 1)
    gy = torch.randn((4, 8, 17, 17), generator=_gen(14), dtype=torch.float64)
    grads = [torch.autograd.grad(_strided.max_pool2d(x, win)[0], x, gy)[0] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


# ----------------------------------------------------------------------------- shapes, dtypes


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_empty_batch(channels_last, by_index):
    x = _input((0, 3, 8, 8), 15, channels_last).requires_grad_()
    win = window2d("max_pool2d", (8, 8), 3, 2, 1)
    y, idx = _strided.max_pool2d(x, win, return_indices=True)
    assert y.shape == idx.shape == (0, 3, 4, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape
    a = _strided.avg_pool2d(x, window2d("avg_pool2d", (8, 8), 2))
    assert a.shape == (0, 3, 4, 4)
    a.sum().backward()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_outputs_keep_the_memory_format(channels_last):
    x = _input((2, 4, 8, 8), 16, channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y, idx = _strided.max_pool2d(x, window2d("max_pool2d", (8, 8), 2), return_indices=True)
    a = _strided.avg_pool2d(x, window2d("avg_pool2d", (8, 8), 2))
    assert all(t.is_contiguous(memory_format=fmt) for t in (y, idx, a))


def test_strided_view_input(by_index):
    """Neither contiguous nor channels_last (a slice of a larger tensor): blocks of images."""
    x = _input((3, 5, 12, 14), 17)[:, 1:4, 1:-1, ::2]
    check_max(x, {"kernel_size": 3, "stride": 2, "padding": 1})
    check_avg(x, {"kernel_size": 2, "stride": 1})


def test_more_than_256_taps(by_index):
    """A 16x17 kernel (272 taps): the offsets leave uint8."""
    x = _input((1, 2, 18, 19), 18, ties=True)
    check_max(x, {"kernel_size": (16, 17), "stride": 1, "padding": (1, 0)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_dtypes(dtype, variant):
    """Max values are exact in any dtype; averages sum in float32 and round once."""
    x = _input((2, 3, 9, 9), 19, dtype=dtype)
    kwargs = {"kernel_size": 3, "stride": 2, "padding": 1}
    win = window2d("max_pool2d", (9, 9), 3, 2, 1)
    y, idx = _strided.max_pool2d(x, win, return_indices=True)
    y_ref, idx_ref = F.max_pool2d(x.double(), **kwargs, return_indices=True)
    assert y.dtype == dtype and torch.equal(y.double(), y_ref) and torch.equal(idx, idx_ref)
    xg = x.clone().requires_grad_()
    _strided.max_pool2d(xg, win)[0].sum().backward()
    ref = x.double().requires_grad_()
    F.max_pool2d(ref, **kwargs).sum().backward()
    assert xg.grad.dtype == dtype and torch.equal(xg.grad.double(), ref.grad)  # small ints
    a = _strided.avg_pool2d(x, window2d("avg_pool2d", (9, 9), 3, 2, 1))
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert a.dtype == dtype
    torch.testing.assert_close(a.double(), F.avg_pool2d(x.double(), **kwargs), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- prefers


def test_prefers_nchw_cpu_and_leaves_the_rest_to_pytorch(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")  # the strided views' own rules
    win = window2d("max_pool2d", (112, 112), 3, 2, 1)
    x = torch.empty(8, 64, 112, 112)
    assert _strided.prefers(x, "max_pool2d", win)
    assert _strided.prefers(x, "avg_pool2d", win)
    assert _strided.prefers(x.requires_grad_(), "max_pool2d", win)  # measured: 2.6x with backward
    assert not _strided.prefers(x.contiguous(memory_format=torch.channels_last), "max_pool2d", win)
    assert not _strided.prefers(torch.empty(8, 64, 112, 112, device="meta"), "max_pool2d", win)
    tiny = window2d("max_pool2d", (4, 4), 2)
    assert not _strided.prefers(torch.empty(1, 1, 4, 4), "max_pool2d", tiny)
    assert not _strided.prefers(x, "adaptive_max_pool2d", win)
    # float16 and float64 max pools win forward only; float64 averages never
    for dtype in (torch.float16, torch.float64):
        x = torch.empty(8, 64, 112, 112, dtype=dtype)
        assert _strided.prefers(x, "max_pool2d", win)
        assert not _strided.prefers(x.requires_grad_(), "max_pool2d", win)
        with torch.no_grad():
            assert _strided.prefers(x, "max_pool2d", win)
    assert not _strided.prefers(x.detach(), "avg_pool2d", win)
    # few outputs per plane: a global pool; with backward, 4x4 outputs; stride-3 averages
    x = torch.empty(64, 2048, 7, 7)
    assert not _strided.prefers(x, "max_pool2d", window2d("max_pool2d", (7, 7), 7))
    x = torch.empty(64, 256, 8, 8, requires_grad=True)
    assert not _strided.prefers(x, "max_pool2d", window2d("max_pool2d", (8, 8), 3, 2, 1))
    x = torch.empty(64, 256, 24, 24)
    assert not _strided.prefers(x, "avg_pool2d", window2d("avg_pool2d", (24, 24), 3, 3))
    assert _strided.prefers(x, "avg_pool2d", window2d("avg_pool2d", (24, 24), 2, 2))


def test_prefers_the_compiled_max_pool_on_all_but_small_inputs():
    if not cpu_kernels.available():
        pytest.skip(f"no compiled CPU kernels: {cpu_kernels.why_unavailable()}")
    win = window2d("max_pool2d", (8, 8), 3, 2, 1)
    for dtype in (torch.float32, torch.float64):  # both dtypes, with and without backward
        x = torch.empty(64, 256, 8, 8, dtype=dtype)  # small planes: the views lost here
        assert _strided.prefers(x, "max_pool2d", win)
        assert _strided.prefers(x.requires_grad_(), "max_pool2d", win)
    tiny = torch.empty(1, 8, 8, 8)  # the call's fixed cost is PyTorch's whole time
    assert not _strided.prefers(tiny, "max_pool2d", win)
    half = torch.empty(64, 256, 8, 8, dtype=torch.float16, requires_grad=True)
    assert not _strided.prefers(half, "max_pool2d", win)  # float16 stays on the views' rules
    cl = torch.empty(64, 256, 8, 8).contiguous(memory_format=torch.channels_last)
    assert not _strided.prefers(cl, "max_pool2d", win)  # PyTorch vectorises over C


def test_plane_means_are_the_mean_and_chosen_for_large_channels_last_float32() -> None:
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    torch.testing.assert_close(_strided.plane_means(x), x.mean((2, 3)))
    assert not _strided.prefers_plane_means(x)  # small: aten's mean wins
    large = torch.empty(32, 1024, 7, 7)
    assert _strided.prefers_plane_means(large.to(memory_format=torch.channels_last))
    assert not _strided.prefers_plane_means(large)  # NCHW: aten's mean wins
    assert not _strided.prefers_plane_means(large.half().to(memory_format=torch.channels_last))


# ----------------------------------------------------------------------------- torch.compile


class _EveryPool(torch.nn.Module):
    """Every gapnet pool on CPU: max and average ("same" runs the strided path), adaptive
    average and max, every global kind (GeM with a learned p) and gap_linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.p = torch.nn.Parameter(torch.tensor([3.0]))
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.conv(x))  # (N, 8, H, W)
        a = GF.max_pool2d(f, 3, 2, "same") + GF.avg_pool2d(f, 3, 2, "same")
        b = GF.max_pool2d(a, 3, 1, 1) + GF.avg_pool2d(a, 3, 1, 1)  # PyTorch's ops, or strided
        c = GF.adaptive_avg_pool2d(b, 3) + GF.adaptive_max_pool2d(b, 3)  # (N, 8, 3, 3)
        heads = [GF.global_pool2d(c, kind) for kind in ("avg", "max", "avgmax")]
        heads.append(GF.global_pool2d(c, "catavgmax")[:, :8])
        heads.append(GF.global_pool2d(c, "gem", p=self.p))
        return GF.gap_linear(c, self.fc.weight, self.fc.bias) + self.fc(sum(heads))


COMPILE_MODES = [  # (dynamic, compiler backend, strided everywhere)
    # Inductor, static shapes: the strided ops as graph nodes among generated code
    (False, "inductor", False),
    # symbolic H and W through the checks and the fake implementations; aot_eager keeps the
    # test quick on 2 cores (Dynamo and AOTAutograd trace as for Inductor)
    (True, "aot_eager", False),
    # every window pool on the strided path, as on large inputs
    (True, "aot_eager", True),
]


@pytest.mark.parametrize(("dynamic", "compiler", "strided"), COMPILE_MODES)
def test_torch_compile_every_pool_without_graph_breaks(
    dynamic: bool, compiler: str, strided: bool, monkeypatch
) -> None:
    """fullgraph=True makes any graph break an error; forward and gradients equal eager."""
    if strided:
        monkeypatch.setattr(_strided, "prefers", lambda x4, op, win: True)
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = _EveryPool()
    compiled = torch.compile(net, fullgraph=True, dynamic=dynamic, backend=compiler)
    for size in (12, 15) if dynamic else (12,):
        x = torch.randn(2, 3, size, size)
        eager = net(x)
        eager_grads = torch.autograd.grad(eager.sum(), list(net.parameters()))
        got = compiled(x)
        got_grads = torch.autograd.grad(got.sum(), list(net.parameters()))
        torch.testing.assert_close(got, eager)
        for g, e in zip(got_grads, eager_grads, strict=True):
            torch.testing.assert_close(g, e)
