"""Labelled pooling shapes from real networks, the rows of `bench_ops.py`'s tables.

Each case names where the shape occurs, the op and its arguments. Shapes are NCHW; the
benchmark also runs each in channels_last and in fp32 and bf16.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Case:
    label: str  # where the shape occurs
    op: str  # global_pool2d | gap_linear | max_pool2d | avg_pool2d
    shape: tuple[int, int, int, int]  # (N, C, H, W)
    args: dict[str, Any] = field(default_factory=dict)  # op arguments after the input


GPU_CASES = [
    # ResNet-50's head on a training batch: the GAP every classifier runs (51 MiB fp32)
    Case("resnet50 head", "global_pool2d", (256, 2048, 7, 7), {"kind": "avg"}),
    # the same batch through timm's catavgmax and GeM heads (two statistics, a pow and a log)
    Case("resnet50 head catavgmax", "global_pool2d", (256, 2048, 7, 7), {"kind": "catavgmax"}),
    Case("resnet50 head gem", "global_pool2d", (256, 2048, 7, 7), {"kind": "gem"}),
    # GeM as gapnet.nn.GeM and timm train it: p is a parameter, its gradient computed too
    Case(
        "resnet50 head gem learnable p",
        "global_pool2d",
        (256, 2048, 7, 7),
        {"kind": "gem", "learnable_p": True},
    ),
    # EfficientNet-B0's head, batch 128
    Case("efficientnet-b0 head", "global_pool2d", (128, 1280, 7, 7), {"kind": "avg"}),
    # a GAP on a large early map (ResNet stage 1, 56x56): long planes
    Case("stage-1 map gap", "global_pool2d", (64, 256, 56, 56), {"kind": "avg"}),
    # inference batch of 8 on ResNet-18: launch-bound
    Case("resnet18 head b8", "global_pool2d", (8, 512, 7, 7), {"kind": "avg"}),
    # ResNet-50's pooled classifier fused: GAP + Linear(2048 -> 1000)
    Case("resnet50 gap+fc", "gap_linear", (256, 2048, 7, 7), {"num_classes": 1000}),
    # the ResNet stem's 3x3 stride-2 max pool (392 MiB fp32)
    Case(
        "resnet stem maxpool",
        "max_pool2d",
        (128, 64, 112, 112),
        {"kernel_size": 3, "stride": 2, "padding": 1},
    ),
    # VGG-16's pool4: 2x2 stride 2
    Case("vgg16 pool4", "max_pool2d", (64, 512, 28, 28), {"kernel_size": 2, "stride": 2}),
    # a small late-stage max pool: launch-bound
    Case(
        "small maxpool b8",
        "max_pool2d",
        (8, 64, 56, 56),
        {"kernel_size": 3, "stride": 2, "padding": 1},
    ),
    # DenseNet transition: 2x2 stride-2 average pool
    Case("densenet transition", "avg_pool2d", (64, 256, 56, 56), {"kernel_size": 2, "stride": 2}),
    # Inception branch pool: 3x3 stride 1, padding 1, padded cells not counted
    Case(
        "inception branch avgpool",
        "avg_pool2d",
        (64, 288, 35, 35),
        {"kernel_size": 3, "stride": 1, "padding": 1, "count_include_pad": False},
    ),
    # Keras-style "same" 3x3 stride-2 average pool (asymmetric padding)
    Case(
        "keras same avgpool",
        "avg_pool2d",
        (64, 128, 56, 56),
        {"kernel_size": 3, "stride": 2, "padding": "same"},
    ),
]

# Smaller batches for the CPU table: the same layers at sizes a 2-core machine times quickly.
CPU_CASES = [
    Case("resnet50 head b32", "global_pool2d", (32, 2048, 7, 7), {"kind": "avg"}),
    Case("resnet50 head b32 gem", "global_pool2d", (32, 2048, 7, 7), {"kind": "gem"}),
    Case(
        "resnet50 head b32 gem learnable p",
        "global_pool2d",
        (32, 2048, 7, 7),
        {"kind": "gem", "learnable_p": True},
    ),
    Case(
        "resnet stem maxpool b8",
        "max_pool2d",
        (8, 64, 112, 112),
        {"kernel_size": 3, "stride": 2, "padding": 1},
    ),
    Case("vgg16 pool4 b8", "max_pool2d", (8, 512, 28, 28), {"kernel_size": 2, "stride": 2}),
    Case(
        "small maxpool b8",
        "max_pool2d",
        (8, 64, 56, 56),
        {"kernel_size": 3, "stride": 1, "padding": 1},
    ),
    Case("densenet transition b8", "avg_pool2d", (8, 256, 56, 56), {"kernel_size": 2, "stride": 2}),
    # issue 13's rows: a small 2x2 map (where compile led) and a large-batch GAP
    Case("small 2x2 maxpool b16", "max_pool2d", (16, 96, 30, 30), {"kernel_size": 2, "stride": 2}),
    Case("resnet50 head b64", "global_pool2d", (64, 2048, 7, 7), {"kind": "avg"}),
    # odd sizes and channel counts: no vector-width multiple anywhere
    Case(
        "odd maxpool 3x3 s2",
        "max_pool2d",
        (4, 67, 57, 43),
        {"kernel_size": 3, "stride": 2, "padding": 1},
    ),
    Case("odd maxpool 2x2", "max_pool2d", (8, 37, 31, 29), {"kernel_size": 2, "stride": 2}),
    Case(
        "odd avgpool 3x3 s1",
        "avg_pool2d",
        (8, 45, 27, 33),
        {"kernel_size": 3, "stride": 1, "padding": 1},
    ),
    Case(
        "inception branch avgpool b8",
        "avg_pool2d",
        (8, 288, 35, 35),
        {"kernel_size": 3, "stride": 1, "padding": 1, "count_include_pad": False},
    ),
]
