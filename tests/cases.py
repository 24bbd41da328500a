"""Case tables for the pooling ops, shared by every test file that checks an implementation.

Plain data, no torch: each row is a `Case`, an input height and width plus the keyword arguments
of the op as ``torch.nn.functional`` (and `gapnet.reference`) name them. Tests pick the batch,
channels, layout and dtype themselves. Every row carries a comment saying what it covers.

    for case in MAX_POOL_CASES:
        y = reference.max_pool2d(x_of_shape(2, 3, *case.hw), **case.kwargs)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Case:
    """One call of an op: the input's (H, W) and the op's keyword arguments."""

    hw: tuple[int, int]  # input height and width
    kwargs: dict[str, Any]  # e.g. {"kernel_size": 3, "stride": 2, "padding": 1}

    def __str__(self) -> str:  # a readable pytest id: 9x9-kernel_size=3-stride=2
        args = "-".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.hw[0]}x{self.hw[1]}-{args}"


MAX_POOL_CASES = [
    # the classic 2x2 pool with stride 2: halves H and W
    Case((8, 8), {"kernel_size": 2}),
    # ResNet's stem pool: 3x3, stride 2, padding 1 on an odd size
    Case((9, 9), {"kernel_size": 3, "stride": 2, "padding": 1}),
    # a different kernel, stride and padding per axis, on a non-square input
    Case((7, 10), {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 0)}),
    # overlapping windows (stride < kernel): one cell is the max of several windows
    Case((6, 6), {"kernel_size": 3, "stride": 1}),
    # gaps between windows (stride > kernel): some cells are never read
    Case((9, 8), {"kernel_size": 2, "stride": 3}),
    # odd size without ceil_mode: the last row and column are dropped
    Case((7, 7), {"kernel_size": 2}),
    # ceil_mode keeps a partial last window
    Case((7, 7), {"kernel_size": 2, "stride": 2, "ceil_mode": True}),
    # ceil_mode whose last window would start in the padding: PyTorch drops it (3, not 4)
    Case((5, 5), {"kernel_size": 2, "stride": 2, "padding": 1, "ceil_mode": True}),
    # ceil_mode with padding: the last window runs past the padding
    Case((6, 6), {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}),
    # dilation 2: a 3x3 window spread over 5x5
    Case((9, 9), {"kernel_size": 3, "stride": 1, "dilation": 2}),
    # dilation per axis, with padding and stride
    Case((8, 9), {"kernel_size": 3, "stride": 2, "padding": 1, "dilation": (2, 1)}),
    # dilation with ceil_mode
    Case((8, 8), {"kernel_size": 2, "stride": 3, "dilation": 2, "ceil_mode": True}),
    # a 1x1 kernel with stride 2: plain subsampling
    Case((5, 6), {"kernel_size": 1, "stride": 2}),
    # a kernel as large as the input: one output, the global max
    Case((5, 7), {"kernel_size": (5, 7)}),
    # "valid" is padding 0
    Case((7, 7), {"kernel_size": 3, "stride": 2, "padding": "valid"}),
    # "same" with stride 1 and an odd kernel: one cell each side, output = input size
    Case((6, 7), {"kernel_size": 3, "stride": 1, "padding": "same"}),
    # "same" with stride 2 on an even size: the odd padding cell goes at the bottom/right
    Case((8, 8), {"kernel_size": 3, "stride": 2, "padding": "same"}),
    # "same" with an even kernel: all padding after
    Case((5, 6), {"kernel_size": 2, "stride": 1, "padding": "same"}),
    # "same" with stride 3: different padding per axis (7 rows: 1 + 1, 8 columns: 0 + 1)
    Case((7, 8), {"kernel_size": 3, "stride": 3, "padding": "same"}),
    # "same" with stride > kernel: no padding at all
    Case((6, 6), {"kernel_size": 2, "stride": 3, "padding": "same"}),
    # "same" with dilation (TensorFlow's dilated pooling): padding covers the dilated extent
    Case((7, 7), {"kernel_size": 2, "stride": 1, "dilation": 2, "padding": "same"}),
]

AVG_POOL_CASES = [
    # the classic 2x2 pool with stride 2: each window's mean
    Case((8, 8), {"kernel_size": 2}),
    # 3x3, stride 2, padding 1: border windows divide by 9, padded zeros included
    Case((9, 9), {"kernel_size": 3, "stride": 2, "padding": 1}),
    # the same without counting padding: border windows divide by 4 or 6
    Case((9, 9), {"kernel_size": 3, "stride": 2, "padding": 1, "count_include_pad": False}),
    # a different kernel, stride and padding per axis, on a non-square input
    Case((7, 10), {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 1)}),
    # overlapping windows (stride < kernel)
    Case((6, 6), {"kernel_size": 3, "stride": 1}),
    # gaps between windows (stride > kernel)
    Case((9, 8), {"kernel_size": 2, "stride": 3}),
    # ceil_mode without padding: the partial last window divides by its real cells
    Case((7, 7), {"kernel_size": 3, "stride": 2, "ceil_mode": True}),
    # ceil_mode past the padding: the count is clipped to the padded input (6, not 9)
    Case((6, 6), {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}),
    # the same without counting padding
    Case(
        (6, 6),
        {
            "kernel_size": 3,
            "stride": 2,
            "padding": 1,
            "ceil_mode": True,
            "count_include_pad": False,
        },
    ),
    # ceil_mode whose last window would start in the padding: PyTorch drops it
    Case((5, 5), {"kernel_size": 2, "stride": 2, "padding": 1, "ceil_mode": True}),
    # divisor_override replaces every count, at the border too
    Case((7, 7), {"kernel_size": 3, "stride": 2, "padding": 1, "divisor_override": 5}),
    # divisor_override on ceil_mode's partial windows
    Case((7, 6), {"kernel_size": 2, "ceil_mode": True, "divisor_override": 3}),
    # a negative divisor_override: PyTorch accepts any nonzero int
    Case((4, 4), {"kernel_size": 2, "divisor_override": -2}),
    # a kernel as large as the input: one output, the global mean
    Case((5, 7), {"kernel_size": (5, 7)}),
    # "valid" is padding 0
    Case((7, 7), {"kernel_size": 3, "stride": 2, "padding": "valid"}),
    # "same" with stride 1: border windows divide by their real cells only
    Case((6, 7), {"kernel_size": 3, "stride": 1, "padding": "same"}),
    # "same" with stride 2 on an even size: the odd padding cell at the bottom/right
    Case((8, 8), {"kernel_size": 3, "stride": 2, "padding": "same"}),
    # "same" with an even kernel: all padding after
    Case((5, 6), {"kernel_size": 2, "stride": 1, "padding": "same"}),
    # "same" with stride 3: different padding per axis
    Case((7, 8), {"kernel_size": 3, "stride": 3, "padding": "same"}),
    # "same" never counts padding, whatever count_include_pad says
    Case((5, 5), {"kernel_size": 3, "stride": 2, "padding": "same", "count_include_pad": False}),
    # "same" with divisor_override
    Case((5, 5), {"kernel_size": 2, "stride": 2, "padding": "same", "divisor_override": 2}),
]

ADAPTIVE_CASES = [
    # the output divides the input: plain 2x2 bins, as a 2x2/2 pool
    Case((8, 8), {"output_size": 4}),
    # the output does not divide the input: bins of varying size that overlap
    Case((7, 9), {"output_size": (3, 4)}),
    # an output larger than the input: bins repeat cells
    Case((3, 2), {"output_size": (5, 4)}),
    # 1x1: the global pool
    Case((5, 7), {"output_size": 1}),
    # None keeps that input size
    Case((6, 5), {"output_size": (None, 2)}),
    # output = input: the identity
    Case((4, 5), {"output_size": (4, 5)}),
    # a 1x1 input spread to 3x3
    Case((1, 1), {"output_size": 3}),
    # the usual detection-head size on an odd map
    Case((11, 13), {"output_size": 7}),
]

GLOBAL_CASES = [
    # GAP on a ResNet-style 7x7 map
    Case((7, 7), {"kind": "avg"}),
    # GAP on a non-square map, keeping H and W as size-1 axes
    Case((3, 5), {"kind": "avg", "keepdim": True}),
    # global max
    Case((4, 6), {"kind": "max"}),
    # global max on a 1x1 map: the identity
    Case((1, 1), {"kind": "max", "keepdim": True}),
    # avgmax: mean of the average and the max
    Case((5, 4), {"kind": "avgmax"}),
    # avgmax on a 1xW strip
    Case((1, 9), {"kind": "avgmax", "keepdim": True}),
    # catavgmax: 2C outputs, average first
    Case((5, 4), {"kind": "catavgmax"}),
    # catavgmax keeping dims
    Case((2, 3), {"kind": "catavgmax", "keepdim": True}),
    # GeM with the usual p = 3 (eps clamps the negative cells)
    Case((6, 6), {"kind": "gem"}),
    # GeM with p = 1: the mean of clamp(x, eps)
    Case((4, 5), {"kind": "gem", "p": 1.0}),
    # GeM with a fractional p and a large eps that clamps many cells
    Case((5, 5), {"kind": "gem", "p": 2.5, "eps": 0.3, "keepdim": True}),
]
