"""Running a trained classifier: accuracy and loss on a labelled set, class probabilities.

Both run the model in eval mode with no grad, batch by batch, feeding it in the memory format
its conv weights are stored in, and leave its train/eval flag as it was.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gapnet import data
from gapnet.models import eval_mode


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for an empty model)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def is_channels_last(model: nn.Module) -> bool:
    """Whether the model's conv weights are stored channels_last (then feed it channels_last)."""
    for p in model.parameters():
        if p.dim() == 4:  # the first that is one and not the other (C=1 or 1x1 is both)
            channels_last = p.is_contiguous(memory_format=torch.channels_last)
            if channels_last != p.is_contiguous():
                return channels_last
    return False


def check_images(images: Any, what: str) -> None:
    """ValueError naming `what` unless `images` is a float (N, C, H, W) tensor."""
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = (
            f"{type(images).__name__} of shape {tuple(images.shape)} and dtype {images.dtype}"
            if isinstance(images, Tensor)
            else type(images).__name__
        )
        raise ValueError(f"{what}: images must be a float (N, C, H, W) tensor, got {got}")


def batch_logits(
    model: nn.Module,
    images: Tensor,
    batch_size: int,
    amp: bool = False,
    scales: Sequence[float] | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """(start, float32 logits (B, K)) for each batch of `images`, model in eval mode, no grad.

    With `scales`, each batch runs at every level of `pyramid`, and each image takes the level
    where it is most confident (the highest top probability): the logits returned are the log
    of that level's probabilities (so softmax and argmax read them as usual). Averaging the
    levels instead lets the out-of-range levels outvote the one the model knows
    (docs/research_any_size.md).
    """
    if scales is not None:
        check_scales(scales)  # an empty pyramid is a mistake here, not "one pass"
    for start, logits in _level_logits(model, images, batch_size, amp, scales or ()):
        if scales is None:
            yield start, logits[0]
        else:
            yield start, most_confident(logits.softmax(-1)).clamp_min(1e-30).log()


def level_probs(
    model: nn.Module, images: Tensor, batch_size: int, scales: Sequence[float]
) -> Iterator[tuple[int, Tensor]]:
    """(start, float32 probabilities (L, B, K)) for each batch at every level of `pyramid`:
    level 0 is the batch at its own size (what one pass answers), the others follow `scales`
    (`most_confident` picks the pyramid's answer)."""
    for start, logits in _level_logits(model, images, batch_size, False, scales):
        yield start, logits.softmax(-1)


def most_confident(probs: Tensor) -> Tensor:
    """(L, B, K) -> (B, K): each image's probabilities at its most confident level (the one
    whose top probability is highest)."""
    best = probs.amax(2).argmax(0)  # (B,)
    return probs[best, torch.arange(probs.shape[1], device=probs.device)]


def _level_logits(
    model: nn.Module, images: Tensor, batch_size: int, amp: bool, scales: Sequence[float]
) -> Iterator[tuple[int, Tensor]]:
    """(start, float32 logits (L, B, K)) of each batch at the levels of `pyramid(scales)`, or
    at its own size alone (L = 1) when `scales` is empty; eval mode, no grad."""
    device = model_device(model)
    fmt = torch.channels_last if is_channels_last(model) else torch.contiguous_format
    low = min_side(model) if scales else 0

    def forward(x: Tensor) -> Tensor:  # (B, C, h, w) -> float32 logits (B, K)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return model(x.contiguous(memory_format=fmt)).float()

    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device, non_blocking=True)
            levels = pyramid(x, scales, low) if scales else [x]
            yield start, torch.stack([forward(level) for level in levels])


def min_side(model: Any) -> int:
    """The smallest pyramid level `model` is run at: 20 px, or its backbone's minimum if larger.

    20 px is the smallest digit the any-size recipe trains on; below it strokes blur together.
    """
    return max(MIN_LEVEL, model.backbone.min_input_size)


MIN_LEVEL = 20  # px: the smallest side of a pyramid level


def pyramid(images: Tensor, scales: Sequence[float], min_side: int) -> list[Tensor]:
    """`images` rescaled by each factor of `scales` (bilinear, antialiased), the levels whose
    smaller side would fall below `min_side` left out; the input itself is always a level.

    Args:
        images: a batch of one size.
        scales: positive factors of the input's side, e.g. (1, 0.5, 0.25).
        min_side: the smallest side a level may have.

    Example:
        >>> [tuple(x.shape[-2:]) for x in pyramid(torch.rand(2, 1, 112, 90), (1, 0.5, 0.25), 20)]
        [(112, 90), (56, 45), (28, 22)]
        >>> [tuple(x.shape[-2:]) for x in pyramid(torch.rand(2, 1, 28, 28), (1, 0.5), 20)]
        [(28, 28)]
    """
    check_scales(scales)
    h, w = images.shape[-2:]
    levels, seen = [images], {(h, w)}
    for f in scales:
        hw = (max(1, round(h * f)), max(1, round(w * f)))
        if min(hw) >= min_side and hw not in seen:
            seen.add(hw)
            levels.append(data.rescale(images, hw))
    return levels


def check_scales(scales: Sequence[float]) -> None:
    """Raise ValueError unless `scales` is a non-empty sequence of positive numbers."""
    if not scales or any(
        isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0 for f in scales
    ):
        raise ValueError(f"scales must be positive numbers, e.g. (1, 0.5, 0.25), got {scales!r}")


def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int = 512,
    amp: bool = False,
    scales: Sequence[float] | None = None,
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of `model` on a labelled set, in eval mode, no grad.

    Args:
        model: a classifier returning (N, K) logits; left in the train/eval mode it was in.
        images: the inputs, any size the model takes, on any device (moved batch by batch).
        labels: int64 class indices.
        batch_size: images per forward pass.
        amp: run the forward passes under bf16 autocast.
        scales: test-time multi-scale inference: run every level of `pyramid(images, scales)`
            and let each image's most confident level answer; None: one pass at its own size.

    Shape:
        images (N, C, H, W), labels (N,) -> (accuracy in [0, 1], loss)

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> acc, loss = evaluate(model, torch.rand(10, 1, 2, 2), torch.zeros(10, dtype=torch.long))
        >>> 0 <= acc <= 1 and loss > 0
        True
    """
    check_images(images, "evaluate")
    if not isinstance(labels, Tensor) or labels.shape != (len(images),):
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"evaluate: labels must be a ({len(images)},) tensor, got {got}")
    if len(images) == 0:
        raise ValueError("evaluate: no images to evaluate on (N = 0)")
    if batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be >= 1, got {batch_size}")
    device = model_device(model)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start, logits in batch_logits(model, images, batch_size, amp, scales):
        y = labels[start : start + len(logits)].to(device, non_blocking=True)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    n = len(images)
    return correct.item() / n, loss_sum.item() / n


def predict_proba(
    model: nn.Module,
    images: Tensor,
    *,
    batch_size: int = 512,
    scales: Sequence[float] | None = None,
) -> Tensor:
    """Class probabilities (softmax of the logits), in eval mode, no grad, on the CPU.

    Args:
        model: a classifier returning (N, K) logits.
        images: a batch, or one image (C, H, W).
        batch_size: images per forward pass.
        scales: test-time multi-scale inference, as in `evaluate`.

    Shape:
        (N, C, H, W) -> (N, K) float32; (C, H, W) -> (K,)

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> p = predict_proba(model, torch.rand(5, 1, 2, 2))
        >>> p.shape, bool(torch.allclose(p.sum(1), torch.ones(5)))
        (torch.Size([5, 3]), True)
    """
    single = isinstance(images, Tensor) and images.dim() == 3
    batch = images[None] if single else images
    check_images(batch, "predict_proba")
    parts = [
        logits.softmax(1).cpu()
        for _, logits in batch_logits(model, batch, batch_size, scales=scales)
    ]
    probs = torch.cat(parts) if parts else torch.zeros(0, 0)
    return probs[0] if single else probs


def model_input(model: Any, x: Tensor) -> tuple[Tensor, str | None]:
    """One image (C, H, W) as `model` takes it, and a note when it had to change it.

    The one rule for predict, the web demo and the CLI: a global-pooling model takes the
    image at its own size (nothing is resized); a model with one input size (an fc head) gets
    the image resized to it, and the note says so.

    Args:
        model: a GapNet (or anything with ``input_size``, ``config.head`` and
            ``backbone.min_input_size``, such as an exported ONNX model).
        x: the image.

    Raises:
        ValueError: the image is smaller than the backbone's smallest input.

    Example:
        >>> from gapnet.models import create
        >>> x, note = model_input(create("convnet-tiny", head="fc"), torch.rand(1, 40, 52))
        >>> tuple(x.shape), note
        ((1, 28, 28), 'resized from 52x40 to 28x28: this fc model takes one input size only')
    """
    note, s = None, model.input_size
    if s is not None and tuple(x.shape[-2:]) != (s, s):
        note = (
            f"resized from {x.shape[-1]}x{x.shape[-2]} to {s}x{s}: this {model.config.head} "
            "model takes one input size only"
        )
        x = data.rescale(x[None], s)[0]
    low = model.backbone.min_input_size
    if min(x.shape[-2:]) < low:
        raise ValueError(
            f"the image is {x.shape[-1]}x{x.shape[-2]} pixels; this model needs at least "
            f"{low}x{low}"
        )
    return x, note
