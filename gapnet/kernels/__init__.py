"""Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1). Importing this package imports Triton."""
