"""Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1): the submodules import Triton, this
file only torch (so `gapnet._ops` can read what the kernels take without importing Triton)."""

import torch

# What the kernels take (they accumulate in float32; float64 stays on PyTorch).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
