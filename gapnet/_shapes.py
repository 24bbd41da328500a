"""The one place for argument normalisation, validation and output-size math of the pooling ops.

Pure Python (no NumPy, no torch): `gapnet.reference`, `gapnet.functional` and the Triton
launchers all call it, so a rule (PyTorch's padding limit, Keras's "same", ceil_mode's dropped
last window) is written once and every backend agrees on it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

IntPair = int | Sequence[int]
Padding = int | Sequence[int] | str

LAYOUTS = ("NCHW", "NHWC", "CHW", "HWC")
GLOBAL_KINDS = ("avg", "max", "avgmax", "catavgmax", "gem")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class Layout:
    """How one of the four layouts maps onto NCHW."""

    name: str
    batched: bool  # False for CHW / HWC: the ops add and remove a batch axis of 1
    to_nchw: tuple[int, int, int, int]  # permutation of the (batched) input axes
    from_nchw: tuple[int, int, int, int]  # permutation that undoes it

    @property
    def channels_last(self) -> bool:
        return self.name in ("NHWC", "HWC")

    def pooled_shape(self, n: int, c: int, keepdim: bool) -> tuple[int, ...]:
        """Shape of a global pool's result: (N, C), or with keepdim the input's rank with 1x1."""
        shape: tuple[int, ...] = (n, c)
        if keepdim:
            shape = (n, 1, 1, c) if self.channels_last else (n, c, 1, 1)
        return shape if self.batched else shape[1:]


# Each layout's axis order that turns it, after a batch axis is added to an unbatched one, into
# NCHW, and the inverse that turns an NCHW result back; built once, returned by check_layout.
_LAYOUT_OF = {
    "NCHW": Layout("NCHW", True, (0, 1, 2, 3), (0, 1, 2, 3)),
    "NHWC": Layout("NHWC", True, (0, 3, 1, 2), (0, 2, 3, 1)),
    "CHW": Layout("CHW", False, (0, 1, 2, 3), (0, 1, 2, 3)),
    "HWC": Layout("HWC", False, (0, 3, 1, 2), (0, 2, 3, 1)),
}


def check_layout(layout: str, shape: Sequence[int], op: str) -> Layout:
    """Validate `layout` and the input's rank for it; return how it maps onto NCHW."""
    if layout not in LAYOUTS:
        raise ValueError(f"{op}: layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    rank = len(layout)
    if len(shape) != rank:
        axes = ", ".join(layout)
        raise ValueError(
            f"{op} with layout={layout!r} expects a {rank}-d input ({axes}), "
            f"got shape {tuple(shape)}"
        )
    return _LAYOUT_OF[layout]


def check_float_dtype(dtype: str, op: str) -> None:
    """Integer and bool inputs are a TypeError: pooling them would silently truncate means."""
    name = dtype.replace("torch.", "")
    if name not in FLOAT_DTYPES:
        raise TypeError(
            f"{op} expects a floating-point input ({', '.join(FLOAT_DTYPES)}), got {name}"
        )


def check_kind(kind: str, op: str = "global_pool2d") -> str:
    if kind not in GLOBAL_KINDS:
        raise ValueError(f"{op}: kind must be one of {', '.join(GLOBAL_KINDS)}, got {kind!r}")
    return kind


def check_gem(p: float | None, eps: float) -> None:
    """GeM needs p > 0 (a p of 0 is a geometric mean, not supported) and a positive clamp."""
    if p is not None and not p > 0:
        raise ValueError(f"global_pool2d: p must be > 0, got {p}")
    if not eps > 0:
        raise ValueError(f"global_pool2d: eps must be > 0, got {eps}")


def check_divisor_override(value: int | None, op: str = "avg_pool2d") -> None:
    """As PyTorch: None, or a nonzero int that replaces every window's count (negative allowed)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: divisor_override must be an int or None, got {value!r}")
    if value == 0:
        raise ValueError(f"{op}: divisor_override must be nonzero, got 0")


def pair(value: IntPair, name: str, minimum: int = 1) -> tuple[int, int]:
    """An int or a pair of ints as (h, w), each at least `minimum`."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        values: tuple = (value, value)
    else:
        try:
            values = tuple(value)
        except TypeError:
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
        if len(values) == 1:
            values = values * 2
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(values) < minimum:
        shown = values[0] if values[0] == values[1] else values
        raise ValueError(f"{name} must be >= {minimum}, got {shown}")
    return values[0], values[1]


@dataclass(frozen=True)
class Window2d:
    """Where every window of a strided 2-d pool lies, resolved once for all backends.

    A window of output (i, j) covers input rows `i*stride_h - pad_top + a*dilation_h` for
    a in range(kernel_h), and likewise for columns; rows outside [0, in_h) are padding.
    """

    in_size: tuple[int, int]  # (H, W)
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pad_before: tuple[int, int]  # (top, left)
    pad_after: tuple[int, int]  # (bottom, right): where "same" puts the odd cell
    out_size: tuple[int, int]
    same: bool  # Keras "same": padded cells are never counted in an average

    @functools.lru_cache(maxsize=1024)  # noqa: B019 - windows are few and small, and plans keep them alive anyway
    def divisors(self, count_include_pad: bool, axis: int) -> tuple[int, ...]:
        """Per-output cell count along one axis; an average's divisor is the product of two.

        As PyTorch: with count_include_pad the window is clipped to the padded input (so a
        ceil_mode window that runs past the padding counts fewer cells), else to the input.
        Cached: every average pool call on every backend asks for them.
        """
        size, k, s, d = (
            self.in_size[axis],
            self.kernel[axis],
            self.stride[axis],
            self.dilation[axis],
        )
        lo, hi = self.pad_before[axis], self.pad_after[axis]
        counts = []
        for i in range(self.out_size[axis]):
            start = i * s - lo
            if count_include_pad and not self.same:
                counts.append(min(start + (k - 1) * d + 1, size + hi) - start)
            else:
                counts.append(sum(1 for a in range(k) if 0 <= start + a * d < size))
        return tuple(counts)


def geometry(win: Window2d) -> list[int]:
    """A Window2d as the list of ints that crosses a custom op's boundary (ops take plain types;
    under torch.compile with dynamic shapes some of them are symbolic)."""
    return [*win.kernel, *win.stride, *win.dilation, *win.pad_before, *win.pad_after,
            *win.out_size, int(win.same)]  # fmt: skip


def window_of(in_size: Sequence[int], geom: Sequence[int]) -> Window2d:
    """The inverse of `geometry`, for an input of (H, W) `in_size`."""
    k, s, d, before, after, out = (tuple(geom[i : i + 2]) for i in range(0, 12, 2))
    return Window2d((in_size[0], in_size[1]), k, s, d, before, after, out, bool(geom[12]))  # type: ignore[arg-type]


def tap_span(win: Window2d, axis: int, a: int) -> tuple[int, int]:
    """[lo, hi): the outputs along `axis` whose tap `a` lies inside the input (lo >= hi: none).

    Output i's tap a reads ``i*stride - pad_before + a*dilation``; O(1), whatever the size.
    """
    size, s = win.in_size[axis], win.stride[axis]
    first = a * win.dilation[axis] - win.pad_before[axis]  # input position of output 0's tap
    return max(0, -(first // s)), min(win.out_size[axis], (size - 1 - first) // s + 1)


def windows_touch_input(win: Window2d, axis: int) -> bool:
    """Whether every window along `axis` holds at least one real (non-padding) cell.

    The union of the kernel's tap spans must cover all outputs: O(kernel^2) work, never a loop
    over the outputs, so that the check of a huge plane costs what a small one does (and no
    sort: torch.compile traces this with symbolic sizes).
    """
    spans = [tap_span(win, axis, a) for a in range(win.kernel[axis])]
    reached = 0  # outputs [0, reached) are covered so far
    for _ in spans:  # k rounds of extending the covered run by the spans that touch it
        for lo, hi in spans:
            if lo <= reached < hi:
                reached = hi
    return reached >= win.out_size[axis]


def check_pool_channels(channels: int, op: str) -> None:
    """As PyTorch's max and avg pools: N may be 0 (an empty result), C may not, on any backend."""
    if channels < 1:
        raise ValueError(f"{op}: input must have at least one channel, got C={channels}")


def _same_padding(size: int, k: int, s: int, d: int) -> tuple[int, int, int]:
    """Keras/TensorFlow "same": out = ceil(in / stride), the odd cell of padding after."""
    out = -(-size // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return out, total // 2, total - total // 2


def _torch_out_size(size: int, k: int, s: int, d: int, pad: int, ceil_mode: bool) -> int:
    """PyTorch's pooling_output_shape, including its ceil_mode rule."""
    span = size + 2 * pad - (k - 1) * d - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + pad:
        out -= 1  # a last window that would start in the padding is dropped
    return out


def window2d(
    op: str,
    in_size: Sequence[int],
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: Padding = 0,
    dilation: IntPair = 1,
    ceil_mode: bool = False,
) -> Window2d:
    """Validate the arguments of a strided 2-d pool and resolve its windows and output size.

    Not cached here: `gapnet.functional` keeps each validated call's outcome, windows included.
    """
    kernel = pair(kernel_size, "kernel_size")
    # PyTorch reads an empty stride, `stride=()` or `[]`, as "the kernel size", like None
    no_stride = stride is None or (isinstance(stride, Sequence) and len(stride) == 0)
    strides = kernel if no_stride else pair(stride, "stride")  # type: ignore[arg-type]
    dil = pair(dilation, "dilation")
    same = False
    if isinstance(padding, str):
        if padding not in ("valid", "same"):
            raise ValueError(
                f"{op}: padding must be an int, a pair, 'valid' or 'same', got {padding!r}"
            )
        if padding == "same":
            if ceil_mode:
                raise ValueError(f"{op}: ceil_mode=True has no meaning with padding='same'")
            same = True
            pads = [_same_padding(in_size[a], kernel[a], strides[a], dil[a]) for a in (0, 1)]
            out = (pads[0][0], pads[1][0])
            before, after = (pads[0][1], pads[1][1]), (pads[0][2], pads[1][2])
        else:
            padding = 0
    if not same:
        before = after = pair(padding, "padding", minimum=0)  # type: ignore[arg-type]
        for a in (0, 1):
            # PyTorch's limit, on the kernel size itself (not the dilated extent): every window
            # then holds at least one real cell, so no max is -inf and no count is zero.
            if before[a] > kernel[a] // 2:
                raise ValueError(
                    f"{op}: padding must be at most half of kernel_size, "
                    f"got padding={before} and kernel_size={kernel}"
                )
        out = tuple(  # type: ignore[assignment]
            _torch_out_size(in_size[a], kernel[a], strides[a], dil[a], before[a], ceil_mode)
            for a in (0, 1)
        )
    if min(out) < 1 or min(in_size) < 1:
        raise ValueError(
            f"{op}: output would be empty: input {in_size[0]}x{in_size[1]} with "
            f"kernel_size={kernel}, stride={strides}, padding={padding!r}, dilation={dil} "
            f"gives {out[0]}x{out[1]}"
        )
    window = Window2d((in_size[0], in_size[1]), kernel, strides, dil, before, after, out, same)  # type: ignore[arg-type]
    for axis in (0, 1):
        # Dilation can step over every real cell (PyTorch then returns -inf and its backward
        # corrupts memory): such a window has no value to pool, so refuse it.
        if not windows_touch_input(window, axis):
            raise ValueError(
                f"{op}: a window would hold only padding: input {in_size[0]}x{in_size[1]} with "
                f"kernel_size={kernel}, padding={padding!r}, dilation={dil}"
            )
    return window


def adaptive_output_size(
    output_size: int | Sequence[int | None] | None, in_size: Sequence[int], op: str
) -> tuple[int, int]:
    """An adaptive pool's (H_out, W_out); None keeps that input dimension, as in PyTorch."""
    if output_size is None or isinstance(output_size, int):
        sizes = [output_size, output_size]
    else:
        sizes = list(output_size) if isinstance(output_size, Sequence) else []
        if len(sizes) != 2:
            raise TypeError(f"{op}: output_size must be an int or a pair, got {output_size!r}")
    resolved = []
    for axis, size in enumerate(sizes):
        size = in_size[axis] if size is None else size
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"{op}: output_size must be an int or a pair, got {output_size!r}")
        if size < 1:
            raise ValueError(f"{op}: output_size must be >= 1, got {output_size!r}")
        resolved.append(size)
    check_global_input((in_size[0], in_size[1]), op)
    return resolved[0], resolved[1]


def adaptive_bins(in_size: int, out_size: int) -> list[tuple[int, int]]:
    """Bin i of an adaptive pool covers [floor(i*In/Out), ceil((i+1)*In/Out)), as PyTorch."""
    return [
        ((i * in_size) // out_size, -(-((i + 1) * in_size) // out_size)) for i in range(out_size)
    ]


def check_global_input(in_size: tuple[int, int], op: str) -> None:
    if min(in_size) < 1:
        raise ValueError(f"{op}: input H and W must be >= 1, got {in_size[0]}x{in_size[1]}")
