"""Test set-up: Triton kernels run on the CPU interpreter when no GPU is present; fixtures
shared by the test modules."""

import os
import zlib
from collections.abc import Iterator

import numpy as np
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


@pytest.fixture(scope="session")
def tiny_gap_run(tmp_path_factory: pytest.TempPathFactory) -> object:
    """The folder of a gap checkpoint of convnet-tiny trained 1 epoch on 200 mnist-5k images
    (seconds), shared by the export, serve and browser tests, which only read it."""
    from gapnet.train import TrainConfig, train  # after TRITON_INTERPRET is set above

    out = tmp_path_factory.mktemp("tiny-run") / "gap"
    cfg = TrainConfig(data="mnist-5k", model="convnet-tiny", head="gap", epochs=1,
                      train_size=200, threads=1, out_dir=str(out))  # fmt: skip
    train(cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module of tiny tensors, where PyTorch's thread pool costs far
    more than it saves (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def test_id_seed(request: pytest.FixtureRequest) -> int:
    """A seed from the test's id: fresh inputs per test, the same on every run."""
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture
def rng(test_id_seed: int) -> np.random.Generator:
    """A NumPy generator seeded by the test's id."""
    return np.random.default_rng(test_id_seed)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_cuda)
