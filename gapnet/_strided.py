"""Max and average pooling composed from strided views of the input: pure torch ops, any device.

(On CPU, NCHW-contiguous float32/float64 max pools run the compiled one-pass kernel of
`gapnet._cpu_kernels` instead, where it builds; these views are its fallback.)

Tap (a, b) of output (i, j) reads input cell ``(i*sh - pad_top + a*dh, j*sw - pad_left + b*dw)``,
so one tap over all outputs is a strided view of the input and a pool is a few whole-tensor ops.
PyTorch's CPU ``max_pool2d`` on NCHW-contiguous tensors walks each window element by element and
is 4-15x slower than that (channels_last it vectorises over C and is fast: `prefers` leaves it
alone). What makes these ops fast:

- separable windows: a max (or sum) over kh x kw taps is a max over kh rows of maxes over kw
  columns: kh + kw ops through an (.., OH, W) intermediate instead of kh * kw;
- no padded copy: a tap runs only over the outputs for which it lies inside the input, which
  form a slice of the output; padding is never materialised;
- cache blocking on CPU: planes go through in blocks of `_BLOCK_BYTES` of input, so a block,
  its intermediate and its output stay in cache across all the taps instead of streaming the
  whole tensor through memory once per tap;
- worker threads on CPU: the blocks are shared out to threads whose ops run single-threaded,
  so no op waits for all of PyTorch's threads to join (see `_run_blocks`).

Max values are separable; the tap a max picks is not (ties go to the first maximum in row-major
window order, a window with NaN to its last NaN). When a gradient or indices are needed, a
second pass compares each tap with the max, last tap first, overwriting a float key, so that
the first equal tap is written last (see `_choose_taps`); inference skips it. On CPU the key is
PyTorch's flat index and the backward is ``scatter_add_``, which on CPU runs each plane in order
on one thread (deterministic). Elsewhere the key is the tap ``a*kw + b`` (uint8) and the
backward adds each tap's share into a strided view of grad_x, tap after tap (deterministic on
any device, no atomics).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gapnet import _cpu_kernels as cpu_kernels
from gapnet._shapes import Window2d, geometry, tap_span, window_of
from gapnet.kernels import acc_dtype, empty, empty_like_format, is_channels_last, offsets_dtype

# Input bytes per block of planes on CPU: a block, its intermediate and its output stay in
# cache across all the taps instead of streaming from memory once per tap (2-core AMD EPYC:
# 2 MiB L2 per core, 32 MiB L3). ResNet stem (32, 64, 112, 112) k3 s2 p1 fp32 forward, ms by
# block size, each op split over both threads: 256K 51.8, 512K 32.6, 1M 23.2, 2M 20.7,
# 4M 19.1, 8M 18.8, 16M 22.5, 64M 23.6, unblocked 37.3 (small blocks pay Python's per-op
# overhead, a few us per op and ~10 ops a block). With whole blocks per worker thread (see
# `_run_blocks`), stem (8, 64, 112, 112): 1M 5.7, 2M 7.2, 4M 5.1, 8M 6.8; DenseNet average
# (8, 256, 56, 56): 1M 4.4, 2M 4.3, 4M 3.4, 8M 4.1.
_BLOCK_BYTES = 4 << 20


@dataclass(frozen=True)
class _Tap:
    """One kernel offset along one axis, and the outputs for which it lies inside the input."""

    index: int  # a: the tap reads input position i*stride - pad_before + a*dilation
    lo: int  # first output whose tap is in bounds
    hi: int  # one past the last
    start: int  # input position read by output `lo`


@functools.lru_cache(maxsize=64)
def _taps(win: Window2d, axis: int) -> tuple[_Tap, ...]:
    """The taps along `axis` that some output reads inside the input (padding-only ones dropped)."""
    first = -win.pad_before[axis]  # input position of output 0's tap 0
    taps = []
    for a in range(win.kernel[axis]):
        lo, hi = tap_span(win, axis, a)
        if hi > lo:
            taps.append(_Tap(a, lo, hi, lo * win.stride[axis] + first + a * win.dilation[axis]))
    return tuple(taps)


def _view(t: Tensor, dim: int, start: int, count: int, step: int = 1) -> Tensor:
    """`count` positions from `start`, `step` apart, along dim -2 or -1."""
    index = slice(start, start + step * (count - 1) + 1, step)
    return t[..., index, :] if dim == -2 else t[..., index]


def _full_tap(taps: tuple[_Tap, ...], out: int) -> _Tap | None:
    """A tap that is in bounds for every output: it can initialise the result by a copy."""
    return next((t for t in taps if t.lo == 0 and t.hi == out), None)


def _planes(t: Tensor) -> Tensor | None:
    """(N, C, H, W) as an (N*C, H, W) view of the same memory, or None where N and C don't merge."""
    n, c, h, w = t.shape
    if is_channels_last(t) or not (n == 1 or c == 1 or t.stride(0) == t.stride(1) * c):
        return None
    return t.view(n * c, h, w)


def _blocks(first: Tensor, *rest: Tensor) -> list[tuple[Tensor, ...]]:
    """Matching blocks of NCHW tensors of the same N and C: of N*C planes when every tensor's
    planes merge, else (channels_last) of whole images; sized by `first` (the larger tensor).

    On CPU a block holds about `_BLOCK_BYTES` of `first` (at least one plane or image);
    elsewhere the tensors go whole.
    """
    tensors = (first, *rest)
    planes = [_planes(t) for t in tensors]
    flat = all(p is not None for p in planes)
    views: list[Tensor] = [p for p in planes if p is not None] if flat else list(tensors)
    count = views[0].shape[0]
    if count == 0:
        return []
    step = count
    if first.device.type == "cpu":
        step = max(1, _BLOCK_BYTES // max(views[0][0].numel() * first.element_size(), 1))
    return [tuple(v[i : i + step] for v in views) for i in range(0, count, step)]


# ----------------------------------------------------------------------------- CPU workers

# PyTorch runs each elementwise op over its threads and joins them at the op's end. These pools
# are dozens of ops: where another process holds a core (a training job, data loader workers),
# every join waits out the scheduler's time slice, and the pool became 10-60x slower (measured:
# ResNet stem b8 forward 336 ms, PyTorch's one op 54 ms). So on CPU the blocks go to worker
# threads, one per PyTorch thread, whose ops run single-threaded (no join): a stalled worker
# only leaves its blocks to the others (under the same load: 9.2 ms). The worker's OpenMP
# thread count is its own (OpenMP keeps it per thread); PyTorch's setting is not touched.
_workers: tuple[int, int, ThreadPoolExecutor | None] | None = None  # (pid, threads, pool)
_workers_lock = threading.Lock()


def _forget_workers() -> None:
    """In a forked child: the parent's threads did not come along, and the lock may be held."""
    global _workers, _workers_lock
    _workers, _workers_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


@functools.lru_cache(maxsize=1)
def _openmp() -> Any:
    """The OpenMP runtime PyTorch runs on, for omp_set_num_threads; None if not found."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    names = ("libgomp*.so*", "libiomp5*.so*", "libomp*.so*", "libomp*.dylib")
    for path in (p for name in names for p in sorted(glob.glob(os.path.join(lib, name)))):
        try:
            runtime = ctypes.CDLL(path)
            runtime.omp_set_num_threads  # noqa: B018 - raises where the symbol is missing
            return runtime
        except (OSError, AttributeError):
            continue
    return None


def _single_threaded() -> None:
    """Worker initialiser: this thread's ops run on it alone."""
    torch.get_num_threads()  # PyTorch sets a thread's OpenMP count on first use: let it first
    _openmp().omp_set_num_threads(1)


def _pool() -> ThreadPoolExecutor | None:
    """The worker threads (one per PyTorch thread), or None where ops run in the caller: one
    thread, no OpenMP runtime found, or a worker not single-threaded after all."""
    global _workers
    threads, pid = torch.get_num_threads(), os.getpid()
    with _workers_lock:
        if _workers is None or _workers[:2] != (pid, threads):  # new, resized, or forked
            pool = None
            if threads > 1 and _openmp() is not None:
                pool = ThreadPoolExecutor(threads, "gapnet", initializer=_single_threaded)
                if pool.submit(torch.get_num_threads).result() != 1:
                    pool.shutdown(wait=False)
                    pool = None
            _workers = (pid, threads, pool)
        return _workers[2]


def _run_blocks(work: Callable[..., None], blocks: list[tuple[Tensor, ...]]) -> None:
    """work(*block) for every block: on CPU over the single-threaded workers, taking blocks in
    turn from one queue (a single block too: one worker, no join), else in the calling thread."""
    pool = _pool() if blocks and blocks[0][0].device.type == "cpu" else None
    if pool is None:
        for block in blocks:
            work(*block)
        return
    queue = iter(blocks)
    lock = threading.Lock()

    inference = torch.is_inference_mode_enabled()

    def drain() -> None:
        # grad and inference modes are per thread: take the caller's (outputs made under
        # inference mode can only be written under it)
        with torch.inference_mode() if inference else torch.no_grad():
            while True:
                with lock:
                    block = next(queue, None)
                if block is None:
                    return
                work(*block)

    workers = min(len(blocks), torch.get_num_threads())
    for future in [pool.submit(drain) for _ in range(workers)]:
        future.result()


def _rows_first(win: Window2d) -> bool:
    """Whether the row taps go first (through an (.., OH, W) intermediate): fewer element-ops.

    A first pass of one tap costs nothing (it is a view). Ties go to rows first: its first
    pass reads whole rows, the cheapest access.
    """
    (h, w), (kh, kw), (oh, ow) = win.in_size, win.kernel, win.out_size
    rows = (kh * oh * w if kh > 1 else 0) + kw * oh * ow
    return rows <= (kw * h * ow if kw > 1 else 0) + kh * oh * ow


# ----------------------------------------------------------------------------- max_pool2d


Reader = Callable[[_Tap], Tensor]  # a tap -> the source cells it reads, for its in-bounds outputs


def _reader(src: Tensor, dim: int, stride: int) -> Reader:
    """Taps along `dim` as strided views of src."""
    return lambda t: _view(src, dim, t.start, t.hi - t.lo, stride)


def _column_phases(x: Tensor, win: Window2d, taps: tuple[_Tap, ...]) -> Reader | None:
    """Column taps as views of inner stride 1, or None where x's columns already have that
    (stride 1) or are not its unit stride (channels_last: C is).

    Elementwise ops on an input of inner stride 2 or more are not vectorised, and a comparison
    into a float output from one takes PyTorch's element-by-element casting loop (10x slower).
    So the columns are split once into their `stride` phases, contiguous copies each read by
    several taps, and every tap reads a contiguous run of one phase.
    """
    sw = win.stride[1]
    if sw == 1 or x.stride(-1) != 1:
        return None
    phases: dict[int, Tensor] = {}
    for t in taps:
        r = t.start % sw
        if r not in phases:
            cols = x[..., r::sw]
            phases[r] = empty_like_format(x, tuple(cols.shape), x.dtype).copy_(cols)
    return lambda t: _view(phases[t.start % sw], -1, t.start // sw, t.hi - t.lo)


def _max_pass(read: Reader, taps: tuple[_Tap, ...], dim: int, dst: Tensor) -> None:
    """dst = max over `taps` along `dim` (dst's length there is the output size)."""
    out = dst.shape[dim]
    full = _full_tap(taps, out)
    if full is None:  # every output has an in-bounds tap, but no one tap serves all of them
        dst.fill_(float("-inf"))
    else:
        dst.copy_(read(full))
    for t in taps:
        if t is not full:
            part = _view(dst, dim, t.lo, t.hi - t.lo)
            # torch.maximum propagates NaN, as the max of a window with a NaN must
            torch.maximum(part, read(t), out=part)


def _separable(
    src: Tensor,
    dst: Tensor,
    win: Window2d,
    taps: tuple[tuple[_Tap, ...], tuple[_Tap, ...]],
    one_pass: Any,
    mid_dtype: torch.dtype,
    columns: Reader | None = None,
) -> None:
    """dst = reduce over the window of src by `one_pass` along one axis, then the other.

    With a `columns` reader the columns go first, read through it.
    """
    (oh, ow), (h, w) = win.out_size, src.shape[-2:]
    rows_first = columns is None and _rows_first(win)
    (dim1, ax1), (dim2, ax2) = ((-2, 0), (-1, 1)) if rows_first else ((-1, 1), (-2, 0))
    read1 = columns or _reader(src, dim1, win.stride[ax1])
    taps1 = taps[ax1]
    full = _full_tap(taps1, win.out_size[ax1])
    if len(taps1) == 1 and full is not None and mid_dtype == src.dtype:
        mid = read1(full)  # a 1-tap axis: a view, no pass
    else:
        shape = (*src.shape[:-2], oh, w) if rows_first else (*src.shape[:-2], h, ow)
        mid = empty_like_format(src, shape, mid_dtype)
        one_pass(read1, taps1, dim1, mid)
    one_pass(_reader(mid, dim2, win.stride[ax2]), taps[ax2], dim2, dst)


def _tap_view(t: Tensor, th: _Tap, tw: _Tap, win: Window2d) -> Tensor:
    """The input cells that tap (th, tw) reads, for its in-bounds outputs (a strided view)."""
    sh, sw = win.stride
    return _view(_view(t, -2, th.start, th.hi - th.lo, sh), -1, tw.start, tw.hi - tw.lo, sw)


def _out_view(t: Tensor, th: _Tap, tw: _Tap) -> Tensor:
    """The outputs for which tap (th, tw) is in bounds."""
    return t[..., th.lo : th.hi, tw.lo : tw.hi]


@functools.lru_cache(maxsize=32)
def _index_ends(
    win: Window2d, dtype: torch.dtype, device: torch.device
) -> dict[tuple[int, int], Tensor]:
    """Per tap (a, b): the flat h*W + w index it reads, over its in-bounds outputs (OH', OW').

    Cached: dozens of small tensors, whose making costs more than a small pool itself.
    """
    taps = (_taps(win, 0), _taps(win, 1))
    (sh, sw), (dh, dw), (top, left), w = win.stride, win.dilation, win.pad_before, win.in_size[1]
    rows = torch.arange(win.out_size[0], dtype=dtype, device=device) * sh - top
    cols = torch.arange(win.out_size[1], dtype=dtype, device=device) * sw - left
    return {
        (th.index, tw.index): (rows[th.lo : th.hi, None] + th.index * dh) * w
        + (cols[None, tw.lo : tw.hi] + tw.index * dw)
        for th in taps[0]
        for tw in taps[1]
    }


def _choose_taps(
    x: Tensor,
    y: Tensor,
    win: Window2d,
    taps: tuple[tuple[_Tap, ...], tuple[_Tap, ...]],
    off: Tensor | None,
    indices: Tensor | None,
    index_ends: dict[tuple[int, int], Tensor] | None,
    columns: Reader | None,
) -> None:
    """Per output, the tap PyTorch's max picks: into off as a*kw + b, into indices as h*W + w.

    PyTorch scans a window row-major with ``if v > m or isnan(v)``: the first maximum, or in a
    window with NaN the last NaN. Here the taps are compared with the max last first, each
    equal one overwriting a float key, so the first equal tap is written last. The write is
    ``key.lerp_(tap, equal)`` with `equal` exactly 0.0 or 1.0: comparisons into float and lerp
    are vectorised, where bool masks and masked_fill are 3-5x slower. A NaN equals nothing, so
    a NaN window keeps the start key -1 and is then set by a forward scan of isnan.
    """
    kw = win.kernel[1]
    dev = y.device
    fdt = torch.float32 if index_ends is None else next(iter(index_ends.values())).dtype
    equal = torch.empty(y.shape, dtype=fdt, device=dev)
    keys: list[tuple[Tensor, Any]] = []  # (key, (a, b) -> what tap (a, b) writes)
    if off is not None:
        ids = torch.arange(win.kernel[0] * kw, dtype=fdt, device=dev)
        keys.append(
            (torch.full(y.shape, -1.0, dtype=fdt, device=dev), lambda a, b: ids[a * kw + b])
        )
    if indices is not None:
        assert index_ends is not None
        keys.append(
            (torch.full(y.shape, -1.0, dtype=fdt, device=dev), lambda a, b: index_ends[a, b])
        )
    col = columns or _reader(x, -1, win.stride[1])
    sh = win.stride[0]

    def read(th: _Tap, tw: _Tap) -> Tensor:
        return _view(col(tw), -2, th.start, th.hi - th.lo, sh)

    pairs = [(th, tw) for th in taps[0] for tw in taps[1]]  # row-major

    def write(th: _Tap, tw: _Tap) -> None:
        e = _out_view(equal, th, tw)
        for key, end in keys:
            _out_view(key, th, tw).lerp_(end(th.index, tw.index), e)

    for th, tw in reversed(pairs):
        torch.eq(read(th, tw), _out_view(y, th, tw), out=_out_view(equal, th, tw))
        write(th, tw)
    if float(keys[0][0].amin()) < 0:  # windows with NaN: the last NaN
        for th, tw in pairs:
            v = read(th, tw)
            torch.ne(v, v, out=_out_view(equal, th, tw))
            write(th, tw)
    if off is not None:
        off.copy_(keys[0][0])
    if indices is not None:
        indices.copy_(keys[-1][0])


def _max_forward(
    x4: Tensor, win: Window2d, need_offsets: bool, need_indices: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """y (N, C, OH, OW) in x4's memory format and, on request, each output's chosen tap as an
    offset a*kw + b and as a flat h*W + w index (PyTorch's return_indices).

    NCHW-contiguous float32/float64 on CPU run the compiled one-pass kernel where it is
    available (`gapnet._cpu_kernels`; it gives indices, not offsets).
    """
    shape = (*x4.shape[:2], *win.out_size)
    y = empty_like_format(x4, shape, x4.dtype)
    off = empty_like_format(x4, shape, offsets_dtype(win)) if need_offsets else None
    indices = empty_like_format(x4, shape, torch.int64) if need_indices else None
    if off is None and cpu_kernels.takes(x4):
        cpu_kernels.max_pool2d(x4, win, y, indices)
        return y, None, indices
    taps = (_taps(win, 0), _taps(win, 1))
    ends = None
    if indices is not None:  # float keys hold flat indices exactly below 2**24
        big = win.in_size[0] * win.in_size[1] > 1 << 24
        ends = _index_ends(win, torch.float64 if big else torch.float32, x4.device)
    outs = [t for t in (off, indices) if t is not None]

    def work(xb: Tensor, yb: Tensor, *rest: Tensor) -> None:
        # the tap pass compares each tap with the max: with phases split once, both read them
        columns = _column_phases(xb, win, taps[1]) if outs else None
        _separable(xb, yb, win, taps, _max_pass, x4.dtype, columns)
        if outs:
            offb = rest[0] if off is not None else None
            indb = rest[-1] if indices is not None else None
            _choose_taps(xb, yb, win, taps, offb, indb, ends, columns)

    _run_blocks(work, _blocks(x4, y, *outs))
    return y, off, indices


@functools.lru_cache(maxsize=256)
def _reads(taps: tuple[_Tap, ...], size: int, stride: int) -> tuple[bool, bool]:
    """(disjoint, covering) along one axis: no input position is read by two (output, tap)
    pairs; every input position is read by one. Both: a backward can write, not accumulate.

    Each tap reads the positions ``start + i*stride``: a run of one residue class mod stride.
    O(taps^2) work, whatever the size (the first call on a huge plane stays quick).
    """
    runs: dict[int, list[tuple[int, int]]] = {}  # residue -> [first, last] indices j of its runs
    for t in taps:
        j = t.start // stride
        runs.setdefault(t.start % stride, []).append((j, j + t.hi - t.lo))
    disjoint, covering = True, len(runs) >= min(stride, size)
    for residue, spans in runs.items():
        spans.sort()
        reached = 0  # indices [0, reached) of this residue class are read so far
        for lo, hi in spans:
            disjoint = disjoint and lo >= reached
            covering = covering and lo <= reached
            reached = max(reached, hi)
        covering = covering and reached >= (size - 1 - residue) // stride + 1
    return disjoint, covering


def _max_scatter(gy: Tensor, off: Tensor, win: Window2d, channels_last: bool) -> Tensor:
    """grad_x: each output's gradient added to its chosen tap, one tap at a time, in order.

    A tap's share is ``grad_y * (off == tap)`` with the comparison into float (vectorised);
    were grad_y to hold inf or NaN, 0 * inf would spread NaN to cells that were not chosen, so
    such a gradient takes ``where`` (exact, slower) instead.
    """
    taps = (_taps(win, 0), _taps(win, 1))
    kw = win.kernel[1]
    (dis_h, cov_h), (dis_w, cov_w) = (
        _reads(taps[a], win.in_size[a], win.stride[a]) for a in (0, 1)
    )
    # windows that share no cell: every input cell is one tap of at most one window, so each
    # tap writes its cells instead of adding to them (and, covering, no zero fill is needed)
    disjoint = dis_h and dis_w
    acc = gy.dtype if disjoint else acc_dtype(gy.dtype)
    gx = empty((*gy.shape[:2], *win.in_size), acc, gy.device, channels_last)
    if not (disjoint and cov_h and cov_w):
        gx.zero_()
    finite = bool(torch.isfinite(gy.sum(dtype=torch.float64)))
    zero = torch.zeros((), dtype=acc, device=gy.device)

    def work(gxb: Tensor, gyb: Tensor, offb: Tensor) -> None:
        gyb = gyb.to(acc)
        weight = torch.empty(gyb.shape, dtype=acc if finite else torch.bool, device=gy.device)
        tmp = None if finite or disjoint else torch.empty_like(gyb)
        for th in taps[0]:
            for tw in taps[1]:
                # over the whole block: a compare into float runs twice as fast contiguous
                torch.eq(offb, th.index * kw + tw.index, out=weight)
                w = _out_view(weight, th, tw)
                g = _out_view(gyb, th, tw)
                dst = _tap_view(gxb, th, tw, win)
                if finite and disjoint:
                    torch.mul(g, w, out=dst)
                elif finite:
                    dst.addcmul_(g, w)
                elif tmp is None:
                    torch.where(w, g, zero, out=dst)
                else:
                    part = _out_view(tmp, th, tw)
                    torch.where(w, g, zero, out=part)
                    dst.add_(part)

    _run_blocks(work, _blocks(gx, gy, off))
    return gx.to(gy.dtype)


def _max_gather(ggx: Tensor, off: Tensor, win: Window2d) -> Tensor:
    """The adjoint of `_max_scatter`: each output takes the value at its chosen tap."""
    taps = (_taps(win, 0), _taps(win, 1))
    kw = win.kernel[1]
    ggy = empty_like_format(off, tuple(off.shape), ggx.dtype)
    mask = torch.empty(off.shape, dtype=torch.bool, device=off.device)
    for th in taps[0]:
        for tw in taps[1]:
            m = _out_view(mask, th, tw)
            torch.eq(_out_view(off, th, tw), th.index * kw + tw.index, out=m)
            part = _out_view(ggy, th, tw)
            torch.where(m, _tap_view(ggx, th, tw, win), part, out=part)
    return ggy


def _scatter_by_indices(gy: Tensor, indices: Tensor, win: Window2d, channels_last: bool) -> Tensor:
    """grad_x = zeros, then scatter_add of each output's gradient at its flat index.

    For the CPU, whose scatter_add runs each plane's outputs in order on one thread
    (deterministic; CUDA's uses atomics): 5x faster than the tap-by-tap `_max_scatter` on the
    ResNet stem (8, 64, 112, 112), 1.9 ms against 10.6 (PyTorch's own backward: 2.2).
    """
    (n, c), (h, w), (oh, ow) = gy.shape[:2], win.in_size, win.out_size
    gy = gy if channels_last else gy.contiguous()  # a .sum()'s gradient is an expanded view
    if not channels_last and indices.is_contiguous() and cpu_kernels.takes(gy):
        # one pass per plane (zero, then add in order): the same sums in the same order
        gx = empty((n, c, h, w), gy.dtype, gy.device, False)
        cpu_kernels.max_pool2d_backward(gy, indices, win, gx)
        return gx
    acc = acc_dtype(gy.dtype)
    gx = empty((n, c, h, w), acc, gy.device, channels_last).zero_()
    g = gy.to(acc)
    if channels_last:  # (N, H*W, C): the flat index runs along dim 1
        flat = gx.permute(0, 2, 3, 1).view(n, h * w, c)
        idx, src = (t.permute(0, 2, 3, 1).reshape(n, oh * ow, c) for t in (indices, g))
    else:
        flat = gx.view(n * c, h * w)
        idx, src = (t.reshape(n * c, oh * ow) for t in (indices, g))
    flat.scatter_add_(1, idx, src)
    return gx.to(gy.dtype)


def _gather_by_indices(ggx: Tensor, indices: Tensor) -> Tensor:
    """The adjoint of `_scatter_by_indices`: each output takes ggx at its flat index."""
    n, c, h, w = ggx.shape
    oh, ow = indices.shape[-2:]
    return ggx.reshape(n, c, h * w).gather(2, indices.reshape(n, c, oh * ow)).view(n, c, oh, ow)


def _by_indices(t: Tensor) -> bool:
    """Whether the backward scatters by flat indices (CPU) or tap by tap from offsets."""
    return t.device.type == "cpu"


class _MaxScatter(torch.autograd.Function):
    """grad_y -> grad_x of max_pool2d; its gradient is `_MaxGather` (double backward)."""

    @staticmethod
    def forward(
        ctx: Any, gy: Tensor, chosen: Tensor, win: Window2d, channels_last: bool, by_index: bool
    ) -> Tensor:
        ctx.save_for_backward(chosen)
        ctx.args = (win, by_index)
        if by_index:
            return _scatter_by_indices(gy, chosen, win, channels_last)
        return _max_scatter(gy, chosen, win, channels_last)

    @staticmethod
    def backward(ctx: Any, ggx: Tensor) -> Any:
        (chosen,) = ctx.saved_tensors
        return _MaxGather.apply(ggx, chosen, *ctx.args), None, None, None, None


class _MaxGather(torch.autograd.Function):
    """The adjoint of `_MaxScatter`."""

    @staticmethod
    def forward(ctx: Any, ggx: Tensor, chosen: Tensor, win: Window2d, by_index: bool) -> Tensor:
        ctx.save_for_backward(chosen)
        ctx.args = (win, is_channels_last(ggx), by_index)
        if by_index:
            return _gather_by_indices(ggx, chosen)
        return _max_gather(ggx, chosen, win)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Any:
        (chosen,) = ctx.saved_tensors
        return _MaxScatter.apply(g, chosen, *ctx.args), None, None, None


class _MaxPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x4: Tensor, win: Window2d, return_indices: bool) -> Any:
        by_index = _by_indices(x4)
        y, off, indices = _max_forward(x4, win, not by_index, by_index or return_indices)
        chosen = indices if by_index else off
        ctx.save_for_backward(chosen)
        ctx.args = (win, is_channels_last(x4), by_index)
        if not return_indices:
            return y
        ctx.mark_non_differentiable(indices)
        return y, indices

    @staticmethod
    def backward(ctx: Any, gy: Tensor, *_: Any) -> Any:
        (chosen,) = ctx.saved_tensors
        return _MaxScatter.apply(gy, chosen, *ctx.args), None, None


def max_pool2d(x4: Tensor, win: Window2d, return_indices: bool = False) -> tuple[Tensor, Any]:
    """Max pooling of an NCHW tensor (any memory format) over the windows of `win`.

    PyTorch's semantics: ties go to the first maximum in row-major window order, a window with
    a NaN gives NaN (its gradient to the last NaN), padding is never chosen.

    Args:
        x4: (N, C, H, W), floating point, any strides (channels_last included).
        win: the resolved windows, from ``_shapes.window2d``.
        return_indices: also return flat ``h*W + w`` indices of each window's maximum.

    Shape:
        (N, C, H, W) -> y (N, C, OH, OW) in x4's memory format, indices int64 or None.

    Example:
        >>> from gapnet._shapes import window2d
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> y, idx = max_pool2d(x, window2d("max_pool2d", (4, 4), 2), return_indices=True)
        >>> y.flatten().tolist(), idx.flatten().tolist()
        ([5.0, 7.0, 13.0, 15.0], [5, 7, 13, 15])
    """
    if torch.compiler.is_compiling():  # one graph node (see "torch.compile" below)
        need = return_indices or (torch.is_grad_enabled() and x4.requires_grad)
        y, indices = _max_pool_op(x4, geometry(win), need)
        return y, (indices if return_indices else None)
    if torch.is_grad_enabled() and x4.requires_grad:
        out = _MaxPool2d.apply(x4, win, return_indices)
        return (out[0], out[1]) if return_indices else (out, None)
    y, _, indices = _max_forward(x4, win, False, return_indices)
    return y, indices


# ----------------------------------------------------------------------------- avg_pool2d


def _sum_pass(read: Reader, taps: tuple[_Tap, ...], dim: int, dst: Tensor) -> None:
    """dst = sum over `taps` along `dim`; out-of-bounds taps add nothing (zero padding)."""
    out = dst.shape[dim]
    full = _full_tap(taps, out)
    if full is None:
        dst.zero_()
    else:
        dst.copy_(read(full))
    for t in taps:
        if t is not full:
            _view(dst, dim, t.lo, t.hi - t.lo).add_(read(t))


def _divisor(
    win: Window2d,
    count_include_pad: bool,
    divisor_override: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor | float:
    """Each output's divisor: a number, or an (OH, OW) tensor where it varies (the border)."""
    if divisor_override is not None:
        return float(divisor_override)
    rows, cols = (_axis_counts(win, count_include_pad, axis, dtype, device) for axis in (0, 1))
    if bool((rows == rows[0]).all()) and bool((cols == cols[0]).all()):
        return float(rows[0] * cols[0])
    return rows[:, None] * cols[None, :]  # exact: products of small integers


def _axis_counts(
    win: Window2d, count_include_pad: bool, axis: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """`Window2d.divisors` as a tensor, made by whole-tensor ops (no Python loop per output)."""
    out = win.out_size[axis]
    if count_include_pad and not win.same:  # the window clipped to the padded input
        start = torch.arange(out, device=device) * win.stride[axis] - win.pad_before[axis]
        extent = (win.kernel[axis] - 1) * win.dilation[axis] + 1
        end = (start + extent).clamp(max=win.in_size[axis] + win.pad_after[axis])
        return (end - start).to(dtype)
    counts = torch.zeros(out, dtype=dtype, device=device)
    for t in _taps(win, axis):
        counts[t.lo : t.hi] += 1
    return counts


def _avg_forward(
    x4: Tensor, win: Window2d, count_include_pad: bool, divisor_override: int | None
) -> Tensor:
    """Separable window sums (in float32 for float16/bfloat16), divided once at the end."""
    shape = (*x4.shape[:2], *win.out_size)
    acc = acc_dtype(x4.dtype)
    y = empty_like_format(x4, shape, x4.dtype)
    div = _divisor(win, count_include_pad, divisor_override, acc, x4.device)
    taps = (_taps(win, 0), _taps(win, 1))

    def work(xb: Tensor, yb: Tensor) -> None:
        sums = yb if acc == x4.dtype else torch.empty(yb.shape, dtype=acc, device=yb.device)
        _separable(xb, sums, win, taps, _sum_pass, acc)
        torch.div(sums, div, out=yb)

    _run_blocks(work, _blocks(x4, y))
    return y


def _add_pass(src: Tensor, taps: tuple[_Tap, ...], dim: int, stride: int, dst: Tensor) -> None:
    """The adjoint of `_sum_pass`: dst (input-sized along `dim`) = sum of src at each tap."""
    disjoint, covering = _reads(taps, dst.shape[dim], stride)
    if not (disjoint and covering):
        dst.zero_()
    for t in taps:
        part = _view(dst, dim, t.start, t.hi - t.lo, stride)
        src_part = _view(src, dim, t.lo, t.hi - t.lo)
        if disjoint:  # each input position gets one output's share: write, not accumulate
            part.copy_(src_part)
        else:
            part.add_(src_part)


def _avg_backward(
    gy: Tensor, win: Window2d, count_include_pad: bool, divisor_override: int | None, cl: bool
) -> Tensor:
    """grad_x of avg_pool2d: the forward's passes transposed, in reverse order."""
    acc = acc_dtype(gy.dtype)
    gx = empty((*gy.shape[:2], *win.in_size), gy.dtype, gy.device, cl)
    div = _divisor(win, count_include_pad, divisor_override, acc, gy.device)
    taps = (_taps(win, 0), _taps(win, 1))
    (oh, ow), (h, w) = win.out_size, win.in_size
    rows_first = _rows_first(win)

    def work(gxb: Tensor, gyb: Tensor) -> None:
        g = torch.div(gyb.to(acc), div)  # (.., OH, OW)
        if rows_first:  # the forward went rows (.., OH, W), then columns
            mid = empty_like_format(gxb, (*g.shape[:-2], oh, w), acc)
            _add_pass(g, taps[1], -1, win.stride[1], mid)
            dim, axis = -2, 0
        else:
            mid = empty_like_format(gxb, (*g.shape[:-2], h, ow), acc)
            _add_pass(g, taps[0], -2, win.stride[0], mid)
            dim, axis = -1, 1
        out = gxb if acc == gx.dtype else empty_like_format(gxb, tuple(gxb.shape), acc)
        _add_pass(mid, taps[axis], dim, win.stride[axis], out)
        if out is not gxb:
            gxb.copy_(out)

    _run_blocks(work, _blocks(gx, gy))
    return gx


class _AvgScatter(torch.autograd.Function):
    """grad_y -> grad_x of avg_pool2d; linear, so its gradient is the pool itself."""

    @staticmethod
    def forward(ctx: Any, gy: Tensor, win: Window2d, cip: bool, dov: Any, cl: bool) -> Tensor:
        ctx.args = (win, cip, dov)
        return _avg_backward(gy, win, cip, dov, cl)

    @staticmethod
    def backward(ctx: Any, ggx: Tensor) -> Any:
        return _AvgPool2d.apply(ggx, *ctx.args), None, None, None, None


class _AvgPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x4: Tensor, win: Window2d, cip: bool, dov: Any) -> Tensor:
        ctx.args = (win, cip, dov, is_channels_last(x4))
        return _avg_forward(x4, win, cip, dov)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> Any:
        return _AvgScatter.apply(gy, *ctx.args), None, None, None


def avg_pool2d(
    x4: Tensor, win: Window2d, count_include_pad: bool = True, divisor_override: int | None = None
) -> Tensor:
    """Average pooling of an NCHW tensor (any memory format) over the windows of `win`.

    PyTorch's divisors (`count_include_pad`, `divisor_override`); for ``win.same`` (Keras)
    padded cells are never counted. float16/bfloat16 sums accumulate in float32.

    Args:
        x4: (N, C, H, W), floating point, any strides (channels_last included).
        win: the resolved windows, from ``_shapes.window2d``.
        count_include_pad: count padding cells (not those past it in ceil_mode) in the divisor.
        divisor_override: divide every sum by this instead.

    Shape:
        (N, C, H, W) -> (N, C, OH, OW) in x4's memory format.

    Example:
        >>> from gapnet._shapes import window2d
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> avg_pool2d(x, window2d("avg_pool2d", (4, 4), 2)).flatten().tolist()
        [2.5, 4.5, 10.5, 12.5]
    """
    if torch.compiler.is_compiling():  # one graph node (see "torch.compile" below)
        return _avg_pool_op(x4, geometry(win), count_include_pad, divisor_override)
    if torch.is_grad_enabled() and x4.requires_grad:
        return _AvgPool2d.apply(x4, win, count_include_pad, divisor_override)
    return _avg_forward(x4, win, count_include_pad, divisor_override)


# ----------------------------------------------------------------------------- torch.compile
# Dynamo cannot trace these pools (dozens of view ops chosen by Python over cached taps, run on
# worker threads), so while torch.compile traces, each pool and its backward is one
# `torch.library.custom_op` with a fake (shape-only) implementation: a compiled model keeps
# them as single graph nodes, with no graph break, and runs the very eager code inside. The
# backward of the max scatters by flat indices (the CPU rule of `_by_indices`, on any device).
# Double backward through a compiled graph is not supported (eager mode supports it).


def _in_window(x: Tensor, geom: list[int]) -> Window2d:
    return window_of((x.shape[2], x.shape[3]), geom)


@torch.library.custom_op("gapnet::strided_max_pool2d", mutates_args=())
def _max_pool_op(x: Tensor, geom: list[int], need_indices: bool) -> tuple[Tensor, Tensor]:
    y, _, indices = _max_forward(x, _in_window(x, geom), False, need_indices)
    return y, x.new_empty(0, dtype=torch.int64) if indices is None else indices


@_max_pool_op.register_fake
def _(x: Tensor, geom: list[int], need_indices: bool) -> tuple[Tensor, Tensor]:
    shape = (*x.shape[:2], *geom[10:12])
    indices = empty_like_format(x, shape, torch.int64) if need_indices else None
    return empty_like_format(x, shape, x.dtype), (
        x.new_empty(0, dtype=torch.int64) if indices is None else indices
    )


@torch.library.custom_op("gapnet::strided_max_pool2d_backward", mutates_args=())
def _max_pool_bwd_op(gy: Tensor, indices: Tensor, x: Tensor, geom: list[int]) -> Tensor:
    return _scatter_by_indices(gy, indices, _in_window(x, geom), is_channels_last(x))


@_max_pool_bwd_op.register_fake
def _(gy: Tensor, indices: Tensor, x: Tensor, geom: list[int]) -> Tensor:
    return empty(tuple(x.shape), gy.dtype, x.device, is_channels_last(x))


def _max_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, geom, _ = inputs
    ctx.geom = geom
    ctx.save_for_backward(x, output[1])
    ctx.mark_non_differentiable(output[1])


def _max_backward(ctx: Any, gy: Tensor, _gindices: Tensor) -> tuple:
    x, indices = ctx.saved_tensors
    return _max_pool_bwd_op(gy, indices, x, ctx.geom), None, None


_max_pool_op.register_autograd(_max_backward, setup_context=_max_setup)


@torch.library.custom_op("gapnet::strided_avg_pool2d", mutates_args=())
def _avg_pool_op(x: Tensor, geom: list[int], cip: bool, divisor_override: int | None) -> Tensor:
    return _avg_forward(x, _in_window(x, geom), cip, divisor_override)


@_avg_pool_op.register_fake
def _(x: Tensor, geom: list[int], cip: bool, divisor_override: int | None) -> Tensor:
    return empty_like_format(x, (*x.shape[:2], *geom[10:12]), x.dtype)


@torch.library.custom_op("gapnet::strided_avg_pool2d_backward", mutates_args=())
def _avg_pool_bwd_op(
    gy: Tensor, x: Tensor, geom: list[int], cip: bool, divisor_override: int | None
) -> Tensor:
    win = _in_window(x, geom)
    return _avg_backward(gy, win, cip, divisor_override, is_channels_last(x))


@_avg_pool_bwd_op.register_fake
def _(gy: Tensor, x: Tensor, geom: list[int], cip: bool, divisor_override: int | None) -> Tensor:
    return empty(tuple(x.shape), gy.dtype, x.device, is_channels_last(x))


def _avg_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, geom, cip, divisor_override = inputs
    ctx.args = (geom, cip, divisor_override)
    ctx.save_for_backward(x)  # for its shape and memory format: a view, no copy


def _avg_backward_op(ctx: Any, gy: Tensor) -> tuple:
    (x,) = ctx.saved_tensors
    return _avg_pool_bwd_op(gy, x, *ctx.args), None, None, None


_avg_pool_op.register_autograd(_avg_backward_op, setup_context=_avg_setup)


# ----------------------------------------------------------------------------- dispatch

# Where these ops beat PyTorch's CPU kernels: `benchmarks/cpu_scratch.py` on a 2-core AMD EPYC
# (KVM, 2 MiB L2 per core), torch 2.13, 2 threads, min of 9, PyTorch ms / gapnet ms, fp32, on
# the machine idle, with each op split over both threads (before the worker threads: the same
# ops; with them the idle stem b8 forward is 5.0 ms against 4.8). With another process taking
# a core, the worker threads keep every NCHW row ahead of PyTorch (1.1-10x; stem b8 13.2 ms
# against 50.0), where ops split over both threads fell to 0.04-0.4x (stem b8 336 ms).
#
#   NCHW-contiguous                              fwd              fwd+bwd
#   ResNet stem (32, 64, 112, 112) k3 s2 p1      114.5/18.3 6.3x  158.9/100.2 1.6x
#   ResNet stem (8, 64, 112, 112) k3 s2 p1       25.8/5.4 4.8x    27.7/13.5 2.1x
#   VGG (16, 128, 112, 112) k2 s2                70.3/16.1 4.4x   112.1/74.3 1.5x
#   VGG pool4 (8, 512, 28, 28) k2 s2             9.4/2.1 4.4x     11.2/7.4 1.5x
#   small (8, 64, 56, 56) k3 s1 p1               21.8/1.4 15.3x   21.0/8.1 2.6x
#   small (8, 64, 56, 56) k3 s2 p1               6.3/1.5 4.2x     7.0/4.3 1.6x
#   late (256, 512, 14, 14) k2 s2                73.2/12.7 5.8x   127.1/107.0 1.2x
#   late (32, 512, 7, 7) k3 s1 p1                11.1/1.3 8.8x    10.9/10.6 1.0x
#   avg DenseNet (8, 256, 56, 56) k2 s2          6.0/3.1 1.9x     12.2/6.9 1.8x
#   avg Inception (8, 288, 35, 35) k3 s1 p1      13.6/2.9 4.8x    24.9/6.1 4.1x
#   avg stem (8, 64, 112, 112) k3 s2 p1          8.3/4.9 1.7x     15.1/9.9 1.5x
# bfloat16 alike (max 4.5-13x forward, 1.2-1.7x with backward; avg 2.5-5.2x, 2.5-7.5x).
#
# They lose where:
# - the input is channels_last: PyTorch vectorises over C (0.3-0.8x forward on most rows,
#   some 1.3-2.5x, 0.1-0.4x with backward);
# - it is small: Python's per-op overhead (and the hand-over to the worker threads), ~0.15 ms
#   forward and ~0.4 ms with backward against PyTorch's ~0.01 ms. (1, C, H, W) inputs: max pool
#   forward wins from 2e5 elements (k2 s2 loses at 6.5e4: 0.12 vs 0.18 ms); with backward k3 s1
#   from 2e5, k2 s2 from 4e5, k3 s2 from 8e5 (3.7 vs 3.2 ms; at 4e5 1.84 vs 1.92); averages
#   forward from 4e5 (0.38 vs 0.35 ms), with backward from 1.6e6 (3.2 vs 2.4; at 8e5 1.52 vs
#   1.57). The thresholds below keep a margin;
# - outputs are few per plane: ops over rows of 1-6 outputs are per-element overhead. With
#   backward, max pools on (64, 256, H, H) lose at output sizes up to 5x5 (0.3-0.9x), are even
#   for 8x8 inputs (k3 s1 p1) and win from 12x12 inputs (1.1-1.7x); the rows above with 7x7
#   outputs (1.0-1.2x) are left to PyTorch too. A global 7x7 pool of (64, 2048) is 1.0x
#   forward, 0.6x with backward;
# - average pools with stride 3 (0.3-0.9x: PyTorch's NCHW average is no slow walk, and strided
#   column taps are not vectorised);
# - float16 max pools with backward (0.76-1.7x; forward 4.3-10x), float64 max pools with
#   backward (0.9-1.3x; forward 2.0-7.6x) and float64 averages (0.7-2.7x).
_MIN_NUMEL = {  # (op, needs grad) -> the smallest input worth it
    ("max_pool2d", False): 3 << 16,
    ("max_pool2d", True): 1 << 20,
    ("avg_pool2d", False): 1 << 20,
    ("avg_pool2d", True): 3 << 19,
}
_DTYPES = {  # (op, needs grad) -> the dtypes that win
    ("max_pool2d", False): (torch.float32, torch.bfloat16, torch.float16, torch.float64),
    ("max_pool2d", True): (torch.float32, torch.bfloat16),
    ("avg_pool2d", False): (torch.float32, torch.bfloat16, torch.float16),
    ("avg_pool2d", True): (torch.float32, torch.bfloat16, torch.float16),
}


# With the compiled kernel (`gapnet._cpu_kernels`: NCHW-contiguous float32/float64 max pools)
# the per-call cost is one ctypes call, plus an autograd Function with backward. PyTorch wins
# only on small inputs and small planes. One thread (the machine was loaded by other jobs; two
# threads only measured the scheduler), PyTorch us / compiled us: forward (1, 8, 8, 8) k3 s2
# 9.9/35, (1, 16, 16, 16) k2 27/53, (1, 64, 16, 16) k3 s2 159/100, (8, 64, 7, 7) k3 s1 949/494;
# with backward (1, 64, 16, 16) 301/419, (2, 64, 32, 32) 1813/1126, (64, 256, 8, 8) k3 s2
# 14658/11861.
_COMPILED_MIN_NUMEL = {False: 1 << 14, True: 1 << 17}  # needs grad -> the smallest input


def prefers(x4: Tensor, op: str, win: Window2d) -> bool:
    """Whether this module beats PyTorch's own CPU kernel here (the rule for backend="auto").

    Yes for max_pool2d and avg_pool2d on NCHW-contiguous CPU tensors that are large enough, of
    a dtype measured to win, with enough outputs per plane, with or without a gradient; the
    measurements are in the comments above. Max pools that the compiled kernel takes
    (`gapnet._cpu_kernels`) need only be large enough.

    Args:
        x4: the (N, C, H, W) input, as the op will see it (its requires_grad counts).
        op: "max_pool2d" or "avg_pool2d"; anything else gets False.
        win: its windows.
    """
    grad = torch.is_grad_enabled() and x4.requires_grad
    key = (op, grad)
    if key not in _MIN_NUMEL or x4.device.type != "cpu" or x4.dim() != 4:
        return False
    if op == "max_pool2d" and cpu_kernels.takes(x4):
        return x4.numel() >= _COMPILED_MIN_NUMEL[grad]
    if not x4.is_contiguous() or x4.dtype not in _DTYPES[key] or x4.numel() < _MIN_NUMEL[key]:
        return False
    (oh, ow), stride = win.out_size, max(win.stride)
    if op == "avg_pool2d":
        return stride <= 2 and min(oh, ow) >= 4
    if grad:
        return stride <= 2 and min(oh, ow) >= 8 and win.in_size[0] * win.in_size[1] >= 144
    return oh * ow >= 4


# ----------------------------------------------------------------------------- plane means
# aten's mean over H x W of a channels_last tensor is slower than the same sum written as a
# matrix product, (1, H*W) weights times each image's (H*W, C) view, once the input is large.
# float32 forward on the 2-core AMD EPYC, matmul vs aten: (32, 1024, 7, 7) 1.13x,
# (32, 2048, 7, 7) 1.26x, (128, 1280, 7, 7) 1.53x, (32, 2048, 14, 14) 1.73x; smaller inputs
# lose: (8, 2048, 7, 7) 0.97x, (32, 512, 7, 7) 0.85x, (1, 2048, 7, 7) 0.54x. NCHW-contiguous
# inputs lose too (a (N*C, H*W) matrix-vector product: 0.7x).
_MEANS_MIN_NUMEL = 3 << 19  # 6 MiB of float32


def prefers_plane_means(x4: Tensor) -> bool:
    """Whether `plane_means` beats ``x4.mean((2, 3))`` here: a large channels_last float32 CPU
    tensor (the measurements are in the comment above)."""
    return (
        x4.device.type == "cpu"
        and x4.dtype == torch.float32
        and x4.numel() >= _MEANS_MIN_NUMEL
        and is_channels_last(x4)  # by strides: vmap cannot answer is_contiguous(memory_format)
    )


def plane_means(x4: Tensor) -> Tensor:
    """(N, C, H, W) channels_last -> (N, C) means over H x W as one batched matrix product.

    Example:
        >>> x = torch.arange(8.0).reshape(1, 2, 2, 2).to(memory_format=torch.channels_last)
        >>> plane_means(x).tolist()
        [[1.5, 5.5]]
    """
    n, c, h, w = x4.shape
    weights = x4.new_full((1, h * w), 1.0 / (h * w))
    return torch.matmul(weights, x4.permute(0, 2, 3, 1).reshape(n, h * w, c)).view(n, c)
