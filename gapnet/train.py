"""Training: one model on one dataset, in one process or as DistributedDataParallel under torchrun.

`train(TrainConfig(...))` trains one model and leaves in its run folder (`TrainConfig.run_dir`):
``checkpoint.safetensors`` (weights, optimizer and RNG state, the configs and the train state;
`gapnet.checkpoint`), ``config.json`` (the same configs, for humans) and ``metrics.jsonl`` (one
JSON object per epoch). The checkpoint is written atomically at the end of every epoch and on
Ctrl-C, at the exact step reached; `train(cfg, resume=True)` continues from it.

The loop is four phases over one explicit state object (`_Run`): `_setup` (data, model,
optimizer, a restored checkpoint), `_run_epoch` (the optimizer steps of one epoch),
`_end_epoch` (metrics reduced over the processes, evaluation, checkpoint) and `_finish`.

Runs are deterministic: the batch order of epoch e comes from a generator seeded by (seed, e),
the augmentation and dropout of step k from generators seeded by (seed, e, k). A run resumed
from any saved step therefore repeats the uninterrupted run exactly (bitwise on CPU).

**More than one process.** ``torchrun --nproc_per_node=N -m gapnet train ...`` (and torchrun's
multi-node arguments) starts N copies; each sees torchrun's RANK/WORLD_SIZE/LOCAL_RANK and
joins one process group (``gloo`` on CPU, ``nccl`` on CUDA, one GPU per process). The model is
wrapped in DistributedDataParallel, which averages the gradients. ``batch_size`` is the GLOBAL
batch: every optimizer step takes the same ``batch_size`` images as a one-process run, split
across the processes (each gets about batch_size / N), so the same ``lr`` and ``epochs`` give
the same schedule and the same images per step; keep both as they are to reproduce a
one-process run. What differs is what per-process computation cannot share: BatchNorm
statistics are those of each process's share of the batch (PyTorch's SyncBatchNorm needs a
GPU), and each process draws its own augmentation, so N processes match one process within
noise, not bit for bit. Metrics are summed over the processes; only rank 0 writes files and
prints. Ctrl-C (or a killed process: torchrun stops the others) leaves the last checkpoint,
which every write replaces atomically; resume with the same command and ``--resume``.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from gapnet import checkpoint, data, models
from gapnet.checkpoint import CHECKPOINT, CONFIG_JSON, METRICS
from gapnet.config import Config, option
from gapnet.inference import evaluate, predict_proba
from gapnet.models import HEADS, eval_mode

__all__ = [
    "CHECKPOINT",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "load_checkpoint",
    "lr_at",
    "predict_proba",
    "read_run",
    "train",
]

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("onecycle", "cosine", "constant")
AUGMENTATIONS = ("none", "shift", "canvas", "scale")
AMP_MODES = ("auto", "bf16", "off")
CHANNELS_LAST_MODES = ("auto", "on", "off")

# Fields that may differ between a checkpoint's config and the config that resumes it: none of
# them changes what is computed, only how long, where and how verbosely.
RESUMABLE_CHANGES = ("epochs", "out_dir", "threads", "log_every", "workers")

_ONECYCLE_START = 1 / 25  # onecycle starts (and its warmup ramps up from) lr/25, as torch's
_ONECYCLE_END = 1 / 25e4  # ... and anneals to lr/25/1e4 (OneCycleLR's div_factors)

# Streams of the per-epoch/per-step seeds; SeedSequence entropy always has 4 words, so no two
# streams or steps share a seed.
_ORDER, _AUGMENT, _GLOBAL = 1, 2, 3


# --------------------------------------------------------------------------- config


@dataclass
class TrainConfig(Config):
    """Everything that defines a training run; saved in its checkpoint and config.json.

    Each field is one ``gapnet train`` flag of the same name (``--batch-size``); its comment is
    the flag's help.

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
    data: str = option("mnist-5k", nonempty=True)  # dataset: mnist-5k, digits, folder:DIR, ...
    image_size: int | None = option(None, low=1)  # resize images to S x S; None: their own size
    train_size: int | None = option(None, low=1)  # stratified subset of the training split
    split_seed: int = option(0, low=0)  # train/test split where the data has none fixed
    # model
    model: str = option("convnet", nonempty=True)  # backbone: convnet, nin, convnet-scale, ..
    head: str = option("gap", choices=HEADS)  # classifier head: gap, fc, gap-fc, gmp, gem, ...
    model_overrides: dict[str, Any] = option(default_factory=dict)  # ModelConfig fields: widths..
    # optimisation
    epochs: int = option(10, low=0)  # passes over the training set
    batch_size: int = option(128, low=1)  # images per optimizer step, over all processes
    optimizer: str = option("adamw", choices=OPTIMIZERS)  # adamw, or sgd (momentum, nesterov)
    lr: float = option(3e-3, above=0)  # peak learning rate
    momentum: float = option(0.9, low=0)  # SGD momentum
    nesterov: bool = True  # SGD: Nesterov momentum
    weight_decay: float = option(5e-2, low=0)  # AdamW decoupled / SGD L2, weights with >= 2 dims
    schedule: str = option("onecycle", choices=SCHEDULES)  # onecycle, cosine (to 0), constant
    warmup: float = option(0.2, low=0, high=1)  # fraction of the steps ramping the lr up
    label_smoothing: float = option(0.0, low=0, below=1)  # cross-entropy label smoothing
    grad_clip: float = option(0.0, low=0)  # clip the global gradient norm to this; 0: off
    frozen_bn_epochs: int = option(0, low=0)  # last N epochs: BatchNorm stats frozen (averaged)
    seed: int = option(0, low=0)  # model init, subset, batch order, augmentation and dropout
    # augmentation (of training batches only; seeded per step)
    augmentation: str = option("none", choices=AUGMENTATIONS)  # none, shift, canvas, or scale
    shift: int = option(2, low=0)  # "shift": max pixels moved along x and y
    canvas_size: tuple[int, int] = option((28, 56), low=1)  # "canvas": MIN,MAX side, per batch
    scale_size: tuple[int, int] = option((20, 112), low=1)  # "scale": MIN,MAX side of the digit
    canvas_ratio: float = option(1.0, low=1)  # "scale": canvas side up to this times the digit's
    distractors: int = option(0, low=0)  # "canvas", "scale": stroke-like crops per canvas
    # runtime (how, not what)
    device: str = option("auto", nonempty=True)  # auto (cuda when present), cpu, cuda, cuda:1
    amp: str = option("auto", choices=AMP_MODES)  # auto: bf16 autocast on CUDA; bf16; off
    channels_last: str = option("auto", choices=CHANNELS_LAST_MODES)  # auto: on CUDA; on; off
    threads: int = option(0, low=0)  # torch threads per process; 0: the cores it may use
    workers: int = option(0, low=0)  # DataLoader processes decoding images; 0: in the loop
    # output
    out_dir: str = ""  # run folder; "": runs/<model>-<head>
    eval_every: int = option(1, low=1)  # evaluate on the test split every N epochs (and last)
    eval_batch_size: int = option(256, low=1)  # images per evaluation batch
    log_every: int = option(20, low=1)  # steps between progress updates (each syncs)

    def validate(self) -> None:
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("TrainConfig: nesterov=True needs momentum > 0, got momentum=0")
        if self.canvas_size[0] > self.canvas_size[1]:
            self.fail("canvas_size", "must be (min, max) with min <= max")
        if self.scale_size[0] > self.scale_size[1]:
            self.fail("scale_size", "must be (min, max) with min <= max")

    @property
    def run_dir(self) -> Path:
        """The folder this run writes to: `out_dir`, or runs/<model>-<head> when it is empty."""
        return Path(self.out_dir) if self.out_dir else Path("runs") / f"{self.model}-{self.head}"


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


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Dist:
    """Which process of how many this is: torchrun's RANK, WORLD_SIZE and LOCAL_RANK."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        """The process's place as torchrun sets it in the environment (one process without)."""

        def number(name: str, default: int) -> int:
            text = os.environ.get(name, str(default))
            try:
                return int(text)
            except ValueError:
                raise ValueError(
                    f"environment variable {name} must be an int, got {text!r}"
                ) from None

        world = number("WORLD_SIZE", 1)
        rank, local = number("RANK", 0), number("LOCAL_RANK", 0)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"torchrun environment: RANK={rank} is not in [0, WORLD_SIZE={world})")
        return cls(rank, world, local)


@contextmanager
def _process_group(procs: Dist, device: torch.device) -> Iterator[None]:
    """Join the process group of a multi-process run (gloo on CPU, nccl on CUDA) for its span."""
    joined = procs.world > 1 and not dist.is_initialized()
    if joined:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=procs.rank, world_size=procs.world)
    try:
        yield
        if joined:  # leave together: a process that tears gloo down early can abort the other
            dist.barrier()
    finally:
        if joined:
            dist.destroy_process_group()


def _all_sum(values: list[float], device: torch.device, procs: Dist) -> list[float]:
    """The sum of each value over the processes (the values themselves in one process)."""
    if procs.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class StepBatches(torch.utils.data.Sampler[list[int]]):
    """This process's share of each step's batch, for one epoch, from step `start` on.

    The global batches are the same in every process: `order` (a permutation; None keeps the
    data's order) cut into runs of `batch_size` images. Images of different sizes never share a
    batch: the images of each size keep their relative order and are cut into batches of their
    own, and the batches are taken in the order of their first image. Each process then takes
    every `world`-th image of each global batch (torch's DistributedSampler shards single images
    instead, which would mix sizes and change what one step sees with the number of processes).
    With `pad`, a batch smaller than `world` is repeated so that no process gets nothing (DDP
    needs every process in every step); evaluation uses pad=False and counts each image once.

    Example:
        >>> sizes = np.array([[8, 8]] * 5)
        >>> list(StepBatches(sizes, 2, torch.tensor([4, 3, 2, 1, 0])))
        [[4, 3], [2, 1], [0]]
        >>> list(StepBatches(sizes, 2, None, rank=1, world=2))
        [[1], [3], [4]]
    """

    def __init__(
        self,
        sizes: np.ndarray,
        batch_size: int,
        order: Tensor | None,
        *,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
        pad: bool = True,
    ) -> None:
        n = len(sizes)
        idx = np.arange(n) if order is None else order.numpy()
        keys = sizes[idx] if n else np.zeros((0, 2), np.int64)  # (N, 2) in visiting order
        batches: list[tuple[int, np.ndarray]] = []  # (position of the first image, batch)
        for key in np.unique(keys, axis=0):
            pos = np.flatnonzero((keys == key).all(axis=1))  # positions of this size, in order
            for s in range(0, len(pos), batch_size):
                chunk = pos[s : s + batch_size]
                batches.append((int(chunk[0]), idx[chunk]))
        batches.sort(key=lambda b: b[0])
        self.steps = len(batches)
        self._local: list[list[int]] = []
        for _, b in batches[start:]:
            if pad and len(b) < world:
                b = np.resize(b, world)  # repeats the batch's own images
            self._local.append(b[rank::world].tolist())

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._local)

    def __len__(self) -> int:
        return len(self._local)


# --------------------------------------------------------------------------- the run


@dataclass
class _Run:
    """Everything a training run holds while it runs; the phases below read and change it."""

    cfg: TrainConfig
    procs: Dist
    device: torch.device
    amp: bool  # bf16 autocast
    fmt: torch.memory_format  # of the inputs (and conv weights)
    train_set: data.ImageDataset
    test_set: data.ImageDataset
    classes: list[str]
    model: nn.Module  # the GapNet
    net: nn.Module  # what the steps call: DistributedDataParallel(model), or model
    model_cfg: dict[str, Any]
    optimizer: torch.optim.Optimizer
    steps: int  # optimizer steps per epoch
    state: _State
    loss_sum: Tensor  # this process's summed training loss in the epoch in progress
    correct: Tensor  # ... and its correct predictions
    bar: _Progress
    ckpt: Path
    resumed: bool
    counts: dict[str, int] = field(default_factory=dict)
    clock: float = 0.0  # perf_counter when this session's part of the epoch began
    busy: bool = False  # a step or an epoch's end is half done: no consistent state to save
    skipped: set[str] = field(default_factory=set)  # unreadable image files met so far
    stopping: bool = False  # every process agreed to stop at this step (so it can be saved)

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps

    def epoch_time(self, before: float) -> float:
        return before + time.perf_counter() - self.clock


def _setup(cfg: TrainConfig, procs: Dist, resume: bool, overwrite: bool, progress: bool) -> _Run:
    """Phase 1: check the run folder, open the data, build (or restore) model and optimizer."""
    ckpt = cfg.run_dir / CHECKPOINT
    saved = _saved_run(cfg, ckpt, resume, overwrite)
    device = _resolve_device(cfg, procs)
    cuda = device.type == "cuda"
    fmt = torch.channels_last if cfg.channels_last == "on" or (
        cfg.channels_last == "auto" and cuda
    ) else torch.contiguous_format  # fmt: skip
    bar = _Progress(progress and procs.main, cfg.epochs, 0, quiet=not procs.main)
    train_set, test_set, classes = _open_data(cfg)
    torch.manual_seed(cfg.seed)
    model = saved.build_model().train() if saved else _create_model(cfg, classes, train_set)
    train_set, test_set = _fit_sizes(model, train_set, test_set, bar)
    steps = StepBatches(train_set.sizes, cfg.batch_size, None).steps
    model.to(device)
    cast(Any, model).to(memory_format=fmt)  # conv weights too (typeshed lacks the kwarg)
    net: nn.Module = model
    if procs.world > 1:
        ids = [device.index] if cuda else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    run = _Run(
        cfg, procs, device, cfg.amp == "bf16" or (cfg.amp == "auto" and cuda), fmt,
        train_set, test_set, classes, model, net, _model_config(model),
        _make_optimizer(model, cfg), steps, _State(),
        torch.zeros((), dtype=torch.float64, device=device),
        torch.zeros((), dtype=torch.int64, device=device),
        bar, ckpt, saved is not None,
    )  # fmt: skip
    bar.steps = steps
    if saved is not None:
        _restore(run, saved)
    run.counts = _param_counts(model)
    run.skipped.update(train_set.unreadable)
    if procs.main:
        human = {"train": cfg.to_dict(), "model": run.model_cfg, "param_counts": run.counts}
        checkpoint.write_json(cfg.run_dir / CONFIG_JSON, human)
        checkpoint.write_jsonl(cfg.run_dir / METRICS, run.state.metrics)
    return run


def _saved_run(
    cfg: TrainConfig, ckpt: Path, resume: bool, overwrite: bool
) -> checkpoint.Checkpoint | None:
    """The checkpoint to resume (checked against `cfg`), or None for a fresh run."""
    if not resume:
        if ckpt.exists() and not overwrite:
            raise FileExistsError(
                f"{str(cfg.run_dir)!r} already holds a run ({CHECKPOINT}); resume it "
                "(resume=True), pick another out_dir, or pass overwrite=True to replace it"
            )
        return None
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"cannot resume: no checkpoint {str(ckpt)!r}; start the run without resume"
        )
    saved, saved_cfg = read_run(ckpt)
    diff = _describe_diff(saved_cfg.to_dict(), cfg.to_dict())
    if diff:
        raise ValueError(
            f"cannot resume {str(ckpt)!r} with a different config (only "
            f"{', '.join(RESUMABLE_CHANGES)} may change): " + "; ".join(diff)
        )
    if saved.state["epoch"] > cfg.epochs:
        raise ValueError(
            f"cannot resume {str(ckpt)!r} with epochs={cfg.epochs}: it has already trained "
            f"{saved.state['epoch']} epochs"
        )
    return saved


def _restore(run: _Run, saved: checkpoint.Checkpoint) -> None:
    """Put a saved run's optimizer, RNG, counters and accumulators back (every process)."""
    state, tensors = saved.state, saved.tensors
    n = len(run.train_set)
    if state.get("train_images") != n or state.get("steps_per_epoch") != run.steps:
        raise ValueError(
            f"cannot resume {str(run.ckpt)!r}: it was trained on {state.get('train_images')} "
            f"images, {run.cfg.data!r} now gives {n}; the data has changed"
        )
    checkpoint.load_optimizer(run.optimizer, tensors, state.get("optimizer_scalars", {}))
    checkpoint.restore_rng(tensors)
    run.state = _State(**{f.name: state[f.name] for f in dataclasses.fields(_State)})
    if run.procs.main:  # the saved sums are of all processes: rank 0 carries them on
        run.loss_sum.copy_(tensors["train.loss_sum"])
        run.correct.copy_(tensors["train.correct"])
    else:
        run.state.seen = 0
    if run.state.epoch < run.cfg.epochs:
        run.bar.message(
            f"resuming {run.ckpt} at epoch {run.state.epoch + 1}, step {run.state.step}/{run.steps}"
        )


def _run_epoch(run: _Run, guard: _SigintGuard, on_step: Callable[[int, int], None] | None) -> None:
    """Phase 2: the remaining optimizer steps of epoch `run.state.epoch`."""
    cfg, st = run.cfg, run.state
    e = st.epoch
    order = torch.randperm(len(run.train_set), generator=_generator(cfg.seed, _ORDER, e, 0))
    batches = StepBatches(run.train_set.sizes, cfg.batch_size, order, rank=run.procs.rank,
                          world=run.procs.world, start=st.step)  # fmt: skip
    run.clock, before = time.perf_counter(), st.epoch_seconds
    run.net.train()
    if cfg.frozen_bn_epochs:  # the epoch before: average the statistics; then keep them
        first_frozen = cfg.epochs - cfg.frozen_bn_epochs
        if e == first_frozen - 1:
            average_batchnorm(run.net, reset=st.step == 0)
        elif e >= first_frozen:
            freeze_batchnorm(run.net)
    for k, batch in enumerate(_loader(run, run.train_set, batches), st.step):
        _stop_if_asked(run, guard, every=cfg.log_every)
        run.busy = True
        _train_step(run, batch, e, k)
        st.epoch_seconds = run.epoch_time(before)
        run.busy = False
        if run.bar.live and (st.step % cfg.log_every == 0 or st.step == run.steps):
            seen, rate = max(st.seen, 1), st.seen * run.procs.world / max(st.epoch_seconds, 1e-9)
            loss, acc = run.loss_sum.item() / seen, run.correct.item() / seen
            run.bar.step(e, st.step, loss, acc, rate, st.lr)
        if on_step is not None:
            on_step(e, st.step)
    _stop_if_asked(run, guard, every=1)


def _train_step(run: _Run, batch: data.Batch, e: int, k: int) -> None:
    """Optimizer step k of epoch e; everything random in it is seeded by (seed, e, k, process)."""
    cfg, st, device = run.cfg, run.state, run.device
    _note_skipped(run, batch)
    stream = k * run.procs.world + run.procs.rank  # one process: k
    lr = lr_at(cfg, st.global_step, run.total_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    y = batch.labels.to(device, non_blocking=True)  # (B,)
    if len(y):
        x = batch.images.to(device, non_blocking=True)  # (B, C, H, W)
        x = _augment(cfg, x, _generator(cfg.seed, _AUGMENT, e, stream)).contiguous(
            memory_format=run.fmt
        )
        torch.manual_seed(_seed(cfg.seed, _GLOBAL, e, stream))  # dropout
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.amp):
            logits = run.net(x).float()  # (B, K)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        run.loss_sum.add_(loss.detach().double() * len(y))  # no .item(): no device sync
        run.correct.add_((logits.detach().argmax(1) == y).sum())
    elif run.procs.world > 1:  # every image unreadable: take part in the gradient average
        loss = sum((p.sum() for p in run.net.parameters()), torch.zeros((), device=device)) * 0
    if len(y) or run.procs.world > 1:
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
        run.optimizer.step()
    st.step, st.lr = k + 1, lr
    st.global_step += 1
    st.seen += len(y)


def _stop_if_asked(run: _Run, guard: _SigintGuard, every: int) -> None:
    """Raise KeyboardInterrupt at this step boundary if Ctrl-C was pressed (in any process:
    under torchrun the processes agree every `every` steps, so all stop at the same step)."""
    if run.procs.world == 1:
        guard.check()
    elif run.state.step % every == 0:
        flag = torch.tensor([float(guard.requested)], device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            run.stopping = True
            raise KeyboardInterrupt


def _end_epoch(run: _Run) -> dict[str, Any]:
    """Phase 3: the epoch's metrics (over all processes), evaluated when due; state moves on."""
    cfg, st = run.cfg, run.state
    e = st.epoch
    loss_sum, correct, seen = _all_sum(
        [run.loss_sum.item(), float(run.correct.item()), float(st.seen)], run.device, run.procs
    )
    seconds = st.epoch_seconds  # the device has finished the epoch: .item() synced it
    test_acc = test_loss = None
    if (e + 1) % cfg.eval_every == 0 or e + 1 == cfg.epochs:
        test_acc, test_loss = _evaluate(run, run.test_set)
    row = {
        "epoch": e + 1, "step": st.global_step,
        "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
        "test_loss": test_loss, "test_acc": test_acc, "lr": st.lr, "seconds": seconds,
    }  # fmt: skip
    run.busy = True
    st.epoch, st.step, st.seen, st.epoch_seconds = e + 1, 0, 0, 0.0
    st.seconds += seconds
    st.metrics = [*st.metrics, row]
    run.loss_sum.zero_()
    run.correct.zero_()
    run.busy = False
    return row


def _evaluate(run: _Run, dataset: data.ImageDataset) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of rank 0's model on `dataset`, shared by the processes."""
    if run.procs.world > 1:  # evaluate (and save) rank 0's BatchNorm statistics everywhere
        for b in run.model.buffers():
            dist.broadcast(b, 0)
    batches = StepBatches(dataset.sizes, run.cfg.eval_batch_size, None, rank=run.procs.rank,
                          world=run.procs.world, pad=False)  # fmt: skip
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    correct = torch.zeros((), dtype=torch.int64, device=run.device)
    seen = 0
    with eval_mode(run.model):
        for batch in _loader(run, dataset, batches):
            _note_skipped(run, batch)
            if not len(batch.labels):
                continue
            x = batch.images.to(run.device).contiguous(memory_format=run.fmt)
            y = batch.labels.to(run.device)
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.amp):
                logits = run.model(x).float()  # (B, K)
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
    total, right, n = _all_sum([loss_sum.item(), float(correct.item()), float(seen)],
                               run.device, run.procs)  # fmt: skip
    if n == 0:
        raise ValueError(f"dataset {run.cfg.data!r}: no readable image to evaluate on")
    return right / n, total / n


def _save(run: _Run) -> None:
    """The checkpoint at the step reached (rank 0 writes the sums of every process)."""
    st = run.state
    loss_sum, correct, seen = _all_sum(
        [run.loss_sum.item(), float(run.correct.item()), float(st.seen)], run.device, run.procs
    )
    if not run.procs.main:
        return
    accumulators = {
        "loss_sum": torch.tensor(loss_sum, dtype=torch.float64),
        "correct": torch.tensor(int(correct), dtype=torch.int64),
    }
    _save_checkpoint(run.ckpt, run.cfg, run.model, run.model_cfg, run.optimizer,
                     dataclasses.replace(st, seen=int(seen)), accumulators, run.steps,
                     len(run.train_set), run.classes)  # fmt: skip


def _finish(run: _Run) -> TrainResult:
    """Phase 4: the final model's accuracy on the clean training images and the test split."""
    cfg, st = run.cfg, run.state
    if not st.metrics and not run.resumed:  # a 0-epoch run: keep its initial state
        _save(run)
    train_acc, train_loss = _evaluate(run, run.train_set)
    last = st.metrics[-1] if st.metrics else None
    if last is not None and last["test_acc"] is not None:
        test_acc, test_loss = last["test_acc"], last["test_loss"]
    else:
        test_acc, test_loss = _evaluate(run, run.test_set)
    if run.skipped:
        n = len(run.skipped)
        run.bar.message(f"skipped {n} unreadable image file{'s' if n > 1 else ''}, named above")
    return TrainResult(st.metrics, train_acc, train_loss, test_acc, test_loss, st.seconds,
                       run.counts, run.ckpt, run.model.eval(), cfg)  # fmt: skip


def train(
    cfg: TrainConfig,
    *,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train `cfg.model` with head `cfg.head` on `cfg.data`; checkpoint and log to the run folder.

    Runs in one process, or, when started by torchrun, as one of its processes (see the module
    docstring). Seeds torch's global RNG (model init, dropout). Ctrl-C stops at the next step
    boundary, saves the checkpoint at exactly that step and re-raises KeyboardInterrupt; a
    second Ctrl-C stops at once (and keeps the last checkpoint if a step was half done).

    Args:
        cfg: the run.
        progress: show a progress bar and one line per epoch on stderr (rank 0 only).
        resume: continue the run saved in `cfg.run_dir`. Its config must equal `cfg` except in
            `RESUMABLE_CHANGES` (epochs, out_dir, threads, log_every, workers); a complete run
            just returns its result (or trains on, when `cfg.epochs` is larger).
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
    procs = Dist.from_env()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or max(1, _default_threads() // procs.world))
    try:
        with _process_group(procs, _resolve_device(cfg, procs)):
            run = _setup(cfg, procs, resume, overwrite, progress)
            try:
                _train_epochs(run, on_step)
                return _finish(run)
            finally:
                _release(run)
    finally:
        torch.set_num_threads(threads_before)


def _release(run: _Run) -> None:
    """Drop DDP (and its reducer's gloo/nccl work) while the process group is still alive:
    freed after the group is destroyed, gloo's threads can abort the process at exit."""
    if run.net is not run.model:
        run.net = run.model
        gc.collect()


def _train_epochs(run: _Run, on_step: Callable[[int, int], None] | None) -> None:
    """Phases 2 and 3 until the last epoch; Ctrl-C saves the step reached and re-raises."""
    cfg, st = run.cfg, run.state
    try:
        with _SigintGuard() as guard:
            while st.epoch < cfg.epochs:
                _run_epoch(run, guard, on_step)
                run.bar.epoch(_end_epoch(run))
                _save(run)
                if run.procs.main:
                    checkpoint.write_jsonl(cfg.run_dir / METRICS, st.metrics)
    except KeyboardInterrupt:
        if run.busy or (run.procs.world > 1 and not run.stopping):
            run.bar.message(
                f"interrupted in the middle of epoch {st.epoch + 1}, step {st.step + 1}; "
                f"the last checkpoint {str(run.ckpt)!r} is kept"
            )
            raise
        _save(run)
        run.bar.message(
            f"interrupted at epoch {st.epoch + 1}/{cfg.epochs}, step {st.step}/{run.steps}; "
            f"saved {str(run.ckpt)!r}. Resume with train(cfg, resume=True) "
            "(command line: the same arguments and --resume)"
        )
        raise


# --------------------------------------------------------------------------- data and model


def _open_data(cfg: TrainConfig) -> tuple[data.ImageDataset, data.ImageDataset, list[str]]:
    """The train (subset) and test splits of `cfg.data`, streamed, and the class names."""
    ds = data.open_dataset(cfg.data, seed=cfg.split_seed, size=cfg.image_size)
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
    return train_set, ds.test, ds.classes


def _create_model(
    cfg: TrainConfig, classes: list[str], train_set: data.ImageDataset
) -> models.GapNet:
    overrides = dict(cfg.model_overrides)
    h, w = train_set.image_size
    if h == w:  # size the fc heads for the data (global-pooling heads take any size)
        overrides.setdefault("input_size", h)
    model = models.create(
        cfg.model, num_classes=len(classes), in_chans=train_set.in_chans, head=cfg.head,
        **overrides,
    )  # fmt: skip
    if model.input_size is not None and cfg.augmentation in ("canvas", "scale"):
        raise ValueError(
            f"TrainConfig: head {cfg.head!r} takes only one input size, but augmentation "
            f"{cfg.augmentation!r} varies it; use a global-pooling head or another augmentation"
        )
    return model


def _fit_sizes(
    model: models.GapNet, train_set: data.ImageDataset, test_set: data.ImageDataset, bar: _Progress
) -> tuple[data.ImageDataset, data.ImageDataset]:
    """Resize the images to the one size a fixed-size (fc) head takes, saying so; others keep
    each image's own size (their batches are bucketed by size)."""
    s = model.input_size
    sizes = {tuple(x) for x in np.concatenate([train_set.sizes, test_set.sizes]).tolist()}
    if s is None or sizes <= {(s, s)}:
        return train_set, test_set
    shown = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:4]) + (
        ", ..." if len(sizes) > 4 else ""
    )
    bar.message(
        f"resizing every image ({shown}) to {s}x{s}: the {model.config.head} head takes one "
        "input size only (global-pooling heads train at each image's own size)"
    )
    return train_set.resized(s), test_set.resized(s)


def _loader(run: _Run, dataset: data.ImageDataset, batches: StepBatches) -> Any:
    """The DataLoader of `batches` (decoding in `workers` processes, if any)."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=data.collate, num_workers=run.cfg.workers,
        pin_memory=run.device.type == "cuda",
    )  # fmt: skip


def _note_skipped(run: _Run, batch: data.Batch) -> None:
    """Remember unreadable files; a DataLoader worker's warning may not reach this process."""
    for item in batch.skipped:
        if item.path not in run.skipped:
            run.skipped.add(item.path)
            if run.cfg.workers:
                warnings.warn(
                    f"skipping unreadable image: {item.reason}", data.UnreadableImageWarning,
                    stacklevel=2,
                )  # fmt: skip


BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def average_batchnorm(model: nn.Module, reset: bool) -> None:
    """Make every BatchNorm layer's running statistics the plain average over the batches it
    sees from now on (momentum None), instead of an exponential average of the last few.

    Args:
        reset: start the average afresh (False continues one, e.g. on resuming mid-epoch: the
            count of batches is a saved buffer).
    """
    for m in model.modules():
        if isinstance(m, BATCHNORMS):
            if reset:
                m.reset_running_stats()
            m.momentum = None


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer of `model` in eval mode: it normalizes with its running
    statistics and no longer updates them, while its weight and bias still train.

    Training at many input scales, each batch's statistics are those of its own scale, but at
    eval time one set of running statistics serves every scale; this lets a model end its
    training on the statistics eval uses. In the any-size study it did not close that gap
    (training accuracy fell at the freeze and did not recover; docs/research_any_size.md).
    """
    for m in model.modules():
        if isinstance(m, BATCHNORMS):
            m.eval()


def _augment(cfg: TrainConfig, x: Tensor, g: torch.Generator) -> Tensor:
    if cfg.augmentation == "shift":
        return data.random_shift(x, cfg.shift, g)
    if cfg.augmentation == "canvas":
        lo, hi = cfg.canvas_size
        return data.random_canvas(x, lo, hi, g, distractors=cfg.distractors)[0]
    if cfg.augmentation == "scale":
        lo, hi = cfg.scale_size
        return data.random_scale(
            x, lo, hi, g, canvas_ratio=cfg.canvas_ratio, distractors=cfg.distractors
        )[0]
    return x


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
) -> tuple[models.GapNet, TrainConfig, dict[str, Any]]:
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
    ckpt, train_cfg = read_run(path)
    return ckpt.build_model(device), train_cfg, ckpt.state


def read_run(path: str | os.PathLike[str]) -> tuple[checkpoint.Checkpoint, TrainConfig]:
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


# --------------------------------------------------------------------------- helpers


def _seed(*words: int) -> int:
    """A 63-bit seed mixed from a fixed number of words (no two word tuples collide)."""
    a, b = np.random.SeedSequence(list(words)).generate_state(2)
    return (int(a) << 31) ^ int(b)


def _generator(*words: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*words))


def _resolve_device(cfg: TrainConfig, procs: Dist) -> torch.device:
    """`cfg.device`; under torchrun on CUDA, the process's own GPU (LOCAL_RANK)."""
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(cfg.device)
        except RuntimeError as e:
            raise ValueError(f"TrainConfig.device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TrainConfig.device is {cfg.device!r}, but CUDA is not available here")
    if device.type == "cuda" and procs.world > 1:
        device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
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

    def __init__(self, enabled: bool, epochs: int, steps: int, *, quiet: bool = False) -> None:
        self.enabled, self.epochs, self.steps, self.quiet = enabled, epochs, steps, quiet
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
        """Shown even without a progress bar (interrupts and resumes matter), unless quiet."""
        if self.quiet:
            return
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
