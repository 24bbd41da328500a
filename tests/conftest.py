"""Test set-up: Triton kernels run on the CPU interpreter when no GPU is present."""

import os

import pytest

# Must be set before Triton is first imported: without a GPU, every kernel runs interpreted
# (slow, so kernel tests use small shapes), which is how CI checks them.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_cuda)
