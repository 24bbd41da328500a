"""The Triton kernels as PyTorch ops: custom-op registration, gradients, torch.compile.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), so these run in CI.
"""

import pytest
import torch

import gapnet.functional as GF
from gapnet import _ops, _shapes
from gapnet import nn as gnn

pytestmark = [pytest.mark.triton]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def spaced(*shape: int, seed: int = 0) -> torch.Tensor:
    """Distinct values at least 1e-2 apart: no ties for a finite difference to cross."""
    gen = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    return (torch.randperm(n, generator=gen).reshape(shape) * 1e-2 + 0.5).to(DEVICE)


def geom(op: str, x: torch.Tensor, *args: object) -> list[int]:
    return _shapes.geometry(_shapes.window2d(op, x.shape[-2:], *args))  # type: ignore[arg-type]


def _cases() -> list:
    x = spaced(2, 3, 7, 6).requires_grad_()
    cl = spaced(2, 3, 7, 6, seed=1).contiguous(memory_format=torch.channels_last)
    cl.requires_grad_()
    p = torch.tensor([3.0], device=DEVICE, requires_grad=True)
    w = torch.randn(4, 3, device=DEVICE, requires_grad=True)
    b = torch.randn(4, device=DEVICE, requires_grad=True)
    return [
        # every global kind, NCHW and channels_last; GeM with a learnable p
        *[(_ops._global_pool_op, (t, k, None, 1e-6, True)) for t in (x, cl)
          for k in ("avg", "max", "avgmax", "catavgmax")],
        (_ops._global_pool_op, (x, "gem", p, 1e-6, True)),
        # max pool with and without the saved offsets and indices; "same" windows
        (_ops._max_pool_op, (x, geom("max_pool2d", x, 3, 2, 1), True, True)),
        (_ops._max_pool_op, (cl, geom("max_pool2d", cl, 2, 1, "same"), True, False)),
        # average pool: PyTorch's count, "same", divisor_override
        (_ops._avg_pool_op, (x, geom("avg_pool2d", x, 3, 2, 1), True, None)),
        (_ops._avg_pool_op, (cl, geom("avg_pool2d", cl, 3, 2, "same"), False, None)),
        (_ops._avg_pool_op, (x, geom("avg_pool2d", x, 2), True, 3)),
        # GAP + linear, with and without bias and maps
        (_ops._gap_linear_op, (x, w, b, True)),
        (_ops._gap_linear_op, (cl, w, None, False)),
    ]  # fmt: skip


@pytest.mark.parametrize(("op", "args"), _cases())
def test_custom_op_registration(op: object, args: tuple) -> None:
    """Schema, fake (meta) implementation and autograd registration agree with the kernels."""
    torch.library.opcheck(
        op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor")
    )


CALLS = [  # (name, function of x) through gapnet.functional on the kernels
    ("global avg", lambda x: GF.global_pool2d(x, "avg")),
    ("global catavgmax", lambda x: GF.global_pool2d(x, "catavgmax")),
    ("global gem", lambda x: GF.global_pool2d(x, "gem", p=2.5)),
    ("max k3 s2 p1", lambda x: GF.max_pool2d(x, 3, 2, 1)),
    ("max same", lambda x: GF.max_pool2d(x, 3, 2, "same")),
    ("avg k3 s2 ceil", lambda x: GF.avg_pool2d(x, 3, 2, 1, ceil_mode=True)),
    ("avg same", lambda x: GF.avg_pool2d(x, 3, 2, "same")),
]


FLOAT32_GRADCHECK = pytest.mark.filterwarnings(
    "ignore:Input #0 requires gradient and is not a double"
)


@FLOAT32_GRADCHECK
@pytest.mark.parametrize(("name", "call"), CALLS, ids=[c[0] for c in CALLS])
def test_gradcheck(name: str, call: object) -> None:
    """Finite differences through the kernels (float32: the kernels take no float64)."""
    x = spaced(1, 2, 6, 5).requires_grad_()
    with GF.use_backend("triton"):
        assert torch.autograd.gradcheck(call, (x,), eps=1e-3, atol=1e-2, rtol=1e-2)  # type: ignore[arg-type]


@FLOAT32_GRADCHECK
def test_gem_p_gradcheck() -> None:
    x = spaced(2, 3, 4, 4)
    p = torch.tensor([2.5], device=DEVICE, requires_grad=True)
    with GF.use_backend("triton"):
        assert torch.autograd.gradcheck(
            lambda p: GF.global_pool2d(x, "gem", p=p), (p,), eps=1e-3, atol=1e-2, rtol=1e-2
        )


class _Net(torch.nn.Module):
    """conv -> max pool -> avg pool -> GAP+linear, catavgmax and GeM heads summed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.pool = gnn.MaxPool2d(3, 2, 1)
        self.avg = gnn.AvgPool2d(2)
        self.gem = gnn.GeM(p=3.0)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.avg(self.pool(torch.relu(self.conv(x))))  # (N, 8, 3, 3)
        logits = GF.gap_linear(f, self.fc.weight, self.fc.bias)
        return logits + GF.global_pool2d(f, "catavgmax")[:, :5] + self.fc(self.gem(f))


def test_torch_compile_matches_eager_without_graph_breaks() -> None:
    torch.manual_seed(0)
    net = _Net().to(DEVICE)
    x = torch.randn(2, 3, 12, 12, device=DEVICE)
    with GF.use_backend("triton"):
        eager = net(x)
        eager.sum().backward()
        eager_grads = [p.grad.clone() for p in net.parameters()]  # type: ignore[union-attr]
        net.zero_grad()
        compiled = torch.compile(net, fullgraph=True)(x)  # fullgraph: a break is an error
        compiled.sum().backward()
    torch.testing.assert_close(compiled, eager)
    for p, g in zip(net.parameters(), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_torch_compile_with_dynamic_shapes(backend: str) -> None:
    """Symbolic H and W flow through the argument checks (the window cache skips them) and the
    fake implementations: one compiled net serves two input sizes."""
    torch.manual_seed(0)
    net = _Net().to(DEVICE)
    compiled = torch.compile(net, dynamic=True, fullgraph=True)
    with GF.use_backend(backend):
        for size in (12, 16):
            x = torch.randn(2, 3, size, size, device=DEVICE)
            torch.testing.assert_close(compiled(x), net(x))


def test_backward_is_bitwise_deterministic() -> None:
    x = spaced(2, 4, 9, 9).requires_grad_()
    grads = []
    with GF.use_backend("triton"):
        for _ in range(2):
            (GF.max_pool2d(x, 3, 2, 1).sum() + GF.global_pool2d(x, "gem").sum()).backward()
            grads.append(x.grad.clone())  # type: ignore[union-attr]
            x.grad = None
    assert torch.equal(grads[0], grads[1])
