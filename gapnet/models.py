"""Image classifiers whose head is global average pooling (GAP) or, for comparison, an FC layer.

A model is a fully convolutional backbone (`ConvNet`, or `NiN` after Lin et al. 2013) and one
of the interchangeable heads in `HEADS`, built by `create_head`. The API follows timm:
``forward_features`` -> (N, C, h, w), ``forward_head(x, pre_logits=...)``,
``reset_classifier``. Every pooled head also gives class activation maps (Zhou et al. 2016)
through ``class_maps``; for "gap" and "gap-fc" the mean of each map is exactly its logit.

A `ModelConfig` describes a model completely and travels with checkpoints as JSON;
``create(name, ...)`` builds the registered ones (`list_models()`).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gapnet.config import Config, option
from gapnet.nn import AvgPool2d, ClassifierHead, GeM, GlobalPool2d, MaxPool2d

ARCHS = ("convnet", "nin")
NORMS = ("batch", "group", "none")  # the normalization of convnet's conv blocks
FC_HEADS = ("fc", "fc-dropout")
# head name -> GlobalPool2d kind of the ClassifierHead it builds
POOLED_HEADS = {
    "gap-fc": "avg",  # ResNet's head: GAP -> Linear
    "gmp": "max",
    "avgmax": "avgmax",
    "catavgmax": "catavgmax",  # 2C pooled features
    "gem": "gem",  # learnable p
}
HEADS = (*FC_HEADS, "gap", *POOLED_HEADS)


# ----------------------------------------------------------------------------- config


@dataclass
class ModelConfig(Config):
    """Everything needed to rebuild a model; checkpoints carry it as JSON (`to_dict`).

    Example:
        >>> cfg = ModelConfig(head="gap-fc", widths=(8, 16))
        >>> ModelConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    arch: str = option("convnet", choices=ARCHS)  # backbone: "convnet" (conv-BN-ReLU) or "nin"
    num_classes: int = option(10, low=0)  # classifier outputs K; 0 removes the last layer
    in_chans: int = option(1, low=1)  # input channels: 1 for MNIST, 3 for RGB
    head: str = option("gap", choices=HEADS)  # "gap" is NiN's 1x1 conv + GAP, "fc" the baseline
    widths: tuple[int, ...] = option((32, 64, 128), low=1, nonempty=True)  # convnet stages
    depth: int = option(2, low=1)  # convnet: conv3x3-BN-ReLU blocks per stage
    ceil_mode: bool = False  # convnet: pools keep an odd last row/column (no pixel is dropped)
    norm: str = option("batch", choices=NORMS)  # convnet: batch, group (8 per group), or none
    levels: int = option(1, low=1)  # scale space: backbone also on the input /2, /4, ..; max
    input_size: int = option(28, low=1)  # H = W the fc heads are sized for (others: any size)
    fc_hidden: int = option(512, low=0)  # hidden units of the fc heads; 0: a single Linear
    drop_rate: float = option(0.5, low=0, below=1)  # dropout of "fc-dropout" and of NiN
    gem_p: float = option(3.0, above=0)  # initial exponent of the "gem" head (learnable)


# ----------------------------------------------------------------------------- backbones


class ConvBnAct(nn.Sequential):
    """conv kxk (same padding) -> normalization -> ReLU.

    Args:
        in_chs, out_chs, kernel_size: of the conv.
        norm: "batch" (BatchNorm, the default), "group" (GroupNorm, 8 channels per group, or
            one group when fewer), or "none" (the conv gets a bias instead). BatchNorm at eval
            time applies the statistics of the training batches, which change with the input's
            scale (docs/research_any_size.md); GroupNorm and no norm compute the same function
            in training and at eval.

    Shape:
        (N, in_chs, H, W) -> (N, out_chs, H, W).
    """

    def __init__(
        self, in_chs: int, out_chs: int, kernel_size: int = 3, norm: str = "batch"
    ) -> None:
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        conv = nn.Conv2d(
            in_chs, out_chs, kernel_size, padding=kernel_size // 2, bias=norm == "none"
        )
        layers: OrderedDict[str, nn.Module] = OrderedDict(conv=conv)
        if norm == "batch":
            layers["bn"] = nn.BatchNorm2d(out_chs)
        elif norm == "group":
            layers["gn"] = nn.GroupNorm(max(1, out_chs // 8), out_chs)
        else:  # no norm to rescale the signal: He init keeps its variance through deep stacks
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)  # type: ignore[arg-type]  # bias=True above
        layers["act"] = nn.ReLU(inplace=True)
        super().__init__(layers)


class Backbone(nn.Sequential):
    """A fully convolutional feature extractor: (N, in_chans, H, W) -> (N, num_features, h, w)."""

    num_features: int  # channels C of the feature map
    min_input_size: int  # smallest H (and W) that leaves a non-empty feature map

    def feature_size(self, size: int) -> int:
        """The feature map's h for an input of height `size` (the same rule maps W to w)."""
        raise NotImplementedError


class ConvNet(Backbone):
    """Stages of `depth` conv3x3-BN-ReLU blocks, a 2x2 max pool before every stage but the first.

    Args:
        in_chans: input channels.
        widths: channels of each stage.
        depth: blocks per stage.
        norm: the blocks' normalization (`ConvBnAct`).
        ceil_mode: the pools' ceil_mode. Off, a pool drops an odd last row and column, and many
            stages on a small input drop much of it (28 px through four pools keeps 16 rows:
            28 -> 14 -> 7 -> 3 -> 1); on, every pixel reaches the output, and any H, W >= 1 works.

    Shape:
        (N, in_chans, H, W) -> (N, widths[-1], H // 2^(S-1), W // 2^(S-1)) for S stages; any
        H, W >= 2^(S-1). With ceil_mode, each pool rounds up instead.

    Example:
        >>> ConvNet(1, (8, 16, 32), depth=1)(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 32, 7, 7])
        >>> net = ConvNet(1, (8, 16, 32, 32, 32), depth=1, ceil_mode=True)
        >>> net(torch.randn(2, 1, 28, 20)).shape, net.feature_size(28)
        (torch.Size([2, 32, 2, 2]), 2)
    """

    def __init__(
        self,
        in_chans: int,
        widths: tuple[int, ...],
        depth: int,
        ceil_mode: bool = False,
        norm: str = "batch",
    ) -> None:
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        prev = in_chans
        for i, width in enumerate(widths):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            if i > 0:
                layers["pool"] = MaxPool2d(2, ceil_mode=ceil_mode)  # H -> H // 2 (ceil: rounded up)
            for j in range(depth):
                layers[f"block{j}"] = ConvBnAct(prev, width, norm=norm)
                prev = width
            stages[f"stage{i}"] = nn.Sequential(layers)
        super().__init__(stages)
        self.num_features = widths[-1]
        self.num_pools = len(widths) - 1
        self.ceil_mode = ceil_mode
        self.min_input_size = 1 if ceil_mode else 2**self.num_pools

    def feature_size(self, size: int) -> int:
        if self.ceil_mode:
            return -(-size // 2**self.num_pools)  # ceil at every pool == ceil of the whole
        return size // 2**self.num_pools


class NiN(Backbone):
    """Network in Network's three mlpconv blocks (Lin et al. 2013), without the last 1x1 conv.

    Each mlpconv is a kxk conv and two 1x1 convs ("cccp", a per-pixel MLP), each followed by
    BatchNorm and ReLU (the original has no BN; modern variants add it, which trains faster and
    holds up in bf16). Pools use Caffe's ceil rounding, as the original: 32 -> 16 -> 8. The
    original's last 1x1 conv to the classes and its GAP are the model's "gap" head.

    Args:
        in_chans: input channels (3 for CIFAR).
        drop_rate: dropout after the first two blocks (0.5 in the paper).

    Shape:
        (N, in_chans, H, W) -> (N, 192, h, w), h = ceil((ceil((H - 3) / 2) + 1 - 3) / 2) + 1
        (8 for 32); any H, W >= 6.

    Example:
        >>> NiN(3).eval()(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 192, 8, 8])
    """

    def __init__(self, in_chans: int = 3, drop_rate: float = 0.5) -> None:
        super().__init__(
            OrderedDict(
                mlpconv1=_mlpconv(in_chans, 192, 5, 160, 96),  # (N, 96, H, W)
                pool1=MaxPool2d(3, 2, ceil_mode=True),  # (N, 96, H1, W1), H1 = ceil((H-3)/2)+1
                drop1=nn.Dropout(drop_rate),
                mlpconv2=_mlpconv(96, 192, 5, 192, 192),  # (N, 192, H1, W1)
                pool2=AvgPool2d(3, 2, ceil_mode=True),  # (N, 192, H2, W2)
                drop2=nn.Dropout(drop_rate),
                mlpconv3=_mlpconv(192, 192, 3, 192),  # (N, 192, H2, W2)
            )
        )
        self.num_features = 192
        self.min_input_size = 6

    def feature_size(self, size: int) -> int:
        for _ in range(2):
            size = -(-(size - 3) // 2) + 1  # 3x3 window, stride 2, ceil_mode
        return size


def _mlpconv(in_chs: int, width: int, kernel_size: int, *cccp: int) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict(conv=ConvBnAct(in_chs, width, kernel_size))
    for i, out_chs in enumerate(cccp):
        layers[f"cccp{i + 1}"] = ConvBnAct(width, out_chs, 1)
        width = out_chs
    return nn.Sequential(layers)


def stroke_width(x: Tensor) -> Tensor:
    """Each image's mean stroke width in pixels: twice its ink over the length of its edges.

    A stroke of width w and length L holds w * L of ink and has two edges of length L; the
    edge length is the summed gradient magnitude, which counts an antialiased edge (a ramp
    from 0 to 1 over a few pixels) as one. Meant for strokes brighter than a background of 0
    (digits, drawings); a blank image gives 0.

    Shape:
        (N, C, H, W) -> (N,).

    Example:
        >>> x = torch.zeros(1, 1, 80, 80)
        >>> x[..., 10:70, 30:34] = 1.0  # a bar 4 px wide (its two ends count as edges too)
        >>> round(stroke_width(x).item(), 1)
        3.8
    """
    x = x.float().sum(1, keepdim=True)  # (N, 1, H, W): the channels' ink together
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]  # (N, 1, H-1, W-1)
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    edges = (dx.square() + dy.square()).sqrt().sum((1, 2, 3))  # (N,)
    return 2 * x.sum((1, 2, 3)) / edges.clamp_min(1e-6)


class ScaleSpace(Backbone):
    """One backbone run on the input and on `levels` - 1 halvings of it, max over the levels.

    A locally scale-invariant network (Kanazawa et al. 2014, "SI-ConvNet"): level k sees the
    input average-pooled by 2^k (box filter, ceil mode: no pixel dropped), the same weights
    make its feature map, that map is brought back to level 0's grid (nearest), and the output
    at each location is the largest response over the levels. A digit drawn 4x larger than the
    training digits reaches level 2 at the training scale, so the features that recognise it
    are the ones training made, in one forward pass. The cost is 1 + 1/4 + 1/16 + ... of
    level 0.

    The max needs every level it takes to be one training has shown: a level at which the
    input is *larger* than any training image (strokes 10 px wide where training had at most
    5) makes features no training image made, and they win the max as readily as true ones
    (a thick 1 seen as the outline of a 0). So training records the widest strokes level 0
    has seen (`stroke_width`, the median of each batch, the largest over batches: the buffer
    `widest_stroke`), and at eval each image leaves out the levels at which its strokes are
    still wider than that: the first level kept is the first k with width / 2^k <=
    widest_stroke. From there the image sees `levels` levels, as every training image did from
    level 0 (a digit, then ever coarser blobs): so eval runs `extra_levels` more halvings than
    training, and an image whose strokes are up to 2^extra_levels times the widest in training
    is seen as a training digit was (with `levels` halvings alone, a digit drawn at 500 px kept
    only the coarsest level and scored about 55 % instead of 98 %). Before any training
    (widest_stroke 0) the first level is 0. In training every level is kept and each BatchNorm
    normalizes all levels with their pooled statistics (`joint_levels`), the one normalization
    eval's running statistics can reproduce.

    Args:
        backbone: the shared feature extractor (ceil-mode pools, so any level size works).
        levels: number of scales an image is seen at, 1 (just the backbone) or more.

    Shape:
        (N, C_in, H, W) -> (N, C, h, w), h and w those of `backbone` on the input itself.

    Example:
        >>> net = ScaleSpace(ConvNet(1, (8, 16), depth=1, ceil_mode=True, norm="none"), 3)
        >>> net(torch.randn(2, 1, 28, 20)).shape
        torch.Size([2, 16, 14, 10])
    """

    net: Backbone
    widest_stroke: Tensor

    def __init__(self, backbone: Backbone, levels: int) -> None:
        super().__init__(OrderedDict(net=backbone))
        self.levels = levels
        self.num_features = backbone.num_features
        # the coarsest level, ceil(H / 2^(levels-1)), must reach the backbone's minimum
        self.min_input_size = (backbone.min_input_size - 1) * 2 ** (levels - 1) + 1
        # eval's further halvings, where a backbone takes any size (halving 1 px keeps 1 px)
        self.extra_levels = EXTRA_LEVELS if levels > 1 and backbone.min_input_size == 1 else 0
        self.halve = AvgPool2d(2, ceil_mode=True)  # H -> ceil(H / 2)
        self.register_buffer("widest_stroke", torch.zeros(()))  # px; 0: not trained yet

    def feature_size(self, size: int) -> int:
        return self.net.feature_size(size)  # level 0's grid is the output's

    def first_level(self, x: Tensor) -> Tensor:
        """(N,) the finest level each image keeps: the first at which its strokes are no wider
        than `widest_stroke` (0 for every image before training), at most the coarsest level
        eval runs."""
        limit = torch.where(self.widest_stroke > 0, self.widest_stroke, float("inf"))
        coarsest = self.levels + self.extra_levels - 1
        return torch.log2(stroke_width(x) / limit).ceil().clamp(0, coarsest)  # -inf: 0

    def eval_levels(self, first: Tensor) -> int:
        """How many levels eval runs for a batch whose images start at levels `first` (N,): up
        to the last one any of them keeps, so the further halvings cost nothing where no image
        needs them (one 28-px image on 2 CPU threads: 4 ms a forward instead of 8)."""
        if not self.extra_levels or len(first) == 0:
            return self.levels
        return self.levels + min(self.extra_levels, int(first.max()))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                widest = torch.maximum(self.widest_stroke, stroke_width(x).median())
                self.widest_stroke.copy_(widest)
            first, count = None, self.levels  # training takes every level: nothing to mask
        else:
            first = self.first_level(x)  # (N,)
            count = self.eval_levels(first)
            first = first[:, None, None, None]  # (N, 1, 1, 1)
        levels = [x]  # (N, C_in, ceil(H / 2^k), ceil(W / 2^k)) for k = 0, 1, ..
        for _ in range(1, count):
            levels.append(self.halve(levels[-1]))
        maps = self.joint_levels(levels) if first is None else [self.net(t) for t in levels]
        grid, skipped = maps[0].shape[-2:], maps[0].new_tensor(float("-inf"))

        def kept(k: int, level_map: Tensor) -> Tensor:  # -inf where image n leaves out level k
            if first is None:
                return level_map
            return torch.where((first <= k) & (k < first + self.levels), level_map, skipped)

        features = kept(0, maps[0])  # (N, C, h, w): level 0's grid
        for k in range(1, count):
            coarse = F.interpolate(maps[k], size=grid, mode="nearest")
            features = torch.maximum(features, kept(k, coarse))
        return features

    def joint_levels(self, levels: list[Tensor]) -> list[Tensor]:
        """The backbone on every level, layer by layer, each BatchNorm normalizing with the
        statistics of all levels together (and updating its running statistics once).

        Per-level batch statistics would differ from level to level (a 3-px blob at level 4, a
        28-px digit at level 0) while eval has one running average for all of them; pooled
        over the levels, training normalizes as eval does.
        """
        for layer in _layers(self.net):
            if isinstance(layer, nn.BatchNorm2d) and layer.training:
                flat = torch.cat([t.flatten(2) for t in levels], dim=2)  # (N, C, sum h*w)
                joint = layer(flat[..., None])[..., 0]  # BatchNorm2d takes (N, C, L, 1)
                parts = joint.split([t.shape[2] * t.shape[3] for t in levels], dim=2)
                # copies, not views: the ReLU after a BatchNorm works in place
                levels = [p.reshape(t.shape).clone() for p, t in zip(parts, levels, strict=True)]
            else:
                levels = [layer(t) for t in levels]
        return levels


EXTRA_LEVELS = 5  # eval: strokes up to 32x training's widest (a digit of ~1,000 px) still fit


def _layers(module: nn.Module) -> Iterator[nn.Module]:
    """The layers of nested nn.Sequential containers, in the order they run."""
    if isinstance(module, nn.Sequential):
        for child in module:
            yield from _layers(child)
    else:
        yield module


def create_backbone(config: ModelConfig) -> Backbone:
    """The backbone `config.arch` names, in a `ScaleSpace` of `config.levels` when > 1."""
    if config.arch == "nin":
        backbone: Backbone = NiN(config.in_chans, config.drop_rate)
    else:
        backbone = ConvNet(
            config.in_chans, config.widths, config.depth, config.ceil_mode, config.norm
        )
    return ScaleSpace(backbone, config.levels) if config.levels > 1 else backbone


# ----------------------------------------------------------------------------- heads


class FcHead(nn.Module):
    """The classic classifier: flatten -> Linear -> ReLU -> Linear; one input size only.

    Args:
        in_features: channels C of the feature map.
        feat_size: (h, w) of the feature map the head is sized for.
        num_classes: outputs K; 0 drops the last Linear (forward gives the hidden activations).
        hidden: hidden units; 0 makes the head one Linear(C*h*w, K).
        drop_rate: dropout before each Linear (NiN's regulariser for FC heads).
        input_size: input H = W that gives `feat_size`, named in errors.
        kind: "fc" or "fc-dropout", the head's name.

    Shape:
        (N, C, h, w) -> (N, K); ``pre_logits=True`` gives the flattened (N, C*h*w).

    Example:
        >>> head = FcHead(32, (7, 7), 10, hidden=64)
        >>> head(torch.randn(2, 32, 7, 7)).shape, head(torch.randn(2, 32, 7, 7), True).shape
        (torch.Size([2, 10]), torch.Size([2, 1568]))
    """

    has_cam = False  # a fully connected layer mixes every location into every logit
    fixed_input_size = True  # its Linear is sized for one feature map, so for one input size

    def __init__(
        self,
        in_features: int,
        feat_size: tuple[int, int],
        num_classes: int,
        hidden: int = 512,
        drop_rate: float = 0.0,
        *,
        input_size: int | None = None,
        kind: str = "fc",
    ) -> None:
        super().__init__()
        self.kind, self.in_features, self.num_classes = kind, in_features, num_classes
        self.feat_size, self.input_size = tuple(feat_size), input_size
        flat = in_features * feat_size[0] * feat_size[1]
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.hidden = nn.Linear(flat, hidden) if hidden > 0 else None
        self.act = nn.ReLU(inplace=True)
        width = hidden if hidden > 0 else flat
        self.fc = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()

    def check(self, shape: torch.Size, input_shape: torch.Size | None = None) -> None:
        """Raise ValueError unless `shape` is the (N, C, h, w) map this head was built for."""
        expected = (self.in_features, *self.feat_size)
        if len(shape) == 4 and tuple(shape[1:]) == expected:
            return
        c, h, w = expected
        built = f"{c}x{h}x{w} feature maps"
        if self.input_size is not None:
            built += f" (from {self.input_size}x{self.input_size} inputs)"
        got = (
            "a " + "x".join(str(s) for s in shape[1:]) + " feature map"
            if len(shape) == 4
            else f"features of shape {tuple(shape)}"
        )
        if input_shape is not None:
            got += f" (from a {input_shape[-2]}x{input_shape[-1]} input)"
        pooled = ", ".join(k for k in HEADS if k not in FC_HEADS)
        raise ValueError(
            f"{self.kind} head was built for {built}, got {got}; a fully connected "
            f"head takes one input size only: only the global-pooling heads ({pooled}) accept "
            "any size"
        )

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        self.check(x.shape)
        x = x.flatten(1)  # (N, C*h*w), in NCHW order whatever the memory format
        if pre_logits:
            return x
        if self.hidden is not None:
            x = self.act(self.hidden(self.drop(x)))  # (N, hidden)
        return self.fc(self.drop(x))  # (N, K)

    def class_maps(self, x: Tensor) -> Tensor:
        """Always a TypeError: a fully connected head has no per-location class scores."""
        raise TypeError(
            f"{self.kind} head has no class activation maps: a fully connected layer mixes every "
            "location into every logit (it throws away where things are), so there is no "
            "per-location class score; use a global-pooling head such as 'gap' or 'gap-fc'"
        )


class GapHead(nn.Module):
    """NiN's head: a 1x1 conv to one map per class, then global average pooling.

    Each logit is the mean of its class map (bias included), so ``class_maps`` are exact CAMs.

    Args:
        in_features: channels C of the feature map.
        num_classes: classes K; 0 leaves the pooled features.

    Shape:
        (N, C, h, w) -> (N, K) for any h and w; ``pre_logits=True`` gives the pooled (N, C).

    Example:
        >>> head, x = GapHead(32, 10), torch.randn(2, 32, 5, 9)
        >>> torch.allclose(head.class_maps(x).mean((2, 3)), head(x), atol=1e-6)
        True
    """

    has_cam = True  # the 1x1 conv's output per location is the class map
    fixed_input_size = False  # a global pool takes any h and w

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.kind, self.in_features, self.num_classes = "gap", in_features, num_classes
        self.conv = nn.Conv2d(in_features, num_classes, 1) if num_classes > 0 else None
        self.global_pool = GlobalPool2d("avg")

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if pre_logits or self.conv is None:
            return self.global_pool(x)  # (N, C)
        return self.global_pool(self.conv(x))  # (N, K, h, w) -> (N, K)

    def class_maps(self, x: Tensor) -> Tensor:
        """(N, C, h, w) -> (N, K, h, w): the 1x1 conv's output, bias included; mean == logit."""
        if self.conv is None:
            raise ValueError("gap head has num_classes=0: no classifier, so no class maps")
        return self.conv(x)


class PooledHead(ClassifierHead):
    """A global pool -> Linear head (`gapnet.nn.ClassifierHead`) named by its head kind.

    "gap-fc" (ResNet's head) pools by average, so the mean of each class map plus the bias is
    exactly the logit. "gmp", "avgmax", "catavgmax" and "gem" (GeM with a learnable p) are not
    linear in the map, so their class maps show where the evidence is but do NOT average to
    the logits.

    More blank canvas around an object adds only copies of the background and border features.
    A maximum depends on which features occur, not how often, so "gmp" logits do not change at
    all; a mean ("gap", "gap-fc", half of "avgmax") dilutes the object's evidence by its area
    fraction f and drifts to what the head says about blank background; "gem" dilutes it only
    by f^(1/p) (docs/research_any_size.md).

    Args:
        in_features: channels C of the feature map.
        num_classes: classes K; 0 leaves the pooled features.
        kind: "gap-fc", "gmp", "avgmax", "catavgmax" or "gem".
        gem_p: initial p of "gem".

    Shape:
        (N, C, h, w) -> (N, K) for any h and w; ``pre_logits=True`` gives (N, C * feat_mult),
        2C for "catavgmax".

    Example:
        >>> head, x = PooledHead(32, 10, "gap-fc"), torch.randn(2, 32, 6, 6)
        >>> maps = head.class_maps(x)
        >>> torch.allclose(maps.mean((2, 3)) + head.fc.bias, head(x), atol=1e-6)
        True
    """

    has_cam = True  # W·features at each location
    fixed_input_size = False  # a global pool takes any h and w

    def __init__(self, in_features: int, num_classes: int, kind: str, gem_p: float = 3.0) -> None:
        if kind not in POOLED_HEADS:
            raise ValueError(
                f"PooledHead: kind must be one of {', '.join(POOLED_HEADS)}, got {kind!r}"
            )
        super().__init__(in_features, num_classes, pool=POOLED_HEADS[kind])
        self.kind = kind
        if kind == "gem":
            self.global_pool = GeM(p=gem_p, learnable=True)

    def class_maps(self, x: Tensor) -> Tensor:
        """(N, C, h, w) -> (N, K, h, w): W·features at each location, without the bias.

        For "catavgmax" each location stands in for both pooled halves: (W_avg + W_max)·x.
        """
        if not isinstance(self.fc, nn.Linear):
            raise ValueError(f"{self.kind} head has num_classes=0: no classifier, so no class maps")
        weight = self.fc.weight  # (K, C * feat_mult)
        if self.global_pool.feat_mult() == 2:
            weight = weight[:, : self.in_features] + weight[:, self.in_features :]
        return F.conv2d(x, weight[:, :, None, None])  # (N, K, h, w)


Head = FcHead | GapHead | PooledHead


def create_head(
    kind: str,
    in_features: int,
    num_classes: int,
    *,
    feat_size: tuple[int, int] | None = None,
    input_size: int | None = None,
    fc_hidden: int = 512,
    drop_rate: float = 0.5,
    gem_p: float = 3.0,
) -> Head:
    """The one selector of heads: build head `kind` (one of `HEADS`) over C = `in_features`.

    Args:
        kind: head name, one of `HEADS`.
        in_features: channels C of the feature map.
        num_classes: classes K.
        feat_size: (h, w) of the feature map; the fc heads need it.
        input_size: input H = W that gives `feat_size` (fc heads name it in errors).
        fc_hidden: hidden units of the fc heads.
        drop_rate: dropout of "fc-dropout".
        gem_p: initial p of "gem".

    Shape:
        (N, C, h, w) -> (N, K).

    Example:
        >>> [type(create_head(k, 8, 3, feat_size=(2, 2))).__name__ for k in ("fc", "gap", "gem")]
        ['FcHead', 'GapHead', 'PooledHead']
    """
    if kind in FC_HEADS:
        if feat_size is None:
            raise ValueError(f"{kind} head needs feat_size, the (h, w) of the feature map")
        rate = drop_rate if kind == "fc-dropout" else 0.0
        return FcHead(
            in_features, feat_size, num_classes, fc_hidden, rate, input_size=input_size, kind=kind
        )
    if kind == "gap":
        return GapHead(in_features, num_classes)
    if kind in POOLED_HEADS:
        return PooledHead(in_features, num_classes, kind, gem_p)
    raise ValueError(f"head must be one of {', '.join(HEADS)}, got {kind!r}")


# ----------------------------------------------------------------------------- model


class GapNet(nn.Module):
    """A fully convolutional backbone and an interchangeable head, built from a `ModelConfig`.

    Args:
        config: the architecture; kept as ``model.config`` (and updated by `reset_classifier`).

    Shape:
        (N, in_chans, H, W) -> (N, num_classes); any H, W >= ``backbone.min_input_size`` with a
        global-pooling head, only ``config.input_size`` with an fc head.

    Example:
        >>> model = GapNet(ModelConfig(widths=(8, 16), depth=1)).eval()
        >>> model(torch.randn(2, 1, 28, 28)).shape, model(torch.randn(2, 1, 40, 36)).shape
        (torch.Size([2, 10]), torch.Size([2, 10]))
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"GapNet expects a ModelConfig, got {type(config).__name__}")
        self.config = dataclasses.replace(config)  # own copy: reset_classifier updates it
        self.backbone = create_backbone(config)
        self.num_features = self.backbone.num_features
        self.head: Head = self._new_head(config)

    def _new_head(self, config: ModelConfig) -> Head:
        feat_size: tuple[int, int] | None = None
        if config.head in FC_HEADS:
            if config.input_size < self.backbone.min_input_size:
                raise ValueError(
                    f"{config.head} head: input_size must be >= {self.backbone.min_input_size} "
                    f"for this {config.arch} backbone, got {config.input_size}"
                )
            side = self.backbone.feature_size(config.input_size)
            feat_size = (side, side)
        return create_head(
            config.head, self.num_features, config.num_classes, feat_size=feat_size,
            input_size=config.input_size, fc_hidden=config.fc_hidden,
            drop_rate=config.drop_rate, gem_p=config.gem_p,
        )  # fmt: skip

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def has_cam(self) -> bool:
        """Whether the head gives class activation maps (every global-pooling head does)."""
        return self.head.has_cam

    @property
    def input_size(self) -> int | None:
        """The one H = W this model takes (an fc head's), or None: any size from the minimum."""
        return self.config.input_size if self.head.fixed_input_size else None

    def size_problem(self, height: int, width: int | None = None) -> str | None:
        """Why this model cannot take a height x width input, or None if it can.

        Example:
            >>> create("convnet-tiny", head="fc").size_problem(36)
            'fixed 28x28 input'
            >>> create("convnet-tiny", head="gap").size_problem(36, 20) is None
            True
        """
        return size_problem(self.input_size, self.backbone.min_input_size, height, width)

    def _check_input(self, x: Tensor) -> None:
        c = self.config.in_chans
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(
                f"{self.config.arch} expects input (N, {c}, H, W) (in_chans={c}), "
                f"got shape {tuple(x.shape)}"
            )
        low = self.backbone.min_input_size
        if min(x.shape[-2:]) < low:
            raise ValueError(
                f"{self.config.arch} needs inputs of at least {low}x{low}, "
                f"got {x.shape[-2]}x{x.shape[-1]}"
            )

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, in_chans, H, W) -> the feature map (N, C, h, w)."""
        self._check_input(x)
        return self.backbone(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(N, C, h, w) -> logits (N, K), or the head's input features with `pre_logits`."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        features = self.forward_features(x)  # (N, C, h, w)
        if isinstance(self.head, FcHead):  # only it can check: it knows the map it was built for
            self.head.check(features.shape, x.shape)  # names the input size in the error
        return self.forward_head(features)  # (N, K)

    def class_maps(self, x: Tensor) -> Tensor:
        """(N, in_chans, H, W) -> class activation maps (N, K, h, w); see the head's docs."""
        return self.head.class_maps(self.forward_features(x))

    def get_classifier(self) -> Head:
        return self.head

    def reset_classifier(self, num_classes: int, head: str | None = None) -> None:
        """Replace the head with a freshly initialised one, optionally of another kind."""
        config = dataclasses.replace(
            self.config, num_classes=num_classes, head=self.config.head if head is None else head
        )
        new = self._new_head(config)
        ref = next(self.backbone.parameters())
        self.head = new.to(device=ref.device, dtype=ref.dtype)
        self.config = config

    def param_counts(self) -> dict[str, int]:
        """Parameter counts (BatchNorm running statistics are buffers, not counted)."""
        backbone = sum(p.numel() for p in self.backbone.parameters())
        head = sum(p.numel() for p in self.head.parameters())
        return {"backbone": backbone, "head": head, "total": backbone + head}


def size_problem(
    input_size: int | None, min_input_size: int, height: int, width: int | None = None
) -> str | None:
    """The one rule of what input a model takes: its one size (fc heads), else any H, W from
    `min_input_size`. Returns why height x width does not fit, or None.

    Example:
        >>> size_problem(28, 4, 36), size_problem(None, 4, 2, 9), size_problem(None, 4, 40, 9)
        ('fixed 28x28 input', 'needs at least 4x4', None)
    """
    width = height if width is None else width
    if input_size is not None and (height, width) != (input_size, input_size):
        return f"fixed {input_size}x{input_size} input"
    if min(height, width) < min_input_size:
        return f"needs at least {min_input_size}x{min_input_size}"
    return None


# ----------------------------------------------------------------------------- registry

# name -> the ModelConfig fields it sets (the rest keep ModelConfig's defaults)
_MODELS: dict[str, dict[str, Any]] = {
    "convnet": dict(arch="convnet", in_chans=1, widths=(32, 64, 128), depth=2, input_size=28),
    "convnet-tiny": dict(arch="convnet", in_chans=1, widths=(8, 16, 32), depth=1, input_size=28),
    "nin": dict(arch="nin", in_chans=3, input_size=32),
    # the scale-space convnet of the any-size study: levels 1, 1/2, .., 1/16, so a digit of any
    # side from 20 to 640 px is 20-40 px at one of them; ceil-mode pools drop no pixel
    "convnet-scale": dict(
        arch="convnet", in_chans=1, widths=(16, 32, 64), depth=2, ceil_mode=True, levels=5
    ),
}


def list_models() -> list[str]:
    """Names `create` accepts.

    Example:
        >>> list_models()
        ['convnet', 'convnet-tiny', 'nin', 'convnet-scale']
    """
    return list(_MODELS)


def model_config(
    name: str,
    num_classes: int = 10,
    in_chans: int | None = None,
    head: str = "gap",
    **overrides: Any,
) -> ModelConfig:
    """The `ModelConfig` that ``create`` builds, without building it (arguments as `create`)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(_MODELS)}")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; known heads: {', '.join(HEADS)}")
    fields = {**_MODELS[name], "num_classes": num_classes, "head": head, **overrides}
    if in_chans is not None:
        fields["in_chans"] = in_chans
    return ModelConfig.from_dict(fields)


def create(
    name: str,
    num_classes: int = 10,
    in_chans: int | None = None,
    head: str = "gap",
    **overrides: Any,
) -> GapNet:
    """Build registered model `name` with `head`.

    Args:
        name: one of `list_models()`.
        num_classes: classes K.
        in_chans: input channels; None keeps the model's own (1 for convnet, 3 for nin).
        head: one of `HEADS`.
        overrides: any other `ModelConfig` field, e.g. ``input_size=32`` for an fc head
            (default 28 for convnet, 32 for nin) or ``widths=(16, 32)``.

    Example:
        >>> model = create("convnet-tiny", head="fc")
        >>> model.param_counts()["head"], model.config.input_size
        (808458, 28)
    """
    return GapNet(model_config(name, num_classes, in_chans, head, **overrides))


# ----------------------------------------------------------------------------- layer table


class LayerRow(NamedTuple):
    name: str  # dotted module path; "input" for the first row
    type: str  # module class name
    shape: tuple[int, ...]  # output shape of one sample, e.g. (32, 28, 28)
    params: int  # parameters the module itself holds (a module run twice counts once)


def layer_table(model: GapNet, input_size: int | tuple[int, int]) -> list[LayerRow]:
    """Each leaf module's output shape and parameters, from one eval forward on a random input.

    A module that runs more than once (the shared backbone of a `ScaleSpace`, once per level)
    is listed at its first run: level 0, the input's own size.

    Args:
        model: the model; its train/eval mode is restored afterwards.
        input_size: H = W, or (H, W), of the input.

    Example:
        >>> rows = layer_table(create("convnet-tiny"), 28)
        >>> rows[-1], sum(r.params for r in rows) == create("convnet-tiny").param_counts()["total"]
        (LayerRow(name='head.global_pool', type='GlobalPool2d', shape=(10,), params=0), True)
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    ref = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, model.config.in_chans, h, w, generator=generator)
    x = x.to(device=ref.device, dtype=ref.dtype)
    rows = [LayerRow("input", "Tensor", tuple(x.shape[1:]), 0)]
    seen: set[str] = set()

    def hook(name: str) -> Any:
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            if name in seen:
                return
            seen.add(name)
            params = sum(p.numel() for p in module.parameters(False))
            shape = tuple(output.shape[1:]) if isinstance(output, Tensor) else ()
            rows.append(LayerRow(name, type(module).__name__, shape, params))

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if name and (not any(module.children()) or any(module.parameters(False)))
    ]
    try:
        with eval_mode(model):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return rows


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm frozen, no dropout) and no grad; the train flag is restored."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)
