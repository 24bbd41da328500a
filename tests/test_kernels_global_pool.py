"""Triton global pooling kernels against float64 references, forward and backward.

On CPU these run under TRITON_INTERPRET=1 (set by conftest.py) on small shapes; with a GPU the
same tests run on CUDA, plus a few real-sized shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from hypothesis import given, settings
from hypothesis import strategies as st

from gapnet import reference
from gapnet.kernels import global_pool as gp

pytestmark = [pytest.mark.triton]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (rtol, atol) of a kernel's result against float64 on the same (rounded) input: one rounding
# of the output, plus float32 accumulation and exp/log for gem.
TOL = {
    torch.float32: (2e-5, 1e-6),
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (1e-2, 1e-3),
}
EPS = 1e-6

# Shapes (N, C, H, W) every kind, dtype and layout is checked on.
SHAPES = [
    (2, 5, 7, 7),  # a ResNet head's 7x7 plane: HW = 49, not a power of two
    (3, 37, 5, 3),  # odd, non-square plane; C = 37 fits no block evenly
    (2, 150, 2, 7),  # channels_last: two channel blocks, the second one partial
    (4, 9, 1, 1),  # 1x1 plane: pooling is the identity
    (1, 3, 48, 48),  # N = 1; HW = 2304 is longer than one tile: the kernels loop over chunks
    (1, 300, 3, 3),  # NCHW: C spread over several plane blocks with a partial last one
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, seed, channels_last=False) -> torch.Tensor:
    x = torch.randn(shape, generator=_gen(seed), dtype=torch.float64).to(DEVICE, dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _reference(x: torch.Tensor, kind: str, p: float, grad: torch.Tensor):
    """float64 forward, argmax, grad_x and grad_p of x (N, C, H, W) for upstream `grad`.

    The NumPy spec (`gapnet.reference`) on float64 copies; for real-sized shapes on a GPU, where
    NumPy would take minutes, PyTorch's float64 autograd. The argmax is always PyTorch's own.
    """
    x64, g64 = x.double(), grad.double()
    idx = F.adaptive_max_pool2d(x64, 1, return_indices=True)[1].flatten(1).cpu()
    if x.numel() <= 100_000:
        xn = x64.cpu().numpy()
        y = torch.from_numpy(reference.global_pool2d(xn, kind, p=p, eps=EPS))
        back = reference.global_pool2d_backward(g64.cpu().numpy(), xn, kind, p=p, eps=EPS)
        gx, gp_ = back if kind == "gem" else (back, None)
        gx = torch.from_numpy(gx)
        return y, idx, gx, None if gp_ is None else torch.tensor(gp_, dtype=torch.float64)
    x64 = x64.detach().requires_grad_(True)
    p64 = torch.tensor(p, dtype=torch.float64, device=x.device, requires_grad=True)
    avg = x64.mean((2, 3))
    mx = F.adaptive_max_pool2d(x64, 1).flatten(1)
    y = {
        "avg": lambda: avg,
        "max": lambda: mx,
        "avgmax": lambda: 0.5 * (avg + mx),
        "catavgmax": lambda: torch.cat([avg, mx], 1),
        "gem": lambda: x64.clamp(min=EPS).pow(p64).mean((2, 3)).pow(1.0 / p64),
    }[kind]()
    gx, gp_ = torch.autograd.grad(y, (x64, p64), g64, allow_unused=True)
    return y.detach().cpu(), idx, gx.cpu(), None if gp_ is None else gp_.cpu()


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def _close_sums(actual, expected, abs_terms, dtype) -> None:
    """For sums of products of rounded operands: the error scales with the sum of |terms|."""
    rtol, atol = TOL[dtype]
    err = (actual.double() - expected.double()).abs()
    assert bool((err <= rtol * abs_terms.double() + atol).all()), float(err.max())


def check_global_pool(x: torch.Tensor, kind: str, p: float = 3.0, seed: int = 0) -> None:
    """Forward and backward of one kind on x against float64 PyTorch, with poisoned outputs."""
    n, c = x.shape[:2]
    out_c = 2 * c if kind == "catavgmax" else c
    p_t = torch.tensor([p], dtype=torch.float32, device=x.device)
    y_out = torch.full((n, out_c), float("nan"), dtype=x.dtype, device=x.device)
    y, saved = gp.global_pool_forward(x, kind, p_t, EPS, True, out=y_out)
    assert y.data_ptr() == y_out.data_ptr()
    grad = torch.randn((n, out_c), generator=_gen(seed + 1), dtype=torch.float64).to(x.device)
    grad = grad.to(x.dtype)
    ref_y, ref_idx, ref_gx, ref_gp = _reference(x, kind, p, grad)
    _close(y.cpu(), ref_y, x.dtype)
    if kind in ("max", "avgmax", "catavgmax"):
        assert saved is not None and saved.dtype == torch.int32 and saved.shape == (n, c)
        assert torch.equal(saved.long().cpu(), ref_idx)
    gx_out = torch.full_like(x, float("nan"))  # keeps x's strides
    gx, gp_ = gp.global_pool_backward(grad, x, kind, p_t, EPS, y, saved, True, out=gx_out)
    assert gx.data_ptr() == gx_out.data_ptr()
    assert gx.dtype == x.dtype and gx.stride() == x.stride()
    _close(gx.cpu(), ref_gx, x.dtype)
    if kind == "gem":
        assert gp_ is not None and gp_.dtype == torch.float32 and gp_.shape == p_t.shape
        scale = float(ref_gp.abs()) + 1e-3 * n * c
        torch.testing.assert_close(
            gp_.double().squeeze().cpu(), ref_gp, rtol=2e-3, atol=2e-3 * scale
        )
    else:
        assert gp_ is None


# (shape, dtype) rows: every shape in float32, the 16-bit types on the two odd planes (the
# interpreter is slow: each extra row costs seconds on CPU).
CASES = [(shape, torch.float32) for shape in SHAPES] + [
    (SHAPES[i], dtype) for i in (0, 1) for dtype in (torch.float16, torch.bfloat16)
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(
    ("shape", "dtype"),
    CASES,
    ids=["x".join(map(str, s)) + "-" + str(d)[6:] for s, d in CASES],
)
def test_every_kind(shape, dtype, channels_last):
    x = _randn(shape, dtype, seed=sum(shape), channels_last=channels_last)
    for kind in gp.KINDS:
        check_global_pool(x, kind)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("kind", gp.KINDS)
def test_defaults_and_determinism(kind, channels_last):
    # Without `out=` the launchers allocate (grad_x with x's strides); without need_saved they
    # save nothing; a second backward run is bitwise equal to the first.
    x = _randn((2, 37, 5, 3), torch.bfloat16, seed=4, channels_last=channels_last)
    p_t = torch.tensor([2.5], device=DEVICE)
    y, saved = gp.global_pool_forward(x, kind, p_t, EPS, True)
    y2, saved2 = gp.global_pool_forward(x, kind, p_t, EPS, False)
    assert saved2 is None and torch.equal(y2, y)
    assert (saved is None) == (kind == "avg")
    grad = _randn(y.shape, torch.bfloat16, seed=5)
    gx, gp1 = gp.global_pool_backward(grad, x, kind, p_t, EPS, y, saved, True)
    gx2, gp2 = gp.global_pool_backward(grad, x, kind, p_t, EPS, y, saved, kind == "gem")
    assert gx.stride() == x.stride() and gx.dtype == x.dtype
    assert torch.equal(gx, gx2)
    if kind == "gem":
        assert gp1 is not None and gp2 is not None and torch.equal(gp1, gp2)
    gx3, gp3 = gp.global_pool_backward(grad, x, kind, p_t, EPS, y, saved, False)
    assert gp3 is None and torch.equal(gx3, gx)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_repeated_launches_take_new_arguments(channels_last):
    # Repeated launches of one configuration reuse the compiled kernel directly on a GPU: each
    # must still read its own input and write its own output.
    for seed in range(3):
        x = _randn((2, 20, 3, 5), torch.float32, seed, channels_last)
        y, saved = gp.global_pool_forward(x, "catavgmax", None, EPS, True)
        ref = torch.cat([x.double().mean((2, 3)), x.double().amax((2, 3))], 1)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
        grad = _randn(y.shape, torch.float32, seed + 10)
        gx, _ = gp.global_pool_backward(grad, x, "catavgmax", None, EPS, y, saved, False)
        _, _, ref_gx, _ = _reference(x, "catavgmax", 3.0, grad)
        _close(gx.cpu(), ref_gx, torch.float32)


@pytest.mark.parametrize("p", [1.0, 1.5, 4.0])
def test_gem_other_p_and_values_below_eps(p):
    # about a third of the values are clamped to eps: no gradient flows to them
    x = _randn((2, 6, 4, 5), torch.float32, seed=3).abs()
    x[:, :2] -= 0.5
    check_global_pool(x, "gem", p=p)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_empty_batch(channels_last):
    x = _randn((0, 4, 3, 3), torch.float32, 0, channels_last)
    for kind in gp.KINDS:
        y, saved = gp.global_pool_forward(x, kind, torch.ones(1, device=DEVICE), EPS, True)
        assert y.shape == (0, 8 if kind == "catavgmax" else 4)
        gx, _ = gp.global_pool_backward(
            y, x, kind, torch.ones(1, device=DEVICE), EPS, y, saved, True
        )
        assert gx.shape == x.shape


# Planes (H, W) with planted maxima, ties and NaNs; each is checked in both layouts. A 48x48
# plane is longer than one chunk, so positions 100 and 2100 fall in different loop steps and
# lane 52 (2100 % 2048) comes before lane 100: the kernel must still keep the first tie.
TIE_CASES = [
    ((5, 7), {3: 9.0, 20: 9.0}, 3, False),  # tie: the first max wins
    ((48, 48), {100: 9.0, 2100: 9.0}, 100, False),  # tie across chunks and lanes
    ((5, 7), {3: "nan", 20: "nan", 10: 9.0}, 20, True),  # NaN: output NaN, index the last NaN
    ((48, 48), {2100: "nan", 100: "nan"}, 2100, True),  # last NaN, in an earlier lane
    ((48, 48), {1500: "nan", 2200: 9.0}, 1500, True),  # a later larger value does not win
    ((3, 3), {i: "-inf" for i in range(9)}, 0, False),  # all -inf: the first element
    ((4, 4), {i: 2.0 for i in range(16)}, 0, False),  # constant plane
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(("hw", "plant", "index", "is_nan"), TIE_CASES)
def test_max_ties_and_nan(hw, plant, index, is_nan, channels_last):
    x = _randn((2, 3, *hw), torch.float32, seed=7).clamp(-3, 3)  # (N, C, H, W)
    flat = x.view(2, 3, -1)
    for pos, value in plant.items():
        flat[1, 2, pos] = float(value)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    for kind in ("max", "avgmax", "catavgmax"):
        y, saved = gp.global_pool_forward(x, kind, None, EPS, True)
        assert saved is not None and int(saved[1, 2]) == index
        c = 5 if kind == "catavgmax" else 2  # the max of (n=1, c=2)
        assert bool(torch.isnan(y[1, c])) == is_nan
        ref_y, ref_idx, _, _ = _reference(x, kind, 3.0, torch.ones_like(y))
        torch.testing.assert_close(y.double().cpu(), ref_y, rtol=1e-6, atol=1e-6, equal_nan=True)
        assert torch.equal(saved.long().cpu(), ref_idx)
        grad = torch.ones_like(y)
        gx, _ = gp.global_pool_backward(grad, x, kind, None, EPS, y, saved, False)
        g_max = 1.0 if kind in ("max", "catavgmax") else 0.5
        g_avg = {"max": 0.0, "avgmax": 0.5, "catavgmax": 1.0}[kind] / (hw[0] * hw[1])
        plane = gx[1, 2].reshape(-1).double()
        expected = torch.full_like(plane, g_avg)
        expected[index] += g_max
        torch.testing.assert_close(plane, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_gap_linear(dtype, channels_last, bias):
    n, c, k, h, w = 3, 40, 7, 5, 3
    x = _randn((n, c, h, w), dtype, seed=11, channels_last=channels_last)
    weight = _randn((k, c), dtype, seed=12)
    b = _randn((k,), dtype, seed=13) if bias else None
    logits, pooled, maps = gp.gap_linear_forward(x, weight, b, True)
    x64 = x.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    b64 = b.double().requires_grad_(True) if b is not None else None
    ref_pooled = x64.mean((2, 3))
    ref = F.linear(ref_pooled, w64, b64)
    assert logits.dtype == dtype and pooled.dtype == torch.float32 and maps is not None
    torch.testing.assert_close(pooled.double(), ref_pooled.detach(), rtol=1e-5, atol=1e-6)
    abs_logits = ref_pooled.detach().abs() @ w64.detach().abs().t() + 1  # (N, K)
    _close_sums(logits, ref.detach(), abs_logits, dtype)
    # class activation maps: (N, K, H, W), their mean is the logit without its bias
    assert maps.shape == (n, k, h, w)
    ref_maps = torch.einsum("kc,nchw->nkhw", w64, x64).detach()
    abs_maps = torch.einsum("kc,nchw->nkhw", w64.abs(), x64.abs()).detach()
    _close_sums(maps, ref_maps, abs_maps, dtype)
    no_bias = logits.double() - (b.double() if b is not None else 0.0)
    _close_sums(maps.double().mean((2, 3)), no_bias, abs_logits, dtype)

    grad = _randn((n, k), dtype, seed=14)
    refs = torch.autograd.grad(ref, [x64, w64] + ([b64] if b64 is not None else []), grad.double())
    gx_out = torch.full_like(x, float("nan"))
    gx, gw, gb = gp.gap_linear_backward(grad, x, weight, pooled, True, True, bias, out=gx_out)
    assert gx is not None and gx.data_ptr() == gx_out.data_ptr() and gx.stride() == x.stride()
    abs_gx = (grad.double().abs() @ w64.detach().abs())[:, :, None, None] / (h * w)
    _close_sums(gx, refs[0], abs_gx.expand_as(x), dtype)
    assert gw is not None and gw.dtype == weight.dtype
    _close_sums(gw, refs[1], grad.double().abs().t() @ ref_pooled.detach().abs(), dtype)
    if bias:
        assert gb is not None
        _close_sums(gb, refs[2], grad.double().abs().sum(0), dtype)
    else:
        assert gb is None
    assert gp.gap_linear_forward(x, weight, b, False)[2] is None
    assert gp.gap_linear_backward(grad, x, weight, pooled, False, False, False) == (None,) * 3


def test_rejects_bad_input():
    x = _randn((1, 2, 3, 3), torch.float32, 0)
    with pytest.raises(ValueError, match="kind"):
        gp.global_pool_forward(x, "median", None, EPS, False)
    with pytest.raises(ValueError, match="p"):
        gp.global_pool_forward(x, "gem", None, EPS, False)
    with pytest.raises(TypeError, match="float64"):
        gp.global_pool_forward(x.double(), "avg", None, EPS, False)


def test_strided_view_is_read_correctly():
    # planes that are not flat (a cropped view): the launcher copies, the results stay right
    x = _randn((2, 4, 6, 8), torch.float32, seed=5)[:, :, 1:5, 2:7]
    p_t = torch.tensor([3.0], device=DEVICE)
    for kind in gp.KINDS:
        y, _ = gp.global_pool_forward(x, kind, p_t, EPS, False)
        y_ref, _ = gp.global_pool_forward(x.contiguous(), kind, p_t, EPS, False)
        assert torch.equal(y, y_ref)


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 70),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    kind=st.sampled_from(gp.KINDS),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(n, c, h, w, kind, channels_last, seed):
    check_global_pool(_randn((n, c, h, w), torch.float32, seed, channels_last), kind, seed=seed)


# Real network shapes, on a GPU only (too slow for the interpreter).
CUDA_SHAPES = [
    (256, 2048, 7, 7),  # ResNet-50 head
    (128, 512, 14, 14),
    (64, 256, 56, 56),
    (8, 512, 7, 7),  # tiny, launch-bound
]


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_real_shapes_cuda(shape, dtype, channels_last):
    x = _randn(shape, dtype, seed=1, channels_last=channels_last)
    for kind in gp.KINDS:
        check_global_pool(x, kind)
