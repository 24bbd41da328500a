"""Tests for the gapnet command line: help, train -> eval -> predict, cam, localize, compare.

Runs are tiny (convnet-tiny, 200 mnist-5k images, 1 epoch, one thread): what is checked is the
plumbing (exit codes, messages, files written, outputs that parse), not accuracy. Commands run
in-process through `main(argv)`; one test runs ``python -m gapnet`` as a user would.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from gapnet import compare, data, models, report
from gapnet.cli import main
from gapnet.config import option

COMMANDS = ("train", "eval", "predict", "compare", "demo", "report", "info", "cam", "localize")
TINY_TRAIN = ["--data", "mnist-5k", "--model", "convnet-tiny", "--epochs", "1",
              "--train-size", "200", "--threads", "1", "--quiet"]  # fmt: skip


def run(capsys, *argv):
    """(exit status, stdout, stderr) of `gapnet argv...`."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A trained tiny gap run and fc run: {"gap": folder, "fc": folder}."""
    root = tmp_path_factory.mktemp("runs")
    folders = {}
    for head in ("gap", "fc"):
        folders[head] = root / head
        assert main(["train", *TINY_TRAIN, "--head", head, "--out", str(folders[head])]) == 0
    return folders


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory):
    """A test digit drawn dark-on-light as a 45x37 RGB PNG (a scanned-paper look)."""
    import torch

    x = data.load("mnist-5k").test.images[0]  # (1, 28, 28), light on dark
    x = data.rescale(x[None], (37, 45))[0]  # (1, 37, 45)
    rgb = ((1 - x).clamp(0, 1) * 255).round().to(torch.uint8).expand(3, -1, -1)
    path = tmp_path_factory.mktemp("images") / "digit.png"
    Image.fromarray(rgb.permute(1, 2, 0).numpy(), "RGB").save(path)
    return path


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command_describes_it_with_an_example(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert f"usage: gapnet {command}" in out
    assert f"example:\n  gapnet {command}" in out


def test_python_m_gapnet_runs_the_cli():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "gapnet", "--help"], cwd=root, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "example:" in proc.stdout and all(c in proc.stdout for c in COMMANDS)


def test_no_command_prints_help_and_fails(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "usage: gapnet" in err


# (what is wrong, argv, words the one-line message must hold)
USAGE_ERRORS = [
    ("negative epochs", ["train", "--epochs", "-1"], "--epochs"),
    ("unknown head", ["train", "--head", "mlp"], "--head"),
    ("bad canvas range", ["train", "--canvas", "56,28"], "canvas_size must be (min, max)"),
    ("unknown model", ["info", "resnet"], "MODEL"),
    ("unknown head in a list", ["compare", "--heads", "fc,mlp"], "--heads: must be one of 'fc'"),
    ("bad size list", ["compare", "--sizes", "20,big"], "--sizes"),
    ("missing checkpoint", ["eval", "--checkpoint", "no/such/run"], "no/such/run"),
    ("missing results", ["report", "no/such/run"], "no results.json"),
]


@pytest.mark.parametrize(
    "argv,words", [c[1:] for c in USAGE_ERRORS], ids=[c[0] for c in USAGE_ERRORS]
)
def test_user_mistakes_exit_2_with_one_line(capsys, argv, words):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert words in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------- train / eval


def test_train_prints_metrics_and_the_checkpoint(runs, tmp_path, capsys):
    out_dir = tmp_path / "t"
    code, out, _ = run(capsys, "train", *TINY_TRAIN, "--head", "gap-fc", "--out", out_dir)
    assert code == 0
    assert "test acc" in out and "train acc" in out
    ckpt = out_dir / "checkpoint.safetensors"
    assert f"checkpoint: {ckpt}" in out and ckpt.is_file()
    code, _, err = run(capsys, "train", *TINY_TRAIN, "--head", "gap-fc", "--out", out_dir)
    assert code == 2 and "--resume" in err and "--overwrite" in err


def test_ctrl_c_saves_exits_130_and_resume_finishes(tmp_path, capsys, monkeypatch):
    from gapnet import cli

    real = cli.train  # the name cmd_train calls

    def interrupted(cfg, **kwargs):
        def stop(epoch, step):
            raise KeyboardInterrupt

        return real(cfg, **kwargs, on_step=stop)

    argv = ["train", *TINY_TRAIN, "--batch-size", "50", "--out", tmp_path / "r"]
    monkeypatch.setattr(cli, "train", interrupted)
    code, _, err = run(capsys, *argv)
    assert code == 130 and "interrupted" in err
    assert (tmp_path / "r" / "checkpoint.safetensors").is_file()
    monkeypatch.setattr(cli, "train", real)
    code, out, _ = run(capsys, *argv, "--resume")
    assert code == 0 and "trained 1 epoch in" in out


def test_eval_plain_rescaled_and_on_canvases(runs, capsys):
    code, out, _ = run(capsys, "eval", "-c", runs["gap"], "--n", 50)
    assert code == 0 and "50 images at 28x28: accuracy" in out
    code, out, _ = run(capsys, "eval", "-c", runs["gap"], "--n", 50, "--size", 40, "--json")
    assert code == 0 and json.loads(out)["inputs"] == "rescaled to 40x40"
    code, out, _ = run(capsys, "eval", "-c", runs["gap"], "--n", 30, "--canvas", 56)
    assert code == 0 and "30 images placed on 56x56 canvases" in out


def test_scales_run_the_pyramid_in_eval_and_predict(runs, digit_png, capsys):
    code, out, _ = run(capsys, "eval", "-c", runs["gap"], "--n", 20, "--size", 56, "--json",
                       "--scales", "1,0.5")  # fmt: skip
    assert code == 0 and json.loads(out)["inputs"] == "rescaled to 56x56, multi-scale 1,0.5"
    code, out, _ = run(capsys, "predict", digit_png, "-c", runs["gap"], "--json",
                       "--scales", "2,1")  # fmt: skip
    probs = json.loads(out)[0]["probs"]
    assert code == 0 and sum(probs) == pytest.approx(1, abs=1e-5)
    for bad in ("0.5,x", "1,0", "1,-2", ""):  # not a number, zero, negative, empty
        code, _, err = run(capsys, "eval", "-c", runs["gap"], "--scales", bad)
        assert code == 2 and "expected comma-separated positive factors" in err, bad


def test_eval_of_fc_at_another_size_is_a_usage_error(runs, capsys):
    code, _, err = run(capsys, "eval", "-c", runs["fc"], "--n", 20, "--canvas", 40)
    assert code == 2 and "fixed 28x28 input" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- predict


def test_predict_json_any_size_rgb(runs, digit_png, capsys):
    code, out, _ = run(capsys, "predict", digit_png, digit_png, "-c", runs["gap"], "--json")
    assert code == 0
    rows = json.loads(out)
    assert len(rows) == 2
    r = rows[0]
    assert r["size"] == [45, 37] and r["mode"] == "RGB" and r["input"] == [1, 37, 45]
    assert r["inverted"] is True and r["resized"] is None  # dark on light: inverted
    assert len(r["probs"]) == 10 and sum(r["probs"]) == pytest.approx(1, abs=1e-5)
    assert len(r["top_k"]) == 3
    assert [t["prob"] for t in r["top_k"]] == sorted(r["probs"], reverse=True)[:3]


def test_predict_text_says_what_it_did(runs, digit_png, capsys):
    code, out, _ = run(capsys, "predict", digit_png, "-c", runs["fc"], "--top-k", 2)
    assert code == 0
    assert "45x37 RGB -> 1x28x28 input" in out
    assert "inverted: its border is mostly bright" in out
    assert "resized from 45x37 to 28x28: this fc model takes one input size only" in out
    assert len([line for line in out.splitlines() if line.startswith("  ")]) == 2


@pytest.fixture(scope="module")
def scale_space_run(tmp_path_factory):
    """The demo's size-robust recipe (compare.DEMO) on 1,500 images for 6 epochs (~30 s)."""
    from gapnet.train import train

    out = tmp_path_factory.mktemp("robust")
    cfg = compare.robust_config(compare.DEMO.spec, out).replace(
        epochs=6, train_size=1500, threads=2
    )
    train(cfg, progress=False)
    return cfg.run_dir


def test_predict_a_digit_drawn_ten_times_larger(scale_space_run, tmp_path, capsys):
    # Test digits drawn dark-on-light at 280x280, strokes and all (as a paint program makes
    # them): `gapnet predict` at its default options answers as the model does on the same
    # digits at 28 px (docs/research_any_size.md: a plain GeM model gets about 10 % there).
    import torch

    test = data.stratified_subset(data.load("mnist-5k").test, 40, seed=1)
    paths = []
    for i, x in enumerate(data.rescale(test.images, 280)):  # (1, 280, 280) light on dark
        paths.append(tmp_path / f"drawn{i}.png")
        gray = ((1 - x[0]).clamp(0, 1) * 255).round().to(torch.uint8)
        Image.fromarray(gray.numpy(), "L").save(paths[-1])
    code, out, _ = run(capsys, "predict", *paths, "-c", scale_space_run, "--json")
    assert code == 0
    drawn = torch.tensor([r["top_k"][0]["class"] for r in json.loads(out)])
    assert all(r["inverted"] and r["input"] == [1, 280, 280] for r in json.loads(out))
    small = torch.tensor(
        [json.loads(run(capsys, "predict", p, "-c", scale_space_run, "--json", "--resize", 28)[1])
         [0]["top_k"][0]["class"] for p in paths]
    )  # fmt: skip
    assert (drawn == small).sum() >= 34  # mostly the same answer at 280 px as at 28 px
    assert (drawn == test.labels).sum() >= 34  # a plain GeM model: about 4


def test_predict_missing_or_unreadable_file_exits_2_naming_it(runs, tmp_path, capsys):
    code, out, err = run(capsys, "predict", tmp_path / "nope.png", "-c", runs["gap"])
    assert code == 2 and "nope.png" in err and "not found" in err and out == ""
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    code, _, err = run(capsys, "predict", junk, "-c", runs["gap"])
    assert code == 2 and "cannot read image" in err and "junk.png" in err


# ----------------------------------------------------------------------------- info


def test_info_prints_the_layer_table_and_counts(capsys):
    code, out, _ = run(capsys, "info", "convnet", "--head", "gap")
    assert code == 0
    assert out.splitlines()[0].split() == ["layer", "type", "output", "shape", "params"]
    assert "head.global_pool" in out and "GlobalPool2d" in out and "10x7x7" in out
    counts = models.create("convnet", head="gap").param_counts()
    for part in ("backbone", "head", "total"):
        assert f"{part:<9} {counts[part]:>12,} parameters" in out
    code, out, _ = run(capsys, "info", "convnet", "--head", "fc", "--input-size", "32")
    assert code == 0 and "3x32x32" not in out and "28x28" not in out and "32x32 only" in out


# ----------------------------------------------------------------------------- cam / localize


def test_cam_writes_the_pngs_it_names(runs, digit_png, tmp_path, capsys):
    out_dir = tmp_path / "cam"
    code, out, _ = run(
        capsys, "cam", digit_png, "-c", runs["gap"], "--out", out_dir, "--class", 3, "--class", 8
    )
    assert code == 0 and "digit.png: predicted" in out
    written = [Path(line.split(" -> ")[1]) for line in out.splitlines() if " -> " in line]
    assert [p.name for p in written] == ["digit-class3.png", "digit-class8.png"]
    for p in written:
        with Image.open(p) as im:
            assert im.size == (45, 37) and im.mode == "RGB"
    assert "box (" in out


def test_cam_predicted_class_by_default_and_fc_refused(runs, digit_png, tmp_path, capsys):
    code, _, _ = run(capsys, "cam", digit_png, "-c", runs["gap"], "--out", tmp_path)
    assert code == 0 and len(list(tmp_path.glob("digit-class*.png"))) == 1
    code, _, err = run(capsys, "cam", digit_png, "-c", runs["fc"], "--out", tmp_path)
    assert code == 2 and "no class activation map" in err
    code, _, err = run(capsys, "cam", digit_png, "-c", runs["gap"], "--class", 10)
    assert code == 2 and "--class 10" in err


def test_localize_runs_on_a_few_canvases(runs, capsys):
    argv = ["localize", "-c", runs["gap"], "--sizes", "28,40", "--n", 20, "--threshold", 0.3]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "threshold 0.30, region largest (given)" in out
    assert [line.split()[0] for line in out.splitlines()[3:]] == ["28x28", "40x40"]
    code, out, _ = run(capsys, *argv[:-2], "--choose-threshold", "--json")
    got = json.loads(out)
    assert code == 0 and got["threshold_source"] == "chosen on the validation split"
    assert got["region"] in ("largest", "all")
    assert [r["size"] for r in got["rows"]] == [28, 40]
    assert all(0 <= r["loc_acc"] <= 1 and r["n"] == 20 for r in got["rows"])
    code, out, _ = run(capsys, *argv, "--region", "all", "--json")
    assert code == 0 and json.loads(out)["region"] == "all"
    code, _, err = run(capsys, *argv, "--region", "biggest")
    assert code == 2 and "--region" in err


# ----------------------------------------------------------------------------- compare / demo

TINY_COMPARE = [
    "--model", "convnet-tiny", "--heads", "fc,gap", "--epochs", "1", "--train-size", "200",
    "--train-sizes", "100", "--sweep-steps", "2", "--sizes", "20,28", "--canvases", "28,40",
    "--eval-n", "30", "--loc-n", "20", "--cam-examples", "1", "--threshold", "0.2",
    "--threads", "1", "--quiet",
]  # fmt: skip


def test_compare_writes_the_report_with_every_section(tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    code, out, _ = run(capsys, "compare", *TINY_COMPARE, "--robust", "--out", out_dir)
    assert code == 0
    for name in (
        "report.md",
        "report.html",
        "results.json",
        "accuracy_per_epoch.png",
        "accuracy_vs_size.png",
    ):
        assert (out_dir / name).is_file(), name
    md = (out_dir / "report.md").read_text()
    for section in ("## Heads", "## Any input size", "## Overfitting", "## Localization"):
        assert section in md
    robust = f"{compare.DEMO.spec.robust_head}-robust"  # --robust: the demo's robust variant
    cam_run = f"{compare.DEMO.spec.cam_variant['head']}-cam"  # ... and its CAM variant
    assert "n/a (fixed 28x28 input)" in md and robust in md and cam_run in md
    results = json.loads((out_dir / "results.json").read_text())
    assert results["command"].startswith("gapnet compare --model convnet-tiny")
    assert [r["name"] for r in results["runs"]] == ["fc", "gap", robust, cam_run]
    assert results["cam"]["model"] == cam_run  # the CAM section shows its own variant
    assert "multiscale" not in results["runs"][-1]  # test-time scales: the robust run only
    assert "http" not in (out_dir / "report.html").read_text()
    assert "== Heads: parameters, accuracy, overfitting ==" in out and "report.html" in out

    (out_dir / "report.md").unlink()
    code, out, _ = run(capsys, "report", out_dir)
    assert code == 0 and (out_dir / "report.md").read_text() == md


def test_demo_and_quick_take_their_settings_from_DEMO(tmp_path, capsys, monkeypatch):
    seen = []

    def fake_compare(spec, out, **kwargs):
        seen.append((spec, str(out), kwargs["command"]))
        return {"format": report.RESULTS_FORMAT, "runs": [], "command": kwargs["command"]}

    monkeypatch.setattr(compare, "run_compare", fake_compare)
    assert main(["demo", "--out", str(tmp_path / "d")]) == 0
    assert main(["demo", "--quick", "--out", str(tmp_path / "q")]) == 0
    assert main(["compare", "--quick", "--epochs", "7", "--out", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    (full, _, cmd), (quick, _, _), (cmp, _, _) = seen
    assert full == compare.DEMO.spec and cmd == f"gapnet demo --out {tmp_path / 'd'}"
    assert quick == compare.DEMO.spec.replace(**compare.DEMO.quick)
    assert cmp.epochs == 7 and cmp.heads == compare.DEMO.quick["heads"] and cmp.robust is None
    assert (tmp_path / "q" / "report.md").is_file()


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    code, _, _ = run(capsys, "demo", "--quick", "--out", tmp_path, "--quiet")
    assert code == 0 and (tmp_path / "report.html").is_file()
    assert "## Localization" in (tmp_path / "report.md").read_text()


def _compare_spec(monkeypatch, *argv):
    """The CompareSpec `gapnet compare argv...` would run (nothing trains)."""
    seen = []
    monkeypatch.setattr(compare, "run_compare", lambda spec, out, **kw: seen.append(spec) or {})
    monkeypatch.setattr(report, "write_report", lambda results, out: {})
    monkeypatch.setattr(report, "summary_text", lambda results: "")
    assert main(["compare", *map(str, argv)]) == 0
    return seen[0]


# (the command's flags, the CompareSpec fields they give: documented spellings keep working)
COMPARE_FLAG_CASES = [
    (["--heads", "fc,gap", "--epochs", "4", "--train-sizes", "250,1000"],
     dict(heads=("fc", "gap"), epochs=4, train_sizes=(250, 1000))),
    (["--quick", "--robust", "--out", "runs/quick"],  # the demo's quick settings and robust run
     dict(compare.DEMO.quick, robust=compare.DEMO.spec.robust,
          robust_head=compare.DEMO.spec.robust_head, cam_variant=compare.DEMO.spec.cam_variant)),
    (["--robust", "--robust-head", "gap"],  # a head given wins over the demo's
     dict(robust=compare.DEMO.spec.robust, robust_head="gap",
          cam_variant=compare.DEMO.spec.cam_variant)),
    (["--robust", "--cam-variant", '{"head": "gmp"}'],  # ... and so does a CAM variant
     dict(robust=compare.DEMO.spec.robust, robust_head=compare.DEMO.spec.robust_head,
          cam_variant={"head": "gmp"})),
    (["--no-robust"], dict(robust=None, cam_variant=None)),
    (["--train-sizes", "none", "--eval-n", "none"], dict(train_sizes=(), eval_n=None)),
    (["--no-cam", "--threshold", "0.3", "--region", "all"],
     dict(cam=False, threshold=0.3, region="all")),
    (["--sweep-train", '{"augmentation": "none"}'], dict(sweep_train={"augmentation": "none"})),
]  # fmt: skip


@pytest.mark.parametrize("argv,fields", COMPARE_FLAG_CASES, ids=lambda c: str(c)[:40])
def test_compare_flags_set_the_spec_fields_of_the_same_name(monkeypatch, argv, fields):
    assert _compare_spec(monkeypatch, *argv) == compare.CompareSpec(**fields)


def test_compare_flags_check_values_by_the_spec_rules(capsys):
    code, _, err = run(capsys, "compare", "--heads", "fc,fcc")
    assert code == 2 and "--heads" in err and "'fcc'" in err
    code, _, err = run(capsys, "compare", "--epochs", "0")
    assert code == 2 and "--epochs" in err and "must be an int >= 1" in err


def test_a_new_compare_spec_field_gets_its_flag_with_no_cli_change(monkeypatch, capsys):
    @dataclasses.dataclass
    class Wider(compare.CompareSpec):
        widgets: int = option(3, low=1)  # widgets per report (a field only this test has)

    monkeypatch.setattr(compare, "CompareSpec", Wider)
    spec = _compare_spec(monkeypatch, "--widgets", "5", "--epochs", "2")
    assert isinstance(spec, Wider) and (spec.widgets, spec.epochs) == (5, 2)
    code, out, _ = run(capsys, "compare", "--help")
    help_text = " ".join(out.split())  # argparse wraps the help
    assert (
        code == 0
        and "--widgets N widgets per report (a field only this test has) (default 3)" in help_text
    )
