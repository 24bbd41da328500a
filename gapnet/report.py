"""The report of a head comparison: ``results.json`` -> Markdown and self-contained HTML.

`gapnet.compare.run_compare` measures and returns a ``results`` dict (the shape of
``results.json``); this module only renders it, so a saved results.json re-renders without
training (``gapnet report DIR``). The document is a list of typed blocks (`Heading`,
`Paragraph`, `Code`, `Table`, `Figure`, `Finding`) built once by `report_blocks` and
walked by each renderer: `to_markdown`, `to_html`, `summary_text` (the terminal). Every
sentence of a finding is templated from the measured numbers, and weighs two accuracies by
their 95 % Wilson intervals (`wilson`): overlapping intervals are "within the noise". The
figures are drawn with matplotlib (the ``report`` extra, imported only when drawing) by
`draw_figure`, as deterministic PNGs that report.html embeds.

Example:
    >>> blocks = [Heading(1, "Title"), Table(["head", "acc"], [["gap", "98.8%"]])]
    >>> print(to_markdown(blocks), end="")
    # Title
    <BLANKLINE>
    | head | acc |
    |:---|---:|
    | gap | 98.8% |
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gapnet.checkpoint import atomic_write
from gapnet.train import TrainConfig

RESULTS_FORMAT = "gapnet.results/1"  # the "format" tag of results.json
RESULTS_JSON = "results.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
CAM_DIR = "cam"  # overlay PNGs of the CAM grid, relative to the report folder


# --------------------------------------------------------------------------- the blocks


@dataclass(frozen=True)
class Heading:
    """A section title; level 1 is the report's title."""

    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    """Running text; `code` spans in backticks."""

    text: str


@dataclass(frozen=True)
class Finding:
    """A paragraph templated from the measured numbers (the claims of a section)."""

    text: str


@dataclass(frozen=True)
class Code:
    """A command line, shown verbatim."""

    text: str


@dataclass(frozen=True)
class Table:
    """A table of text cells; a cell starting with "n/a" is a measurement that cannot exist."""

    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Figure:
    """An image file under the report folder (`path` relative to it), with its alt text."""

    path: str
    alt: str


Block = Heading | Paragraph | Finding | Code | Table | Figure


# --------------------------------------------------------------------------- recipes


def recipe(overrides: dict[str, Any]) -> str:
    """A short human description of TrainConfig overrides.

    Example:
        >>> recipe({"augmentation": "canvas", "canvas_size": [28, 40], "label_smoothing": 0.0})
        'random canvases 28-40 px, label smoothing 0'
        >>> recipe({"model": "convnet-scale", "augmentation": "scale", "scale_size": [20, 56],
        ...         "canvas_ratio": 1.5, "distractors": 2, "model_overrides": {}})
        'convnet-scale, digits rescaled to 20-56 px on canvases up to 1.5x, 2 distractors each'
    """
    rest = {k: v for k, v in overrides.items() if v != {}}  # an empty model_overrides says nothing
    for said_elsewhere in ("head", "eval_every"):  # the run's name; how often it was measured
        rest.pop(said_elsewhere, None)
    parts = [rest.pop("model")] if "model" in rest else []
    augmentation = rest.pop("augmentation", None)
    shift = rest.pop("shift", TrainConfig.shift)
    canvas = rest.pop("canvas_size", TrainConfig.canvas_size)
    scale = rest.pop("scale_size", TrainConfig.scale_size)
    ratio = rest.pop("canvas_ratio", TrainConfig.canvas_ratio)
    if augmentation == "canvas":
        parts.append(f"random canvases {canvas[0]}-{canvas[1]} px")
    elif augmentation == "scale":
        on = f" on canvases up to {ratio:g}x" if ratio > 1 else ""
        parts.append(f"digits rescaled to {scale[0]}-{scale[1]} px{on}")
    elif augmentation == "shift":
        parts.append(f"random shifts of up to {shift} px")
    elif augmentation == "none":
        parts.append("no augmentation")
    distractors = rest.pop("distractors", 0)
    if distractors:
        parts.append(f"{distractors} distractors each")
    if "label_smoothing" in rest:
        parts.append(f"label smoothing {rest.pop('label_smoothing'):g}")
    parts += [f"{k}={v}" for k, v in rest.items()]
    return ", ".join(parts)


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


# --------------------------------------------------------------------------- intervals


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion: k successes in n trials (z=1.96: 95 %).

    It stays inside [0, 1] and is honest at 0 and n successes, where the normal approximation
    gives a zero-width interval; that is why the report uses it for accuracies near 100 %.

    Args:
        k: successes (correctly classified images), 0 <= k <= n.
        n: trials (images), >= 1.
        z: the normal quantile of the confidence level.

    Example:
        >>> [round(v, 4) for v in wilson(98, 100)]
        [0.93, 0.9945]
        >>> wilson(0, 100)[0], wilson(100, 100)[1]
        (0.0, 1.0)
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"wilson: n must be an int >= 1, got {n!r}")
    if not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"wilson: k must be an int in [0, n={n}], got {k!r}")
    p = k / n
    scale = 1 + z * z / n
    center = (p + z * z / (2 * n)) / scale
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / scale
    # at k = 0 and k = n the bound is exactly 0 or 1; rounding would leave 0.9999999999999999
    return (0.0 if k == 0 else center - half), (1.0 if k == n else center + half)


def interval(correct: int, n: int) -> dict[str, Any]:
    """The results.json record of an accuracy: counts and their 95 % Wilson interval.

    Example:
        >>> interval(98, 100)["correct"], round(interval(98, 100)["hi"], 4)
        (98, 0.9945)
    """
    lo, hi = wilson(correct, n)
    return {"correct": correct, "n": n, "lo": lo, "hi": hi}


def pooled(intervals: list[dict[str, Any]]) -> dict[str, Any]:
    """One interval over several (seeds' test sets): counts summed, then Wilson."""
    return interval(sum(i["correct"] for i in intervals), sum(i["n"] for i in intervals))


def overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two intervals share a point: then their difference is within the noise."""
    return bool(a["lo"] <= b["hi"] and b["lo"] <= a["hi"])


# --------------------------------------------------------------------------- formatting


def pct(x: float | None) -> str:
    """A fraction as a percentage: "98.8%" ("n/a" for None)."""
    return "n/a" if x is None else f"{100 * x:.1f}%"


def acc_text(acc: float | None, ci: dict[str, Any] | None) -> str:
    """An accuracy with its interval, when it has one: "98.8 % (98.0–99.3)".

    Example:
        >>> acc_text(0.98, interval(98, 100)), acc_text(0.5, None)
        ('98.0 % (93.0–99.4)', '50.0%')
    """
    if acc is None or ci is None:
        return pct(acc)
    return f"{100 * acc:.1f} % ({100 * ci['lo']:.1f}–{100 * ci['hi']:.1f})"


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


def _cell(row: dict[str, Any], key: str = "acc") -> str:
    """A size cell: the accuracy with its interval, or why it cannot exist."""
    if row.get(key) is None and row.get("na"):
        return f"n/a ({row['na']})"
    return acc_text(row.get(key), row.get(f"{key}_ci"))


def _spread(values: list[float], fmt: Any) -> str:
    """Mean and range over seeds: "98.1 (97.9–98.4)"."""
    return f"{fmt(sum(values) / len(values))} ({fmt(min(values))}–{fmt(max(values))})"


def _seed_cells(entry: dict[str, Any]) -> list[str]:
    """The spread columns of a head or sweep entry: test accuracy and train−test gap over its
    seeds, each as mean (min–max)."""
    records = entry.get("seeds") or [entry]
    tests = [100 * r["test_acc"] for r in records]
    gaps = [100 * _gap(r) for r in records]
    return [_spread(tests, lambda v: f"{v:.1f}"), _spread(gaps, lambda v: f"{v:+.1f}")]


def _n_seeds(results: dict[str, Any]) -> int:
    """The most seeds any head or sweep size trained (1 in a one-seed comparison)."""
    entries = [*results.get("runs", []), *(results.get("sweep") or [])]
    return max((len(e.get("seeds") or [e]) for e in entries), default=1)


def _ties(best: dict[str, Any], rivals: list[tuple[str, dict[str, Any]]], key: str) -> str:
    """ "; within the noise of a, b": the rivals (name, measurement) whose interval of `key`
    overlaps the best one's ("" when none does, or the intervals were not measured)."""
    ci = best.get(f"{key}_ci")
    close = [
        name for name, r in rivals
        if r is not best and ci and r.get(f"{key}_ci") and overlap(ci, r[f"{key}_ci"])
    ]  # fmt: skip
    return f"; within the noise of {', '.join(close)}" if close else ""


def _versus(a: dict[str, Any], a_name: str, b: dict[str, Any], b_name: str, key: str) -> str:
    """One sentence weighing two measured accuracies by their intervals (they must have them):
    overlapping intervals are within the noise."""
    a_ci, b_ci = a.get(f"{key}_ci"), b.get(f"{key}_ci")
    if a_ci is None or b_ci is None:
        return ""
    both = f"{a_name} {acc_text(a[key], a_ci)} vs {b_name} {acc_text(b[key], b_ci)}"
    if overlap(a_ci, b_ci):
        return f"{both}: the 95 % intervals overlap, so the difference is within the noise."
    higher = a_name if a[key] > b[key] else b_name
    return f"{both}: {higher} is higher and the 95 % intervals do not overlap."


def _gap(run: dict[str, Any]) -> float:
    return float(run["train_acc"]) - float(run["test_acc"])


def _by_name(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in results.get("runs", [])}


# --------------------------------------------------------------------------- the document


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
            f"lr {spec['lr']:g}" + (f", {recipe(extra)}" if extra else "") + "."
        )
    if results.get("total_seconds") is not None:
        lines.append(f"The whole comparison took {results['total_seconds']:.0f} s.")
    blocks: list[Block] = [Heading(1, results.get("title", "gapnet comparison"))]
    if results.get("command"):
        blocks += [Paragraph("Reproduce with:"), Code(results["command"])]
    blocks.append(Paragraph(" ".join(lines)))
    return blocks


def _heads_blocks(results: dict[str, Any]) -> list[Block]:
    runs = results.get("runs", [])
    if not runs:
        return []
    seeds = _n_seeds(results)
    over = f"over {seeds} seeds" if seeds > 1 else ""
    header = ["head", "params (total)", "params (head)", "train acc", "test acc",
              "train−test gap (points)", "train time"]  # fmt: skip
    if seeds > 1:
        header += [f"test acc {over}: mean (min–max)", f"train−test gap {over}: mean (min–max)"]
    rows = [
        [
            r["name"],
            _int(r["params"]["total"]),
            _int(r["params"].get("head", 0)),
            _cell(r, "train_acc"),
            _cell(r, "test_acc"),
            _pts(_gap(r)),
            f"{r['train_seconds']:.1f} s",
            *(_seed_cells(r) if seeds > 1 else []),
        ]
        for r in runs
    ]
    blocks: list[Block] = [
        Heading(2, "Heads: parameters, accuracy, overfitting"),
        Table(header, rows),
        Finding(_heads_finding(results)),
        Heading(3, "Test accuracy per epoch"),
        Figure(EPOCHS_PNG, "test accuracy per epoch, one line per head"),
    ]
    return blocks


def _fc_and_gap(results: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The two runs the findings weigh against each other: the first plain run whose model takes
    one input size only (a fully connected head, by its own ``input_size``) and plain gap."""
    plain = [r for r in results.get("runs", []) if not r["robust"]]
    fixed = next((r for r in plain if r.get("input_size") is not None), None)
    return fixed, next((r for r in plain if r["name"] == "gap"), None)


def _heads_finding(results: dict[str, Any]) -> str:
    runs = results.get("runs", [])
    plain = [r for r in runs if not r["robust"]]
    parts = []
    fc, gap = _fc_and_gap(results)
    if fc is not None and gap is not None:
        gh, fh = gap["params"].get("head", 0), fc["params"].get("head", 0)
        k = results.get("data", {}).get("num_classes", "K")
        parts.append(
            f"Global average pooling replaces the fully connected classifier: the gap head holds "
            f"{_int(gh)} parameters (a 1x1 convolution to the {k} class maps; the pooling itself "
            f"has none) against {_int(fh)} for {fc['name']}, {_times(fh, gh)} fewer, and the "
            f"whole network is {_times(fc['params']['total'], gap['params']['total'])} smaller "
            f"({_int(gap['params']['total'])} vs {_int(fc['params']['total'])} parameters)."
        )
        more = "smaller" if _gap(gap) < _gap(fc) else "larger" if _gap(gap) > _gap(fc) else "equal"
        parts.append(
            f"Its train−test gap is {_pts(_gap(gap))} points vs {_pts(_gap(fc))} for {fc['name']} "
            f"({more}). Test accuracy: "
            + (_versus(gap, "gap", fc, fc["name"], "test_acc")
               or f"{pct(gap['test_acc'])} vs {pct(fc['test_acc'])}.")
        )  # fmt: skip
    if len(plain) > 1:
        best = max(plain, key=lambda r: r["test_acc"])
        least = min(plain, key=_gap)
        most = max(plain, key=_gap)
        parts.append(
            f"Best test accuracy: {best['name']} ({pct(best['test_acc'])}"
            f"{_ties(best, [(r['name'], r) for r in plain], 'test_acc')}). Smallest "
            f"train−test gap: {least['name']} ({_pts(_gap(least))} points); largest: "
            f"{most['name']} ({_pts(_gap(most))})."
        )
    epochs = {len(r.get("history", [])) for r in runs}
    if epochs:
        counts = "/".join(map(str, sorted(epochs)))
        parts.append(f"Runs trained {counts} epoch{'' if epochs == {1} else 's'}.")
    return " ".join(parts)


def _sizes_blocks(results: dict[str, Any]) -> list[Block]:
    runs = [r for r in results.get("runs", []) if r.get("sizes") or r.get("canvases")]
    if not runs:
        return []
    blocks: list[Block] = [Heading(2, "Any input size")]
    if _n_seeds(results) > 1:  # the sizes are about the head: one model each is measured
        blocks.append(Paragraph("Measured on each head's model of the first seed."))
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
        rows += [
            [_multiscale_name(r), *(_cell(c) for c in r["multiscale"][key])]
            for r in runs
            if r.get("multiscale")
        ]
        blocks += [Heading(3, title), Table(header, rows)]
    blocks += [
        Figure(SIZES_PNG, "test accuracy vs input size, one line per run, 95 % Wilson bands"),
        Finding(_sizes_finding(results)),
    ]
    return blocks


def _multiscale_name(run: dict[str, Any]) -> str:
    """ "gem-robust, multi-scale x0.75,1,1.5": the row of a run's test-time multi-scale
    inference (`gapnet.inference.evaluate` with ``scales``)."""
    scales = ",".join(f"{v:g}" for v in run["multiscale"]["scales"])
    return f"{run['name']}, multi-scale x{scales}"


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
        tie = _ties(best["canvases"][-1], [(r["name"], r["canvases"][-1]) for r in measured], "acc")
        parts.append(
            f"Best on {big}x{big} canvases: {best['name']} ({_cell(best['canvases'][-1])}{tie})."
        )
    plain_pooled = [
        r
        for r in runs
        if not r["robust"]
        and r.get("canvases")
        and all(c["acc"] is not None for c in r["canvases"])
    ]
    pairs = [  # each robust run against the plain run of its head, else the first pooled one
        (r, next((p for p in plain_pooled if p["name"] == r["head"]), plain_pooled[0]))
        for r in runs
        if r["robust"] and plain_pooled
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
        if pc["acc"] is not None and rc["acc"] is not None:
            parts.append(
                f"At {big}x{big}: " + _versus(rc, robust["name"], pc, plain["name"], "acc")
            )
    return " ".join(parts)


def _sweep_blocks(results: dict[str, Any]) -> list[Block]:
    sweep = results.get("sweep") or []
    if not sweep:
        return []
    sizes = sorted({s["train_size"] for s in sweep})
    heads = list(dict.fromkeys(s["head"] for s in sweep))
    cell = {(s["head"], s["train_size"]): s for s in sweep}
    seeds = _n_seeds(results)
    header = ["training images", "head", "train acc", "test acc", "train−test gap (points)"]
    if seeds > 1:
        over = f"over {seeds} seeds"
        header += [f"test acc {over}: mean (min–max)", f"train−test gap {over}: mean (min–max)"]
    rows = [
        [_int(n), h, _cell(s, "train_acc"), _cell(s, "test_acc"), _pts(_gap(s)),
         *(_seed_cells(s) if seeds > 1 else [])]
        for n in sizes
        for h in heads
        if (s := cell.get((h, n))) is not None
    ]  # fmt: skip
    return [
        Heading(2, "Overfitting where it matters: small training sets"),
        Table(header, rows),
        Figure(
            SWEEP_PNG,
            "test accuracy and train−test gap vs training-set size, per head; "
            "bars from the lowest to the highest seed",
        ),
        Finding(_sweep_finding(results, sizes, heads, cell)),
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
            f"These runs train with {recipe(sweep_train)}, so the head is the only regulariser "
            "that differs."
        )
    for n in sizes:
        here = [cell[(h, n)] for h in heads if (h, n) in cell]
        gaps = ", ".join(f"{s['head']} {_pts(_gap(s))}" for s in here)
        best = max(here, key=lambda s: s["test_acc"])
        parts.append(
            f"With {_int(n)} training images ({_n(here[0]['epochs'], 'epoch')}) the "
            f"train−test gaps are {gaps} points; the best test accuracy is {best['head']}'s "
            f"({pct(best['test_acc'])}{_ties(best, [(r['head'], r) for r in here], 'test_acc')})."
        )
    fc, gap = _fc_and_gap(results)
    if fc is not None and gap is not None and {fc["head"], gap["head"]} <= set(heads):
        f, g = fc["head"], gap["head"]
        both = [n for n in sizes if (f, n) in cell and (g, n) in cell]
        less = [n for n in both if _gap(cell[(g, n)]) < _gap(cell[(f, n)])]
        parts.append(
            f"{g} overfits less than {f} at {len(less)} of {len(both)} training-set sizes."
        )
        parts += [
            f"Test accuracy with {_int(n)} images: "
            + _versus(cell[(g, n)], g, cell[(f, n)], f, "test_acc")
            for n in both
            if cell[(g, n)].get("test_acc_ci")
        ]
    return " ".join(parts)


def _cam_blocks(results: dict[str, Any]) -> list[Block]:
    c = results.get("cam")
    if not c:
        return []
    blocks: list[Block] = [Heading(2, "Localization for free: class activation maps")]
    grid = c.get("grid") or []
    if grid:
        caption = (
            f"CAM of {c['model']}'s predicted class on held-out canvases; red: the box the CAM "
            f"gives ({_region_words(c)} above {c['threshold']:.2f} of the maximum), green: the "
            "digit's true box."
        )
        blocks += [Figure(CAM_GRID_PNG, "class activation maps on held-out canvases"),
                   Paragraph(caption)]  # fmt: skip
    rows = c.get("rows") or []
    if rows:
        header = ["canvas", "classification acc", "box loc acc (IoU >= 0.5)",
                  "top-1 loc (class and box)", "mean IoU"]  # fmt: skip
        table = [
            [f"{r['size']}x{r['size']}", _cell(r, "acc"), _cell(r, "loc_acc"),
             _cell(r, "top1_loc"), "n/a" if r["mean_iou"] is None else f"{r['mean_iou']:.2f}"]
            for r in rows
        ]  # fmt: skip
        blocks += [Table(header, table), Finding(_cam_finding(c))]
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


# --------------------------------------------------------------------------- the figures

# The PNGs the report draws (relative to the report folder); each Figure block names one.
EPOCHS_PNG = "accuracy_per_epoch.png"
SIZES_PNG = "accuracy_vs_size.png"
SWEEP_PNG = "sweep.png"
CAM_GRID_PNG = "cam_grid.png"
FIGURE_DPI = 100


def _new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure of width x height inches, drawn with Agg (no window, no pyplot)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "the report draws its figures with matplotlib, which is not installed: "
            "pip install 'gapnet[report]'"
        ) from None
    matplotlib.use("Agg")
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(width, height), dpi=FIGURE_DPI, layout="constrained")


def _draw_epochs(fig: Any, results: dict[str, Any], out: Path) -> None:
    """Test accuracy per epoch, one line per run (the first seed's history)."""
    ax = fig.subplots()
    for r in results.get("runs", []):
        history = [m for m in r.get("history", []) if m["test_acc"] is not None]  # evaluated
        points = [(m["epoch"], 100 * m["test_acc"]) for m in history]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=r["name"])
    ax.set(xlabel="epoch", ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _draw_size_panel(ax: Any, runs: list[dict[str, Any]], key: str, title: str) -> None:
    """One panel of accuracy vs size: a line per run with its 95 % Wilson band (n/a sizes
    left out, so an fc head is one point)."""
    lines = [(r["name"], r.get(key) or []) for r in runs]
    lines += [(_multiscale_name(r), r["multiscale"][key]) for r in runs if r.get("multiscale")]
    for name, cells in lines:
        cells = [c for c in cells if c.get("acc") is not None]
        if not cells:
            continue
        x = [c["size"] for c in cells]
        (line,) = ax.plot(x, [100 * c["acc"] for c in cells], marker="o", markersize=3, label=name)
        bands = [c.get("acc_ci") for c in cells]
        if all(bands):
            lo, hi = [100 * b["lo"] for b in bands], [100 * b["hi"] for b in bands]
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(title=title, xlabel="S (pixels)", ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)


def _draw_sizes(fig: Any, results: dict[str, Any], out: Path) -> None:
    runs = results.get("runs", [])
    left, right = fig.subplots(1, 2, sharey=True)
    _draw_size_panel(left, runs, "sizes", "rescaled to S x S")
    _draw_size_panel(right, runs, "canvases", "on blank S x S canvases")
    right.legend(fontsize="small")


def _draw_sweep(fig: Any, results: dict[str, Any], out: Path) -> None:
    """Test accuracy and train−test gap vs training-set size, per head: the mean over seeds,
    error bars from the lowest to the highest seed."""
    sweep = results.get("sweep") or []
    acc_ax, gap_ax = fig.subplots(1, 2)
    for head in dict.fromkeys(s["head"] for s in sweep):
        entries = sorted((s for s in sweep if s["head"] == head), key=lambda s: s["train_size"])
        x = [s["train_size"] for s in entries]
        for ax, value in ((acc_ax, lambda r: 100 * r["test_acc"]), (gap_ax, _gap_pts)):
            per_seed = [[value(r) for r in s.get("seeds") or [s]] for s in entries]
            mean = [sum(v) / len(v) for v in per_seed]
            below = [m - min(v) for m, v in zip(mean, per_seed, strict=True)]
            above = [max(v) - m for m, v in zip(mean, per_seed, strict=True)]
            ax.errorbar(x, mean, yerr=[below, above], marker="o", capsize=3, label=head)
    sizes = sorted({s["train_size"] for s in sweep})
    for ax, label in ((acc_ax, "test accuracy (%)"), (gap_ax, "train−test gap (points)")):
        ax.set(xscale="log", xlabel="training images", ylabel=label)
        ax.set_xticks(sizes, labels=[f"{n:,}" for n in sizes])  # the sizes measured, no 10^k
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize="small")


def _gap_pts(r: dict[str, Any]) -> float:
    return 100 * _gap(r)


def _draw_cam_grid(fig: Any, results: dict[str, Any], out: Path) -> None:
    """The CAM overlays (PNGs under out/cam/), one row per canvas size."""
    items = (results.get("cam") or {}).get("grid") or []
    sizes = list(dict.fromkeys(it["size"] for it in items))
    per = max(sum(1 for it in items if it["size"] == s) for s in sizes)
    axes = fig.subplots(len(sizes), per, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for row, size in enumerate(sizes):
        for col, it in enumerate(i for i in items if i["size"] == size):
            ax = axes[row][col]
            path = out / it["image"]
            if path.is_file():
                with Image.open(path) as img:
                    ax.imshow(np.asarray(img.convert("RGB")), interpolation="nearest")
            else:
                ax.text(0.5, 0.5, f"{it['image']}\nmissing", ha="center", va="center")
            ax.set_title(f"{size}x{size}: {_grid_label(it)}", fontsize="x-small")


def _figure_size(name: str, results: dict[str, Any]) -> tuple[float, float]:
    if name == CAM_GRID_PNG:
        items = (results.get("cam") or {}).get("grid") or []
        sizes = list(dict.fromkeys(it["size"] for it in items))
        per = max(sum(1 for it in items if it["size"] == s) for s in sizes)
        return 2.6 * per, 2.6 * len(sizes)
    return (10.0, 4.0) if name in (SIZES_PNG, SWEEP_PNG) else (7.0, 3.6)


_DRAW = {EPOCHS_PNG: _draw_epochs, SIZES_PNG: _draw_sizes, SWEEP_PNG: _draw_sweep,
         CAM_GRID_PNG: _draw_cam_grid}  # fmt: skip


def draw_figure(name: str, results: dict[str, Any], out_dir: str | os.PathLike[str]) -> bytes:
    """The PNG bytes of the report figure `name` (one of the ``*_PNG`` names) of `results`.

    Deterministic: the same results give the same bytes (no date or version in the PNG).

    Args:
        name: EPOCHS_PNG, SIZES_PNG, SWEEP_PNG or CAM_GRID_PNG.
        results: the results dict.
        out_dir: the report folder (the CAM grid reads its overlay PNGs from there).
    """
    if name not in _DRAW:
        raise ValueError(f"draw_figure: name must be one of {', '.join(_DRAW)}, got {name!r}")
    fig = _new_figure(*_figure_size(name, results))
    _DRAW[name](fig, results, Path(out_dir))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# --------------------------------------------------------------------------- rendering


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |"]
    lines.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _md_block(b: Block) -> str:
    """One block as Markdown ("" for an empty paragraph)."""
    match b:
        case Heading(level, text):
            return f"{'#' * level} {text}"
        case Paragraph(text) | Finding(text):
            return text
        case Code(text):
            return f"```\n{text}\n```"
        case Table(header, rows):
            return _md_table(header, rows)
        case Figure(path, alt):
            return f"![{alt}]({path})"
    raise TypeError(f"not a report block: {b!r}")


def to_markdown(blocks: list[Block]) -> str:
    """Render report blocks as Markdown (images referenced by relative path)."""
    return "\n\n".join(md for md in map(_md_block, blocks) if md) + "\n"


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
p.finding { border-left: 3px solid #4a7; padding-left: 0.6rem; }
pre { background: #f6f6f6; padding: 0.6rem; overflow-x: auto; }
figure { margin: 0.8rem 0; }
figure img { max-width: 100%; }
"""


def _png_data_uri(path: Path) -> str | None:
    """The PNG at `path` as a data: URI (so the page stands alone), or None if missing."""
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _html_table(t: Table) -> str:
    out = ["<table><thead><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in t.header)]
    out.append("</tr></thead><tbody>")
    for row in t.rows:
        cells = (
            f'<td class="na">{_inline(c)}</td>' if c.startswith("n/a") else f"<td>{_inline(c)}</td>"
            for c in row
        )
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _html_figure(f: Figure, base: Path) -> str:
    path = base / f.path
    if path.suffix == ".svg":
        svg = path.read_text() if path.is_file() else ""
        # inline SVG needs no namespace in HTML5 (and the page then names no URL at all)
        return (
            svg.replace(' xmlns="http://www.w3.org/2000/svg"', "") or f"<p>({f.alt}: missing)</p>"
        )
    uri = _png_data_uri(path)
    if uri is None:
        return f"<p>(image {html.escape(f.path)} missing)</p>"
    return f'<figure><img alt="{html.escape(f.alt)}" src="{uri}"></figure>'


def _html_block(b: Block, base: Path) -> str:
    """One block as HTML ("" for an empty paragraph)."""
    match b:
        case Heading(level, text):
            return f"<h{level}>{_inline(text)}</h{level}>"
        case Paragraph(text):
            return f"<p>{_inline(text)}</p>" if text else ""
        case Finding(text):
            return f'<p class="finding">{_inline(text)}</p>' if text else ""
        case Code(text):
            return f"<pre><code>{html.escape(text)}</code></pre>"
        case Table():
            return _html_table(b)
        case Figure():
            return _html_figure(b, base)
    raise TypeError(f"not a report block: {b!r}")


def to_html(blocks: list[Block], out_dir: str | os.PathLike[str]) -> str:
    """Render report blocks as one self-contained HTML page (images inlined as data: URIs).

    Args:
        blocks: `report_blocks`' output.
        out_dir: the folder the blocks' relative image paths point into.
    """
    base = Path(out_dir)
    title = next((b.text for b in blocks if isinstance(b, Heading)), "gapnet report")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
    ]
    out += [h for h in (_html_block(b, base) for b in blocks) if h]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write results.json, the figures (PNG), report.md and report.html into `out_dir`.

    Renders only from `results` (and the CAM PNGs it names under `out_dir`), so a saved
    results.json re-renders without training (``gapnet report DIR``). report.html embeds the
    figures, so it is one self-contained file.

    Args:
        results: `gapnet.compare.run_compare`'s dict, or `load_results`' of a results.json.
        out_dir: the report folder.

    Returns:
        the paths written, by kind: "results", "markdown", "html", and each figure's file
        name without ".png" ("accuracy_per_epoch", "accuracy_vs_size", "sweep", "cam_grid").
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / RESULTS_JSON, "markdown": out / REPORT_MD, "html": out / REPORT_HTML}
    atomic_write(paths["results"], (json.dumps(results, indent=1) + "\n").encode())
    blocks = report_blocks(results)
    for figure in (b for b in blocks if isinstance(b, Figure)):  # the blocks name the figures
        paths[Path(figure.path).stem] = out / figure.path
        atomic_write(out / figure.path, draw_figure(figure.path, results, out))
    atomic_write(paths["markdown"], to_markdown(blocks).encode())
    atomic_write(paths["html"], to_html(blocks, out).encode())
    return paths


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned.

    Example:
        >>> print(text_table(["head", "acc"], [["gap", "98.8%"]]))
        head    acc
        ----  -----
        gap   98.8%
    """
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = [(str.ljust if i == 0 else str.rjust) for i in range(len(header))]
    lines = [
        "  ".join(f(str(c), w) for f, c, w in zip(fmt, row, widths, strict=True))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _text_block(b: Block) -> str:
    """One block as terminal text ("" for an empty paragraph)."""
    match b:
        case Heading(level, text):
            return text if level == 1 else f"\n== {text} ==" if level == 2 else f"-- {text} --"
        case Paragraph(text) | Finding(text):
            return text.replace("`", "")
        case Code(text):
            return f"  {text}"
        case Table(header, rows):
            return text_table(header, rows)
        case Figure(path):
            return f"(chart: {path})"
    raise TypeError(f"not a report block: {b!r}")


def summary_text(results: dict[str, Any]) -> str:
    """The report's tables and findings as plain text for the terminal (no images)."""
    return "\n".join(t for t in map(_text_block, report_blocks(results)) if t) + "\n"
