"""Training loop, checkpoints and metrics log for the gapnet classifiers.

`train(TrainConfig(...))` trains one model on one dataset and leaves in ``out_dir``:

- ``checkpoint.safetensors``: model weights, optimizer state and RNG state as tensors; the
  TrainConfig, the ModelConfig and the train state (epoch, step, schedule, metrics so far) as JSON
  in the safetensors metadata. Nothing is pickled, so loading a checkpoint never runs code.
  Written atomically (temp file in the same folder, fsync, rename) at the end of every epoch and
  on Ctrl-C, at the exact step reached.
- ``config.json``: the same configs, for humans.
- ``metrics.jsonl``: one JSON object per epoch.

Runs are deterministic: the batch order of epoch e comes from a generator seeded by (seed, e), the
augmentation and dropout of step k from generators seeded by (seed, e, k). A run resumed from any
saved step therefore repeats the uninterrupted run exactly (bitwise on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gapnet import checkpoint
from gapnet.checkpoint import CHECKPOINT, CONFIG_JSON, METRICS
from gapnet.inference import evaluate, predict_proba

__all__ = [
    "CHECKPOINT",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "load_checkpoint",
    "lr_at",
    "predict_proba",
    "train",
]


OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("onecycle", "cosine", "constant")
AUGMENTATIONS = ("none", "shift", "canvas")
AMP_MODES = ("auto", "bf16", "off")
CHANNELS_LAST_MODES = ("auto", "on", "off")

# Fields that may differ between a checkpoint's config and the config that resumes it: none of
# them changes what is computed, only how long, where and how verbosely.
RESUMABLE_CHANGES = ("epochs", "out_dir", "threads", "log_every")

_ONECYCLE_START = 1 / 25  # onecycle starts (and its warmup ramps up from) lr/25, as torch's
_ONECYCLE_END = 1 / 25e4  # ... and anneals to lr/25/1e4 (OneCycleLR's div_factors)

# Streams of the per-epoch/per-step seeds; SeedSequence entropy always has 4 words, so no two
# streams or steps share a seed.
_ORDER, _AUGMENT, _GLOBAL = 1, 2, 3


# --------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved in its checkpoint and config.json.

    Args:
        (each field is commented where it is declared)

    Example:
        >>> cfg = TrainConfig(model="convnet-tiny", epochs=3, train_size=1000)
        >>> TrainConfig.from_dict(cfg.to_dict()) == cfg
        True
        >>> TrainConfig.from_dict({"epoch": 3})
        Traceback (most recent call last):
        ...
        ValueError: TrainConfig: unknown key 'epoch'; known keys: data, image_size, ...
    """

    # data
    data: str = "mnist-5k"  # gapnet.data.load spec: "mnist-5k", "digits", "idx:DIR", "cifar10:DIR"
    image_size: int | None = None  # rescale images to S x S; None: keep the dataset's size
    train_size: int | None = None  # stratified subset of the train split (sweeps: 250/1000/4000)
    split_seed: int = 0  # train/test split where the data has none fixed (keep 0: canvas_mnist's)
    # model
    model: str = "convnet"  # gapnet.models name: "convnet", "convnet-tiny", "nin"
    head: str = "gap"  # "fc", "fc-dropout", "gap", "gap-fc", "gmp", "avgmax", "catavgmax", "gem"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields: widths..
    # optimisation
    epochs: int = 10  # passes over the training set
    batch_size: int = 128  # images per optimizer step (the last step of an epoch may get fewer)
    optimizer: str = "adamw"  # "adamw", or "sgd" (with momentum / nesterov below)
    lr: float = 3e-3  # peak learning rate
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # SGD: Nesterov momentum
    weight_decay: float = 5e-2  # AdamW decoupled / SGD L2; only on weights with >= 2 dims
    schedule: str = "onecycle"  # "onecycle" (lr/25 -> lr -> ~0), "cosine" (-> 0), "constant"
    warmup: float = 0.2  # fraction of all steps spent ramping the lr up linearly (0: none)
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    grad_clip: float = 0.0  # clip the global gradient norm to this; 0: off
    seed: int = 0  # model init, subset, batch order, augmentation and dropout
    # augmentation (of training batches only; seeded per step)
    augmentation: str = "none"  # "none", "shift" (translate), "canvas" (place on a blank canvas)
    shift: int = 2  # "shift": max pixels moved along x and y
    canvas_size: tuple[int, int] = (28, 56)  # "canvas": (min, max) side S, one S per batch
    distractors: int = 0  # "canvas": stroke-like crops of other images pasted per canvas
    # runtime (how, not what)
    device: str = "auto"  # "auto" (cuda when present), "cpu", "cuda", "cuda:1", ...
    amp: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; "bf16"; "off"
    channels_last: str = "auto"  # "auto": channels_last memory format on CUDA; "on"; "off"
    threads: int = 0  # torch.set_num_threads for the run; 0: every core this process may use
    # output
    out_dir: str = ""  # run folder; "": runs/<model>-<head>
    eval_every: int = 1  # evaluate on the test split every N epochs (and after the last)
    eval_batch_size: int = 256  # images per evaluation batch (on CPUs 128-256 beat 512)
    log_every: int = 20  # steps between progress-bar updates (each one syncs the device)

    def __post_init__(self) -> None:
        for name in ("data", "model", "head", "device", "out_dir"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"TrainConfig.{name} must be a string, got {self._got(name)}")
        if not self.data or not self.model or not self.head:
            empty = next(n for n in ("data", "model", "head") if not getattr(self, n))
            raise ValueError(f"TrainConfig.{empty} must not be empty")
        for name in ("image_size", "train_size"):
            if getattr(self, name) is not None:
                self._int(name, 1)
        for name, low in (
            ("split_seed", 0), ("epochs", 0), ("batch_size", 1), ("seed", 0), ("shift", 0),
            ("distractors", 0), ("threads", 0), ("eval_every", 1), ("eval_batch_size", 1),
            ("log_every", 1),
        ):  # fmt: skip
            self._int(name, low)
        for name in ("lr", "momentum", "weight_decay", "label_smoothing", "grad_clip", "warmup"):
            self._float(name)
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if not 0 <= self.warmup <= 1:
            raise ValueError(f"TrainConfig.warmup must be a fraction in [0, 1], got {self.warmup}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(
                f"TrainConfig.label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"TrainConfig.nesterov must be a bool, got {self._got('nesterov')}")
        for name, choices in (
            ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("augmentation", AUGMENTATIONS),
            ("amp", AMP_MODES), ("channels_last", CHANNELS_LAST_MODES),
        ):  # fmt: skip
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"TrainConfig.{name} must be one of {', '.join(map(repr, choices))}, "
                    f"got {self._got(name)}"
                )
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("TrainConfig: nesterov=True needs momentum > 0, got momentum=0")
        cs = self.canvas_size
        if (
            not isinstance(cs, (tuple, list))
            or len(cs) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in cs)
            or cs[0] > cs[1]
        ):
            raise ValueError(
                f"TrainConfig.canvas_size must be (min, max) positive ints with min <= max, "
                f"got {cs!r}"
            )
        self.canvas_size = (int(cs[0]), int(cs[1]))
        if not isinstance(self.model_overrides, dict):
            raise ValueError(
                f"TrainConfig.model_overrides must be a dict, got {self._got('model_overrides')}"
            )
        try:  # JSON-normalised (tuples become lists), so a reloaded config compares equal
            self.model_overrides = json.loads(json.dumps(self.model_overrides))
        except (TypeError, ValueError) as e:
            raise ValueError(f"TrainConfig.model_overrides must be JSON-serialisable: {e}") from e

    def _got(self, name: str) -> str:
        value = getattr(self, name)
        return f"{value!r} ({type(value).__name__})"

    def _int(self, name: str, low: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"TrainConfig.{name} must be an int >= {low}, got {self._got(name)}")
        setattr(self, name, int(value))

    def _float(self, name: str) -> None:
        value = getattr(self, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float, np.integer, np.floating))
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(
                f"TrainConfig.{name} must be a finite number >= 0, got {self._got(name)}"
            )
        setattr(self, name, float(value))

    @property
    def run_dir(self) -> Path:
        """The folder this run writes to: `out_dir`, or runs/<model>-<head> when it is empty."""
        return Path(self.out_dir) if self.out_dir else Path("runs") / f"{self.model}-{self.head}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (tuples as lists)."""
        d = dataclasses.asdict(self)
        d["canvas_size"] = list(self.canvas_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """The config from `to_dict`'s output; missing keys take defaults, unknown keys fail."""
        if not isinstance(d, dict):
            raise ValueError(f"TrainConfig.from_dict needs a dict, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in known]
        if unknown:
            raise ValueError(
                f"TrainConfig: unknown key{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}; known keys: {', '.join(known)}"
            )
        return cls(**d)


def _describe_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`name: saved -> now` for each field that differs, except those a resume may change."""
    keys = [*saved, *(k for k in now if k not in saved)]
    return [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
        for k in keys
        if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k)
    ]


# --------------------------------------------------------------------------- results


@dataclass
class TrainResult:
    """What `train` returns.

    Args:
        metrics: one dict per epoch, as in metrics.jsonl (test_loss/test_acc None when that
            epoch was not evaluated).
        train_acc, train_loss: of the final model on the (clean, un-augmented) training images.
        test_acc, test_loss: of the final model on the test split.
        train_seconds: time spent in training steps, over all sessions of the run.
        param_counts: the model's parameter counts (`param_counts()`; at least "total").
        checkpoint: path of the final checkpoint.
        model: the trained model, in eval mode.
        config: the run's TrainConfig.
    """

    metrics: list[dict[str, Any]]
    train_acc: float
    train_loss: float
    test_acc: float
    test_loss: float
    train_seconds: float
    param_counts: dict[str, int]
    checkpoint: Path
    model: nn.Module
    config: TrainConfig


@dataclass
class _State:
    """Where a run is; everything in it goes into the checkpoint."""

    epoch: int = 0  # epoch in progress, 0-based; == epochs once the run is complete
    step: int = 0  # optimizer steps done in that epoch
    global_step: int = 0  # optimizer steps done in all
    seconds: float = 0.0  # training seconds of the finished epochs
    epoch_seconds: float = 0.0  # training seconds so far in the epoch in progress
    seen: int = 0  # training images seen in the epoch in progress
    lr: float = 0.0  # learning rate of the last step
    metrics: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- schedule


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total_steps`.

    Linear warmup over the first ``warmup * total_steps`` steps (from lr/25 for "onecycle", from
    0 otherwise), then for "onecycle" and "cosine" a half cosine down to lr/25/1e4 or 0; the last
    step never gets exactly 0.

    Args:
        cfg: gives lr, schedule and warmup.
        step: the step about to be taken.
        total_steps: steps of the whole run (epochs x steps per epoch).

    Example:
        >>> cfg = TrainConfig(lr=1.0, schedule="cosine", warmup=0.5)
        >>> [round(lr_at(cfg, s, 4), 3) for s in range(4)]
        [0.5, 1.0, 1.0, 0.5]
    """
    total = max(total_steps, 1)
    warm = round(cfg.warmup * total)
    start = _ONECYCLE_START if cfg.schedule == "onecycle" else 0.0
    if step < warm:
        return cfg.lr * (start + (1 - start) * (step + 1) / warm)
    if cfg.schedule == "constant":
        return cfg.lr
    end = _ONECYCLE_END if cfg.schedule == "onecycle" else 0.0
    q = (step - warm) / max(total - warm, 1)  # in [0, 1): the last step stays above `end`
    return cfg.lr * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * q)))


# --------------------------------------------------------------------------- models


def _create_model(
    cfg: TrainConfig, num_classes: int, in_chans: int, image_size: tuple[int, int]
) -> nn.Module:
    from gapnet import models

    overrides = dict(cfg.model_overrides)
    if image_size[0] == image_size[1]:  # size the fc heads for the data (GAP heads take any)
        overrides.setdefault("input_size", image_size[0])
    if cfg.augmentation == "canvas" and cfg.head in models.FC_HEADS:
        raise ValueError(
            f"TrainConfig: head {cfg.head!r} takes only one input size, but augmentation "
            "'canvas' varies it; use a global-pooling head or another augmentation"
        )
    return models.create(
        cfg.model, num_classes=num_classes, in_chans=in_chans, head=cfg.head, **overrides
    )


def _model_config(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(
            f"train: the model ({type(model).__name__}) has no .config with to_dict(); "
            "checkpoints need it to rebuild the model"
        )
    return dict(config.to_dict())


def _param_counts(model: nn.Module) -> dict[str, int]:
    counts = getattr(model, "param_counts", None)
    if callable(counts):
        return dict(counts())
    return {"total": sum(p.numel() for p in model.parameters())}


# --------------------------------------------------------------------------- checkpoints


def load_checkpoint(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """The model, TrainConfig and train state saved in a checkpoint, for eval and predict.

    Reads no pickle and runs no code from the file: weights are safetensors, configs are JSON.

    Args:
        path: a ``checkpoint.safetensors``, or the run folder holding one.
        device: where to put the model.

    Returns:
        the model in eval mode; the run's TrainConfig; the state: epoch (epochs done), step (steps
        done in the epoch in progress), global_step, metrics (one dict per epoch), complete, ...

    Raises:
        FileNotFoundError: no such file. ValueError: the file is truncated, corrupt, or not a
        gapnet checkpoint.

    Example:
        >>> load_checkpoint("no/such/run")
        Traceback (most recent call last):
        ...
        FileNotFoundError: checkpoint 'no/such/run/checkpoint.safetensors' not found
    """
    ckpt, train_cfg = _read_run(path)
    return ckpt.build_model(device), train_cfg, ckpt.state


def _read_run(path: str | os.PathLike[str]) -> tuple[checkpoint.Checkpoint, TrainConfig]:
    """A training checkpoint and its TrainConfig; ValueError naming the file if either is bad."""
    ckpt = checkpoint.load(path)
    try:
        train_cfg = TrainConfig.from_dict(ckpt.train_config)
        missing = [f.name for f in dataclasses.fields(_State) if f.name not in ckpt.state]
        if missing:
            raise KeyError(f"state lacks {', '.join(missing)}")
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"checkpoint {str(ckpt.path)!r} is corrupt: bad metadata ({e})") from None
    return ckpt, train_cfg


def _save_checkpoint(
    path: Path,
    cfg: TrainConfig,
    model: nn.Module,
    model_cfg: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    st: _State,
    accumulators: dict[str, Tensor],
    steps_per_epoch: int,
    train_images: int,
    classes: list[str],
) -> None:
    tensors: dict[str, Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
    optim, optim_scalars = checkpoint.optimizer_tensors(optimizer)
    tensors.update(optim)
    tensors.update(checkpoint.rng_tensors())
    tensors.update({f"train.{k}": v for k, v in accumulators.items()})
    state = {
        **dataclasses.asdict(st),
        "steps_per_epoch": steps_per_epoch,
        "train_images": train_images,
        "scheduler": {
            "name": cfg.schedule,
            "total_steps": cfg.epochs * steps_per_epoch,
            "step": st.global_step,
            "lr": st.lr,
        },
        "complete": st.epoch >= cfg.epochs,
        "optimizer_scalars": optim_scalars,
    }
    metadata = {
        "train_config": cfg.to_dict(),
        "model_config": model_cfg,
        "state": state,
        "classes": classes,
        "torch": torch.__version__,
    }
    checkpoint.save(path, tensors, metadata)


# --------------------------------------------------------------------------- training


def _seed(*words: int) -> int:
    """A 63-bit seed mixed from a fixed number of words (no two word tuples collide)."""
    a, b = np.random.SeedSequence(list(words)).generate_state(2)
    return (int(a) << 31) ^ int(b)


def _generator(*words: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*words))


def _resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(cfg.device)
    except RuntimeError as e:
        raise ValueError(f"TrainConfig.device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TrainConfig.device is {cfg.device!r}, but CUDA is not available here")
    return device


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # decay weights only, as nanoGPT: biases, norm scales and GeM's p are left alone
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Progress:
    """Progress on stderr: a live line on a terminal, and one line per epoch."""

    def __init__(self, enabled: bool, epochs: int, steps: int) -> None:
        self.enabled, self.epochs, self.steps = enabled, epochs, steps
        self.live = enabled and sys.stderr.isatty()
        self.width = 0

    def _emit(self, text: str, end: str) -> None:
        pad = " " * max(self.width - len(text), 0) if self.live else ""
        sys.stderr.write(("\r" if self.live else "") + text + pad + end)
        sys.stderr.flush()
        self.width = 0 if end else len(text)

    def step(self, epoch: int, step: int, loss: float, acc: float, ips: float, lr: float) -> None:
        if self.live:
            self._emit(
                f"epoch {epoch + 1}/{self.epochs} step {step}/{self.steps} loss {loss:.4f} "
                f"acc {100 * acc:.1f}% {ips:,.0f} img/s lr {lr:.2e}",
                "",
            )

    def epoch(self, row: dict[str, Any]) -> None:
        if self.enabled:
            test = (
                f" test_loss {row['test_loss']:.4f} test_acc {100 * row['test_acc']:.2f}%"
                if row["test_acc"] is not None
                else ""
            )
            self._emit(
                f"epoch {row['epoch']}/{self.epochs} loss {row['train_loss']:.4f} "
                f"acc {100 * row['train_acc']:.2f}%{test} {row['seconds']:.1f}s",
                "\n",
            )

    def message(self, text: str) -> None:
        """Always shown: interrupts and resumes matter even without a progress bar."""
        if self.width:
            self._emit("", "\n")
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


class _SigintGuard:
    """Turn the first Ctrl-C into a request to stop at the next step boundary.

    A second Ctrl-C interrupts at once. Only possible in the main thread; elsewhere Ctrl-C
    raises KeyboardInterrupt as usual.
    """

    def __init__(self) -> None:
        self.requested = False
        self.previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        sys.stderr.write("\nCtrl-C: stopping after this step (press again to stop at once)\n")

    def __enter__(self) -> _SigintGuard:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


def _load_data(cfg: TrainConfig) -> tuple[Any, Any, list[str], int, tuple[int, int]]:
    """Train and test ImageSets, class names, input channels and image size."""
    from gapnet import data

    ds = data.load(cfg.data, seed=cfg.split_seed, size=cfg.image_size)
    train_set = ds.train
    if cfg.train_size is not None:
        if cfg.train_size > len(train_set):
            raise ValueError(
                f"TrainConfig.train_size is {cfg.train_size}, but {cfg.data!r} has only "
                f"{len(train_set)} training images"
            )
        train_set = data.stratified_subset(train_set, cfg.train_size, seed=cfg.seed)
    if len(train_set) == 0 or len(ds.test) == 0:
        raise ValueError(f"dataset {cfg.data!r} has an empty train or test split")
    return train_set, ds.test, ds.classes, ds.in_chans, ds.image_size


def _augment(cfg: TrainConfig, x: Tensor, g: torch.Generator) -> Tensor:
    from gapnet import data

    if cfg.augmentation == "shift":
        return data.random_shift(x, cfg.shift, g)
    if cfg.augmentation == "canvas":
        lo, hi = cfg.canvas_size
        return data.random_canvas(x, lo, hi, g, distractors=cfg.distractors)[0]
    return x


def _human_config(
    cfg: TrainConfig, model_cfg: dict[str, Any], counts: dict[str, int]
) -> dict[str, Any]:
    return {"train": cfg.to_dict(), "model": model_cfg, "param_counts": counts}


def train(
    cfg: TrainConfig,
    *,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train `cfg.model` with head `cfg.head` on `cfg.data`; checkpoint and log to the run folder.

    Seeds torch's global RNG (model init, dropout). Ctrl-C stops at the next step boundary,
    saves the checkpoint at exactly that step and re-raises KeyboardInterrupt; a second Ctrl-C
    stops at once (and keeps the last checkpoint if a step was half done).

    Args:
        cfg: the run.
        progress: show a progress bar and one line per epoch on stderr.
        resume: continue the run saved in `cfg.run_dir`. Its config must equal `cfg` except in
            `RESUMABLE_CHANGES` (epochs, out_dir, threads, log_every); a complete run just
            returns its result (or trains on, when `cfg.epochs` is larger).
        overwrite: start afresh even if the run folder already holds a checkpoint (which is
            otherwise an error, so that no run is lost by accident).
        on_step: called as ``on_step(epoch, step)`` after every optimizer step (epoch 0-based,
            step = steps done in that epoch); raising KeyboardInterrupt there stops the run
            as Ctrl-C does.

    Returns:
        a `TrainResult`.

    Example:
        >>> import tempfile
        >>> cfg = TrainConfig(data="digits", model="convnet-tiny", epochs=1, train_size=200,
        ...                   threads=1, out_dir=tempfile.mkdtemp())
        >>> result = train(cfg, progress=False)
        >>> [row["epoch"] for row in result.metrics], result.checkpoint.name
        ([1], 'checkpoint.safetensors')
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train needs a TrainConfig, got {type(cfg).__name__}")
    run_dir = cfg.run_dir
    ckpt = run_dir / CHECKPOINT
    device = _resolve_device(cfg)
    cuda = device.type == "cuda"
    amp = cfg.amp == "bf16" or (cfg.amp == "auto" and cuda)
    fmt = (
        torch.channels_last
        if cfg.channels_last == "on" or (cfg.channels_last == "auto" and cuda)
        else torch.contiguous_format
    )

    saved: checkpoint.Checkpoint | None = None
    if resume:
        if not ckpt.is_file():
            raise FileNotFoundError(
                f"cannot resume: no checkpoint {str(ckpt)!r}; start the run without resume"
            )
        saved, saved_cfg = _read_run(ckpt)
        diff = _describe_diff(saved_cfg.to_dict(), cfg.to_dict())
        if diff:
            raise ValueError(
                f"cannot resume {str(ckpt)!r} with a different config (only "
                f"{', '.join(RESUMABLE_CHANGES)} may change): " + "; ".join(diff)
            )
    elif ckpt.exists() and not overwrite:
        raise FileExistsError(
            f"{str(run_dir)!r} already holds a run ({CHECKPOINT}); resume it (resume=True), "
            "pick another out_dir, or pass overwrite=True to replace it"
        )

    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or _default_threads())
    try:
        train_set, test_set, classes, in_chans, image_size = _load_data(cfg)
        num_classes = len(classes)
        n = len(train_set)
        steps = -(-n // cfg.batch_size)
        total_steps = cfg.epochs * steps
        st = _State()
        torch.manual_seed(cfg.seed)
        if saved is None:
            model = _create_model(cfg, num_classes, in_chans, image_size)
            model_cfg = _model_config(model)
        else:
            tensors, state = saved.tensors, saved.state
            model_cfg = saved.model_config.to_dict()
            if state.get("train_images") != n or state.get("steps_per_epoch") != steps:
                raise ValueError(
                    f"cannot resume {str(ckpt)!r}: it was trained on {state.get('train_images')}"
                    f" images, {cfg.data!r} now gives {n}; the data has changed"
                )
            if state["epoch"] > cfg.epochs:
                raise ValueError(
                    f"cannot resume {str(ckpt)!r} with epochs={cfg.epochs}: it has already "
                    f"trained {state['epoch']} epochs"
                )
            model = saved.build_model().train()
            st = _State(**{f.name: state[f.name] for f in dataclasses.fields(_State)})
        model.to(device)
        cast(Any, model).to(memory_format=fmt)  # conv weights too (typeshed lacks the kwarg)
        optimizer = _make_optimizer(model, cfg)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        if saved is not None:
            checkpoint.load_optimizer(optimizer, tensors, state.get("optimizer_scalars", {}))
            checkpoint.restore_rng(tensors)
            loss_sum.copy_(tensors["train.loss_sum"])
            correct.copy_(tensors["train.correct"])

        counts = _param_counts(model)
        checkpoint.write_json(run_dir / CONFIG_JSON, _human_config(cfg, model_cfg, counts))
        checkpoint.write_jsonl(run_dir / METRICS, st.metrics)
        bar = _Progress(progress, cfg.epochs, steps)
        if saved is not None and st.epoch < cfg.epochs and progress:
            bar.message(f"resuming {ckpt} at epoch {st.epoch + 1}, step {st.step}/{steps}")

        x_train = train_set.images.to(device)  # (N, C, H, W), all of it: the sets are small
        y_train = train_set.labels.to(device)  # (N,)

        clock = {"start": time.perf_counter(), "before": st.epoch_seconds}

        def epoch_time() -> float:
            return clock["before"] + time.perf_counter() - clock["start"]

        def train_step(e: int, k: int, order: Tensor) -> None:
            """Optimizer step k of epoch e; everything random in it is seeded by (seed, e, k)."""
            idx = order[k * cfg.batch_size : (k + 1) * cfg.batch_size].to(device)  # (B,)
            g = _generator(cfg.seed, _AUGMENT, e, k)
            x = _augment(cfg, x_train[idx], g).contiguous(memory_format=fmt)  # (B, C, H, W)
            y = y_train[idx]  # (B,)
            torch.manual_seed(_seed(cfg.seed, _GLOBAL, e, k))  # dropout
            lr = lr_at(cfg, st.global_step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x).float()  # (B, K)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            loss_sum.add_(loss.detach().double() * len(y))  # no .item(): no device sync
            correct.add_((logits.detach().argmax(1) == y).sum())
            st.step, st.lr = k + 1, lr
            st.global_step += 1
            st.seen += len(y)
            st.epoch_seconds = epoch_time()

        def epoch_row(e: int) -> dict[str, Any]:
            """The metrics of epoch e, evaluated on the test split when it is due."""
            train_loss, train_acc = loss_sum.item() / st.seen, correct.item() / st.seen
            seconds = epoch_time()  # after .item(): the device has finished the epoch
            test_acc = test_loss = None
            if (e + 1) % cfg.eval_every == 0 or e + 1 == cfg.epochs:
                test_acc, test_loss = evaluate(
                    model, test_set.images, test_set.labels,
                    batch_size=cfg.eval_batch_size, amp=amp,
                )  # fmt: skip
            row = {
                "epoch": e + 1, "step": st.global_step,
                "train_loss": train_loss, "train_acc": train_acc,
                "test_loss": test_loss, "test_acc": test_acc,
                "lr": st.lr, "seconds": seconds,
            }  # fmt: skip
            return row

        def next_epoch(row: dict[str, Any]) -> None:
            st.epoch, st.step, st.seen, st.epoch_seconds = row["epoch"], 0, 0, 0.0
            st.seconds += row["seconds"]
            st.metrics = [*st.metrics, row]
            loss_sum.zero_()
            correct.zero_()

        def save() -> None:
            _save_checkpoint(
                ckpt, cfg, model, model_cfg, optimizer, st,
                {"loss_sum": loss_sum, "correct": correct}, steps, n, classes,
            )  # fmt: skip

        busy = False  # True while a step or an epoch's end is half done: no consistent state
        try:
            with _SigintGuard() as guard:
                model.train()
                while st.epoch < cfg.epochs:
                    e = st.epoch
                    order = torch.randperm(n, generator=_generator(cfg.seed, _ORDER, e, 0))
                    clock.update(start=time.perf_counter(), before=st.epoch_seconds)
                    for k in range(st.step, steps):
                        guard.check()
                        busy = True
                        train_step(e, k, order)
                        busy = False
                        if bar.live and (st.step % cfg.log_every == 0 or st.step == steps):
                            bar.step(
                                e, st.step, loss_sum.item() / st.seen, correct.item() / st.seen,
                                st.seen / max(st.epoch_seconds, 1e-9), st.lr,
                            )  # fmt: skip
                        if on_step is not None:
                            on_step(e, st.step)
                    guard.check()
                    row = epoch_row(e)
                    busy = True
                    next_epoch(row)
                    busy = False
                    bar.epoch(row)
                    save()
                    checkpoint.write_jsonl(run_dir / METRICS, st.metrics)
        except KeyboardInterrupt:
            if busy:
                bar.message(
                    f"interrupted in the middle of epoch {st.epoch + 1}, step {st.step + 1}; "
                    f"the last checkpoint {str(ckpt)!r} is kept"
                )
                raise
            save()
            bar.message(
                f"interrupted at epoch {st.epoch + 1}/{cfg.epochs}, step {st.step}/{steps}; "
                f"saved {str(ckpt)!r}. Resume with train(cfg, resume=True) "
                "(command line: the same arguments and --resume)"
            )
            raise

        if saved is None and cfg.epochs == 0:  # a 0-epoch run: keep its initial state
            save()
        train_acc_final, train_loss_final = evaluate(
            model, x_train, y_train, batch_size=cfg.eval_batch_size, amp=amp
        )  # the copies already on the device
        last = st.metrics[-1] if st.metrics else None
        if last is not None and last["test_acc"] is not None:
            test_acc_final, test_loss_final = last["test_acc"], last["test_loss"]
        else:
            test_acc_final, test_loss_final = evaluate(
                model, test_set.images, test_set.labels, batch_size=cfg.eval_batch_size, amp=amp
            )
        return TrainResult(
            metrics=st.metrics,
            train_acc=train_acc_final,
            train_loss=train_loss_final,
            test_acc=test_acc_final,
            test_loss=test_loss_final,
            train_seconds=st.seconds,
            param_counts=counts,
            checkpoint=ckpt,
            model=model.eval(),
            config=cfg,
        )
    finally:
        torch.set_num_threads(threads_before)
