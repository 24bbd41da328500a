"""Pooling ops on torch tensors, with autograd: the same signatures and rules as `gapnet.reference`.

Every op validates its arguments in `gapnet._shapes`, views its input as NCHW (an NHWC tensor
becomes a channels_last view of the same memory, so no layout costs a copy), runs a backend and
views the result back into the input's layout.

Backends: ``"torch"`` runs PyTorch's own pooling ops; ``"triton"`` runs gapnet's Triton kernels
(CUDA, or the CPU interpreter under ``TRITON_INTERPRET=1``); ``"auto"`` (the default) picks the
kernels for CUDA tensors of the dtypes they take when Triton is installed, on CPU gapnet's
strided-view max and average pooling (`gapnet._strided`; its NCHW float32/float64 max pools run
compiled C where a C compiler is found, `gapnet._cpu_kernels`) where it was measured faster
than PyTorch's kernel, and PyTorch otherwise. Pick one per call with ``backend=``, or for a block of
code with ``use_backend(...)``. PyTorch has no asymmetric padding, so ``padding="same"``
windows that need it always run on the strided-view path unless the kernels take them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gapnet import _ops, _shapes, _strided, kernels
from gapnet._shapes import IntPair, Layout, Padding, Window2d

BACKENDS = ("auto", "torch", "triton")
_default_backend = "auto"


def set_backend(name: str) -> None:
    """Set the backend that ops use when called without ``backend=`` ("auto", "torch", "triton")."""
    global _default_backend
    _default_backend = _check_backend(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with another default backend, e.g. ``with use_backend("torch"): model(x)``."""
    global _default_backend
    previous, _default_backend = _default_backend, _check_backend(name)
    try:
        yield
    finally:
        _default_backend = previous


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def _pick_backend(backend: str, x: Tensor, op: str, win: Window2d | None) -> str:
    """What runs this call of `backend` (the default already put in for None): "torch"
    (PyTorch's op), "strided" (gapnet's CPU path where it was measured faster: for window pools
    strided views, for global ones `_strided.plane_means`) or "triton" (the kernels)."""
    name = _check_backend(backend)
    if name == "torch":
        return "torch"
    if name == "auto" and not x.is_cuda:
        if win is None:  # a global op: "strided" stands for its plane means as a matmul
            return "strided" if _strided.prefers_plane_means(x) else "torch"
        return "strided" if _strided.prefers(x, op, win) else "torch"
    reason = _ops.unsupported_reason(x, win)
    if reason is None:
        return "triton"
    if name == "triton" and not reason.startswith(_ops.AUTO_ONLY):
        raise ValueError(f"{op}: backend='triton' cannot run this input: {reason}")
    return "triton" if name == "triton" else "torch"


_IDENTITY = (0, 1, 2, 3)
_NCHW = _shapes.check_layout("NCHW", _IDENTITY, "")  # the layout that needs no view


def _to_nchw(x: Tensor, lay: Layout) -> Tensor:
    """x, already validated for `lay`, as a (possibly channels_last) NCHW view."""
    x4 = x if lay.batched else x.unsqueeze(0)
    return x4 if lay.to_nchw == _IDENTITY else x4.permute(lay.to_nchw)


def _checked_nchw(x: Tensor, layout: str, op: str) -> tuple[Tensor, Layout]:
    """Validate x for `layout` and return it as a (possibly channels_last) NCHW view."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op} expects a torch.Tensor, got {type(x).__name__}")
    _shapes.check_float_dtype(str(x.dtype), op)
    lay = _shapes.check_layout(layout, x.shape, op)
    return _to_nchw(x, lay), lay


def _from_nchw(y: Tensor, lay: Layout) -> Tensor:
    y = y if lay.from_nchw == _IDENTITY else y.permute(lay.from_nchw)
    return y if lay.batched else y.squeeze(0)


# ----------------------------------------------------------------------------- call plans
# Validating a call and choosing its backend runs a dozen small Python functions, and when a
# pooling layer follows a big op that swept the CPU caches, that code runs cold: a max_pool2d
# call on a tiny input took 96-106 us against PyTorch's 24-28 us (`call_overhead` in
# benchmarks/bench_ops.py, on the 2-core VM of benchmarks/RESULTS.md), enough to make ops that
# run PyTorch's very kernel several % slower than PyTorch. So a call is validated once per
# signature (op, arguments, input shape, strides, dtype, device, grad need, layout, backend)
# and its outcome kept: the next such call is one dict lookup (+30-55 us over PyTorch cold).


class _Plan(NamedTuple):
    lay: Layout
    use: str  # "torch" (PyTorch's op), "strided" (gapnet._strided) or "triton" (the kernels)
    resolved: Any  # what the op's resolver returned: its Window2d, or None


_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 4096  # a bound for programs that pool ever-new shapes; refilling is cheap
# Arguments that may key a plan: their value (or, for `typed` ops, their repr) says all that
# validation looks at. Anything else (a list, a generator, whose repr holds an address) is
# validated on every call.
_PLAIN_TYPES = frozenset({int, float, bool, str, type(None), tuple, torch.Size})
# bound once: looked up through torch.compiler on every call it cost ~5 us more, cold
_is_compiling = torch.compiler.is_compiling


def _plan(
    op: str,
    x: Tensor,
    layout: str,
    backend: str | None,
    args: tuple,
    resolve: Callable[[str, Tensor, tuple], Any],
    typed: bool = False,
) -> _Plan:
    """Validate a call (or find it validated before) and choose its backend.

    `args` are the op's arguments that validation or the backend choice depend on;
    ``resolve(op, x4, args)`` validates them against the NCHW view x4, raising the error that
    names what is wrong, and returns what the op needs (its Window2d, or None). `typed`: the
    validation also looks at the arguments' types, so the key holds ``repr(args)``: a window of
    kernel_size=True must be refused although True == 1 (repr costs ~20 us cold, so only then).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{op} expects a torch.Tensor, got {type(x).__name__}")
    name = _default_backend if backend is None else backend
    # under torch.compile shapes may be symbolic, and Dynamo traces the checks themselves
    if _is_compiling() or not _PLAIN_TYPES.issuperset(map(type, args)):
        return _new_plan(op, x, layout, name, args, resolve)
    grad = x.requires_grad and torch.is_grad_enabled()
    by = repr(args) if typed else args
    key = (op, by, layout, name, x.shape, x.stride(), x.dtype, x.device, grad)
    try:
        plan = _PLANS.get(key)
    except TypeError:  # an unhashable layout or backend: validation names what is wrong
        return _new_plan(op, x, layout, name, args, resolve)
    if plan is None:
        plan = _new_plan(op, x, layout, name, args, resolve)
        # under TRITON_INTERPRET a CPU tensor's "triton" depends on the environment: not kept
        if plan.use != "triton" or x.is_cuda:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan
    return plan


def _new_plan(
    op: str, x: Tensor, layout: str, backend: str, args: tuple, resolve: Callable[..., Any]
) -> _Plan:
    x4, lay = _checked_nchw(x, layout, op)
    resolved = resolve(op, x4, args)
    win = resolved if isinstance(resolved, Window2d) else None
    use = _pick_backend(backend, x4, op, win)
    if use == "torch" and win is not None and not _torch_takes(op, win):
        use = "strided"  # the strided-view path pools such windows as they are, uncopied
    return _Plan(lay, use, resolved)


def _window(op: str, x4: Tensor, args: tuple) -> Window2d:
    """A window op's resolver: args are `_shapes.window2d`'s after the input size."""
    _shapes.check_pool_channels(x4.shape[1], op)
    return _shapes.window2d(op, (x4.shape[-2], x4.shape[-1]), *args)


def _torch_takes(op: str, win: Window2d) -> bool:
    """Whether PyTorch's pool can run these windows: its padding is symmetric and at most half
    the kernel, and its average cannot leave out the padding of Keras' "same"."""
    if op == "avg_pool2d" and win.same:
        return False
    return win.pad_before == win.pad_after and all(
        win.pad_before[a] <= win.kernel[a] // 2 for a in (0, 1)
    )


# ----------------------------------------------------------------------------- max_pool2d


def max_pool2d(
    x: Tensor,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: Padding = 0,
    dilation: IntPair = 1,
    ceil_mode: bool = False,
    *,
    layout: str = "NCHW",
    return_indices: bool = False,
    backend: str | None = None,
) -> Any:
    """Max over each k x k window (PyTorch's rules; ``padding="same"`` as Keras).

    Args:
        x: input in `layout`; float16, bfloat16, float32 or float64.
        kernel_size, stride, padding, dilation, ceil_mode: as ``torch.nn.functional.max_pool2d``;
            `padding` may also be ``"valid"`` or ``"same"`` (output ``ceil(in / stride)``).
        layout: "NCHW", "NHWC", "CHW" or "HWC".
        return_indices: also return flat ``h * W + w`` indices of each window's maximum.
        backend: "auto", "torch" or "triton" (default: the current default backend).

    float16/bfloat16 gradients: a cell that is the maximum of several overlapping windows
    gets their gradients summed in float32 and rounded once, whatever the backend or memory
    format (PyTorch's channels_last CPU kernel would sum in the input's dtype).

    Shape:
        (N, C, H, W) -> (N, C, H_out, W_out), in the input's layout.

    Example:
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> max_pool2d(x, 2).flatten().tolist()
        [5.0, 7.0, 13.0, 15.0]
    """
    args = (kernel_size, stride, padding, dilation, ceil_mode)
    lay, use, win = _plan("max_pool2d", x, layout, backend, args, _window, typed=True)
    x4 = x if lay is _NCHW else _to_nchw(x, lay)
    if use == "triton":
        y, indices = _ops.max_pool2d(x4, win, return_indices)
    elif use == "strided":  # also the windows PyTorch cannot pad (padding never wins a max)
        y, indices = _strided.max_pool2d(x4, win, return_indices)
    elif _half_grad_sums(x4, win):
        y, indices = F.max_pool2d(
            x4.float(), win.kernel, win.stride, win.pad_before, win.dilation, ceil_mode, True
        )
        y = y.to(x4.dtype)  # exact: a max of rounded values; the backward rounds once
    elif return_indices:
        y, indices = F.max_pool2d(
            x4, win.kernel, win.stride, win.pad_before, win.dilation, ceil_mode, True
        )
    else:  # the op F.max_pool2d ends in, without its Python wrapper: this path is PyTorch's
        y = torch.max_pool2d(x4, win.kernel, win.stride, win.pad_before, win.dilation, ceil_mode)
        indices = None
    y = y if lay is _NCHW else _from_nchw(y, lay)
    if not return_indices:
        return y
    assert indices is not None  # every backend returns indices when asked
    return y, _from_nchw(indices, lay)


# The gradient rule of float16/bfloat16 max pools: where windows overlap, an input cell that is
# the maximum of several windows gets the sum of their gradients, summed in float32 and rounded
# once, on every backend and memory format (the strided path and the kernels sum in float32).
# PyTorch's channels_last CPU kernel sums in the input's dtype, so that its answer would depend
# on the memory format: the "torch" backend runs such a pool on a float32 copy instead (same
# values and indices; the gradient goes back through the copy, rounded once).


def _half_grad_sums(x4: Tensor, win: Window2d) -> bool:
    """Whether PyTorch's max pool of x4 would sum a gradient in float16/bfloat16."""
    if x4.dtype not in (torch.float16, torch.bfloat16):
        return False
    if not (x4.requires_grad and torch.is_grad_enabled()):
        return False
    extent = [(win.kernel[a] - 1) * win.dilation[a] + 1 for a in (0, 1)]
    return win.stride[0] < extent[0] or win.stride[1] < extent[1]


# ----------------------------------------------------------------------------- avg_pool2d


def _avg_window(op: str, x4: Tensor, args: tuple) -> Window2d:
    *window_args, divisor_override = args
    _shapes.check_divisor_override(divisor_override, op)
    return _window(op, x4, tuple(window_args))


def avg_pool2d(
    x: Tensor,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: Padding = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
    *,
    layout: str = "NCHW",
    backend: str | None = None,
) -> Tensor:
    """Mean over each k x k window (PyTorch's rules; ``padding="same"`` as Keras).

    With ``padding="same"`` padded cells are never counted, whatever `count_include_pad` says.

    Args:
        x: input in `layout`; float16, bfloat16, float32 or float64.
        kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override: as
            ``torch.nn.functional.avg_pool2d``; `padding` may also be ``"valid"`` or ``"same"``.
        layout: "NCHW", "NHWC", "CHW" or "HWC".
        backend: "auto", "torch" or "triton".

    Shape:
        (N, C, H, W) -> (N, C, H_out, W_out), in the input's layout.

    Example:
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> avg_pool2d(x, 2).flatten().tolist()
        [2.5, 4.5, 10.5, 12.5]
    """
    args = (kernel_size, stride, padding, 1, ceil_mode, divisor_override)
    lay, use, win = _plan("avg_pool2d", x, layout, backend, args, _avg_window, typed=True)
    x4 = x if lay is _NCHW else _to_nchw(x, lay)
    if use == "triton":
        y = _ops.avg_pool2d(x4, win, count_include_pad, divisor_override)
    elif use == "strided":  # also "same" windows, whose padding PyTorch would count
        y = _strided.avg_pool2d(x4, win, count_include_pad, divisor_override)
    else:
        y = F.avg_pool2d(
            x4, win.kernel, win.stride, win.pad_before, ceil_mode, count_include_pad,
            divisor_override,
        )  # fmt: skip
    return y if lay is _NCHW else _from_nchw(y, lay)


# ----------------------------------------------------------------------------- adaptive pools


def _unbatched_as_3d(
    pool: Callable[..., Any], x4: Tensor, lay: Layout, *args: Any, **kw: Any
) -> Any:
    """`pool` of x4, with an unbatched input handed to PyTorch as the 3-d tensor it is.

    PyTorch pools an unbatched (0, H, W) input with no channels (an empty result, zero
    gradients) but refuses the (1, 0, H, W) it would be with a batch axis added.
    """
    if lay.batched or x4.shape[1] > 0:  # the 4-d view keeps an HWC input's memory format
        return pool(x4, *args, **kw)
    out = pool(x4[0], *args, **kw)
    return tuple(t[None] for t in out) if isinstance(out, tuple) else out[None]


def adaptive_avg_pool2d(
    x: Tensor, output_size: Any, *, layout: str = "NCHW", backend: str | None = None
) -> Tensor:
    """Mean over bins ``floor(i*In/Out) .. ceil((i+1)*In/Out)`` (PyTorch's adaptive pooling).

    Args:
        x: input in `layout`.
        output_size: int or (H_out, W_out); None keeps that input dimension.
        layout: "NCHW", "NHWC", "CHW" or "HWC".
        backend: accepted for symmetry; adaptive pools always run PyTorch's kernels.

    Shape:
        (N, C, H, W) -> (N, C, H_out, W_out), in the input's layout.

    Example:
        >>> adaptive_avg_pool2d(torch.arange(6.0).reshape(1, 1, 2, 3), (1, 2)).tolist()
        [[[[2.0, 3.0]]]]
    """
    op = "adaptive_avg_pool2d"
    _check_backend(_default_backend if backend is None else backend)
    x4, lay = _checked_nchw(x, layout, op)
    out = _shapes.adaptive_output_size(output_size, (x4.shape[-2], x4.shape[-1]), op)
    return _from_nchw(_unbatched_as_3d(F.adaptive_avg_pool2d, x4, lay, out), lay)


def adaptive_max_pool2d(
    x: Tensor,
    output_size: Any,
    *,
    layout: str = "NCHW",
    return_indices: bool = False,
    backend: str | None = None,
) -> Any:
    """Max over adaptive bins (PyTorch's rule), optionally with flat ``h * W + w`` indices.

    Args:
        x: input in `layout`.
        output_size: int or (H_out, W_out); None keeps that input dimension.
        layout: "NCHW", "NHWC", "CHW" or "HWC".
        return_indices: also return the indices of each bin's maximum.
        backend: accepted for symmetry; adaptive pools always run PyTorch's kernels.

    Shape:
        (N, C, H, W) -> (N, C, H_out, W_out), in the input's layout.

    Example:
        >>> adaptive_max_pool2d(torch.arange(6.0).reshape(1, 1, 2, 3), (1, 2)).tolist()
        [[[[4.0, 5.0]]]]
    """
    op = "adaptive_max_pool2d"
    _check_backend(_default_backend if backend is None else backend)
    x4, lay = _checked_nchw(x, layout, op)
    out = _shapes.adaptive_output_size(output_size, (x4.shape[-2], x4.shape[-1]), op)
    y, indices = _unbatched_as_3d(F.adaptive_max_pool2d, x4, lay, out, return_indices=True)
    y = _from_nchw(y, lay)
    return (y, _from_nchw(indices, lay)) if return_indices else y


# ----------------------------------------------------------------------------- global pools


_TENSOR_P = "<tensor p>"  # stands for a tensor p in a plan's key: tensors are never validated


def _global(op: str, x4: Tensor, args: tuple) -> None:
    """global_pool2d's resolver: args are (kind, p or _TENSOR_P, eps)."""
    kind, p, eps = args
    _shapes.check_kind(kind, op)
    if kind == "gem":
        _shapes.check_gem(None if p is _TENSOR_P else p, eps)
    _shapes.check_global_input((x4.shape[-2], x4.shape[-1]), op)


def _gap_linear_weights(op: str, x4: Tensor, args: tuple) -> None:
    """gap_linear's resolver: args are (weight.shape, bias.shape or None)."""
    weight_shape, bias_shape = args
    _shapes.check_global_input((x4.shape[-2], x4.shape[-1]), op)
    if len(weight_shape) != 2 or weight_shape[1] != x4.shape[1]:
        raise ValueError(
            f"{op}: weight must be (num_classes, {x4.shape[1]}), got {tuple(weight_shape)}"
        )
    if bias_shape is not None and bias_shape != (weight_shape[0],):
        raise ValueError(f"{op}: bias must be ({weight_shape[0]},), got {tuple(bias_shape)}")


class _MeanHW(torch.autograd.Function):
    """`_plane_means` whose backward writes the gradient once, in the input's layout.

    PyTorch's backward of mean divides the expanded gradient into a new NCHW-ordered tensor,
    which autograd then copies into a channels_last input's layout: two full-size passes (one
    transposing) where one suffices: GAP forward+backward 1.4-2.3x faster on CPU, either layout
    (benchmarks/RESULTS.md). Gradients are PyTorch's bit for bit; the backward is out of place
    (so differentiable again), and forward mode and torch.func transforms work.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, by_matmul: bool) -> Tensor:  # type: ignore[override]
        return _plane_means(x, by_matmul)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x = inputs[0]
        ctx.shape = x.shape
        # by strides: torch.func.vmap cannot answer is_contiguous(memory_format=...)
        ctx.channels_last = kernels.is_channels_last(x)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        n, c, h, w = ctx.shape
        share = gy / (h * w)
        # written in memory order, then viewed as NCHW (contiguous(memory_format=...) is not
        # available under vmap)
        if ctx.channels_last:
            gx = share[:, None, None, :].expand(n, h, w, c).contiguous().permute(0, 3, 1, 2)
        else:
            gx = share[:, :, None, None].expand(n, c, h, w).contiguous()
        return gx, None

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor, _by_matmul_t: None) -> Tensor:
        return x_t.mean((2, 3))


def _plane_means(x4: Tensor, by_matmul: bool) -> Tensor:
    return _strided.plane_means(x4) if by_matmul else x4.mean((2, 3))


def _mean_hw(x4: Tensor, by_matmul: bool) -> Tensor:
    """(N, C, H, W) -> (N, C) means, with `_MeanHW`'s backward when a gradient is needed;
    `by_matmul`: as `_strided.plane_means` (the plan chose it: faster there).

    Not under torch.compile: Dynamo cannot trace a Function with a jvp, and Inductor fuses
    the mean's backward by itself.
    """
    if x4.requires_grad and torch.is_grad_enabled() and not _is_compiling():
        return _MeanHW.apply(x4, by_matmul)  # type: ignore[no-any-return]
    return _plane_means(x4, by_matmul)


def _gem(x4: Tensor, p: float | Tensor, eps: float, in_place: bool = True) -> Tensor:
    """GeM ``mean(clamp(x, eps)^p)^(1/p)`` over H x W, (N, C), in the accumulation dtype.

    In float32 for half inputs (x^p overflows float16 from x = 40 on, p = 3), on one clamped
    copy of x powered in place: a second input-sized allocation costs more than the arithmetic
    on CPU (GeM inference 1.2-3.4x faster than PyTorch's formula, benchmarks/RESULTS.md).
    Not `in_place` where autograd records the ops (each keeps its input for the backward).
    """
    acc = kernels.acc_dtype(x4.dtype)
    p_acc = _p_as(p, acc)
    z = _clamped(x4, eps, acc)
    if not in_place:
        return z.pow(p_acc).mean((2, 3)).pow(1.0 / p_acc)
    return z.pow_(p_acc).mean((2, 3)).pow_(1.0 / p_acc)


def _p_as(p: float | Tensor, dtype: torch.dtype) -> float | Tensor:
    """GeM's p as a number, or a 0-d tensor of `dtype` (a (1,) tensor of another dtype would
    promote the powers, and an in-place power cannot)."""
    return p.to(dtype).reshape(()) if isinstance(p, Tensor) else p


def _clamped(x: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """clamp(x, min=eps) as a new `dtype` tensor in x's memory format, made in one pass."""
    return x.clamp(min=eps) if x.dtype == dtype else x.to(dtype).clamp_(min=eps)


class _GeM(torch.autograd.Function):
    """`_gem` with its derivatives written out, so that each gradient is one new tensor.

    Autograd through clamp, pow, mean and pow keeps four input-sized tensors alive and makes
    about as many in the backward: GeM forward+backward here is 1.6-2.9x faster on CPU
    (benchmarks/RESULTS.md). With y = m^(1/p), m = mean(z^p), z = clamp(x, eps), mask x >= eps
    (clamp's gradient):
    dy/dx = m^(1/p - 1) z^(p-1) mask / (H W),  dy/dp = y (mean(z^p ln z) / (p m) - ln(m) / p^2).
    While a graph is recorded (create_graph=True, torch.func) the backward runs out of place,
    so that higher derivatives exist; forward mode has the same formulas in `jvp`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, p: float | Tensor, eps: float) -> Tensor:  # type: ignore[override]
        return _gem(x, p, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, p, eps = inputs
        ctx.eps, ctx.p_number = eps, None if isinstance(p, Tensor) else p
        saved = (x, output, p) if isinstance(p, Tensor) else (x, output)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def _unpack(ctx: Any) -> tuple[Tensor, Tensor, float | Tensor, Tensor]:
        """x, y, p (in y's dtype) and m = y^p, from what setup_context saved."""
        x, y, *p_tensor = ctx.saved_tensors
        p = _p_as(p_tensor[0], y.dtype) if p_tensor else ctx.p_number
        return x, y, p, y.pow(p)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, y, p, m = _GeM._unpack(ctx)
        acc, eps, (h, w) = y.dtype, ctx.eps, x.shape[-2:]
        in_place = not torch.is_grad_enabled()  # else a graph of this backward is recorded
        grad_x = grad_p = None
        if ctx.needs_input_grad[0]:
            share = (gy * m.pow(1.0 / p - 1.0) / (h * w))[:, :, None, None]
            z = _clamped(x, eps, acc)
            if in_place:
                grad_x = z.pow_(p - 1.0).mul_(share).masked_fill_(x < eps, 0).to(x.dtype)
            else:
                grad_x = (z.pow(p - 1.0) * share * (x >= eps)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            z = _clamped(x, eps, acc)
            log_z = z.log()
            zp_log_z = z.pow_(p).mul_(log_z) if in_place else z.pow(p) * log_z
            dy_dp = y * (zp_log_z.mean((2, 3)) / (p * m) - m.log() / p**2)
            p_in = ctx.saved_tensors[2]
            grad_p = (gy * dy_dp).sum().reshape(p_in.shape).to(p_in.dtype)
        return grad_x, grad_p, None

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, p_t: Tensor | None, _eps_t: None) -> Tensor:
        x, y, p, m = _GeM._unpack(ctx)
        acc, eps = y.dtype, ctx.eps
        z = _clamped(x, eps, acc)
        dm = torch.zeros_like(y)
        if x_t is not None:
            dm = dm + p * (z.pow(p - 1.0) * (x >= eps) * x_t.to(acc)).mean((2, 3))
        if p_t is not None:
            dp = p_t.to(acc).reshape(())
            dm = dm + (z.pow(p) * z.log()).mean((2, 3)) * dp - m * m.log() * dp / p
        return y * dm / (p * m)


def _torch_global_pool(x4: Tensor, kind: str, p: float | Tensor, eps: float) -> Tensor:
    """(N, C, H, W) -> (N, C) or (N, 2C) with PyTorch ops for the kinds other than "avg" (that
    is `_mean_hw`, called directly: a call fewer); max gradients go to the first max."""
    if kind == "gem":
        p_grad = isinstance(p, Tensor) and p.requires_grad
        if not (torch.is_grad_enabled() and (x4.requires_grad or p_grad)):
            return _gem(x4, p, eps).to(x4.dtype)
        if _is_compiling():  # as in _mean_hw: the formula, which Inductor fuses by itself
            return _gem(x4, p, eps, in_place=False).to(x4.dtype)
        return _GeM.apply(x4, p, eps).to(x4.dtype)  # type: ignore[no-any-return]
    # adaptive_max_pool2d, unlike amax, sends a window's whole gradient to one element
    peak = F.adaptive_max_pool2d(x4, 1).flatten(1)
    if kind == "max":
        return peak
    avg = x4.mean((2, 3))
    if kind == "avgmax":
        return 0.5 * (avg + peak)
    return torch.cat((avg, peak), dim=1)


def global_pool2d(
    x: Tensor,
    kind: str = "avg",
    *,
    layout: str = "NCHW",
    keepdim: bool = False,
    p: float | Tensor = 3.0,
    eps: float = 1e-6,
    backend: str | None = None,
) -> Tensor:
    """Pool each channel's whole H x W plane to one value.

    Args:
        x: input in `layout`; float16, bfloat16, float32 or float64.
        kind: "avg", "max", "avgmax" (mean of the two), "catavgmax" (the two concatenated along
            channels: 2C outputs, average first) or "gem" (``mean(clamp(x, eps)^p)^(1/p)``).
        layout: "NCHW", "NHWC", "CHW" or "HWC".
        keepdim: keep H and W as size-1 axes in the layout's positions.
        p: GeM exponent: a number, or a 1-element tensor to learn it.
        eps: GeM clamp, so fractional powers of non-positive values never occur.
        backend: "auto", "torch" or "triton".

    Shape:
        (N, C, H, W) or (N, H, W, C) -> (N, C); (C, H, W) or (H, W, C) -> (C,); C doubles for
        "catavgmax".

    Example:
        >>> x = torch.tensor([[[1.0, 2.0], [3.0, 6.0]]])  # (C=1, H=2, W=2)
        >>> global_pool2d(x, "avgmax", layout="CHW").tolist()
        [4.5]
    """
    args = (kind, _TENSOR_P if isinstance(p, Tensor) else p, eps)
    lay, use, _ = _plan("global_pool2d", x, layout, backend, args, _global)
    x4 = x if lay is _NCHW else _to_nchw(x, lay)
    if use == "triton":
        y = _ops.global_pool2d(x4, kind, p, eps)
    elif kind == "avg":
        y = _mean_hw(x4, by_matmul=use == "strided")
    else:
        y = _torch_global_pool(x4, kind, p, eps)
    if keepdim or not lay.batched:  # else y is (N, C) already: a no-op reshape costs ~50 us cold
        y = y.reshape(lay.pooled_shape(x4.shape[0], y.shape[1], keepdim))
    return y


def global_avg_pool2d(
    x: Tensor, *, layout: str = "NCHW", keepdim: bool = False, backend: str | None = None
) -> Tensor:
    """Global average pooling: each channel's mean over H x W (``global_pool2d(x, "avg")``).

    Args:
        x: input in `layout`.
        layout: "NCHW", "NHWC", "CHW" or "HWC".
        keepdim: keep H and W as size-1 axes.
        backend: "auto", "torch" or "triton".

    Shape:
        (H, W, C) -> (C,) for any H and W; (N, C, H, W) -> (N, C).

    Example:
        >>> global_avg_pool2d(torch.ones(5, 7, 3), layout="HWC").tolist()
        [1.0, 1.0, 1.0]
    """
    return global_pool2d(x, "avg", layout=layout, keepdim=keepdim, backend=backend)


def global_max_pool2d(
    x: Tensor, *, layout: str = "NCHW", keepdim: bool = False, backend: str | None = None
) -> Tensor:
    """Global max pooling: each channel's maximum over H x W (``global_pool2d(x, "max")``).

    Args:
        x: input in `layout`.
        layout: "NCHW", "NHWC", "CHW" or "HWC".
        keepdim: keep H and W as size-1 axes.
        backend: "auto", "torch" or "triton".

    Shape:
        (N, C, H, W) -> (N, C).

    Example:
        >>> global_max_pool2d(torch.arange(8.0).reshape(1, 2, 2, 2)).tolist()
        [[3.0, 7.0]]
    """
    return global_pool2d(x, "max", layout=layout, keepdim=keepdim, backend=backend)


def gap_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    layout: str = "NCHW",
    return_maps: bool = False,
    backend: str | None = None,
) -> Any:
    """A GAP classifier head in one call: ``linear(global_avg_pool2d(x), weight, bias)``.

    Because the mean is linear, the same logits are the spatial means of the class activation
    maps ``weight @ x`` at every location (plus bias): `return_maps` returns those maps too.

    Args:
        x: feature map in `layout`.
        weight: (K, C) classifier weights; bias: (K,) or None.
        layout: "NCHW", "NHWC", "CHW" or "HWC".
        return_maps: also return the (N, K, H, W) class activation maps (no gradient).
        backend: "auto", "torch" or "triton".

    Shape:
        (N, C, H, W) -> logits (N, K) [, maps (N, K, H, W) in NCHW].

    Example:
        >>> x, w = torch.randn(2, 4, 3, 3), torch.randn(5, 4)
        >>> logits, maps = gap_linear(x, w, return_maps=True)
        >>> torch.allclose(maps.mean((2, 3)), logits, atol=1e-6)
        True
    """
    args = (weight.shape, None if bias is None else bias.shape)
    lay, use, _ = _plan("gap_linear", x, layout, backend, args, _gap_linear_weights)
    x4 = x if lay is _NCHW else _to_nchw(x, lay)
    if use == "triton":
        logits, maps = _ops.gap_linear(x4, weight, bias, return_maps)
    else:
        logits = F.linear(_mean_hw(x4, by_matmul=use == "strided"), weight, bias)
        # the maps are a by-product for CAM and carry no gradient, on every backend
        maps = torch.einsum("kc,nchw->nkhw", weight, x4).detach() if return_maps else None
    if not lay.batched:
        logits, maps = logits[0], None if maps is None else maps[0]
    return (logits, maps) if return_maps else logits
