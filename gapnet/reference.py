"""The executable specification of gapnet's pooling ops: forward and backward, in NumPy.

Every op here is the definition that `gapnet.functional` and its Triton kernels are tested
against. Each matches PyTorch in semantics (Keras/TensorFlow for ``padding="same"``), and each
sits next to its ``<op>_backward(grad_out, x, <same arguments>)``, which returns the gradient
with respect to `x`. Conventions:

* **Layouts.** `x` is "NCHW", "NHWC", or unbatched "CHW", "HWC"; results and gradients come back
  in the same layout. Inside, everything is NCHW: `_to_nchw` adds a batch axis of 1 to an
  unbatched input and permutes, `_from_nchw` undoes both.
* **Windows as taps.** Along each axis a pool is a tap table: for output `i`, the input index
  of its `a`-th tap and whether that tap is real (not padding, inside the adaptive bin). The two
  tables make every output's window, laid out along a last axis in row-major window order, so
  each pool is one gather and one reduction, and its backward is the matching scatter.
* **Max.** A window is scanned in row-major order from ``m = -inf`` and ``idx = its first real
  cell`` with ``if v > m or isnan(v): m, idx = v, pos``: ties go to the first maximum, a NaN
  makes the output NaN and the index the last NaN. Padding never wins. The whole gradient of an
  output goes to `idx`. ``return_indices`` gives int64 flat ``h*W + w`` indices per plane.
* **Average.** The sum of a window's real cells over a divisor: PyTorch's count
  (``count_include_pad``, ``divisor_override``), or for ``padding="same"`` the real cells only.
* **Precision.** float16, bfloat16, float32 or float64 in, the same dtype out; sums are taken in
  float32 (float64 for float64 input) and rounded once. A max is picked exactly in the input dtype.
* **Validation** and output-size math are `gapnet._shapes`'s, shared with every backend: bad
  arguments raise ValueError or TypeError naming the argument, integer or bool input is a
  TypeError, and an empty batch (N = 0) gives an empty result.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gapnet import _shapes
from gapnet._shapes import IntPair, Layout, Padding, Window2d

# One axis of a pool: (input index, is real) for every (output, tap), both (out, taps).
Taps = tuple[np.ndarray, np.ndarray]

# ----------------------------------------------------------------------------- shared machinery


def _to_nchw(x: Any, layout: str, op: str) -> tuple[np.ndarray, Layout]:
    """Validate `x` for `layout` and view it as (N, C, H, W)."""
    x = np.asarray(x)
    _shapes.check_float_dtype(str(x.dtype), op)
    lay = _shapes.check_layout(layout, x.shape, op)
    x4 = x if lay.batched else x[None]
    return x4.transpose(lay.to_nchw), lay


def _from_nchw(y4: np.ndarray, lay: Layout) -> np.ndarray:
    y = y4.transpose(lay.from_nchw)
    return y if lay.batched else y[0]


def _acc_dtype(dtype: np.dtype) -> type:
    """Sums of float16/bfloat16/float32 are taken in float32, of float64 in float64."""
    return np.float64 if dtype == np.float64 else np.float32


def _grad_to_nchw(
    grad_out: Any, lay: Layout, nchw_shape: tuple[int, ...], x4: np.ndarray, op: str
) -> np.ndarray:
    """`grad_out`, checked to have the forward output's shape, as NCHW in x's accumulation dtype."""
    g = np.asarray(grad_out)
    expected = tuple(nchw_shape[i] for i in lay.from_nchw)[0 if lay.batched else 1 :]
    if g.shape != expected:
        raise ValueError(
            f"{op}_backward: grad_out must have the output's shape {expected}, got {g.shape}"
        )
    g4 = g if lay.batched else g[None]
    return g4.transpose(lay.to_nchw).astype(_acc_dtype(x4.dtype))


def _window_taps(win: Window2d, axis: int) -> Taps:
    """Taps of a strided window: output i reads ``i*stride - pad_before + a*dilation``."""
    start = np.arange(win.out_size[axis]) * win.stride[axis] - win.pad_before[axis]
    index = start[:, None] + np.arange(win.kernel[axis]) * win.dilation[axis]  # (out, kernel)
    return index, (index >= 0) & (index < win.in_size[axis])


def _bin_taps(in_size: int, out_size: int) -> Taps:
    """Taps of adaptive bins: bin i reads ``[floor(i*In/Out), ceil((i+1)*In/Out))``."""
    lo, hi = np.array(_shapes.adaptive_bins(in_size, out_size)).T  # (out,) each
    index = lo[:, None] + np.arange((hi - lo).max())  # (out, longest bin)
    return index, index < hi[:, None]


def _windows(taps_h: Taps, taps_w: Taps, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Every output's window in row-major window order: flat ``h*W + w`` index and is-real.

    Both (H_out, W_out, K) with K = kernel_h * kernel_w; a padding tap's index is clipped into
    the plane so that it can be gathered, and must be masked by the caller.
    """
    (rows, real_rows), (cols, real_cols) = taps_h, taps_w
    flat = np.clip(rows, 0, h - 1)[:, None, :, None] * w + np.clip(cols, 0, w - 1)[None, :, None]
    real = real_rows[:, None, :, None] & real_cols[None, :, None, :]  # (H_out, W_out, Kh, Kw)
    out_h, out_w = real.shape[:2]
    return flat.reshape(out_h, out_w, -1), real.reshape(out_h, out_w, -1)


def _gather(x4: np.ndarray, flat: np.ndarray, real: np.ndarray, fill: float) -> np.ndarray:
    """(N, C, H, W) -> (N, C, H_out, W_out, K): each window's cells, `fill` at padding taps."""
    n, c, h, w = x4.shape
    values = x4.reshape(n, c, h * w)[:, :, flat]
    return np.where(real, values, np.asarray(fill, dtype=x4.dtype))


def _first_max(values: np.ndarray, real: np.ndarray | bool) -> np.ndarray:
    """Position along the last axis that PyTorch's scan picks: first maximum, else last NaN."""
    nan = np.isnan(values)
    last_nan = values.shape[-1] - 1 - np.argmax(nan[..., ::-1], axis=-1)
    peak = np.where(nan, -np.inf, values).max(axis=-1, keepdims=True)
    # With every real cell -inf the peak is -inf and this is the first real cell, as the scan.
    first_peak = np.argmax((values == peak) & real, axis=-1)
    return np.where(nan.any(axis=-1), last_nan, first_peak)


def _max_pool(x4: np.ndarray, taps_h: Taps, taps_w: Taps) -> tuple[np.ndarray, np.ndarray]:
    """Each window's maximum and its flat index, both (N, C, H_out, W_out)."""
    flat, real = _windows(taps_h, taps_w, *x4.shape[2:])
    values = _gather(x4, flat, real, -np.inf)  # (N, C, H_out, W_out, K)
    pos = _first_max(values, real)[..., None]
    index = np.take_along_axis(np.broadcast_to(flat, values.shape), pos, axis=-1)
    return np.take_along_axis(values, pos, axis=-1)[..., 0], index[..., 0].astype(np.int64)


def _scatter_add(values: np.ndarray, index: np.ndarray, x4: np.ndarray) -> np.ndarray:
    """A zero gradient like `x4` plus `values` (N, C, ...) at flat plane positions `index`.

    `index` broadcasts against `values`; cells that several windows read add up.
    """
    n, c, h, w = x4.shape
    plane_start = np.arange(n * c).reshape(n, c, *[1] * (values.ndim - 2)) * (h * w)
    grad = np.zeros(n * c * h * w, _acc_dtype(x4.dtype))
    np.add.at(grad, plane_start + index, values)
    return grad.reshape(x4.shape).astype(x4.dtype)


def _sum_pool(x4: np.ndarray, taps_h: Taps, taps_w: Taps) -> np.ndarray:
    """Sum of each window's real cells, (N, C, H_out, W_out), in the accumulation dtype."""
    flat, real = _windows(taps_h, taps_w, *x4.shape[2:])
    return _gather(x4.astype(_acc_dtype(x4.dtype)), flat, real, 0.0).sum(axis=-1)


def _sum_pool_backward(g4: np.ndarray, x4: np.ndarray, taps_h: Taps, taps_w: Taps) -> np.ndarray:
    """The transpose of `_sum_pool`: each output's gradient to every real cell of its window."""
    flat, real = _windows(taps_h, taps_w, *x4.shape[2:])
    return _scatter_add(np.where(real, g4[..., None], 0.0), flat, x4)


# ----------------------------------------------------------------------------- max_pool2d


def _max_pool2d_setup(
    x: Any, kernel_size: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool, layout: str
) -> tuple[np.ndarray, Layout, Taps, Taps]:
    op = "max_pool2d"
    x4, lay = _to_nchw(x, layout, op)
    _shapes.check_pool_channels(x4.shape[1], op)
    win = _shapes.window2d(op, x4.shape[2:], kernel_size, stride, padding, dilation, ceil_mode)
    return x4, lay, _window_taps(win, 0), _window_taps(win, 1)


def max_pool2d(
    x: np.ndarray,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: Padding = 0,
    dilation: IntPair = 1,
    ceil_mode: bool = False,
    *,
    layout: str = "NCHW",
    return_indices: bool = False,
) -> Any:
    """Maximum of each window, as ``torch.nn.functional.max_pool2d`` (``"same"`` as Keras).

    Args:
        x: input in `layout`; float16, bfloat16, float32 or float64.
        kernel_size, stride, padding, dilation, ceil_mode: as PyTorch; `stride` defaults to
            `kernel_size`; `padding` is an int, a pair, ``"valid"`` or ``"same"``.
        layout: "NCHW", "NHWC", "CHW" or "HWC".
        return_indices: also return each maximum's int64 flat index ``h*W + w`` in its plane.

    Shape:
        (N, C, H, W) -> (N, C, H_out, W_out), in the input's layout; indices likewise.

    Example:
        >>> x = np.array([[[[1.0, 5.0, 2.0, 0.0], [3.0, 4.0, 8.0, 6.0]]]])  # (1, 1, 2, 4)
        >>> max_pool2d(x, 2, return_indices=True)
        (array([[[[5., 8.]]]]), array([[[[1, 6]]]]))
    """
    x4, lay, taps_h, taps_w = _max_pool2d_setup(
        x, kernel_size, stride, padding, dilation, ceil_mode, layout
    )
    y, index = _max_pool(x4, taps_h, taps_w)
    y = _from_nchw(y, lay)
    return (y, _from_nchw(index, lay)) if return_indices else y


def max_pool2d_backward(
    grad_out: np.ndarray,
    x: np.ndarray,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: Padding = 0,
    dilation: IntPair = 1,
    ceil_mode: bool = False,
    *,
    layout: str = "NCHW",
    return_indices: bool = False,
) -> np.ndarray:
    """Gradient of `max_pool2d` with respect to `x`: each output's to its window's maximum.

    Args:
        grad_out: gradient with respect to the pooled output, in `layout`.
        x, kernel_size, stride, padding, dilation, ceil_mode, layout: as `max_pool2d`.
        return_indices: accepted so that a forward call's arguments pass unchanged; ignored.

    Shape:
        grad_out (N, C, H_out, W_out), x (N, C, H, W) -> (N, C, H, W), in `layout`.

    Example:
        >>> x = np.array([[[[1.0, 5.0, 2.0, 0.0], [3.0, 4.0, 8.0, 6.0]]]])
        >>> max_pool2d_backward(np.array([[[[10.0, 20.0]]]]), x, 2)
        array([[[[ 0., 10.,  0.,  0.],
                 [ 0.,  0., 20.,  0.]]]])
    """
    x4, lay, taps_h, taps_w = _max_pool2d_setup(
        x, kernel_size, stride, padding, dilation, ceil_mode, layout
    )
    _, index = _max_pool(x4, taps_h, taps_w)
    g4 = _grad_to_nchw(grad_out, lay, index.shape, x4, "max_pool2d")
    return _from_nchw(_scatter_add(g4, index, x4), lay)


# ----------------------------------------------------------------------------- avg_pool2d


def _avg_pool2d_setup(
    x: Any,
    kernel_size: Any,
    stride: Any,
    padding: Any,
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None,
    layout: str,
) -> tuple[np.ndarray, Layout, Taps, Taps, np.ndarray]:
    """(N, C, H, W) input, its layout, taps and the (H_out, W_out) divisor of every window."""
    op = "avg_pool2d"
    _shapes.check_divisor_override(divisor_override, op)
    x4, lay = _to_nchw(x, layout, op)
    _shapes.check_pool_channels(x4.shape[1], op)
    win = _shapes.window2d(op, x4.shape[2:], kernel_size, stride, padding, 1, ceil_mode)
    if divisor_override is not None:
        divisor = np.full(win.out_size, divisor_override)
    else:
        divisor = np.outer(win.divisors(count_include_pad, 0), win.divisors(count_include_pad, 1))
    return x4, lay, _window_taps(win, 0), _window_taps(win, 1), divisor


def avg_pool2d(
    x: np.ndarray,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: Padding = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
    *,
    layout: str = "NCHW",
) -> np.ndarray:
    """Mean of each window, as ``torch.nn.functional.avg_pool2d`` (``"same"`` as Keras).

    With ``padding="same"`` padded cells are never counted, whatever `count_include_pad` says.

    Args:
        x: input in `layout`; float16, bfloat16, float32 or float64.
        kernel_size, stride, padding, ceil_mode, count_include_pad: as PyTorch; `padding` is an
            int, a pair, ``"valid"`` or ``"same"``.
        divisor_override: a nonzero int that replaces every window's count, or None.
        layout: "NCHW", "NHWC", "CHW" or "HWC".

    Shape:
        (N, C, H, W) -> (N, C, H_out, W_out), in the input's layout.

    Example:
        >>> x = np.array([[[1.0, 5.0, 2.0, 0.0], [3.0, 4.0, 8.0, 6.0]]])  # (C=1, H=2, W=4)
        >>> avg_pool2d(x, 2, layout="CHW")
        array([[[3.25, 4.  ]]])
    """
    x4, lay, taps_h, taps_w, divisor = _avg_pool2d_setup(
        x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, layout
    )
    sums = _sum_pool(x4, taps_h, taps_w)  # (N, C, H_out, W_out)
    return _from_nchw((sums / divisor.astype(sums.dtype)).astype(x4.dtype), lay)


def avg_pool2d_backward(
    grad_out: np.ndarray,
    x: np.ndarray,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: Padding = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
    *,
    layout: str = "NCHW",
) -> np.ndarray:
    """Gradient of `avg_pool2d` with respect to `x`: each output's, over its divisor, to every
    real cell of its window.

    Args:
        grad_out: gradient with respect to the pooled output, in `layout`.
        x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override,
            layout: as `avg_pool2d`.

    Shape:
        grad_out (N, C, H_out, W_out), x (N, C, H, W) -> (N, C, H, W), in `layout`.

    Example:
        >>> avg_pool2d_backward(np.array([[[4.0]]]), np.ones((1, 2, 3)), 2, layout="CHW")
        array([[[1., 1., 0.],
                [1., 1., 0.]]])
    """
    x4, lay, taps_h, taps_w, divisor = _avg_pool2d_setup(
        x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, layout
    )
    g4 = _grad_to_nchw(grad_out, lay, (*x4.shape[:2], *divisor.shape), x4, "avg_pool2d")
    return _from_nchw(_sum_pool_backward(g4 / divisor.astype(g4.dtype), x4, taps_h, taps_w), lay)


# ----------------------------------------------------------------------------- adaptive pools


def _adaptive_setup(
    x: Any, output_size: Any, layout: str, op: str
) -> tuple[np.ndarray, Layout, Taps, Taps]:
    x4, lay = _to_nchw(x, layout, op)
    h, w = x4.shape[2:]
    out_h, out_w = _shapes.adaptive_output_size(output_size, (h, w), op)
    return x4, lay, _bin_taps(h, out_h), _bin_taps(w, out_w)


def _bin_counts(taps_h: Taps, taps_w: Taps) -> np.ndarray:
    """(H_out, W_out) number of cells in each adaptive bin."""
    return np.outer(taps_h[1].sum(axis=1), taps_w[1].sum(axis=1))


def adaptive_avg_pool2d(x: np.ndarray, output_size: Any, *, layout: str = "NCHW") -> np.ndarray:
    """Mean of each adaptive bin, as ``torch.nn.functional.adaptive_avg_pool2d``.

    Bin i along an axis covers ``floor(i*In/Out) .. ceil((i+1)*In/Out)``: bins overlap when Out
    does not divide In.

    Args:
        x: input in `layout`; float16, bfloat16, float32 or float64.
        output_size: an int or (H_out, W_out); None in a position keeps that input size.
        layout: "NCHW", "NHWC", "CHW" or "HWC".

    Shape:
        (N, C, H, W) -> (N, C, H_out, W_out), in the input's layout.

    Example:
        >>> adaptive_avg_pool2d(np.arange(6.0).reshape(1, 1, 2, 3), (1, 2))  # bins 0..2, 1..3
        array([[[[2., 3.]]]])
    """
    x4, lay, taps_h, taps_w = _adaptive_setup(x, output_size, layout, "adaptive_avg_pool2d")
    sums = _sum_pool(x4, taps_h, taps_w)
    return _from_nchw((sums / _bin_counts(taps_h, taps_w).astype(sums.dtype)).astype(x4.dtype), lay)


def adaptive_avg_pool2d_backward(
    grad_out: np.ndarray, x: np.ndarray, output_size: Any, *, layout: str = "NCHW"
) -> np.ndarray:
    """Gradient of `adaptive_avg_pool2d` with respect to `x`.

    Args:
        grad_out: gradient with respect to the pooled output, in `layout`.
        x, output_size, layout: as `adaptive_avg_pool2d`.

    Shape:
        grad_out (N, C, H_out, W_out), x (N, C, H, W) -> (N, C, H, W), in `layout`.

    Example:
        >>> adaptive_avg_pool2d_backward(np.ones((1, 1, 1, 2)), np.ones((1, 1, 1, 3)), (1, 2))
        array([[[[0.5, 1. , 0.5]]]])
    """
    x4, lay, taps_h, taps_w = _adaptive_setup(x, output_size, layout, "adaptive_avg_pool2d")
    counts = _bin_counts(taps_h, taps_w)
    g4 = _grad_to_nchw(grad_out, lay, (*x4.shape[:2], *counts.shape), x4, "adaptive_avg_pool2d")
    return _from_nchw(_sum_pool_backward(g4 / counts.astype(g4.dtype), x4, taps_h, taps_w), lay)


def adaptive_max_pool2d(
    x: np.ndarray, output_size: Any, *, layout: str = "NCHW", return_indices: bool = False
) -> Any:
    """Maximum of each adaptive bin, as ``torch.nn.functional.adaptive_max_pool2d``.

    Args:
        x: input in `layout`; float16, bfloat16, float32 or float64.
        output_size: an int or (H_out, W_out); None in a position keeps that input size.
        layout: "NCHW", "NHWC", "CHW" or "HWC".
        return_indices: also return each maximum's int64 flat index ``h*W + w`` in its plane.

    Shape:
        (N, C, H, W) -> (N, C, H_out, W_out), in the input's layout; indices likewise.

    Example:
        >>> adaptive_max_pool2d(np.array([[[[3.0, 1.0, 3.0]]]]), (1, 2), return_indices=True)
        (array([[[[3., 3.]]]]), array([[[[0, 2]]]]))
    """
    x4, lay, taps_h, taps_w = _adaptive_setup(x, output_size, layout, "adaptive_max_pool2d")
    y, index = _max_pool(x4, taps_h, taps_w)
    y = _from_nchw(y, lay)
    return (y, _from_nchw(index, lay)) if return_indices else y


def adaptive_max_pool2d_backward(
    grad_out: np.ndarray,
    x: np.ndarray,
    output_size: Any,
    *,
    layout: str = "NCHW",
    return_indices: bool = False,
) -> np.ndarray:
    """Gradient of `adaptive_max_pool2d` with respect to `x`: each output's to its bin's maximum.

    Args:
        grad_out: gradient with respect to the pooled output, in `layout`.
        x, output_size, layout: as `adaptive_max_pool2d`.
        return_indices: accepted so that a forward call's arguments pass unchanged; ignored.

    Shape:
        grad_out (N, C, H_out, W_out), x (N, C, H, W) -> (N, C, H, W), in `layout`.

    Example:
        >>> x = np.array([[[[3.0, 1.0, 3.0]]]])  # bins 0..2 and 1..3: the 3 at 0 wins the first
        >>> adaptive_max_pool2d_backward(np.array([[[[1.0, 2.0]]]]), x, (1, 2))
        array([[[[1., 0., 2.]]]])
    """
    x4, lay, taps_h, taps_w = _adaptive_setup(x, output_size, layout, "adaptive_max_pool2d")
    _, index = _max_pool(x4, taps_h, taps_w)
    g4 = _grad_to_nchw(grad_out, lay, index.shape, x4, "adaptive_max_pool2d")
    return _from_nchw(_scatter_add(g4, index, x4), lay)


# ----------------------------------------------------------------------------- global pools


def _global_setup(
    x: Any, kind: str, layout: str, p: float, eps: float
) -> tuple[np.ndarray, Layout, np.ndarray]:
    """Validate a global pool's arguments; return x as NCHW, its layout and its (N, C, H*W)
    planes in the accumulation dtype."""
    op = "global_pool2d"
    _shapes.check_kind(kind, op)
    if kind == "gem":
        _shapes.check_gem(p, eps)
    x4, lay = _to_nchw(x, layout, op)
    n, c, h, w = x4.shape
    _shapes.check_global_input((h, w), op)
    return x4, lay, x4.reshape(n, c, h * w).astype(_acc_dtype(x4.dtype))


def _plane_argmax(planes: np.ndarray) -> np.ndarray:
    """(N, C, H*W) -> (N, C, 1): where the max is, as ``adaptive_max_pool2d(x, 1)``."""
    return _first_max(planes, True)[..., None]


def global_pool2d(
    x: np.ndarray,
    kind: str = "avg",
    *,
    layout: str = "NCHW",
    keepdim: bool = False,
    p: float = 3.0,
    eps: float = 1e-6,
) -> np.ndarray:
    """Pool each channel's whole H x W plane to one value (timm's SelectAdaptivePool2d kinds).

    Args:
        x: input in `layout`; float16, bfloat16, float32 or float64.
        kind: "avg"; "max"; "avgmax" = (avg + max) / 2; "catavgmax" = avg and max concatenated
            along channels (2C outputs, avg first); "gem" = ``mean(clamp(x, eps)^p)^(1/p)``.
        layout: "NCHW", "NHWC", "CHW" or "HWC".
        keepdim: keep H and W as size-1 axes in the layout's positions.
        p: GeM exponent, > 0 (checked for every kind, as `gapnet.functional`).
        eps: GeM clamp, > 0, so that no fractional power of a non-positive value is taken.

    Shape:
        (N, C, H, W) or (N, H, W, C) -> (N, C'); (C, H, W) or (H, W, C) -> (C',); with keepdim
        (N, C', 1, 1) or (N, 1, 1, C'). C' is 2C for "catavgmax", else C.

    Example:
        >>> x = np.array([[[1.0, 2.0], [3.0, 6.0]]])  # (C=1, H=2, W=2)
        >>> global_pool2d(x, "catavgmax", layout="CHW")
        array([3., 6.])
    """
    x4, lay, planes = _global_setup(x, kind, layout, p, eps)
    if kind == "gem":
        y = (np.maximum(planes, eps) ** p).mean(axis=-1) ** (1.0 / p)
    else:
        avg = planes.mean(axis=-1)  # (N, C)
        peak = np.take_along_axis(planes, _plane_argmax(planes), axis=-1)[..., 0]
        y = {
            "avg": avg,
            "max": peak,
            "avgmax": 0.5 * (avg + peak),
            "catavgmax": np.concatenate([avg, peak], axis=1),
        }[kind]
    return y.astype(x4.dtype).reshape(lay.pooled_shape(x4.shape[0], y.shape[1], keepdim))


def global_pool2d_backward(
    grad_out: np.ndarray,
    x: np.ndarray,
    kind: str = "avg",
    *,
    layout: str = "NCHW",
    keepdim: bool = False,
    p: float = 3.0,
    eps: float = 1e-6,
) -> Any:
    """Gradient of `global_pool2d`: ``grad_x``, or for ``kind="gem"`` ``(grad_x, grad_p)``.

    A max sends each channel's whole gradient to one cell, the first maximum (the last NaN),
    as ``adaptive_max_pool2d(x, 1)`` does, not split among ties as ``amax``. GeM passes no
    gradient to cells below `eps`; `grad_p` is a Python float.

    Args:
        grad_out: gradient with respect to the pooled output, shaped as it.
        x, kind, layout, keepdim, p, eps: as `global_pool2d`.

    Shape:
        grad_out (N, C'), x (N, C, H, W) -> grad_x (N, C, H, W), in `layout`.

    Example:
        >>> x = np.array([[[1.0, 2.0], [3.0, 6.0]]])
        >>> global_pool2d_backward(np.array([4.0]), x, "avgmax", layout="CHW")
        array([[[0.5, 0.5],
                [0.5, 2.5]]])
    """
    x4, lay, planes = _global_setup(x, kind, layout, p, eps)
    n, c, h, w = x4.shape
    c_out = 2 * c if kind == "catavgmax" else c
    g = np.asarray(grad_out)
    if g.shape != lay.pooled_shape(n, c_out, keepdim):
        raise ValueError(
            f"global_pool2d_backward: grad_out must have the output's shape "
            f"{lay.pooled_shape(n, c_out, keepdim)}, got {g.shape}"
        )
    g = g.reshape(n, c_out, 1).astype(planes.dtype)  # (N, C', 1) against (N, C, H*W) planes

    def avg_grad(g: np.ndarray) -> np.ndarray:
        return np.broadcast_to(g / (h * w), planes.shape)

    def max_grad(g: np.ndarray) -> np.ndarray:
        grad = np.zeros_like(planes)
        np.put_along_axis(grad, _plane_argmax(planes), g, axis=-1)
        return grad

    grad_p = None
    if kind == "avg":
        grad = avg_grad(g)
    elif kind == "max":
        grad = max_grad(g)
    elif kind == "avgmax":
        grad = 0.5 * (avg_grad(g) + max_grad(g))
    elif kind == "catavgmax":
        grad = avg_grad(g[:, :c]) + max_grad(g[:, c:])
    else:  # y = m^(1/p) with m = mean(z^p) and z = clamp(x, eps)
        z = np.maximum(planes, eps)
        zp = z**p
        m = zp.mean(axis=-1, keepdims=True)  # (N, C, 1)
        y = m ** (1.0 / p)
        grad = g * m ** (1.0 / p - 1.0) * z ** (p - 1.0) / (h * w) * (planes >= eps)
        # dy/dp = y * (mean(z^p log z) / (p m) - log(m) / p^2), summed over every output
        dy_dp = y * ((zp * np.log(z)).mean(axis=-1, keepdims=True) / (p * m) - np.log(m) / p**2)
        grad_p = float((g * dy_dp).sum())
    grad_x = _from_nchw(grad.reshape(x4.shape).astype(x4.dtype), lay)
    return (grad_x, grad_p) if kind == "gem" else grad_x


def global_avg_pool2d(x: np.ndarray, *, layout: str = "NCHW", keepdim: bool = False) -> np.ndarray:
    """Global average pooling: each channel's mean over H x W, ``global_pool2d(x, "avg")``.

    Args:
        x: input in `layout`; float16, bfloat16, float32 or float64.
        layout: "NCHW", "NHWC", "CHW" or "HWC".
        keepdim: keep H and W as size-1 axes.

    Shape:
        (H, W, C) -> (C,) for any H and W; (N, C, H, W) -> (N, C).

    Example:
        >>> global_avg_pool2d(np.arange(12.0).reshape(2, 3, 2), layout="HWC")
        array([5., 6.])
    """
    return global_pool2d(x, "avg", layout=layout, keepdim=keepdim)


def global_avg_pool2d_backward(
    grad_out: np.ndarray, x: np.ndarray, *, layout: str = "NCHW", keepdim: bool = False
) -> np.ndarray:
    """Gradient of `global_avg_pool2d`: each channel's, over H*W, to every cell of its plane.

    Args:
        grad_out: gradient with respect to the pooled output, shaped as it.
        x, layout, keepdim: as `global_avg_pool2d`.

    Shape:
        grad_out (N, C), x (N, C, H, W) -> (N, C, H, W), in `layout`.

    Example:
        >>> global_avg_pool2d_backward(np.array([4.0]), np.ones((2, 1, 1)), layout="HWC")
        array([[[2.]],
        <BLANKLINE>
               [[2.]]])
    """
    return global_pool2d_backward(grad_out, x, "avg", layout=layout, keepdim=keepdim)


def global_max_pool2d(x: np.ndarray, *, layout: str = "NCHW", keepdim: bool = False) -> np.ndarray:
    """Global max pooling: each channel's maximum over H x W, ``global_pool2d(x, "max")``.

    Args:
        x: input in `layout`; float16, bfloat16, float32 or float64.
        layout: "NCHW", "NHWC", "CHW" or "HWC".
        keepdim: keep H and W as size-1 axes.

    Shape:
        (N, C, H, W) -> (N, C).

    Example:
        >>> global_max_pool2d(np.arange(8.0).reshape(1, 2, 2, 2), keepdim=True)
        array([[[[3.]],
        <BLANKLINE>
                [[7.]]]])
    """
    return global_pool2d(x, "max", layout=layout, keepdim=keepdim)


def global_max_pool2d_backward(
    grad_out: np.ndarray, x: np.ndarray, *, layout: str = "NCHW", keepdim: bool = False
) -> np.ndarray:
    """Gradient of `global_max_pool2d`: each channel's to its first maximum (last NaN).

    Args:
        grad_out: gradient with respect to the pooled output, shaped as it.
        x, layout, keepdim: as `global_max_pool2d`.

    Shape:
        grad_out (N, C), x (N, C, H, W) -> (N, C, H, W), in `layout`.

    Example:
        >>> x = np.array([[[2.0, 7.0, 7.0]]])  # (C=1, H=1, W=3): a tie
        >>> global_max_pool2d_backward(np.array([1.0]), x, layout="CHW")
        array([[[0., 1., 0.]]])
    """
    return global_pool2d_backward(grad_out, x, "max", layout=layout, keepdim=keepdim)
