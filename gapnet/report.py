"""Head comparisons and their report: what global average pooling buys, measured.

Two halves that meet only in a ``results`` dict (the shape of ``results.json``):

- **measure**: `run_compare(spec, out_dir)` trains one backbone with several heads on one data
  set (plus, optionally, a "robust" GAP variant trained on random canvases and a sweep over
  small training sets), then measures each model: parameters, train/test accuracy, accuracy at
  other input sizes and on larger canvases, and CAM localization. It returns the dict.
- **render**: `write_report(results, out_dir)` writes ``results.json``, ``report.md``,
  ``accuracy.svg`` (a hand-drawn line chart, no matplotlib) and a self-contained
  ``report.html`` (images inlined); `summary_text(results)` is the terminal version. Every
  sentence of a finding is templated from the measured numbers.

`DEMO` holds every default of ``gapnet demo`` (full and ``--quick``) in one place.

Example:
    >>> spec = CompareSpec(model="convnet-tiny", heads=("fc", "gap"), epochs=1)
    >>> CompareSpec.from_dict(spec.to_dict()) == spec
    True
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gapnet.checkpoint import atomic_write

_SWEEP_OWNS = ("head", "train_size", "epochs", "out_dir")  # what each sweep run sets itself
RESULTS_FORMAT = "gapnet.results/1"  # the "format" tag of results.json
RESULTS_JSON = "results.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
ACCURACY_SVG = "accuracy.svg"
CAM_DIR = "cam"  # overlay PNGs of the CAM grid, relative to the report folder

# Box colours of the CAM grid (RGB): what the CAM found, and the truth.
PRED_BOX_COLOR = (255, 64, 64)
TRUE_BOX_COLOR = (64, 255, 64)


# --------------------------------------------------------------------------- the spec


@dataclass
class CompareSpec:
    """One comparison: which heads, trained how, measured on what.

    Args:
        (each field is commented where it is declared)

    Example:
        >>> CompareSpec(heads=("fc", "gap"), train_sizes=(250,)).heads
        ('fc', 'gap')
    """

    # what is compared
    data: str = "mnist-5k"  # gapnet.data.load spec
    model: str = "convnet"  # backbone, gapnet.models name
    heads: tuple[str, ...] = ("fc", "fc-dropout", "gap", "gap-fc", "gmp", "gem")
    # how every run trains (TrainConfig fields; `train` adds any other field)
    epochs: int = 6
    batch_size: int = 128
    lr: float = 3e-3
    train_size: int | None = None  # images of the main runs; None: the whole train split
    seed: int = 0
    threads: int = 0  # torch threads; 0: every core this process may use
    train: dict[str, Any] = field(default_factory=dict)  # more TrainConfig fields, all runs
    # the robust GAP variant: TrainConfig overrides on top of the gap run's; None: not trained
    robust: dict[str, Any] | None = None
    robust_head: str = "gap"  # the head the robust variant is trained with
    # overfitting where it matters: the same heads on smaller training sets
    train_sizes: tuple[int, ...] = (250, 1000)  # () skips the sweep
    sweep_heads: tuple[str, ...] | None = None  # heads of the sweep; None: all `heads`
    sweep_steps: int = 150  # each sweep run takes at least this many steps (tiny sets: epochs)
    # TrainConfig overrides of the sweep runs only, e.g. no augmentation, so the sweep measures
    # what the head itself does against overfitting
    sweep_train: dict[str, Any] = field(default_factory=dict)
    # any input size
    sizes: tuple[int, ...] = (20, 28, 36, 48, 64)  # test images rescaled to S x S
    canvases: tuple[int, ...] = (28, 40, 56, 84, 112)  # digits placed on S x S blank canvases
    eval_n: int | None = 500  # test images per size / canvas (stratified); None: all
    # localization for free
    cam: bool = True  # the CAM section: overlay grid, localization table on `canvases`
    cam_sizes: tuple[int, ...] = (56, 84, 112)  # canvas sizes of the overlay grid
    cam_examples: int = 3  # overlays per grid size
    loc_n: int | None = 300  # canvases per localization size; None: the whole test split
    distractors: int = 0  # stroke-like clutter per localization canvas
    threshold: float | None = None  # CAM box threshold; None: chosen on the validation split
    region: str | None = None  # CAM box region rule (cam.REGIONS); None: chosen with threshold
    # on the validation split, or "largest" (the CAM paper's rule) when threshold is given

    def __post_init__(self) -> None:
        for name in ("heads", "train_sizes", "sizes", "canvases", "cam_sizes"):
            setattr(self, name, tuple(getattr(self, name)))
        if self.sweep_heads is not None:
            self.sweep_heads = tuple(self.sweep_heads)
        if self.robust is not None:
            self.robust = json.loads(json.dumps(self.robust))  # tuples -> lists, as JSON gives
        self.sweep_train = json.loads(json.dumps(self.sweep_train))
        if not self.heads:
            raise ValueError("CompareSpec.heads must name at least one head, got ()")
        if len(set(self.heads)) != len(self.heads):
            raise ValueError(f"CompareSpec.heads names a head twice: {','.join(self.heads)}")
        for name in ("epochs", "batch_size", "sweep_steps", "cam_examples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(
                    f"CompareSpec.{name} must be an int >= 1, got {getattr(self, name)!r}"
                )
        for name in ("train_sizes", "sizes", "canvases", "cam_sizes"):
            bad = [v for v in getattr(self, name) if not isinstance(v, int) or v < 1]
            if bad:
                raise ValueError(f"CompareSpec.{name} must hold ints >= 1, got {bad[0]!r}")
        for name in ("train_size", "eval_n", "loc_n"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"CompareSpec.{name} must be an int >= 1 or None, got {v!r}")
        owned = sorted(set(self.sweep_train) & set(_SWEEP_OWNS))
        if owned:
            raise ValueError(
                f"CompareSpec.sweep_train cannot set {', '.join(owned)}: each sweep run sets "
                "them itself (use train_sizes, sweep_heads, sweep_steps)"
            )
        from gapnet.cam import REGIONS

        if self.region is not None and self.region not in REGIONS:
            raise ValueError(
                f"CompareSpec.region must be one of {', '.join(REGIONS)} or None, "
                f"got {self.region!r}"
            )

    @property
    def sweep(self) -> tuple[str, ...]:
        """The heads of the training-set-size sweep."""
        return self.heads if self.sweep_heads is None else self.sweep_heads

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return json.loads(json.dumps(dataclasses.asdict(self)))  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompareSpec:
        """The spec from `to_dict`'s output; unknown keys fail, naming themselves."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in known]
        if unknown:
            raise ValueError(f"CompareSpec: unknown keys {unknown}; known keys: {', '.join(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> CompareSpec:
        """A copy with some fields changed (unknown names fail, naming themselves)."""
        return CompareSpec.from_dict({**self.to_dict(), **changes})


@dataclass(frozen=True)
class Demo:
    """What ``gapnet demo`` runs: a spec, and the changes ``--quick`` makes to it.

    Args:
        spec: the full demo (< 5 minutes on 2 CPU cores).
        quick: CompareSpec fields ``--quick`` overrides (about a minute on 2 CPU cores); also
            what ``gapnet compare --quick`` applies to its own spec.
        out: default output folder.
    """

    spec: CompareSpec
    quick: dict[str, Any]
    out: str = "runs/demo"


# Every default of `gapnet demo` (and of `--quick`), in one place; docs/research_any_size.md
# measured each choice. The backbone is convnet narrowed to widths 16-32-64, so every head, the
# robust variant, the sweep and the CAM section fit in 5 minutes on 2 CPU cores. The heads train
# 12 epochs at lr 5e-3 with 1-px shifts and label smoothing 0.1: the gap head then reached
# 98.7-98.8 % on 5 of 5 seeds (without them, 98.0-98.6). The robust variant is GeM trained on
# digits placed at random on blank 28-40 px canvases, without label smoothing: 98.0-99.0 % on
# every canvas from 28 to 112 px over 3 seeds, where gap trained on 28-56 px canvases fell to
# 37 % at 112 (an average dilutes the digit by its area; GeM only by its p-th root), and its
# class maps localize best. The sweep trains without augmentation or smoothing, so it shows what
# the head alone does against overfitting.
DEMO = Demo(
    spec=CompareSpec(
        data="mnist-5k",
        model="convnet",
        train={
            "model_overrides": {"widths": [16, 32, 64]},
            "augmentation": "shift",
            "shift": 1,
            "label_smoothing": 0.1,
        },
        heads=("fc", "fc-dropout", "gap", "gap-fc", "gmp", "gem"),
        epochs=12,
        batch_size=128,
        lr=5e-3,
        threads=2,
        robust={
            "augmentation": "canvas",
            "canvas_size": (28, 40),
            "label_smoothing": 0.0,
        },
        robust_head="gem",
        train_sizes=(250, 1000),
        sweep_heads=("fc", "gap"),
        sweep_steps=120,
        sweep_train={"augmentation": "none", "label_smoothing": 0.0},
        sizes=(20, 28, 36, 48, 64),
        canvases=(28, 40, 56, 84, 112),
        eval_n=300,
        cam=True,
        cam_sizes=(56, 84, 112),
        cam_examples=3,
        loc_n=300,
        threshold=None,
    ),
    quick=dict(
        heads=("fc", "gap"),
        epochs=4,
        train_sizes=(250,),
        sweep_steps=60,
        eval_n=200,
        cam_examples=2,
        loc_n=100,
    ),
)


# --------------------------------------------------------------------------- measuring


def machine_info() -> dict[str, Any]:
    """CPU model, torch threads, GPU (if any), torch / Python versions and platform.

    Example:
        >>> sorted(machine_info())
        ['cpu', 'gpu', 'platform', 'python', 'threads', 'torch']
    """
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def size_na(model: Any, size: int) -> str | None:
    """Why `model` cannot take a size x size input ("fixed 28x28 input", ...), or None if it can.

    Example:
        >>> from gapnet import models
        >>> size_na(models.create("convnet-tiny", head="fc"), 36)
        'fixed 28x28 input'
        >>> size_na(models.create("convnet-tiny", head="gap"), 36) is None
        True
    """
    from gapnet import models

    config = model.config
    if config.head in models.FC_HEADS and size != config.input_size:
        return f"fixed {config.input_size}x{config.input_size} input"
    low = model.backbone.min_input_size
    if size < low:
        return f"needs at least {low}x{low}"
    return None


def accuracy_table(
    model: Any,
    sets: Sequence[tuple[int, Any]],
    *,
    batch_size: int = 256,
) -> list[dict[str, Any]]:
    """Test accuracy of `model` on (size, ImageSet) pairs; n/a where the model cannot run.

    Returns:
        one ``{"size": S, "acc": float or None, "na": reason or None}`` per pair.
    """
    from gapnet.train import evaluate

    rows = []
    for size, imageset in sets:
        na = size_na(model, size)
        acc = None
        if na is None:
            acc, _ = evaluate(model, imageset.images, imageset.labels, batch_size=batch_size)
        rows.append({"size": size, "acc": acc, "na": na})
    return rows


def _eval_sets(spec: CompareSpec, ds: Any) -> tuple[list[tuple[int, Any]], list[tuple[int, Any]]]:
    """The rescaled test sets and the canvas sets every model is measured on (built once from
    `ds`, the loaded `spec.data`)."""
    from gapnet import data

    test = ds.test if spec.eval_n is None else data.stratified_subset(ds.test, spec.eval_n)
    rescaled = [(s, data.ImageSet(data.rescale(test.images, s), test.labels)) for s in spec.sizes]
    side = max(ds.image_size)
    canvases = []
    for s in spec.canvases:
        if s < side:
            raise ValueError(
                f"canvas size {s} is smaller than the {spec.data!r} images ({side}x{side}); "
                f"use canvases >= {side}"
            )
        canvases.append(
            (s, data.canvas_mnist(s, n=spec.eval_n, seed=spec.seed, source=spec.data)[0])
        )
    return rescaled, canvases


def _train_config(spec: CompareSpec, out_dir: Path, name: str, **changes: Any) -> Any:
    from gapnet.train import TrainConfig

    fields: dict[str, Any] = dict(
        data=spec.data, model=spec.model, epochs=spec.epochs, batch_size=spec.batch_size,
        lr=spec.lr, train_size=spec.train_size, seed=spec.seed, threads=spec.threads,
    )  # fmt: skip
    fields.update(spec.train)
    fields.update(changes)
    fields["out_dir"] = str(out_dir / name)
    return TrainConfig(**fields)


def robust_config(spec: CompareSpec, out_dir: str | os.PathLike[str]) -> Any:
    """The TrainConfig of `spec`'s size-robust variant, trained into out_dir/<head>-robust.

    Example:
        >>> robust_config(DEMO.spec, DEMO.out).run_dir.as_posix()
        'runs/demo/gem-robust'
    """
    if spec.robust is None:
        raise ValueError("CompareSpec.robust is None: this comparison trains no robust variant")
    name = f"{spec.robust_head}-robust"
    return _train_config(spec, Path(out_dir), name, head=spec.robust_head, **spec.robust)


def _train(cfg: Any, progress: bool, reuse: bool) -> Any:
    """Train afresh; with `reuse`, a complete run of the same config in its folder is kept."""
    from gapnet.train import CHECKPOINT, train

    if reuse and (cfg.run_dir / CHECKPOINT).is_file():
        try:
            return train(cfg, progress=progress, resume=True)
        except ValueError:  # another config: retrain
            pass
    return train(cfg, progress=progress, overwrite=True)


def _run_entry(
    name: str, result: Any, out_dir: Path, robust: dict[str, Any] | None
) -> dict[str, Any]:
    """The results.json entry of one trained run (measurements are added by the caller)."""
    metrics = [
        {"epoch": m["epoch"], "train_acc": m["train_acc"], "test_acc": m["test_acc"]}
        for m in result.metrics
    ]
    return {
        "name": name,
        "head": result.config.head,
        "robust": robust is not None,
        "recipe": _recipe(robust) if robust is not None else "",
        "params": dict(result.param_counts),
        "train_images": None,
        "train_acc": result.train_acc,
        "test_acc": result.test_acc,
        "train_loss": result.train_loss,
        "test_loss": result.test_loss,
        "train_seconds": result.train_seconds,
        "history": metrics,
        "checkpoint": os.path.relpath(result.checkpoint, out_dir),
    }


def _recipe(overrides: dict[str, Any]) -> str:
    """A short human description of TrainConfig overrides, e.g. "random canvases 28-56 px"."""
    from gapnet.train import TrainConfig

    parts = []
    rest = dict(overrides)
    augmentation = rest.pop("augmentation", None)
    shift = rest.pop("shift", TrainConfig.shift)
    canvas = rest.pop("canvas_size", TrainConfig.canvas_size)
    if augmentation == "canvas":
        parts.append(f"random canvases {canvas[0]}-{canvas[1]} px")
    elif augmentation == "shift":
        parts.append(f"random shifts of up to {shift} px")
    elif augmentation == "none":
        parts.append("no augmentation")
    if "label_smoothing" in rest:
        parts.append(f"label smoothing {rest.pop('label_smoothing'):g}")
    parts += [f"{k}={v}" for k, v in rest.items()]
    return ", ".join(parts)


def run_compare(
    spec: CompareSpec,
    out_dir: str | os.PathLike[str],
    *,
    command: str = "",
    progress: bool = True,
    reuse: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train every head of `spec` (and the robust variant and the sweep), measure, return results.

    Each run trains into ``out_dir/<name>/`` (checkpoint, config.json, metrics.jsonl).

    Args:
        spec: what to compare.
        out_dir: the report folder.
        command: the command line that reproduces the run (shown at the top of the report).
        progress: show training progress on stderr.
        reuse: keep a run whose folder holds a complete run of the very same config (so changed
            measurements re-render without retraining); otherwise every run trains afresh.
        log: where one-line progress notes go; default stderr.

    Returns:
        the results dict `write_report` renders (the shape of results.json).
    """
    import torch

    from gapnet import data

    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    threads_before = torch.get_num_threads()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    try:
        ds = data.load(spec.data)
        n_train = spec.train_size or len(ds.train)
        variants: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = [
            (h, {"head": h}, None) for h in spec.heads
        ]
        if spec.robust is not None:
            robust_name = f"{spec.robust_head}-robust"
            variants.append((robust_name, {"head": spec.robust_head, **spec.robust}, spec.robust))
        sweep_runs = [(n, h) for n in spec.train_sizes for h in spec.sweep]
        total = len(variants) + len(sweep_runs)
        rescaled, canvases = _eval_sets(spec, ds)
        runs, models = [], {}
        for i, (name, changes, robust) in enumerate(variants, 1):
            cfg = _train_config(spec, out, name, **changes)
            say(f"[{i}/{total}] {name}: {spec.model} on {n_train} {spec.data} images, "
                f"{cfg.epochs} epochs" + (f" ({_recipe(robust)})" if robust else ""))  # fmt: skip
            result = _train(cfg, progress, reuse)
            entry = _run_entry(name, result, out, robust)
            entry["train_images"] = n_train
            entry["sizes"] = accuracy_table(result.model, rescaled)
            entry["canvases"] = accuracy_table(result.model, canvases)
            runs.append(entry)
            models[name] = result.model
        sweep = []
        for i, (n, head) in enumerate(sweep_runs, len(variants) + 1):
            steps = -(-n // spec.batch_size)
            epochs = max(spec.epochs, -(-spec.sweep_steps // steps))
            name = f"sweep/{head}-{n}"
            cfg = _train_config(
                spec, out, name, **spec.sweep_train, head=head, train_size=n, epochs=epochs
            )
            recipe = f", {_recipe(spec.sweep_train)}" if spec.sweep_train else ""
            say(f"[{i}/{total}] {head} on {n} images, {epochs} epochs (overfitting sweep{recipe})")
            result = _train(cfg, progress, reuse)
            sweep.append({
                "head": head, "train_size": n, "epochs": epochs,
                "train_acc": result.train_acc, "test_acc": result.test_acc,
                "train_seconds": result.train_seconds,
            })  # fmt: skip
        cam_section = None
        if spec.cam:
            cam_section = _cam_section(spec, out, runs, models, say)
    finally:
        torch.set_num_threads(threads_before)
    return {
        "format": RESULTS_FORMAT,
        "title": f"GAP vs FC heads: {_model_label(spec)} on {spec.data}",
        "command": command,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "revision": _git_revision(),
        "machine": machine_info() | {"threads": spec.threads or threads_before},
        "spec": spec.to_dict(),
        "data": {
            "name": spec.data,
            "train": len(ds.train),
            "test": len(ds.test),
            "image_size": list(ds.image_size),
            "num_classes": ds.num_classes,
        },
        "runs": runs,
        "sweep": sweep,
        "cam": cam_section,
        "total_seconds": time.perf_counter() - started,
    }


def _model_label(spec: CompareSpec) -> str:
    """The backbone's name, with its changed fields: "convnet (widths 16-32-64)"."""
    overrides = spec.train.get("model_overrides") or {}
    parts = [
        f"{k} {'-'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in overrides.items()
    ]
    return f"{spec.model} ({', '.join(parts)})" if parts else spec.model


def _cam_model(runs: list[dict[str, Any]]) -> str | None:
    """The run the CAM section shows: the robust variant, else plain gap, else a CAM-capable
    head."""
    from gapnet import models

    by_name = {r["name"]: r for r in runs}
    for r in runs:
        if r["robust"] and r["head"] not in models.FC_HEADS:
            return str(r["name"])
    for name in ("gap", "gap-fc"):
        if name in by_name:
            return name
    return next((r["name"] for r in runs if r["head"] not in models.FC_HEADS), None)


def _cam_section(
    spec: CompareSpec,
    out: Path,
    runs: list[dict[str, Any]],
    models_by_name: dict[str, Any],
    say: Callable[[str], None],
) -> dict[str, Any] | None:
    """The localization table and the overlay grid of the CAM model (PNGs under out/cam/)."""
    import torch

    from gapnet import cam, data

    name = _cam_model(runs)
    if name is None:
        say("CAM section skipped: every head is fully connected (no class activation maps)")
        return None
    model = models_by_name[name]
    if spec.threshold is None:
        say(f"CAM: choosing the box rule of {name} on the validation split")
        choice = cam.choose_threshold(
            model, spec.canvases, regions=cam.REGIONS if spec.region is None else (spec.region,),
            n=spec.loc_n, distractors=spec.distractors, seed=spec.seed, source=spec.data,
        )  # fmt: skip
        threshold, region = choice.threshold, choice.region
        source = "chosen on the validation split"
    else:
        threshold, region, source = float(spec.threshold), spec.region or "largest", "given"
    say(f"CAM: localization of {name} on canvases {','.join(map(str, spec.canvases))}")
    rows = [
        localization_row(row)
        for row in cam.localize(
            model,
            spec.canvases,
            n=spec.loc_n,
            distractors=spec.distractors,
            threshold=threshold,
            region=region,
            seed=spec.seed,
            source=spec.data,
        )
    ]
    grid = []
    (out / CAM_DIR).mkdir(parents=True, exist_ok=True)
    for size in spec.cam_sizes:
        canv, boxes = data.canvas_mnist(
            size, n=10 * spec.cam_examples, seed=spec.seed + 1, source=spec.data
        )
        x, labels = canv.images[: spec.cam_examples], canv.labels[: spec.cam_examples]
        res = cam.class_activation_maps(model, x)
        pred_boxes = cam.cam_boxes(res.maps, threshold, region)
        ious = cam.box_iou(pred_boxes, boxes[: len(x)])
        probs = torch.softmax(res.logits.float(), dim=1)
        for i in range(len(x)):
            rel = f"{CAM_DIR}/canvas{size}-{i}.png"
            marks = [(pred_boxes[i].tolist(), PRED_BOX_COLOR), (boxes[i].tolist(), TRUE_BOX_COLOR)]
            img = cam.overlay(x[i], res.maps[i], boxes=marks)
            cam.save_png(img, out / rel)
            pred = int(res.classes[i])
            grid.append({
                "size": size, "image": rel, "label": int(labels[i]), "pred": pred,
                "prob": float(probs[i, pred]), "pred_box": [int(v) for v in pred_boxes[i]],
                "true_box": [int(v) for v in boxes[i]], "iou": float(ious[i]),
            })  # fmt: skip
    return {
        "model": name,
        "threshold": threshold,
        "region": region,
        "threshold_source": source,
        "n": spec.loc_n,
        "distractors": spec.distractors,
        "rows": rows,
        "grid": grid,
    }


def localization_row(row: dict[str, Any]) -> dict[str, Any]:
    """The keys of one `gapnet.cam.localize` row the report shows, as plain numbers."""
    out: dict[str, Any] = {"size": int(row["size"])}
    for key in ("n", "acc", "loc_acc", "top1_loc", "mean_iou"):
        value = row.get(key)
        out[key] = None if value is None else int(value) if key == "n" else float(value)
    return out


# --------------------------------------------------------------------------- loading results


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The results dict saved in ``results.json`` (or the report folder holding it).

    Example:
        >>> load_results("no/such/run")
        Traceback (most recent call last):
        ...
        FileNotFoundError: no results.json in 'no/such/run': run gapnet compare first
    """
    p = Path(path)
    if p.is_dir() or not p.suffix:
        if not (p / RESULTS_JSON).is_file():
            raise FileNotFoundError(f"no {RESULTS_JSON} in {str(p)!r}: run gapnet compare first")
        p = p / RESULTS_JSON
    try:
        results = json.loads(p.read_text())
    except OSError as e:
        raise FileNotFoundError(f"cannot read {str(p)!r}: {e.strerror}") from None
    except ValueError as e:
        raise ValueError(f"{str(p)!r} is not valid JSON: {e}") from None
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        raise ValueError(f"{str(p)!r} is not a gapnet results file (no format {RESULTS_FORMAT!r})")
    return results


# --------------------------------------------------------------------------- formatting


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _int(n: int) -> str:
    return f"{n:,}"


def _n(count: int, noun: str) -> str:
    """ "1 epoch", "3 epochs"."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _times(a: float, b: float) -> str:
    """How many times a is b, written for humans: "23x", "2.4x"."""
    r = a / b if b else math.inf
    return f"{r:,.0f}x" if r >= 10 else f"{r:.1f}x"


def _cell(row: dict[str, Any]) -> str:
    return f"n/a ({row['na']})" if row["acc"] is None else pct(row["acc"])


def _gap(run: dict[str, Any]) -> float:
    return float(run["train_acc"]) - float(run["test_acc"])


def _by_name(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in results.get("runs", [])}


# --------------------------------------------------------------------------- the document

# A report is a list of blocks, rendered to Markdown and to HTML by the same walk.
# ("h", level, text) | ("p", text) | ("table", header, rows) | ("svg", file, alt)
# | ("grid", items, caption) | ("code", text)
Block = tuple[Any, ...]


def _header_blocks(results: dict[str, Any]) -> list[Block]:
    m = results.get("machine", {})
    threads = m.get("threads")
    machine = f"{m.get('cpu', '?')}, {_n(threads, 'thread')}" if threads else str(m.get("cpu", "?"))
    if m.get("gpu"):
        machine += f", GPU {m['gpu']}"
    machine += f"; torch {m.get('torch', '?')}, Python {m.get('python', '?')}"
    date = results.get("date", "?")
    rev = f", gapnet revision {results['revision']}" if results.get("revision") else ""
    d = results.get("data", {})
    lines = [
        f"Measured on {machine}; {date}{rev}.",
    ]
    if d:
        size = d.get("image_size", ["?", "?"])
        lines.append(
            f"Data: `{d.get('name')}`, {_int(d.get('train', 0))} training and "
            f"{_int(d.get('test', 0))} test images of {size[0]}x{size[1]}, "
            f"{d.get('num_classes')} classes."
        )
    spec = results.get("spec") or {}
    if spec:
        extra = {k: v for k, v in spec.get("train", {}).items() if k != "model_overrides"}
        lines.append(
            f"Every head trained {_n(spec['epochs'], 'epoch')}, batch {spec['batch_size']}, "
            f"lr {spec['lr']:g}" + (f", {_recipe(extra)}" if extra else "") + "."
        )
    if results.get("total_seconds") is not None:
        lines.append(f"The whole comparison took {results['total_seconds']:.0f} s.")
    blocks: list[Block] = [("h", 1, results.get("title", "gapnet comparison"))]
    if results.get("command"):
        blocks += [("p", "Reproduce with:"), ("code", results["command"])]
    blocks.append(("p", " ".join(lines)))
    return blocks


def _heads_blocks(results: dict[str, Any]) -> list[Block]:
    runs = results.get("runs", [])
    if not runs:
        return []
    header = ["head", "params (total)", "params (head)", "train acc", "test acc",
              "train−test gap (points)", "train time"]  # fmt: skip
    rows = [
        [
            r["name"],
            _int(r["params"]["total"]),
            _int(r["params"].get("head", 0)),
            pct(r["train_acc"]),
            pct(r["test_acc"]),
            _pts(_gap(r)),
            f"{r['train_seconds']:.1f} s",
        ]
        for r in runs
    ]
    blocks: list[Block] = [
        ("h", 2, "Heads: parameters, accuracy, overfitting"),
        ("table", header, rows),
        ("p", _heads_finding(results)),
        ("h", 3, "Test accuracy per epoch"),
        ("svg", ACCURACY_SVG, "test accuracy per epoch, one line per head"),
    ]
    return blocks


def _heads_finding(results: dict[str, Any]) -> str:
    runs = results.get("runs", [])
    by = _by_name(results)
    plain = [r for r in runs if not r["robust"]]
    parts = []
    fc, gap = by.get("fc"), by.get("gap")
    if fc is not None and gap is not None:
        gh, fh = gap["params"].get("head", 0), fc["params"].get("head", 0)
        k = results.get("data", {}).get("num_classes", "K")
        parts.append(
            f"Global average pooling replaces the fully connected classifier: the gap head holds "
            f"{_int(gh)} parameters (a 1x1 convolution to the {k} class maps; the pooling itself "
            f"has none) against {_int(fh)} for fc, {_times(fh, gh)} fewer, and the whole network "
            f"is {_times(fc['params']['total'], gap['params']['total'])} smaller "
            f"({_int(gap['params']['total'])} vs {_int(fc['params']['total'])} parameters)."
        )
        more = "smaller" if _gap(gap) < _gap(fc) else "larger" if _gap(gap) > _gap(fc) else "equal"
        parts.append(
            f"Its train−test gap is {_pts(_gap(gap))} points vs {_pts(_gap(fc))} for fc "
            f"({more}); test accuracy {pct(gap['test_acc'])} vs {pct(fc['test_acc'])}."
        )
    if len(plain) > 1:
        best = max(plain, key=lambda r: r["test_acc"])
        least = min(plain, key=_gap)
        most = max(plain, key=_gap)
        parts.append(
            f"Best test accuracy: {best['name']} ({pct(best['test_acc'])}). Smallest "
            f"train−test gap: {least['name']} ({_pts(_gap(least))} points); largest: "
            f"{most['name']} ({_pts(_gap(most))})."
        )
    epochs = {len(r.get("history", [])) for r in runs}
    if epochs:
        parts.append(f"Runs trained {'/'.join(map(str, sorted(epochs)))} epochs.")
    return " ".join(parts)


def _sizes_blocks(results: dict[str, Any]) -> list[Block]:
    runs = [r for r in results.get("runs", []) if r.get("sizes") or r.get("canvases")]
    if not runs:
        return []
    blocks: list[Block] = [("h", 2, "Any input size")]
    spec = results.get("spec", {})
    n = spec.get("eval_n")
    on = f"{_int(n)} test images" if n else "the test images"
    for key, title in (
        ("sizes", f"Test accuracy with {on} rescaled to S x S"),
        ("canvases", f"Test accuracy with {on} placed at random on blank S x S canvases"),
    ):
        sizes = [c["size"] for c in runs[0].get(key, [])]
        if not sizes:
            continue
        header = ["head", *(f"{s}x{s}" for s in sizes)]
        rows = [[r["name"], *(_cell(c) for c in r.get(key, []))] for r in runs]
        blocks += [("h", 3, title), ("table", header, rows)]
    blocks.append(("p", _sizes_finding(results)))
    return blocks


def _mean_acc(cells: list[dict[str, Any]]) -> float | None:
    accs = [c["acc"] for c in cells if c["acc"] is not None]
    return sum(accs) / len(accs) if accs else None


def _sizes_finding(results: dict[str, Any]) -> str:
    runs = results.get("runs", [])
    parts = []
    fixed = [r for r in runs if any(c["acc"] is None for c in r.get("sizes", []))]
    for r in fixed:
        ok = [c["size"] for c in r["sizes"] if c["acc"] is not None]
        na = next(c["na"] for c in r["sizes"] if c["acc"] is None)
        parts.append(
            f"{r['name']} runs only at {', '.join(f'{s}x{s}' for s in ok) or 'none of these sizes'}"
            f" ({na}): its flattened feature map must match the Linear layer's weights."
        )
    anysize = [r for r in runs if r.get("sizes") and all(c["acc"] is not None for c in r["sizes"])]
    for r in anysize:
        cells = r["sizes"]
        worst = min(cells, key=lambda c: c["acc"])
        best = max(cells, key=lambda c: c["acc"])
        if worst["acc"] == best["acc"]:
            parts.append(f"{r['name']} takes every size: {pct(best['acc'])} at each.")
        else:
            parts.append(
                f"{r['name']} takes every size: {pct(worst['acc'])} at "
                f"{worst['size']}x{worst['size']} to {pct(best['acc'])} at "
                f"{best['size']}x{best['size']}."
            )
    measured = [r for r in runs if r.get("canvases") and r["canvases"][-1]["acc"] is not None]
    if measured:
        big = measured[0]["canvases"][-1]["size"]
        best = max(measured, key=lambda r: r["canvases"][-1]["acc"])
        parts.append(
            f"Best on {big}x{big} canvases: {best['name']} ({pct(best['canvases'][-1]['acc'])})."
        )
    pairs = [
        (r, next((p for p in runs if p["name"] == r["head"]), None)) for r in runs if r["robust"]
    ]
    for robust, plain in pairs:
        if plain is None or not robust.get("canvases"):
            continue
        big = robust["canvases"][-1]["size"]
        pc = next(c for c in plain["canvases"] if c["size"] == big)
        rc = robust["canvases"][-1]
        parts.append(
            f"On {big}x{big} canvases the plain {plain['name']} scores {_cell(pc)} and "
            f"{robust['name']} ({robust['recipe']}) {_cell(rc)}; averaged over all canvas sizes "
            f"{pct(_mean_acc(plain['canvases']))} vs {pct(_mean_acc(robust['canvases']))}."
        )
    return " ".join(parts)


def _sweep_blocks(results: dict[str, Any]) -> list[Block]:
    sweep = results.get("sweep") or []
    if not sweep:
        return []
    sizes = sorted({s["train_size"] for s in sweep})
    heads = list(dict.fromkeys(s["head"] for s in sweep))
    cell = {(s["head"], s["train_size"]): s for s in sweep}
    header = ["head", *(f"{_int(n)} images: train / test acc (train−test)" for n in sizes)]
    rows = []
    for h in heads:
        row = [h]
        for n in sizes:
            s = cell.get((h, n))
            row.append(
                "—" if s is None
                else f"{pct(s['train_acc'])} / {pct(s['test_acc'])} ({_pts(_gap(s))})"
            )  # fmt: skip
        rows.append(row)
    return [
        ("h", 2, "Overfitting where it matters: small training sets"),
        ("table", header, rows),
        ("p", _sweep_finding(results, sizes, heads, cell)),
    ]


def _sweep_finding(
    results: dict[str, Any],
    sizes: list[int],
    heads: list[str],
    cell: dict[tuple[str, int], dict[str, Any]],
) -> str:
    parts = []
    sweep_train = (results.get("spec") or {}).get("sweep_train")
    if sweep_train:
        parts.append(
            f"These runs train with {_recipe(sweep_train)}, so the head is the only regulariser "
            "that differs."
        )
    for n in sizes:
        here = [cell[(h, n)] for h in heads if (h, n) in cell]
        gaps = ", ".join(f"{s['head']} {_pts(_gap(s))}" for s in here)
        best = max(here, key=lambda s: s["test_acc"])
        parts.append(
            f"With {_int(n)} training images ({_n(here[0]['epochs'], 'epoch')}) the "
            f"train−test gaps are {gaps} points; the best test accuracy is {best['head']}'s "
            f"({pct(best['test_acc'])})."
        )
    if "fc" in heads and "gap" in heads:
        both = [n for n in sizes if ("fc", n) in cell and ("gap", n) in cell]
        less = [n for n in both if _gap(cell[("gap", n)]) < _gap(cell[("fc", n)])]
        parts.append(f"gap overfits less than fc at {len(less)} of {len(both)} training-set sizes.")
    return " ".join(parts)


def _cam_blocks(results: dict[str, Any]) -> list[Block]:
    c = results.get("cam")
    if not c:
        return []
    blocks: list[Block] = [("h", 2, "Localization for free: class activation maps")]
    grid = c.get("grid") or []
    if grid:
        caption = (
            f"CAM of {c['model']}'s predicted class on held-out canvases; red: the box the CAM "
            f"gives ({_region_words(c)} above {c['threshold']:.2f} of the maximum), green: the "
            "digit's true box."
        )
        blocks.append(("grid", grid, caption))
    rows = c.get("rows") or []
    if rows:
        header = ["canvas", "classification acc", "box loc acc (IoU >= 0.5)",
                  "top-1 loc (class and box)", "mean IoU"]  # fmt: skip
        table = [
            [f"{r['size']}x{r['size']}", pct(r["acc"]), pct(r["loc_acc"]),
             pct(r["top1_loc"]), "n/a" if r["mean_iou"] is None else f"{r['mean_iou']:.2f}"]
            for r in rows
        ]  # fmt: skip
        blocks += [("table", header, table), ("p", _cam_finding(c))]
    return blocks


def _cam_finding(c: dict[str, Any]) -> str:
    rows = [r for r in c.get("rows", []) if r["loc_acc"] is not None]
    if not rows:
        return ""
    n = f"{_int(c['n'])} canvases per size" if c.get("n") else "the whole test split per size"
    clutter = f", {c['distractors']} distractors each" if c.get("distractors") else ""
    best = max(rows, key=lambda r: r["loc_acc"])
    worst = min(rows, key=lambda r: r["loc_acc"])
    return (
        f"{c['model']} was trained with class labels only, never a box. Boxing "
        f"{_region_words(c)} of the CAM of its predicted class above {c['threshold']:.2f} of "
        f"its maximum ({c['threshold_source']}) gives a box "
        f"that overlaps the true one with IoU >= 0.5 on {pct(best['loc_acc'])} of "
        f"{best['size']}x{best['size']} canvases and {pct(worst['loc_acc'])} of "
        f"{worst['size']}x{worst['size']} ones ({n}{clutter}); right class and right box "
        f"together (top-1 localization): {pct(best['top1_loc'])} and {pct(worst['top1_loc'])}."
    )


def _region_words(c: dict[str, Any]) -> str:
    if c.get("region", "largest") == "all":
        return "every pixel"
    return "the largest connected region (the CAM paper's rule)"


def report_blocks(results: dict[str, Any]) -> list[Block]:
    """The whole report as blocks: header, heads, any input size, overfitting, CAM."""
    return [
        *_header_blocks(results),
        *_heads_blocks(results),
        *_sizes_blocks(results),
        *_sweep_blocks(results),
        *_cam_blocks(results),
    ]


# --------------------------------------------------------------------------- the chart

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    raw = (hi - lo) / max(n, 1) or 1.0
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [round(first + i * step, 10) for i in range(math.ceil((hi - first) / step) + 1)]


def svg_line_chart(
    series: dict[str, list[tuple[float, float]]],
    *,
    x_label: str = "epoch",
    y_label: str = "test accuracy (%)",
    width: int = 600,
    height: int = 320,
) -> str:
    """A small standalone SVG line chart: axes, ticks, one polyline per series, a legend.

    Args:
        series: name -> (x, y) points, drawn in order.
        x_label, y_label: axis titles.
        width, height: size in pixels.

    Example:
        >>> import xml.etree.ElementTree as ET
        >>> svg = svg_line_chart({"gap": [(1, 90.0), (2, 95.5)], "fc": [(1, 93.0), (2, 96.0)]})
        >>> ET.fromstring(svg).tag
        '{http://www.w3.org/2000/svg}svg'
    """
    left, right, top, bottom = 56, 130, 16, 44
    pw, ph = width - left - right, height - top - bottom
    pts = [p for s in series.values() for p in s] or [(0.0, 0.0), (1.0, 1.0)]
    xt = _ticks(min(p[0] for p in pts), max(p[0] for p in pts))
    if all(float(x).is_integer() for x, _ in pts):  # epochs: integer ticks only
        xt = sorted({float(round(x)) for x in xt})
    yt = _ticks(min(p[1] for p in pts), max(p[1] for p in pts))
    x0, x1 = xt[0], max(xt[-1], xt[0] + 1)
    y0, y1 = yt[0], max(yt[-1], yt[0] + 1)

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    esc = html.escape
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f"<title>{esc(y_label)} per {esc(x_label)}</title>",
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>',
    ]
    for y in yt:
        out.append(
            f'<line x1="{left}" y1="{sy(y):.1f}" x2="{left + pw}" y2="{sy(y):.1f}" stroke="#ddd"/>'
            f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:g}</text>'
        )
    for x in xt:
        out.append(
            f'<line x1="{sx(x):.1f}" y1="{top + ph}" x2="{sx(x):.1f}" y2="{top + ph + 4}" '
            f'stroke="#444"/><text x="{sx(x):.1f}" y="{top + ph + 16}" '
            f'text-anchor="middle">{x:g}</text>'
        )
    out.append(
        f'<text x="{left + pw / 2:.1f}" y="{height - 8}" text-anchor="middle">{esc(x_label)}</text>'
        f'<text transform="translate(14 {top + ph / 2:.1f}) rotate(-90)" '
        f'text-anchor="middle">{esc(y_label)}</text>'
    )
    for i, (name, points) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        out += [
            f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in points
        ]
        ly = top + 10 + 16 * i
        out.append(
            f'<line x1="{left + pw + 12}" y1="{ly}" x2="{left + pw + 32}" y2="{ly}" '
            f'stroke="{color}" stroke-width="2"/><text x="{left + pw + 38}" y="{ly + 4}">'
            f"{esc(name)}</text>"
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def accuracy_chart(results: dict[str, Any]) -> str:
    """The per-epoch test accuracy (%) of every run as an SVG line chart."""
    series = {
        r["name"]: [
            (m["epoch"], 100 * m["test_acc"])
            for m in r.get("history", [])
            if m.get("test_acc") is not None
        ]
        for r in results.get("runs", [])
    }
    return svg_line_chart({k: v for k, v in series.items() if v})


# --------------------------------------------------------------------------- rendering


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def to_markdown(blocks: list[Block]) -> str:
    """Render report blocks as Markdown (images referenced by relative path)."""
    out: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append(f"{'#' * b[1]} {b[2]}")
        elif kind == "p":
            if b[1]:
                out.append(b[1])
        elif kind == "code":
            out.append(f"```\n{b[1]}\n```")
        elif kind == "table":
            header, rows = b[1], b[2]
            lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |"]
            lines.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
            lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "svg":
            out.append(f"![{b[2]}]({b[1]})")
        elif kind == "grid":
            items, caption = b[1], b[2]
            sizes = list(dict.fromkeys(it["size"] for it in items))
            per = max(sum(1 for it in items if it["size"] == s) for s in sizes)
            lines = ["| canvas | " + " | ".join(f"example {i + 1}" for i in range(per)) + " |"]
            lines.append("|" + "---|" * (per + 1))
            for s in sizes:
                cells = [
                    f"![{_grid_label(it)}]({it['image']})<br>{_grid_label(it)}"
                    for it in items
                    if it["size"] == s
                ]
                lines.append(f"| {s}x{s} | " + " | ".join(cells) + " |")
            out.append("\n".join(lines) + f"\n\n{caption}")
    return "\n\n".join(out) + "\n"


def _grid_label(item: dict[str, Any]) -> str:
    return (
        f"true {item['label']}, predicted {item['pred']} ({100 * item['prob']:.0f}%), "
        f"IoU {item['iou']:.2f}"
    )


def _inline(text: str) -> str:
    """Escape text for HTML and turn `code` spans into <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 62rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.92rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
td.na { color: #888; }
pre { background: #f6f6f6; padding: 0.6rem; overflow-x: auto; }
.grid { display: flex; flex-wrap: wrap; gap: 0.8rem; }
.grid figure { margin: 0; font-size: 0.8rem; max-width: 14rem; }
.grid img { width: 12rem; image-rendering: pixelated; border: 1px solid #ccc; }
"""


def to_html(blocks: list[Block], out_dir: str | os.PathLike[str]) -> str:
    """Render report blocks as one self-contained HTML page (SVG inline, PNGs as data: URIs).

    Args:
        blocks: `report_blocks`' output.
        out_dir: the folder the blocks' relative image paths point into.
    """
    base = Path(out_dir)
    title = next((b[2] for b in blocks if b[0] == "h"), "gapnet report")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
    ]
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
        elif kind == "p":
            if b[1]:
                out.append(f"<p>{_inline(b[1])}</p>")
        elif kind == "code":
            out.append(f"<pre><code>{html.escape(b[1])}</code></pre>")
        elif kind == "table":
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in b[1]))
            out.append("</tr></thead><tbody>")
            for row in b[2]:
                cells = (
                    f'<td class="na">{_inline(c)}</td>'
                    if c.startswith("n/a")
                    else f"<td>{_inline(c)}</td>"
                    for c in row
                )
                out.append("<tr>" + "".join(cells) + "</tr>")
            out.append("</tbody></table>")
        elif kind == "svg":
            path = base / b[1]
            svg = path.read_text() if path.is_file() else ""
            # inline SVG needs no namespace in HTML5 (and the page then names no URL at all)
            out.append(
                svg.replace(' xmlns="http://www.w3.org/2000/svg"', "")
                or f"<p>({b[2]}: missing)</p>"
            )
        elif kind == "grid":
            out.append('<div class="grid">')
            for it in b[1]:
                path = base / it["image"]
                label = html.escape(f"{it['size']}x{it['size']}: {_grid_label(it)}")
                if path.is_file():
                    data = base64.b64encode(path.read_bytes()).decode("ascii")
                    img = f'<img alt="{label}" src="data:image/png;base64,{data}">'
                else:
                    img = f"<div>(image {html.escape(it['image'])} missing)</div>"
                out.append(f"<figure>{img}<figcaption>{label}</figcaption></figure>")
            out.append(f"</div><p>{_inline(b[2])}</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write results.json, accuracy.svg, report.md and report.html into `out_dir`.

    Renders only from `results` (and the CAM PNGs it names under `out_dir`), so a saved
    results.json re-renders without training (``gapnet report DIR``).

    Args:
        results: `run_compare`'s dict, or `load_results`' of a results.json.
        out_dir: the report folder.

    Returns:
        the paths written, by kind ("results", "svg", "markdown", "html").
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "results": out / RESULTS_JSON,
        "svg": out / ACCURACY_SVG,
        "markdown": out / REPORT_MD,
        "html": out / REPORT_HTML,
    }
    atomic_write(paths["results"], (json.dumps(results, indent=1) + "\n").encode())
    atomic_write(paths["svg"], accuracy_chart(results).encode())
    blocks = report_blocks(results)
    atomic_write(paths["markdown"], to_markdown(blocks).encode())
    atomic_write(paths["html"], to_html(blocks, out).encode())
    return paths


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = [(str.ljust if i == 0 else str.rjust) for i in range(len(header))]
    lines = [
        "  ".join(f(str(c), w) for f, c, w in zip(fmt, row, widths, strict=True))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_text(results: dict[str, Any]) -> str:
    """The report's tables and findings as plain text for the terminal (no images)."""
    out: list[str] = []
    for b in report_blocks(results):
        kind = b[0]
        if kind == "h":
            out.append(b[2] if b[1] == 1 else f"\n== {b[2]} ==" if b[1] == 2 else f"-- {b[2]} --")
        elif kind == "p" and b[1]:
            out.append(b[1].replace("`", ""))
        elif kind == "code":
            out.append(f"  {b[1]}")
        elif kind == "table":
            out.append(text_table(b[1], b[2]))
        elif kind == "svg":
            out.append(f"(chart: {b[1]})")
        elif kind == "grid":
            out.append(f"({_n(len(b[1]), 'overlay')} under {CAM_DIR}/)")
    return "\n".join(out) + "\n"
