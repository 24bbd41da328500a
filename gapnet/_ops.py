"""The Triton kernels as PyTorch ops: autograd, torch.compile and CUDA graphs.

`gapnet.functional` imports this module only when a call may run on the kernels, so that
`import gapnet` never imports Triton; the kernels themselves are imported on first use.

Each op has one forward and one backward implementation (`_<op>_fwd`, `_<op>_bwd`) reached two
ways: in eager mode through a `torch.autograd.Function` (a few microseconds of overhead per
call), and while torch.compile traces through `torch.library.custom_op`s with fake (shape-only)
implementations, so that a compiled model keeps the kernels as single graph nodes with no graph
break. A custom op costs about 25 us more per eager call than a Function, which is the whole
budget of a small, launch-bound pooling op; hence the two doors to the same code.

Nothing here synchronises with the GPU (no `.item()`, no host-to-device copies), so every op can
be captured in a CUDA graph.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from torch import Tensor

from gapnet._shapes import Window2d, geometry, window_of
from gapnet.kernels import KERNEL_DTYPES, empty_like_format, maps_channels_last, offsets_dtype

# A reason that starts with this only keeps backend="auto" off the kernels; "triton" runs anyway.
AUTO_ONLY = "auto:"


def unsupported_reason(x: Tensor, win: Window2d | None = None) -> str | None:
    """Why the Triton kernels cannot (or, under "auto", should not) take `x`; None if they can."""
    if not _HAS_TRITON:
        return "Triton is not installed (pip install gapnet[triton])"
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the tensor is on {x.device.type}; the kernels need CUDA (or TRITON_INTERPRET=1)"
    if x.dtype not in KERNEL_DTYPES:
        return f"the kernels take float16, bfloat16 and float32, got {str(x.dtype)[6:]}"
    if win is not None and win.kernel[0] * win.kernel[1] > _window_kernels().MAX_TAPS:
        # every tap is unrolled: a huge window compiles for minutes (289 taps: 80 s on sm_90)
        return f"{AUTO_ONLY} a {win.kernel[0]}x{win.kernel[1]} window is slow to compile"
    return None


_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _global_kernels() -> Any:
    from gapnet.kernels import global_pool

    return global_pool


def _window_kernels() -> Any:
    from gapnet.kernels import window_pool

    return window_pool


def _none_if_empty(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 and t.dim() == 1 else t


# ----------------------------------------------------------------------------- window geometry
# A Window2d crosses the custom-op boundary as a list of ints (ops take only plain types).


def _window(x: Tensor, geom: list[int]) -> Window2d:
    return window_of((x.shape[2], x.shape[3]), geom)


# ----------------------------------------------------------------------------- global pooling


def _gem_p(p: float | Tensor, x: Tensor) -> Tensor:
    """GeM's exponent as the (1,) float32 device tensor the kernels read (no host copy)."""
    if isinstance(p, Tensor):
        return p.reshape(1).to(device=x.device, dtype=torch.float32)
    return torch.full((1,), float(p), device=x.device, dtype=torch.float32)


def _global_fwd(x: Tensor, kind: str, p: Tensor | None, eps: float, need_saved: bool):  # type: ignore[no-untyped-def]
    return _global_kernels().global_pool_forward(x, kind, p, eps, need_saved)


def _global_bwd(gy: Tensor, x: Tensor, kind: str, p: Tensor | None, eps: float,
                saved: Tensor | None, need_grad_p: bool):  # type: ignore[no-untyped-def]  # fmt: skip
    return _global_kernels().global_pool_backward(gy, x, kind, p, eps, None, saved, need_grad_p)


class _GlobalPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kind, p, eps):  # type: ignore[no-untyped-def, override]
        y, saved = _global_fwd(x, kind, p, eps, any(ctx.needs_input_grad))
        ctx.kind, ctx.eps = kind, eps
        ctx.save_for_backward(x, p, saved)
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[no-untyped-def, override]
        x, p, saved = ctx.saved_tensors
        need_x, _, need_p, _ = ctx.needs_input_grad
        gx, gp = _global_bwd(gy, x, ctx.kind, p, ctx.eps, saved, need_p)
        return (gx if need_x else None), None, gp, None


@torch.library.custom_op("gapnet::global_pool2d", mutates_args=())
def _global_pool_op(
    x: Tensor, kind: str, p: Tensor | None, eps: float, need_saved: bool
) -> tuple[Tensor, Tensor]:
    y, saved = _global_fwd(x, kind, p, eps, need_saved)
    return y, x.new_empty(0) if saved is None else saved


@_global_pool_op.register_fake
def _(x, kind, p, eps, need_saved):  # type: ignore[no-untyped-def]
    n, c = x.shape[:2]
    y = x.new_empty((n, 2 * c if kind == "catavgmax" else c))
    if not need_saved or kind == "avg":
        return y, x.new_empty(0)
    return y, x.new_empty((n, c), dtype=torch.float32 if kind == "gem" else torch.int32)


@torch.library.custom_op("gapnet::global_pool2d_backward", mutates_args=())
def _global_pool_bwd_op(
    gy: Tensor, x: Tensor, kind: str, p: Tensor | None, eps: float, saved: Tensor,
    need_grad_p: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    gx, gp = _global_bwd(gy, x, kind, p, eps, _none_if_empty(saved), need_grad_p)
    return gx, x.new_empty(0) if gp is None else gp


@_global_pool_bwd_op.register_fake
def _(gy, x, kind, p, eps, saved, need_grad_p):  # type: ignore[no-untyped-def]
    gp = torch.empty_like(p) if need_grad_p and p is not None else x.new_empty(0)
    return torch.empty_like(x), gp


def _global_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
    x, kind, p, eps, _ = inputs
    ctx.kind, ctx.eps = kind, eps
    ctx.save_for_backward(x, p, output[1])


def _global_backward(ctx, gy, _gsaved):  # type: ignore[no-untyped-def]
    x, p, saved = ctx.saved_tensors
    need_p = ctx.needs_input_grad[2]
    gx, gp = _global_pool_bwd_op(gy, x, ctx.kind, p, ctx.eps, saved, need_p)
    return gx, None, (gp if need_p else None), None, None


_global_pool_op.register_autograd(_global_backward, setup_context=_global_setup)


def global_pool2d(x: Tensor, kind: str, p: float | Tensor, eps: float) -> Tensor:
    """(N, C, H, W) -> (N, C), or (N, 2C) for catavgmax, on the kernels."""
    p_t = _gem_p(p, x) if kind == "gem" else None
    if torch.compiler.is_compiling():
        need = torch.is_grad_enabled() and (
            x.requires_grad or (p_t is not None and p_t.requires_grad)
        )
        return _global_pool_op(x, kind, p_t, eps, need)[0]
    return _GlobalPool.apply(x, kind, p_t, eps)


# ----------------------------------------------------------------------------- max_pool2d


def _max_fwd(x: Tensor, win: Window2d, need_offsets: bool, return_indices: bool):  # type: ignore[no-untyped-def]
    return _window_kernels().max_pool2d_forward(
        x, win, need_offsets=need_offsets, return_indices=return_indices
    )


class _MaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, win, return_indices):  # type: ignore[no-untyped-def, override]
        y, offsets, indices = _max_fwd(x, win, ctx.needs_input_grad[0], return_indices)
        ctx.win = win
        ctx.save_for_backward(x, offsets)
        if indices is not None:
            ctx.mark_non_differentiable(indices)
        return y, indices

    @staticmethod
    def backward(ctx, gy, _gindices):  # type: ignore[no-untyped-def, override]
        x, offsets = ctx.saved_tensors
        return _window_kernels().max_pool2d_backward(gy, offsets, x, ctx.win), None, None


@torch.library.custom_op("gapnet::max_pool2d", mutates_args=())
def _max_pool_op(
    x: Tensor, geom: list[int], need_offsets: bool, return_indices: bool
) -> tuple[Tensor, Tensor, Tensor]:
    y, offsets, indices = _max_fwd(x, _window(x, geom), need_offsets, return_indices)
    empty = x.new_empty(0)  # a custom op returns tensors: an empty one stands for "none"
    return y, empty if offsets is None else offsets, empty if indices is None else indices


@_max_pool_op.register_fake
def _(x, geom, need_offsets, return_indices):  # type: ignore[no-untyped-def]
    win = _window(x, geom)
    shape = (*x.shape[:2], *win.out_size)
    y = empty_like_format(x, shape, x.dtype)
    offsets = empty_like_format(x, shape, offsets_dtype(win)) if need_offsets else x.new_empty(0)
    indices = empty_like_format(x, shape, torch.int64) if return_indices else x.new_empty(0)
    return y, offsets, indices


@torch.library.custom_op("gapnet::max_pool2d_backward", mutates_args=())
def _max_pool_bwd_op(gy: Tensor, offsets: Tensor, x: Tensor, geom: list[int]) -> Tensor:
    return _window_kernels().max_pool2d_backward(gy, offsets, x, _window(x, geom))


@_max_pool_bwd_op.register_fake
def _(gy, offsets, x, geom):  # type: ignore[no-untyped-def]
    return empty_like_format(x, tuple(x.shape), x.dtype)


def _max_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
    x, geom, _, _ = inputs
    ctx.geom = geom
    ctx.save_for_backward(x, output[1])
    ctx.mark_non_differentiable(output[1], output[2])


def _max_backward(ctx, gy, _goffsets, _gindices):  # type: ignore[no-untyped-def]
    x, offsets = ctx.saved_tensors
    return _max_pool_bwd_op(gy, offsets, x, ctx.geom), None, None, None


_max_pool_op.register_autograd(_max_backward, setup_context=_max_setup)


def max_pool2d(x: Tensor, win: Window2d, return_indices: bool) -> tuple[Tensor, Tensor | None]:
    """Max pool of an NCHW-logical tensor on the kernels: (y, int64 indices or None)."""
    if torch.compiler.is_compiling():
        need = torch.is_grad_enabled() and x.requires_grad
        y, _, indices = _max_pool_op(x, geometry(win), need, return_indices)
        return y, (indices if return_indices else None)
    return _MaxPool.apply(x, win, return_indices)


# ----------------------------------------------------------------------------- avg_pool2d


class _AvgPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, win, count_include_pad, divisor_override):  # type: ignore[no-untyped-def, override]
        ctx.args = (win, count_include_pad, divisor_override)
        ctx.save_for_backward(x)
        return _window_kernels().avg_pool2d_forward(x, win, count_include_pad, divisor_override)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        return _window_kernels().avg_pool2d_backward(gy, x, *ctx.args), None, None, None


@torch.library.custom_op("gapnet::avg_pool2d", mutates_args=())
def _avg_pool_op(
    x: Tensor, geom: list[int], count_include_pad: bool, divisor_override: int | None
) -> Tensor:
    win = _window(x, geom)
    return _window_kernels().avg_pool2d_forward(x, win, count_include_pad, divisor_override)


@_avg_pool_op.register_fake
def _(x, geom, count_include_pad, divisor_override):  # type: ignore[no-untyped-def]
    shape = (*x.shape[:2], *_window(x, geom).out_size)
    return empty_like_format(x, shape, x.dtype)


@torch.library.custom_op("gapnet::avg_pool2d_backward", mutates_args=())
def _avg_pool_bwd_op(
    gy: Tensor, x: Tensor, geom: list[int], count_include_pad: bool, divisor_override: int | None
) -> Tensor:
    win = _window(x, geom)
    return _window_kernels().avg_pool2d_backward(gy, x, win, count_include_pad, divisor_override)


@_avg_pool_bwd_op.register_fake
def _(gy, x, geom, count_include_pad, divisor_override):  # type: ignore[no-untyped-def]
    return empty_like_format(x, tuple(x.shape), x.dtype)


def _avg_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
    x, geom, count_include_pad, divisor_override = inputs
    ctx.args = (geom, count_include_pad, divisor_override)
    ctx.save_for_backward(x)


def _avg_backward(ctx, gy):  # type: ignore[no-untyped-def]
    (x,) = ctx.saved_tensors
    return _avg_pool_bwd_op(gy, x, *ctx.args), None, None, None


_avg_pool_op.register_autograd(_avg_backward, setup_context=_avg_setup)


def avg_pool2d(
    x: Tensor, win: Window2d, count_include_pad: bool, divisor_override: int | None
) -> Tensor:
    """Average pool of an NCHW-logical tensor on the kernels."""
    if torch.compiler.is_compiling():
        return _avg_pool_op(x, geometry(win), count_include_pad, divisor_override)
    return _AvgPool.apply(x, win, count_include_pad, divisor_override)


# ----------------------------------------------------------------------------- gap_linear


def _gap_linear_needs(ctx) -> list[bool]:  # type: ignore[no-untyped-def]
    """Which of grad x, grad weight, grad bias the backward must compute."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    return [need_x, need_w, need_b and ctx.has_bias]


def _gap_linear_bwd(ctx, g_logits, x, weight, pooled):  # type: ignore[no-untyped-def]
    return _global_kernels().gap_linear_backward(
        g_logits, x, weight, pooled, *_gap_linear_needs(ctx)
    )


class _GapLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, return_maps):  # type: ignore[no-untyped-def, override]
        logits, pooled, maps = _global_kernels().gap_linear_forward(x, weight, bias, return_maps)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, pooled)
        if maps is not None:
            ctx.mark_non_differentiable(maps)
        return logits, maps

    @staticmethod
    def backward(ctx, g_logits, _gmaps):  # type: ignore[no-untyped-def, override]
        gx, gw, gb = _gap_linear_bwd(ctx, g_logits, *ctx.saved_tensors)
        return gx, gw, gb, None


@torch.library.custom_op("gapnet::gap_linear", mutates_args=())
def _gap_linear_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, return_maps: bool
) -> tuple[Tensor, Tensor, Tensor]:
    logits, pooled, maps = _global_kernels().gap_linear_forward(x, weight, bias, return_maps)
    return logits, pooled, x.new_empty(0) if maps is None else maps


@_gap_linear_op.register_fake
def _(x, weight, bias, return_maps):  # type: ignore[no-untyped-def]
    n, c, h, w = x.shape
    k = weight.shape[0]
    logits = x.new_empty((n, k), dtype=weight.dtype)
    pooled = x.new_empty((n, c), dtype=torch.float32)
    if not return_maps:
        return logits, pooled, x.new_empty(0)
    fmt = torch.channels_last if maps_channels_last(x) else torch.contiguous_format
    return (
        logits,
        pooled,
        torch.empty((n, k, h, w), dtype=x.dtype, device=x.device, memory_format=fmt),
    )


@torch.library.custom_op("gapnet::gap_linear_backward", mutates_args=())
def _gap_linear_bwd_op(
    g_logits: Tensor, x: Tensor, weight: Tensor, pooled: Tensor, needs: list[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    gx, gw, gb = _global_kernels().gap_linear_backward(g_logits, x, weight, pooled, *needs)
    empty = x.new_empty(0)
    return (empty if gx is None else gx, empty if gw is None else gw,
            empty if gb is None else gb)  # fmt: skip


@_gap_linear_bwd_op.register_fake
def _(g_logits, x, weight, pooled, needs):  # type: ignore[no-untyped-def]
    gx = torch.empty_like(x) if needs[0] else x.new_empty(0)
    gw = torch.empty_like(weight) if needs[1] else x.new_empty(0)
    gb = g_logits.new_empty(weight.shape[0]) if needs[2] else x.new_empty(0)
    return gx, gw, gb


def _gap_linear_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
    x, weight, bias, _ = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1], output[2])


def _gap_linear_backward(ctx, g_logits, _gpooled, _gmaps):  # type: ignore[no-untyped-def]
    x, weight, pooled = ctx.saved_tensors
    needs = _gap_linear_needs(ctx)
    gx, gw, gb = _gap_linear_bwd_op(g_logits, x, weight, pooled, needs)
    return (gx if needs[0] else None), (gw if needs[1] else None), (gb if needs[2] else None), None


_gap_linear_op.register_autograd(_gap_linear_backward, setup_context=_gap_linear_setup)


def gap_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, return_maps: bool
) -> tuple[Tensor, Tensor | None]:
    """GAP + linear head on the kernels: (logits, class maps or None)."""
    if torch.compiler.is_compiling():
        logits, _, maps = _gap_linear_op(x, weight, bias, return_maps)
        return logits, (maps if return_maps else None)
    return _GapLinear.apply(x, weight, bias, return_maps)
