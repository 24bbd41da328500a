"""Tests for gapnet.compare: the spec, the demo's settings, and one tiny real comparison.

The tiny comparison checks that `run_compare` fills the dict `gapnet.report.write_report`
renders, and that `reuse` keeps complete runs.
"""

import json

import pytest
import torch
from PIL import Image

from gapnet import compare, data, inference, models, report
from gapnet.compare import DEMO, CompareSpec

# (what is wrong, fields, message: each names the field and the value it got)
SPEC_ERRORS = [
    ("no heads", dict(heads=()), r"CompareSpec.heads must not be empty, got \(\)"),
    ("a head twice", dict(heads=("gap", "gap")), "CompareSpec.heads names a head twice"),
    ("an unknown head", dict(heads=("gap", "fcc")), "CompareSpec.heads must be one of .*'fcc'"),
    ("zero epochs", dict(epochs=0), "CompareSpec.epochs must be an int >= 1, got 0"),
    ("size 0", dict(sizes=(0, 28)), r"CompareSpec.sizes must be ints >= 1, got \(0, 28\)"),
    ("eval_n 0", dict(eval_n=0), "CompareSpec.eval_n must be an int >= 1, got 0"),
    ("lr 0", dict(lr=0), "CompareSpec.lr must be > 0"),
    ("threshold 2", dict(threshold=2.0), r"CompareSpec.threshold must be in \[0, 1\], got 2.0"),
    ("a string for sizes", dict(sizes="28"), "CompareSpec.sizes must be a sequence"),
    ("robust not a dict", dict(robust=3), "CompareSpec.robust must be a dict"),
    (
        "a CAM variant with no head",
        dict(cam_variant={"augmentation": "canvas"}),
        "CompareSpec.cam_variant must name its head, one of fc, .*got {'augmentation'",
    ),
]


@pytest.mark.parametrize(
    "fields,message", [c[1:] for c in SPEC_ERRORS], ids=[c[0] for c in SPEC_ERRORS]
)
def test_compare_spec_rejects_bad_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        CompareSpec(**fields)


def test_compare_spec_round_trip_and_unknown_keys():
    spec = CompareSpec(robust={"augmentation": "canvas", "canvas_size": (28, 84)})
    assert CompareSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.robust == {"augmentation": "canvas", "canvas_size": [28, 84]}  # as JSON gives
    assert CompareSpec.from_dict({"sizes": [20, 28]}).sizes == (20, 28)  # lists back to tuples
    with pytest.raises(ValueError, match="CompareSpec: unknown key 'epoch'"):
        spec.replace(epoch=3)


def test_demo_defaults_live_in_one_constant():
    spec, quick = DEMO.spec, DEMO.spec.replace(**DEMO.quick)  # both valid specs
    assert spec.data == "mnist-5k" and spec.robust is not None and spec.cam
    assert quick.epochs <= spec.epochs and set(quick.heads) <= set(models.HEADS)
    assert {"fc", "gap"} <= set(spec.heads)


TINY = dict(
    model="convnet-tiny",
    heads=("fc", "gap"),
    epochs=1,
    train_size=200,
    threads=1,
    train_sizes=(100,),
    sweep_steps=2,
    sizes=(20, 28),
    canvases=(28, 40),
    eval_n=40,
    cam=True,
    cam_sizes=(40,),
    cam_examples=1,
    loc_n=20,
    threshold=0.2,
    robust={"augmentation": "canvas", "canvas_size": (28, 40)},
    train={"augmentation": "shift", "label_smoothing": 0.1},
    sweep_train={"augmentation": "none", "label_smoothing": 0.0},
)


def test_spec_rejects_a_bad_region_and_sweep_overrides_it_owns():
    with pytest.raises(
        ValueError, match=r"CompareSpec\.region must be one of 'largest', 'all', got 'biggest'"
    ):
        CompareSpec(region="biggest")
    with pytest.raises(ValueError, match="sweep_train cannot set epochs, head"):
        CompareSpec(sweep_train={"head": "gap", "epochs": 3, "lr": 0.1})
    assert CompareSpec(region="all", sweep_train={"lr": 0.1}).region == "all"


def test_run_compare_fills_the_results_and_reuse_skips_training(tmp_path):
    spec = CompareSpec(**TINY)
    notes: list[str] = []
    results = compare.run_compare(spec, tmp_path, command="test", progress=False, log=notes.append)
    assert [r["name"] for r in results["runs"]] == ["fc", "gap", "gap-robust"]
    fc = results["runs"][0]
    assert [c["acc"] is None for c in fc["sizes"]] == [True, False]
    assert fc["canvases"][1]["na"] == "fixed 28x28 input"
    assert [(s["head"], s["train_size"]) for s in results["sweep"]] == [("fc", 100), ("gap", 100)]
    assert results["cam"]["model"] == "gap-robust" and results["cam"]["threshold"] == 0.2
    assert [r["size"] for r in results["cam"]["rows"]] == [28, 40]
    png = tmp_path / results["cam"]["grid"][0]["image"]
    assert Image.open(png).size == (40, 40)
    assert any("gap-robust" in n for n in notes)
    # the main runs train with `train`, the sweep with `sweep_train` on top of it
    main_cfg = json.loads((tmp_path / "gap" / "config.json").read_text())["train"]
    sweep_cfg = json.loads((tmp_path / "sweep" / "gap-100" / "config.json").read_text())["train"]
    assert (main_cfg["augmentation"], main_cfg["label_smoothing"]) == ("shift", 0.1)
    assert (sweep_cfg["augmentation"], sweep_cfg["label_smoothing"]) == ("none", 0.0)
    assert any("overfitting sweep, no augmentation, label smoothing 0" in n for n in notes)
    md = report.to_markdown(report.report_blocks(results))
    assert "random shifts of up to 2 px, label smoothing 0.1." in md  # TrainConfig's shift
    assert "These runs train with no augmentation, label smoothing 0" in md
    json.dumps(results)  # JSON-ready as it is

    ckpt = tmp_path / "gap" / "checkpoint.safetensors"
    before = ckpt.stat().st_mtime_ns
    again = compare.run_compare(spec, tmp_path, progress=False, reuse=True, log=notes.append)
    assert ckpt.stat().st_mtime_ns == before  # kept, not retrained
    assert again["runs"][1]["test_acc"] == results["runs"][1]["test_acc"]
    assert torch.get_num_threads() >= 1


# A comparison on the 8x8 "digits" set small enough to train twice per head in seconds.
TINY_SEEDS = dict(
    data="digits", model="convnet-tiny", heads=("fc", "gap"), epochs=1, seeds=2, threads=1,
    train_sizes=(100,), sweep_steps=2, sizes=(8, 12), canvases=(8, 16), eval_n=40,
    cam=True, cam_sizes=(16,), cam_examples=1, loc_n=20, threshold=0.2,
)  # fmt: skip


def test_run_compare_measures_the_pyramid_of_the_robust_run_only(tmp_path):
    # spec.scales belong to the robust run: without one, no run is measured with the pyramid
    spec = CompareSpec(**{**TINY_SEEDS, "seeds": 1, "train_sizes": (), "cam": False,
                          "scales": (1, 0.5)})  # fmt: skip
    results = compare.run_compare(spec, tmp_path, progress=False, log=lambda text: None)
    assert [("multiscale" in r) for r in results["runs"]] == [False, False]


def test_run_compare_with_seeds_pools_them_and_keeps_each(tmp_path):
    spec = CompareSpec(**TINY_SEEDS)
    results = compare.run_compare(spec, tmp_path, progress=False, log=lambda text: None)
    json.dumps(results)  # JSON-ready as it is
    fc, gap = results["runs"]
    n_test = results["data"]["test"]
    for entry in (fc, gap, *results["sweep"]):
        assert [r["seed"] for r in entry["seeds"]] == [0, 1]  # seed, seed + 1
        ci = entry["test_acc_ci"]  # pooled over both seeds' test sets
        assert ci["n"] == 2 * n_test and ci["correct"] == sum(
            r["test_acc_ci"]["correct"] for r in entry["seeds"]
        )
        assert (ci["lo"], ci["hi"]) == report.wilson(ci["correct"], ci["n"])
        assert ci["lo"] <= entry["test_acc"] <= ci["hi"]
    assert (tmp_path / "gap" / "seed1" / "checkpoint.safetensors").is_file()
    assert (tmp_path / "sweep" / "fc-100" / "seed0" / "config.json").is_file()
    assert (fc["input_size"], fc["has_cam"], gap["input_size"], gap["has_cam"]) == (
        8,
        False,
        None,
        True,
    )
    assert fc["sizes"][1] == {"size": 12, "acc": None, "acc_ci": None, "na": "fixed 8x8 input"}
    assert gap["sizes"][1]["acc_ci"]["n"] == 40
    assert gap["history"][-1]["test_acc_ci"]["n"] == n_test  # per epoch too
    assert results["cam"]["model"] == "gap" and results["cam"]["rows"][0]["loc_acc_ci"]["n"] == 20
    paths = report.write_report(results, tmp_path)
    md = paths["markdown"].read_text()
    assert "test acc over 2 seeds: mean (min–max)" in md
    for figure in ("accuracy_per_epoch", "accuracy_vs_size", "sweep", "cam_grid"):
        assert paths[figure].read_bytes().startswith(b"\x89PNG"), figure
        assert f"]({figure}.png)" in md
    assert paths["html"].read_text().count('src="data:image/png;base64,') == 4


def test_accuracy_table_is_inference_evaluate_in_one_pass_and_with_scales():
    torch.manual_seed(0)
    model = models.create("convnet-tiny", head="gap", num_classes=4)
    x, y = torch.rand(40, 1, 60, 60), torch.arange(40) % 4
    sets = [(60, data.ImageSet(x, y))]
    (one,), (multi,) = compare.accuracy_table(model, sets, scales=(2, 1, 0.5), batch_size=16)
    for row, scales in ((one, None), (multi, (2, 1, 0.5))):  # the pyramid: 120, 60, 30 px
        acc, _ = inference.evaluate(model, x, y, scales=scales)
        assert row["acc"] == acc and row["acc_ci"]["n"] == 40, scales
        assert row["acc_ci"]["correct"] == round(acc * 40)
    assert compare.accuracy_table(model, sets) == ([one], None)  # no scales: one pass only
    fc = models.create("convnet-tiny", head="fc", num_classes=4)
    (na,), (na_multi,) = compare.accuracy_table(fc, sets, scales=(1, 0.5))
    assert na["acc"] is None and na_multi["acc"] is None and "28x28" in na["na"]


def test_spec_scales_must_be_positive():
    assert CompareSpec(scales=[0.75, 1, 1.5]).scales == (0.75, 1.0, 1.5)
    with pytest.raises(ValueError, match=r"CompareSpec\.scales must be > 0"):
        CompareSpec(scales=(0.0, 1.0))
