"""Tests for gapnet.report: rendering from a results dict and the SVG chart.

Rendering is checked on a small fake results dict (no training): the sections, the measured
numbers, the n/a cells, a self-contained HTML page and a well-formed SVG.
"""

import copy
import json
import re

import pytest
from PIL import Image

from gapnet import report
from gapnet.compare import CompareSpec
from gapnet.report import interval, load_results, wilson, write_report

NA = "n/a (fixed 28x28 input)"


EVAL_N = 500  # test images per size and canvas in FAKE


def _ci(acc, n):
    """The interval record of an accuracy measured on n images (as run_compare stores it)."""
    return interval(round(acc * n), n)


def _sizes(accs):
    return [{"size": s, "acc": a, "acc_ci": _ci(a, EVAL_N), "na": None} for s, a in accs]


def _fixed(sizes, acc):
    """The rows of an fc head: `acc` at 28, n/a at every other size."""
    return [
        {"size": s, "acc": acc, "acc_ci": _ci(acc, EVAL_N), "na": None}
        if s == 28
        else {"size": s, "acc": None, "acc_ci": None, "na": "fixed 28x28 input"}
        for s in sizes
    ]


def _run(name, head, params, train_acc, test_acc, seconds, history, sizes, canvases, robust=False):
    return {
        "name": name,
        "head": head,
        "robust": robust,
        "recipe": "random canvases 28-56 px" if robust else "",
        "params": params,
        "train_images": 4000,
        "input_size": 28 if head == "fc" else None,  # an fc head takes one size
        "has_cam": head != "fc",
        "train_acc": train_acc,
        "test_acc": test_acc,
        "train_acc_ci": _ci(train_acc, 4000),
        "test_acc_ci": _ci(test_acc, 1000),
        "train_loss": 0.05,
        "test_loss": 0.1,
        "train_seconds": seconds,
        "history": [{"epoch": i + 1, "train_acc": a, "test_acc": a} for i, a in enumerate(history)],
        "sizes": sizes,
        "canvases": canvases,
        "checkpoint": f"{name}/checkpoint.safetensors",
    }


SIZES = (20, 28, 36, 48, 64)
CANVASES = (28, 40, 56, 84, 112)

# Numbers chosen so every figure in the findings can be checked by hand:
# head params fc 3,216,906 vs gap 1,290 -> 2,494x; totals 3,503,786 vs 288,170 -> 12x;
# train-test gaps fc 0.995 - 0.962 = +3.3 points, gap 0.981 - 0.975 = +0.6 points.
FAKE = {
    "format": report.RESULTS_FORMAT,
    "title": "GAP vs FC heads: convnet on mnist-5k",
    "command": "gapnet demo --quick",
    "date": "2025-01-02T03:04:05+00:00",
    "revision": "abc1234",
    "machine": {
        "cpu": "Test CPU 9000",
        "threads": 2,
        "gpu": None,
        "torch": "2.13.0",
        "python": "3.11.7",
        "platform": "Linux",
    },
    "spec": CompareSpec(eval_n=500).to_dict(),
    "data": {
        "name": "mnist-5k",
        "train": 4000,
        "test": 1000,
        "image_size": [28, 28],
        "num_classes": 10,
    },
    "runs": [
        _run(
            "fc",
            "fc",
            {"backbone": 286880, "head": 3216906, "total": 3503786},
            0.995,
            0.962,
            41.5,
            [0.90, 0.95, 0.962],
            _fixed(SIZES, 0.962),
            _fixed(CANVASES, 0.955),
        ),
        _run(
            "gap",
            "gap",
            {"backbone": 286880, "head": 1290, "total": 288170},
            0.981,
            0.975,
            35.25,
            [0.60, 0.93, 0.975],
            _sizes(zip(SIZES, [0.612, 0.975, 0.944, 0.801, 0.633], strict=True)),
            _sizes(zip(CANVASES, [0.971, 0.912, 0.703, 0.414, 0.287], strict=True)),
        ),
        _run(
            "gap-robust",
            "gap",
            {"backbone": 286880, "head": 1290, "total": 288170},
            0.978,
            0.97,
            52.0,
            [0.55, 0.90, 0.97],
            _sizes(zip(SIZES, [0.701, 0.97, 0.962, 0.951, 0.932], strict=True)),
            _sizes(zip(CANVASES, [0.969, 0.966, 0.958, 0.941, 0.918], strict=True)),
            robust=True,
        ),
    ],
    "sweep": [
        {
            "head": "fc",
            "train_size": 250,
            "epochs": 60,
            "train_acc": 1.0,
            "test_acc": 0.712,
            "train_acc_ci": _ci(1.0, 250),
            "test_acc_ci": _ci(0.712, 1000),
            "train_seconds": 9.0,
        },
        {
            "head": "gap",
            "train_size": 250,
            "epochs": 60,
            "train_acc": 0.95,
            "test_acc": 0.744,
            "train_acc_ci": _ci(0.95, 250),
            "test_acc_ci": _ci(0.744, 1000),
            "train_seconds": 8.0,
        },
        {
            "head": "fc",
            "train_size": 1000,
            "epochs": 15,
            "train_acc": 1.0,
            "test_acc": 0.901,
            "train_acc_ci": _ci(1.0, 1000),
            "test_acc_ci": _ci(0.901, 1000),
            "train_seconds": 9.0,
        },
        {
            "head": "gap",
            "train_size": 1000,
            "epochs": 15,
            "train_acc": 0.97,
            "test_acc": 0.925,
            "train_acc_ci": _ci(0.97, 1000),
            "test_acc_ci": _ci(0.925, 1000),
            "train_seconds": 8.0,
        },
    ],
    "cam": {
        "model": "gap-robust",
        "threshold": 0.3,
        "threshold_source": "chosen on the validation split",
        "n": 300,
        "distractors": 0,
        "rows": [
            {"size": s, "n": 300, "acc": a, "loc_acc": loc, "top1_loc": t, "mean_iou": iou}
            for s, a, loc, t, iou in [
                (28, 0.97, 0.91, 0.89, 0.71),
                (56, 0.958, 0.823, 0.801, 0.62),
                (112, 0.918, 0.645, 0.612, 0.51),
            ]
        ],
        "grid": [
            {
                "size": 56,
                "image": "cam/canvas56-0.png",
                "label": 3,
                "pred": 3,
                "prob": 0.97,
                "pred_box": [10, 12, 30, 34],
                "true_box": [11, 12, 29, 33],
                "iou": 0.81,
            },
            {
                "size": 84,
                "image": "cam/canvas84-0.png",
                "label": 7,
                "pred": 1,
                "prob": 0.55,
                "pred_box": [40, 40, 60, 70],
                "true_box": [41, 40, 58, 66],
                "iou": 0.77,
            },
        ],
    },
    "total_seconds": 187.4,
}


@pytest.fixture
def rendered(tmp_path):
    """FAKE written to a folder holding one of its two CAM PNGs; (paths, md, html)."""
    (tmp_path / "cam").mkdir()
    Image.new("RGB", (56, 56), "navy").save(tmp_path / "cam" / "canvas56-0.png")
    paths = write_report(copy.deepcopy(FAKE), tmp_path)
    return paths, paths["markdown"].read_text(), paths["html"].read_text()


def test_write_report_writes_every_file(rendered, tmp_path):
    paths, _, _ = rendered
    assert {p.name for p in paths.values()} == {
        "results.json",
        "report.md",
        "report.html",
        "accuracy_per_epoch.png",
        "accuracy_vs_size.png",
        "sweep.png",
        "cam_grid.png",
    }
    assert all(p.parent == tmp_path and p.stat().st_size > 0 for p in paths.values())
    assert json.loads(paths["results"].read_text()) == FAKE
    assert not list(tmp_path.glob("*.svg"))


# (figure, its size in pixels at 100 dpi: inches x 100)
FIGURE_CASES = [
    ("accuracy_per_epoch", (700, 360)),
    ("accuracy_vs_size", (1000, 400)),
    ("sweep", (1000, 400)),
    ("cam_grid", (260, 520)),  # one example per canvas size, two sizes
]


@pytest.mark.parametrize("name,size", FIGURE_CASES, ids=[c[0] for c in FIGURE_CASES])
def test_figures_are_deterministic_pngs_without_a_software_tag(rendered, tmp_path, name, size):
    paths, _, _ = rendered
    png = paths[name].read_bytes()
    with Image.open(paths[name]) as img:
        assert img.format == "PNG" and img.size == size
        assert "Software" not in img.info  # nothing that changes between versions or runs
    assert report.draw_figure(f"{name}.png", FAKE, tmp_path) == png  # same results, same bytes


def test_markdown_has_the_sections_and_the_header(rendered):
    _, md, _ = rendered
    for heading in (
        "# GAP vs FC heads: convnet on mnist-5k",
        "## Heads: parameters, accuracy, overfitting",
        "## Any input size",
        "## Overfitting where it matters: small training sets",
        "## Localization for free: class activation maps",
    ):
        assert f"\n{heading}\n" in f"\n{md}", heading
    top = md.split("## Heads")[0]  # command, machine and date come first
    assert "gapnet demo --quick" in top and "Test CPU 9000, 2 threads" in top
    assert "torch 2.13.0" in top and "2025-01-02" in top
    assert "![test accuracy per epoch, one line per head](accuracy_per_epoch.png)" in md
    assert "95 % Wilson bands](accuracy_vs_size.png)" in md and "(sweep.png)" in md


def test_markdown_states_the_measured_numbers(rendered):
    _, md, _ = rendered
    # the heads table: params, accuracies, gaps, times
    # (accuracies with their 95 % Wilson intervals over 4,000 training and 1,000 test images)
    assert (
        "| fc | 3,503,786 | 3,216,906 | 99.5 % (99.2–99.7) | 96.2 % (94.8–97.2) | +3.3 | 41.5 s |"
        in md
    )
    assert (
        "| gap | 288,170 | 1,290 | 98.1 % (97.6–98.5) | 97.5 % (96.3–98.3) | +0.6 | 35.2 s |" in md
    )
    assert "spread" not in md and "seeds" not in md  # one seed: no spread columns
    # findings templated from those numbers
    assert "1,290 parameters" in md and "3,216,906 for fc, 2,494x fewer" in md
    assert "12x smaller" in md
    assert "+0.6 points vs +3.3 for fc (smaller)" in md
    # sizes: every n/a cell of fc, the numbers of gap and the robust variant side by side
    assert md.count(NA) == 4 + 4
    assert "| gap | 61.2 % (56.9–65.4) | 97.5 % (95.9–98.6) | 94.4 % (92.0–96.1) |" in md
    assert "| gap-robust | 96.9 % (94.9–98.0) | 96.6 % (94.6–97.9) | 95.8 % (93.7–97.2) |" in md
    assert "plain gap scores 28.7 % (25.0–32.9) and gap-robust (random canvases 28-56 px)" in md
    assert "Best on 112x112 canvases: gap-robust (91.8 % (89.1–93.9))." in md
    # sweep
    assert "| 250 | fc | 100.0 % (98.5–100.0) | 71.2 % (68.3–73.9) | +28.8 |" in md
    assert "gap overfits less than fc at 2 of 2 training-set sizes" in md
    # CAM (these rows carry no intervals, as in an older results.json: plain percentages)
    assert "| 112x112 | 91.8% | 64.5% | 61.2% | 0.51 |" in md
    assert (
        "Boxing the largest connected region (the CAM paper's rule) of the CAM of its predicted "
        "class above 0.30 of its maximum (chosen on the validation split)" in md
    )
    assert "![class activation maps on held-out canvases](cam_grid.png)" in md


def test_findings_follow_the_numbers():
    worse = copy.deepcopy(FAKE)
    worse["runs"][1]["train_acc"] = 1.0  # gap now overfits more than fc
    worse["sweep"][1]["train_acc"] = 1.0
    worse["sweep"][1]["test_acc"] = 0.5
    md = report.to_markdown(report.report_blocks(worse))
    assert "+2.5 points vs +3.3 for fc (smaller)" in md
    worse["runs"][1]["train_acc"] = 1.01
    md = report.to_markdown(report.report_blocks(worse))
    assert "+3.5 points vs +3.3 for fc (larger)" in md
    assert "gap overfits less than fc at 1 of 2 training-set sizes" in md


def test_html_is_self_contained(rendered):
    _, _, page = rendered
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "http" not in page  # no link, script, stylesheet or namespace URL
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert len(srcs) == 4 and "<svg" not in page  # the four figures, embedded
    assert page.count('<td class="na">n/a (fixed 28x28 input)</td>') == 8
    assert "<h2>Localization for free: class activation maps</h2>" in page


def test_summary_text_has_the_tables():
    text = report.summary_text(FAKE)
    assert "== Heads: parameters, accuracy, overfitting ==" in text
    assert "gap-robust" in text and NA in text and "(chart: accuracy_per_epoch.png)" in text
    assert "<" not in text and "`" not in text


def test_render_without_optional_sections(tmp_path):
    bare = {k: v for k, v in FAKE.items() if k not in ("sweep", "cam")}
    bare["runs"] = [dict(r, sizes=[], canvases=[]) for r in FAKE["runs"][:1]]
    md = write_report(bare, tmp_path)["markdown"].read_text()
    assert "## Heads" in md and "## Any input size" not in md and "## Overfitting" not in md
    assert "## Localization" not in md


def test_load_results_round_trip_and_errors(tmp_path):
    write_report(FAKE, tmp_path)
    assert load_results(tmp_path) == FAKE
    assert load_results(tmp_path / "results.json") == FAKE
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a gapnet results file"):
        load_results(tmp_path / "other.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"bad\.json.*not valid JSON"):
        load_results(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match=r"no results\.json"):
        load_results(tmp_path / "nothing")


def test_recipe_names_trainconfig_defaults():
    assert report.recipe({"augmentation": "shift"}) == "random shifts of up to 2 px"
    assert report.recipe({"augmentation": "canvas"}) == "random canvases 28-56 px"
    assert report.recipe({"augmentation": "none", "label_smoothing": 0.0, "lr": 0.1}) == (
        "no augmentation, label smoothing 0, lr=0.1"
    )


# (what it exercises, k, n, expected (lo, hi) to 4 places: computed by hand from the formula)
WILSON_CASES = [
    ("none right: lo is exactly 0", 0, 100, (0.0, 0.0370)),
    ("all right: hi is exactly 1", 100, 100, (0.9630, 1.0)),
    ("98 of 100", 98, 100, (0.9300, 0.9945)),
    ("half of 10: symmetric", 5, 10, (0.2366, 0.7634)),
    ("one image, right", 1, 1, (0.2065, 1.0)),
    ("988 of 1000", 988, 1000, (0.9791, 0.9931)),
]


@pytest.mark.parametrize(
    "k,n,expected", [c[1:] for c in WILSON_CASES], ids=[c[0] for c in WILSON_CASES]
)
def test_wilson_matches_known_values(k, n, expected):
    lo, hi = wilson(k, n)
    assert (round(lo, 4), round(hi, 4)) == expected
    assert 0.0 <= lo <= k / n <= hi <= 1.0


# (what is wrong, k, n)
WILSON_ERRORS = [("n 0", 0, 0), ("k above n", 5, 4), ("negative k", -1, 4), ("float k", 0.5, 4)]


@pytest.mark.parametrize("k,n", [c[1:] for c in WILSON_ERRORS], ids=[c[0] for c in WILSON_ERRORS])
def test_wilson_rejects_bad_counts(k, n):
    with pytest.raises(ValueError, match=r"wilson: [kn] must be"):
        wilson(k, n)


def _with_test(run, correct, n):
    return dict(run, test_acc=correct / n, test_acc_ci=interval(correct, n))


# (what it exercises, gap's correct of 1000, fc's correct of 1000, the wording expected)
NOISE_CASES = [
    ("close: intervals overlap", 975, 962, "overlap, so the difference is within the noise"),
    ("far apart: gap higher", 990, 900, "gap is higher and the 95 % intervals do not overlap"),
    ("far apart: fc higher", 900, 990, "fc is higher and the 95 % intervals do not overlap"),
]  # fmt: skip


@pytest.mark.parametrize(
    "gap_ok,fc_ok,words", [c[1:] for c in NOISE_CASES], ids=[c[0] for c in NOISE_CASES]
)
def test_findings_weigh_differences_by_their_intervals(gap_ok, fc_ok, words):
    results = copy.deepcopy(FAKE)
    fc, gap, robust = results["runs"]
    results["runs"] = [_with_test(fc, fc_ok, 1000), _with_test(gap, gap_ok, 1000), robust]
    md = report.to_markdown(report.report_blocks(results))
    heads = md.split("## Heads")[1].split("## Any input size")[0]
    assert words in heads
    assert ("within the noise" in heads) == (abs(gap_ok - fc_ok) < 30)


def _seeded(entry, tests, trains, n_test=1000, n_train=4000):
    """`entry` trained once per seed with these (train, test) correct counts, pooled as
    run_compare pools them."""
    records = [
        {"seed": i, "train_acc": tr / n_train, "test_acc": te / n_test, "train_seconds": 1.0,
         "train_acc_ci": interval(tr, n_train), "test_acc_ci": interval(te, n_test)}
        for i, (te, tr) in enumerate(zip(tests, trains, strict=True))
    ]  # fmt: skip
    test_ci = report.pooled([r["test_acc_ci"] for r in records])
    train_ci = report.pooled([r["train_acc_ci"] for r in records])
    return dict(entry, seeds=records, test_acc=test_ci["correct"] / test_ci["n"],
                test_acc_ci=test_ci, train_acc=train_ci["correct"] / train_ci["n"],
                train_acc_ci=train_ci)  # fmt: skip


def test_seeds_give_mean_and_range_columns_and_a_pooled_interval():
    results = copy.deepcopy(FAKE)
    fc, gap, robust = results["runs"]
    # gap over 3 seeds: test 970, 975, 980 of 1000 (mean 97.5, range 97.0-98.0), train
    # 3920, 3924, 3928 of 4000 (98.0, 98.1, 98.2): gaps +1.0, +0.6, +0.2
    results["runs"] = [fc, _seeded(gap, [970, 975, 980], [3920, 3924, 3928]), robust]
    md = report.to_markdown(report.report_blocks(results))
    assert "test acc over 3 seeds: mean (min–max)" in md
    pooled_ci = interval(2925, 3000)  # 3 x 1000 test images pooled
    row = next(line for line in md.splitlines() if line.startswith("| gap |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == report.acc_text(0.975, pooled_ci)
    assert cells[-2:] == ["97.5 (97.0–98.0)", "+0.6 (+0.2–+1.0)"]
    fc_row = next(line for line in md.splitlines() if line.startswith("| fc |"))
    assert fc_row.rstrip().endswith("| 96.2 (96.2–96.2) | +3.3 (+3.3–+3.3) |")  # one seed
    assert "Measured on each head's model of the first seed." in md
    assert "first seed" not in report.to_markdown(report.report_blocks(FAKE))


def test_sweep_seeds_give_mean_and_range_per_size():
    results = copy.deepcopy(FAKE)
    results["sweep"] = [
        _seeded(s, [700, 720], [250, 248], n_train=250) if s["train_size"] == 250 else s
        for s in results["sweep"]
    ]
    md = report.to_markdown(report.report_blocks(results))
    sweep = md.split("## Overfitting")[1].split("## Localization")[0]
    assert "train−test gap over 2 seeds: mean (min–max)" in sweep
    assert "| 250 | fc | " in sweep and "71.0 (70.0–72.0) | +28.6 (+27.2–+30.0) |" in sweep


def test_size_tables_show_the_robust_runs_multiscale_row():
    results = copy.deepcopy(FAKE)
    robust = results["runs"][2]
    robust["multiscale"] = {
        "scales": [0.75, 1.0, 1.5],
        "sizes": _sizes(zip(SIZES, [0.80, 0.98, 0.97, 0.96, 0.95], strict=True)),
        "canvases": _sizes(zip(CANVASES, [0.97, 0.97, 0.96, 0.95, 0.94], strict=True)),
    }
    md = report.to_markdown(report.report_blocks(results))
    assert md.count("| gap-robust, multi-scale x0.75,1,1.5 | ") == 2  # rescaled and canvases
    assert "| gap-robust, multi-scale x0.75,1,1.5 | 80.0 % (76.3–83.3) |" in md
    assert "multi-scale" not in report.to_markdown(report.report_blocks(FAKE))


def test_a_missing_figure_says_so_in_the_page(tmp_path):
    page = report.to_html([report.Figure("nothing.png", "a chart")], tmp_path)
    assert "(image nothing.png missing)" in page


def test_draw_figure_rejects_an_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="draw_figure: name must be one of"):
        report.draw_figure("pie.png", FAKE, tmp_path)
