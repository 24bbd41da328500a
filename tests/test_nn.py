"""gapnet.nn: each module against its gapnet.functional call, GlobalPool2d's options, GeM's
learnable p, ClassifierHead (shapes, pre_logits, 1x1-conv form, reset, dropout), reprs and
state_dicts."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from gapnet import functional as GF
from gapnet import reference as ref
from gapnet.nn import (
    AdaptiveAvgPool2d,
    AvgPool2d,
    ClassifierHead,
    GeM,
    GlobalAvgPool2d,
    GlobalMaxPool2d,
    GlobalPool2d,
    MaxPool2d,
)

KINDS = ("avg", "max", "avgmax", "catavgmax", "gem")

SHAPES = {  # an input of each layout: N = 2, C = 3, H = 7, W = 6
    "NCHW": (2, 3, 7, 6),
    "NHWC": (2, 7, 6, 3),
    "CHW": (3, 7, 6),
    "HWC": (7, 6, 3),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors (conftest.py)


@pytest.fixture
def gen(test_id_seed: int) -> torch.Generator:
    """A torch generator seeded by the test's id (see conftest.py)."""
    return torch.Generator().manual_seed(test_id_seed)


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- module == function

MODULE_CALLS = [  # (module factory, the functional call it must equal, input layout)
    # ResNet's stem pool
    pytest.param(lambda: MaxPool2d(3, 2, 1), lambda x: GF.max_pool2d(x, 3, 2, 1), "NCHW", id="max"),
    # Keras "same" with dilation, channels last, with indices
    pytest.param(
        lambda: MaxPool2d(2, 1, "same", 2, layout="NHWC", return_indices=True),
        lambda x: GF.max_pool2d(x, 2, 1, "same", 2, layout="NHWC", return_indices=True),
        "NHWC",
        id="max-same-nhwc-indices",
    ),
    # ceil_mode on an unbatched image
    pytest.param(
        lambda: MaxPool2d((2, 3), ceil_mode=True, layout="CHW"),
        lambda x: GF.max_pool2d(x, (2, 3), ceil_mode=True, layout="CHW"),
        "CHW",
        id="max-ceil-chw",
    ),
    # padding not counted, ceil_mode
    pytest.param(
        lambda: AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
        lambda x: GF.avg_pool2d(x, 3, 2, 1, True, False),
        "NCHW",
        id="avg",
    ),
    # Keras "same", channels last
    pytest.param(
        lambda: AvgPool2d(3, 2, "same", layout="NHWC"),
        lambda x: GF.avg_pool2d(x, 3, 2, "same", layout="NHWC"),
        "NHWC",
        id="avg-same-nhwc",
    ),
    # a negative divisor_override on an unbatched channels-last image
    pytest.param(
        lambda: AvgPool2d(2, divisor_override=-3, layout="HWC"),
        lambda x: GF.avg_pool2d(x, 2, divisor_override=-3, layout="HWC"),
        "HWC",
        id="avg-divisor-hwc",
    ),
    # overlapping adaptive bins; None keeps W
    pytest.param(
        lambda: AdaptiveAvgPool2d((4, None)),
        lambda x: GF.adaptive_avg_pool2d(x, (4, None)),
        "NCHW",
        id="adaptive",
    ),
    # unbatched, channels last
    pytest.param(
        lambda: AdaptiveAvgPool2d(2, layout="HWC"),
        lambda x: GF.adaptive_avg_pool2d(x, 2, layout="HWC"),
        "HWC",
        id="adaptive-hwc",
    ),
    # every kind of the selector
    *[
        pytest.param(
            lambda kind=kind: GlobalPool2d(kind),
            lambda x, kind=kind: GF.global_pool2d(x, kind),
            "NCHW",
            id=f"global-{kind}",
        )
        for kind in KINDS
    ],
    # catavgmax keeping dims, channels last
    pytest.param(
        lambda: GlobalPool2d("catavgmax", layout="NHWC", keepdim=True),
        lambda x: GF.global_pool2d(x, "catavgmax", layout="NHWC", keepdim=True),
        "NHWC",
        id="global-catavgmax-nhwc-keepdim",
    ),
    # GeM with its own p and eps, unbatched
    pytest.param(
        lambda: GlobalPool2d("gem", layout="CHW", p=2.5, eps=0.2),
        lambda x: GF.global_pool2d(x, "gem", layout="CHW", p=2.5, eps=0.2),
        "CHW",
        id="global-gem-chw",
    ),
    # the GAP and GMP shorthands
    pytest.param(
        lambda: GlobalAvgPool2d(layout="HWC"),
        lambda x: GF.global_avg_pool2d(x, layout="HWC"),
        "HWC",
        id="gap-hwc",
    ),
    pytest.param(
        lambda: GlobalMaxPool2d(keepdim=True),
        lambda x: GF.global_max_pool2d(x, keepdim=True),
        "NCHW",
        id="gmp-keepdim",
    ),
    # learnable p: a (1,) parameter, the same values as the float
    pytest.param(lambda: GeM(p=2.0), lambda x: GF.global_pool2d(x, "gem", p=2.0), "NCHW", id="gem"),
    # a fixed p, channels last, keeping dims
    pytest.param(
        lambda: GeM(p=4.0, learnable=False, eps=0.1, layout="NHWC", keepdim=True),
        lambda x: GF.global_pool2d(x, "gem", layout="NHWC", keepdim=True, p=4.0, eps=0.1),
        "NHWC",
        id="gem-fixed-nhwc",
    ),
]


def _outputs(out: Any) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize(("make", "call", "layout"), MODULE_CALLS)
def test_module_matches_functional(
    make: Callable[[], nn.Module],
    call: Callable[[torch.Tensor], Any],
    layout: str,
    gen: torch.Generator,
) -> None:
    x = randn(gen, *SHAPES[layout]).requires_grad_(True)
    x_f = x.detach().clone().requires_grad_(True)
    module = make().double()
    out, expected = _outputs(module(x)), _outputs(call(x_f))
    assert len(out) == len(expected)
    for a, b in zip(out, expected, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    g = randn(gen, *out[0].shape)
    (out[0] * g).sum().backward()
    (expected[0] * g).sum().backward()
    assert x.grad is not None and x_f.grad is not None
    torch.testing.assert_close(x.grad, x_f.grad, rtol=1e-12, atol=1e-12)


def test_max_pool_keeps_channels_last(gen: torch.Generator) -> None:
    x = randn(gen, 2, 3, 8, 8).to(memory_format=torch.channels_last)
    y = nn.Sequential(MaxPool2d(2), AvgPool2d(3, 1, 1))(x)
    assert y.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- GlobalPool2d


@pytest.mark.parametrize("kind", KINDS)
def test_feat_mult(kind: str, gen: torch.Generator) -> None:
    pool = GlobalPool2d(kind)
    assert pool.feat_mult() == (2 if kind == "catavgmax" else 1)
    assert pool(randn(gen, 2, 5, 4, 3)).shape == (2, 5 * pool.feat_mult())


@pytest.mark.parametrize(
    ("kwargs", "layout", "shape"),
    [
        # the default flattens: (N, C)
        ({}, "NCHW", (2, 3)),
        ({"keepdim": True}, "NCHW", (2, 3, 1, 1)),
        # keepdim keeps H and W where the layout has them
        ({"keepdim": True}, "NHWC", (2, 1, 1, 3)),
        ({"keepdim": True}, "CHW", (3, 1, 1)),
        ({"keepdim": True}, "HWC", (1, 1, 3)),
        # timm's spelling: flatten is not keepdim
        ({"flatten": True}, "NCHW", (2, 3)),
        ({"flatten": False, "keepdim": True}, "NCHW", (2, 3, 1, 1)),
        ({"flatten": True, "keepdim": False}, "NHWC", (2, 3)),
        # catavgmax doubles C
        ({"kind": "catavgmax", "keepdim": True}, "NHWC", (2, 1, 1, 6)),
    ],
)
def test_global_pool_keepdim_and_flatten(
    kwargs: dict, layout: str, shape: tuple, gen: torch.Generator
) -> None:
    pool = GlobalPool2d(layout=layout, **kwargs)
    assert pool(randn(gen, *SHAPES[layout])).shape == shape


@pytest.mark.parametrize(("flatten", "keepdim"), [(True, True), (False, False)])
def test_flatten_contradicting_keepdim_raises(flatten: bool, keepdim: bool) -> None:
    with pytest.raises(ValueError, match=f"flatten={flatten} contradicts keepdim={keepdim}"):
        GlobalPool2d("avg", flatten=flatten, keepdim=keepdim)


def test_flatten_false_alone_keeps_dims(gen: torch.Generator) -> None:
    pool = GlobalPool2d("avg", flatten=False)
    assert pool(randn(gen, 2, 3, 4, 4)).shape == (2, 3, 1, 1)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        pytest.param(lambda: GlobalPool2d("median"), ValueError,
                     "kind must be one of .* got 'median'", id="kind"),
        pytest.param(lambda: GlobalPool2d("gem", p=0.0), ValueError,
                     "p must be > 0, got 0.0", id="p"),
        pytest.param(lambda: GeM(p=-1.0), ValueError, "p must be > 0, got -1.0", id="gem-p"),
        pytest.param(lambda: GeM(eps=0.0), ValueError, "eps must be > 0, got 0.0", id="gem-eps"),
        pytest.param(lambda: ClassifierHead(8, 4, use_conv=True, layout="NHWC"), ValueError,
                     "use_conv needs layout 'NCHW', got 'NHWC'", id="head-conv-nhwc"),
        pytest.param(lambda: ClassifierHead(8, 4, pool="sum"), ValueError,
                     "kind must be one of .* got 'sum'", id="head-pool"),
    ],
)  # fmt: skip
def test_bad_arguments_raise(make: Callable[[], nn.Module], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_bad_layout_raises_at_call(gen: torch.Generator) -> None:
    with pytest.raises(ValueError, match=r"layout must be one of .* got 'WHC'"):
        GlobalAvgPool2d(layout="WHC")(randn(gen, 4, 4, 3))
    with pytest.raises(ValueError, match="layout='NCHW' expects a 4-d"):
        MaxPool2d(2)(randn(gen, 3, 4, 4))


# ----------------------------------------------------------------------------- GeM


def test_gem_p_is_a_learnable_parameter_with_the_reference_gradient(gen: torch.Generator) -> None:
    gem = GeM(p=2.5, eps=1e-6).double()
    assert [name for name, _ in gem.named_parameters()] == ["p"]
    assert isinstance(gem.p, nn.Parameter) and gem.p.requires_grad and gem.p.shape == (1,)
    x = randn(gen, 2, 3, 5, 4).abs().requires_grad_(True)
    y = gem(x)
    g = randn(gen, *y.shape)
    (y * g).sum().backward()
    grad_x, grad_p = ref.global_pool2d_backward(
        g.numpy(), x.detach().numpy(), "gem", p=2.5, eps=1e-6
    )
    assert gem.p.grad is not None
    np.testing.assert_allclose(gem.p.grad.item(), grad_p, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), grad_x, rtol=1e-10, atol=1e-12)  # type: ignore[union-attr]


def test_gem_p_trains(gen: torch.Generator) -> None:
    gem = GeM(p=3.0)
    x = randn(gen, 4, 3, 5, 5, dtype=torch.float32).abs()
    target = GF.global_pool2d(x, "gem", p=5.0)
    opt = torch.optim.SGD(gem.parameters(), lr=5.0)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = (gem(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert gem.p.item() > 3.0 and losses[-1] < losses[0]


def test_gem_not_learnable_has_no_parameters(gen: torch.Generator) -> None:
    gem = GeM(p=3.0, learnable=False)
    assert list(gem.parameters()) == [] and gem.state_dict() == {}
    assert isinstance(gem.p, float) and gem.p == 3.0
    x = randn(gen, 2, 3, 4, 4)
    torch.testing.assert_close(gem(x), GF.global_pool2d(x, "gem", p=3.0))


def test_gem_state_dict_round_trip(gen: torch.Generator) -> None:
    gem = GeM(p=3.0).double()
    with torch.no_grad():
        gem.p.fill_(4.25)
    state = gem.state_dict()
    assert list(state) == ["p"]
    other = GeM(p=1.0).double()
    other.load_state_dict(state)
    assert other.p.item() == 4.25 and isinstance(other.p, nn.Parameter)
    x = randn(gen, 2, 3, 4, 4)
    torch.testing.assert_close(other(x), gem(x), rtol=0, atol=0)
    torch.testing.assert_close(copy.deepcopy(gem)(x), gem(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gem_keeps_a_low_precision_input_dtype(dtype: torch.dtype, gen: torch.Generator) -> None:
    assert GeM()(randn(gen, 2, 3, 4, 4, dtype=dtype).abs()).dtype == dtype


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(GlobalAvgPool2d, id="gap"),
        pytest.param(GlobalMaxPool2d, id="gmp"),
        *[pytest.param(lambda k=k: GlobalPool2d(k), id=k) for k in KINDS],
        pytest.param(lambda: GlobalPool2d("gem", learnable_p=False), id="gem-fixed"),
        pytest.param(lambda: GeM(learnable=False), id="GeM-fixed"),
        pytest.param(lambda: ClassifierHead(64, 0, "avg"), id="head-no-classifier"),
        pytest.param(lambda: MaxPool2d(2), id="max"),
        pytest.param(lambda: AvgPool2d(2), id="avg"),
        pytest.param(lambda: AdaptiveAvgPool2d(1), id="adaptive"),
    ],
)
def test_pools_have_no_parameters(make: Callable[[], nn.Module]) -> None:
    assert n_params(make()) == 0


def test_gap_head_costs_only_the_classifier() -> None:
    # A GAP head is C*K + K parameters, whatever H and W; an FC head on a 7x7 map is 49x more.
    head = ClassifierHead(512, 10, "avg")
    assert n_params(head) == 512 * 10 + 10
    assert n_params(ClassifierHead(512, 10, "catavgmax")) == 2 * 512 * 10 + 10


# ----------------------------------------------------------------------------- ClassifierHead


@pytest.mark.parametrize("use_conv", [False, True])
@pytest.mark.parametrize("pool", KINDS)
def test_head_shapes(pool: str, use_conv: bool, gen: torch.Generator) -> None:
    head = ClassifierHead(8, 5, pool, use_conv=use_conv).double()
    mult = 2 if pool == "catavgmax" else 1
    for hw in ((7, 7), (3, 5), (1, 1)):  # any input size
        x = randn(gen, 2, 8, *hw).abs()
        assert head(x).shape == (2, 5)
        features = head(x, pre_logits=True)
        assert features.shape == (2, 8 * mult)
        torch.testing.assert_close(features, GF.global_pool2d(x, pool))


@pytest.mark.parametrize("pool", KINDS)
def test_head_is_gap_then_linear(pool: str, gen: torch.Generator) -> None:
    head = ClassifierHead(8, 5, pool).double().eval()
    x = randn(gen, 3, 8, 4, 6).abs()
    expected = head.fc(GF.global_pool2d(x, pool))
    torch.testing.assert_close(head(x), expected, rtol=1e-12, atol=1e-12)
    if pool == "avg":  # the fused GAP classifier gives the same logits
        w, b = head.fc.weight, head.fc.bias
        torch.testing.assert_close(head(x), GF.gap_linear(x, w, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pool", KINDS)
def test_conv_head_equals_linear_head(pool: str, gen: torch.Generator) -> None:
    linear = ClassifierHead(8, 5, pool).double().eval()
    conv = ClassifierHead(8, 5, pool, use_conv=True).double().eval()
    assert isinstance(conv.fc, nn.Conv2d) and conv.fc.kernel_size == (1, 1)
    with torch.no_grad():
        conv.fc.weight.copy_(linear.fc.weight[:, :, None, None])
        conv.fc.bias.copy_(linear.fc.bias)
    x = randn(gen, 2, 8, 5, 3).abs()
    torch.testing.assert_close(conv(x), linear(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv(x, pre_logits=True), linear(x, pre_logits=True))


def test_head_in_channels_last_layout(gen: torch.Generator) -> None:
    nchw = ClassifierHead(8, 5, "avgmax").double()
    nhwc = ClassifierHead(8, 5, "avgmax", layout="NHWC").double()
    nhwc.load_state_dict(nchw.state_dict())
    x = randn(gen, 2, 8, 5, 6)
    torch.testing.assert_close(nhwc(x.permute(0, 2, 3, 1)), nchw(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pool", ["avg", "catavgmax"])
def test_head_without_classes_returns_features(pool: str, gen: torch.Generator) -> None:
    head = ClassifierHead(8, 0, pool)
    assert isinstance(head.fc, nn.Identity) and n_params(head) == 0
    x = randn(gen, 2, 8, 3, 3, dtype=torch.float32)
    torch.testing.assert_close(head(x), GF.global_pool2d(x, pool))
    assert head(x).shape == (2, 8 * (2 if pool == "catavgmax" else 1))


def test_reset_replaces_classifier_and_pool(gen: torch.Generator) -> None:
    head = ClassifierHead(8, 5, "avg")
    old_fc, old_pool = head.fc, head.global_pool
    head.reset(7)
    assert head.fc is not old_fc and head.global_pool is old_pool and head.num_classes == 7
    assert isinstance(head.fc, nn.Linear) and (head.fc.in_features, head.fc.out_features) == (8, 7)
    head.reset(3, "catavgmax")
    assert head.global_pool.kind == "catavgmax"
    assert (head.fc.in_features, head.fc.out_features) == (16, 3)
    x = randn(gen, 2, 8, 4, 4, dtype=torch.float32)
    assert head(x).shape == (2, 3) and head(x, pre_logits=True).shape == (2, 16)
    head.reset(0)
    assert isinstance(head.fc, nn.Identity) and head(x).shape == (2, 16)


def test_reset_keeps_a_conv_head_working(gen: torch.Generator) -> None:
    head = ClassifierHead(8, 5, "avg", use_conv=True)
    head.reset(4, "catavgmax")
    assert isinstance(head.fc, nn.Conv2d) and head.fc.in_channels == 16
    assert head(randn(gen, 2, 8, 3, 3, dtype=torch.float32)).shape == (2, 4)


def test_drop_rate(gen: torch.Generator) -> None:
    head = ClassifierHead(64, 5, "avg", drop_rate=0.5).double()
    assert isinstance(head.drop, nn.Dropout) and head.drop.p == 0.5
    x = randn(gen, 4, 64, 3, 3)
    head.eval()
    expected = head.fc(GF.global_avg_pool2d(x))
    torch.testing.assert_close(head(x), expected)
    head.train()
    torch.manual_seed(0)
    assert not torch.allclose(head(x), expected)
    torch.testing.assert_close(head(x, pre_logits=True), GF.global_avg_pool2d(x))  # no dropout
    still = ClassifierHead(64, 5, "avg").double().train()
    torch.testing.assert_close(still(x), still.fc(GF.global_avg_pool2d(x)))


# ----------------------------------------------------------------------------- repr


REPR_CASES = [  # (module, what its repr must contain)
    # every window argument, and a string padding quoted
    (MaxPool2d(3, 2, "same", 2, layout="NHWC"),
     ["kernel_size=3", "stride=2", "padding='same'", "dilation=2", "ceil_mode=False",
      "layout='NHWC'"]),
    # a per-axis kernel and every averaging option
    (AvgPool2d((3, 2), 1, 1, True, False, 5),
     ["kernel_size=(3, 2)", "stride=1", "padding=1", "ceil_mode=True",
      "count_include_pad=False", "divisor_override=5", "layout='NCHW'"]),
    # None kept as given
    (AdaptiveAvgPool2d((7, None), layout="HWC"), ["output_size=(7, None)", "layout='HWC'"]),
    # the kind and keepdim
    (GlobalPool2d("catavgmax", keepdim=True), ["kind='catavgmax'", "keepdim=True"]),
    # GeM's fixed p and eps
    (GlobalPool2d("gem", p=2.5, eps=0.01), ["kind='gem'", "p=2.5", "eps=0.01"]),
    # a learnable p is not a number to print
    (GeM(), ["kind='gem'", "p=learnable", "eps=1e-06"]),
    # the subclasses print as the selector they are
    (GlobalAvgPool2d(layout="NHWC"), ["kind='avg'", "layout='NHWC'", "keepdim=False"]),
    (GlobalMaxPool2d(), ["kind='max'"]),
    # a head shows its pool, dropout and classifier
    (ClassifierHead(8, 5, "avgmax", drop_rate=0.25),
     ["kind='avgmax'", "Dropout(p=0.25", "in_features=8", "out_features=5"]),
    # a conv head pools keeping dims
    (ClassifierHead(8, 5, use_conv=True), ["keepdim=True", "Conv2d(8, 5, kernel_size=(1, 1)"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("module", "expected"),
    REPR_CASES,
    ids=[f"{type(m).__name__}-{i}" for i, (m, _) in enumerate(REPR_CASES)],
)
def test_repr_shows_the_arguments(module: nn.Module, expected: list[str]) -> None:
    text = repr(module)
    for part in expected:
        assert part in text, (part, text)


# ----------------------------------------------------------------------------- composition


def test_modules_in_sequential_train(gen: torch.Generator) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        MaxPool2d(3, 2, "same"),
        AvgPool2d(2, 1, "same"),
        nn.Conv2d(8, 6, 1),
        nn.ReLU(),
        GeM(),
        nn.Linear(6, 4),
    ).double()
    for hw in ((9, 9), (12, 7)):  # any input size
        x = randn(gen, 2, 3, *hw)
        model.zero_grad()
        model(x).pow(2).sum().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_channels_last_stack(gen: torch.Generator) -> None:
    # every module in NHWC: the same result as the NCHW stack on the permuted input
    nchw = nn.Sequential(MaxPool2d(2), AvgPool2d(3, 1, "same"), GlobalPool2d("catavgmax"))
    nhwc = nn.Sequential(
        MaxPool2d(2, layout="NHWC"),
        AvgPool2d(3, 1, "same", layout="NHWC"),
        GlobalPool2d("catavgmax", layout="NHWC"),
    )
    x = randn(gen, 2, 4, 8, 6)
    torch.testing.assert_close(nhwc(x.permute(0, 2, 3, 1)), nchw(x), rtol=1e-12, atol=1e-12)
