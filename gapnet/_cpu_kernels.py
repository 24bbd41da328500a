"""Max pooling of NCHW-contiguous CPU tensors as compiled C (`_cpu_kernels.c`), built on first use.

Why compiled code: PyTorch's CPU max_pool2d walks an NCHW window element by element, and the
strided-view path of `gapnet._strided` is a dozen whole-tensor ops, each a pass over memory
(0.10-0.18 of the copy floor on NCHW max-pool forward). Written as a loop, a window max is one
pass over the input: `_cpu_kernels.c` pools an output row at a time, its unrolled 2x2 / 3x3
windows vectorised by the compiler, on threads that share out rows and planes; its backward
zeroes each plane of the gradient and adds every output's gradient at its index, in order.
Threads: ``torch.get_num_threads()`` of them (so torch.set_num_threads holds), started per call
as POSIX threads rather than an OpenMP team: the caller never waits for a helper the OS has not
scheduled yet (another process on the core), which an OpenMP region's closing join does (one
time slice, measured 2 ms pools taking 8 ms on this loaded 2-core machine).

Why plain C through ctypes, not a torch C++ extension: a C file that includes no torch header
builds in about a second with the system compiler, where an extension takes a minute, wants
ninja and must match torch's C++ ABI; ctypes needs no package, releases the GIL during the
call and works with any torch version. The C sees raw pointers, so the calls here check dtype,
device and contiguity first (`takes`).

Build: on first use, with ``$CC`` (else sysconfig's CC, else ``cc``), ``-O3 -pthread -shared
-fPIC``, into ``$GAPNET_CACHE`` (default ``~/.cache/gapnet``) ``/cpu-<hash>/``, the hash of the
source, the compiler's ``--version`` and the flags. Each build writes a temporary file in that
directory and renames it into place, so threads or processes that build at once never load a
half-written library (and a lock keeps one build per process).

Without a compiler, or when the build or the load fails, gapnet warns once (naming why) and
keeps the strided-view path: the plain install keeps working. ``GAPNET_CPU_KERNELS=0`` turns
the compiled path off (read at each call; a call's backend choice is kept per shape by
`gapnet.functional`, so set it before the first pool).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from gapnet._shapes import Window2d

ENV_SWITCH = "GAPNET_CPU_KERNELS"  # "0": never use the compiled kernels
ENV_CACHE = "GAPNET_CACHE"  # where builds go (default ~/.cache/gapnet)
DTYPES = (torch.float32, torch.float64)  # float16/bfloat16 stay on the strided-view path

_SOURCE = Path(__file__).with_name("_cpu_kernels.c")
# No -march=native: the cache key would then have to name the CPU, and the measured gain of
# AVX2 over SSE2 here was nil (the kernel is bound by memory and by its compares).
_FLAGS = ("-O3", "-std=c99", "-pthread", "-shared", "-fPIC")
_ABI = 1  # gapnet_abi() of the source this module was written against
# each is int f(pointer, pointer, pointer, const int64_t *geometry, int threads)
_SYMBOLS = (
    "gapnet_max_pool2d_f32",
    "gapnet_max_pool2d_f64",
    "gapnet_max_pool2d_backward_f32",
    "gapnet_max_pool2d_backward_f64",
)


@dataclass
class _State:
    """The one library of this process: loaded, or why not (None: not tried yet)."""

    lib: ctypes.CDLL | None = None
    failure: str | None = None
    tried: bool = False


_state = _State()
_lock = threading.Lock()


def enabled() -> bool:
    """Whether the environment allows the compiled kernels (``GAPNET_CPU_KERNELS`` not "0")."""
    return os.environ.get(ENV_SWITCH, "1").strip() != "0"


def available() -> bool:
    """Whether the compiled kernels run here: enabled, and the library built and loaded (the
    first call builds it; a failure warns once and stays a failure for this process)."""
    if torch.compiler.is_compiling():  # Dynamo traces the backend choice: no build in a trace
        return enabled() and _state.lib is not None
    return enabled() and _library() is not None


def why_unavailable() -> str | None:
    """Why the compiled kernels don't run (None where they do); builds on first call."""
    if not enabled():
        return f"{ENV_SWITCH}=0"
    _library()
    return _state.failure


def takes(t: Tensor) -> bool:
    """Whether the kernels can run on `t`: a CPU, NCHW-contiguous float32/float64 tensor (and
    the kernels are available). The same test serves a forward's input and a backward's grad_y.
    """
    return (
        t.device.type == "cpu"
        and t.dim() == 4
        and t.dtype in DTYPES
        and t.is_contiguous()
        and available()
    )


def _geometry(planes: int, win: Window2d) -> ctypes.Array:
    """The 13 int64s the C reads: planes, H, W, OH, OW, kernel, stride, dilation, top/left."""
    (h, w), (oh, ow) = win.in_size, win.out_size
    return (ctypes.c_int64 * 13)(
        planes, h, w, oh, ow, *win.kernel, *win.stride, *win.dilation, *win.pad_before
    )


def _suffix(dtype: torch.dtype) -> str:
    return "f32" if dtype == torch.float32 else "f64"


def max_pool2d(x4: Tensor, win: Window2d, y: Tensor, indices: Tensor | None) -> None:
    """Write the window maxima of x4 into y and, where given, their flat indices into indices.

    PyTorch's rules: ties to the first maximum in row-major window order, a window with NaN
    gives NaN and the index of its last NaN, indices ``h*W + w`` within the plane.

    Args:
        x4: (N, C, H, W) input that `takes` accepts.
        win: its windows (any kernel, stride, dilation, padding; asymmetric too).
        y: (N, C, OH, OW) contiguous output of x4's dtype.
        indices: (N, C, OH, OW) contiguous int64 output, or None for values only.

    Example:
        >>> from gapnet._shapes import window2d
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> y = torch.empty(1, 1, 2, 2)
        >>> if available():
        ...     max_pool2d(x, window2d("max_pool2d", (4, 4), 2), y, None)
        ...     print(y.flatten().tolist())
        ... else:
        ...     print([5.0, 7.0, 13.0, 15.0])
        [5.0, 7.0, 13.0, 15.0]
    """
    _check(x4, y, indices, win)
    lib = _library()
    assert lib is not None  # callers asked `takes` first
    fn = getattr(lib, f"gapnet_max_pool2d_{_suffix(x4.dtype)}")
    planes = x4.shape[0] * x4.shape[1]
    if planes == 0:
        return
    ptr = None if indices is None else indices.data_ptr()
    rc = fn(x4.data_ptr(), y.data_ptr(), ptr, _geometry(planes, win), torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"max_pool2d: the compiled CPU kernel could not allocate (code {rc})")


def max_pool2d_backward(gy: Tensor, indices: Tensor, win: Window2d, gx: Tensor) -> None:
    """grad_x of max_pool2d into gx: zeros, plus each output's gradient at its index, the
    outputs of a plane in order (deterministic; one thread per plane).

    Args:
        gy: (N, C, OH, OW) gradient that `takes` accepts.
        indices: (N, C, OH, OW) contiguous int64, each within its plane (from `max_pool2d`).
        win: the forward's windows.
        gx: (N, C, H, W) contiguous output of gy's dtype; fully written.
    """
    n, c = gy.shape[:2]
    expect = (n, c, *win.in_size)
    if tuple(gx.shape) != expect or gx.dtype != gy.dtype or not gx.is_contiguous():
        raise ValueError(f"max_pool2d_backward: gx must be {expect} contiguous {gy.dtype}")
    _check_out(indices, gy, torch.int64, "indices")
    lib = _library()
    assert lib is not None
    fn = getattr(lib, f"gapnet_max_pool2d_backward_{_suffix(gy.dtype)}")
    if n * c == 0:
        return
    rc = fn(
        gy.data_ptr(), indices.data_ptr(), gx.data_ptr(), _geometry(n * c, win),
        torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise ValueError("max_pool2d_backward: an index lies outside its plane")


def _check(x4: Tensor, y: Tensor, indices: Tensor | None, win: Window2d) -> None:
    """The C trusts its pointers: every shape, dtype and layout it assumes, checked here."""
    if not (x4.device.type == "cpu" and x4.dtype in DTYPES and x4.is_contiguous()):
        raise ValueError("max_pool2d: the compiled CPU kernel takes NCHW-contiguous float32/64")
    if tuple(x4.shape[2:]) != win.in_size:
        raise ValueError(f"max_pool2d: input {tuple(x4.shape)} does not match {win.in_size}")
    _check_out(y, x4, x4.dtype, "y", win.out_size)
    if indices is not None:
        _check_out(indices, x4, torch.int64, "indices", win.out_size)


def _check_out(
    t: Tensor, like: Tensor, dtype: torch.dtype, name: str, hw: tuple[int, int] | None = None
) -> None:
    expect = (*like.shape[:2], *(like.shape[2:] if hw is None else hw))
    if tuple(t.shape) != expect or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(f"max_pool2d: {name} must be {expect} contiguous {dtype}")


# ----------------------------------------------------------------------------- build and load


def _library() -> ctypes.CDLL | None:
    """The loaded library, building it on the first call; None (warned once) if it can't be."""
    if _state.tried:
        return _state.lib
    with _lock:
        if not _state.tried:
            try:
                _state.lib = _load(_build())
            except _Unavailable as why:
                _state.failure = str(why)
                warnings.warn(
                    f"gapnet: compiled CPU max pooling unavailable ({why}); using the "
                    f"strided-view path (set {ENV_SWITCH}=0 to skip the build)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _state.tried = True
    return _state.lib


class _Unavailable(Exception):
    """Why there is no library: no compiler, a failed build, a failed load."""


def compiler() -> list[str] | None:
    """The C compiler's command: $CC, else sysconfig's CC, else `cc` (None if not found)."""
    for spec in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc"):
        argv = shlex.split(spec) if spec else []
        if argv and shutil.which(argv[0]):
            return argv
        if spec and spec == os.environ.get("CC"):
            return None  # $CC names a compiler that is not there: no guessing past the user
    return None


def cache_dir() -> Path:
    """Where builds go: $GAPNET_CACHE, else $XDG_CACHE_HOME/gapnet, else ~/.cache/gapnet."""
    root = os.environ.get(ENV_CACHE)
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gapnet"


def _build() -> Path:
    """The library for this source, compiler and flags: from the cache, or built into it."""
    cc = compiler()
    if cc is None:
        raise _Unavailable(f"no C compiler found (CC={os.environ.get('CC', '')!r}, cc)")
    try:
        version = subprocess.run(
            [*cc, "--version"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise _Unavailable(f"the C compiler {cc[0]!r} does not run: {error}") from None
    source = _SOURCE.read_bytes()
    parts = [source, version.encode(), " ".join([*cc, *_FLAGS]).encode()]
    key = hashlib.sha256(b"\0".join([*parts, platform.machine().encode()])).hexdigest()[:16]
    target = cache_dir() / f"cpu-{key}" / "_cpu_kernels.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _Unavailable(f"cannot create the cache directory {target.parent}: {error}") from None
    try:
        fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".build-", dir=target.parent)
        os.close(fd)
    except OSError as error:
        raise _Unavailable(f"cannot write to {target.parent}: {error}") from None
    try:
        done = subprocess.run(
            [*cc, *_FLAGS, "-o", tmp, str(_SOURCE)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            last = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
            raise _Unavailable(f"the C build failed: {last[0]}")
        os.chmod(tmp, 0o755)  # mkstemp made it private; the cache may be shared
        os.replace(tmp, target)  # atomic: a reader sees no file or a whole one
        return target
    except (OSError, subprocess.SubprocessError) as error:
        raise _Unavailable(f"the C build failed: {error}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> ctypes.CDLL:
    """Load the library (ctypes.CDLL: the GIL is released during each call) and declare its
    functions' signatures."""
    try:
        lib = ctypes.CDLL(str(path))
        abi = lib.gapnet_abi()
    except (OSError, AttributeError) as error:
        raise _Unavailable(f"the built library does not load: {error}") from None
    if abi != _ABI:
        raise _Unavailable(f"the built library has ABI {abi}, expected {_ABI}")
    ptr, i64p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
    for name in _SYMBOLS:
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ptr, ptr, ptr, i64p, ctypes.c_int]
    return lib
