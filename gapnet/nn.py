"""Pooling modules and the classifier head, thin wrappers over `gapnet.functional`.

As in timm's ``adaptive_avgmax_pool``: the functions do the work, the modules hold arguments,
and `GlobalPool2d` is the one selector every head uses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gapnet import _shapes
from gapnet import functional as GF
from gapnet._shapes import IntPair, Padding


class MaxPool2d(nn.Module):
    """Max pooling over k x k windows; see `gapnet.functional.max_pool2d`.

    Args:
        kernel_size, stride, padding, dilation, ceil_mode: as ``torch.nn.MaxPool2d``;
            `padding` may also be "valid" or "same".
        layout: "NCHW", "NHWC", "CHW" or "HWC".
        return_indices: also return the flat indices of each window's maximum.

    Shape:
        (N, C, H, W) -> (N, C, H_out, W_out), in the input's layout.

    Example:
        >>> MaxPool2d(2)(torch.randn(1, 3, 28, 28)).shape
        torch.Size([1, 3, 14, 14])
    """

    def __init__(
        self,
        kernel_size: IntPair,
        stride: IntPair | None = None,
        padding: Padding = 0,
        dilation: IntPair = 1,
        ceil_mode: bool = False,
        *,
        layout: str = "NCHW",
        return_indices: bool = False,
    ) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.ceil_mode = dilation, ceil_mode
        self.layout, self.return_indices = layout, return_indices

    def forward(self, x: Tensor) -> Any:
        return GF.max_pool2d(
            x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
            layout=self.layout, return_indices=self.return_indices,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding!r}, "
            f"dilation={self.dilation}, ceil_mode={self.ceil_mode}, layout={self.layout!r}"
        )


class AvgPool2d(nn.Module):
    """Average pooling over k x k windows; see `gapnet.functional.avg_pool2d`.

    Args:
        kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override: as
            ``torch.nn.AvgPool2d``; `padding` may also be "valid" or "same".
        layout: "NCHW", "NHWC", "CHW" or "HWC".

    Shape:
        (N, C, H, W) -> (N, C, H_out, W_out), in the input's layout.

    Example:
        >>> AvgPool2d(3, 2, "same", layout="NHWC")(torch.randn(2, 5, 5, 8)).shape
        torch.Size([2, 3, 3, 8])
    """

    def __init__(
        self,
        kernel_size: IntPair,
        stride: IntPair | None = None,
        padding: Padding = 0,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor_override: int | None = None,
        *,
        layout: str = "NCHW",
    ) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.ceil_mode, self.count_include_pad = ceil_mode, count_include_pad
        self.divisor_override, self.layout = divisor_override, layout

    def forward(self, x: Tensor) -> Tensor:
        return GF.avg_pool2d(
            x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
            self.count_include_pad, self.divisor_override, layout=self.layout,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding!r}, "
            f"ceil_mode={self.ceil_mode}, count_include_pad={self.count_include_pad}, "
            f"divisor_override={self.divisor_override}, layout={self.layout!r}"
        )


class AdaptiveAvgPool2d(nn.Module):
    """Average pooling to a fixed output size; see `gapnet.functional.adaptive_avg_pool2d`.

    Args:
        output_size: int or (H_out, W_out); None keeps that input dimension.
        layout: "NCHW", "NHWC", "CHW" or "HWC".

    Shape:
        (N, C, H, W) -> (N, C, H_out, W_out), in the input's layout.

    Example:
        >>> AdaptiveAvgPool2d((2, 3))(torch.randn(1, 4, 9, 10)).shape
        torch.Size([1, 4, 2, 3])
    """

    def __init__(self, output_size: Any, *, layout: str = "NCHW") -> None:
        super().__init__()
        self.output_size, self.layout = output_size, layout

    def forward(self, x: Tensor) -> Tensor:
        return GF.adaptive_avg_pool2d(x, self.output_size, layout=self.layout)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, layout={self.layout!r}"


class GlobalPool2d(nn.Module):
    """Global pooling of each channel's H x W plane, the one selector every head uses.

    Args:
        kind: "avg", "max", "avgmax", "catavgmax" (2C features) or "gem".
        layout: "NCHW", "NHWC", "CHW" or "HWC".
        keepdim: keep H and W as size-1 axes (what a 1x1-conv classifier needs); default False.
        flatten: timm's spelling of ``not keepdim``; give one or the other.
        p: GeM exponent; eps: GeM clamp.
        learnable_p: make `p` a parameter trained with the network (GeM).

    Shape:
        (N, C, H, W) -> (N, C * feat_mult()), or (N, C * feat_mult(), 1, 1) with keepdim.

    Example:
        >>> pool = GlobalPool2d("catavgmax")
        >>> pool(torch.randn(2, 8, 7, 7)).shape, pool.feat_mult()
        (torch.Size([2, 16]), 2)
    """

    def __init__(
        self,
        kind: str = "avg",
        *,
        layout: str = "NCHW",
        keepdim: bool | None = None,
        flatten: bool | None = None,
        p: float = 3.0,
        eps: float = 1e-6,
        learnable_p: bool = False,
    ) -> None:
        super().__init__()
        _shapes.check_kind(kind, "GlobalPool2d")
        if kind == "gem":
            _shapes.check_gem(p, eps)
        if flatten is not None and keepdim is not None and flatten == keepdim:
            raise ValueError(
                f"GlobalPool2d: flatten={flatten} contradicts keepdim={keepdim} "
                "(flatten is timm's name for not keepdim; give one of them)"
            )
        keepdim = (not flatten) if keepdim is None and flatten is not None else bool(keepdim)
        self.kind, self.layout, self.keepdim, self.eps = kind, layout, keepdim, eps
        self.p: float | nn.Parameter = (
            nn.Parameter(torch.tensor([float(p)])) if learnable_p and kind == "gem" else p
        )

    def feat_mult(self) -> int:
        """How many features each input channel becomes (2 for "catavgmax")."""
        return 2 if self.kind == "catavgmax" else 1

    def forward(self, x: Tensor) -> Tensor:
        return GF.global_pool2d(
            x, self.kind, layout=self.layout, keepdim=self.keepdim, p=self.p, eps=self.eps
        )

    def extra_repr(self) -> str:
        text = f"kind={self.kind!r}, layout={self.layout!r}, keepdim={self.keepdim}"
        if self.kind == "gem":
            p = self.p if isinstance(self.p, float) else "learnable"
            text += f", p={p}, eps={self.eps}"
        return text


class GlobalAvgPool2d(GlobalPool2d):
    """Global average pooling: (N, C, H, W) -> (N, C), any H and W; no parameters.

    Example:
        >>> GlobalAvgPool2d(layout="HWC")(torch.rand(13, 17, 3)).shape
        torch.Size([3])
    """

    def __init__(self, *, layout: str = "NCHW", keepdim: bool = False) -> None:
        super().__init__("avg", layout=layout, keepdim=keepdim)


class GlobalMaxPool2d(GlobalPool2d):
    """Global max pooling: (N, C, H, W) -> (N, C), any H and W; no parameters.

    Example:
        >>> GlobalMaxPool2d()(torch.rand(2, 3, 5, 5)).shape
        torch.Size([2, 3])
    """

    def __init__(self, *, layout: str = "NCHW", keepdim: bool = False) -> None:
        super().__init__("max", layout=layout, keepdim=keepdim)


class GeM(GlobalPool2d):
    """Generalised-mean pooling ``mean(clamp(x, eps)^p)^(1/p)``: p=1 is GAP, p -> inf is GMP.

    Args:
        p: initial exponent; learnable: train it with the network.
        eps: clamp that keeps fractional powers defined.
        layout, keepdim: as `GlobalPool2d`.

    Example:
        >>> gem = GeM(p=3.0)
        >>> gem(torch.rand(2, 4, 6, 6)).shape, [n for n, _ in gem.named_parameters()]
        (torch.Size([2, 4]), ['p'])
    """

    def __init__(
        self,
        p: float = 3.0,
        learnable: bool = True,
        eps: float = 1e-6,
        *,
        layout: str = "NCHW",
        keepdim: bool = False,
    ) -> None:
        super().__init__("gem", layout=layout, keepdim=keepdim, p=p, eps=eps, learnable_p=learnable)


class ClassifierHead(nn.Module):
    """Global pool -> dropout -> linear (or 1x1 conv) classifier, as timm's ``ClassifierHead``.

    Args:
        in_features: channels of the feature map.
        num_classes: outputs; 0 leaves the pooled features (``nn.Identity`` classifier).
        pool: a `GlobalPool2d` kind.
        use_conv: classify with a 1x1 convolution on the (N, C, 1, 1) pooled map.
        drop_rate: dropout before the classifier.
        layout: layout of the feature map.

    Shape:
        (N, C, H, W) -> (N, num_classes); ``pre_logits=True`` gives (N, C * feat_mult).

    Example:
        >>> head = ClassifierHead(64, 10, pool="avg")
        >>> head(torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 10])
        >>> head(torch.randn(2, 64, 3, 5), pre_logits=True).shape
        torch.Size([2, 64])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        pool: str = "avg",
        use_conv: bool = False,
        drop_rate: float = 0.0,
        *,
        layout: str = "NCHW",
    ) -> None:
        super().__init__()
        if use_conv and layout != "NCHW":
            raise ValueError(f"ClassifierHead: use_conv needs layout 'NCHW', got {layout!r}")
        self.in_features, self.use_conv, self.layout = in_features, use_conv, layout
        self.drop = nn.Dropout(drop_rate)
        self.reset(num_classes, pool)

    def reset(self, num_classes: int, pool: str | None = None) -> None:
        """Replace the classifier (new, freshly initialised weights) and optionally the pool."""
        if pool is not None:
            self.global_pool = GlobalPool2d(pool, layout=self.layout, keepdim=self.use_conv)
        self.num_classes = num_classes
        features = self.in_features * self.global_pool.feat_mult()
        self.fc: nn.Module
        if num_classes <= 0:
            self.fc = nn.Identity()
        elif self.use_conv:
            self.fc = nn.Conv2d(features, num_classes, kernel_size=1)
        else:
            self.fc = nn.Linear(features, num_classes)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.global_pool(x)  # (N, C') or (N, C', 1, 1) with use_conv
        if pre_logits:
            return x.flatten(1) if self.use_conv else x
        x = self.fc(self.drop(x))
        return x.flatten(1) if self.use_conv else x
