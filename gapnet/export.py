"""ONNX export of gapnet models at any input size, and the exported file as a model again.

`export` writes a model as an ONNX file whose batch, height and width are free (an fc head
is exported at its one input size and says so), then runs the file in onnxruntime on the CPU
against PyTorch at several sizes and reports the largest difference. `load` reads such a file
back as an `OnnxModel`, which `gapnet predict` and `gapnet eval` take like a checkpoint.

gapnet's pooling layers dispatch to its own kernels and strided CPU paths, which no ONNX
runtime knows, so the file is made from a copy of the model (`torch_ops`) whose pooling
layers are the PyTorch ops that compute them, every padding written out as explicit pads:
onnxruntime's ``auto_pad=SAME_UPPER`` sizes windows wrongly with dilation > 1 and when the
stride exceeds the kernel, so ``padding="same"`` becomes a ``Pad`` node whose amounts the
graph computes from the input's size (Keras's rule), and every other padding the pooling
node's ``pads``. GAP is ``ReduceMean``, global max ``ReduceMax``, GeM ``Pow``/``ReduceMean``.

The file carries the model's config, class names and training config as JSON in its
``metadata_props`` (keys `META_*`), so it stands alone; nothing in it is ever unpickled.

Example:
    >>> import tempfile
    >>> from gapnet.models import create
    >>> path = Path(tempfile.mkdtemp()) / "gap.onnx"
    >>> result = export(create("convnet-tiny", head="gap").eval(), path, sizes=(28, 57))
    >>> [row.size for row in result.parity], result.max_diff < PARITY_TOL
    ([(28, 28), (57, 57)], True)
    >>> onnx_model = load(path)
    >>> onnx_model(torch.rand(3, 1, 40, 31)).shape
    torch.Size([3, 10])
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gapnet import nn as gnn
from gapnet.checkpoint import atomic_write, load_model
from gapnet.models import FC_HEADS, GapNet, ModelConfig, ScaleSpace, eval_mode, size_problem

FORMAT = "gapnet.onnx/1"  # the value of META_FORMAT that marks a gapnet export
META_FORMAT = "gapnet.format"
META_MODEL = "gapnet.model_config"  # ModelConfig.to_dict() as JSON
META_CLASSES = "gapnet.classes"  # class names as a JSON list; label i is classes[i]
META_TRAIN = "gapnet.train_config"  # the run's TrainConfig dict as JSON, or null
META_MIN_SIZE = "gapnet.min_input_size"  # smallest H (and W) the backbone takes
META_FIXED = "gapnet.fixed_size"  # the one H = W of an fc head, or null: any size

INPUT = "images"  # (N, C, H, W) float32
LOGITS = "logits"  # (N, K)
CAMS = "cams"  # (N, K, h, w): the head's class maps (see GapNet.class_maps), optional
PARITY_SIZES: tuple[Any, ...] = (28, 57, 112, (40, 71))  # three squares and one non-square
PARITY_TOL = 1e-4  # largest |ONNX - PyTorch| accepted in float32 (logits and maps)
INSTALL_HINT = "install the export extra: pip install 'gapnet[export]'"


def _require(module: str) -> Any:
    """Import an optional dependency of the export extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"gapnet.export needs {module}: {INSTALL_HINT}") from e


# ----------------------------------------------------------------------------- torch ops


def _two(value: Any) -> tuple[int, int]:
    """An int or an (h, w) pair as (h, w): the module's arguments were validated by its op."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[-1]))


def _same_pads(size: Any, k: int, s: int, d: int) -> tuple[Any, Any]:
    """Keras's "same" padding (before, after) along one axis of (symbolic) length `size`.

    Output ceil(size / s), total padding max((out - 1) * s + (k - 1) * d + 1 - size, 0), the
    odd cell after. (out - 1) * s - size is written as -((size - 1) % s + 1), and the max as
    `torch.sym_max`, so that the export records a formula of the input's size, not a number.
    """
    total = torch.sym_max((k - 1) * d + 1 - ((size - 1) % s + 1), 0)
    return total // 2, total - total // 2


def _cells(size: Any, out: Any, k: int, s: int, before: Any, like: Tensor) -> Tensor:
    """(out,) count of input cells (not padding) in each window along one axis; window i
    starts at i * s - before. Windows run past the input in ceil_mode, so both ends clip."""
    start = torch.arange(out, device=like.device) * s - before
    return (torch.clamp(start + k, max=size) - torch.clamp(start, min=0)).to(like.dtype)


class WindowPool(nn.Module):
    """A gapnet `MaxPool2d` or `AvgPool2d` (NCHW) as PyTorch ops, for export.

    Integer padding becomes the pooling node's explicit ``pads`` (ceil_mode and
    count_include_pad as PyTorch's: onnxruntime matches them); ``"same"`` an explicit ``Pad``
    (-inf for max, 0 for average) computed from the input's size, then a pool without
    padding; an average that must not count padding, or has a `divisor_override` (which ONNX's
    AveragePool lacks), is rescaled by per-window cell counts.

    Args:
        kind: "max" or "avg".
        module: the gapnet layer.

    Shape:
        (N, C, H, W) -> (N, C, H_out, W_out), as the gapnet layer.

    Example:
        >>> layer = gnn.AvgPool2d(3, 2, "same")
        >>> x = torch.randn(1, 2, 9, 8)
        >>> torch.allclose(WindowPool("avg", layer)(x), layer(x), atol=1e-6)
        True
    """

    def __init__(self, kind: str, module: gnn.MaxPool2d | gnn.AvgPool2d) -> None:
        super().__init__()
        self.kind = kind
        self.kernel = _two(module.kernel_size)
        self.stride = self.kernel if module.stride is None else _two(module.stride)
        self.dilation = _two(getattr(module, "dilation", 1))
        self.same = module.padding == "same"
        self.padding = (0, 0) if isinstance(module.padding, str) else _two(module.padding)
        self.ceil_mode = bool(module.ceil_mode)
        self.count_include_pad = bool(getattr(module, "count_include_pad", True))
        self.divisor_override = getattr(module, "divisor_override", None)

    def forward(self, x: Tensor) -> Tensor:
        if self.same:
            return self._same(x)
        k, s, p = self.kernel, self.stride, self.padding
        if self.kind == "max":
            return F.max_pool2d(x, k, s, p, self.dilation, self.ceil_mode)
        if self.divisor_override is None:
            return F.avg_pool2d(x, k, s, p, self.ceil_mode, self.count_include_pad)
        mean = F.avg_pool2d(x, k, s, p, self.ceil_mode, count_include_pad=False)  # sum / cells
        cells = self._cells(x, mean, p)
        return mean * cells / self.divisor_override

    def _same(self, x: Tensor) -> Tensor:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        top, bottom = _same_pads(x.shape[-2], kh, sh, dh)
        left, right = _same_pads(x.shape[-1], kw, sw, dw)
        pads = [left, right, top, bottom]
        if self.kind == "max":
            padded = F.pad(x, pads, value=float("-inf"))
            return F.max_pool2d(padded, self.kernel, self.stride, 0, self.dilation)
        # every window lies inside the padded input, so this is the window sum / (kh * kw)
        mean_all = F.avg_pool2d(F.pad(x, pads), self.kernel, self.stride)
        divisor = self.divisor_override
        if divisor is not None:
            return mean_all * (kh * kw / divisor)
        return mean_all * (kh * kw) / self._cells(x, mean_all, (top, left))

    def _cells(self, x: Tensor, y: Tensor, before: tuple[Any, Any]) -> Tensor:
        """(H_out, W_out) input cells per window of output `y`, pooled from `x`."""
        (kh, kw), (sh, sw) = self.kernel, self.stride
        rows = _cells(x.shape[-2], y.shape[-2], kh, sh, before[0], y)
        cols = _cells(x.shape[-1], y.shape[-1], kw, sw, before[1], y)
        return rows[:, None] * cols[None, :]

    def extra_repr(self) -> str:
        padding = "'same'" if self.same else self.padding
        return f"{self.kind}, kernel={self.kernel}, stride={self.stride}, padding={padding}"


class GlobalPool(nn.Module):
    """A gapnet `GlobalPool2d` (any kind, `GeM` included; NCHW) as PyTorch reductions.

    "avg" exports as ReduceMean, "max" as ReduceMax, "gem" as Clip -> Pow -> ReduceMean ->
    Pow (a learnable p stays a weight of the file).

    Args:
        module: the gapnet layer.

    Shape:
        (N, C, H, W) -> (N, C * feat_mult), or (N, C * feat_mult, 1, 1) with keepdim.

    Example:
        >>> layer = gnn.GlobalPool2d("catavgmax")
        >>> x = torch.randn(2, 3, 5, 7)
        >>> torch.allclose(GlobalPool(layer)(x), layer(x))
        True
    """

    def __init__(self, module: gnn.GlobalPool2d) -> None:
        super().__init__()
        self.kind, self.keepdim, self.eps = module.kind, module.keepdim, module.eps
        self.p = module.p  # a Parameter stays registered (and shared with `module`)
        self.feat_mult = module.feat_mult  # what PooledHead.class_maps asks its pool

    def forward(self, x: Tensor) -> Tensor:
        dims, keep = (2, 3), self.keepdim
        if self.kind == "gem":
            return x.clamp(min=self.eps).pow(self.p).mean(dims, keep).pow(1.0 / self.p)
        if self.kind == "avg":
            return x.mean(dims, keep)
        peak = x.amax(dims, keep)
        if self.kind == "max":
            return peak
        if self.kind == "avgmax":
            return 0.5 * (x.mean(dims, keep) + peak)
        return torch.cat((x.mean(dims, keep), peak), dim=1)  # catavgmax: 2C, average first

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, keepdim={self.keepdim}"


def _torch_twin(name: str, module: nn.Module) -> nn.Module | None:
    """The PyTorch-ops twin of a gapnet pooling layer; None for every other module."""
    if not isinstance(module, (gnn.MaxPool2d, gnn.AvgPool2d, gnn.GlobalPool2d,
                               gnn.AdaptiveAvgPool2d)):  # fmt: skip
        return None
    if module.layout != "NCHW":
        raise ValueError(
            f"export: layer {name!r} has layout={module.layout!r}; ONNX pooling is NCHW, so "
            "export takes NCHW pooling layers only"
        )
    if isinstance(module, gnn.MaxPool2d):
        if module.return_indices:
            raise ValueError(
                f"export: layer {name!r} has return_indices=True; ONNX MaxPool's indices "
                "count over the whole tensor, not per plane as PyTorch's, so it is not exported"
            )
        return WindowPool("max", module)
    if isinstance(module, gnn.AvgPool2d):
        return WindowPool("avg", module)
    if isinstance(module, gnn.GlobalPool2d):
        return GlobalPool(module)
    if module.output_size in (1, (1, 1)):
        return GlobalPool(gnn.GlobalPool2d("avg", keepdim=True))
    raise ValueError(
        f"export: layer {name!r} is AdaptiveAvgPool2d(output_size={module.output_size!r}); "
        "ONNX has no adaptive pooling to sizes other than 1, so it cannot take any input size"
    )


def torch_ops(model: nn.Module) -> nn.Module:
    """A copy of `model` whose gapnet pooling layers are PyTorch ops with explicit pads.

    What `export` exports: the copy computes what the model computes (the same weights, in
    eval mode) with no gapnet custom op or strided path, so every ONNX runtime can run it.

    Args:
        model: any module; its gapnet pooling layers must be NCHW.

    Example:
        >>> from gapnet.models import create
        >>> model = create("convnet-tiny", head="gem").eval()
        >>> twin = torch_ops(model)
        >>> x = torch.rand(2, 1, 30, 45)
        >>> type(twin.head.global_pool).__name__, torch.allclose(twin(x), model(x), atol=1e-5)
        ('GlobalPool', True)
    """
    twin = copy.deepcopy(model).eval()
    for name, module in list(twin.named_modules()):
        replacement = _torch_twin(name, module)
        if replacement is None:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = twin.get_submodule(parent_name) if parent_name else None
        if parent is None:  # the model itself is one pooling layer
            return replacement
        setattr(parent, attr, replacement)
    return twin


# ----------------------------------------------------------------------------- to ONNX


class _Outputs(nn.Module):
    """The exported graph: logits, and with `cams` the head's class maps of the same pass."""

    def __init__(self, model: GapNet, cams: bool) -> None:
        super().__init__()
        self.model, self.cams = model, cams

    def forward(self, x: Tensor) -> Any:
        features = self.model.forward_features(x)  # (N, C, h, w)
        logits = self.model.forward_head(features)  # (N, K)
        if not self.cams:
            return logits
        return logits, self.model.head.class_maps(features)  # (N, K, h, w)


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter (missing torchvision, deprecations): what matters is the
    parity check that follows, and real errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def to_onnx(
    module: nn.Module,
    example: Tensor,
    *,
    fixed_size: bool = False,
    min_size: int = 1,
    output_names: Sequence[str] = (LOGITS,),
    metadata: dict[str, str] | None = None,
    opset: int | None = None,
) -> bytes:
    """An ONNX model of `module` (already in PyTorch ops: see `torch_ops`), serialised.

    Args:
        module: takes one (N, C, H, W) tensor.
        example: an input to trace with; use a batch >= 2 and H != W, which the export cannot
            mistake for constants.
        fixed_size: keep H and W at the example's (batch stays free).
        min_size: smallest H and W the graph must take when they are free.
        output_names: names of the outputs, in order.
        metadata: written to the model's metadata_props.
        opset: ONNX opset; None: the exporter's default.

    Returns:
        the serialised ``onnx.ModelProto``.
    """
    _require("onnxscript")
    onnx = _require("onnx")
    dim = torch.export.Dim
    axes: dict[int, Any] = {0: dim("batch")}
    if not fixed_size:
        axes.update({2: dim("height", min=min_size), 3: dim("width", min=min_size)})
    with _quiet_exporter():
        program = torch.onnx.export(
            module.eval(), (example,), dynamo=True, input_names=[INPUT],
            output_names=list(output_names), dynamic_shapes=(axes,), opset_version=opset,
            verbose=False,
        )  # fmt: skip
    assert program is not None  # dynamo=True returns the program
    proto = program.model_proto
    if metadata:
        onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    return bytes(proto.SerializeToString())


def session(model: bytes | str | os.PathLike[str], threads: int = 0) -> Any:
    """An onnxruntime CPU session of a model (its bytes or its file).

    Args:
        model: serialised ONNX, or a path.
        threads: intra-op threads; 0 leaves onnxruntime's default (every core).
    """
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- export


class ParityRow(NamedTuple):
    """onnxruntime against PyTorch at one input size."""

    size: tuple[int, int]  # (H, W)
    logits_diff: float  # largest |ONNX - PyTorch| of the logits
    cams_diff: float | None  # ... of the class maps, when exported


@dataclass
class ExportResult:
    """What `export` wrote and measured."""

    path: Path  # the .onnx file
    in_chans: int  # input channels C
    fixed_size: int | None  # the one H = W of an fc head; None: any size >= min_input_size
    min_input_size: int
    outputs: tuple[str, ...]  # LOGITS, and CAMS when exported
    parity: list[ParityRow]  # one row per size checked

    @property
    def max_diff(self) -> float:
        """The largest difference over every size and output (NaN if any is NaN)."""
        diffs = [d for r in self.parity for d in (r.logits_diff, r.cams_diff) if d is not None]
        return max(diffs, key=lambda d: (math.isnan(d), d))

    @property
    def ok(self) -> bool:
        """Whether every difference is within `PARITY_TOL`."""
        return self.max_diff <= PARITY_TOL  # False for NaN


def _parity_sizes(sizes: Sequence[Any], low: int, fixed: int | None) -> list[tuple[int, int]]:
    if fixed is not None:
        return [(fixed, fixed)]
    pairs = [_two(s) for s in sizes]
    bad = [p for p in pairs if min(p) < low]
    if not pairs or bad:
        raise ValueError(f"export: sizes must be >= {low} (the model's smallest), got {sizes!r}")
    return pairs


def check_parity(
    model: nn.Module,
    onnx_model: bytes | str | os.PathLike[str],
    sizes: Sequence[tuple[int, int]],
    in_chans: int,
    *,
    cams: bool = False,
    seed: int = 0,
) -> list[ParityRow]:
    """Run the file in onnxruntime (CPU) and `model` in PyTorch on the same random images.

    Args:
        model: the gapnet model as trained (its own pooling ops, not `torch_ops`'s copy).
        onnx_model: the exported file or its bytes.
        sizes: (H, W) input sizes; a batch of 2 images in [0, 1] each.
        in_chans: input channels C.
        cams: the file has the class maps as a second output (compared with the head's).
        seed: of the images.

    Returns:
        one `ParityRow` per size.
    """
    sess = session(onnx_model, threads=torch.get_num_threads())
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for h, w in sizes:
        x = torch.rand(2, in_chans, h, w, generator=generator)  # (2, C, H, W)
        outputs = sess.run(None, {INPUT: x.numpy()})
        with eval_mode(model):
            want = _Outputs(model, cams)(x)  # type: ignore[arg-type]
        want = want if cams else (want,)
        diffs = [
            float((torch.from_numpy(o) - t).abs().max()) for o, t in zip(outputs, want, strict=True)
        ]
        rows.append(ParityRow((h, w), diffs[0], diffs[1] if cams else None))
    return rows


def export(
    model: GapNet,
    path: str | os.PathLike[str],
    *,
    cams: bool = False,
    classes: Sequence[str] | None = None,
    train_config: dict[str, Any] | None = None,
    sizes: Sequence[Any] = PARITY_SIZES,
    opset: int | None = None,
) -> ExportResult:
    """Write `model` as an ONNX file with free batch, height and width, then check its parity.

    A global-pooling head takes any H, W >= ``backbone.min_input_size``; an fc head is
    exported at its one size (``config.input_size``), and `ExportResult.fixed_size` says so.
    The file is written atomically, then run in onnxruntime (CPU) against PyTorch at `sizes`.

    A scale space (`models.ScaleSpace`) is exported with its trained levels only: its further
    eval halvings reach 1 px, where the exporter fixes the dynamic height and width, so the
    file holds to digits of about 300 px where the PyTorch model holds to about 1,000 px.

    Args:
        model: the model (its weights and config are exported; left as it was).
        path: the .onnx file to write.
        cams: add a second output, the class activation maps (N, K, h, w) of the same pass
            (`GapNet.class_maps`); not for fc heads, which have none.
        classes: class names to store (default "0", "1", ...).
        train_config: the run's TrainConfig dict to store (what eval needs to find the data).
        sizes: input sizes of the parity check: ints (square) or (H, W) pairs.
        opset: ONNX opset; None: the exporter's default.

    Returns:
        an `ExportResult` with the parity of every size (`max_diff`, `ok`).
    """
    if not isinstance(model, GapNet):
        raise TypeError(f"export expects a gapnet GapNet, got {type(model).__name__}")
    config = model.config
    fixed = config.input_size if config.head in FC_HEADS else None
    if cams and fixed is not None:
        raise ValueError(
            f"export: cams=True, but a {config.head} head has no class activation maps (a fully "
            "connected layer mixes every location into every logit)"
        )
    model = trained_levels_only(model)
    low = model.backbone.min_input_size
    checked = _parity_sizes(sizes, low, fixed)
    names = [str(c) for c in classes] if classes is not None else None
    if names is not None and len(names) != config.num_classes:
        raise ValueError(f"export: {config.num_classes} classes, got {len(names)} class names")
    metadata = {
        META_FORMAT: FORMAT,
        META_MODEL: json.dumps(config.to_dict()),
        META_CLASSES: json.dumps(names or [str(i) for i in range(config.num_classes)]),
        META_TRAIN: json.dumps(train_config),
        META_MIN_SIZE: str(low),
        META_FIXED: json.dumps(fixed),
    }
    outputs = (LOGITS, CAMS) if cams else (LOGITS,)
    # batch 2 and H != W (odd, above the minimum): nothing the trace sees is 0, 1 or shared
    h, w = (fixed, fixed) if fixed else (max(low, 28) + 5, max(low, 28) + 12)
    example = torch.rand(2, config.in_chans, h, w, generator=torch.Generator().manual_seed(0))
    graph = _Outputs(torch_ops(model), cams)  # type: ignore[arg-type]
    data = to_onnx(
        graph, example, fixed_size=fixed is not None, min_size=low, output_names=outputs,
        metadata=metadata, opset=opset,
    )  # fmt: skip
    atomic_write(path, data)
    parity = check_parity(model, data, checked, config.in_chans, cams=cams)
    return ExportResult(Path(path), config.in_chans, fixed, low, outputs, parity)


def trained_levels_only(model: GapNet) -> GapNet:
    """`model`, or a copy whose scale spaces run at eval only the levels they were trained
    with (`ScaleSpace.extra_levels` 0): what `export` can give a dynamic height and width."""
    if not any(isinstance(m, ScaleSpace) and m.extra_levels for m in model.modules()):
        return model
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if isinstance(module, ScaleSpace):
            module.extra_levels = 0
    return copied


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    path: str | os.PathLike[str],
    **options: Any,
) -> ExportResult:
    """`export` the model of a checkpoint (a file or its run folder) with its class names and
    training config; `options` are export's (cams, sizes, opset)."""
    model, ckpt = load_model(checkpoint)
    return export(model, path, classes=ckpt.classes, train_config=ckpt.train_config, **options)


# ----------------------------------------------------------------------------- load


@dataclass(frozen=True)
class BackboneInfo:
    """What an exported model records of its backbone: what predict and eval read."""

    min_input_size: int  # smallest H (and W)


class OnnxModel(nn.Module):
    """An exported gapnet model run by onnxruntime, usable where predict and eval take a GapNet.

    It has a GapNet's ``config``, ``num_classes`` and ``backbone.min_input_size``, and its
    forward gives the logits; ``class_maps`` the maps when the file has them. It holds no
    parameters: `gapnet.inference` runs it on the CPU like any model.

    Args:
        path: a file `export` wrote.
        threads: onnxruntime intra-op threads (0: onnxruntime's default).

    Shape:
        (N, in_chans, H, W) float -> (N, num_classes), H and W as `export` allowed.
    """

    def __init__(self, path: str | os.PathLike[str], threads: int = 0) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {str(self.path)!r} not found")
        try:
            self.session = session(self.path, threads)
        except ImportError:
            raise
        except Exception as e:  # onnxruntime's own error types
            raise ValueError(f"{str(self.path)!r} is not a readable ONNX model: {e}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get(META_FORMAT) != FORMAT:
            raise ValueError(
                f"{str(self.path)!r} is an ONNX model but not a gapnet export (its metadata has "
                f"no {META_FORMAT!r}: {FORMAT!r}; write one with `gapnet export`)"
            )
        try:
            self.config = ModelConfig.from_dict(json.loads(meta[META_MODEL]))
            self.classes: list[str] = list(json.loads(meta[META_CLASSES]))
            self.train_config: dict[str, Any] | None = json.loads(meta[META_TRAIN])
            self.fixed_size: int | None = json.loads(meta[META_FIXED])
            self.backbone = BackboneInfo(int(meta[META_MIN_SIZE]))
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{str(self.path)!r}: bad gapnet metadata ({e})") from None
        self.outputs = tuple(o.name for o in self.session.get_outputs())

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def input_size(self) -> int | None:
        """The one H = W the file takes (an fc head's), or None: any size from the minimum."""
        return self.fixed_size

    @property
    def has_cam(self) -> bool:
        """Whether the file was exported with its class activation maps."""
        return CAMS in self.outputs

    def size_problem(self, height: int, width: int | None = None) -> str | None:
        """Why the file cannot take a height x width input, or None if it can."""
        return size_problem(self.fixed_size, self.backbone.min_input_size, height, width)

    def _check(self, x: Tensor) -> None:
        c = self.config.in_chans
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != c:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{self.path.name} expects input (N, {c}, H, W), got {got}")
        h, w = x.shape[-2:]
        fixed, low = self.fixed_size, self.backbone.min_input_size
        if fixed is not None and (h, w) != (fixed, fixed):
            raise ValueError(
                f"{self.path.name} has a {self.config.head} head, exported at its one input size "
                f"{fixed}x{fixed}; got {h}x{w}"
            )
        if min(h, w) < low:
            raise ValueError(f"{self.path.name} needs inputs of at least {low}x{low}, got {h}x{w}")

    def run(self, x: Tensor) -> dict[str, Tensor]:
        """Every output of the file for images x (N, C, H, W), by name."""
        self._check(x)
        arrays = self.session.run(None, {INPUT: x.detach().float().cpu().contiguous().numpy()})
        return {name: torch.from_numpy(a) for name, a in zip(self.outputs, arrays, strict=True)}

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x)[LOGITS]

    def class_maps(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, K, h, w) class maps, if the file was exported with cams."""
        if CAMS not in self.outputs:
            raise ValueError(f"{self.path.name} was exported without class maps (export cams=True)")
        return self.run(x)[CAMS]


def load(path: str | os.PathLike[str], threads: int = 0) -> OnnxModel:
    """The `OnnxModel` of a file `export` wrote (onnxruntime only; nothing is unpickled)."""
    return OnnxModel(path, threads)


def describe(result: ExportResult) -> list[str]:
    """Lines that say what was exported and how it compares with PyTorch (for the CLI)."""
    s, low, in_chans = result.fixed_size, result.min_input_size, result.in_chans
    shape = (
        f"(N, {in_chans}, H, W): any N, any H, W >= {low}"
        if s is None
        else f"(N, {in_chans}, {s}, {s}): any N, {s}x{s} only"
    )
    lines = [f"wrote {result.path}: input {INPUT} {shape}; outputs {', '.join(result.outputs)}"]
    if s is not None:
        lines.append(f"  a fully connected head takes one input size only: exported at {s}x{s}")
    lines.append("onnxruntime (CPU) against PyTorch, largest |difference| (float32):")
    for row in result.parity:
        cams = "" if row.cams_diff is None else f", cams {row.cams_diff:.2e}"
        lines.append(f"  {row.size[0]}x{row.size[1]}: logits {row.logits_diff:.2e}{cams}")
    verdict = "ok" if result.ok else "FAILED"
    lines.append(
        f"largest difference {result.max_diff:.2e} (tolerance {PARITY_TOL:.0e}): {verdict}"
    )
    return lines
