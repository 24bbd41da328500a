"""Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1): the submodules import Triton, this
file only torch (so `gapnet._ops` can read what the kernels take without importing Triton)."""

import torch

from gapnet._shapes import Window2d

# What the kernels take (they accumulate in float32; float64 stays on PyTorch).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def maps_channels_last(x: torch.Tensor) -> bool:
    """Whether gap_linear's class maps of `x` (N, C, H, W) come out channels_last: when C is
    x's unit stride (the kernel and the fake implementation for torch.compile must agree)."""
    return x.stride(1) == 1 and x.shape[2] * x.shape[3] > 1


# ----------------------------------------------------------------------------- shared helpers
# The memory-format and dtype rules that the kernels, the CPU paths (`gapnet._strided`) and the
# fake implementations of the custom ops (`gapnet._ops`) must agree on: here, the lowest module
# that needs them.


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether an (N, C, H, W) tensor is laid out channels_last, by PyTorch's rule for pooling
    outputs: C has the smallest stride, also where it is not 1 (``x[:, ::2]`` of a
    channels_last x). By strides, so that torch.func.vmap can answer it too."""
    if t.dim() != 4 or t.shape[1] < 2:
        return False
    s = t.stride()
    return s[1] < s[3] and s[1] < s[2]


def empty(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, channels_last: bool
) -> torch.Tensor:
    """An uninitialised tensor, channels_last where asked and 4-d."""
    fmt = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)


def empty_like_format(x4: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An output in the input's memory format (channels_last in, channels_last out)."""
    return empty(shape, dtype, x4.device, is_channels_last(x4))


def offsets_dtype(win: Window2d) -> torch.dtype:
    """The smallest integer dtype that holds a window's tap number ``a*kw + b``."""
    taps = win.kernel[0] * win.kernel[1]
    if taps <= 256:
        return torch.uint8
    return torch.int16 if taps <= 32767 else torch.int32


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums of float16/bfloat16 accumulate in float32 (DESIGN.md: precision)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
