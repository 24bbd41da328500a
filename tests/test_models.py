"""Tests for gapnet.models: shapes, hand-counted parameters, CAM identities, config, registry."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gapnet import models as M
from gapnet.nn import ClassifierHead

POOLED = [h for h in M.HEADS if h not in M.FC_HEADS]  # heads that take any input size
K = 7  # classes in the shape tests: not 10, so a stray default shows


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: with two or more intra-op threads on a busy machine, thread
    hand-offs cost more than the convolutions (measured: 60 s against 8 s for this file)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def tiny(head: str = "gap", num_classes: int = K, **overrides) -> M.GapNet:
    """convnet-tiny (widths 8, 16, 32; depth 1) in eval mode, with seeded weights."""
    torch.manual_seed(0)
    return M.create("convnet-tiny", num_classes=num_classes, head=head, **overrides).eval()


def conv_params(c_in: int, c_out: int, k: int = 3) -> int:
    """Conv (no bias) + BatchNorm (weight and bias per channel)."""
    return c_in * c_out * k * k + 2 * c_out


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("size", [28, 40, 64])
@pytest.mark.parametrize("head", POOLED)
def test_pooled_heads_take_any_size(head, size):
    model = tiny(head)
    x = randn(2, 1, size, size)
    features = model.forward_features(x)
    assert features.shape == (2, 32, size // 4, size // 4)  # two 2x2 pools
    assert model(x).shape == (2, K)
    assert model.forward_head(features).shape == (2, K)


@pytest.mark.parametrize("head", M.FC_HEADS)
def test_fc_heads_at_their_size(head):
    model = tiny(head)
    x = randn(2, 1, 28, 28)
    assert model(x).shape == (2, K)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 32 * 7 * 7)


@settings(max_examples=15, deadline=None)
@given(h=st.integers(4, 50), w=st.integers(4, 50), n=st.integers(1, 3))
def test_any_input_size_non_square(h, w, n):
    model = tiny("gap")
    x = randn(n, 1, h, w, seed=h * 100 + w)
    assert model.forward_features(x).shape == (n, 32, h // 4, w // 4)
    assert model(x).shape == (n, K)


def _on_blank_canvas(digits: torch.Tensor, size: int) -> torch.Tensor:
    """`digits` at rows 24.., columns 20.. of a blank size x size canvas: the same distance from
    the top and left edges, and the same phase on the 2x2 pooling grid, whatever the size."""
    n, c, h, w = digits.shape
    x = torch.zeros(n, c, size, size)
    x[:, :, 24 : 24 + h, 20 : 20 + w] = digits
    return x


@pytest.mark.parametrize("head", ["gmp", "gap", "gap-fc", "avgmax", "gem"])
def test_more_blank_canvas(head):
    """A max depends on which features occur, not on how often: once the canvas holds every
    border context, more blank canvas only repeats background features, so gmp's logits stay
    the same, while every head that averages drifts toward what it says about blank background
    (docs/research_any_size.md)."""
    model = tiny(head)
    digits = randn(2, 1, 20, 20).abs()  # ink > 0 on a background of exactly 0, as MNIST
    with torch.no_grad():
        logits = [model(_on_blank_canvas(digits, size)) for size in (64, 128, 256)]
    for bigger in logits[1:]:
        if head == "gmp":
            torch.testing.assert_close(bigger, logits[0])
        else:
            assert not torch.allclose(bigger, logits[0])


@pytest.mark.parametrize(
    "head, width",
    [
        ("gap", 32),  # pooled features C, before the 1x1 conv (GAP commutes with it)
        ("gap-fc", 32),
        ("gmp", 32),
        ("avgmax", 32),
        ("catavgmax", 64),  # avg and max concatenated: 2C
        ("gem", 32),
        ("fc", 32 * 7 * 7),  # the flattened map, input of the hidden layer
        ("fc-dropout", 32 * 7 * 7),
    ],
)
def test_pre_logits_width(head, width):
    model = tiny(head)
    features = model.forward_features(randn(3, 1, 28, 28))
    assert model.forward_head(features, pre_logits=True).shape == (3, width)


def test_gap_pre_logits_are_the_pooled_features():
    model = tiny("gap")
    features = model.forward_features(randn(2, 1, 36, 28))
    torch.testing.assert_close(model.forward_head(features, True), features.mean((2, 3)))


# --------------------------------------------------------------------------- fc input size


def test_fc_rejects_wrong_size():
    model = tiny("fc")
    with pytest.raises(ValueError) as err:
        model(randn(2, 1, 40, 40))
    msg = str(err.value)
    for part in ("32x7x7", "28x28", "32x10x10", "40x40", "gap", "any size"):
        assert part in msg, (part, msg)


def test_fc_head_alone_rejects_wrong_map():
    head = tiny("fc-dropout").head
    with pytest.raises(ValueError, match=r"built for 32x7x7 .*28x28.* got a 32x5x5 feature map"):
        head(randn(2, 32, 5, 5))
    with pytest.raises(ValueError, match="got a 16x7x7"):  # wrong channels too
        head(randn(2, 16, 7, 7))


def test_fc_input_size_override():
    model = tiny("fc", input_size=40)
    assert model(randn(2, 1, 40, 40)).shape == (2, K)
    assert model.head.feat_size == (10, 10)
    with pytest.raises(ValueError, match="input_size must be >= 4"):
        tiny("fc", input_size=3)


# --------------------------------------------------------------------------- parameter counts

# the default convnet on 28x28 MNIST: widths (32, 64, 128), depth 2, K = 10, C = 128, 7x7 map
C, HW, HID, NC = 128, 7 * 7, 512, 10
CONVNET_BACKBONE = (
    conv_params(1, 32) + conv_params(32, 32)  # stage 0: 288 + 64, 9216 + 64
    + conv_params(32, 64) + conv_params(64, 64)  # stage 1
    + conv_params(64, 128) + conv_params(128, 128)  # stage 2
)  # fmt: skip
HEAD_PARAMS = {
    "fc": C * HW * HID + HID + HID * NC + NC,  # Linear(6272, 512) + Linear(512, 10)
    "fc-dropout": C * HW * HID + HID + HID * NC + NC,  # dropout has no parameters
    "gap": C * NC + NC,  # 1x1 conv with bias
    "gap-fc": C * NC + NC,  # Linear(C, K)
    "gmp": C * NC + NC,
    "avgmax": C * NC + NC,
    "catavgmax": 2 * C * NC + NC,  # Linear(2C, K)
    "gem": C * NC + NC + 1,  # plus the learnable p
}


def test_convnet_backbone_hand_count():
    assert CONVNET_BACKBONE == 286_880
    assert M.create("convnet").param_counts()["backbone"] == CONVNET_BACKBONE


# (widths, H, W, feature map h x w): ceil_mode pools keep the odd last row and column, so
# every pixel reaches the features and any size >= 1 goes in; the floor pools would need 16 px
# for four pools and keep only rows 0..15 of 28 (28 -> 14 -> 7 -> 3 -> 1).
CEIL_CASES = [
    ((8, 16, 32, 32, 32), 28, 28, 2, 2),  # 28 -> 14 -> 7 -> 4 -> 2
    ((8, 16, 32, 32, 32), 20, 9, 2, 1),  # 20 -> 10 -> 5 -> 3 -> 2; 9 -> 5 -> 3 -> 2 -> 1
    ((8, 16, 32, 32, 32), 1, 1, 1, 1),  # smaller than one window: a single cell
    ((8, 16), 7, 6, 4, 3),
]


# (norm, the layer after each conv, whether the conv has a bias)
NORM_CASES = [
    ("batch", torch.nn.BatchNorm2d, False),  # the default; BN's shift replaces the bias
    ("group", torch.nn.GroupNorm, False),
    ("none", torch.nn.ReLU, True),  # straight to the ReLU, so the conv keeps its bias
]


@pytest.mark.parametrize("norm, after_conv, bias", NORM_CASES)
def test_convnet_norms(norm, after_conv, bias):
    net = tiny(norm=norm)
    blocks = [m for m in net.backbone.modules() if isinstance(m, M.ConvBnAct)]
    assert blocks and all(isinstance(b[1], after_conv) for b in blocks)
    assert all((b.conv.bias is not None) == bias for b in blocks)
    x = randn(2, 1, 28, 28)
    if norm != "batch":  # no running statistics: training and eval compute the same function
        train_out = net.train()(x)
        assert torch.allclose(train_out, net.eval()(x), atol=1e-6)
    with pytest.raises(ValueError, match="norm must be one of batch, group, none"):
        M.ConvBnAct(1, 8, norm="layer")


@pytest.mark.parametrize("widths, h, w, fh, fw", CEIL_CASES)
def test_ceil_mode_backbone_keeps_every_pixel(widths, h, w, fh, fw):
    torch.manual_seed(0)
    net = M.create("convnet-tiny", widths=widths, ceil_mode=True, num_classes=0).eval()
    assert net.backbone.min_input_size == 1
    x = randn(1, 1, h, w)
    features = net.backbone(x)
    assert features.shape[-2:] == (fh, fw)
    assert (net.backbone.feature_size(h), net.backbone.feature_size(w)) == (fh, fw)
    # the bottom-right pixel moves the output (a floor pool would drop it at these sizes)
    y = x.clone()
    y[..., -1, -1] += 10
    assert not torch.equal(net.backbone(y), features)
    assert net(x).shape == (1, net.num_features)


@pytest.mark.parametrize("head", M.HEADS)
def test_head_param_counts(head):
    counts = M.create("convnet", head=head).param_counts()
    assert counts["head"] == HEAD_PARAMS[head]
    assert counts["total"] == CONVNET_BACKBONE + HEAD_PARAMS[head]


def test_fc_without_hidden_layer():
    counts = M.create("convnet", head="fc", fc_hidden=0).param_counts()
    assert counts["head"] == C * HW * NC + NC  # a single Linear(6272, 10)


def test_gap_head_is_over_1000x_smaller_than_fc():
    fc = M.create("convnet", head="fc").param_counts()["head"]
    gap = M.create("convnet", head="gap").param_counts()["head"]
    assert (fc, gap) == (3_216_906, 1_290)
    assert fc / gap >= 1000  # about 2494x


def test_nin_hand_count():
    convs = (
        conv_params(3, 192, 5) + conv_params(192, 160, 1) + conv_params(160, 96, 1)  # mlpconv1
        + conv_params(96, 192, 5) + 2 * conv_params(192, 192, 1)  # mlpconv2
        + conv_params(192, 192, 3) + conv_params(192, 192, 1)  # mlpconv3, less the class conv
    )  # fmt: skip
    counts = M.create("nin").param_counts()
    assert counts == {"backbone": convs, "head": 192 * 10 + 10, "total": convs + 1930}


# --------------------------------------------------------------------------- class maps


@pytest.mark.parametrize("size", [(28, 28), (40, 52)])
@pytest.mark.parametrize("head", ["gap", "gap-fc"])
def test_cam_identity(head, size):
    """The mean of each class map is its logit: exact for GAP heads, by linearity of the mean."""
    model = tiny(head).double()
    x = randn(3, 1, *size, dtype=torch.float64)
    logits, maps = model(x), model.class_maps(x)
    assert maps.shape == (3, K, size[0] // 4, size[1] // 4)
    bias = model.head.fc.bias if head == "gap-fc" else 0.0  # gap's maps include the bias
    torch.testing.assert_close(maps.mean((2, 3)) + bias, logits, rtol=1e-12, atol=1e-12)
    # float32 too, to float tolerance
    model32, x32 = model.float(), x.float()
    bias32 = model32.head.fc.bias if head == "gap-fc" else 0.0
    torch.testing.assert_close(model32.class_maps(x32).mean((2, 3)) + bias32, model32(x32))


@pytest.mark.parametrize("head", ["gmp", "avgmax", "catavgmax", "gem"])
def test_class_maps_of_nonlinear_pools(head):
    """The maps exist (W·features per location) but do not average to the logits."""
    model = tiny(head)
    x = randn(2, 1, 28, 28)
    features = model.forward_features(x)
    maps = model.head.class_maps(features)
    assert maps.shape == (2, K, 7, 7)
    weight = model.head.fc.weight
    if head == "catavgmax":
        weight = weight[:, :32] + weight[:, 32:]
    torch.testing.assert_close(maps, torch.einsum("kc,nchw->nkhw", weight, features))
    assert not torch.allclose(maps.mean((2, 3)) + model.head.fc.bias, model(x), atol=1e-3)


@pytest.mark.parametrize("head", M.FC_HEADS)
def test_fc_heads_have_no_class_maps(head):
    model = tiny(head)
    with pytest.raises(TypeError, match="throws away where things are"):
        model.class_maps(randn(1, 1, 28, 28))


# --------------------------------------------------------------------------- heads and reset


@pytest.mark.parametrize("head", M.HEADS)
def test_head_kind_and_selector(head):
    model = tiny(head)
    assert model.head.kind == head == model.config.head
    assert isinstance(model.head, ClassifierHead) == (head in M.POOLED_HEADS)
    with pytest.raises(ValueError, match="head must be one of fc, fc-dropout, gap"):
        M.create_head("dense", 32, K)


def test_reset_classifier():
    model = tiny("fc")
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.reset_classifier(3, head="catavgmax")
    assert (model.head.kind, model.config.head, model.num_classes) == ("catavgmax", "catavgmax", 3)
    assert model.config.num_classes == 3
    x = randn(2, 1, 44, 36)  # any size now
    assert model(x).shape == (2, 3)
    for k, v in model.backbone.state_dict().items():  # the backbone is untouched
        assert torch.equal(v, backbone[k])
    old = model.head.fc.weight.detach().clone()
    model.reset_classifier(5)  # same kind, fresh weights
    assert model.head.kind == "catavgmax" and model(x).shape == (2, 5)
    assert model.head.fc.weight.shape == (5, 64)
    assert not torch.equal(model.head.fc.weight[:3], old)


def test_reset_classifier_keeps_dtype():
    model = tiny("gap").double()
    model.reset_classifier(4, head="gem")
    assert all(p.dtype == torch.float64 for p in model.head.parameters())
    assert model(randn(1, 1, 28, 28, dtype=torch.float64)).shape == (1, 4)


@pytest.mark.parametrize("head", POOLED)
def test_num_classes_zero_gives_pooled_features(head):
    model = tiny(head, num_classes=0)
    x = randn(2, 1, 28, 28)
    width = 64 if head == "catavgmax" else 32
    assert model(x).shape == (2, width)


@pytest.mark.parametrize("head", M.HEADS)
def test_backward_reaches_every_parameter(head):
    model = tiny(head).train()
    model(randn(4, 1, 28, 28)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


# --------------------------------------------------------------------------- NiN


@pytest.fixture(scope="module")
def nin() -> M.GapNet:
    torch.manual_seed(0)
    return M.create("nin").eval()


def test_nin_forward(nin):
    x = randn(2, 3, 32, 32)
    assert nin.forward_features(x).shape == (2, 192, 8, 8)  # 32 -> 16 -> 8, ceil rounding
    assert nin(x).shape == (2, 10)
    assert nin.head.kind == "gap"
    maps = nin.class_maps(x)
    torch.testing.assert_close(maps.mean((2, 3)), nin(x))


def test_nin_channels_last(nin):
    x = randn(2, 3, 32, 32)
    xc = x.contiguous(memory_format=torch.channels_last)
    features = nin.forward_features(xc)
    assert features.is_contiguous(memory_format=torch.channels_last)  # no hidden copies to NCHW
    torch.testing.assert_close(nin(xc), nin(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [6, 7, 24, 45])
def test_nin_any_size(nin, size):
    assert nin(randn(1, 3, size, size)).shape == (1, 10)
    side = nin.backbone.feature_size(size)
    assert nin.forward_features(randn(1, 3, size, size)).shape == (1, 192, side, side)


def test_nin_training_step_and_fc_head():
    torch.manual_seed(0)
    model = M.create("nin", num_classes=4, head="fc-dropout", fc_hidden=16)
    assert model.head.feat_size == (8, 8)
    loss = torch.nn.functional.cross_entropy(model(randn(2, 3, 32, 32)), torch.tensor([0, 3]))
    loss.backward()
    assert loss.isfinite()


# --------------------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((2, 3, 28, 28), r"\(N, 1, H, W\) \(in_chans=1\), got shape \(2, 3, 28, 28\)"),  # RGB
        ((1, 28, 28), r"in_chans=1\), got shape \(1, 28, 28\)"),  # unbatched
        ((2, 1, 3, 28), "at least 4x4, got 3x28"),  # too small for two 2x2 pools
    ],
)
def test_bad_input(shape, expected):
    with pytest.raises(ValueError, match=expected):
        tiny()(randn(*shape))


# --------------------------------------------------------------------------- config and registry


def test_config_json_roundtrip():
    cfg = M.ModelConfig(arch="convnet", num_classes=3, head="gem", widths=(4, 8), gem_p=2.5)
    text = json.dumps(cfg.to_dict())
    again = M.ModelConfig.from_dict(json.loads(text))
    assert again == cfg and again.widths == (4, 8)
    model = M.GapNet(again)
    assert model.config == cfg and model.config is not cfg


def test_model_config_is_in_the_checkpoint_sense_complete():
    torch.manual_seed(0)
    model = M.create("convnet-tiny", head="catavgmax", num_classes=3).eval()
    twin = M.GapNet(M.ModelConfig.from_dict(json.loads(json.dumps(model.config.to_dict()))))
    twin.load_state_dict(model.state_dict())
    x = randn(2, 1, 28, 28)
    torch.testing.assert_close(twin.eval()(x), model(x))


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown key 'colour'; known keys: arch"):
        M.ModelConfig.from_dict({"arch": "convnet", "colour": "red"})


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"arch": "resnet"}, "arch must be one of 'convnet', 'nin', got 'resnet'"),
        ({"head": "mlp"}, "head must be one of 'fc', 'fc-dropout', 'gap', 'gap-fc'"),
        ({"widths": ()}, "widths must not be empty"),
        ({"widths": (8, 0)}, r"widths must be ints >= 1, got \(8, 0\)"),
        ({"depth": 0}, "depth must be an int >= 1, got 0"),
        ({"num_classes": -1}, "num_classes must be an int >= 0, got -1"),
        ({"in_chans": 2.0}, "in_chans must be an int >= 1, got 2.0"),  # a float is a mistake
        ({"drop_rate": 1.0}, r"drop_rate must be in \[0, 1\), got 1.0"),
        ({"gem_p": 0}, "gem_p must be > 0, got 0"),
    ],
)
def test_config_validation(fields, expected):
    with pytest.raises(ValueError, match=expected):
        M.ModelConfig(**fields)


def test_registry():
    assert M.list_models() == ["convnet", "convnet-tiny", "nin", "convnet-scale"]
    scale = M.create("convnet-scale", head="gem")
    assert isinstance(scale.backbone, M.ScaleSpace) and scale.backbone.levels == 5
    assert scale.backbone.min_input_size == 1  # ceil-mode pools: any size
    convnet = M.create("convnet")
    assert convnet.config.widths == (32, 64, 128) and convnet.config.depth == 2
    assert (convnet.config.in_chans, convnet.num_classes, convnet.head.kind) == (1, 10, "gap")
    assert M.create("nin").config.in_chans == 3  # RGB by default
    rgb = M.create("convnet-tiny", num_classes=5, in_chans=3, head="gmp", widths=(4, 8))
    assert rgb(randn(1, 3, 20, 20)).shape == (1, 5)
    assert M.create("convnet", head="fc").config.input_size == 28


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (
            {"name": "resnet50"},
            "unknown model 'resnet50'; known models: convnet, convnet-tiny, nin, convnet-scale",
        ),
        ({"name": "convnet", "head": "mlp"}, "unknown head 'mlp'; known heads: fc, fc-dropout"),
        ({"name": "convnet", "width": 3}, r"unknown key 'width'"),  # a typo in an override
    ],
)
def test_create_errors(kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        M.create(**kwargs)


def test_gapnet_needs_a_config():
    with pytest.raises(TypeError, match="expects a ModelConfig, got dict"):
        M.GapNet({"arch": "convnet"})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- layer table


@pytest.mark.parametrize("name, head", [("convnet", "fc-dropout"), ("convnet-tiny", "gem"),
                                        ("nin", "gap"), ("convnet-scale", "gem")])  # fmt: skip
def test_layer_table(name, head):
    model = M.create(name, head=head).train()
    size = model.config.input_size
    rows = M.layer_table(model, size)
    assert model.training  # mode restored
    assert rows[0] == ("input", "Tensor", (model.config.in_chans, size, size), 0)
    assert sum(r.params for r in rows) == model.param_counts()["total"]
    assert rows[-1].shape == (10,)
    names = [r.name for r in rows]
    assert len(set(names)) == len(names)  # a module run twice (fc-dropout's dropout, the
    # backbone of a scale space at every level) is listed at its first run


def test_layer_table_shapes():
    scale = {r.name: r for r in M.layer_table(M.create("convnet-scale", head="gem"), 28)}
    assert scale["backbone.net.stage2.block1.act"].shape == (64, 7, 7)  # level 0, not level 4
    rows = {r.name: r for r in M.layer_table(tiny("gap"), (40, 28))}
    assert rows["backbone.stage0.block0.conv"].shape == (8, 40, 28)
    assert rows["backbone.stage2.pool"] == ("backbone.stage2.pool", "MaxPool2d", (16, 10, 7), 0)
    assert rows["head.conv"].shape == (K, 10, 7)
    assert rows["head.global_pool"].shape == (K,)


# --------------------------------------------------------------------------- docs


# ----------------------------------------------------------------------------- scale space

# (widths, ceil_mode, levels, smallest input): the coarsest level ceil(H / 2^(levels-1)) must
# still reach the backbone's own minimum
SCALE_SPACE_MIN_CASES = [
    ((8, 16), True, 5, 1),  # ceil pools take 1 px, and halving 1 px keeps 1 px
    ((8, 16), False, 3, 5),  # floor pools need 2 px: 5 -> 3 -> 2
    ((8, 16, 16), False, 2, 7),  # 4 px: 7 -> 4
    ((8,), False, 4, 1),  # no pool at all
]


@pytest.mark.parametrize("widths, ceil_mode, levels, smallest", SCALE_SPACE_MIN_CASES)
def test_scale_space_smallest_input(widths, ceil_mode, levels, smallest):
    net = tiny(widths=widths, ceil_mode=ceil_mode, levels=levels).eval()
    assert net.backbone.min_input_size == smallest
    # eval halves further only where every size runs (a floor-mode pool would fail at 1 px)
    assert net.backbone.extra_levels == (M.EXTRA_LEVELS if smallest == 1 else 0)
    assert net(randn(1, 1, smallest, smallest + 3)).shape == (1, K)
    if smallest > 1:
        with pytest.raises(ValueError, match=f"at least {smallest}x{smallest}"):
            net(randn(1, 1, smallest - 1, smallest + 3))


def test_scale_space_is_the_max_over_halvings():
    torch.manual_seed(0)
    net = tiny(ceil_mode=True, levels=3, norm="none").eval()
    inner = net.backbone.net
    x = randn(2, 1, 29, 22)
    half = torch.nn.functional.avg_pool2d(x, 2, ceil_mode=True)
    quarter = torch.nn.functional.avg_pool2d(half, 2, ceil_mode=True)
    level0 = inner(x)
    grid = level0.shape[-2:]
    want = torch.stack(
        [level0] + [torch.nn.functional.interpolate(inner(t), size=grid) for t in (half, quarter)]
    ).amax(0)
    assert torch.allclose(net.backbone(x), want, atol=1e-6)
    # the levels share one set of weights: no parameter is added
    assert net.param_counts() == tiny(ceil_mode=True, levels=1, norm="none").param_counts()
    assert net.backbone.feature_size(29) == grid[0]


def test_scale_space_trains_batchnorm_on_all_levels_together():
    # one BatchNorm step over the levels pooled: the running mean moves toward the mean of the
    # conv outputs of every level (weighted by their pixels), once per forward
    torch.manual_seed(0)
    net = M.ScaleSpace(M.ConvNet(1, (4,), depth=1, ceil_mode=True), levels=3).train()
    conv, bn = net.net.stage0.block0.conv, net.net.stage0.block0.bn
    x = randn(5, 1, 12, 9)
    half = torch.nn.functional.avg_pool2d(x, 2, ceil_mode=True)
    quarter = torch.nn.functional.avg_pool2d(half, 2, ceil_mode=True)
    with torch.no_grad():
        outs = [conv(t).flatten(2) for t in (x, half, quarter)]  # (5, 4, h*w) each
    joint_mean = torch.cat(outs, dim=2).mean((0, 2))  # (4,)
    net(x)
    assert int(bn.num_batches_tracked) == 1
    assert torch.allclose(bn.running_mean, bn.momentum * joint_mean, atol=1e-6)
    # one level alone is the backbone itself, in training as at eval
    assert torch.allclose(net.joint_levels([x])[0], net.net(x), atol=1e-6)


def bar(size: int, width: int, length: int) -> torch.Tensor:
    """A vertical bar of ink `width` px wide, `length` px long, centred on a blank image."""
    x = torch.zeros(1, 1, size, size)
    top, left = (size - length) // 2, (size - width) // 2
    x[..., top : top + length, left : left + width] = 1.0
    return x


# (image, its stroke width within 10 %): twice the ink over the edge length
STROKE_CASES = [
    (bar(80, 4, 60), 4 * 60 / (60 + 4)),  # ink 240, edges 2 * (60 + 4): the ends count
    (bar(160, 12, 120), 12 * 120 / (120 + 12)),  # a thick stroke
    (bar(40, 2, 30), 2 * 30 / (30 + 2)),  # a thin one
    (torch.nn.functional.interpolate(bar(40, 2, 30), scale_factor=4.0), 8 * 120 / (120 + 8)),
    (torch.nn.functional.pad(bar(40, 2, 30), (50, 50, 50, 50)), 2 * 30 / (30 + 2)),  # canvas
]


@pytest.mark.parametrize("image, width", STROKE_CASES)
def test_stroke_width(image, width):
    assert M.stroke_width(image).item() == pytest.approx(width, rel=0.1)


def test_stroke_width_of_blank_and_batches():
    x = torch.cat([torch.zeros(1, 1, 30, 30), bar(30, 3, 20), 0.5 * bar(30, 3, 20)])
    w = M.stroke_width(x)
    assert w.shape == (3,) and w[0] == 0  # blank: no ink
    assert w[1] == pytest.approx(w[2])  # fainter ink, the same strokes


def test_scale_space_learns_the_widest_stroke():
    # training records the largest batch-median stroke width; eval leaves it alone
    net = tiny(ceil_mode=True, levels=3)
    assert net.backbone.widest_stroke.item() == 0  # untrained: every level is kept
    thin, thick = bar(40, 2, 30).repeat(3, 1, 1, 1), bar(80, 6, 60).repeat(3, 1, 1, 1)
    net.train()(thick)
    net(thin)
    widest = net.backbone.widest_stroke.item()
    assert widest == pytest.approx(M.stroke_width(thick)[0].item())
    net.eval()(bar(160, 20, 120))
    assert net.backbone.widest_stroke.item() == widest
    assert "backbone.widest_stroke" in net.state_dict()  # saved with the checkpoint


# (stroke width as a multiple of the widest seen in training, the first level kept): 4 levels
# trained, eval runs EXTRA_LEVELS = 5 more
FIRST_LEVEL_CASES = [
    (0.5, 0),  # thinner than training: from level 0
    (1.0, 0),  # as wide as the widest: level 0 still fits
    (1.5, 1),  # level 1 halves it to 0.75
    (4.0, 2),  # exactly 1 at level 2
    (100.0, 7),  # beyond the trained levels: 100 / 2^7 = 0.78, eval's further halvings
    (10_000.0, 8),  # beyond every level: the coarsest eval runs
]


@pytest.mark.parametrize("ratio, first", FIRST_LEVEL_CASES)
def test_scale_space_first_level(ratio, first):
    net = tiny(ceil_mode=True, levels=4).eval()
    x = bar(80, 4, 60)
    net.backbone.widest_stroke.fill_(M.stroke_width(x).item() / ratio)
    assert net.backbone.first_level(x).tolist() == [first]


def test_scale_space_leaves_out_levels_too_fine_for_the_strokes():
    # eval: an image whose strokes are 3x the widest seen in training starts at level 2 and,
    # like every training image, sees 4 levels from there (2-5: eval halves further)
    torch.manual_seed(0)
    net = tiny(ceil_mode=True, levels=4, norm="none").eval()
    inner = net.backbone.net
    x = torch.cat([bar(48, 12, 40), bar(48, 2, 40)])  # (2, 1, 48, 48): thick and thin
    net.backbone.widest_stroke.fill_(M.stroke_width(x[:1]).item() / 3)
    assert net.backbone.first_level(x).tolist() == [2, 0]
    assert net.backbone.extra_levels == M.EXTRA_LEVELS
    # eval runs the levels up to the last any image keeps: 6 for the pair, the trained 4 alone
    assert net.backbone.eval_levels(net.backbone.first_level(x)) == 6
    assert net.backbone.eval_levels(net.backbone.first_level(x[1:])) == 4
    halvings = [x]
    for _ in range(3 + M.EXTRA_LEVELS):
        halvings.append(torch.nn.functional.avg_pool2d(halvings[-1], 2, ceil_mode=True))
    grid = inner(x).shape[-2:]
    levels = torch.stack([torch.nn.functional.interpolate(inner(t), size=grid) for t in halvings])
    got = net.backbone(x)
    assert torch.allclose(got[0], levels[2:6, 0].amax(0), atol=1e-6)  # levels 2-5
    assert torch.allclose(got[1], levels[:4, 1].amax(0), atol=1e-6)  # levels 0-3, as trained
    # training runs the trained levels only, and takes every one of them
    net.train()
    assert torch.allclose(net.backbone(x[:1]), levels[:4, 0].amax(0), atol=1e-6)


def test_scale_space_sees_a_doubled_image_at_its_own_scale():
    # Doubling an image (each pixel 2x2) and halving it back is exact, so level 1 of the doubled
    # image is level 0 of the image: every feature the image makes anywhere still reaches the
    # doubled image's globally max-pooled features (a plain backbone has no such guarantee).
    torch.manual_seed(0)
    net = tiny(ceil_mode=True, levels=2, norm="none", head="gmp", num_classes=0).eval()
    x = randn(3, 1, 28, 28)
    doubled = x.repeat_interleave(2, -2).repeat_interleave(2, -1)  # (3, 1, 56, 56)
    own = net.backbone.net(x).amax((2, 3))  # (3, C): the image's features at its own scale
    assert (net(doubled) >= own - 1e-6).all()
    assert not (net.backbone.net(doubled).amax((2, 3)) >= own - 1e-6).all()
