"""Global pooling (avg, max, avgmax, catavgmax, GeM) and the fused GAP + linear head, in Triton.

The kernels take float16, bfloat16 and float32 inputs and accumulate in float32; float64 is left
to PyTorch by the dispatcher (`gapnet._ops`). Launchers take a logically NCHW tensor with any
strides; NCHW-contiguous and channels_last run natively (no copies).

How the work is laid out. Both layouts are seen as a 3-d tensor (N, C, HW) with strides
(s_n, s_c, s_hw), which is free whenever each (h, w) plane is flat (s_h == W * s_w): true of
NCHW-contiguous (s_hw = 1) and channels_last (s_c = 1). A program owns one sample n and a block
of BLOCK_C channels and loops over the plane in chunks of BLOCK_HW, loading [BLOCK_C, BLOCK_HW]
tiles. Triton specialises a stride equal to 1 into a constant, so the same kernel source gets
loads that are contiguous along HW for NCHW (each row of the tile is a run of one plane, and a
short plane such as 7x7 puts BLOCK_C consecutive planes, one long contiguous span, in a tile) and
along C for channels_last (each tile row is BLOCK_C adjacent channels of one pixel: 16-byte
vector loads, coalesced across the warp). Accumulators are tiles too, updated elementwise per
chunk and reduced across lanes once at the end, so the loop body holds no cross-warp reduction.

Each (n, c) result is owned by exactly one program, so results are bitwise deterministic with no
atomics, and every element of a gradient is written exactly once by a streaming store.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from gapnet._shapes import GLOBAL_KINDS as KINDS
from gapnet.kernels import KERNEL_DTYPES, maps_channels_last

_MAX_KINDS = ("max", "avgmax", "catavgmax")

# Launch shape heuristics (see `_config`). An H100 has 132 SMs; several programs per SM keep
# enough loads in flight to cover DRAM latency and make the last-wave imbalance small.
_NUM_SMS = 132
_MIN_PROGRAMS = 4 * _NUM_SMS
if os.environ.get("TRITON_INTERPRET") == "1":
    _MIN_PROGRAMS = 1  # the interpreter runs programs one by one: fewer, larger ones are faster


def _tile(kind: str, elem_bytes: int, backward: bool = False) -> int:
    """Elements a 4-warp program loads per loop step: as many as registers allow.

    Loads in flight per SM are what a streaming reduction runs on: avg keeps 64 bytes a thread
    (16 fp32, 32 16-bit elements) and one accumulator; gem (exp/log temporaries) 16 elements;
    the max kinds carry value, index and sum tiles, so 8 elements (about 30-65 registers). The
    gem backward (x read, exp/log, a dL/dp accumulator) takes 8 too.
    """
    if kind == "avg":
        return 8192 // elem_bytes
    return 2048 if kind == "gem" and not backward else 1024


# Packed NCHW planes up to this size are compiled for their exact size (see PLANE); CNN feature
# maps come in few sizes (7x7, 14x14, 28x28, 56x56), so that is a handful of compilations.
_MAX_PLANE = 4096

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_FAST_LAUNCH = not _INTERPRET and tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 3)
_COMPILED: dict[tuple, Any] = {}  # see _launch


@triton.jit
def _global_pool_fwd_kernel(
    x_ptr,  # (N, C, HW) seen through strides
    p_ptr,  # (1,) float32 GeM exponent (any pointer for other kinds)
    y_ptr,  # (N, C), or (N, 2C) for catavgmax
    saved_ptr,  # (N, C) contiguous: int32 argmax for max kinds, float32 mean for avg / gem
    C,
    HW,
    num_cblocks,
    sxn,
    sxc,
    sxhw,
    syn,
    syc,
    eps,
    inv_hw,
    KIND: tl.constexpr,  # "avg" | "max" | "avgmax" | "catavgmax" | "gem"
    TAKE_SUM: tl.constexpr,
    TAKE_MAX: tl.constexpr,
    SAVE: tl.constexpr,
    PLANE: tl.constexpr,  # H*W of packed NCHW planes (s_c = H*W, s_hw = 1), else 0
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    if PLANE > 0:
        # Compile-time plane size: every row of a tile sits at a constant offset from one base
        # address (immediate offsets instead of a 64-bit pointer per element: far fewer
        # registers, more programs per SM), and the loop bounds and alignment are known.
        HW = PLANE
        sxc = PLANE
        sxhw = 1
    pid = tl.program_id(0)
    n = pid // num_cblocks
    c = (pid - n * num_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BC,)
    cmask = c < C
    j = tl.arange(0, BLOCK_HW)  # (BHW,)
    x_rows = x_ptr + n.to(tl.int64) * sxn + c[:, None] * sxc  # (BC, 1)
    if KIND == "gem":
        p = tl.load(p_ptr).to(tl.float32)
    if TAKE_SUM:
        s_acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    if TAKE_MAX:
        m_acc = tl.full([BLOCK_C, BLOCK_HW], float("-inf"), dtype=tl.float32)
        # A lane that never updates (all -inf) still names its own first element.
        i_acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.int32) + j[None, :]
    for start in range(0, HW, BLOCK_HW):
        hw = start + j
        mask = cmask[:, None] & (hw < HW)[None, :]
        v = tl.load(x_rows + hw[None, :] * sxhw, mask=mask, other=0.0).to(tl.float32)
        if TAKE_SUM:
            if KIND == "gem":
                # clamp(x, eps)^p as exp(p*log(.)); where() keeps a NaN a NaN, as torch.clamp
                xc = tl.where(v < eps, eps, v)
                s_acc += tl.where(mask, tl.exp(p * tl.log(xc)), 0.0)
            else:
                s_acc += v
        if TAKE_MAX:
            # PyTorch's scan, per lane: `v > m or isnan(v)` keeps the first max, the last NaN
            upd = mask & ((v > m_acc) | (v != v))
            m_acc = tl.where(upd, v, m_acc)
            if SAVE:
                i_acc = tl.where(upd, hw[None, :], i_acc)

    y_ptrs = y_ptr + n.to(tl.int64) * syn + c * syc  # (BC,)
    saved_ptrs = saved_ptr + n.to(tl.int64) * C + c  # (BC,)
    if TAKE_SUM:
        mean = tl.sum(s_acc, axis=1) * inv_hw  # (BC,)
    if TAKE_MAX:
        lane_nan = m_acc != m_acc
        has_nan = tl.max(lane_nan.to(tl.int32), axis=1) > 0
        m = tl.max(tl.where(lane_nan, float("-inf"), m_acc), axis=1)
        if SAVE:
            # Lanes hold interleaved parts of the scan: the first max overall is the smallest
            # index among lanes at the max, the last NaN the largest among NaN lanes.
            first = tl.min(tl.where(m_acc == m[:, None], i_acc, HW), axis=1)
            last_nan = tl.max(tl.where(lane_nan, i_acc, -1), axis=1)
            tl.store(saved_ptrs, tl.where(has_nan, last_nan, first), mask=cmask)
        m = tl.where(has_nan, float("nan"), m)

    if KIND == "avg":
        out = mean
        if SAVE:
            tl.store(saved_ptrs, mean, mask=cmask)
    elif KIND == "max":
        out = m
    elif KIND == "avgmax":
        out = 0.5 * (mean + m)
    elif KIND == "catavgmax":
        tl.store(y_ptrs, mean.to(y_ptr.dtype.element_ty), mask=cmask)
        y_ptrs += C * syc
        out = m
    else:  # gem
        out = tl.exp(tl.log(tl.where(cmask, mean, 1.0)) / p)
        if SAVE:
            tl.store(saved_ptrs, mean, mask=cmask)
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _global_pool_bwd_kernel(
    gy_ptr,  # (N, C), or (N, 2C) for catavgmax
    x_ptr,  # (N, C, HW) seen through strides; read only for gem
    p_ptr,  # (1,) float32, gem only
    saved_ptr,  # (N, C) contiguous: int32 argmax or float32 mean(clamp(x, eps)^p)
    gx_ptr,  # (N, C, HW) seen through strides
    gp_ptr,  # (N, C) float32 per-channel terms of dL/dp (gem with NEED_GP)
    C,
    HW,
    num_cblocks,
    sgn,
    sgc,
    sxn,
    sxc,
    sxhw,
    sgxn,
    sgxc,
    sgxhw,
    eps,
    inv_hw,
    KIND: tl.constexpr,
    NEED_GP: tl.constexpr,
    PLANE: tl.constexpr,  # H*W when both x and grad_x are packed NCHW planes, else 0
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    if PLANE > 0:  # as in the forward: constant row offsets
        HW = PLANE
        sxc = PLANE
        sxhw = 1
        sgxc = PLANE
        sgxhw = 1
    pid = tl.program_id(0)
    n = pid // num_cblocks
    c = (pid - n * num_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BC,)
    cmask = c < C
    j = tl.arange(0, BLOCK_HW)
    n64 = n.to(tl.int64)
    gx_rows = gx_ptr + n64 * sgxn + c[:, None] * sgxc  # (BC, 1)
    g = tl.load(gy_ptr + n64 * sgn + c * sgc, mask=cmask, other=0.0).to(tl.float32)  # (BC,)

    # Gradient tiles are a per-channel constant plus, for max kinds, one element per channel.
    if KIND == "avg":
        g_avg = g * inv_hw
    elif KIND == "max":
        g_avg = tl.zeros([BLOCK_C], dtype=tl.float32)
        g_max = g
    elif KIND == "avgmax":
        g_avg = 0.5 * inv_hw * g
        g_max = 0.5 * g
    elif KIND == "catavgmax":
        g_avg = g * inv_hw
        g_max = tl.load(gy_ptr + n64 * sgn + (C + c) * sgc, mask=cmask, other=0.0).to(tl.float32)
    if KIND != "gem":
        base = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32) + g_avg[:, None]
        if KIND != "avg":
            idx = tl.load(saved_ptr + n64 * C + c, mask=cmask, other=-1)
        for start in range(0, HW, BLOCK_HW):
            hw = start + j
            mask = cmask[:, None] & (hw < HW)[None, :]
            val = base
            if KIND != "avg":
                val = tl.where(hw[None, :] == idx[:, None], base + g_max[:, None], base)
            tl.store(gx_rows + hw[None, :] * sgxhw, val.to(gx_ptr.dtype.element_ty), mask=mask)
    else:
        # y = M^(1/p) with M = mean(xc^p), xc = clamp(x, eps):
        # dy/dx = y / (HW * M) * xc^(p-1) where x >= eps (clamp passes no gradient below eps),
        # dy/dp = y * (mean(xc^p * ln xc) / (p * M) - ln(M) / p^2).
        # M is float32 from the forward, so y is recomputed here, not taken rounded from y.
        p = tl.load(p_ptr).to(tl.float32)
        mean = tl.load(saved_ptr + n64 * C + c, mask=cmask, other=1.0)
        y = tl.exp(tl.log(mean) / p)
        coef = g * y * inv_hw / mean  # (BC,)
        x_rows = x_ptr + n64 * sxn + c[:, None] * sxc
        if NEED_GP:
            t_acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
        for start in range(0, HW, BLOCK_HW):
            hw = start + j
            mask = cmask[:, None] & (hw < HW)[None, :]
            v = tl.load(x_rows + hw[None, :] * sxhw, mask=mask, other=1.0).to(tl.float32)
            xc = tl.where(v < eps, eps, v)
            log_xc = tl.log(xc)
            xpm1 = tl.exp((p - 1.0) * log_xc)  # xc^(p-1)
            val = tl.where(v >= eps, coef[:, None] * xpm1, 0.0)
            tl.store(gx_rows + hw[None, :] * sgxhw, val.to(gx_ptr.dtype.element_ty), mask=mask)
            if NEED_GP:
                t_acc += tl.where(mask, xpm1 * xc * log_xc, 0.0)
        if NEED_GP:
            mean_log = tl.sum(t_acc, axis=1) * inv_hw  # mean(xc^p * ln xc)
            gp = g * y * (mean_log / (p * mean) - tl.log(mean) / (p * p))
            tl.store(gp_ptr + n64 * C + c, gp, mask=cmask)


@functools.lru_cache(maxsize=512)
def _config(
    n: int, c: int, hw: int, channels_last: bool, elem_bytes: int, tile: int
) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_HW, num_warps) for one shape: simple rules instead of autotuning.

    Autotuning would add compile time and benchmark launches to the first call of every shape;
    the shape of the tile follows from the layout alone:
    - NCHW (planes contiguous): a tile row is (a chunk of) one plane, so BLOCK_HW covers the plane
      up to the tile size and BLOCK_C stacks as many planes as fit: a 7x7 head reads 32 (fp32)
      or 64 (16-bit) whole consecutive planes, one contiguous span, in a single step.
    - channels_last (C contiguous): a tile row is BLOCK_C channels of one pixel, 512 bytes
      wide so that each row is several full 128-byte lines; BLOCK_HW pixels fill the tile.
    Either way, BLOCK_C shrinks (to whole planes, or to 64-byte rows) until there are about four
    programs per SM; a shape that still has few programs (few, large planes) gets 8 warps and a
    tile twice as large so that each SM keeps enough bytes in flight.
    `tile` (elements per loop step for 4 warps) comes from `_tile`.
    """
    hw_p2 = triton.next_power_of_2(hw)
    c_p2 = triton.next_power_of_2(c)
    num_warps = 4
    if channels_last:
        block_c = min(c_p2, 512 // elem_bytes)
        min_c = min(c_p2, 64 // elem_bytes)
        while block_c > min_c and n * triton.cdiv(c, block_c) < _MIN_PROGRAMS:
            block_c //= 2
        block_hw = min(hw_p2, max(1, tile // block_c))
    else:
        block_hw = min(hw_p2, tile)
        block_c = min(c_p2, max(1, tile // block_hw))
        while block_c > 1 and n * triton.cdiv(c, block_c) < _MIN_PROGRAMS:
            block_c //= 2
    if n * triton.cdiv(c, block_c) < 2 * _NUM_SMS and hw > block_hw:
        num_warps = 8
        block_hw = min(hw_p2, 2 * block_hw)
    return block_c, block_hw, num_warps


def _strides3(t: Tensor) -> tuple[int, int, int] | None:
    """Strides of a (N, C, H, W) tensor seen as (N, C, H*W), or None if a plane is not flat."""
    _, _, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if w == 1:
        return sn, sc, sh
    if h == 1 or sh == w * sw:
        return sn, sc, sw
    return None


def _check_input(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(
            f"global pooling kernels expect a 4-d (N, C, H, W) tensor, got {x.dim()}-d"
        )
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"global pooling kernels take float16, bfloat16 and float32, got {x.dtype}")


def _launch(kernel: Any, grid: int, args: tuple, constexprs: tuple, num_warps: int) -> None:
    """kernel[(grid,)](*args, *constexprs), skipping Triton's per-call argument binding on repeats.

    Triton's launcher inspects and specialises every argument on every call (tens of
    microseconds of Python on a tiny shape, several times PyTorch's own dispatch). The kernel it
    picks depends only on the constexprs, the tensors' dtypes and 16-byte alignment and the
    integer values, so a launch that repeats all of those exactly (a training loop) reuses the
    compiled kernel and calls it directly. Triton >= 3.3 passes constexprs to compiled kernels
    too; older Tritons and the interpreter always take the plain path.
    """
    global _FAST_LAUNCH
    key = None
    if _FAST_LAUNCH:
        specs = [(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, Tensor) else a for a in args]
        key = (kernel, num_warps, args[0].device.index, *constexprs, *specs)
        compiled = _COMPILED.get(key)
        if compiled is not None:
            try:
                compiled[(grid, 1, 1)](*args, *constexprs)
                return
            except TypeError:  # a Triton whose compiled kernels take other arguments
                _FAST_LAUNCH = False
                key = None
    names = kernel.arg_names[len(args) :]
    compiled = kernel[(grid,)](
        *args, **dict(zip(names, constexprs, strict=True)), num_warps=num_warps
    )
    if key is not None and compiled is not None:
        if len(_COMPILED) > 4096:  # many distinct shapes: start over rather than grow
            _COMPILED.clear()
        _COMPILED[key] = compiled


def _packed_plane(strides: tuple[int, int, int], hw: int) -> int:
    """H*W if planes are packed NCHW (s_c = H*W, s_hw = 1) and small enough to specialise on."""
    return hw if strides[2] == 1 and strides[1] == hw and 1 < hw <= _MAX_PLANE else 0


def _launch_fwd(
    x: Tensor,
    kind: str,
    p: Tensor | None,
    eps: float,
    y: Tensor,
    saved: Tensor | None,
) -> None:
    """Run the forward kernel over x (flat planes), writing y and, if given, saved."""
    n, c, h, w = x.shape
    hw = h * w
    sx = _strides3(x)
    if sx is None:  # an exotic strided view (planes not flat): the one case that copies
        x = x.contiguous()
        sx = _strides3(x)
        assert sx is not None
    eb = x.element_size()
    block_c, block_hw, num_warps = _config(n, c, hw, sx[1] == 1 and hw > 1, eb, _tile(kind, eb))
    num_cblocks = triton.cdiv(c, block_c)
    args = (
        x,
        x if p is None else p,
        y,
        y if saved is None else saved,
        c,
        hw,
        num_cblocks,
        *sx,
        y.stride(0),
        y.stride(1),
        eps,
        1.0 / hw,
    )
    take_max = kind in _MAX_KINDS
    plane = _packed_plane(sx, hw)
    meta = (kind, kind != "max", take_max, saved is not None, plane, block_c, block_hw)
    _launch(_global_pool_fwd_kernel, n * num_cblocks, args, meta, num_warps)


def global_pool_forward(
    x: Tensor,
    kind: str,
    p: Tensor | None,
    eps: float,
    need_saved: bool,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Global pooling of an (N, C, H, W) tensor (NCHW-contiguous or channels_last) over H and W.

    Args:
        x: input, float16 / bfloat16 / float32, any strides.
        kind: "avg", "max", "avgmax" (their mean), "catavgmax" (both, avg first) or "gem".
        p: (1,) float32 tensor on x's device, the GeM exponent (read by the kernel; gem only).
        eps: GeM clamp, a Python float > 0.
        need_saved: also return what `global_pool_backward` needs.
        out: optional (N, C) / (N, 2C) result tensor of x's dtype to write into.

    Returns:
        (y, saved): y (N, C), or (N, 2C) for catavgmax, in x's dtype. saved is None unless
        need_saved: for max / avgmax / catavgmax an int32 (N, C) flat index h*W + w of each
        plane's max (first max; the last NaN if any), for gem a float32 (N, C) mean of
        clamp(x, eps)^p, for avg None.
    """
    _check_input(x)
    n, c = x.shape[0], x.shape[1]
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "gem" and p is None:
        raise ValueError("kind='gem' needs p, a 1-element float32 tensor")
    y = out if out is not None else x.new_empty((n, 2 * c if kind == "catavgmax" else c))
    saved = None
    if need_saved and kind != "avg":
        sdtype = torch.float32 if kind == "gem" else torch.int32
        saved = torch.empty((n, c), device=x.device, dtype=sdtype)
    if y.numel() > 0:
        _launch_fwd(x, kind, p, eps, y, saved)
    return y, saved


def _launch_bwd(
    grad_y: Tensor,
    x: Tensor,
    kind: str,
    p: Tensor | None,
    eps: float,
    saved: Tensor | None,
    grad_x: Tensor,
    gp: Tensor | None,
) -> None:
    n, c, h, w = x.shape
    hw = h * w
    sgx = _strides3(grad_x)
    if sgx is None:
        raise ValueError(f"grad_x must have flat (H, W) planes, got strides {grad_x.stride()}")
    if kind == "gem":
        sx = _strides3(x)
        if sx is None:
            x = x.contiguous()
            sx = _strides3(x)
            assert sx is not None
        plane = _packed_plane(sgx, hw) if sx == sgx else 0
    else:
        sx = sgx  # x is not read
        plane = _packed_plane(sgx, hw)
    # The output tensor's layout decides the tile shape: its stores dominate the traffic.
    eb = grad_x.element_size()
    tile = _tile(kind, eb, backward=True)
    block_c, block_hw, num_warps = _config(n, c, hw, sgx[1] == 1 and hw > 1, eb, tile)
    num_cblocks = triton.cdiv(c, block_c)
    args = (
        grad_y,
        x,
        x if p is None else p,
        grad_x if saved is None else saved,
        grad_x,
        grad_x if gp is None else gp,
        c,
        hw,
        num_cblocks,
        grad_y.stride(0),
        grad_y.stride(1),
        *sx,
        *sgx,
        eps,
        1.0 / hw,
    )
    meta = (kind, gp is not None, plane, block_c, block_hw)
    _launch(_global_pool_bwd_kernel, n * num_cblocks, args, meta, num_warps)


def global_pool_backward(
    grad_y: Tensor,
    x: Tensor,
    kind: str,
    p: Tensor | None,
    eps: float,
    y: Tensor | None,
    saved: Tensor | None,
    need_grad_p: bool,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gradients of `global_pool_forward`: a gather that writes every element of grad_x once.

    Args:
        grad_y: (N, C), or (N, 2C) for catavgmax, any strides.
        x, kind, p, eps: as given to the forward.
        y: the forward's result (unused: gem recomputes it in float32 from saved).
        saved: the forward's saved tensor (None for avg).
        need_grad_p: also return dL/dp (gem only).
        out: optional tensor shaped like x to write grad_x into (its strides are kept).

    Returns:
        (grad_x, grad_p): grad_x with x's shape, dtype and strides; grad_p a float32 tensor
        shaped like p for gem when need_grad_p, else None.
    """
    _check_input(x)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind != "avg" and saved is None:
        raise ValueError(f"kind={kind!r} needs the forward's saved tensor")
    grad_x = out if out is not None else torch.empty_like(x)  # keeps x's strides
    gp = None
    if kind == "gem" and need_grad_p:
        assert p is not None
        gp = torch.empty(x.shape[:2], device=x.device, dtype=torch.float32)
    if grad_x.numel() > 0:
        _launch_bwd(grad_y, x, kind, p, eps, saved, grad_x, gp)
    if gp is None:
        return grad_x, None
    assert p is not None
    return grad_x, gp.sum().reshape(p.shape)


def gap_linear_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    return_maps: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """GAP + linear classifier head, reading x once: logits = mean_hw(x) @ weight.T + bias.

    The pooling kernel writes the pooled features (float32 for backward, and in the weight's
    dtype for the matmul when that differs); the (N, C) x (C, K) product then runs in cuBLAS,
    which is what a fused kernel would have to re-implement for no saving in bytes: the pooled
    features are HW times smaller than x.

    Args:
        x: (N, C, H, W) features, float16 / bfloat16 / float32, NCHW or channels_last.
        weight: (K, C) classifier weight; bias: (K,) or None.
        return_maps: also return the class activation maps.

    Returns:
        (logits, pooled, maps): logits (N, K) in the weight's dtype; pooled (N, C) float32 mean
        of x; maps (N, K, H, W) = sum_c weight[k, c] * x[n, c] (no bias), channels_last when x
        is, or None. mean(maps) == logits - bias.
    """
    _check_input(x)
    n, c, h, w = x.shape
    pooled = torch.empty((n, c), device=x.device, dtype=torch.float32)
    if x.numel() > 0:
        if weight.dtype == torch.float32:
            _launch_fwd(x, "avg", None, 1.0, pooled, None)
            features = pooled
        else:
            features = torch.empty((n, c), device=x.device, dtype=weight.dtype)
            _launch_fwd(x, "avg", None, 1.0, features, pooled)
    else:
        features = pooled.to(weight.dtype)
    logits = torch.nn.functional.linear(features, weight, bias)  # (N, K)
    maps = None
    if return_maps:
        k = weight.shape[0]
        wx = weight.to(x.dtype)
        if maps_channels_last(x):  # (N, HW, C) @ (C, K), free views
            nhwc = x.permute(0, 2, 3, 1).reshape(n, h * w, c)
            maps = torch.matmul(nhwc, wx.t()).view(n, h, w, k).permute(0, 3, 1, 2)
        else:
            maps = torch.matmul(wx, x.reshape(n, c, h * w)).view(n, k, h, w)
    return logits, pooled, maps


def gap_linear_backward(
    grad_logits: Tensor,
    x: Tensor,
    weight: Tensor,
    pooled: Tensor,
    need_grad_x: bool,
    need_grad_w: bool,
    need_grad_b: bool,
    out: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of `gap_linear_forward` (the maps carry no gradient).

    grad_x is grad_logits @ weight spread evenly over each plane by the avg-pool backward kernel
    (a pure streaming write in x's dtype and strides); grad_w and grad_b are small matmuls.

    Args:
        grad_logits: (N, K). x: (N, C, H, W). weight: (K, C). pooled: (N, C) float32 from the
        forward. need_grad_*: which gradients to compute. out: optional grad_x tensor.

    Returns:
        (grad_x, grad_w, grad_b), each None when not asked for.
    """
    grad_x = grad_w = grad_b = None
    if need_grad_x:
        grad_pooled = grad_logits.to(weight.dtype) @ weight  # (N, C)
        grad_x, _ = global_pool_backward(grad_pooled, x, "avg", None, 1.0, None, None, False, out)
    if need_grad_w:
        grad_w = (grad_logits.t().to(torch.float32) @ pooled).to(weight.dtype)  # (K, C)
    if need_grad_b:
        grad_b = grad_logits.sum(0)
    return grad_x, grad_w, grad_b
