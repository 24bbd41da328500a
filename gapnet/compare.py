"""Head comparisons, measured: what global average pooling buys against fully connected heads.

`run_compare(spec, out_dir)` trains one backbone with several heads on one data set (plus,
optionally, a size-robust GAP variant, a variant for the CAM section and a sweep over small
training sets), then measures each model: parameters, train/test accuracy, accuracy at other
input sizes and on larger canvases, and CAM localization. It returns the ``results`` dict (the
shape of ``results.json``) that `gapnet.report.write_report` renders.

`DEMO` holds every default of ``gapnet demo`` (full and ``--quick``) in one place.

Example:
    >>> spec = CompareSpec(model="convnet-tiny", heads=("fc", "gap"), epochs=1)
    >>> CompareSpec.from_dict(spec.to_dict()) == spec
    True
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gapnet import cam, data, inference
from gapnet.cam import REGIONS
from gapnet.config import Config, option
from gapnet.models import HEADS
from gapnet.report import CAM_DIR, RESULTS_FORMAT, interval, pooled, recipe
from gapnet.train import CHECKPOINT, TrainConfig, train

_SWEEP_OWNS = ("head", "train_size", "epochs", "out_dir")  # what each sweep run sets itself

# Box colours of the CAM grid (RGB): what the CAM found, and the truth.
PRED_BOX_COLOR = (255, 64, 64)
TRUE_BOX_COLOR = (64, 255, 64)


# --------------------------------------------------------------------------- the spec


@dataclass
class CompareSpec(Config):
    """One comparison: which heads, trained how, measured on what.

    Each field is one ``gapnet compare`` flag of the same name (``--train-sizes``) and one key
    of results.json's ``spec``; its comment is the flag's help.

    Example:
        >>> CompareSpec(heads=("fc", "gap"), train_sizes=(250,)).heads
        ('fc', 'gap')
        >>> CompareSpec(epochs=0)
        Traceback (most recent call last):
        ...
        ValueError: CompareSpec.epochs must be an int >= 1, got 0
    """

    # what is compared
    data: str = option("mnist-5k", nonempty=True)  # dataset (gapnet.data.load spec)
    model: str = option("convnet", nonempty=True)  # backbone (gapnet.models name)
    heads: tuple[str, ...] = option(
        ("fc", "fc-dropout", "gap", "gap-fc", "gmp", "gem"), choices=HEADS, nonempty=True
    )  # heads to train, each on the same backbone
    # how every run trains
    epochs: int = option(6, low=1)  # passes over the training set
    batch_size: int = option(128, low=1)  # images per optimizer step
    lr: float = option(3e-3, above=0)  # peak learning rate
    train_size: int | None = option(None, low=1)  # images of the main runs; None: all
    seed: int = option(0, low=0)  # seed of the first run (and of the test canvases)
    seeds: int = option(1, low=1)  # main heads and sweep train once per seed: seed, seed+1, ..
    threads: int = option(0, low=0)  # torch threads; 0: every core this process may use
    train: dict[str, Any] = option(default_factory=dict)  # more TrainConfig fields, all runs
    # the robust variant
    robust: dict[str, Any] | None = None  # TrainConfig overrides on top of its head's run
    robust_head: str = option("gap", choices=HEADS)  # the head the robust variant trains with
    cam_variant: dict[str, Any] | None = None  # the CAM section's run, "<head>-cam"; None: robust
    # the overfitting sweep: the same heads on smaller training sets
    train_sizes: tuple[int, ...] = option((250, 1000), low=1)  # sweep sizes; none: no sweep
    sweep_heads: tuple[str, ...] | None = option(
        None, choices=HEADS
    )  # heads of the sweep; None: all
    sweep_steps: int = option(150, low=1)  # each sweep run takes at least this many steps
    sweep_train: dict[str, Any] = option(default_factory=dict)  # TrainConfig fields, sweep only
    # any input size
    sizes: tuple[int, ...] = option((20, 28, 36, 48, 64), low=1)  # test images rescaled to S x S
    canvases: tuple[int, ...] = option(
        (28, 40, 56, 84, 112), low=1
    )  # digits on blank S x S canvases
    eval_n: int | None = option(500, low=1)  # test images per size and canvas; None: all
    scales: tuple[float, ...] = option((), above=0)  # robust run: also multi-scale at these
    # localization for free
    cam: bool = True  # the CAM section: overlay grid, localization table on the canvases
    cam_sizes: tuple[int, ...] = option((56, 84, 112), low=1)  # overlay grid and box rule sizes
    cam_examples: int = option(3, low=1)  # overlays per grid size
    loc_n: int | None = option(300, low=1)  # canvases per localization size; None: all
    distractors: int = option(0, low=0)  # stroke-like clutter per localization canvas
    threshold: float | None = option(None, low=0, high=1)  # CAM box threshold; None: chosen
    region: str | None = option(None, choices=REGIONS)  # CAM box region: largest, all; None: chosen

    def validate(self) -> None:
        if len(set(self.heads)) != len(self.heads):
            self.fail("heads", "names a head twice")
        if self.cam_variant is not None and self.cam_variant.get("head") not in HEADS:
            self.fail("cam_variant", f"must name its head, one of {', '.join(HEADS)}")
        owned = sorted(set(self.sweep_train) & set(_SWEEP_OWNS))
        if owned:
            raise ValueError(
                f"CompareSpec.sweep_train cannot set {', '.join(owned)}: each sweep run sets "
                "them itself (use train_sizes, sweep_heads, sweep_steps)"
            )

    @property
    def sweep(self) -> tuple[str, ...]:
        """The heads of the training-set-size sweep."""
        return self.heads if self.sweep_heads is None else self.sweep_heads


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
# measured each choice. The backbone is convnet narrowed to widths 16-32-64. The demo trains the
# two heads that carry the claims (fc and the NiN gap head), the two robust variants, the sweep
# and the CAM section within 6 minutes on 2 CPU cores: every run takes 10 epochs (12 took 6.5
# minutes). The heads train at lr 5e-3 with 1-px shifts and label smoothing 0.1 (at 12 epochs
# the gap head reached 98.7-98.8 % on 5 of 5 seeds; without them, 98.0-98.6). The size-robust
# variant is GeM on the scale-space convnet ("convnet-scale": the same weights see the input
# at 1, 1/2, .., 1/16, max over the levels its strokes allow), trained on digits rescaled to
# 20-40 px (one octave: the levels cover the others) on canvases up to 1.5x that, without
# label smoothing: 97.6-98.5 % in one pass at the input's own size on digits rescaled from 20
# to 280 px and on canvases from 28 to 224 px (3 seeds, 1,000 test digits). Its class maps
# are coarse (the max over levels), so the CAM section shows its own variant: GeM on the
# plain convnet, trained on 28-40 px canvases with two distractors each. The sweep trains
# without augmentation or smoothing, so it shows what the head alone does against overfitting.
DEMO = Demo(
    spec=CompareSpec(
        data="mnist-5k",
        model="convnet",
        train={
            "model_overrides": {"widths": [16, 32, 64]},
            "augmentation": "shift",
            "shift": 1,
            "label_smoothing": 0.1,
            "eval_every": 2,  # the test set every other epoch (and the last)
        },
        heads=("fc", "gap"),
        epochs=10,
        batch_size=128,
        lr=5e-3,
        threads=2,
        robust={
            "model": "convnet-scale",
            "model_overrides": {},
            "augmentation": "scale",
            "scale_size": (20, 40),
            "canvas_ratio": 1.5,
            "label_smoothing": 0.0,
        },
        robust_head="gem",
        cam_variant={
            "head": "gem",
            "augmentation": "canvas",
            "canvas_size": (28, 40),
            "distractors": 2,
            "label_smoothing": 0.0,
        },
        train_sizes=(250, 1000),
        sweep_heads=("fc", "gap"),
        sweep_steps=120,
        sweep_train={"augmentation": "none", "label_smoothing": 0.0, "eval_every": 5},
        sizes=(20, 28, 40, 56, 84, 112),
        canvases=(28, 56, 112, 224),
        scales=(1, 0.5),
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


def accuracy_table(
    model: Any,
    sets: Sequence[tuple[int, Any]],
    *,
    batch_size: int = 256,
    scales: Sequence[float] = (),
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Test accuracy of `model` on (size, ImageSet) pairs, in one pass at each image's size and,
    with `scales`, with test-time multi-scale inference; n/a where the model cannot run.

    Both come from the same forward passes: the pyramid's first level is the image itself.

    Args:
        model: a classifier that answers ``size_problem(h, w)`` (GapNet, export.OnnxModel).
        sets: (size, ImageSet) pairs, the images at that size.
        batch_size: images per forward pass.
        scales: the pyramid of `gapnet.inference.evaluate`'s ``scales``; (): one pass only.

    Returns:
        the one-pass rows and the multi-scale rows (None without `scales`): one
        ``{"size": S, "acc": float or None, "acc_ci": interval or None, "na": reason or None}``
        per pair (`gapnet.report.interval`: correct, n and the Wilson bounds).
    """
    one: list[dict[str, Any]] = []
    multi: list[dict[str, Any]] = []
    for size, imageset in sets:
        na = model.size_problem(size, size)  # the model's own rule (fc: one size)
        counts = [0, 0]  # correct in one pass, with the pyramid
        if na is None:
            labels = imageset.labels
            for start, probs in inference.level_probs(model, imageset.images, batch_size, scales):
                y = labels[start : start + probs.shape[1]].to(probs.device)
                counts[0] += int((probs[0].argmax(1) == y).sum())
                counts[1] += int((inference.most_confident(probs).argmax(1) == y).sum())
        for rows, correct in zip((one, multi), counts, strict=True):
            n = len(imageset)
            rows.append({
                "size": size, "na": na, "acc": None if na else correct / n,
                "acc_ci": None if na else interval(correct, n),
            })  # fmt: skip
    return one, multi if scales else None


def _eval_sets(spec: CompareSpec, ds: Any) -> tuple[list[tuple[int, Any]], list[tuple[int, Any]]]:
    """The rescaled test sets and the canvas sets every model is measured on (built once from
    `ds`, the loaded `spec.data`)."""
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


def _train_config(spec: CompareSpec, out_dir: Path, name: str, **changes: Any) -> TrainConfig:
    fields: dict[str, Any] = dict(
        data=spec.data, model=spec.model, epochs=spec.epochs, batch_size=spec.batch_size,
        lr=spec.lr, train_size=spec.train_size, seed=spec.seed, threads=spec.threads,
    )  # fmt: skip
    fields.update(spec.train)
    fields.update(changes)
    fields["out_dir"] = str(out_dir / name)
    return TrainConfig(**fields)


def robust_config(spec: CompareSpec, out_dir: str | os.PathLike[str]) -> TrainConfig:
    """The TrainConfig of `spec`'s size-robust variant, trained into out_dir/<head>-robust.

    Example:
        >>> robust_config(DEMO.spec, DEMO.out).run_dir.as_posix()
        'runs/demo/gem-robust'
    """
    if spec.robust is None:
        raise ValueError("CompareSpec.robust is None: this comparison trains no robust variant")
    name = f"{spec.robust_head}-robust"
    return _train_config(spec, Path(out_dir), name, head=spec.robust_head, **spec.robust)


def _train(cfg: TrainConfig, progress: bool, reuse: bool) -> Any:
    """Train afresh; with `reuse`, a complete run of the same config in its folder is kept."""
    if reuse and (cfg.run_dir / CHECKPOINT).is_file():
        try:
            return train(cfg, progress=progress, resume=True)
        except ValueError:  # another config: retrain
            pass
    return train(cfg, progress=progress, overwrite=True)


def _run_entry(
    name: str, result: Any, out_dir: Path, robust: dict[str, Any] | None, n_test: int
) -> dict[str, Any]:
    """The results.json entry of one trained run (measurements are added by the caller).

    Its history's test accuracies carry their intervals over the `n_test` test images; the
    training accuracy of an epoch is the running one over its augmented batches, no count of
    fixed images, so it has none.
    """
    metrics = [
        {"epoch": m["epoch"], "train_acc": m["train_acc"], "test_acc": m["test_acc"],
         "test_acc_ci": None if m["test_acc"] is None
         else interval(round(m["test_acc"] * n_test), n_test)}
        for m in result.metrics
    ]  # fmt: skip
    return {
        "name": name,
        "head": result.config.head,
        "robust": robust is not None,
        "recipe": recipe(robust) if robust is not None else "",
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


def _seed_folder(spec: CompareSpec, name: str, seed: int) -> str:
    """The run folder of `name` trained with `seed`: ``name`` alone, ``name/seed<k>`` when the
    comparison trains several seeds."""
    return name if spec.seeds == 1 else f"{name}/seed{seed}"


def _seed_record(result: Any, seed: int, n_train: int, n_test: int) -> dict[str, Any]:
    """What results.json keeps of one seed's run: accuracies with their counts and intervals."""
    train_ok, test_ok = round(result.train_acc * n_train), round(result.test_acc * n_test)
    return {
        "seed": seed,
        "train_acc": result.train_acc,
        "test_acc": result.test_acc,
        "train_acc_ci": interval(train_ok, n_train),
        "test_acc_ci": interval(test_ok, n_test),
        "train_seconds": result.train_seconds,
    }


def _pooled_fields(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The accuracies of a head over its seeds: counts pooled (so one seed gives its own
    numbers), the mean training time, and every seed's record under "seeds"."""
    train_ci = pooled([r["train_acc_ci"] for r in records])
    test_ci = pooled([r["test_acc_ci"] for r in records])
    return {
        "train_acc": train_ci["correct"] / train_ci["n"],
        "test_acc": test_ci["correct"] / test_ci["n"],
        "train_acc_ci": train_ci,
        "test_acc_ci": test_ci,
        "train_seconds": sum(r["train_seconds"] for r in records) / len(records),
        "seeds": records,
    }


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
        # (name, TrainConfig changes, the recipe of a one-seed variant, its test-time pyramid)
        variants: list[tuple[str, dict[str, Any], dict[str, Any] | None, tuple[float, ...]]] = [
            (h, {"head": h}, None, ()) for h in spec.heads
        ]
        if spec.robust is not None:
            robust_name = f"{spec.robust_head}-robust"
            changes = {"head": spec.robust_head, **spec.robust}
            variants.append((robust_name, changes, spec.robust, spec.scales))
        if spec.cam_variant is not None:
            cam_name = f"{spec.cam_variant['head']}-cam"
            variants.append((cam_name, spec.cam_variant, spec.cam_variant, ()))
        sweep_runs = [(n, h) for n in spec.train_sizes for h in spec.sweep]
        seeds = [spec.seed + k for k in range(spec.seeds)]
        total = (len(spec.heads) + len(sweep_runs)) * len(seeds)
        total += (spec.robust is not None) + (spec.cam_variant is not None)
        rescaled, canvases = _eval_sets(spec, ds)
        runs, models, done = [], {}, 0
        for name, changes, robust, scales in variants:
            records, first = [], None
            for seed in seeds[:1] if robust else seeds:  # the robust variant: one seed
                done += 1
                cfg = _train_config(spec, out, _seed_folder(spec, name, seed), seed=seed, **changes)
                say(f"[{done}/{total}] {name}: {cfg.model} on {n_train} {spec.data} images, "
                    f"{cfg.epochs} epochs, seed {seed}"
                    + (f" ({recipe(robust)})" if robust else ""))  # fmt: skip
                result = _train(cfg, progress, reuse)
                records.append(_seed_record(result, seed, n_train, len(ds.test)))
                first = first or result
            assert first is not None  # every variant trains at least one seed
            entry = _run_entry(name, first, out, robust, len(ds.test)) | _pooled_fields(records)
            entry["train_images"] = n_train
            entry["input_size"] = first.model.input_size  # the one size it takes, or None
            entry["has_cam"] = first.model.has_cam
            # measured on the first seed's model: the sizes are about the head, not the seed
            entry["sizes"], multi_sizes = accuracy_table(first.model, rescaled, scales=scales)
            entry["canvases"], multi_canvases = accuracy_table(first.model, canvases, scales=scales)
            if scales:
                entry["multiscale"] = {
                    "scales": list(scales), "sizes": multi_sizes, "canvases": multi_canvases,
                }  # fmt: skip
            runs.append(entry)
            models[name] = first.model
        sweep = []
        for n, head in sweep_runs:
            steps = -(-n // spec.batch_size)
            epochs = max(spec.epochs, -(-spec.sweep_steps // steps))
            records = []
            for seed in seeds:
                done += 1
                folder = _seed_folder(spec, f"sweep/{head}-{n}", seed)
                cfg = _train_config(
                    spec, out, folder, **spec.sweep_train, head=head, train_size=n,
                    epochs=epochs, seed=seed,
                )  # fmt: skip
                sweep_recipe = f", {recipe(spec.sweep_train)}" if spec.sweep_train else ""
                say(f"[{done}/{total}] {head} on {n} images, {epochs} epochs, seed {seed} "
                    f"(overfitting sweep{sweep_recipe})")  # fmt: skip
                result = _train(cfg, progress, reuse)
                records.append(_seed_record(result, seed, n, len(ds.test)))
            sweep.append(
                {"head": head, "train_size": n, "epochs": epochs} | _pooled_fields(records)
            )
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
    """The run the CAM section shows: the CAM variant, else the robust variant, else plain gap,
    else the first head with class activation maps (None if no head has them)."""
    with_cam = [r for r in runs if r["has_cam"]]
    own = [r for r in with_cam if r["robust"] and r["name"].endswith("-cam")]
    robust = [r for r in with_cam if r["robust"]]
    plain_gap = [r for r in with_cam if r["name"] == "gap"]
    chosen = own or robust or plain_gap or with_cam
    return str(chosen[0]["name"]) if chosen else None


def _cam_section(
    spec: CompareSpec,
    out: Path,
    runs: list[dict[str, Any]],
    models_by_name: dict[str, Any],
    say: Callable[[str], None],
) -> dict[str, Any] | None:
    """The localization table and the overlay grid of the CAM model (PNGs under out/cam/)."""
    name = _cam_model(runs)
    if name is None:
        say("CAM section skipped: no head gives class activation maps")
        return None
    model = models_by_name[name]
    if spec.threshold is None:
        say(f"CAM: choosing the box rule of {name} on the validation split")
        choice = cam.choose_threshold(
            model, spec.cam_sizes, regions=cam.REGIONS if spec.region is None else (spec.region,),
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
    for key in ("acc", "loc_acc", "top1_loc"):  # fractions of the n canvases
        ok = out["n"] and out[key] is not None
        out[f"{key}_ci"] = interval(round(out[key] * out["n"]), out["n"]) if ok else None
    return out
