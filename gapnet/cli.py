"""The ``gapnet`` command (also ``python -m gapnet``): train, evaluate, predict, compare heads.

Every subcommand's ``--help`` describes it and shows an example. User mistakes (a bad flag,
a missing file, a model that cannot take an input) print one line naming what was wrong and
exit with status 2; Ctrl-C during training saves the checkpoint and exits with 130.

Example:
    >>> main(["info", "convnet-tiny", "--head", "gap"])  # doctest: +ELLIPSIS
    layer ...
    0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import textwrap
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from gapnet import (
    __version__,
    cam,
    compare,
    data,
    explain,
    export,
    inference,
    models,
    report,
    serve,
)
from gapnet.cam import REGIONS
from gapnet.explain import ASPECT, DPI, TOPICS, WIDTH
from gapnet.models import HEADS, ModelConfig, list_models
from gapnet.report import text_table
from gapnet.train import Dist, TrainConfig, evaluate, predict_proba, read_run, train

PROG = "gapnet"

# Exit statuses
EXIT_USAGE = 2  # a user mistake: bad argument, missing or unreadable file, impossible request
EXIT_ENV = 1  # something missing from the installation (an optional dependency)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


class UsageError(Exception):
    """A user mistake: `main` prints its message on one line and exits with status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line that says where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


# --------------------------------------------------------------------------- argument types


def _number(cast: Callable[[str], Any], ok: Callable[[Any], bool], what: str) -> Any:
    """An argparse type: `cast` the text, then require `ok`; errors say `what` was expected."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive = _number(int, lambda v: v >= 1, "a positive integer")
_nonneg = _number(int, lambda v: v >= 0, "an integer >= 0")
_fraction = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def _ints(text: str) -> tuple[int, ...]:
    """ "250,1000" -> (250, 1000); "" or "none" -> ()."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers such as 28,40,56, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _scales(text: str) -> tuple[float, ...]:
    """ "1,0.5,0.25" -> (1.0, 0.5, 0.25): the factors of a test-time pyramid."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive factors such as 1,0.5,0.25, got {text!r}"
        )
    return values


SCALES_HELP = (
    "test-time multi-scale inference: also run the input rescaled by each factor (levels under "
    "20 px skipped); each image's most confident level answers, e.g. 2,1,0.5,0.25,0.125 "
    "(default: one pass at the input's own size)"
)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


# --------------------------------------------------------------------------- images


def _read_image(path: str, in_chans: int, invert: str) -> tuple[Any, Any]:
    """`gapnet.data.read_image` of a file named on the command line (errors: exit status 2)."""
    if in_chans not in (1, 3):
        raise UsageError(f"images can feed 1- or 3-channel models, this one has {in_chans}")
    return data.read_image(path, in_chans, invert=invert)


def _model_input(model: Any, x: Any, path: str, resize: int | None) -> tuple[Any, str | None]:
    """The image as the model takes it (`gapnet.inference.model_input`), after --resize."""
    note = None
    if resize is not None and model.input_size is None:
        x = data.rescale(x[None], resize)[0]
        note = f"resized to {resize}x{resize} (--resize)"
    try:
        x, fitted = inference.model_input(model, x)
    except ValueError as e:
        raise UsageError(f"image {path!r}: {e} (use --resize)") from None
    return x, fitted or note


def _class_names(data_spec: str, num_classes: int) -> list[str]:
    """Class names for a data spec, where known without reading the data; else "0", "1", ..."""
    name = data_spec.partition(":")[0]
    known = {
        "fashion-mnist": data.FASHION_MNIST_CLASSES,
        "cifar10": data.CIFAR10_CLASSES,
    }.get(name, data.DIGIT_CLASSES if name in ("mnist-5k", "digits", "mnist", "idx") else None)
    if known is not None and len(known) == num_classes:
        return list(known)
    return [str(i) for i in range(num_classes)]


def _load_model(path: str, onnx: bool = False) -> tuple[Any, Any, list[str]]:
    """The model of a checkpoint (or, with `onnx`, of a `gapnet export` file), its TrainConfig
    and its class names."""
    if Path(path).suffix == ".onnx":
        if not onnx:
            raise UsageError(
                f"{path!r} is an ONNX file: predict and eval take one, this command "
                "needs the checkpoint (the PyTorch model)"
            )

        onnx_model = export.load(path)
        return onnx_model, TrainConfig.from_dict(onnx_model.train_config or {}), onnx_model.classes
    ckpt, cfg = read_run(path)
    model = ckpt.build_model()
    return model, cfg, ckpt.classes or _class_names(cfg.data, model.num_classes)


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- train


# Flags of ModelConfig fields that `gapnet train` passes on as TrainConfig.model_overrides
# (the others, arch, num_classes, in_chans and head, come from --model, the data and --head).
MODEL_FLAGS = ("widths", "depth", "input_size", "fc_hidden", "drop_rate", "gem_p")
# Older flag names kept working beside the generated ones.
TRAIN_ALIASES: dict[str, tuple[str, ...]] = {
    "augmentation": ("--augment",),
    "canvas_size": ("--canvas",),
    "out_dir": ("--out",),
}
_MODEL = "model."  # dest prefix of the ModelConfig flags


def _option_type(option: Any) -> Callable[[str], Any]:
    """An argparse type for a config field: text -> value, checked by the field's own rules."""
    hint = option.hint
    optional = type(None) in typing.get_args(hint)
    if optional:
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)

    def parse(text: str) -> Any:
        if optional and text.strip().lower() == "none":
            return None
        try:
            if origin is tuple:  # "none" (or nothing) is the empty tuple: no sweep, no scales
                values = [] if text.strip().lower() == "none" else text.split(",")
                raw: Any = [args[0](v.strip()) for v in values if v.strip()]
            elif origin is dict:
                raw = json.loads(text)
            else:
                raw = origin(text)
            return option.check(raw)
        except (ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(str(e) or f"bad value {text!r}") from None

    return parse


def _metavar(option: Any) -> str:
    hint = option.hint
    if type(None) in typing.get_args(hint):
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return "MIN,MAX" if len(args) == 2 and args[1] is not Ellipsis else "V,V,.."
    return {int: "N", float: "X", dict: "JSON"}.get(typing.get_origin(hint) or hint, "")


def add_config_flags(
    p: argparse.ArgumentParser,
    cls: Any,
    *,
    names: Sequence[str] | None = None,
    skip: Sequence[str] = (),
    aliases: dict[str, tuple[str, ...]] | None = None,
    prefix: str = "",
    groups: dict[str, Any] | None = None,
    group: str | None = None,
) -> dict[str, Any]:
    """One flag per field of config class `cls` (``--batch-size`` for batch_size), in groups by
    the section comments of the class (or `group`), with the field's comment as help. A flag
    left out leaves its field out of the namespace, so the config's default applies.

    Returns:
        the argument groups by title (pass them to a later call to add to the same groups).
    """
    groups = {} if groups is None else groups
    for option in cls.options():
        if option.name in skip or (names is not None and option.name not in names):
            continue
        title = group or option.group or cls.__name__
        into = groups.get(title) or groups.setdefault(title, p.add_argument_group(title))
        flags = [f"--{option.name.replace('_', '-')}", *(aliases or {}).get(option.name, ())]
        default = option.default
        shown = (",".join(map(str, default)) or "none") if isinstance(default, tuple) else default
        extra: dict[str, Any] = {"help": f"{option.help} (default {shown!s})".replace("%", "%%")}
        if option.hint is bool:
            extra["action"] = argparse.BooleanOptionalAction
        else:
            extra["type"] = _option_type(option)
            extra["metavar"] = _metavar(option) or option.name.upper()
            if option.meta.get("choices") and option.hint is str:
                extra["choices"], extra["type"] = option.meta["choices"], str
                extra.pop("metavar")
        into.add_argument(*flags, dest=prefix + option.name, default=argparse.SUPPRESS, **extra)
    return groups


def _train_fields(a: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig fields from the train flags (flags left out keep TrainConfig's defaults)."""
    given = vars(a)
    fields = {o.name: given[o.name] for o in TrainConfig.options() if o.name in given}
    if "canvas_size" in fields and "augmentation" not in fields:
        fields["augmentation"] = "canvas"  # --canvas alone means: train on canvases
    overrides = {k[len(_MODEL) :]: v for k, v in given.items() if k.startswith(_MODEL)}
    if overrides:
        fields["model_overrides"] = json.loads(json.dumps(overrides))
    return fields


def cmd_train(a: argparse.Namespace) -> int:
    """`gapnet train`: one run, then its metrics and checkpoint path."""
    cfg = TrainConfig(**_train_fields(a))
    try:
        result = train(cfg, progress=not a.quiet, resume=a.resume, overwrite=a.overwrite)
    except FileExistsError:
        raise UsageError(
            f"{str(cfg.run_dir)!r} already holds a run: add --resume to continue it, "
            "--overwrite to replace it, or pick another --out-dir"
        ) from None
    except FileNotFoundError as e:
        if a.resume:
            raise UsageError(f"{e}; drop --resume to start it") from None
        raise
    if not Dist.from_env().main:  # under torchrun, rank 0 speaks for all
        return 0
    counts = result.param_counts
    print(
        f"{cfg.model} + {cfg.head} head on {cfg.data}: train acc {100 * result.train_acc:.2f}% "
        f"(loss {result.train_loss:.4f}), test acc {100 * result.test_acc:.2f}% "
        f"(loss {result.test_loss:.4f})"
    )
    print(
        f"parameters: {counts['total']:,} ({counts.get('head', 0):,} in the head); "
        f"trained {len(result.metrics)} epoch{'' if len(result.metrics) == 1 else 's'} "
        f"in {result.train_seconds:.1f} s"
    )
    print(f"checkpoint: {result.checkpoint}")
    print(f"next: {PROG} eval --checkpoint {shlex.quote(str(result.checkpoint))}")
    return 0


# --------------------------------------------------------------------------- eval


def cmd_eval(a: argparse.Namespace) -> int:
    """`gapnet eval`: accuracy and loss on the test split, rescaled or on canvases."""
    _set_threads(a.threads)
    model, cfg, _ = _load_model(a.checkpoint, onnx=True)
    spec = a.data or cfg.data
    if a.canvas is not None:
        side = a.canvas
        test, _ = data.canvas_mnist(side, n=a.n, seed=a.seed, source=spec)
        what = f"placed on {side}x{side} canvases"
    else:
        ds = data.load(spec, seed=cfg.split_seed, size=cfg.image_size)
        test = ds.test if a.n is None else data.stratified_subset(ds.test, min(a.n, len(ds.test)))
        side = a.size if a.size is not None else test.images.shape[-1]
        if a.size is not None:
            test = data.ImageSet(data.rescale(test.images, a.size), test.labels)
        h, w = test.images.shape[-2:]
        what = f"rescaled to {h}x{w}" if a.size is not None else f"at {h}x{w}"
    if test.images.shape[-2] == test.images.shape[-1]:
        na = model.size_problem(side)
        if na is not None:
            raise UsageError(
                f"this {model.config.head} model cannot take {side}x{side} inputs ({na}); only "
                "global-pooling heads accept any size"
            )
    acc, loss = evaluate(model, test.images, test.labels, batch_size=a.batch_size, scales=a.scales)
    if a.scales:
        what += f", multi-scale {','.join(f'{v:g}' for v in a.scales)}"
    if a.json:
        print(json.dumps({"data": spec, "n": len(test), "inputs": what, "acc": acc, "loss": loss}))
    else:
        print(
            f"{spec} test split, {len(test)} images {what}: accuracy {100 * acc:.2f}%, "
            f"loss {loss:.4f}"
        )
    return 0


# --------------------------------------------------------------------------- predict


def cmd_predict(a: argparse.Namespace) -> int:
    """`gapnet predict`: top-k classes of image files (text, or JSON with all probabilities)."""
    model, _, names = _load_model(a.checkpoint, onnx=True)
    k = min(a.top_k, model.num_classes)
    images = [(path, *_read_image(path, model.config.in_chans, a.invert)) for path in a.images]
    out = []
    for path, x, info in images:
        x, note = _model_input(model, x, path, a.resize)
        probs = predict_proba(model, x[None], scales=a.scales)[0]  # (K,)
        top = probs.topk(k)
        out.append({
            "image": path, "size": list(info.size), "mode": info.mode,
            "input": list(x.shape), "inverted": info.inverted, "resized": note,
            "top_k": [
                {"class": int(c), "name": names[int(c)], "prob": float(p)}
                for p, c in zip(top.values, top.indices, strict=True)
            ],
            "probs": [float(p) for p in probs],
        })  # fmt: skip
    if a.json:
        print(json.dumps(out, indent=1))
        return 0
    for r in out:
        c, h, w = r["input"]
        notes = [f"{r['size'][0]}x{r['size'][1]} {r['mode']} -> {c}x{h}x{w} input"]
        if r["inverted"]:
            notes.append(
                "inverted: its border is mostly bright, the model expects a dark background"
            )
        if r["resized"]:
            notes.append(r["resized"])
        print(f"{r['image']} ({'; '.join(notes)})")
        width = max(len(t["name"]) for t in r["top_k"])
        for i, t in enumerate(r["top_k"], 1):
            print(f"  {i}. {t['name']:<{width}}  {100 * t['prob']:6.2f}%")
    return 0


# --------------------------------------------------------------------------- cam / localize


def _require_cam_model(model: Any) -> None:
    if not model.has_cam:
        raise UsageError(
            f"this checkpoint has an {model.config.head} head: a fully connected layer mixes every "
            "location into every logit, so there is no class activation map; train a "
            "global-pooling head (e.g. --head gap)"
        )


def _add_region(p: Any, default_text: str, default: str | None = None) -> None:
    p.add_argument(
        "--region",
        choices=REGIONS,
        default=default,
        help="what the CAM box surrounds: the largest connected region above the threshold "
        f"(the CAM paper's rule) or all of it ({default_text})",
    )


def cmd_cam(a: argparse.Namespace) -> int:
    """`gapnet cam`: one CAM overlay PNG per image and class, with the box it gives."""
    model, _, names = _load_model(a.checkpoint)
    _require_cam_model(model)
    bad = [c for c in a.classes or [] if not 0 <= c < model.num_classes]
    if bad:
        raise UsageError(
            f"--class {bad[0]} is not a class of this model (0..{model.num_classes - 1})"
        )
    images = [(path, *_read_image(path, model.config.in_chans, a.invert)) for path in a.images]
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for path, x, info in images:
        x, note = _model_input(model, x, path, a.resize)
        # one forward pass gives the prediction and the maps (the predicted class's by default)
        asked = torch.tensor(a.classes) if a.classes else None
        batch = x[None].expand(1 if asked is None else len(asked), *x.shape)
        res = cam.class_activation_maps(model, batch, asked)
        probs = res.logits[0].float().softmax(0)
        pred = int(probs.argmax())
        classes = res.classes.tolist()
        boxes = cam.cam_boxes(res.maps, a.threshold, a.region)
        stem = Path(path).stem
        if stem in used:
            stem = f"{stem}-{len(used)}"
        used.add(stem)
        extra = f"; {note}" if note else ""
        inv = "; inverted (bright border)" if info.inverted else ""
        print(f"{path}: predicted {names[pred]} ({100 * float(probs[pred]):.1f}%){inv}{extra}")
        for i, c in enumerate(classes):
            target = out_dir / f"{stem}-class{c}.png"
            box = [int(v) for v in boxes[i]]
            img = cam.overlay(x, res.maps[i], alpha=a.alpha, boxes=[(box, (255, 64, 64))])
            cam.save_png(img, target)
            print(
                f"  class {names[c]} ({100 * float(probs[c]):.1f}%): box {tuple(box)} -> {target}"
            )
    return 0


def cmd_localize(a: argparse.Namespace) -> int:
    """`gapnet localize`: classification and CAM-box accuracy per canvas size."""
    _set_threads(a.threads)
    model, cfg, _ = _load_model(a.checkpoint)
    _require_cam_model(model)
    source = a.data or cfg.data
    if a.choose_threshold:
        n = {} if a.n is None else {"n": a.n}  # None: choose_threshold's own validation size
        regions = cam.REGIONS if a.region is None else (a.region,)
        choice = cam.choose_threshold(
            model, a.sizes, regions=regions, distractors=a.distractors, seed=a.seed,
            source=source, **n,
        )  # fmt: skip
        threshold, region = choice.threshold, choice.region
        how = "chosen on the validation split"
    else:
        how = "given" if a.threshold_given else "default"
        threshold, region = a.threshold, a.region or "largest"
    rows = [
        compare.localization_row(r)
        for r in cam.localize(
            model, a.sizes, n=a.n, distractors=a.distractors, threshold=threshold, region=region,
            seed=a.seed, source=source,
        )
    ]  # fmt: skip
    if a.json:
        print(
            json.dumps(
                {
                    "data": source,
                    "threshold": threshold,
                    "region": region,
                    "threshold_source": how,
                    "rows": rows,
                }
            )
        )
        return 0
    print(
        f"{source} test digits on blank canvases, {rows[0]['n'] if rows else 0} per size, "
        f"{a.distractors} distractors each; CAM box threshold {threshold:.2f}, region "
        f"{region} ({how})"
    )
    header = ["canvas", "accuracy", "box loc acc (IoU>=0.5)", "top-1 loc", "mean IoU"]
    table = [
        [f"{r['size']}x{r['size']}", report.pct(r["acc"]), report.pct(r["loc_acc"]),
         report.pct(r["top1_loc"]), "n/a" if r["mean_iou"] is None else f"{r['mean_iou']:.3f}"]
        for r in rows
    ]  # fmt: skip
    print(report.text_table(header, table))
    return 0


# --------------------------------------------------------------------------- info


def cmd_info(a: argparse.Namespace) -> int:
    """`gapnet info`: layer table and parameter counts per part."""
    overrides: dict[str, Any] = {}
    if a.input_size is not None:
        overrides["input_size"] = a.input_size
    model = models.create(
        a.model, num_classes=a.num_classes, in_chans=a.in_chans, head=a.head, **overrides
    )
    size = model.config.input_size
    rows = models.layer_table(model, size)
    header = ["layer", "type", "output shape", "params"]
    table = [[r.name, r.type, "x".join(map(str, r.shape)), f"{r.params:,}"] for r in rows]
    print(text_table(header, table))
    counts = model.param_counts()
    total = counts["total"] or 1
    print()
    print(f"{a.model} with a {a.head} head, {model.config.in_chans}x{size}x{size} input:")
    for part in ("backbone", "head", "total"):
        print(f"  {part:<9} {counts[part]:>12,} parameters  ({100 * counts[part] / total:5.1f}%)")
    if model.input_size is not None:
        print(f"  input: {size}x{size} only (the {a.head} head is sized for it)")
    else:
        low = model.backbone.min_input_size
        print(f"  input: any size >= {low}x{low} (global pooling has no parameters)")
    return 0


# --------------------------------------------------------------------------- compare / demo


def _spec_changes(a: argparse.Namespace) -> dict[str, Any]:
    """CompareSpec fields from the compare flags (flags left out keep the spec's values).

    ``--robust`` is the one flag that is not a field's value: it switches on the demo's robust
    variant (DEMO.spec.robust, trained with DEMO.spec.robust_head unless --robust-head says)
    and its CAM variant (DEMO.spec.cam_variant, unless --cam-variant says).
    """
    given = vars(a)
    changes = {
        o.name: given[o.name]
        for o in compare.CompareSpec.options()
        if o.name in given and o.name != "robust"
    }
    if a.robust is not None:
        changes["robust"] = compare.DEMO.spec.robust if a.robust else None
        changes.setdefault("cam_variant", compare.DEMO.spec.cam_variant if a.robust else None)
        if a.robust:
            changes.setdefault("robust_head", compare.DEMO.spec.robust_head)
    return changes


def _run_report(spec: Any, out: str, a: argparse.Namespace, argv: Sequence[str]) -> int:
    command = f"{PROG} {shlex.join(argv)}"
    results = compare.run_compare(spec, out, command=command, progress=not a.quiet, reuse=a.reuse)
    paths = report.write_report(results, out)
    print(report.summary_text(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    """`gapnet compare`: CompareSpec defaults, then --quick (DEMO.quick), then the flags."""
    spec = compare.CompareSpec()
    if a.quick:
        spec = spec.replace(**compare.DEMO.quick)
    spec = spec.replace(**_spec_changes(a))
    return _run_report(spec, a.out, a, a.argv)


def cmd_demo(a: argparse.Namespace) -> int:
    """`gapnet demo`: the comparison with DEMO's settings (DEMO.quick on top with --quick)."""
    spec = compare.DEMO.spec.replace(**compare.DEMO.quick) if a.quick else compare.DEMO.spec
    if a.threads is not None:
        spec = spec.replace(threads=a.threads)
    return _run_report(spec, a.out or compare.DEMO.out, a, a.argv)


def cmd_report(a: argparse.Namespace) -> int:
    """`gapnet report`: re-render a comparison from its results.json."""
    results = report.load_results(a.folder)
    folder = Path(a.folder) if Path(a.folder).is_dir() else Path(a.folder).parent
    paths = report.write_report(results, folder)
    print(report.summary_text(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


# --------------------------------------------------------------------------- explain


def _padding(text: str) -> int | str:
    """--padding: an integer >= 0, "same" or "valid"."""
    if text in ("same", "valid"):
        return text
    return _number(int, lambda v: v >= 0, "an integer >= 0, 'same' or 'valid'")(text)


def cmd_explain(a: argparse.Namespace) -> int:
    """`gapnet explain`: one idea as a PNG drawn from real numbers, and its text version."""
    given = {f.name: getattr(a, f.name) for f in dataclasses.fields(explain.Options)}
    options = explain.Options(**{k: v for k, v in given.items() if v is not None})
    out = a.out or f"runs/explain/{a.topic}.png"
    command = f"{PROG} {shlex.join(a.argv)}"
    res = explain.explain(a.topic, options, out=out, width=a.width, dpi=a.dpi, command=command)
    print(res.text)
    if res.drawn is not None:
        print(f"wrote {res.drawn.path} ({res.drawn.size[0]}x{res.drawn.size[1]} px)")
    return 0


def _add_explain_parser(sub: Any) -> None:
    heights = ", ".join(f"{t} {ASPECT[t]:g}" for t in TOPICS)
    p = _command(
        sub, "explain", "draw pooling, GAP, heads or a CAM from real numbers (the tutorial's)",
        f"""Draw one idea of docs/tutorial.md as a PNG from real numbers and print its text
        version with the same numbers. maxpool / avgpool: a seeded grid of integers, each
        window outlined, each output cell holding its window's maximum or mean (from
        gapnet.reference, the specification). gap: a trained model's feature map and the
        vector of its channel means. head: the parameters of an fc, a gap-fc and a gap head
        as areas. cam: a digit, the class map of its predicted class and the CAM box. gap and
        cam use --checkpoint, else runs/demo/gap, else a tiny model they train first (seconds)
        and reuse. The PNG is --width pixels wide and width x ratio high ({heights}).""",
        ["gapnet explain maxpool --kernel 3 --stride 2 --padding same --size 7",
         "gapnet explain head --widths 16,32,64 --out head.png",
         "gapnet explain cam --checkpoint runs/demo/gem-robust --canvas 84"],
    )  # fmt: skip
    p.add_argument("topic", choices=TOPICS, metavar="TOPIC", help=", ".join(TOPICS))
    g = p.add_argument_group("maxpool, avgpool")
    g.add_argument("--size", type=_positive, metavar="S", help="input grid S x S (default 6)")
    g.add_argument("--kernel", type=_positive, metavar="K", help="kernel_size (default 2)")
    g.add_argument("--stride", type=_positive, metavar="S", help="(default: the kernel size)")
    g.add_argument(
        "--padding", type=_padding, metavar="P", help="an int, same or valid (default 0)"
    )
    g.add_argument("--ceil-mode", action="store_true", help="PyTorch's ceil_mode")
    g.add_argument("--seed", type=_nonneg, help="the grid's numbers; cam: where the digit lands")
    g = p.add_argument_group("gap, cam")
    g.add_argument(
        "--checkpoint", "-c", metavar="C", help="run folder or checkpoint (default runs/demo/gap)"
    )
    g.add_argument("--index", type=_nonneg, metavar="I", help="test image I (default 0)")
    g.add_argument("--channels", type=_positive, metavar="N", help="gap: maps drawn (default 6)")
    g.add_argument("--canvas", type=_positive, metavar="S", help="cam: on a blank S x S canvas")
    g.add_argument("--threshold", type=_fraction, metavar="T", help="cam: box threshold (0.2)")
    g = p.add_argument_group("head")
    g.add_argument("--model", metavar="MODEL", help="backbone (default convnet)")
    g.add_argument("--widths", type=_ints, metavar="C,C,..", help="convnet channels per stage")
    g.add_argument("--input-size", type=_positive, metavar="S", help="input S x S (default 28)")
    g.add_argument("--num-classes", type=_positive, metavar="K", help="(default 10)")
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="PNG", help="the figure (default runs/explain/TOPIC.png)")
    g.add_argument("--width", type=_positive, default=WIDTH, help=f"pixels (default {WIDTH})")
    g.add_argument("--dpi", type=_positive, default=DPI, help=f"lettering scale (default {DPI})")
    p.set_defaults(handler=cmd_explain)


# --------------------------------------------------------------------------- export / serve


def cmd_export(a: argparse.Namespace) -> int:
    """`gapnet export`: an ONNX file of a checkpoint, then its parity with PyTorch."""
    _set_threads(a.threads)
    options: dict[str, Any] = {"cams": a.cams, "opset": a.opset}
    if a.sizes:
        options["sizes"] = a.sizes
    result = export.export_checkpoint(a.checkpoint, a.out, **options)
    print("\n".join(export.describe(result)))
    if not result.ok:
        _error("export", f"{a.out} does not match PyTorch within {export.PARITY_TOL:.0e}")
        return EXIT_ENV
    print(f"next: {PROG} predict IMAGE --checkpoint {shlex.quote(str(a.out))}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    """`gapnet serve`: the web demo and its JSON API, until Ctrl-C."""
    _set_threads(a.threads)
    predictor = serve.load_predictor(a.checkpoint, max_pixels=a.max_pixels)
    serve.run(predictor, host=a.host, port=a.port, max_bytes=a.max_bytes)
    return 0


# --------------------------------------------------------------------------- the parser


def _command(
    sub: Any, name: str, summary: str, description: str, examples: list[str]
) -> argparse.ArgumentParser:
    text = textwrap.fill(" ".join(description.split()), width=80)
    epilog = "example:\n" + "\n".join(f"  {e}" for e in examples)
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=summary, description=text, epilog=epilog, formatter_class=_Formatter
    )
    return p


def _add_train_args(p: argparse.ArgumentParser) -> None:
    groups = add_config_flags(p, TrainConfig, skip=("model_overrides",), aliases=TRAIN_ALIASES)
    add_config_flags(p, ModelConfig, names=MODEL_FLAGS, prefix=_MODEL, groups=groups, group="model")
    g = p.add_argument_group("run")
    g.add_argument(
        "--resume", action="store_true", help="continue the run saved in --out-dir (same flags)"
    )
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out-dir")
    g.add_argument("--quiet", action="store_true", help="no progress output")


def _add_checkpoint(p: argparse.ArgumentParser, onnx: bool = False) -> None:
    p.add_argument(
        "--checkpoint",
        "-c",
        required=True,
        metavar="C",
        help="a checkpoint.safetensors or the run folder holding it"
        + (", or an .onnx file from gapnet export" if onnx else ""),
    )


def _add_image_args(p: argparse.ArgumentParser, onnx: bool = False) -> None:
    p.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...), any size and mode"
    )
    _add_checkpoint(p, onnx)
    p.add_argument(
        "--resize",
        type=_positive,
        metavar="S",
        help="global-pooling models: resize to S x S first (default: the image's own size)",
    )
    p.add_argument(
        "--invert",
        choices=("auto", "yes", "no"),
        default="auto",
        help="1-channel models: invert dark-on-light images; "
        "auto (default): when the border is mostly bright",
    )


def _add_compare_args(p: argparse.ArgumentParser) -> None:
    """One flag per CompareSpec field (`add_config_flags`), ``--robust``, and the run flags."""
    groups = add_config_flags(p, compare.CompareSpec, skip=("robust",))
    groups["the robust variant"].add_argument(
        "--robust",
        action=argparse.BooleanOptionalAction,
        help=f"also train the demo's size-robust variant ({compare.DEMO.spec.robust_head} head, "
        f"{compare.DEMO.spec.robust}) and its CAM variant ({compare.DEMO.spec.cam_variant}) "
        "(default: no)",
    )
    g = p.add_argument_group("run")
    g.add_argument(
        "--out", default="runs/compare", metavar="DIR", help="report folder (default runs/compare)"
    )
    g.add_argument(
        "--quick",
        action="store_true",
        help="the quick settings of the demo (DEMO.quick), then your flags",
    )
    _add_run_flags(g)


def _add_run_flags(g: Any) -> None:
    g.add_argument(
        "--reuse",
        action="store_true",
        help="keep complete runs of the same config found in the folder "
        "(re-measure without retraining)",
    )
    g.add_argument("--quiet", action="store_true", help="no training progress")


def build_parser() -> argparse.ArgumentParser:
    """The ``gapnet`` argument parser, one subparser per command."""
    parser = _Parser(
        prog=PROG,
        formatter_class=_Formatter,
        description=textwrap.fill(
            "Pooling layers and global-average-pooling (GAP) classifiers: train them, "
            "evaluate them at any input size, see where they look (class activation maps), "
            "and compare GAP heads with fully connected ones in a measured report.",
            width=80,
        ),
        epilog="example:\n  gapnet demo --quick\n\nsee 'gapnet COMMAND --help' for each command",
    )
    parser.add_argument("--version", action="version", version=f"gapnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _command(
        sub, "train", "train a classifier and save its checkpoint",
        """Train one model (a backbone and a head) on one dataset, with a progress bar, then
        print the final train/test accuracy and where the checkpoint is. The run folder holds
        checkpoint.safetensors, config.json and metrics.jsonl. Ctrl-C saves the checkpoint at
        the step reached and exits with status 130; run the same command with --resume to
        continue exactly where it stopped.""",
        ["gapnet train --data mnist-5k --model convnet --head gap --epochs 5 --out runs/gap",
         "gapnet train --head gap --augment canvas --canvas 28,56 --out runs/gap-canvas"],
    )  # fmt: skip
    _add_train_args(p)
    p.set_defaults(handler=cmd_train)

    p = _command(
        sub, "eval", "accuracy and loss of a checkpoint on the test split",
        """Evaluate a checkpoint on the test split of its dataset (or --data): accuracy and
        mean cross-entropy. --size S rescales the test images to S x S; --canvas S places each
        test digit at a random spot on a blank S x S canvas. A fully connected head takes only
        its training size (an error otherwise); global-pooling heads take any size.""",
        ["gapnet eval --checkpoint runs/gap --canvas 84"],
    )  # fmt: skip
    _add_checkpoint(p, onnx=True)
    p.add_argument("--data", metavar="SPEC", help="dataset (default: the checkpoint's)")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--size", type=_positive, metavar="S", help="rescale the test images to S x S"
    )
    size.add_argument(
        "--canvas",
        type=_positive,
        metavar="S",
        help="place the test digits on blank S x S canvases",
    )
    p.add_argument(
        "--n", type=_positive, metavar="N", help="evaluate on a stratified subset of N test images"
    )
    p.add_argument("--seed", type=_nonneg, default=0, help="canvas placement seed (default 0)")
    p.add_argument("--batch-size", type=_positive, default=256, help="(default 256)")
    p.add_argument("--scales", type=_scales, metavar="F,F,..", help=SCALES_HELP)
    p.add_argument("--threads", type=_nonneg, metavar="N", help="torch threads")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_eval)

    p = _command(
        sub, "predict", "classify image files of any size",
        """Classify image files of any size and mode and print the top-k classes with their
        probabilities (a softmax over all classes, so all of them sum to 1). Images are
        converted to the model's channels (L for 1-channel models, RGB for 3) and scaled to
        [0, 1]. 1-channel models expect light strokes on a dark background (as MNIST): an image
        whose border is mostly bright (over half of the pixels in the outer 10% band brighter
        than 0.5) is taken as dark-on-light and inverted, and the output says so (--invert
        yes/no overrides the guess). Global-pooling models take each image at its own size (or
        --resize S); fc models resize every image to the one size they take, and say so.""",
        ["gapnet predict digit.png photo.jpg --checkpoint runs/gap --top-k 3",
         "gapnet predict digit.png --checkpoint runs/gap --json"],
    )  # fmt: skip
    _add_image_args(p, onnx=True)
    p.add_argument(
        "--top-k",
        type=_positive,
        default=3,
        metavar="K",
        help="classes shown per image (default 3)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list, one object per image (top_k and all probs)",
    )
    p.add_argument("--scales", type=_scales, metavar="F,F,..", help=SCALES_HELP)
    p.set_defaults(handler=cmd_predict)

    p = _command(
        sub, "compare", "train several heads on one backbone and write the report",
        """Train one backbone with several heads on one dataset, then measure each model
        (parameters; train and test accuracy and their gap; accuracy with the test images
        rescaled and placed on larger canvases; the train/test gap on smaller training sets;
        CAM localization of the GAP model) and write report.md, report.html (self-contained),
        results.json and the figures (PNG) to --out, with a summary in the terminal. Every run's
        checkpoint stays in its own sub-folder. --quick starts from the demo's quick settings.""",
        ["gapnet compare --heads fc,gap,gap-fc --epochs 4 --train-sizes 250,1000",
         "gapnet compare --quick --robust --out runs/quick"],
    )  # fmt: skip
    _add_compare_args(p)
    p.set_defaults(handler=cmd_compare)

    p = _command(
        sub, "demo", "the whole GAP-vs-FC comparison on mnist-5k with the demo settings",
        """Run `gapnet compare` with the demo settings (gapnet.compare.DEMO): the fc and gap
        heads on mnist-5k, a size-robust GeM variant (the scale-space convnet, digits of 20-40
        px) and a CAM variant, a sweep over smaller training sets and the CAM section, then
        write the report to runs/demo. About six minutes on 2 CPU cores; --quick about one.""",
        ["gapnet demo --quick", "gapnet demo --out runs/demo && open runs/demo/report.html"],
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="the quick settings (DEMO.quick)")
    p.add_argument("--out", metavar="DIR", help="report folder (default runs/demo)")
    p.add_argument(
        "--threads", type=_nonneg, metavar="N", help="torch threads (default: every core)"
    )
    _add_run_flags(p)
    p.set_defaults(handler=cmd_demo)

    p = _command(
        sub, "report", "re-render a comparison's report from its results.json",
        """Re-render report.md, report.html and the figures of a finished comparison from its
        results.json, without training, and print the summary.""",
        ["gapnet report runs/demo"],
    )  # fmt: skip
    p.add_argument("folder", metavar="DIR", help="the comparison's folder (or its results.json)")
    p.set_defaults(handler=cmd_report)

    p = _command(
        sub, "info", "layer table and parameter counts of a model",
        """Build a model and print its layer table (name, type, output shape for one input,
        parameters) and its parameter counts per part: backbone, head and total. Compare
        --head fc with --head gap to see where an FC classifier's parameters are.""",
        ["gapnet info convnet --head gap", "gapnet info convnet --head fc --input-size 28"],
    )  # fmt: skip

    p.add_argument(
        "model", choices=list_models(), metavar="MODEL", help=f"one of {', '.join(list_models())}"
    )
    p.add_argument("--head", choices=HEADS, default="gap", help="(default gap)")
    p.add_argument(
        "--input-size",
        type=_positive,
        metavar="S",
        help="input S x S (default: the model's, 28 for convnet)",
    )
    p.add_argument(
        "--in-chans", type=_positive, metavar="C", help="input channels (default: the model's)"
    )
    p.add_argument("--num-classes", type=_positive, default=10, metavar="K", help="(default 10)")
    p.set_defaults(handler=cmd_info)

    p = _command(
        sub, "cam", "class activation map overlays of images",
        """Compute the class activation map (CAM) of each image for its predicted class (or
        each --class), draw it over the image with the box it gives (the CAM thresholded at
        --threshold), and write one overlay PNG per image and class to --out, at the image's
        size. Prints the predicted class, the boxes (x0, y0, x1, y1; ends exclusive) and the
        files written. Needs a global-pooling head: an FC head has no CAM.""",
        ["gapnet cam digit.png --checkpoint runs/gap --out runs/cam",
         "gapnet cam digit.png --checkpoint runs/gap --class 3 --class 8"],
    )  # fmt: skip
    _add_image_args(p)
    p.add_argument(
        "--class",
        dest="classes",
        type=_nonneg,
        action="append",
        metavar="K",
        help="class to map (repeatable; default: the predicted one)",
    )
    p.add_argument(
        "--out", default="runs/cam", metavar="DIR", help="folder for the PNGs (default runs/cam)"
    )
    p.add_argument(
        "--threshold",
        type=_fraction,
        default=0.2,
        metavar="T",
        help="box threshold on the normalised CAM (default 0.2)",
    )
    _add_region(p, "default largest", default="largest")
    p.add_argument(
        "--alpha",
        type=_fraction,
        default=0.5,
        metavar="A",
        help="opacity of the heat map (default 0.5)",
    )
    p.set_defaults(handler=cmd_cam)

    p = _command(
        sub, "localize", "how well CAM boxes find digits on canvases",
        """Place held-out digits at random on blank canvases of each size, and report per
        size: classification accuracy, box localization accuracy (the CAM box of the
        predicted class has IoU >= 0.5 with the digit's true box) and top-1 localization
        (right class and IoU >= 0.5). The model never saw a box: this is localization for free.""",
        ["gapnet localize --checkpoint runs/gap-canvas --sizes 28,56,112 --choose-threshold"],
    )  # fmt: skip
    _add_checkpoint(p)
    p.add_argument(
        "--data", metavar="SPEC", help="where the digits come from (default: the checkpoint's)"
    )
    p.add_argument(
        "--sizes",
        type=_ints,
        default=(28, 40, 56, 84, 112),
        metavar="S,S,..",
        help="canvas sizes (default 28,40,56,84,112)",
    )
    p.add_argument(
        "--n", type=_positive, metavar="N", help="canvases per size (default: the whole test split)"
    )
    p.add_argument(
        "--distractors", type=_nonneg, default=0, metavar="D", help="clutter per canvas (default 0)"
    )
    thr = p.add_mutually_exclusive_group()
    thr.add_argument("--threshold", type=_fraction, metavar="T", help="box threshold (default 0.2)")
    thr.add_argument(
        "--choose-threshold",
        action="store_true",
        help="choose the threshold (and, without --region, the region rule) on the "
        "validation split",
    )
    _add_region(p, "default: largest, or chosen with --choose-threshold")
    p.add_argument("--seed", type=_nonneg, default=0, help="placement seed (default 0)")
    p.add_argument("--threads", type=_nonneg, metavar="N", help="torch threads")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_localize)
    _add_explain_parser(sub)
    p = _command(
        sub, "export", "write a checkpoint as an ONNX file that takes any input size",
        """Export a checkpoint (or its run folder) to ONNX with a free batch size, height and
        width, in standard ONNX ops (GAP is ReduceMean; every padding explicit pads), so that
        any ONNX runtime can run it at any size; the class names and configs travel in its
        metadata. Then run the file in onnxruntime (CPU) against PyTorch at three square
        sizes and one non-square one and print the largest difference (exit status 1 if it is
        over 1e-4). An fc head takes one input size only and is exported at it. --cams adds a
        second output, the class activation maps.""",
        ["gapnet export runs/gap gap.onnx",
         "gapnet export runs/gap gap.onnx --cams && gapnet predict digit.png -c gap.onnx"],
    )  # fmt: skip
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or run folder")
    p.add_argument("out", metavar="OUT.onnx", help="the ONNX file to write")
    p.add_argument("--cams", action="store_true", help="second output: class maps (N, K, h, w)")
    p.add_argument(
        "--sizes",
        type=_ints,
        metavar="S,S,..",
        help="square sizes of the parity check (default 28,57,112 and 40x71)",
    )
    p.add_argument("--opset", type=_positive, metavar="N", help="ONNX opset (default: torch's)")
    p.add_argument("--threads", type=_nonneg, metavar="N", help="torch threads")
    p.set_defaults(handler=cmd_export)

    p = _command(
        sub, "serve", "web demo: draw or upload a digit, see the answer and where it looked",
        """Serve a web page (a drawing canvas of any size and an image upload) that shows the
        model's top classes with their probabilities and the class activation map with its
        box, and a JSON API: POST /api/predict (multipart field 'file', optional 'top_k'),
        GET /api/health, OpenAPI docs at /docs. Images reach the model at their own size
        (an fc model's at its one size, and the answer says so). Without --checkpoint it
        serves the demo's size-robust model from runs/demo, training it first (a few minutes,
        with a progress bar) if it is not there. Binds to 127.0.0.1 unless --host says
        otherwise; bodies over --max-bytes get 413, bad images a JSON error.""",
        ["gapnet serve", "gapnet serve --checkpoint runs/gap --port 8080"],
    )  # fmt: skip
    p.add_argument(
        "--checkpoint",
        "-c",
        metavar="C",
        help="a checkpoint or its run folder (default: the demo's robust model in runs/demo)",
    )

    p.add_argument(
        "--host", default=serve.HOST, help=f"address to bind (default {serve.HOST}: this machine)"
    )
    p.add_argument("--port", type=_positive, default=serve.PORT, help=f"(default {serve.PORT})")
    p.add_argument(
        "--max-bytes",
        type=_positive,
        default=serve.MAX_BYTES,
        metavar="N",
        help=f"largest request body; larger ones get 413 (default {serve.MAX_BYTES})",
    )
    p.add_argument(
        "--max-pixels",
        type=_positive,
        default=serve.MAX_PIXELS,
        metavar="N",
        help=f"largest image, in pixels, decoded (default {serve.MAX_PIXELS})",
    )
    p.add_argument("--threads", type=_nonneg, metavar="N", help="torch threads")
    p.set_defaults(handler=cmd_serve)
    return parser


def _error(command: str | None, message: str) -> None:
    where = f"{PROG} {command}" if command else PROG
    print(f"{where}: error: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gapnet`` command line; returns the exit status.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if a.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    a.argv = argv
    if a.command == "localize":
        a.threshold_given = a.threshold is not None
        if a.threshold is None:
            a.threshold = 0.2
    handler: Callable[[argparse.Namespace], int] = a.handler
    try:
        return handler(a)
    except KeyboardInterrupt:
        print(f"{PROG} {a.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as e:
        _error(a.command, str(e))
        return EXIT_USAGE
    except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as e:
        _error(a.command, str(e))
        return EXIT_USAGE
    except ValueError as e:  # the library's messages name the argument and the value
        _error(a.command, str(e))
        return EXIT_USAGE
    except ImportError as e:
        _error(a.command, str(e))
        return EXIT_ENV
