"""Triton kernels for strided 2-d max and average pooling, forward and backward.

Every launcher takes a resolved `gapnet._shapes.Window2d` and tensors that are logically NCHW
`(N, C, H, W)` with any strides. Two tilings, picked from the strides:

- planar (NCHW-contiguous, or any layout whose W is not C-fastest): a program owns a
  `[BLOCK_PL, BLOCK_OH, BLOCK_OW]` tile, W along the lanes; several (n, c) planes per program
  only when one plane's output is smaller than the tile.
- channels_last (C is the unit stride): a program owns `[BLOCK_OH, BLOCK_OW, BLOCK_C]` of one
  image, C along the lanes, so loads and stores are coalesced and vectorised along C.

Both index their tensors through strides (no `.contiguous()` copy); outputs follow the input's
memory format, as PyTorch. Window geometry (kernel, stride, dilation, leading padding) is
`tl.constexpr`: few values occur in practice and the tap loops unroll with every
tap-validity test resolved at compile time. The unrolling has a price: Triton 3.6 took 80 s
to compile a 17x17 forward and 150 s for its backward, so the dispatcher should send windows
of more than `MAX_TAPS` taps to PyTorch.

Backward kernels are gathers: a program owns a tile of grad_x and pulls, for each tap, the one
output whose window lands that tap on each cell, so every element of grad_x is written exactly
once, with no atomics and no zero-fill pass, bitwise deterministically. They tile grad_x in
"cell" space: cell (qh, qw) covers input rows qh*SH + ph, ph in range(SH) (and likewise
columns). For a fixed phase (ph, pw) the taps that can reach a cell and the output they come
from (oh = qh + const) are known at compile time, so each cell visits only its ~(K/S)^2 live
taps with no per-element division or modulo; with strides of 2 each nearby output's grad_y and
saved tap are loaded once per cell and handed to all its phases (`_bwd_small_stride`).

Max pooling saves, for the backward, only the chosen tap `a*KW + b` of each window (uint8 when
the window has at most 256 taps): one byte per output instead of PyTorch's int64 index.

float16, bfloat16 and float32 only, accumulating in float32; float64 is routed to PyTorch by
the dispatcher in `gapnet.functional` (these kernels would lose its precision).

Measured on an H100 80GB HBM3 (copy 3.0 TB/s), PyTorch 2.11, Triton 3.6, medians of
`triton.testing.do_bench`, fraction of the byte floor (eager PyTorch in brackets), before the
planar stride-2 pair loads and interleaved backward stores, which are not yet measured:
channels_last: max k3 s2 stem fp32 fwd 0.90 (0.38), bwd 0.96 (0.17); bf16 fwd 0.73-0.83,
bwd 0.93; max k2 s2 0.91-0.98; avg k3 s1 fp32 0.86/0.90, bf16 0.70/0.74; avg k2 s2 0.86-0.92.
planar: max stem fp32 fwd 0.36 (eager 0.45, torch.compile 0.92), bf16 0.29, bwd 0.54/0.23;
max k2 s2 fwd 0.76/0.59, bwd 0.43/0.23; avg k3 s1 fwd 0.67/0.33, bwd 0.54/0.24; avg k2 s2
fwd 0.64/0.46, bwd 0.22/0.09. The planar stride-2 loads read every other element (half of each
sector per instruction) and its backward stored every other element: `_tap_pair` and
`_store_row` now read and write whole sectors; planar stride-1 windows still issue one
misaligned load per tap and are bound by load instructions.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from gapnet._shapes import Window2d
from gapnet.kernels import KERNEL_DTYPES, empty_like_format, offsets_dtype

# Div modes of the average: 0 divisor_override, 1 window clipped to the padded extent
# (count_include_pad and not "same"), 2 number of real taps.
_DIV_OVERRIDE, _DIV_PADDED, _DIV_REAL = 0, 1, 2

# Tile sizes, in elements of the larger tensor per program: 4 warps of 32 threads with 4-8
# elements each keeps 36-72 independent loads per thread in flight for a 3x3 window, enough
# to cover DRAM latency, without spilling registers.
_FWD_TILE = 1024  # outputs per forward program
# grad_x cells per backward program: each does ~1 load per cell, so a larger tile amortises the
# program's fixed index arithmetic.
_BWD_TILE = 2048
_NUM_WARPS = 4
_MAX_GRID_Z = 65535
# Pair loads for planar stride-2 windows (see _tap_pair); False restores one load per tap.
_PAIRS = True
# Windows with more taps than this compile for minutes (every tap unrolls): the dispatcher
# should send them to PyTorch. The kernels themselves take any window.
MAX_TAPS = 64


# ---------------------------------------------------------------------------------------------
# Shared device helpers (inlined into the kernels).
# ---------------------------------------------------------------------------------------------


@triton.jit
def _axis_count(start, SIZE, PAD_AFTER, K: tl.constexpr, D: tl.constexpr, MODE: tl.constexpr):
    """Cells a window starting at `start` counts along one axis (Window2d.divisors)."""
    if MODE == 1:
        count = tl.minimum(start + ((K - 1) * D + 1), SIZE + PAD_AFTER) - start
    elif D == 1:
        count = tl.minimum(start + K, SIZE) - tl.maximum(start, 0)
    else:
        count = tl.zeros_like(start)
        for a in tl.static_range(K):
            pos = start + a * D
            count += ((pos >= 0) & (pos < SIZE)).to(tl.int32)
    return count


@triton.jit
def _first_real_tap(start, K: tl.constexpr, D: tl.constexpr, PAD: tl.constexpr):
    """Index of the first tap of a window at `start` that lies inside the input (not padding)."""
    if PAD > 0:  # noqa: SIM108 (a compile-time branch, kept a statement for Triton)
        first = tl.where(start < 0, (D - 1 - start) // D, 0)
    else:
        first = tl.zeros_like(start)
    return first


@triton.jit
def _tap(
    rp,  # row pointers of one tap row, broadcastable to the tile
    rmask,  # tile elements whose tap row is a real row
    ow,
    W,
    sxw,
    SW: tl.constexpr,
    DW: tl.constexpr,
    PL: tl.constexpr,
    B: tl.constexpr,
    OTHER: tl.constexpr,
):
    """Tap column B of one tap row for each output column (OTHER at padding)."""
    iw = ow * SW - PL + B * DW
    cmask = iw < W
    if PL > 0:
        cmask = cmask & (iw >= 0)
    return tl.load(rp + iw * sxw, mask=rmask & cmask, other=OTHER)


@triton.jit
def _tap_pair(
    rp,  # row pointers of one tap row, (B0, B1, 1)
    rowmask,  # planes and rows of the tile that exist, this tap row being a real row
    col0,  # first output column of the tile
    W,
    sxw,
    M: tl.constexpr,
    OTHER: tl.constexpr,
    BLOCK_0: tl.constexpr,
    BLOCK_1: tl.constexpr,
    BLOCK_2: tl.constexpr,
):
    """Input columns 2*(ow + M) and 2*(ow + M) + 1 of one tap row, as two tile-shaped tensors.

    For planar tiles with SW == 2 and DW == 1 (the ResNet stem, VGG's 2x2): windows two columns
    apart tile each row with pairs, so one contiguous load of 2*BLOCK_2 columns serves two
    taps and reads whole sectors along the lanes, where a load per tap reads every other
    element (half of every sector per instruction, twice the instructions). The columns are
    one arange (not a join of even and odd ones) so that the compiler sees them contiguous,
    lays lanes along them and vectorises the pairs.
    """
    iw = 2 * (col0 + M) + tl.arange(0, 2 * BLOCK_2)[None, None, :]  # (1, 1, 2*B2)
    mask = rowmask & (iw >= 0) & (iw < W)
    pairs = tl.load(rp + iw * sxw, mask=mask, other=OTHER)  # (B0, B1, 2*B2)
    return tl.split(tl.reshape(pairs, [BLOCK_0, BLOCK_1, BLOCK_2, 2]))


@triton.jit
def _max_window(
    xp,  # pointer tensor: the (n, c) base of each tile element, broadcastable
    oh,  # output rows, broadcastable
    ow,  # output columns, broadcastable
    omask,  # tile elements that exist
    lmask,  # omask without its column term (planar: planes and rows)
    col0,  # first output column of a planar tile
    H,
    W,
    sxh,
    sxw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    PT: tl.constexpr,
    PL: tl.constexpr,
    NEED_IDX: tl.constexpr,
    PAIRS: tl.constexpr,
    BLOCK_0: tl.constexpr,
    BLOCK_1: tl.constexpr,
    BLOCK_2: tl.constexpr,
):
    """Max over each window, row-major, `v > m or isnan(v)`: first maximum, last NaN."""
    ih0 = oh * SH - PT
    iw0 = ow * SW - PL
    m = tl.full(omask.shape, float("-inf"), tl.float32)
    idx = tl.zeros(omask.shape, tl.int32)
    if NEED_IDX:
        # PyTorch starts the argmax at the first real tap: a window of -inf then points there.
        idx += _first_real_tap(ih0, KH, DH, PT) * KW + _first_real_tap(iw0, KW, DW, PL)
    for a in tl.static_range(KH):
        ih = ih0 + a * DH
        real = ih < H
        if PT > 0:
            real = real & (ih >= 0)
        rmask = omask & real
        rowmask = lmask & real
        rp = xp + ih * sxh  # row pointers, computed once per row and tap row
        # Padded taps read -inf, never taken: `take` needs no mask (predicate registers are
        # few, and a masked `take` spills them). Compare in float32: exact for every input
        # dtype, and the interpreter stores bfloat16 as raw uint16 bits.
        if PAIRS:
            # Tap b is element (b - PL) % 2 of pair (b - PL) // 2; pairs in order keep taps
            # in row-major order.
            for pm in tl.static_range(-PL // 2, (KW - 1 - PL) // 2 + 1):
                even, odd = _tap_pair(
                    rp, rowmask, col0, W, sxw, pm, float("-inf"), BLOCK_0, BLOCK_1, BLOCK_2
                )
                for j in tl.static_range(2):
                    if 2 * pm + j + PL >= 0 and 2 * pm + j + PL < KW:
                        v = even.to(tl.float32)
                        if j == 1:
                            v = odd.to(tl.float32)
                        take = (v > m) | (v != v)
                        m = tl.where(take, v, m)
                        if NEED_IDX:
                            idx = tl.where(take, a * KW + 2 * pm + j + PL, idx)
        else:
            for b in tl.static_range(KW):
                v = _tap(rp, rmask, ow, W, sxw, SW, DW, PL, b, float("-inf")).to(tl.float32)
                take = (v > m) | (v != v)
                m = tl.where(take, v, m)
                if NEED_IDX:
                    idx = tl.where(take, a * KW + b, idx)
    return m, idx


@triton.jit
def _avg_window(
    xp,
    oh,
    ow,
    omask,
    lmask,
    col0,
    H,
    W,
    PB,
    PR,
    divisor,
    sxh,
    sxw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    PT: tl.constexpr,
    PL: tl.constexpr,
    DIV_MODE: tl.constexpr,
    PAIRS: tl.constexpr,
    BLOCK_0: tl.constexpr,
    BLOCK_1: tl.constexpr,
    BLOCK_2: tl.constexpr,
):
    """Float32 sum of the real taps of each window over its divisor."""
    ih0 = oh * SH - PT
    iw0 = ow * SW - PL
    acc = tl.zeros(omask.shape, tl.float32)
    for a in tl.static_range(KH):
        ih = ih0 + a * DH
        real = ih < H
        if PT > 0:
            real = real & (ih >= 0)
        rmask = omask & real
        rowmask = lmask & real
        rp = xp + ih * sxh
        if PAIRS:
            for pm in tl.static_range(-PL // 2, (KW - 1 - PL) // 2 + 1):
                even, odd = _tap_pair(rp, rowmask, col0, W, sxw, pm, 0.0, BLOCK_0, BLOCK_1, BLOCK_2)
                if 2 * pm + PL >= 0:
                    acc += even.to(tl.float32)
                if 2 * pm + 1 + PL < KW:
                    acc += odd.to(tl.float32)
        else:
            for b in tl.static_range(KW):
                acc += _tap(rp, rmask, ow, W, sxw, SW, DW, PL, b, 0.0).to(tl.float32)
    if DIV_MODE == 0:
        out = acc / divisor
    else:
        count_h = _axis_count(ih0, H, PB, KH, DH, DIV_MODE)
        count_w = _axis_count(iw0, W, PR, KW, DW, DIV_MODE)
        # Clamped: tile elements past the output count 0 cells (they are not stored).
        out = acc / tl.maximum(count_h * count_w, 1).to(tl.float32)
    return out


@triton.jit
def _bwd_phase(
    acc,  # float32 zeros of the tile's shape
    gp,  # grad_y pointers at the (n, c) base, broadcastable
    op,  # offsets pointers at the (n, c) base (max only)
    qh,  # cell rows, broadcastable
    qw,  # cell columns, broadcastable
    cmask,  # tile elements that exist
    OH,
    OW,
    H,
    W,
    PB,
    PR,
    sgh,
    sgw,
    soh,
    sow,
    PH: tl.constexpr,
    PW: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    PT: tl.constexpr,
    PL: tl.constexpr,
    IS_MAX: tl.constexpr,
    DIV_MODE: tl.constexpr,
):
    """Gradient of input cells (qh*SH + PH, qw*SW + PW): the sum over the taps that reach them.

    Tap (a, b) reaches row h from output row oh = (h + PT - a*DH) / SH when that divides; with
    h = qh*SH + PH the condition and the quotient's offset from qh are compile-time constants.
    """
    for a in tl.static_range(KH):
        if (PH + PT - a * DH) % SH == 0:
            oh = qh + (PH + PT - a * DH) // SH
            rmask = cmask & (oh < OH)
            if (PH + PT - a * DH) < 0:
                rmask = rmask & (oh >= 0)
            if not IS_MAX and DIV_MODE != 0:
                # Clamped: rows outside the output count 0 cells, and 0 * inf is NaN.
                count_h = _axis_count(oh * SH - PT, H, PB, KH, DH, DIV_MODE)
                inv_h = 1.0 / tl.maximum(count_h, 1).to(tl.float32)
            for b in tl.static_range(KW):
                if (PW + PL - b * DW) % SW == 0:
                    ow = qw + (PW + PL - b * DW) // SW
                    mask = rmask & (ow < OW)
                    if (PW + PL - b * DW) < 0:
                        mask = mask & (ow >= 0)
                    if IS_MAX:
                        # Load grad_y only where this window chose this tap.
                        tap = tl.load(op + oh * soh + ow * sow, mask=mask, other=0)
                        mask = mask & (tap.to(tl.int32) == a * KW + b)
                    g = tl.load(gp + oh * sgh + ow * sgw, mask=mask, other=0.0).to(tl.float32)
                    if IS_MAX or DIV_MODE == 0:
                        acc += g  # a uniform divisor is applied once, by the caller
                    else:
                        # Row and column factors: the column one is the same for every tap row
                        # a, so the compiler computes it once per (phase, b).
                        count_w = _axis_count(ow * SW - PL, W, PR, KW, DW, DIV_MODE)
                        inv_w = 1.0 / tl.maximum(count_w, 1).to(tl.float32)
                        acc += g * (inv_h * inv_w)
    return acc


@triton.jit
def _bwd_small_stride(
    gp,
    op,
    qh,
    qw,
    cmask,
    OH,
    OW,
    H,
    W,
    PB,
    PR,
    sgh,
    sgw,
    soh,
    sow,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    PT: tl.constexpr,
    PL: tl.constexpr,
    IS_MAX: tl.constexpr,
    DIV_MODE: tl.constexpr,
    BLOCK_0: tl.constexpr,
    BLOCK_1: tl.constexpr,
    BLOCK_2: tl.constexpr,
):
    """Gradients of the (at most 2x2) cells of each cell tile, for strides of 1 or 2.

    Loops over the outputs near a cell, (qh + dh, qw + dw), loading each one's grad_y (and
    chosen tap) once, and hands it to every phase and tap it reaches: the k3 s2 stem reads 4
    outputs per 4 cells instead of 9 (output, tap) pairs.
    Returns the accumulators of phases (0, 0), (0, 1), (1, 0), (1, 1).
    """
    acc00 = tl.zeros([BLOCK_0, BLOCK_1, BLOCK_2], tl.float32)
    acc01 = tl.zeros([BLOCK_0, BLOCK_1, BLOCK_2], tl.float32)
    acc10 = tl.zeros([BLOCK_0, BLOCK_1, BLOCK_2], tl.float32)
    acc11 = tl.zeros([BLOCK_0, BLOCK_1, BLOCK_2], tl.float32)
    # Tap a reaches cell phase ph from output qh + (ph + PT - a*DH) / SH (when it divides).
    for dh in tl.static_range((PT - (KH - 1) * DH) // SH, (SH - 1 + PT) // SH + 1):
        oh = qh + dh
        rmask = cmask & (oh < OH)
        if dh < 0:
            rmask = rmask & (oh >= 0)
        if not IS_MAX and DIV_MODE != 0:
            # Clamped: rows outside the output count 0 cells, and 0 * inf is NaN.
            inv_h = 1.0 / tl.maximum(_axis_count(oh * SH - PT, H, PB, KH, DH, DIV_MODE), 1).to(
                tl.float32
            )
        for dw in tl.static_range((PL - (KW - 1) * DW) // SW, (SW - 1 + PL) // SW + 1):
            ow = qw + dw
            mask = rmask & (ow < OW)
            if dw < 0:
                mask = mask & (ow >= 0)
            g = tl.load(gp + oh * sgh + ow * sgw, mask=mask, other=0.0).to(tl.float32)
            if IS_MAX:
                code = tl.load(op + oh * soh + ow * sow, mask=mask, other=0).to(tl.int32)
            elif DIV_MODE != 0:
                count_w = _axis_count(ow * SW - PL, W, PR, KW, DW, DIV_MODE)
                g = g * (inv_h / tl.maximum(count_w, 1).to(tl.float32))
            for ph in tl.static_range(SH):
                for a in tl.static_range(KH):
                    if (ph + PT - a * DH) % SH == 0 and (ph + PT - a * DH) // SH == dh:
                        for pw in tl.static_range(SW):
                            for b in tl.static_range(KW):
                                if (pw + PL - b * DW) % SW == 0 and (pw + PL - b * DW) // SW == dw:
                                    part = g
                                    if IS_MAX:  # the one tap this window chose
                                        part = tl.where(code == a * KW + b, g, 0.0)
                                    if ph == 0 and pw == 0:
                                        acc00 += part
                                    elif ph == 0:
                                        acc01 += part
                                    elif pw == 0:
                                        acc10 += part
                                    else:
                                        acc11 += part
    return acc00, acc01, acc10, acc11


@triton.jit
def _store_phase(
    gx_ptr,
    xbase,
    acc,
    qh,
    qw,
    cmask,
    H,
    W,
    sxh,
    sxw,
    inv_divisor,
    PH: tl.constexpr,
    PW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    SCALE: tl.constexpr,
):
    """Store the gradients of cells' phase (PH, PW): every SH-th row, every SW-th column."""
    h = qh * SH + PH
    w = qw * SW + PW
    if SCALE:
        acc = acc * inv_divisor
    mask = cmask & (h < H) & (w < W)
    tl.store(gx_ptr + (xbase + (h * sxh + w * sxw)), acc.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_row(
    gx_ptr,
    xbase,
    acc_even,
    acc_odd,
    qh,
    qw,
    cmask,
    rmask,
    H,
    W,
    sxh,
    sxw,
    inv_divisor,
    PH: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    SCALE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_0: tl.constexpr,
    BLOCK_1: tl.constexpr,
    BLOCK_2: tl.constexpr,
):
    """Store the cells' row phase PH: column phase 0 (`acc_even`) and, for SW == 2, 1.

    Planar with SW == 2: the two column phases are interleaved in registers (join + reshape),
    so each store instruction writes whole sectors. Stored apart, each would write every other
    element, and the sectors' halves would reach L2 from different instructions (measured on an
    H100: the strided version of the k2 s2 avg backward ran at 0.09-0.22 of the floor).
    channels_last needs no interleave: each phase's stores are runs of C.
    """
    if SW == 2 and not CHANNELS_LAST:
        h = qh * SH + PH
        # One arange, not a join of even and odd columns: the compiler then sees the columns
        # contiguous and lays the store's lanes (and vectors) along them.
        w = 2 * (tl.program_id(0) * BLOCK_2) + tl.arange(0, 2 * BLOCK_2)[None, None, :]
        acc = tl.reshape(tl.join(acc_even, acc_odd), [BLOCK_0, BLOCK_1, 2 * BLOCK_2])
        if SCALE:
            acc = acc * inv_divisor
        mask = rmask & (h < H) & (w < W)
        gxoff = xbase + (h * sxh + w * sxw)
        tl.store(gx_ptr + gxoff, acc.to(gx_ptr.dtype.element_ty), mask=mask)
    else:
        _store_phase(
            gx_ptr, xbase, acc_even, qh, qw, cmask, H, W, sxh, sxw, inv_divisor,
            PH, 0, SH, SW, SCALE,
        )  # fmt: skip
        if SW == 2:
            _store_phase(
                gx_ptr, xbase, acc_odd, qh, qw, cmask, H, W, sxh, sxw, inv_divisor,
                PH, 1, SH, SW, SCALE,
            )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Forward kernels.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile(
    Z0,
    P,
    C,
    OH,
    OW,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_0: tl.constexpr,
    BLOCK_1: tl.constexpr,
    BLOCK_2: tl.constexpr,
):
    """(n, c, row, column, mask) index tensors of this program's tile; n and c are int64.

    The grid is 3-d, tiles of a plane (or of an image's channels) fastest, so that programs
    that share halo rows run together and re-read them from L2, and so that no per-program
    integer division is needed (one for channels_last). Z0 offsets axis 2 when the launcher
    splits a grid taller than CUDA's 65535.
    planar: [BLOCK_0 planes, BLOCK_1 rows, BLOCK_2 columns], grid (col tiles, row tiles,
    plane tiles); channels_last: [BLOCK_0 rows, BLOCK_1 columns, BLOCK_2 channels], grid
    (channel tiles, col tiles, row tiles * N). The last result is the mask without its
    column term.
    """
    if CHANNELS_LAST:
        z = tl.program_id(2) + Z0
        tiles_h = tl.cdiv(OH, BLOCK_0)
        n = (z // tiles_h).to(tl.int64)
        rows = (z % tiles_h) * BLOCK_0 + tl.arange(0, BLOCK_0)[:, None, None]  # (B0, 1, 1)
        cols = tl.program_id(1) * BLOCK_1 + tl.arange(0, BLOCK_1)[None, :, None]  # (1, B1, 1)
        ch = tl.program_id(0) * BLOCK_2 + tl.arange(0, BLOCK_2)[None, None, :]  # (1, 1, B2)
        lane_mask = (rows < OH) & (ch < C)  # (B0, 1, B2)
        c = ch.to(tl.int64)
    else:
        pl = (tl.program_id(2) + Z0) * BLOCK_0 + tl.arange(0, BLOCK_0)[:, None, None]
        rows = tl.program_id(1) * BLOCK_1 + tl.arange(0, BLOCK_1)[None, :, None]
        cols = tl.program_id(0) * BLOCK_2 + tl.arange(0, BLOCK_2)[None, None, :]
        n = (pl // C).to(tl.int64)
        c = (pl % C).to(tl.int64)
        lane_mask = (pl < P) & (rows < OH)  # (B0, B1, 1)
    return n, c, rows, cols, lane_mask & (cols < OW), lane_mask


@triton.jit
def _max_pool2d_fwd_kernel(
    Z0,  # first grid index of axis 2 (see _launch)
    x_ptr,
    y_ptr,
    off_ptr,
    ind_ptr,
    P,
    C,
    H,
    W,
    OH,
    OW,
    sxn,
    sxc,
    sxh,
    sxw,
    syn,
    syc,
    syh,
    syw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    PT: tl.constexpr,
    PL: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    PAIRS: tl.constexpr,  # see _tap_pair
    EVEN: tl.constexpr,  # x's plane and row strides are even: pairs are aligned
    BLOCK_0: tl.constexpr,  # planes (planar) or output rows (channels_last)
    BLOCK_1: tl.constexpr,  # output rows (planar) or columns (channels_last)
    BLOCK_2: tl.constexpr,  # output columns (planar) or channels (channels_last)
    NEED_OFFSETS: tl.constexpr,
    RETURN_INDICES: tl.constexpr,
):
    n, c, oh, ow, omask, lmask = _tile(Z0, P, C, OH, OW, CHANNELS_LAST, BLOCK_0, BLOCK_1, BLOCK_2)
    col0 = tl.program_id(0) * BLOCK_2  # planar tiles' first output column
    if EVEN:
        # Tell the compiler what the launcher checked (pairs start at even addresses, and W
        # is even so that no pair straddles the row's end), so that pair loads are vector loads.
        sxn, sxc, sxh, W = (sxn // 2) * 2, (sxc // 2) * 2, (sxh // 2) * 2, (W // 2) * 2
    xp = x_ptr + (n * sxn + c * sxc)
    m, idx = _max_window(
        xp, oh, ow, omask, lmask, col0, H, W, sxh, sxw, KH, KW, SH, SW, DH, DW, PT, PL,
        NEED_OFFSETS or RETURN_INDICES, PAIRS, BLOCK_0, BLOCK_1, BLOCK_2,
    )  # fmt: skip
    yoff = (n * syn + c * syc) + (oh * syh + ow * syw)  # offsets/indices share y's strides
    tl.store(y_ptr + yoff, m.to(y_ptr.dtype.element_ty), mask=omask)
    if NEED_OFFSETS:
        tl.store(off_ptr + yoff, idx.to(off_ptr.dtype.element_ty), mask=omask)
    if RETURN_INDICES:
        a = idx // KW
        ih = oh * SH - PT + a * DH
        iw = ow * SW - PL + (idx - a * KW) * DW
        tl.store(ind_ptr + yoff, ih.to(tl.int64) * W + iw, mask=omask)


@triton.jit
def _avg_pool2d_fwd_kernel(
    Z0,  # first grid index of axis 2 (see _launch)
    x_ptr,
    y_ptr,
    P,
    C,
    H,
    W,
    OH,
    OW,
    PB,
    PR,
    divisor,
    sxn,
    sxc,
    sxh,
    sxw,
    syn,
    syc,
    syh,
    syw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    PT: tl.constexpr,
    PL: tl.constexpr,
    DIV_MODE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    PAIRS: tl.constexpr,  # see _tap_pair
    EVEN: tl.constexpr,  # x's plane and row strides are even: pairs are aligned
    BLOCK_0: tl.constexpr,
    BLOCK_1: tl.constexpr,
    BLOCK_2: tl.constexpr,
):
    n, c, oh, ow, omask, lmask = _tile(Z0, P, C, OH, OW, CHANNELS_LAST, BLOCK_0, BLOCK_1, BLOCK_2)
    col0 = tl.program_id(0) * BLOCK_2  # planar tiles' first output column
    if EVEN:
        sxn, sxc, sxh, W = (sxn // 2) * 2, (sxc // 2) * 2, (sxh // 2) * 2, (W // 2) * 2
    xp = x_ptr + (n * sxn + c * sxc)
    out = _avg_window(
        xp, oh, ow, omask, lmask, col0, H, W, PB, PR, divisor, sxh, sxw,
        KH, KW, SH, SW, DH, DW, PT, PL, DIV_MODE, PAIRS, BLOCK_0, BLOCK_1, BLOCK_2,
    )  # fmt: skip
    yoff = (n * syn + c * syc) + (oh * syh + ow * syw)
    tl.store(y_ptr + yoff, out.to(y_ptr.dtype.element_ty), mask=omask)


# ---------------------------------------------------------------------------------------------
# Backward kernels (gathers over cell-space tiles).
# ---------------------------------------------------------------------------------------------


@triton.jit
def _pool2d_bwd_kernel(
    Z0,  # first grid index of axis 2 (see _launch)
    gy_ptr,
    off_ptr,
    gx_ptr,
    P,
    C,
    H,
    W,
    OH,
    OW,
    QH,  # cdiv(H, SH): cell rows
    QW,  # cdiv(W, SW): cell columns
    PB,
    PR,
    inv_divisor,
    sgn,
    sgc,
    sgh,
    sgw,
    son,
    soc,
    soh,
    sow,
    sxn,
    sxc,
    sxh,
    sxw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    PT: tl.constexpr,
    PL: tl.constexpr,
    IS_MAX: tl.constexpr,
    DIV_MODE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_0: tl.constexpr,
    BLOCK_1: tl.constexpr,
    BLOCK_2: tl.constexpr,
):
    n, c, qh, qw, cmask, rmask = _tile(Z0, P, C, QH, QW, CHANNELS_LAST, BLOCK_0, BLOCK_1, BLOCK_2)
    gp = gy_ptr + (n * sgn + c * sgc)
    op = off_ptr + (n * son + c * soc)
    xbase = n * sxn + c * sxc
    scale: tl.constexpr = DIV_MODE == 0 and not IS_MAX  # a uniform divisor, applied at the end
    # Neighbour loop (each grad_y read once per cell) where cells have 2-4 phases and the
    # window is small; stride 1 has one phase, where it is the same as the tap loop, and a big
    # window would make the compile-time loops quadratic in its taps.
    neighbours: tl.constexpr = SH <= 2 and SW <= 2 and SH * SW > 1 and KH * KW <= 36
    if neighbours:
        acc00, acc01, acc10, acc11 = _bwd_small_stride(
            gp, op, qh, qw, cmask, OH, OW, H, W, PB, PR, sgh, sgw, soh, sow,
            KH, KW, SH, SW, DH, DW, PT, PL, IS_MAX, DIV_MODE, BLOCK_0, BLOCK_1, BLOCK_2,
        )  # fmt: skip
        _store_row(
            gx_ptr, xbase, acc00, acc01, qh, qw, cmask, rmask, H, W, sxh, sxw, inv_divisor,
            0, SH, SW, scale, CHANNELS_LAST, BLOCK_0, BLOCK_1, BLOCK_2,
        )  # fmt: skip
        if SH == 2:
            _store_row(
                gx_ptr, xbase, acc10, acc11, qh, qw, cmask, rmask, H, W, sxh, sxw, inv_divisor,
                1, SH, SW, scale, CHANNELS_LAST, BLOCK_0, BLOCK_1, BLOCK_2,
            )  # fmt: skip
    else:
        for ph in tl.static_range(SH):
            if SW <= 2:
                acc0 = _bwd_phase(
                    tl.zeros([BLOCK_0, BLOCK_1, BLOCK_2], tl.float32), gp, op, qh, qw, cmask,
                    OH, OW, H, W, PB, PR, sgh, sgw, soh, sow, ph, 0,
                    KH, KW, SH, SW, DH, DW, PT, PL, IS_MAX, DIV_MODE,
                )  # fmt: skip
                acc1 = acc0
                if SW == 2:
                    acc1 = _bwd_phase(
                        tl.zeros([BLOCK_0, BLOCK_1, BLOCK_2], tl.float32), gp, op, qh, qw, cmask,
                        OH, OW, H, W, PB, PR, sgh, sgw, soh, sow, ph, 1,
                        KH, KW, SH, SW, DH, DW, PT, PL, IS_MAX, DIV_MODE,
                    )  # fmt: skip
                _store_row(
                    gx_ptr, xbase, acc0, acc1, qh, qw, cmask, rmask, H, W, sxh, sxw,
                    inv_divisor, ph, SH, SW, scale, CHANNELS_LAST, BLOCK_0, BLOCK_1, BLOCK_2,
                )  # fmt: skip
            else:
                for pw in tl.static_range(SW):
                    acc = _bwd_phase(
                        tl.zeros([BLOCK_0, BLOCK_1, BLOCK_2], tl.float32), gp, op, qh, qw, cmask,
                        OH, OW, H, W, PB, PR, sgh, sgw, soh, sow, ph, pw,
                        KH, KW, SH, SW, DH, DW, PT, PL, IS_MAX, DIV_MODE,
                    )  # fmt: skip
                    _store_phase(
                        gx_ptr, xbase, acc, qh, qw, cmask, H, W, sxh, sxw, inv_divisor,
                        ph, pw, SH, SW, scale,
                    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Launch configuration: simple shape heuristics, cached per shape (no autotuning).
# ---------------------------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _fit(n: int, cap: int) -> int:
    """Power-of-two block <= cap for an axis of n: the largest, or half that if it wastes less.

    A 56-row plane takes blocks of 8 (7 full blocks), not 16 (4 blocks, 8 idle rows).
    """
    b = max(1, min(1 << (max(cap, 1).bit_length() - 1), _pow2(n)))
    if b > 1 and -(-n // (b // 2)) * (b // 2) < -(-n // b) * b:
        b //= 2
    return b


@functools.lru_cache(maxsize=1024)
def _blocks(
    channels_last: bool, p: int, c: int, rows: int, cols: int, target: int
) -> tuple[int, int, int, tuple[int, int, int]]:
    """(BLOCK_0, BLOCK_1, BLOCK_2, grid) for `target` tile elements over (planes, rows, cols).

    Tile shapes come from simple rules, no autotuning: the unit-stride axis on the lanes, then
    the next axes until the tile holds `target` elements, wasting few lanes (`_fit`).
    """
    if channels_last:
        # Channels on the lanes (at most 128 so that several output columns share a program and
        # a narrow C still fills it); then columns, then rows.
        b2 = _fit(c, 128)
        b1 = _fit(cols, max(target // b2, 1))
        b0 = _fit(rows, max(target // (b2 * b1), 1))
        n = p // c if c else 0
        grid = (-(-c // b2), -(-cols // b1), n * -(-rows // b0))
    else:
        # Columns on the lanes (at most 64: a 112-wide plane is two tiles, still full rows of
        # sectors), then rows, then extra planes for small outputs (ResNet's 7x7).
        b2 = _fit(cols, 64)
        b1 = _fit(rows, max(target // b2, 1))
        b0 = _fit(p, max(target // (b2 * b1), 1))
        grid = (-(-cols // b2), -(-rows // b1), -(-p // b0))
    return b0, b1, b2, grid


def _launch(kernel, grid: tuple[int, int, int], *args, **kwargs) -> None:
    """Launch over `grid`, in slices along axis 2 when it exceeds CUDA's limit of 65535."""
    g0, g1, g2 = grid
    if g0 * g1 * g2 == 0:
        return
    for z0 in range(0, g2, _MAX_GRID_Z):
        kernel[(g0, g1, min(_MAX_GRID_Z, g2 - z0))](z0, *args, **kwargs)


def _empty_strided(shape: tuple, strides: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """Offsets and indices, laid out as y (the tests poison every allocation made here)."""
    return torch.empty_strided(shape, strides, dtype=dtype, device=device)


def _check_dtype(x: torch.Tensor, op: str) -> None:
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{op}: the Triton kernels take float16, bfloat16 or float32, got {x.dtype} "
            "(float64 goes to PyTorch)"
        )


@functools.lru_cache(maxsize=256)
def _div_args(win: Window2d, count_include_pad: bool, divisor_override: int | None) -> tuple:
    """(DIV_MODE, divisor) of an average: one constant, or computed per window in the kernel.

    PyTorch's default (count_include_pad, no ceil_mode overhang) divides every window by
    KH*KW: that is passed as a constant, so the kernels skip the per-window count.
    """
    if divisor_override is not None:
        return _DIV_OVERRIDE, float(divisor_override)
    mode = _DIV_PADDED if count_include_pad and not win.same else _DIV_REAL
    rows, cols = set(win.divisors(count_include_pad, 0)), set(win.divisors(count_include_pad, 1))
    if len(rows) == 1 and len(cols) == 1:
        return _DIV_OVERRIDE, float(rows.pop() * cols.pop())
    return mode, 1.0


def _geometry(win: Window2d) -> dict:
    return {
        "KH": win.kernel[0],
        "KW": win.kernel[1],
        "SH": win.stride[0],
        "SW": win.stride[1],
        "DH": win.dilation[0],
        "DW": win.dilation[1],
        "PT": win.pad_before[0],
        "PL": win.pad_before[1],
    }


@functools.lru_cache(maxsize=1024)
def _fwd_plan(shape: tuple, strides: tuple, win: Window2d, tile: int, warps: int, pairs: bool):
    """Everything about a forward launch but its tensors, cached: launches of small tensors
    are bound by this Python (channels_last, grid, constexpr keyword arguments)."""
    n, c, _, w = shape
    cl = (
        strides[1] == 1 and strides[3] != 1 and c > 1
    )  # C the unit stride: the layout vectorised over C
    oh, ow = win.out_size
    b0, b1, b2, grid = _blocks(cl, n * c, c, oh, ow, tile)
    # Pair loads (see _tap_pair) for planar stride-2 windows over unit-stride rows; EVEN says
    # the pairs are aligned.
    pairs = pairs and not cl and win.stride[1] == 2 and win.dilation[1] == 1 and strides[3] == 1
    even = strides[0] % 2 == 0 and strides[1] % 2 == 0 and strides[2] % 2 == 0 and w % 2 == 0
    consts = dict(
        _geometry(win), CHANNELS_LAST=cl, BLOCK_0=b0, BLOCK_1=b1, BLOCK_2=b2,
        PAIRS=pairs, EVEN=pairs and even, num_warps=warps,
    )  # fmt: skip
    return grid, consts


@functools.lru_cache(maxsize=1024)
def _bwd_plan(shape: tuple, strides: tuple, win: Window2d, tile: int, warps: int):
    """(grid, cell rows, cell columns, constexpr keyword arguments) of a backward launch."""
    n, c, h, w = shape
    cl = strides[1] == 1 and strides[3] != 1 and c > 1
    sh, sw = win.stride
    qh, qw = -(-h // sh), -(-w // sw)
    b0, b1, b2, grid = _blocks(cl, n * c, c, qh, qw, max(tile // (sh * sw), 16))
    consts = dict(
        _geometry(win), CHANNELS_LAST=cl, BLOCK_0=b0, BLOCK_1=b1, BLOCK_2=b2, num_warps=warps
    )
    return grid, qh, qw, consts


def _check_out(out: torch.Tensor, shape: tuple, x: torch.Tensor, op: str) -> None:
    if tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"{op}: out must be a {x.dtype} tensor of shape {shape} on {x.device}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}"
        )


# ---------------------------------------------------------------------------------------------
# Launchers.
# ---------------------------------------------------------------------------------------------


def max_pool2d_forward(
    x: torch.Tensor,
    win: Window2d,
    *,
    need_offsets: bool,
    return_indices: bool,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Max pool of NCHW-logical `x` over the windows of `win`.

    Args:
        x: (N, C, H, W) float16/bfloat16/float32, NCHW-contiguous, channels_last or any strides.
        win: the resolved windows (`gapnet._shapes.window2d`).
        need_offsets: also return, per output, the chosen tap `a*KW + b` (uint8 up to 256
            taps) for `max_pool2d_backward`.
        return_indices: also return PyTorch's int64 flat indices `h*W + w`.
        out: optional output to write into.

    Shape:
        x (N, C, H, W) -> y, offsets, indices (N, C, OH, OW), in x's memory format.
    """
    _check_dtype(x, "max_pool2d")
    n, c, h, w = x.shape
    oh, ow = win.out_size
    shape = (n, c, oh, ow)
    if out is None:
        y = empty_like_format(x, shape, x.dtype)
    else:
        _check_out(out, shape, x, "max_pool2d")
        y = out
    ys = y.stride()
    offsets = indices = None
    if need_offsets:
        offsets = _empty_strided(shape, ys, offsets_dtype(win), x.device)
    if return_indices:
        indices = _empty_strided(shape, ys, torch.int64, x.device)
    xs = x.stride()
    grid, consts = _fwd_plan(x.shape, xs, win, _FWD_TILE, _NUM_WARPS, _PAIRS)
    _launch(
        _max_pool2d_fwd_kernel, grid, x, y,
        y if offsets is None else offsets, y if indices is None else indices,
        n * c, c, h, w, oh, ow, *xs, *ys, **consts,
        NEED_OFFSETS=need_offsets, RETURN_INDICES=return_indices,
    )  # fmt: skip
    return y, offsets, indices


def max_pool2d_backward(
    grad_y: torch.Tensor, offsets: torch.Tensor, x_like: torch.Tensor, win: Window2d
) -> torch.Tensor:
    """Gradient of `max_pool2d_forward` with respect to x, from the saved chosen taps.

    Args:
        grad_y: (N, C, OH, OW) gradient of the output, any strides (an expanded one too).
        offsets: the forward's `offsets`.
        x_like: the forward's input, for shape, dtype and memory format (not read).
        win: the windows of the forward.

    Shape:
        grad_y (N, C, OH, OW) -> grad_x (N, C, H, W), in x_like's dtype and memory format.
    """
    return _pool2d_backward(grad_y, offsets, x_like, win, True, _DIV_OVERRIDE, 1.0)


def avg_pool2d_forward(
    x: torch.Tensor,
    win: Window2d,
    count_include_pad: bool,
    divisor_override: int | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Average pool of NCHW-logical `x` over the windows of `win`, summed in float32.

    Args:
        x: (N, C, H, W) float16/bfloat16/float32, NCHW-contiguous, channels_last or any strides.
        win: the resolved windows (`gapnet._shapes.window2d`).
        count_include_pad: divide by the window clipped to the padded input (PyTorch's
            default) rather than by its real cells; "same" never counts padding.
        divisor_override: divide every window by this instead.
        out: optional output to write into.

    Shape:
        x (N, C, H, W) -> y (N, C, OH, OW), in x's memory format.
    """
    _check_dtype(x, "avg_pool2d")
    n, c, h, w = x.shape
    oh, ow = win.out_size
    shape = (n, c, oh, ow)
    if out is None:
        y = empty_like_format(x, shape, x.dtype)
    else:
        _check_out(out, shape, x, "avg_pool2d")
        y = out
    xs = x.stride()
    grid, consts = _fwd_plan(x.shape, xs, win, _FWD_TILE, _NUM_WARPS, _PAIRS)
    mode, divisor = _div_args(win, count_include_pad, divisor_override)
    _launch(
        _avg_pool2d_fwd_kernel, grid, x, y, n * c, c, h, w, oh, ow,
        win.pad_after[0], win.pad_after[1], divisor, *xs, *y.stride(), **consts, DIV_MODE=mode,
    )  # fmt: skip
    return y


def avg_pool2d_backward(
    grad_y: torch.Tensor,
    x_like: torch.Tensor,
    win: Window2d,
    count_include_pad: bool,
    divisor_override: int | None,
) -> torch.Tensor:
    """Gradient of `avg_pool2d_forward` with respect to x.

    Args:
        grad_y: (N, C, OH, OW) gradient of the output, any strides (an expanded one too).
        x_like: the forward's input, for shape, dtype and memory format (not read).
        win, count_include_pad, divisor_override: as in the forward.

    Shape:
        grad_y (N, C, OH, OW) -> grad_x (N, C, H, W), in x_like's dtype and memory format.
    """
    mode, divisor = _div_args(win, count_include_pad, divisor_override)
    return _pool2d_backward(grad_y, grad_y, x_like, win, False, mode, 1.0 / divisor)


def _pool2d_backward(
    grad_y: torch.Tensor,
    offsets: torch.Tensor,
    x_like: torch.Tensor,
    win: Window2d,
    is_max: bool,
    mode: int,
    inv_divisor: float,
) -> torch.Tensor:
    _check_dtype(x_like, "max_pool2d" if is_max else "avg_pool2d")
    n, c, h, w = shape = x_like.shape
    oh, ow = win.out_size
    grad_x = empty_like_format(x_like, shape, x_like.dtype)
    grid, qh, qw, consts = _bwd_plan(shape, x_like.stride(), win, _BWD_TILE, _NUM_WARPS)
    _launch(
        _pool2d_bwd_kernel, grid, grad_y, offsets, grad_x, n * c, c, h, w, oh, ow, qh, qw,
        win.pad_after[0], win.pad_after[1], inv_divisor,
        *grad_y.stride(), *offsets.stride(), *grad_x.stride(), **consts,
        IS_MAX=is_max, DIV_MODE=mode,
    )  # fmt: skip
    return grad_x
