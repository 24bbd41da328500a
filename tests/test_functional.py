"""gapnet.functional against gapnet.reference: values, dtypes, indices, gradients, layouts and
memory formats, backends, ties and NaN, empty batches and bad input.

`check_op` is the one checker: it runs an op on a torch tensor and its float64 NumPy
specification on the same (rounded) input, and compares forward and backward. The case tables
of `cases.py` run on the "torch" backend; the "triton" backend (the CPU interpreter without a
GPU) runs a few tiny calls per path in float32, float16 and bfloat16.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import ADAPTIVE_CASES, AVG_POOL_CASES, GLOBAL_CASES, MAX_POOL_CASES, Case
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import gapnet
from gapnet import _shapes, _strided
from gapnet import functional as GF
from gapnet import reference as ref

KINDS = ("avg", "max", "avgmax", "catavgmax", "gem")

LAYOUTS = [  # (layout, channels_last): how an input is laid out in memory
    pytest.param("NCHW", False, id="NCHW"),
    # an NCHW-shaped tensor stored channels_last: first class, no hidden copies
    pytest.param("NCHW", True, id="NCHW-channels_last"),
    pytest.param("NHWC", False, id="NHWC"),
    # unbatched: the ops add and remove a batch axis of 1
    pytest.param("CHW", False, id="CHW"),
    pytest.param("HWC", False, id="HWC"),
]

BACKENDS = [
    pytest.param("torch", id="torch"),
    # gapnet's Triton kernels; on a CPU-only machine through TRITON_INTERPRET=1 (conftest.py)
    pytest.param("triton", marks=pytest.mark.triton, id="triton"),
]

DTYPES = [
    pytest.param(torch.float64, id="float64"),
    pytest.param(torch.float32, id="float32"),
    pytest.param(torch.float16, id="float16"),
    pytest.param(torch.bfloat16, id="bfloat16"),
]

# (rtol, atol) of a result against the float64 reference on the same rounded input: float64
# differs by summation order only; lower precisions by float32 accumulation and the final
# rounding (plus, for gradients, a rounded grad_out divided by a window's count).
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (2e-2, 1.5e-2),
}

# Where the "triton" backend's inputs live: a GPU when there is one, else the CPU interpreter.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The attribute of `gapnet._ops` that runs each op on the kernels.
KERNEL_OP = {
    "max_pool2d": "max_pool2d",
    "avg_pool2d": "avg_pool2d",
    "global_pool2d": "global_pool2d",
    "global_avg_pool2d": "global_pool2d",
    "global_max_pool2d": "global_pool2d",
    "gap_linear": "gap_linear",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors (conftest.py)


@pytest.fixture
def restore_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a test does to the default backend is undone after it."""
    monkeypatch.setattr(GF, "_default_backend", GF._default_backend)


# ----------------------------------------------------------------------------- helpers


def rows(table: list[tuple]) -> list[Any]:
    """A table of (op, kwargs, ...) rows as pytest params with readable ids."""

    def text(v: Any) -> str:
        return f"{v[0]}x{v[1]}" if isinstance(v, tuple) else str(v)

    return [
        pytest.param(
            *row,
            id="-".join([row[0], *(f"{k}={v}" for k, v in row[1].items()), *map(text, row[2:])]),
        )
        for row in table
    ]


def to_layout(a: np.ndarray, layout: str) -> np.ndarray:
    """An NCHW array in `layout`; unbatched layouts drop N = 1."""
    if layout in ("NHWC", "HWC"):
        a = a.transpose(0, 2, 3, 1)
    return a if layout in ("NCHW", "NHWC") else a[0]


def to_nchw(a: np.ndarray, layout: str) -> np.ndarray:
    """The inverse of `to_layout`."""
    if layout in ("CHW", "HWC"):
        a = a[None]
    return a.transpose(0, 3, 1, 2) if layout in ("NHWC", "HWC") else a


def random_input(
    rng: np.random.Generator, hw: tuple[int, int], layout: str, n: int = 2, c: int = 3
) -> np.ndarray:
    """A float64 NCHW input: `n` images of `c` channels, or 1 image for an unbatched layout."""
    return rng.standard_normal((n if layout in ("NCHW", "NHWC") else 1, c, *hw))


def make_tensor(
    x_nchw: np.ndarray,
    layout: str,
    dtype: torch.dtype,
    channels_last: bool = False,
    device: str = "cpu",
) -> torch.Tensor:
    """`x_nchw` as a contiguous tensor in `layout` (channels_last-strided if asked), rounded
    to `dtype`, on `device`."""
    x = torch.from_numpy(np.ascontiguousarray(to_layout(x_nchw, layout))).to(device, dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def require_triton(x: torch.Tensor, name: str) -> None:
    """Skip unless the Triton backend can run `name` on `x`."""
    from gapnet import _ops

    reason = _ops.unsupported_reason(x)
    if reason is not None:
        pytest.skip(reason)
    if not hasattr(_ops, "max_pool2d") or not hasattr(_ops, KERNEL_OP[name]):
        pytest.skip("triton backend not wired yet")


def numpy64(t: torch.Tensor) -> np.ndarray:
    """A tensor's values, exactly, as a float64 array on the host."""
    return t.detach().cpu().double().numpy()


def assert_close(actual: torch.Tensor, expected: np.ndarray, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(numpy64(actual), expected, rtol=rtol, atol=atol, err_msg=what)


def assert_memory_format(y: torch.Tensor, channels_last: bool) -> None:
    """A result keeps its input's memory format: an NHWC input gives an NHWC-contiguous result,
    a channels_last NCHW input a channels_last one."""
    if channels_last and y.ndim == 4:
        assert y.is_contiguous(memory_format=torch.channels_last), y.stride()
    else:
        assert y.is_contiguous(), y.stride()


def check_op(
    rng: np.random.Generator,
    name: str,
    x_nchw: np.ndarray,
    kwargs: dict[str, Any],
    layout: str = "NCHW",
    backend: str = "torch",
    dtype: torch.dtype = torch.float64,
    channels_last: bool = False,
    grad_p: bool = False,
) -> None:
    """`gapnet.functional.<name>` against `gapnet.reference.<name>` and `<name>_backward`.

    The reference runs in float64 on the input rounded to `dtype`. Compared: output values,
    shape, dtype and memory format, the indices (with return_indices), and the gradient of
    ``(y * g).sum()`` for a fresh random `g` with respect to x, and to p for GeM when `grad_p`
    (p then goes in as a tensor that requires grad).
    """
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x = make_tensor(x_nchw, layout, dtype, channels_last, device)
    if backend == "triton":
        require_triton(x, name)
    x.requires_grad_(True)
    x64 = numpy64(x)  # the rounded input, exactly

    call_kwargs = dict(kwargs)
    p = None
    if grad_p:
        assert kwargs.get("kind") == "gem"
        p_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        p = torch.tensor(kwargs.get("p", 3.0), dtype=p_dtype, device=device, requires_grad=True)
        call_kwargs["p"] = p
    out = getattr(GF, name)(x, **call_kwargs, layout=layout, backend=backend)
    expected = getattr(ref, name)(x64, **kwargs, layout=layout)
    (y, index), (y_ref, index_ref) = (
        (out, expected) if kwargs.get("return_indices") else ((out, None), (expected, None))
    )

    assert isinstance(y, torch.Tensor) and y.dtype == dtype
    assert tuple(y.shape) == y_ref.shape
    assert_close(y, y_ref, dtype, f"{name} output")
    if index is not None:
        assert index.dtype == torch.int64 and tuple(index.shape) == index_ref.shape
        np.testing.assert_array_equal(index.cpu().numpy(), index_ref, err_msg=f"{name} indices")
    # A 1x1 plane is both formats (PyTorch reads it as NCHW); an empty tensor has no format.
    if x_nchw.shape[2:] != (1, 1) and y.numel() > 0:
        assert_memory_format(y, channels_last)
        if index is not None:
            assert_memory_format(index, channels_last)

    g = torch.from_numpy(rng.standard_normal(y_ref.shape)).to(device, dtype)
    (y * g).sum().backward()
    grad_ref = getattr(ref, name + "_backward")(numpy64(g), x64, **kwargs, layout=layout)
    if kwargs.get("kind") == "gem":
        grad_ref, grad_p_ref = grad_ref
    assert x.grad is not None and x.grad.dtype == dtype and x.grad.shape == x.shape
    assert_close(x.grad, grad_ref, dtype, f"{name} grad_x")
    if p is not None:
        assert p.grad is not None
        rtol, atol = TOL[dtype]
        np.testing.assert_allclose(p.grad.item(), grad_p_ref, rtol=5 * rtol, atol=5 * atol)


# ----------------------------------------------------------------------------- case tables


@pytest.mark.parametrize(("layout", "channels_last"), LAYOUTS)
@pytest.mark.parametrize("case", MAX_POOL_CASES, ids=str)
def test_max_pool2d_cases(
    case: Case, layout: str, channels_last: bool, rng: np.random.Generator
) -> None:
    kwargs = {**case.kwargs, "return_indices": True}
    x = random_input(rng, case.hw, layout)
    check_op(rng, "max_pool2d", x, kwargs, layout, channels_last=channels_last)


@pytest.mark.parametrize(("layout", "channels_last"), LAYOUTS)
@pytest.mark.parametrize("case", AVG_POOL_CASES, ids=str)
def test_avg_pool2d_cases(
    case: Case, layout: str, channels_last: bool, rng: np.random.Generator
) -> None:
    x = random_input(rng, case.hw, layout)
    check_op(rng, "avg_pool2d", x, case.kwargs, layout, channels_last=channels_last)


@pytest.mark.parametrize(("layout", "channels_last"), LAYOUTS)
@pytest.mark.parametrize("case", ADAPTIVE_CASES, ids=str)
def test_adaptive_pool2d_cases(
    case: Case, layout: str, channels_last: bool, rng: np.random.Generator
) -> None:
    x = random_input(rng, case.hw, layout)
    check_op(rng, "adaptive_avg_pool2d", x, case.kwargs, layout, channels_last=channels_last)
    kwargs = {**case.kwargs, "return_indices": True}
    check_op(rng, "adaptive_max_pool2d", x, kwargs, layout, channels_last=channels_last)


@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize(("layout", "channels_last"), LAYOUTS)
@pytest.mark.parametrize("case", GLOBAL_CASES, ids=str)
def test_global_pool2d_cases(
    case: Case, layout: str, channels_last: bool, keepdim: bool, rng: np.random.Generator
) -> None:
    kwargs = {**case.kwargs, "keepdim": keepdim}
    x = random_input(rng, case.hw, layout)
    check_op(rng, "global_pool2d", x, kwargs, layout, channels_last=channels_last)
    if kwargs["kind"] == "gem":  # p as a learnable tensor: its gradient too
        check_op(rng, "global_pool2d", x, kwargs, layout, channels_last=channels_last, grad_p=True)


@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize(("layout", "channels_last"), LAYOUTS)
@pytest.mark.parametrize("name", ["global_avg_pool2d", "global_max_pool2d"])
def test_global_wrappers(
    name: str, layout: str, channels_last: bool, keepdim: bool, rng: np.random.Generator
) -> None:
    x = random_input(rng, (4, 5), layout)
    check_op(rng, name, x, {"keepdim": keepdim}, layout, channels_last=channels_last)


# ----------------------------------------------------------------------------- dtypes, backends

BACKEND_CALLS = [  # (op, keyword arguments, input (H, W)): one tiny call per path of a backend
    # ResNet's stem pool: padding 1, with indices
    ("max_pool2d", {"kernel_size": 3, "stride": 2, "padding": 1, "return_indices": True}, (7, 7)),
    # dilation and ceil_mode's partial last window
    (
        "max_pool2d",
        {"kernel_size": 2, "stride": 2, "dilation": 2, "ceil_mode": True, "return_indices": True},
        (7, 6),
    ),
    # Keras "same" with the odd padding cell after
    (
        "max_pool2d",
        {"kernel_size": 3, "stride": 2, "padding": "same", "return_indices": True},
        (6, 6),
    ),
    # overlapping windows, no indices asked for
    ("max_pool2d", {"kernel_size": (3, 2), "stride": 1}, (5, 6)),
    # padded zeros counted in the border windows
    ("avg_pool2d", {"kernel_size": 3, "stride": 2, "padding": 1}, (7, 7)),
    # ceil_mode past the padding, padding not counted
    (
        "avg_pool2d",
        {
            "kernel_size": 3,
            "stride": 2,
            "padding": 1,
            "ceil_mode": True,
            "count_include_pad": False,
        },
        (6, 6),
    ),
    # Keras "same": real cells only
    ("avg_pool2d", {"kernel_size": 3, "stride": 2, "padding": "same"}, (6, 7)),
    # a negative divisor_override
    ("avg_pool2d", {"kernel_size": 2, "divisor_override": -3}, (4, 5)),
    # every global kind
    *[("global_pool2d", {"kind": kind}, (5, 4)) for kind in KINDS],
    # catavgmax keeping H and W as size-1 axes
    ("global_pool2d", {"kind": "catavgmax", "keepdim": True}, (3, 3)),
    # GeM with a fractional p and a clamp that bites
    ("global_pool2d", {"kind": "gem", "p": 2.5, "eps": 0.3}, (4, 4)),
    # the GAP wrapper, the classifier's pool
    ("global_avg_pool2d", {}, (7, 7)),
]


@pytest.mark.parametrize(("layout", "channels_last"), [LAYOUTS[0], LAYOUTS[1], LAYOUTS[2]])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "kwargs", "hw"), rows(BACKEND_CALLS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes_and_backends(
    backend: str,
    name: str,
    kwargs: dict,
    hw: tuple[int, int],
    dtype: torch.dtype,
    layout: str,
    channels_last: bool,
    rng: np.random.Generator,
) -> None:
    x = random_input(rng, hw, layout, c=3)
    check_op(rng, name, x, kwargs, layout, backend, dtype, channels_last)
    if kwargs.get("kind") == "gem":
        check_op(rng, name, x, kwargs, layout, backend, dtype, channels_last, grad_p=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("adaptive_avg_pool2d", {"output_size": (3, 2)}),
        ("adaptive_max_pool2d", {"output_size": 3, "return_indices": True}),
    ],
)
def test_adaptive_low_precision(
    name: str, kwargs: dict, dtype: torch.dtype, rng: np.random.Generator
) -> None:
    for layout, channels_last in (("NCHW", False), ("NCHW", True), ("NHWC", False)):
        x = random_input(rng, (7, 5), layout)
        check_op(rng, name, x, kwargs, layout, "torch", dtype, channels_last)


# ----------------------------------------------------------------------------- gap_linear


@pytest.mark.parametrize("return_maps", [False, True], ids=["logits", "maps"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize(("layout", "channels_last"), LAYOUTS)
@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[1], DTYPES[3]])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gap_linear(
    backend: str,
    dtype: torch.dtype,
    layout: str,
    channels_last: bool,
    bias: bool,
    return_maps: bool,
    rng: np.random.Generator,
) -> None:
    """Logits, maps and the gradients of x, weight and bias against the reference GAP and a
    float64 linear map; and the CAM identity mean(maps) + bias == logits."""
    k, c = 5, 4
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x_nchw = random_input(rng, (3, 5), layout, c=c)
    x = make_tensor(x_nchw, layout, dtype, channels_last, device)
    if backend == "triton":
        require_triton(x, "gap_linear")
    x.requires_grad_(True)
    w = torch.from_numpy(rng.standard_normal((k, c))).to(device, dtype).requires_grad_(True)
    b = torch.from_numpy(rng.standard_normal(k)).to(device, dtype).requires_grad_(True)
    b = b if bias else None
    out = GF.gap_linear(x, w, b, layout=layout, return_maps=return_maps, backend=backend)
    logits, maps = out if return_maps else (out, None)

    x64, w64 = numpy64(x), numpy64(w)
    b64 = numpy64(b) if b is not None else np.zeros(k)
    batched = layout in ("NCHW", "NHWC")
    x4 = to_nchw(x64, layout)  # (N, C, H, W)
    pooled = ref.global_avg_pool2d(x4)  # (N, C)
    logits_ref = pooled @ w64.T + b64  # (N, K)
    maps_ref = np.einsum("kc,nchw->nkhw", w64, x4)  # (N, K, H, W), NCHW whatever the layout
    rtol, atol = TOL[dtype]
    tol = {"rtol": 2 * rtol, "atol": 2 * atol}  # a sum over C products, rounded

    assert logits.dtype == dtype
    np.testing.assert_allclose(numpy64(logits), logits_ref if batched else logits_ref[0], **tol)
    g = rng.standard_normal(logits_ref.shape)
    loss = (logits * torch.from_numpy(g if batched else g[0]).to(device, dtype)).sum()
    if return_maps:
        assert maps is not None and maps.dtype == dtype
        np.testing.assert_allclose(numpy64(maps), maps_ref if batched else maps_ref[0], **tol)
        cam_logits = numpy64(maps).mean(axis=(-2, -1)) + b64
        np.testing.assert_allclose(cam_logits, numpy64(logits), **tol)
        assert not maps.requires_grad  # a by-product for CAM, on every backend
    loss.backward()

    grad_x = ref.global_avg_pool2d_backward(g @ w64, x4)
    grad_w = g.T @ pooled
    assert x.grad is not None and w.grad is not None
    np.testing.assert_allclose(numpy64(x.grad), to_layout(grad_x, layout), **tol)
    np.testing.assert_allclose(numpy64(w.grad), grad_w, **tol)
    if b is not None:
        assert b.grad is not None
        np.testing.assert_allclose(numpy64(b.grad), g.sum(axis=0), **tol)


# ----------------------------------------------------------------------------- memory format


class _OpLog(TorchDispatchMode):
    """Records the name of every aten op that runs inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


COPY_OPS = {"clone", "contiguous", "_to_copy", "copy_", "to"}

NO_COPY_CALLS = [  # (op, keyword arguments)
    # PyTorch's own pool with symmetric padding, indices in the same format
    ("max_pool2d", {"kernel_size": 3, "stride": 2, "padding": 1, "return_indices": True}),
    # asymmetric "same": the strided-view path (its first tap is copied into the output)
    ("max_pool2d", {"kernel_size": 3, "stride": 2, "padding": "same", "return_indices": True}),
    ("avg_pool2d", {"kernel_size": 3, "stride": 2, "padding": 1}),
    ("avg_pool2d", {"kernel_size": 3, "stride": 2, "padding": "same"}),
    ("adaptive_avg_pool2d", {"output_size": (3, 2)}),
    ("adaptive_max_pool2d", {"output_size": 3, "return_indices": True}),
    # every global kind, keeping dims so that the result is 4-d
    *[("global_pool2d", {"kind": kind, "keepdim": True}) for kind in KINDS],
]


@pytest.mark.parametrize(
    ("layout", "channels_last"), [LAYOUTS[1], LAYOUTS[2], LAYOUTS[4]], ids=lambda v: str(v)
)
@pytest.mark.parametrize(("name", "kwargs"), rows(NO_COPY_CALLS))
def test_channels_last_runs_without_copies(
    name: str, kwargs: dict, layout: str, channels_last: bool, rng: np.random.Generator
) -> None:
    x = make_tensor(random_input(rng, (8, 7), layout), layout, torch.float32, channels_last)
    with _OpLog() as log:
        out = getattr(GF, name)(x, **kwargs, layout=layout, backend="torch")
    # the strided-view path of "same" writes a window's first tap into the output with copy_:
    # the op's own arithmetic, not a copy of the input into another layout
    allowed = {"copy_"} if kwargs.get("padding") == "same" else set()
    assert not (COPY_OPS - allowed) & set(log.ops), log.ops
    y = out[0] if kwargs.get("return_indices") else out
    assert_memory_format(y, channels_last)
    if kwargs.get("return_indices"):
        assert_memory_format(out[1], channels_last)


# ----------------------------------------------------------------------------- random arguments


def _ints(lo: int, hi: int) -> st.SearchStrategy:
    """An int or a pair of ints in [lo, hi]."""
    return st.integers(lo, hi) | st.tuples(st.integers(lo, hi), st.integers(lo, hi))


@st.composite
def _window_call(draw: st.DrawFn, op: str) -> tuple[np.ndarray, str, bool, dict, int]:
    """A small float64 NCHW input (N may be 0), a layout, channels_last, the op's keyword
    arguments (not all valid) and a seed."""
    layout, channels_last = draw(
        st.sampled_from(
            [("NCHW", False), ("NCHW", True), ("NHWC", False), ("CHW", False), ("HWC", False)]
        )
    )
    n = draw(st.integers(0, 2)) if layout in ("NCHW", "NHWC") else 1
    shape = (n, draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    seed = draw(st.integers(0, 2**32 - 1))
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
    x = np.random.default_rng(seed).standard_normal(shape)
    return x, layout, channels_last, kwargs, seed


def check_or_both_refuse(name: str, call: tuple[np.ndarray, str, bool, dict, int]) -> None:
    """Where the reference refuses the arguments gapnet.functional must raise the same error;
    elsewhere they must agree."""
    x_nchw, layout, channels_last, kwargs, seed = call
    try:
        getattr(ref, name)(to_layout(x_nchw, layout), **kwargs, layout=layout)
    except (ValueError, TypeError) as error:
        x = make_tensor(x_nchw, layout, torch.float64, channels_last)
        with pytest.raises(type(error), match=re.escape(str(error))):
            getattr(GF, name)(x, **kwargs, layout=layout)
        return
    rng = np.random.default_rng(seed + 1)
    check_op(rng, name, x_nchw, kwargs, layout, channels_last=channels_last)


@settings(max_examples=50, deadline=None)
@given(call=_window_call("max_pool2d"))
def test_max_pool2d_random(call: tuple) -> None:
    check_or_both_refuse("max_pool2d", call)


@settings(max_examples=50, deadline=None)
@given(call=_window_call("avg_pool2d"))
def test_avg_pool2d_random(call: tuple) -> None:
    check_or_both_refuse("avg_pool2d", call)


# ----------------------------------------------------------------------------- gradcheck

GRADCHECK_CALLS = [  # (op, keyword arguments, layout)
    # padding 1: border windows hold padding
    ("max_pool2d", {"kernel_size": 3, "stride": 2, "padding": 1}, "NCHW"),
    # Keras "same" (asymmetric padding) with dilation
    ("max_pool2d", {"kernel_size": 2, "stride": 1, "dilation": 2, "padding": "same"}, "NHWC"),
    # ceil_mode with overlapping windows, unbatched
    ("max_pool2d", {"kernel_size": (2, 3), "stride": 1, "ceil_mode": True}, "HWC"),
    # ceil_mode past the padding, padding not counted
    (
        "avg_pool2d",
        {
            "kernel_size": 3,
            "stride": 2,
            "padding": 1,
            "ceil_mode": True,
            "count_include_pad": False,
        },
        "NCHW",
    ),
    # Keras "same": real cells only
    ("avg_pool2d", {"kernel_size": 3, "stride": 2, "padding": "same"}, "NHWC"),
    # a negative divisor_override
    ("avg_pool2d", {"kernel_size": 2, "divisor_override": -3}, "CHW"),
    # overlapping adaptive bins
    ("adaptive_avg_pool2d", {"output_size": (3, 2)}, "NHWC"),
    # adaptive bins that grow the W axis
    ("adaptive_max_pool2d", {"output_size": (2, 7)}, "NCHW"),
    # every global kind
    *[("global_pool2d", {"kind": kind}, "NCHW") for kind in KINDS],
    # GeM with a clamp between the values, keeping dims, channels last
    ("global_pool2d", {"kind": "gem", "p": 2.5, "eps": 1.075, "keepdim": True}, "NHWC"),
    # the wrappers, unbatched and channels last
    ("global_avg_pool2d", {"keepdim": True}, "HWC"),
    ("global_max_pool2d", {}, "NHWC"),
]


def _distinct_input(rng: np.random.Generator, layout: str) -> torch.Tensor:
    """Distinct values 0.1 apart (no ties among maxima), all above GeM's clamp or 0.025 away
    from it, so that every derivative exists."""
    x = 0.5 + 0.1 * rng.permutation(50).reshape(1, 2, 5, 5) + rng.uniform(0, 0.05)
    return make_tensor(x, layout, torch.float64).requires_grad_(True)


@pytest.mark.parametrize(("name", "kwargs", "layout"), rows(GRADCHECK_CALLS))
def test_gradcheck(name: str, kwargs: dict, layout: str, rng: np.random.Generator) -> None:
    x = _distinct_input(rng, layout)
    op = getattr(GF, name)
    assert torch.autograd.gradcheck(lambda x: op(x, **kwargs, layout=layout, backend="torch"), (x,))


@pytest.mark.parametrize("layout", ["NCHW", "HWC"])
def test_gradcheck_gem_p(layout: str, rng: np.random.Generator) -> None:
    x = _distinct_input(rng, layout)
    p = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, p: GF.global_pool2d(x, "gem", p=p, layout=layout, backend="torch"), (x, p)
    )


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "HWC"])
def test_gradcheck_gap_linear(layout: str, rng: np.random.Generator) -> None:
    x = _distinct_input(rng, layout)
    w = torch.from_numpy(rng.standard_normal((3, 2))).requires_grad_(True)
    b = torch.from_numpy(rng.standard_normal(3)).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: GF.gap_linear(x, w, b, layout=layout, return_maps=True, backend="torch"),
        (x, w, b),
    )


@pytest.mark.parametrize("matmul", [False, True], ids=["mean", "plane-means-by-matmul"])
@pytest.mark.parametrize(("layout", "channels_last"), LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["global_pool2d", "gap_linear"])
def test_gap_backward_is_pytorchs_in_the_inputs_layout(
    op: str,
    dtype: torch.dtype,
    layout: str,
    channels_last: bool,
    matmul: bool,
    rng: np.random.Generator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The backward of the mean (`_MeanHW`) writes PyTorch's gradient bit for bit, in one
    tensor with the input's own strides (no copy left for autograd to make); with `matmul`
    every channels_last float32 input takes the plane means as a matrix product, whatever its
    size (`_strided.prefers_plane_means`)."""
    if matmul:
        monkeypatch.setattr(_strided, "_MEANS_MIN_NUMEL", 0)
        monkeypatch.setattr(GF, "_PLANS", {})
    x = make_tensor(rng.standard_normal((3, 4, 5, 6)), layout, dtype, channels_last)
    mine, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    dims = (-3, -2) if layout.endswith("HWC") else (-2, -1)
    if op == "gap_linear":
        w = torch.from_numpy(rng.standard_normal((7, 4))).to(dtype)
        y, expected = GF.gap_linear(mine, w, layout=layout), theirs.mean(dims) @ w.T
    else:
        y, expected = GF.global_pool2d(mine, layout=layout), theirs.mean(dims)
    g = torch.from_numpy(rng.standard_normal(tuple(y.shape))).to(dtype)
    torch.testing.assert_close(y, expected)
    y.backward(g)
    expected.backward(g)
    assert mine.grad is not None and theirs.grad is not None
    assert torch.equal(mine.grad, theirs.grad)
    assert mine.grad.stride() == x.stride()


@pytest.mark.parametrize(("layout", "channels_last"), LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gem_gradients_are_autograds_in_the_inputs_layout(
    dtype: torch.dtype, layout: str, channels_last: bool, rng: np.random.Generator
) -> None:
    """`_GeM`'s written-out gradients for x and a learnable p equal autograd's through the
    formula (zeros below the clamp included), and grad_x has the input's strides."""
    x_nchw = np.abs(rng.standard_normal((3, 4, 5, 6)))
    x_nchw[0, 0, :2] = 0.0  # under the clamp: no gradient
    x = make_tensor(x_nchw, layout, dtype, channels_last)
    dims = (-3, -2) if layout.endswith("HWC") else (-2, -1)
    mine, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    p_mine, p_theirs = (torch.tensor(2.5, requires_grad=True) for _ in range(2))
    y = GF.global_pool2d(mine, "gem", p=p_mine, eps=1e-3, layout=layout)
    z = theirs.float().clamp(min=1e-3)
    expected = z.pow(p_theirs).mean(dims).pow(1.0 / p_theirs)
    g = torch.from_numpy(rng.standard_normal(tuple(y.shape))).to(dtype)
    y.backward(g)
    expected.backward(g.float())
    rtol, atol = TOL[dtype]
    assert mine.grad is not None and theirs.grad is not None
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(p_mine.grad, p_theirs.grad)
    assert mine.grad.stride() == x.stride()
    assert not mine.grad[x < 1e-3].any()


def _formula(kind: str, t: torch.Tensor, p: float | torch.Tensor = 3.0) -> torch.Tensor:
    """What global_pool2d(t, kind, layout="NHWC") computes, in plain autograd ops."""
    if kind == "avg":
        return t.mean((1, 2))
    return t.clamp(min=1e-6).pow(p).mean((1, 2)).pow(1.0 / p)


@pytest.mark.parametrize("kind", ["avg", "gem"])
def test_global_pool_derivatives_of_every_order_and_mode(
    kind: str, rng: np.random.Generator
) -> None:
    """`_MeanHW` and `_GeM` (their own backward and jvp) against autograd through the formula:
    second derivatives (create_graph), a learnable p, torch.func's jacrev, jvp and hessian,
    forward-mode AD, and vmap over channels_last samples."""
    x = _distinct_input(rng, "NHWC")
    p = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)

    def mine(t: torch.Tensor, p: float | torch.Tensor = 3.0) -> torch.Tensor:
        return GF.global_pool2d(t, kind, p=p, layout="NHWC") ** 2

    def theirs(t: torch.Tensor, p: float | torch.Tensor = 3.0) -> torch.Tensor:
        return _formula(kind, t, p) ** 2

    assert torch.autograd.gradgradcheck(mine, (x,))
    if kind == "gem":
        assert torch.autograd.gradgradcheck(mine, (x, p))
    x0 = x.detach()
    for transform in (torch.func.jacrev, torch.func.jacfwd, torch.func.hessian):
        torch.testing.assert_close(transform(mine)(x0), transform(theirs)(x0))
    tangent = torch.from_numpy(rng.standard_normal(tuple(x.shape)))
    torch.testing.assert_close(
        torch.func.jvp(mine, (x0,), (tangent,)), torch.func.jvp(theirs, (x0,), (tangent,))
    )
    with torch.autograd.forward_ad.dual_level():  # a primal that requires grad too
        dual = torch.autograd.forward_ad.make_dual(x, tangent)
        got = torch.autograd.forward_ad.unpack_dual(mine(dual)).tangent
    torch.testing.assert_close(got, torch.func.jvp(theirs, (x0,), (tangent,))[1])
    # three NHWC samples: each one's NCHW view is channels_last, whose strides vmap must read
    samples = x0 + torch.arange(3.0, dtype=x0.dtype)[:, None, None, None, None]
    per_sample = torch.func.vmap(torch.func.grad(lambda t: mine(t).sum()))(samples)
    torch.testing.assert_close(
        per_sample, torch.func.vmap(torch.func.grad(lambda t: theirs(t).sum()))(samples)
    )


# ----------------------------------------------------------------------------- ties and NaN

NAN = math.nan

TIES_CALLS = [  # (op, keyword arguments) whose result picks one cell per window
    # overlapping windows with padding: a cell is the max of several windows
    ("max_pool2d", {"kernel_size": 3, "stride": 1, "padding": 1, "return_indices": True}),
    # dilated windows: row-major order over the taps, not over the span
    ("max_pool2d", {"kernel_size": 2, "stride": 2, "dilation": 2, "return_indices": True}),
    # asymmetric "same" padding
    ("max_pool2d", {"kernel_size": 3, "stride": 2, "padding": "same", "return_indices": True}),
    # overlapping adaptive bins
    ("adaptive_max_pool2d", {"output_size": (3, 4), "return_indices": True}),
    # the global kinds that take a max: its gradient goes to one cell, not split among ties
    ("global_pool2d", {"kind": "max"}),
    ("global_pool2d", {"kind": "avgmax"}),
    ("global_pool2d", {"kind": "catavgmax"}),
]


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [
        pytest.param("torch", torch.float64, id="torch-float64"),
        pytest.param("torch", torch.bfloat16, id="torch-bfloat16"),
        pytest.param("triton", torch.float32, marks=pytest.mark.triton, id="triton-float32"),
        pytest.param("triton", torch.bfloat16, marks=pytest.mark.triton, id="triton-bfloat16"),
    ],
)
@pytest.mark.parametrize(("name", "kwargs"), rows(TIES_CALLS))
def test_ties_and_nan(
    name: str, kwargs: dict, backend: str, dtype: torch.dtype, rng: np.random.Generator
) -> None:
    if backend == "triton" and name not in KERNEL_OP:
        pytest.skip(f"{name} always runs PyTorch's kernels")
    # Few distinct values, exact in every dtype: most windows hold ties, many a NaN or two.
    x = rng.choice([0.0, 1.0, 2.0, NAN], size=(2, 3, 7, 7), p=[0.3, 0.3, 0.3, 0.1])
    for layout, channels_last in (("NCHW", False), ("NCHW", True), ("HWC", False)):
        x_in = x[:1] if layout == "HWC" else x
        check_op(rng, name, x_in, kwargs, layout, backend, dtype, channels_last)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_max_pool_ties_and_nan_by_hand(backend: str, layout: str) -> None:
    ties = np.array([[[[1.0, 7.0, 7.0, 2.0], [7.0, 3.0, 7.0, 7.0]]]])  # two 2x2 windows
    nans = np.array([[[[NAN, 1.0, 5.0, NAN], [2.0, NAN, NAN, 3.0]]]])
    # ties: the first 7 of each window in row-major order; NaN: the last NaN of each window
    for x_nchw, values, indices, grad in (
        (ties, [7.0, 7.0], [1, 2], [[0, 10, 20, 0], [0, 0, 0, 0]]),
        (nans, [NAN, NAN], [5, 6], [[0, 0, 0, 0], [0, 10, 20, 0]]),
    ):
        device = TRITON_DEVICE if backend == "triton" else "cpu"
        x = make_tensor(x_nchw, layout, torch.float32, device=device)
        if backend == "triton":
            require_triton(x, "max_pool2d")
        x.requires_grad_(True)
        y, index = GF.max_pool2d(x, 2, layout=layout, return_indices=True, backend=backend)
        np.testing.assert_array_equal(numpy64(y).flatten(), values)
        assert index.flatten().tolist() == indices
        y.backward(torch.tensor([10.0, 20.0], device=device).reshape(y.shape))
        assert x.grad is not None
        np.testing.assert_array_equal(numpy64(x.grad), to_layout(np.array([[grad]]), layout))


def test_max_pool_same_of_only_minus_inf_points_at_a_real_cell() -> None:
    # 7x8, k=3, s=2, "same": one padding row on top (rows 1 + 1, columns 0 + 1)
    x = torch.full((1, 1, 7, 8), -math.inf, dtype=torch.float64, requires_grad=True)
    y, index = GF.max_pool2d(x, 3, 2, "same", return_indices=True, backend="torch")
    _, index_ref = ref.max_pool2d(x.detach().numpy(), 3, 2, "same", return_indices=True)
    np.testing.assert_array_equal(index.numpy(), index_ref)
    y.sum().backward()
    assert x.grad is not None and x.grad.sum().item() == y.numel()


# ----------------------------------------------------------------------------- empty batch

EMPTY_CALLS = [  # (op, keyword arguments) on a (0, 3, 5, 6) input
    # PyTorch's pool, with indices
    ("max_pool2d", {"kernel_size": 2, "return_indices": True}),
    # the -inf padded path of "same"
    ("max_pool2d", {"kernel_size": 3, "stride": 2, "padding": "same"}),
    # the zero padded path of "same"
    ("avg_pool2d", {"kernel_size": 3, "stride": 1, "padding": "same"}),
    ("avg_pool2d", {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}),
    ("adaptive_avg_pool2d", {"output_size": (2, 4)}),
    ("adaptive_max_pool2d", {"output_size": 1, "return_indices": True}),
    # every global kind: (0, C) results
    *[("global_pool2d", {"kind": kind}) for kind in KINDS],
    # (0, 1, 1, 2C) in NHWC
    ("global_pool2d", {"kind": "catavgmax", "keepdim": True}),
]


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [
        pytest.param("torch", torch.float64, id="torch"),
        pytest.param("triton", torch.float32, marks=pytest.mark.triton, id="triton"),
    ],
)
@pytest.mark.parametrize(("layout", "channels_last"), LAYOUTS[:3])
@pytest.mark.parametrize(("name", "kwargs"), rows(EMPTY_CALLS))
def test_empty_batch(
    name: str,
    kwargs: dict,
    layout: str,
    channels_last: bool,
    backend: str,
    dtype: torch.dtype,
    rng: np.random.Generator,
) -> None:
    if backend == "triton" and name not in KERNEL_OP:
        pytest.skip(f"{name} always runs PyTorch's kernels")
    x = rng.standard_normal((0, 3, 5, 6))
    check_op(rng, name, x, kwargs, layout, backend, dtype, channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_gap_linear(backend: str) -> None:
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x = torch.zeros(0, 4, 3, 3, device=device, requires_grad=True)
    if backend == "triton":
        require_triton(x, "gap_linear")
    w = torch.ones(5, 4, device=device, requires_grad=True)
    bias = torch.ones(5, device=device)
    logits, maps = GF.gap_linear(x, w, bias, return_maps=True, backend=backend)
    assert logits.shape == (0, 5) and maps.shape == (0, 5, 3, 3)
    (logits.sum() + maps.sum()).backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert w.grad is not None and not w.grad.any()


# ----------------------------------------------------------------------------- precision bugs


def test_avg_pool_same_float16_accumulates_in_float32() -> None:
    x = torch.full((1, 2, 7, 7), 30000.0, dtype=torch.float16)
    y = GF.avg_pool2d(x, 3, 1, "same", backend="torch")
    np.testing.assert_array_equal(y.float().numpy(), np.full((1, 2, 7, 7), 30000.0))


def test_gem_float16_accumulates_in_float32() -> None:
    x = torch.full((1, 2, 3, 3), 50.0, dtype=torch.float16)
    y = GF.global_pool2d(x, "gem", backend="torch")
    np.testing.assert_array_equal(y.numpy(), ref.global_pool2d(x.numpy(), "gem"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gem_tensor_p_keeps_the_input_dtype(dtype: torch.dtype) -> None:
    x = torch.rand(2, 3, 4, 4).to(dtype)
    assert GF.global_pool2d(x, "gem", p=torch.tensor([3.0]), backend="torch").dtype == dtype


@pytest.mark.parametrize(
    "p", [3.0, torch.tensor([2.5], dtype=torch.float64), torch.tensor([2.5], dtype=torch.float32)]
)
def test_gem_without_autograd_matches_and_keeps_the_input(p: float | torch.Tensor) -> None:
    """Inference powers a private clamped copy in place (unless p's dtype would promote it):
    the very same values as with autograd, and the input untouched."""
    x = torch.rand(2, 3, 5, 5)
    before = x.clone()
    with torch.no_grad():
        fast = GF.global_pool2d(x, "gem", p=p, backend="torch")
    np.testing.assert_array_equal(x.numpy(), before.numpy())
    with_grad = GF.global_pool2d(x.requires_grad_(), "gem", p=p, backend="torch")
    np.testing.assert_array_equal(fast.numpy(), with_grad.detach().numpy())


def test_cached_plans_tell_bools_from_ints() -> None:
    """Validated calls are kept by argument; True == 1 must still be refused after
    kernel_size=1 ran, and 2.0 == 2 after kernel_size=2."""
    x = torch.rand(1, 1, 4, 4)
    GF.max_pool2d(x, 1)
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair of ints"):
        GF.max_pool2d(x, True)
    GF.max_pool2d(x, 1, (1, 1))
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
        GF.max_pool2d(x, 1, (True, 1))
    GF.avg_pool2d(x, 2)
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair of ints"):
        GF.avg_pool2d(x, 2.0)


def test_cached_plans_keep_every_check_that_depends_on_the_input() -> None:
    """A call validated once is remembered per input shape, dtype and layout: an input that
    differs in any of them is checked again."""
    x = torch.rand(1, 1, 4, 4)
    GF.max_pool2d(x, 2)
    GF.global_pool2d(x)
    with pytest.raises(TypeError, match="expects a floating-point input"):
        GF.max_pool2d(x.to(torch.int32), 2)
    with pytest.raises(ValueError, match="output would be empty"):
        GF.max_pool2d(x[..., :1], 2)
    with pytest.raises(ValueError, match="expects a 3-d input"):
        GF.global_pool2d(x, layout="CHW")
    with pytest.raises(ValueError, match="backend must be one of"):
        GF.max_pool2d(x, 2, backend="cuda")


def test_plans_never_key_on_what_repr_cannot_tell_apart() -> None:
    """A generator's repr holds its address, which a later generator may reuse: such arguments
    are validated on every call; unhashable ones get the validation error, not a TypeError
    about hashing."""
    x = torch.rand(1, 1, 8, 8)
    for k in (2, 4, 2, 4):
        assert GF.max_pool2d(x, (v for v in (k, k))).shape == (1, 1, 8 // k, 8 // k)
    with pytest.raises(ValueError, match="layout must be one of"):
        GF.global_pool2d(x, layout=["NCHW"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend must be one of"):
        GF.max_pool2d(x, 2, backend=["torch"])  # type: ignore[arg-type]


def test_plans_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A program that pools ever-new shapes does not grow the plans without end."""
    monkeypatch.setattr(GF, "_MAX_PLANS", 3)
    monkeypatch.setattr(GF, "_PLANS", {})
    for size in range(4, 12):
        GF.avg_pool2d(torch.rand(1, 1, size, size), 2)
        assert 1 <= len(GF._PLANS) <= 3


# ----------------------------------------------------------------------------- bad input

W = torch.ones(4, 3)

BAD_CALLS = [  # (call on a (2, 3, 5, 5) float32 tensor x, error type, regex the message matches)
    # not a tensor
    pytest.param(lambda x: GF.max_pool2d(x.numpy(), 2), TypeError,
                 "max_pool2d expects a torch.Tensor, got ndarray", id="ndarray"),
    pytest.param(lambda x: GF.global_pool2d(x.tolist()), TypeError,
                 "global_pool2d expects a torch.Tensor, got list", id="list"),
    # integer and bool tensors
    pytest.param(lambda x: GF.max_pool2d(x.long(), 2), TypeError,
                 "floating-point input .* got int64", id="int64"),
    pytest.param(lambda x: GF.avg_pool2d(x.to(torch.uint8), 2), TypeError,
                 "floating-point input .* got uint8", id="uint8"),
    pytest.param(lambda x: GF.adaptive_max_pool2d(x.int(), 2), TypeError,
                 "floating-point input .* got int32", id="int32-adaptive"),
    pytest.param(lambda x: GF.global_avg_pool2d(x > 0), TypeError,
                 "floating-point input .* got bool", id="bool"),
    pytest.param(lambda x: GF.gap_linear(x.long(), W), TypeError,
                 "floating-point input .* got int64", id="int64-gap-linear"),
    # wrong rank for the layout
    pytest.param(lambda x: GF.max_pool2d(x[0], 2), ValueError,
                 r"layout='NCHW' expects a 4-d input .* got shape \(3, 5, 5\)", id="rank"),
    pytest.param(lambda x: GF.avg_pool2d(x, 2, layout="HWC"), ValueError,
                 "layout='HWC' expects a 3-d", id="rank-hwc"),
    pytest.param(lambda x: GF.adaptive_avg_pool2d(x[0, 0], 2, layout="CHW"), ValueError,
                 "layout='CHW' expects a 3-d", id="rank-adaptive"),
    pytest.param(lambda x: GF.global_pool2d(x[None]), ValueError,
                 "layout='NCHW' expects a 4-d", id="rank-global"),
    pytest.param(lambda x: GF.gap_linear(x[0], W), ValueError,
                 "layout='NCHW' expects a 4-d", id="rank-gap-linear"),
    # unknown layout
    pytest.param(lambda x: GF.max_pool2d(x, 2, layout="nchw"), ValueError,
                 "layout must be one of .* got 'nchw'", id="layout"),
    pytest.param(lambda x: GF.adaptive_max_pool2d(x, 2, layout="NWHC"), ValueError,
                 "layout must be one of .* got 'NWHC'", id="layout-adaptive"),
    pytest.param(lambda x: GF.global_max_pool2d(x, layout="CHWN"), ValueError,
                 "layout must be one of .* got 'CHWN'", id="layout-global"),
    # unknown kind
    pytest.param(lambda x: GF.global_pool2d(x, "median"), ValueError,
                 "kind must be one of .* got 'median'", id="kind"),
    # kernel, stride or dilation < 1, or not ints
    pytest.param(lambda x: GF.max_pool2d(x, 0), ValueError,
                 "kernel_size must be >= 1, got 0", id="kernel"),
    pytest.param(lambda x: GF.avg_pool2d(x, (2, -1)), ValueError,
                 r"kernel_size must be >= 1, got \(2, -1\)", id="kernel-pair"),
    pytest.param(lambda x: GF.avg_pool2d(x, 2, 0), ValueError,
                 "stride must be >= 1, got 0", id="stride"),
    pytest.param(lambda x: GF.max_pool2d(x, 2, (1, 0)), ValueError,
                 r"stride must be >= 1, got \(1, 0\)", id="stride-pair"),
    pytest.param(lambda x: GF.max_pool2d(x, 2, dilation=0), ValueError,
                 "dilation must be >= 1, got 0", id="dilation"),
    pytest.param(lambda x: GF.max_pool2d(x, 2.0), TypeError,
                 "kernel_size must be an int or a pair", id="kernel-float"),
    pytest.param(lambda x: GF.avg_pool2d(x, (2, 2, 2)), TypeError,
                 "kernel_size must be an int or a pair", id="kernel-triple"),
    # too much, negative or unknown padding
    pytest.param(lambda x: GF.max_pool2d(x, 3, padding=2), ValueError,
                 "padding must be at most half of kernel_size", id="padding"),
    pytest.param(lambda x: GF.avg_pool2d(x, 2, padding=(0, 2)), ValueError,
                 "padding must be at most half of kernel_size", id="padding-avg"),
    pytest.param(lambda x: GF.avg_pool2d(x, 3, padding=-1), ValueError,
                 "padding must be >= 0, got -1", id="padding-negative"),
    pytest.param(lambda x: GF.max_pool2d(x, 3, padding="full"), ValueError,
                 "padding must be .* got 'full'", id="padding-string"),
    pytest.param(lambda x: GF.avg_pool2d(x, 3, padding="same", ceil_mode=True), ValueError,
                 "ceil_mode", id="same-ceil"),
    # an output that would be empty, a window of padding only, an empty plane
    pytest.param(lambda x: GF.max_pool2d(x, 6), ValueError,
                 "output would be empty", id="empty-output"),
    pytest.param(lambda x: GF.avg_pool2d(x[:, :, :0], 1), ValueError,
                 "output would be empty", id="empty-plane-avg"),
    pytest.param(lambda x: GF.max_pool2d(x[:, :, :2, :2], 2, 1, 1, 3), ValueError,
                 "only padding", id="padding-window"),
    pytest.param(lambda x: GF.global_pool2d(x[:, :, :0]), ValueError,
                 "H and W must be >= 1, got 0x5", id="empty-plane"),
    pytest.param(lambda x: GF.adaptive_max_pool2d(x[:, :, :, :0], 2), ValueError,
                 "H and W must be >= 1", id="empty-plane-adaptive"),
    pytest.param(lambda x: GF.gap_linear(x[:, :, :0], W), ValueError,
                 "H and W must be >= 1", id="empty-plane-gap-linear"),
    # adaptive output size < 1 or not ints
    pytest.param(lambda x: GF.adaptive_avg_pool2d(x, (2, 0)), ValueError,
                 "output_size must be >= 1", id="output-size"),
    pytest.param(lambda x: GF.adaptive_max_pool2d(x, 2.5), TypeError,
                 "output_size must be an int or a pair", id="output-size-float"),
    pytest.param(lambda x: GF.adaptive_avg_pool2d(x, (1, 2, 3)), TypeError,
                 "output_size must be an int or a pair", id="output-size-triple"),
    # divisor_override of 0 or not an int
    pytest.param(lambda x: GF.avg_pool2d(x, 2, divisor_override=0), ValueError,
                 "divisor_override must be nonzero, got 0", id="divisor-zero"),
    pytest.param(lambda x: GF.avg_pool2d(x, 2, divisor_override=2.5), TypeError,
                 "divisor_override must be an int or None, got 2.5", id="divisor-float"),
    # GeM's p <= 0 and eps <= 0
    pytest.param(lambda x: GF.global_pool2d(x, "gem", p=0.0), ValueError,
                 "p must be > 0, got 0.0", id="p-zero"),
    pytest.param(lambda x: GF.global_pool2d(x, "gem", p=-1.5), ValueError,
                 "p must be > 0, got -1.5", id="p-negative"),
    pytest.param(lambda x: GF.global_pool2d(x, "gem", eps=0.0), ValueError,
                 "eps must be > 0, got 0.0", id="eps"),
    # an unknown backend name, on every op (adaptive pools accept the argument too)
    pytest.param(lambda x: GF.max_pool2d(x, 2, backend="cuda"), ValueError,
                 "backend must be one of auto, torch, triton, got 'cuda'", id="backend-max"),
    pytest.param(lambda x: GF.avg_pool2d(x, 2, backend="Torch"), ValueError,
                 "backend must be one of .* got 'Torch'", id="backend-avg"),
    pytest.param(lambda x: GF.adaptive_avg_pool2d(x, 2, backend="cudnn"), ValueError,
                 "backend must be one of .* got 'cudnn'", id="backend-adaptive-avg"),
    pytest.param(lambda x: GF.adaptive_max_pool2d(x, 2, backend=""), ValueError,
                 "backend must be one of .* got ''", id="backend-adaptive-max"),
    pytest.param(lambda x: GF.global_pool2d(x, backend="numpy"), ValueError,
                 "backend must be one of .* got 'numpy'", id="backend-global"),
    pytest.param(lambda x: GF.gap_linear(x, W, backend="tpu"), ValueError,
                 "backend must be one of .* got 'tpu'", id="backend-gap-linear"),
    # gap_linear's weight and bias shapes
    pytest.param(lambda x: GF.gap_linear(x, torch.ones(4, 5)), ValueError,
                 r"weight must be \(num_classes, 3\), got \(4, 5\)", id="weight-columns"),
    pytest.param(lambda x: GF.gap_linear(x, torch.ones(3)), ValueError,
                 r"weight must be \(num_classes, 3\), got \(3,\)", id="weight-rank"),
    pytest.param(lambda x: GF.gap_linear(x, W, torch.ones(3)), ValueError,
                 r"bias must be \(4,\), got \(3,\)", id="bias-length"),
    pytest.param(lambda x: GF.gap_linear(x, W, torch.ones(1, 4)), ValueError,
                 r"bias must be \(4,\), got \(1, 4\)", id="bias-rank"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "match"), BAD_CALLS)
def test_bad_input_raises(
    call: Callable[[torch.Tensor], Any], error: type, match: str, rng: np.random.Generator
) -> None:
    x = torch.from_numpy(rng.standard_normal((2, 3, 5, 5))).float()
    with pytest.raises(error, match=match):
        call(x)


TRITON_CALLS = [  # every op that takes backend="triton" and runs it (adaptive pools do not)
    pytest.param(lambda x, **kw: GF.max_pool2d(x, 2, **kw), id="max_pool2d"),
    pytest.param(lambda x, **kw: GF.avg_pool2d(x, 3, 1, "same", **kw), id="avg_pool2d"),
    pytest.param(lambda x, **kw: GF.global_pool2d(x, "gem", **kw), id="global_pool2d"),
    pytest.param(lambda x, **kw: GF.global_avg_pool2d(x, **kw), id="global_avg_pool2d"),
    pytest.param(lambda x, **kw: GF.gap_linear(x, W.to(x.dtype), **kw), id="gap_linear"),
]


@pytest.mark.parametrize("call", TRITON_CALLS)
def test_triton_backend_refuses_float64_and_says_why(call: Callable, rng: np.random.Generator):
    from gapnet import _ops

    x = torch.from_numpy(rng.standard_normal((2, 3, 5, 5)))  # float64: no kernel takes it
    reason = _ops.unsupported_reason(x)
    assert reason is not None
    with pytest.raises(ValueError, match="backend='triton' cannot run this input") as info:
        call(x, backend="triton")
    assert reason in str(info.value)
    if "not installed" not in reason:
        assert "float64" in reason
    call(x, backend="auto")  # auto falls back to PyTorch


@pytest.mark.parametrize("call", TRITON_CALLS)
def test_triton_backend_refuses_a_cpu_tensor_without_the_interpreter(
    call: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from gapnet import _ops

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 3, 5, 5)
    reason = _ops.unsupported_reason(x)
    assert reason is not None and ("cpu" in reason or "not installed" in reason)
    with pytest.raises(ValueError, match="backend='triton' cannot run this input") as info:
        call(x, backend="triton")
    assert reason in str(info.value)


# ----------------------------------------------------------------------------- backends


def test_backend_names() -> None:
    assert GF.BACKENDS == ("auto", "torch", "triton")
    assert gapnet.set_backend is GF.set_backend and gapnet.use_backend is GF.use_backend


@pytest.mark.usefixtures("restore_backend")
def test_set_backend_switches_the_default() -> None:
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)  # float64: Triton refuses it, PyTorch not
    GF.set_backend("triton")
    with pytest.raises(ValueError, match="max_pool2d: backend='triton' cannot run"):
        GF.max_pool2d(x, 2)
    with pytest.raises(ValueError, match="global_pool2d: backend='triton' cannot run"):
        GF.global_pool2d(x)
    GF.max_pool2d(x, 2, backend="torch")  # an explicit backend= beats the default
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'gpu'"):
        GF.set_backend("gpu")
    with pytest.raises(ValueError, match="backend='triton'"):  # the default is unchanged
        GF.avg_pool2d(x, 2)
    GF.set_backend("torch")
    GF.max_pool2d(x, 2)
    GF.set_backend("auto")
    torch.testing.assert_close(GF.max_pool2d(x, 2), torch.nn.functional.max_pool2d(x, 2))


@pytest.mark.usefixtures("restore_backend")
def test_use_backend_switches_and_restores() -> None:
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    GF.set_backend("torch")
    with GF.use_backend("triton"):
        with pytest.raises(ValueError, match="backend='triton'"):
            GF.max_pool2d(x, 2)
        with GF.use_backend("auto"):  # nested blocks restore their own previous default
            GF.max_pool2d(x, 2)
        with pytest.raises(ValueError, match="backend='triton'"):
            GF.gap_linear(x, torch.ones(4, 2, dtype=torch.float64))
    GF.max_pool2d(x, 2)
    with pytest.raises(RuntimeError, match="inside"), GF.use_backend("triton"):
        raise RuntimeError("inside")
    GF.max_pool2d(x, 2)  # restored after an exception too
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'bogus'"):  # noqa: SIM117
        with GF.use_backend("bogus"):
            pass
    GF.max_pool2d(x, 2)


@pytest.mark.usefixtures("restore_backend")
def test_auto_runs_pytorch_on_cpu() -> None:
    x = torch.randn(1, 2, 6, 6)
    with GF.use_backend("auto"), _OpLog() as log:
        GF.max_pool2d(x, 2)
        GF.avg_pool2d(x, 2)
    assert {"max_pool2d_with_indices", "avg_pool2d"} <= set(log.ops)


# ----------------------------------------------------------------------------- seed examples


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_max_pool_2x2_halves_and_keeps_each_window_max(
    layout: str, rng: np.random.Generator
) -> None:
    x_nchw = rng.standard_normal((2, 3, 6, 8))
    y = GF.max_pool2d(make_tensor(x_nchw, layout, torch.float64), 2, 2, layout=layout)
    assert tuple(y.shape) == to_layout(np.zeros((2, 3, 3, 4)), layout).shape
    expected = x_nchw.reshape(2, 3, 3, 2, 4, 2).max(axis=(3, 5))
    np.testing.assert_array_equal(y.numpy(), to_layout(expected, layout))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_avg_pool_2x2_keeps_each_window_mean(layout: str, rng: np.random.Generator) -> None:
    x_nchw = rng.standard_normal((2, 3, 6, 8))
    y = GF.avg_pool2d(make_tensor(x_nchw, layout, torch.float64), 2, layout=layout)
    expected = x_nchw.reshape(2, 3, 3, 2, 4, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(y.numpy(), to_layout(expected, layout), rtol=1e-14, atol=1e-15)


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), c=st.integers(1, 5), seed=st.integers(0, 2**32))
def test_gap_turns_hwc_into_channel_means(h: int, w: int, c: int, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((h, w, c))
    y = GF.global_avg_pool2d(torch.from_numpy(x), layout="HWC")
    assert tuple(y.shape) == (c,)
    np.testing.assert_allclose(y.numpy(), x.mean(axis=(0, 1)), rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- PyTorch's edge cases
# Divergences found by running PyTorch's own pooling tests on gapnet (issue 13): PyTorch's
# behaviour is the contract, on every backend ("auto" reaches the strided path through
# padding="same") and in the reference.

STRIDE_EMPTY = [  # (op, kwargs): stride=() or [] reads as "stride = kernel_size", as None
    ("max_pool2d", {"kernel_size": 2, "stride": ()}),
    ("max_pool2d", {"kernel_size": (3, 2), "stride": [], "padding": 1}),
    ("avg_pool2d", {"kernel_size": 2, "stride": ()}),
    # "same" padding: the strided path under "auto"
    ("avg_pool2d", {"kernel_size": 3, "stride": (), "padding": "same"}),
]


@pytest.mark.parametrize(("op", "kwargs"), rows(STRIDE_EMPTY))
def test_empty_stride_means_kernel_size(op: str, kwargs: dict, rng: np.random.Generator) -> None:
    x = rng.standard_normal((2, 3, 9, 8))
    as_none = {**kwargs, "stride": None}
    expected = getattr(ref, op)(x, **as_none)
    np.testing.assert_array_equal(getattr(ref, op)(x, **kwargs), expected)
    got = getattr(GF, op)(torch.from_numpy(x), **kwargs)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    if kwargs.get("padding") != "same":  # PyTorch itself
        torch_got = getattr(F, op)(torch.from_numpy(x), **kwargs)
        np.testing.assert_allclose(torch_got.numpy(), expected, rtol=1e-12)


ZERO_CHANNEL_UNBATCHED = [  # (op, layout, shape): PyTorch pools (0, H, W), zero gradients
    ("adaptive_avg_pool2d", "CHW", (0, 10, 10)),
    ("adaptive_max_pool2d", "CHW", (0, 10, 10)),
    # the same planes seen through HWC
    ("adaptive_avg_pool2d", "HWC", (10, 10, 0)),
    ("adaptive_max_pool2d", "HWC", (10, 10, 0)),
]


@pytest.mark.parametrize(("op", "layout", "shape"), ZERO_CHANNEL_UNBATCHED)
def test_unbatched_adaptive_pools_take_zero_channels(op: str, layout: str, shape: tuple) -> None:
    x = torch.rand(shape, requires_grad=True)
    y = getattr(GF, op)(x, 5, layout=layout)
    assert y.shape == ((0, 5, 5) if layout == "CHW" else (5, 5, 0))
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == shape
    assert getattr(ref, op)(x.detach().numpy(), 5, layout=layout).shape == y.shape


ZERO_CHANNELS = [  # (op, kwargs, backend): N = 1 but C = 0 is refused, as PyTorch does
    ("max_pool2d", {"kernel_size": 2}, "torch"),
    ("max_pool2d", {"kernel_size": 2}, "auto"),
    # "same": the strided path, which returned an empty result
    ("max_pool2d", {"kernel_size": 3, "stride": 2, "padding": "same"}, "auto"),
    ("avg_pool2d", {"kernel_size": 2}, "torch"),
    ("avg_pool2d", {"kernel_size": 3, "stride": 2, "padding": "same"}, "auto"),
]


@pytest.mark.parametrize(("op", "kwargs", "backend"), rows(ZERO_CHANNELS))
def test_zero_channels_are_refused_on_every_backend(op: str, kwargs: dict, backend: str) -> None:
    x = torch.rand(1, 0, 50, 32)
    with pytest.raises(ValueError, match="at least one channel, got C=0"):
        getattr(GF, op)(x, **kwargs, backend=backend)
    with pytest.raises(ValueError, match="at least one channel, got C=0"):
        getattr(ref, op)(x.numpy(), **kwargs)
    if kwargs.get("padding") != "same":
        with pytest.raises(RuntimeError):  # PyTorch's own refusal
            getattr(F, op)(x, **kwargs)


SLICED_CHANNELS_LAST = [  # (op, kwargs, backend): x[:, ::2] of a channels_last x
    ("max_pool2d", {"kernel_size": 2}, "torch"),
    # "same" under "auto": the strided path, which returned NCHW
    ("max_pool2d", {"kernel_size": 3, "stride": 2, "padding": "same"}, "auto"),
    ("avg_pool2d", {"kernel_size": 3, "stride": 2, "padding": "same"}, "auto"),
]


@pytest.mark.parametrize(("op", "kwargs", "backend"), rows(SLICED_CHANNELS_LAST))
def test_sliced_channels_last_stays_channels_last(op: str, kwargs: dict, backend: str) -> None:
    base = torch.rand(2, 8, 9, 9).to(memory_format=torch.channels_last)
    x = base[:, ::2].detach().requires_grad_()
    assert not x.is_contiguous(memory_format=torch.channels_last)
    extra = {"return_indices": True} if op == "max_pool2d" else {}
    out = getattr(GF, op)(x, **kwargs, **extra, backend=backend)
    outs = out if isinstance(out, tuple) else (out,)
    for t in outs:  # output and indices, as PyTorch's
        assert t.is_contiguous(memory_format=torch.channels_last)
    # as returned (a leaf's .grad of non-dense x would be laid out by autograd's own rule)
    (grad,) = torch.autograd.grad(outs[0], x, torch.rand_like(outs[0]))
    assert grad.is_contiguous(memory_format=torch.channels_last)
    if backend == "torch":  # PyTorch itself
        (torch_grad,) = torch.autograd.grad(getattr(F, op)(x, **kwargs).sum(), x)
        assert torch_grad.is_contiguous(memory_format=torch.channels_last)
    dense = getattr(ref, op)(x.detach().numpy().astype(np.float64), **kwargs)
    np.testing.assert_allclose(outs[0].detach().numpy(), dense, rtol=1e-6)


HALF_MAX_GRAD = [  # (backend, channels_last, kwargs): overlapping windows, shared maxima
    ("torch", False, {"kernel_size": 3, "stride": 1, "padding": 1}),
    # PyTorch's channels_last kernel summed in bfloat16
    ("torch", True, {"kernel_size": 3, "stride": 1, "padding": 1}),
    ("auto", False, {"kernel_size": 3, "stride": 1, "padding": 1}),
    # the strided path
    ("auto", True, {"kernel_size": 3, "stride": 1, "padding": "same"}),
    ("torch", True, {"kernel_size": 5, "stride": 2, "padding": 2}),
]


@pytest.mark.parametrize(("backend", "channels_last", "kwargs"), HALF_MAX_GRAD)
def test_bfloat16_max_pool_gradient_sums_in_float32(
    backend: str, channels_last: bool, kwargs: dict
) -> None:
    """The documented rule: shares of one cell summed in float32, rounded to bfloat16 once."""
    gen = torch.Generator().manual_seed(0)
    x32 = torch.randn(2, 16, 24, 24, generator=gen).to(torch.bfloat16).float()
    g32 = torch.randn(x32.shape[0], 16, *GF.max_pool2d(x32, **kwargs).shape[2:], generator=gen)
    g32 = g32.to(torch.bfloat16).float()
    x = x32.to(torch.bfloat16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    GF.max_pool2d(x, **kwargs, backend=backend).backward(g32.to(torch.bfloat16))
    x32.requires_grad_()
    expected = torch.autograd.grad(F.max_pool2d(x32, **_torch_kwargs(kwargs)), x32, g32)[0].to(
        torch.bfloat16
    )
    assert x.grad is not None
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)


def _torch_pad(kwargs: dict) -> dict:
    """k3 s1 "same" is padding 1 in PyTorch's terms."""
    return {"padding": 1} if kwargs.get("padding") == "same" else {}


def _torch_kwargs(kwargs: dict) -> dict:
    return {**kwargs, **_torch_pad(kwargs)}


# ----------------------------------------------------------------------------- O(1) argument checks


def _calls_to_check(in_size: tuple[int, int], **kwargs: Any) -> int:
    """How many Python functions `_shapes.window2d` runs for one call (each call counted)."""
    _shapes.window2d("max_pool2d", in_size, **kwargs)  # warm: abc caches isinstance answers
    calls = 0

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        _shapes.window2d("max_pool2d", in_size, **kwargs)
    finally:
        sys.setprofile(None)
    return calls


SIZES = ((16777217, 7), (1000, 7))  # (H, W) of a huge plane and a small one


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": (2, 1)},
        # padding, dilation and ceil_mode: the check that no window holds only padding
        {"kernel_size": 3, "stride": 1, "padding": 1, "dilation": 2, "ceil_mode": True},
        {"kernel_size": 3, "stride": 2, "padding": "same"},
    ],
)
def test_argument_checks_do_not_scale_with_the_plane(kwargs: dict) -> None:
    """Validation does the same work for a 16M-row plane as for a 1000-row one (it looped over
    every output row and column: 18 s on (1, 1, 16777217, 1)). Sizes 1000 and 16777217 take
    the same branches."""
    # the fewest of 3 runs: a stray call (a garbage collector callback) can land in one
    huge, small = (min(_calls_to_check(size, **kwargs) for _ in range(3)) for size in SIZES)
    assert huge == small


@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
def test_first_call_on_a_huge_plane_is_quick(op: str) -> None:
    x = torch.rand(1, 1, 16777217, 1)
    start = time.perf_counter()
    for backend in ("auto", "torch"):
        y = getattr(GF, op)(x, (2, 1), backend=backend)
        assert y.shape == (1, 1, 8388608, 1)
    assert time.perf_counter() - start < 2.0
