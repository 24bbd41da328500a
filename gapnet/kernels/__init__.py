"""Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1): the submodules import Triton, this
file only torch (so `gapnet._ops` can read what the kernels take without importing Triton)."""

import torch

# What the kernels take (they accumulate in float32; float64 stays on PyTorch).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def maps_channels_last(x: torch.Tensor) -> bool:
    """Whether gap_linear's class maps of `x` (N, C, H, W) come out channels_last: when C is
    x's unit stride (the kernel and the fake implementation for torch.compile must agree)."""
    return x.stride(1) == 1 and x.shape[2] * x.shape[3] > 1
