"""Class activation maps (CAM), the boxes they give, overlays, and localization on canvases.

A GAP-headed classifier's logits are the spatial means of per-class maps, so each class's map
comes free with the forward pass (Zhou et al., "Learning Deep Features for Discriminative
Localization", CVPR 2016): `class_activation_maps` runs the backbone once and reads the maps off
the head's weights (no hooks, no gradients). `cam_boxes` turns a map into a box with the paper's
rule (the largest connected region above 20% of the map's maximum) or around every region above
the level, `box_iou` scores it,
`overlay` paints it over the image, and `localize` / `choose_threshold` measure CAM localization
on `gapnet.data.canvas_mnist` (digits at random places on larger blank canvases).

An ``fc`` head has no maps: a fully connected layer mixes every location into every logit.
matplotlib is never imported (the colormap is `JET`).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy import ndimage
from torch import Tensor

from gapnet import data as _data
from gapnet.checkpoint import atomic_write
from gapnet.models import GapNet, eval_mode

# choose_threshold's default candidates: 0.05 apart where CAM boxes are good, coarser above
THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8)
# what `cam_boxes` boxes: the largest 4-connected region above the level (the CAM paper's rule,
# robust to clutter), or every pixel above it (keeps a digit whose map splits into two blobs)
REGIONS = ("largest", "all")
CANVAS_SIZES = (28, 40, 56, 84, 112)  # localize's default canvas sides
ROW_KEYS = ("size", "n", "acc", "loc_acc", "top1_loc", "mean_iou", "seconds")  # localize rows


# ----------------------------------------------------------------------------- maps


class CamResult(NamedTuple):
    """What `class_activation_maps` returns (unpacks as ``maps, logits, classes``)."""

    maps: Tensor  # (N, H, W) float32: the chosen class's map per image
    logits: Tensor  # (N, K): the model's logits, from the same forward pass
    classes: Tensor  # (N,) int64: the class each map is for (predicted, or as given)


def _check_cam_model(model: Any) -> None:
    if not isinstance(model, GapNet):
        raise TypeError(
            f"class_activation_maps expects a gapnet GapNet, got {type(model).__name__}"
        )
    kind = model.get_classifier().kind
    if not model.has_cam:
        raise TypeError(
            f"class_activation_maps: the model's head is {kind!r}, a fully connected head, which "
            "has no per-location class scores: it mixes every location into every logit (it "
            "throws away where things are). Use a global-pooling head, e.g. 'gap' or 'gap-fc'"
        )
    if model.num_classes <= 0:
        raise ValueError("class_activation_maps: the model has num_classes=0, so no class maps")


def _chosen_classes(classes: Any, logits: Tensor) -> Tensor:
    """`classes` as an (N,) int64 tensor on the logits' device; None picks the argmax."""
    n, k = logits.shape
    if classes is None:
        return logits.argmax(dim=1)
    if isinstance(classes, (bool, float)):
        raise TypeError(f"classes must be an int or a sequence of N ints, got {classes!r}")
    if isinstance(classes, int):
        chosen = torch.full((n,), classes, dtype=torch.int64, device=logits.device)
    else:
        t = torch.as_tensor(classes)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"classes must be ints, got a tensor of {t.dtype}")
        if t.shape != (n,):
            raise ValueError(
                f"classes must be an int or N={n} ints (one per image), got shape {tuple(t.shape)}"
            )
        chosen = t.to(device=logits.device, dtype=torch.int64)
    if n and (int(chosen.min()) < 0 or int(chosen.max()) >= k):
        bad = chosen[(chosen < 0) | (chosen >= k)][0]
        raise ValueError(f"classes must be in [0, {k}) for this {k}-class model, got {int(bad)}")
    return chosen


def normalize_maps(maps: Tensor) -> Tensor:
    """Scale each map to [0, 1] by its own min and max; a constant map becomes zeros.

    Args:
        maps: a batch of maps.

    Shape:
        (N, H, W) -> (N, H, W)

    Example:
        >>> normalize_maps(torch.tensor([[[1.0, 3.0]], [[2.0, 2.0]]])).tolist()
        [[[0.0, 1.0]], [[0.0, 0.0]]]
    """
    lo = maps.amin(dim=(-2, -1), keepdim=True)  # (N, 1, 1)
    span = maps.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 0, (maps - lo) / torch.where(span > 0, span, 1), 0)


def class_activation_maps(
    model: GapNet,
    x: Tensor,
    classes: int | Sequence[int] | Tensor | None = None,
    *,
    upsample: bool = True,
    normalize: bool = True,
) -> CamResult:
    """Each image's class activation map for one class, from one forward pass.

    The backbone runs once (``model.forward_features``); the logits come from the head on those
    features and the maps from the same features through the head's weights
    (``head.class_maps``): for a "gap" head the 1x1 conv's output, bias included, whose mean IS
    the logit; for "gap-fc" W·features, whose mean plus the bias is the logit. The other pooled
    heads ("gmp", "avgmax", "catavgmax", "gem") have maps too, but their logits are not the
    maps' means. Runs in eval mode with no grad (the model's train flag is restored).

    Args:
        model: a `GapNet` with a global-pooling head; an "fc"/"fc-dropout" head is a TypeError.
        x: images, any H and W the backbone takes, NCHW or channels_last, on the model's device.
        classes: the class of each map: None for the predicted (argmax) class, an int for the
            same class everywhere, or N ints.
        upsample: resize the maps bilinearly (align_corners=False) to the input's H x W;
            False keeps the feature map's h x w.
        normalize: scale each map to [0, 1] (min-max per map; a constant map becomes zeros);
            False keeps the head's raw scores.

    Returns:
        a `CamResult`: ``maps`` (float32), ``logits``, ``classes`` (int64).

    Shape:
        x (N, C, H, W) -> maps (N, H, W) (or (N, h, w) without upsample), logits (N, K),
        classes (N,).

    Example:
        >>> from gapnet.models import create
        >>> model = create("convnet-tiny", head="gap")
        >>> cam = class_activation_maps(model, torch.rand(2, 1, 40, 36))
        >>> cam.maps.shape, cam.logits.shape, cam.classes.shape
        (torch.Size([2, 40, 36]), torch.Size([2, 10]), torch.Size([2]))
        >>> raw = class_activation_maps(model, torch.rand(2, 1, 28, 28), 3, upsample=False,
        ...                             normalize=False)
        >>> torch.allclose(raw.maps.mean((1, 2)), raw.logits[:, 3], atol=1e-5)
        True
    """
    _check_cam_model(model)
    if not isinstance(x, Tensor):
        raise TypeError(f"class_activation_maps: x must be a torch.Tensor, got {type(x).__name__}")
    with eval_mode(model):
        features = model.forward_features(x)  # (N, C, h, w): the only backbone pass
        logits = model.forward_head(features)  # (N, K)
        chosen = _chosen_classes(classes, logits)  # (N,)
        all_maps = model.get_classifier().class_maps(features)  # (N, K, h, w)
        n = all_maps.shape[0]
        maps = all_maps[torch.arange(n, device=all_maps.device), chosen].float()  # (N, h, w)
        if upsample and tuple(maps.shape[-2:]) != tuple(x.shape[-2:]):
            maps = F.interpolate(
                maps[:, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False
            )[:, 0]  # (N, H, W)
        if normalize:
            maps = normalize_maps(maps)
    return CamResult(maps.contiguous(), logits, chosen)


# ----------------------------------------------------------------------------- boxes


def _as_tensor(a: Any, what: str) -> Tensor:
    if isinstance(a, Tensor):
        return a.detach()
    try:
        return torch.as_tensor(np.asarray(a))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be a tensor or array, got {type(a).__name__}") from e


def label_components(mask: Tensor) -> Tensor:
    """Label the 4-connected regions of each mask: every pixel gets its region's first index.

    scipy.ndimage.label does the labelling (in C, one mask at a time, on the CPU); its labels
    count regions in raster order of their first pixel, and each is replaced here by that
    pixel's flat index ``y * W + x``, so a label names the same region whatever else the mask
    holds. Background pixels get ``H * W``.

    Args:
        mask: boolean masks (any device; the result is on the same one).

    Shape:
        (N, H, W) -> (N, H, W) int64.

    Example:
        >>> m = torch.tensor([[[1, 1, 0], [0, 0, 1], [1, 0, 1]]], dtype=torch.bool)
        >>> label_components(m)[0].tolist()
        [[0, 0, 9], [9, 9, 5], [6, 9, 5]]
    """
    if mask.ndim != 3:
        raise ValueError(f"label_components: mask must be (N, H, W), got shape {tuple(mask.shape)}")
    n, h, w = mask.shape
    masks = mask.detach().bool().cpu().numpy()
    out = np.full((n, h * w), h * w, dtype=np.int64)
    for i in range(n):
        regions, count = ndimage.label(masks[i])  # 0: background; 1..count in raster order
        flat = regions.ravel()
        values, first = np.unique(flat, return_index=True)  # each label's first pixel
        first_of = np.full(count + 1, h * w, dtype=np.int64)
        first_of[values] = first
        first_of[0] = h * w
        out[i] = first_of[flat]
    return torch.from_numpy(out).view(n, h, w).to(mask.device)


def _check_rule(threshold: float, region: str) -> None:
    """`cam_boxes`' checks of a box rule (localize and choose_threshold run them up front)."""
    if isinstance(threshold, bool) or not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"cam_boxes: threshold must be in [0, 1], got {threshold!r}")
    if region not in REGIONS:
        raise ValueError(f"cam_boxes: region must be one of {', '.join(REGIONS)}, got {region!r}")


def _boxes_of(mask: Tensor) -> Tensor:
    """(x0, y0, x1, y1) of each mask's pixels, ends exclusive; the full image where none."""
    n, h, w = mask.shape
    full = torch.tensor([0, 0, w, h], dtype=torch.int64, device=mask.device).expand(n, 4)
    return torch.where(mask.flatten(1).any(1, keepdim=True), _data.mask_boxes(mask), full)


def cam_boxes(maps: Any, threshold: float = 0.2, region: str = "largest") -> Tensor:
    """One box per map around its pixels >= threshold * max(map): the largest 4-connected
    region of them, or (``region="all"``) all of them.

    The CAM paper's rule (Zhou et al. 2016, 20% of the maximum). Ties between regions of equal
    size go to the one whose first pixel comes first in raster order. ``region="all"`` boxes
    every pixel at or above the level instead. A map with no pixel at or above the level (a
    constant or all-zero map passes everywhere; a map whose maximum is <= 0 may pass nowhere)
    gets the full-image box (0, 0, W, H).

    Args:
        maps: maps as a tensor or array, e.g. `class_activation_maps(...).maps`; finite.
        threshold: the fraction of each map's maximum a pixel must reach, in [0, 1].
        region: "largest" (the paper's rule) or "all" (see `REGIONS`).

    Returns:
        int64 boxes (x0, y0, x1, y1), x1 and y1 exclusive (as `gapnet.data.canvas_mnist`), on
        the maps' device.

    Shape:
        (N, H, W) -> (N, 4); a single (H, W) map -> (4,).

    Example:
        >>> m = torch.zeros(1, 6, 8)
        >>> m[0, 1:3, 1:3] = 1.0  # 4 pixels
        >>> m[0, 2:5, 4:7] = 0.5  # 9 pixels, the larger region at 20%
        >>> cam_boxes(m).tolist(), cam_boxes(m, threshold=0.6).tolist()
        ([[4, 2, 7, 5]], [[1, 1, 3, 3]])
        >>> cam_boxes(m, region="all").tolist()
        [[1, 1, 7, 5]]
    """
    m = _as_tensor(maps, "cam_boxes: maps")
    single = m.ndim == 2
    if single:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"cam_boxes: maps must be (N, H, W) or (H, W), got shape {tuple(m.shape)}")
    if m.dtype == torch.bool or m.is_complex():
        raise TypeError(f"cam_boxes: maps must be real numbers, got {m.dtype}")
    _check_rule(threshold, region)
    n, h, w = m.shape
    if h == 0 or w == 0:
        raise ValueError(f"cam_boxes: maps must not be empty, got shape {tuple(m.shape)}")
    if n == 0:
        return torch.zeros(4 if single else (0, 4), dtype=torch.int64, device=m.device)
    m = m.float() if not m.is_floating_point() else m
    if not bool(torch.isfinite(m).all()):
        raise ValueError("cam_boxes: maps must be finite, got NaN or infinity")
    level = float(threshold) * m.amax(dim=(1, 2), keepdim=True)  # (N, 1, 1)
    mask = m >= level  # (N, H, W)
    if region == "largest":
        labels = label_components(mask).view(n, h * w)  # background: h * w
        sizes = torch.zeros(n, h * w + 1, dtype=torch.int64, device=m.device)
        sizes.scatter_add_(1, labels, torch.ones_like(labels))  # (N, HW + 1) pixels per label
        sizes[:, -1] = 0
        largest = sizes.argmax(dim=1, keepdim=True)  # (N, 1): first of equal sizes, raster order
        mask = (labels == largest).view(n, h, w) & mask
    boxes = _boxes_of(mask)
    return boxes[0] if single else boxes


def box_iou(a: Any, b: Any) -> Tensor:
    """Intersection over union of paired boxes (x0, y0, x1, y1), x1 and y1 exclusive.

    Two empty boxes have IoU 0.

    Args:
        a, b: boxes of the same shape (tensors or arrays).

    Shape:
        (N, 4), (N, 4) -> (N,) float32; any (..., 4) -> (...).

    Example:
        >>> box_iou(torch.tensor([[0, 0, 4, 4], [0, 0, 2, 2]]),
        ...         torch.tensor([[2, 0, 6, 4], [5, 5, 7, 7]])).tolist()
        [0.3333333432674408, 0.0]
    """
    ta, tb = _as_tensor(a, "box_iou: a"), _as_tensor(b, "box_iou: b")
    if ta.shape != tb.shape or ta.ndim == 0 or ta.shape[-1] != 4:
        raise ValueError(
            f"box_iou: a and b must both be (N, 4) boxes, got shapes {tuple(ta.shape)} and "
            f"{tuple(tb.shape)}"
        )
    ta, tb = ta.double(), tb.to(device=ta.device, dtype=torch.float64)
    iw = (torch.minimum(ta[..., 2], tb[..., 2]) - torch.maximum(ta[..., 0], tb[..., 0])).clamp(0)
    ih = (torch.minimum(ta[..., 3], tb[..., 3]) - torch.maximum(ta[..., 1], tb[..., 1])).clamp(0)
    inter = iw * ih

    def area(t: Tensor) -> Tensor:
        return (t[..., 2] - t[..., 0]).clamp(0) * (t[..., 3] - t[..., 1]).clamp(0)

    union = area(ta) + area(tb) - inter
    return torch.where(union > 0, inter / union.clamp(min=1), 0.0).float()


# ----------------------------------------------------------------------------- drawing


def _jet(n: int = 256) -> np.ndarray:
    """The classic "jet" colormap (blue -> cyan -> yellow -> red) as an (n, 3) uint8 table."""
    v = np.linspace(0.0, 1.0, n)[:, None]  # (n, 1)
    centres = np.array([0.75, 0.5, 0.25])  # where red, green and blue peak
    rgb = np.clip(1.5 - np.abs(4.0 * (v - centres)), 0.0, 1.0)  # (n, 3)
    return np.round(rgb * 255).astype(np.uint8)


JET = _jet()  # (256, 3) uint8: the colormap of `overlay`; row 0 is dark blue, row 255 dark red


def colorize(cam: Any) -> np.ndarray:
    """Map values in [0, 1] (clipped; NaN as 0) to RGB through the `JET` table.

    Args:
        cam: a map as a tensor or array.

    Shape:
        (H, W) -> (H, W, 3) uint8.

    Example:
        >>> colorize(np.array([[0.0, 0.5, 1.0]])).tolist()
        [[[0, 0, 128], [130, 255, 126], [128, 0, 0]]]
    """
    c = _as_tensor(cam, "colorize: cam").cpu().double().numpy()
    c = np.clip(np.nan_to_num(c, nan=0.0), 0.0, 1.0)
    return JET[np.round(c * (len(JET) - 1)).astype(np.intp)]


def _image_rgb(image: Any) -> np.ndarray:
    """A (C, H, W) or (H, W) image in [0, 1] as an (H, W, 3) float array (gray -> RGB)."""
    img = _as_tensor(image, "overlay: image").cpu().double().numpy()
    if img.ndim == 2:
        img = img[None]
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(
            f"overlay: image must be (C, H, W) with C = 1 or 3, or (H, W), got shape {img.shape}"
        )
    img = np.clip(np.nan_to_num(img, nan=0.0), 0.0, 1.0).transpose(1, 2, 0)  # (H, W, C)
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def overlay(
    image: Any,
    cam: Any,
    *,
    alpha: float = 0.5,
    boxes: Sequence[tuple[Any, Any]] | None = None,
    width: int = 1,
) -> Any:
    """The colormapped CAM blended over the image, with optional boxes, as a PIL RGB image.

    Args:
        image: (C, H, W) with C = 1 or 3, or (H, W), tensor or array, values in [0, 1]
            (clipped); grayscale is expanded to RGB.
        cam: (H, W) map in [0, 1] (clipped), e.g. one of `class_activation_maps(...).maps`; a
            map of another size (say ``upsample=False``) is resized bilinearly to H x W.
        alpha: weight of the colormap: 0 gives the image, 1 the colormap alone.
        boxes: ``[(box, color), ...]``: (x0, y0, x1, y1) boxes (ends exclusive) drawn on top in
            PIL colors, e.g. ``[(true_box, "lime"), (cam_box, "red")]``; see `draw_boxes`.
        width: outline width of the boxes in pixels.

    Returns:
        a ``PIL.Image.Image`` in mode "RGB", W x H.

    Example:
        >>> img = overlay(torch.rand(1, 28, 40), torch.rand(7, 10), boxes=[((2, 2, 9, 9), "red")])
        >>> img.mode, img.size
        ('RGB', (40, 28))
    """
    if isinstance(alpha, bool) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"overlay: alpha must be in [0, 1], got {alpha!r}")
    rgb = _image_rgb(image)  # (H, W, 3)
    h, w = rgb.shape[:2]
    c = _as_tensor(cam, "overlay: cam").float().cpu()
    if c.ndim != 2:
        raise ValueError(f"overlay: cam must be one (H, W) map, got shape {tuple(c.shape)}")
    if tuple(c.shape) != (h, w):
        c = F.interpolate(c[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    heat = colorize(c).astype(np.float64) / 255.0  # (H, W, 3)
    blended = (1.0 - float(alpha)) * rgb + float(alpha) * heat
    img = Image.fromarray(np.round(blended * 255).astype(np.uint8))
    if boxes:
        pairs = list(boxes)
        img = draw_boxes(img, [b for b, _ in pairs], [col for _, col in pairs], width=width)
    return img


def draw_boxes(img: Any, boxes: Any, colors: Any = "red", *, width: int = 1) -> Any:
    """A copy of a PIL image with rectangles drawn on it.

    Args:
        img: a ``PIL.Image.Image``.
        boxes: (M, 4) boxes (x0, y0, x1, y1), x1 and y1 exclusive: the outline covers columns
            x0..x1-1 and rows y0..y1-1; an empty box draws nothing.
        colors: one PIL color for every box, or one per box.
        width: outline width in pixels (drawn inwards).

    Returns:
        the new image; `img` is left as it was.

    Example:
        >>> from PIL import Image
        >>> out = draw_boxes(Image.new("RGB", (8, 8)), [(1, 1, 4, 4)], "red")
        >>> out.getpixel((1, 1)), out.getpixel((3, 3)), out.getpixel((4, 4))
        ((255, 0, 0), (255, 0, 0), (0, 0, 0))
    """
    rows = [[int(v) for v in box] for box in boxes]
    if any(len(row) != 4 for row in rows):
        raise ValueError(f"draw_boxes: each box must be (x0, y0, x1, y1), got {rows!r}")
    if isinstance(colors, (str, tuple)) or colors is None:
        palette = [colors or "red"] * len(rows)
    else:
        palette = list(colors)
        if len(palette) != len(rows):
            raise ValueError(f"draw_boxes: {len(rows)} boxes but {len(palette)} colors")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"draw_boxes: width must be an int >= 1, got {width!r}")
    out = img.copy()
    draw = ImageDraw.Draw(out)
    for (x0, y0, x1, y1), color in zip(rows, palette, strict=True):
        if x1 > x0 and y1 > y0:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=color, width=width)
    return out


def save_png(img: Any, path: str | os.PathLike[str]) -> Path:
    """Write a PIL image as PNG via a temporary file and a rename, so readers never see half.

    Args:
        img: a ``PIL.Image.Image``.
        path: the file to write; its folder is created if missing.

    Returns:
        the path written.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> with tempfile.TemporaryDirectory() as d:
        ...     Image.open(save_png(Image.new("RGB", (5, 3)), Path(d) / "a.png")).size
        (5, 3)
    """

    target = Path(path)
    png = io.BytesIO()
    img.save(png, format="PNG")
    atomic_write(target, png.getvalue())
    return target


# ----------------------------------------------------------------------------- localization


def _score(
    model: GapNet,
    size: int,
    rules: Sequence[tuple[str, float]],
    *,
    n: int | None,
    distractors: int,
    seed: int,
    batch_size: int,
    split: str,
    source: str,
) -> list[dict[str, Any]]:
    """One localize row per box rule (region, threshold) for canvas side `size`; one forward per
    batch for all."""
    canvases, true_boxes = _data.canvas_mnist(
        size, n=n, distractors=distractors, seed=seed, split=split, source=source
    )
    ref = next(model.parameters())
    start = time.perf_counter()
    count = len(canvases)
    correct = 0
    hits = torch.zeros(len(rules), dtype=torch.int64)  # IoU >= 0.5
    top1 = torch.zeros(len(rules), dtype=torch.int64)  # ... and the right class
    iou_sum = torch.zeros(len(rules), dtype=torch.float64)
    for xb, yb, bb in zip(
        canvases.images.split(batch_size),
        canvases.labels.split(batch_size),
        true_boxes.split(batch_size),
        strict=True,
    ):
        cam = class_activation_maps(model, xb.to(device=ref.device, dtype=ref.dtype))
        right = cam.classes.cpu() == yb  # (B,)
        correct += int(right.sum())
        for i, (region, t) in enumerate(rules):
            iou = box_iou(cam_boxes(cam.maps, t, region).cpu(), bb)  # (B,)
            hit = iou >= 0.5
            hits[i] += int(hit.sum())
            top1[i] += int((hit & right).sum())
            iou_sum[i] += float(iou.double().sum())
    if ref.device.type == "cuda":
        torch.cuda.synchronize(ref.device)
    seconds = time.perf_counter() - start
    denom = max(count, 1)
    return [
        dict(
            size=size,
            n=count,
            acc=correct / denom,
            loc_acc=int(hits[i]) / denom,
            top1_loc=int(top1[i]) / denom,
            mean_iou=float(iou_sum[i]) / denom,
            seconds=seconds,
        )
        for i in range(len(rules))
    ]


def _check_sizes(sizes: Any) -> tuple[int, ...]:
    out = (sizes,) if isinstance(sizes, int) else tuple(sizes)
    if not out or any(isinstance(s, bool) or not isinstance(s, int) for s in out):
        raise ValueError(f"sizes must be one or more ints (canvas sides), got {sizes!r}")
    return out


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return batch_size


def localize(
    model: GapNet,
    sizes: int | Sequence[int] = CANVAS_SIZES,
    *,
    n: int | None = None,
    distractors: int = 0,
    threshold: float = 0.2,
    region: str = "largest",
    seed: int = 0,
    batch_size: int = 256,
    split: str = "test",
    source: str = "mnist-5k",
) -> list[dict[str, Any]]:
    """Classification and CAM localization accuracy on held-out digits on S x S canvases.

    For each canvas side S, `gapnet.data.canvas_mnist` places each digit at a random place on a
    blank canvas with its true box; the predicted class's CAM (upsampled, normalized) gives a
    box by `cam_boxes` at `threshold` around `region`, scored against the true box by IoU.

    Args:
        model: a `GapNet` with a global-pooling head and 1 input channel.
        sizes: canvas sides S (each at least the digits' size, 28 for MNIST).
        n: digits per size (a fixed stratified subset); None: the whole split.
        distractors: stroke-like crops of other digits pasted on each canvas.
        threshold: `cam_boxes`' fraction of the map's maximum.
        region: `cam_boxes`' region rule, "largest" or "all".
        seed: placement seed (the same seed, the same canvases).
        batch_size: images per forward pass.
        split: "test" (the default: held-out digits) or "train".
        source: where the digits come from, as `canvas_mnist`'s `source`.

    Returns:
        one dict per size with keys `ROW_KEYS`: ``size``, ``n``; ``acc`` (the prediction is
        right), ``loc_acc`` (IoU >= 0.5 with the predicted class's box, right class or not),
        ``top1_loc`` (right class AND IoU >= 0.5: one minus the CAM paper's top-1 localization
        error), ``mean_iou``, all in [0, 1]; ``seconds`` (CAMs, boxes and scoring).

    Example:
        >>> from gapnet.models import create
        >>> rows = localize(create("convnet-tiny"), (28, 40), n=10, source="digits")
        >>> [(r["size"], r["n"], 0 <= r["loc_acc"] <= 1) for r in rows]
        [(28, 10, True), (40, 10, True)]
    """
    _check_cam_model(model)
    _check_rule(threshold, region)  # before any work
    batch = _check_batch_size(batch_size)
    return [
        _score(
            model, s, ((region, threshold),), n=n, distractors=distractors, seed=seed,
            batch_size=batch, split=split, source=source,
        )[0]
        for s in _check_sizes(sizes)
    ]  # fmt: skip


class ThresholdChoice(NamedTuple):
    """What `choose_threshold` returns: the box rule with the best validation loc_acc."""

    threshold: float  # the chosen fraction of the map's maximum
    region: str  # the chosen region rule ("largest" or "all")
    scores: dict[tuple[str, float], float]  # (region, threshold) -> loc_acc, mean over sizes
    rows: list[dict[str, Any]]  # the validation `localize` rows of the chosen rule


def choose_threshold(
    model: GapNet,
    sizes: int | Sequence[int] = CANVAS_SIZES,
    candidates: Sequence[float] = THRESHOLDS,
    *,
    regions: Sequence[str] = REGIONS,
    n: int | None = 1000,
    distractors: int = 0,
    seed: int = 0,
    batch_size: int = 256,
    source: str = "mnist-5k",
) -> ThresholdChoice:
    """The `cam_boxes` rule (threshold and region) with the best mean loc_acc on a VALIDATION
    set, never the test set.

    The validation canvases are built from the TRAINING digits (``canvas_mnist(...,
    split="train")``) at new random places, so the test digits stay unseen until `localize`.
    Each canvas's CAM is computed once and boxed by every rule. Ties go to the earlier region,
    then the earlier threshold.

    Args:
        model: a `GapNet` with a global-pooling head and 1 input channel.
        sizes: canvas sides S.
        candidates: thresholds to try, each in [0, 1].
        regions: region rules to try (`REGIONS`); ``("largest",)`` keeps the CAM paper's rule.
        n: training digits per size (a fixed stratified subset); None: all of them.
        distractors, seed, batch_size, source: as `localize`.

    Returns:
        a `ThresholdChoice`: the threshold and region, each rule's mean loc_acc, and the
        validation rows of the chosen rule.

    Example:
        >>> from gapnet.models import create
        >>> choice = choose_threshold(create("convnet-tiny"), 28, (0.2, 0.5), n=10, source="digits")
        >>> choice.threshold in (0.2, 0.5), choice.region in REGIONS, len(choice.scores)
        (True, True, 4)
    """
    _check_cam_model(model)
    if isinstance(regions, str):
        raise TypeError(f"choose_threshold: regions must be a sequence of names, got {regions!r}")
    bad = [r for r in regions if r not in REGIONS]
    if bad:
        raise ValueError(
            f"choose_threshold: regions must be among {', '.join(REGIONS)}, got {bad[0]!r}"
        )
    thresholds = tuple(float(t) for t in candidates)  # once: `candidates` may be an iterator
    rules = tuple((r, t) for r in regions for t in thresholds)
    if not rules:
        raise ValueError(
            "choose_threshold: candidates and regions must each name at least one, "
            f"got {tuple(candidates)} and {tuple(regions)}"
        )
    for region, t in rules:
        _check_rule(t, region)  # before any work
    batch = _check_batch_size(batch_size)
    per_size = [
        _score(
            model, s, rules, n=n, distractors=distractors, seed=seed, batch_size=batch,
            split="train", source=source,
        )
        for s in _check_sizes(sizes)
    ]  # fmt: skip  # [size][rule] -> row
    scores = {
        rule: sum(rows[i]["loc_acc"] for rows in per_size) / len(per_size)
        for i, rule in enumerate(rules)
    }
    best = max(range(len(rules)), key=lambda i: (scores[rules[i]], -i))
    region, threshold = rules[best]
    return ThresholdChoice(threshold, region, scores, [rows[best] for rows in per_size])
