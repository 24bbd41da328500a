"""Tests for gapnet.train: learning, exact resume, checkpoints, metrics log, config, evaluation.

Runs are tiny (scikit-learn's 8x8 digits, a few hundred images, a 2-stage convnet), so the file
takes seconds; what is checked is exactness: a resumed run must equal an uninterrupted one
bit for bit (torch.equal on every tensor of the final checkpoint).
"""

import dataclasses
import doctest
import itertools
import json
import os
import signal
import threading

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from gapnet import checkpoint, data, models
from gapnet import train as T
from gapnet.inference import is_channels_last
from gapnet.train import TrainConfig, evaluate, load_checkpoint, lr_at, predict_proba, train

# A few hundred 8x8 digits and a 2-stage convnet: a step takes milliseconds.
TINY = dict(
    data="digits",
    model="convnet-tiny",
    model_overrides={"widths": [8, 16], "depth": 1},
    train_size=320,
    batch_size=64,
    epochs=2,
    lr=1e-2,
    eval_batch_size=256,
    threads=1,  # tiny convs only lose from threads (and a busy machine makes OpenMP crawl)
    device="cpu",  # bitwise exactness is promised on the CPU (cuDNN may pick other kernels)
)
STEPS = 5  # 320 images / 64 per batch

# (what it exercises, config changes) for the exact-resume tests
RESUME_CASES = [
    # dropout (global RNG), shift augmentation (per-step generator), AdamW, onecycle
    ("fc-dropout+shift+adamw", dict(head="fc-dropout", augmentation="shift", shift=1)),
    # random canvas size per batch, SGD with Nesterov momentum, cosine, clipping, smoothing
    (
        "gap+canvas+sgd",
        dict(
            head="gap", augmentation="canvas", canvas_size=(8, 12), optimizer="sgd",
            lr=0.05, schedule="cosine", warmup=0.1, grad_clip=1.0, label_smoothing=0.1,
        ),
    ),
    # the digit itself rescaled per batch, ceil-mode pools, BatchNorm averaged then frozen
    (
        "gem+scale+frozen-bn",
        dict(
            head="gem", augmentation="scale", scale_size=(6, 16), canvas_ratio=1.5,
            frozen_bn_epochs=1, model_overrides={"widths": [8, 16], "depth": 1, "ceil_mode": True},
        ),
    ),
]  # fmt: skip


def tiny(tmp_path, name="run", **changes) -> TrainConfig:
    return TrainConfig(**{**TINY, "out_dir": str(tmp_path / name), **changes})


def checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    tensors, _ = checkpoint.read(path)
    return tensors


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def without_seconds(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in metrics]


class Stop:
    """on_step hook raising KeyboardInterrupt (as Ctrl-C does) after `at` steps in all."""

    def __init__(self, at: int) -> None:
        self.at, self.count = at, 0

    def __call__(self, epoch: int, step: int) -> None:
        self.count += 1
        if self.count == self.at:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs of each RESUME_CASES config: (config changes, result, tensors)."""
    runs = {}
    for name, changes in RESUME_CASES:
        cfg = tiny(tmp_path_factory.mktemp("ref"), **changes)
        result = train(cfg, progress=False)
        runs[name] = (changes, result, checkpoint_tensors(result.checkpoint))
    return runs


# --------------------------------------------------------------------------- learning


def test_tiny_run_learns(tmp_path):
    result = train(tiny(tmp_path, train_size=None, epochs=3, batch_size=32), progress=False)
    losses = [row["train_loss"] for row in result.metrics]
    assert losses[-1] < 0.6 * losses[0]
    assert result.test_acc > 0.6  # 10 classes: chance is 0.1
    assert result.train_acc > 0.6 and result.train_seconds > 0
    assert result.param_counts["total"] == sum(p.numel() for p in result.model.parameters())
    assert not result.model.training
    assert result.metrics[-1]["test_acc"] == result.test_acc


def test_channels_last_and_bf16_autocast_also_run_on_cpu(tmp_path):
    cfg = tiny(tmp_path, batch_size=32, channels_last="on", amp="bf16")
    result = train(cfg, progress=False)
    weight = result.model.backbone.stage1.block0.conv.weight  # (16, 8, 3, 3)
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert is_channels_last(result.model) and weight.dtype == torch.float32
    assert result.metrics[1]["train_loss"] < result.metrics[0]["train_loss"]
    model, _, _ = load_checkpoint(result.checkpoint)
    assert torch.equal(model.backbone.stage1.block0.conv.weight, weight)


def test_runs_are_reproducible(tmp_path, reference):
    changes, ref, ref_tensors = reference["fc-dropout+shift+adamw"]
    again = train(tiny(tmp_path, **changes), progress=False)
    assert_same_tensors(checkpoint_tensors(again.checkpoint), ref_tensors)
    assert without_seconds(again.metrics) == without_seconds(ref.metrics)
    other = train(tiny(tmp_path, "seed1", seed=1, **changes), progress=False)
    assert not torch.equal(
        other.model.backbone.stage0.block0.conv.weight, ref.model.backbone.stage0.block0.conv.weight
    )


# --------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("case", [name for name, _ in RESUME_CASES])
@pytest.mark.parametrize(
    "stop_after",
    [
        1,  # after the very first step
        STEPS,  # after the last step of epoch 1, before its evaluation
        STEPS + 3,  # in the middle of epoch 2
    ],
)
def test_interrupted_run_resumes_exactly(tmp_path, reference, case, stop_after, capsys):
    changes, ref, ref_tensors = reference[case]
    cfg = tiny(tmp_path, **changes)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, on_step=Stop(stop_after))
    assert "resume" in capsys.readouterr().err
    _, _, state = load_checkpoint(cfg.run_dir)
    assert state["global_step"] == stop_after and not state["complete"]
    assert state["epoch"] * STEPS + state["step"] == stop_after
    resumed = train(cfg, progress=False, resume=True)
    assert_same_tensors(checkpoint_tensors(resumed.checkpoint), ref_tensors)
    for name, t in ref.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], t), name
    assert without_seconds(resumed.metrics) == without_seconds(ref.metrics)
    assert (resumed.test_acc, resumed.test_loss) == (ref.test_acc, ref.test_loss)
    assert (resumed.train_acc, resumed.train_loss) == (ref.train_acc, ref.train_loss)


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGINT"),
    reason="needs signals in the main thread",
)
def test_ctrl_c_stops_at_a_step_boundary_and_resumes_exactly(tmp_path, reference):
    changes, _, ref_tensors = reference["fc-dropout+shift+adamw"]
    cfg = tiny(tmp_path, **changes)
    handler = signal.getsignal(signal.SIGINT)

    def ctrl_c(epoch: int, step: int) -> None:
        if (epoch, step) == (1, 2):
            os.kill(os.getpid(), signal.SIGINT)  # the handler only asks to stop

    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, on_step=ctrl_c)
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    _, _, state = load_checkpoint(cfg.run_dir)
    assert (state["epoch"], state["step"]) == (1, 2)  # the step in flight was finished
    resumed = train(cfg, progress=False, resume=True)
    assert_same_tensors(checkpoint_tensors(resumed.checkpoint), ref_tensors)


@pytest.mark.parametrize("where", ["augmentation", "evaluation"])
def test_hard_interrupt_inside_a_step_or_an_evaluation_resumes_exactly(
    tmp_path, reference, monkeypatch, capsys, where
):
    """A second Ctrl-C lands anywhere: mid-step keeps the last checkpoint, mid-eval saves."""
    changes, _, ref_tensors = reference["fc-dropout+shift+adamw"]
    cfg = tiny(tmp_path, **changes)
    name = "_augment" if where == "augmentation" else "_evaluate"
    original, calls = getattr(T, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == (STEPS + 3 if where == "augmentation" else 1):
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(T, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    monkeypatch.setattr(T, name, original)
    _, _, state = load_checkpoint(cfg.run_dir)
    if where == "augmentation":  # in step 3 of epoch 2: the end-of-epoch-1 checkpoint stays
        assert (state["epoch"], state["step"]) == (1, 0)
        assert "the last checkpoint" in capsys.readouterr().err
    else:  # evaluating epoch 1: its steps are all done and saved
        assert (state["epoch"], state["step"]) == (0, STEPS)
    resumed = train(cfg, progress=False, resume=True)
    assert_same_tensors(checkpoint_tensors(resumed.checkpoint), ref_tensors)


def test_resume_with_more_epochs_continues(tmp_path):
    cfg = tiny(tmp_path, schedule="constant", warmup=0.0, epochs=1)
    train(cfg, progress=False)
    longer = train(dataclasses.replace(cfg, epochs=2), progress=False, resume=True)
    assert [row["epoch"] for row in longer.metrics] == [1, 2]
    # a constant schedule does not depend on the length, so this is the 2-epoch run
    direct = train(tiny(tmp_path, "direct", schedule="constant", warmup=0.0), progress=False)
    assert_same_tensors(
        checkpoint_tensors(longer.checkpoint), checkpoint_tensors(direct.checkpoint)
    )
    # a complete run resumes to its result without training
    again = train(dataclasses.replace(cfg, epochs=2), progress=False, resume=True)
    assert again.metrics == longer.metrics and again.test_acc == longer.test_acc
    with pytest.raises(ValueError, match="already trained 2 epochs"):
        train(cfg, progress=False, resume=True)


def test_resume_refuses_a_different_config(tmp_path):
    cfg = tiny(tmp_path, epochs=1)
    train(cfg, progress=False)
    with pytest.raises(ValueError, match=r"different config.*lr: 0\.01 -> 0\.02.*seed: 0 -> 1"):
        train(dataclasses.replace(cfg, lr=0.02, seed=1), progress=False, resume=True)
    with pytest.raises(ValueError, match="head: 'gap' -> 'fc'"):
        train(dataclasses.replace(cfg, head="fc"), progress=False, resume=True)


def test_resume_needs_a_checkpoint_and_a_new_run_needs_an_empty_folder(tmp_path):
    cfg = tiny(tmp_path, epochs=1)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint .*checkpoint\.safetensors"):
        train(cfg, progress=False, resume=True)
    train(cfg, progress=False)
    with pytest.raises(FileExistsError, match=r"already holds a run.*resume"):
        train(cfg, progress=False)
    assert train(cfg, progress=False, overwrite=True).metrics[0]["epoch"] == 1


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path):
    cfg = tiny(tmp_path, head="gem", epochs=1, optimizer="sgd")
    result = train(cfg, progress=False)
    model, loaded_cfg, state = load_checkpoint(result.checkpoint)
    assert loaded_cfg == cfg and not model.training
    assert model.config == result.model.config
    assert state["metrics"] == result.metrics and state["complete"]
    assert state["epoch"] == 1 and state["step"] == 0 and state["global_step"] == STEPS
    for name, t in result.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    assert load_checkpoint(cfg.run_dir)[1] == cfg  # the run folder works too
    human = json.loads((cfg.run_dir / "config.json").read_text())
    assert human["train"] == cfg.to_dict() and human["model"] == model.config.to_dict()


def test_optimizer_state_round_trip(tmp_path):
    """Every optimizer state tensor and scalar comes back exactly (AdamW and SGD)."""
    for name in ("adamw", "sgd"):
        cfg = tiny(tmp_path, optimizer=name)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 3))
        opt = T._make_optimizer(model, cfg)
        for _ in range(2):
            model(torch.randn(5, 1, 8, 8)).square().mean().backward()
            opt.step()
        tensors, scalars = checkpoint.optimizer_tensors(opt)
        fresh = T._make_optimizer(model, cfg)
        checkpoint.load_optimizer(fresh, tensors, scalars)
        a, b = opt.state_dict(), fresh.state_dict()
        assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
        for index, param_state in a["state"].items():
            assert param_state.keys() == b["state"][index].keys()
            for key, value in param_state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][index][key]))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    cfg = tiny(tmp_path_factory.mktemp("saved"), epochs=1)
    return train(cfg, progress=False).checkpoint


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) // 2], "truncated or corrupt: expected"),  # cut in the tensors
        (lambda b: b[:100], "truncated or corrupt: its header claims"),  # cut in the header
        (lambda b: b[:5], "truncated or corrupt: 5 bytes"),  # cut in the header length
        (lambda b: b"", "truncated or corrupt: 0 bytes"),  # empty file
        (lambda b: os.urandom(4096), "truncated or corrupt"),  # garbage
        (lambda b: b"\x10" + bytes(7) + b"not json at all!" + bytes(64), "unreadable"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "sha256"),  # one flipped bit in the data
    ],
)
def test_damaged_checkpoint_is_rejected(tmp_path, saved_run, damage, message):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage(saved_run.read_bytes()))
    with pytest.raises(ValueError, match=message) as info:
        load_checkpoint(bad)
    assert str(bad) in str(info.value)


def test_damaged_checkpoint_refuses_resume(tmp_path):
    cfg = tiny(tmp_path, epochs=1)
    train(cfg, progress=False)
    path = cfg.run_dir / "checkpoint.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"checkpoint\.safetensors' is truncated or corrupt"):
        train(dataclasses.replace(cfg, epochs=2), progress=False, resume=True)


def test_other_safetensors_and_missing_files_are_rejected(tmp_path):
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(ValueError, match=r"weights\.safetensors' is a safetensors file but not"):
        load_checkpoint(other)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.safetensors"):
        load_checkpoint(tmp_path / "nowhere.safetensors")


def test_checkpoint_never_pickles(saved_run):
    # a safetensors file: 8-byte header length, a JSON header, raw tensor bytes; no pickle
    data = saved_run.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header["__metadata__"]
    assert meta["format"] == checkpoint.FORMAT
    assert set(json.loads(meta["state"])) >= {"epoch", "step", "scheduler", "metrics"}
    assert {k.split(".")[0] for k in header if k != "__metadata__"} == {
        "model", "optim", "rng", "train",
    }  # fmt: skip
    assert b"\x80\x04" not in data[:16] and not data.startswith(b"PK")  # pickle / torch zip


def test_atomic_write_leaves_no_temp_files(tmp_path):
    cfg = tiny(tmp_path, epochs=2)
    train(cfg, progress=False)
    assert sorted(os.listdir(cfg.run_dir)) == [
        "checkpoint.safetensors", "config.json", "metrics.jsonl",
    ]  # fmt: skip
    target = tmp_path / "file.bin"
    checkpoint.atomic_write(target, b"old")
    with pytest.raises(TypeError):
        checkpoint.atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"  # the failed write changed nothing
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


# --------------------------------------------------------------------------- metrics log


def test_metrics_jsonl_has_one_line_per_epoch(tmp_path):
    cfg = tiny(tmp_path, epochs=3, eval_every=2)
    result = train(cfg, progress=False)
    lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert rows == result.metrics and len(rows) == 3
    keys = {"epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"}
    assert all(set(row) == keys for row in rows)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["step"] for r in rows] == [STEPS, 2 * STEPS, 3 * STEPS]
    # evaluated every 2nd epoch and after the last
    assert [r["test_acc"] is None for r in rows] == [True, False, False]
    assert all(0 <= r["train_acc"] <= 1 and r["seconds"] > 0 and r["lr"] > 0 for r in rows)


def test_progress_goes_to_stderr(tmp_path, capsys):
    train(tiny(tmp_path, epochs=1), progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "epoch 1/1" in err and "test_acc" in err


# --------------------------------------------------------------------------- config


def test_config_json_round_trip():
    cfg = TrainConfig(
        model="nin", head="catavgmax", model_overrides={"widths": (8, 16)}, train_size=250,
        augmentation="canvas", canvas_size=(28, 84), optimizer="sgd", schedule="cosine",
    )  # fmt: skip
    text = json.dumps(cfg.to_dict())
    assert TrainConfig.from_dict(json.loads(text)) == cfg
    assert cfg.canvas_size == (28, 84) and cfg.model_overrides == {"widths": [8, 16]}
    assert TrainConfig.from_dict({}) == TrainConfig()  # missing keys take defaults
    # every field carries a comment (nanoGPT style)
    with open(T.__file__) as f:
        source = f.read()
    for fld in dataclasses.fields(TrainConfig):
        line = next(ln for ln in source.splitlines() if ln.strip().startswith(f"{fld.name}:"))
        assert "#" in line, fld.name


def test_config_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown keys 'epoch', 'lr_max'; known keys: data"):
        TrainConfig.from_dict({"epoch": 1, "lr_max": 2, "lr": 3})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"epochs": -1}, "epochs must be an int >= 0, got -1"),
        ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
        ({"batch_size": 2.0}, "batch_size must be an int >= 1, got 2.0"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"optimizer": "adam"}, "optimizer must be one of 'adamw', 'sgd', got 'adam'"),
        ({"schedule": "linear"}, "schedule must be one of 'onecycle'"),
        ({"augmentation": "flip"}, "augmentation must be one of 'none', 'shift', 'canvas'"),
        ({"amp": "fp16"}, "amp must be one of"),
        ({"channels_last": True}, "channels_last must be one of 'auto', 'on', 'off', got True"),
        ({"canvas_size": (56, 28)}, r"canvas_size must be \(min, max\).*got \(56, 28\)"),
        ({"canvas_size": (28,)}, "canvas_size must be"),
        ({"warmup": 1.5}, r"warmup must be in \[0, 1\], got 1.5"),
        ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\)"),
        ({"train_size": 0}, "train_size must be an int >= 1, got 0"),
        ({"model_overrides": {"f": object()}}, "model_overrides must be JSON-serialisable"),
        ({"model_overrides": [1]}, "model_overrides must be a dict"),
        ({"optimizer": "sgd", "momentum": 0.0}, "nesterov=True needs momentum > 0"),
        ({"data": ""}, "data must not be empty"),
    ],
)
def test_config_rejects_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_train_rejects_bad_setups(tmp_path):
    with pytest.raises(ValueError, match="train_size is 5000, but 'digits' has only 1437"):
        train(tiny(tmp_path, train_size=5000), progress=False)
    with pytest.raises(ValueError, match="head 'fc' takes only one input size"):
        train(tiny(tmp_path, head="fc", augmentation="canvas"), progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            train(tiny(tmp_path, device="cuda"), progress=False)


def test_default_run_dir():
    assert str(TrainConfig(model="nin", head="fc").run_dir) == os.path.join("runs", "nin-fc")
    assert str(TrainConfig(out_dir="x/y").run_dir) == os.path.join("x", "y")


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("schedule", T.SCHEDULES)
def test_lr_schedules(schedule):
    cfg = TrainConfig(lr=1.0, schedule=schedule, warmup=0.2)
    lrs = [lr_at(cfg, s, 100) for s in range(100)]
    assert max(lrs) == pytest.approx(1.0) and lrs[19] == pytest.approx(1.0)  # warmup ends
    assert all(a <= b for a, b in itertools.pairwise(lrs[:20]))  # rises
    assert all(0 < lr <= 1.0 for lr in lrs)
    if schedule == "onecycle":
        assert lrs[0] == pytest.approx(1 / 25 + (1 - 1 / 25) / 20)
    if schedule == "constant":
        assert lrs[20:] == [1.0] * 80
    else:
        assert all(a >= b for a, b in itertools.pairwise(lrs[20:]))  # anneals
        assert lrs[-1] < 1e-3


# --------------------------------------------------------------------------- evaluation


def test_evaluate_matches_a_direct_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x, y = torch.rand(37, 1, 9, 11), torch.randint(0, 3, (37,))
    acc, loss = evaluate(model, x, y, batch_size=8)
    logits = model(x)
    assert acc == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    model.train()
    evaluate(model, torch.rand(4, 1, 30, 20), torch.zeros(4, dtype=torch.long))  # any size
    assert model.training  # mode restored
    probs = predict_proba(model, x, batch_size=10)
    assert probs.shape == (37, 3) and torch.allclose(probs.sum(1), torch.ones(37))
    assert torch.allclose(probs, logits.softmax(1), atol=1e-6)
    assert predict_proba(model, x[0]).shape == (3,)
    with pytest.raises(ValueError, match="labels must be a \\(37,\\) tensor, got \\(36,\\)"):
        evaluate(model, x, y[:-1])
    with pytest.raises(ValueError, match="images must be a float \\(N, C, H, W\\) tensor"):
        evaluate(model, x[0], y)


def test_frozen_batchnorm_keeps_the_average_of_the_epoch_before(tmp_path):
    # 3 epochs, the last frozen: statistics averaged over epoch 2's steps only, then kept
    result = train(tiny(tmp_path, epochs=3, frozen_bn_epochs=1), progress=False)
    bns = [m for m in result.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(int(m.num_batches_tracked) == STEPS for m in bns)
    plain = train(tiny(tmp_path, "plain", epochs=3), progress=False).model
    assert all(int(m.num_batches_tracked) == 3 * STEPS for m in plain.modules()
               if isinstance(m, nn.BatchNorm2d))  # fmt: skip
    with pytest.raises(ValueError, match="scale_size"):
        tiny(tmp_path, scale_size=(30, 20))


def test_multi_scale_inference_takes_the_most_confident_level():
    torch.manual_seed(0)
    model = models.create("convnet-tiny", num_classes=3)
    x, y = torch.rand(6, 1, 112, 90), torch.randint(0, 3, (6,))
    levels = [x, data.rescale(x, (56, 45)), data.rescale(x, (28, 22))]  # 14x11 < 20 px: skipped
    with torch.no_grad():
        p = torch.stack([model.eval()(v).softmax(1) for v in levels])  # (L, N, K)
        expected = p[p.amax(2).argmax(0), torch.arange(6)]  # each image's most confident level
    probs = predict_proba(model, x, batch_size=4, scales=(1, 0.5, 0.25, 0.125))
    assert torch.allclose(probs, expected, atol=1e-6)
    acc, loss = evaluate(model, x, y, scales=(1, 0.5, 0.25, 0.125))
    assert acc == pytest.approx((expected.argmax(1) == y).float().mean().item())
    assert loss == pytest.approx(-expected[torch.arange(6), y].log().mean().item(), rel=1e-5)
    # a 28-px input has no level of 20 px or more below it: one pass, as without scales
    small = torch.rand(3, 1, 28, 28)
    assert torch.allclose(predict_proba(model, small, scales=(1, 0.5)), predict_proba(model, small))
    for bad in ((), (1, 0), (1, -0.5), (True,)):
        with pytest.raises(ValueError, match="scales must be positive numbers"):
            predict_proba(model, small, scales=bad)


def test_doctests():
    failures, _ = doctest.testmod(T, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert failures == 0


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_cuda_run_uses_amp_and_channels_last_and_resumes(tmp_path):
    cfg = tiny(
        tmp_path, head="gap", augmentation="canvas", canvas_size=(8, 12), device="cuda",
        train_size=None, batch_size=32,
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, on_step=Stop(50))  # in epoch 2 of 45 steps each
    result = train(cfg, progress=False, resume=True)
    weight = result.model.backbone.stage1.block0.conv.weight  # (16, 8, 3, 3)
    assert weight.is_cuda and weight.is_contiguous(memory_format=torch.channels_last)
    assert is_channels_last(result.model)
    assert [r["epoch"] for r in result.metrics] == [1, 2]
    assert result.metrics[1]["train_loss"] < result.metrics[0]["train_loss"]
    assert result.test_acc > 0.25  # 0.45 on the CPU: a few steps on canvases, tested on digits
    model, _, _ = load_checkpoint(result.checkpoint)  # loads onto the CPU
    assert next(model.parameters()).device.type == "cpu"


# --------------------------------------------------------------------------- image folders


def mixed_folder(root, n=12):
    """Digits saved as PNGs of two sizes (8x8 and 12x10), and three broken files."""
    from PIL import Image

    from gapnet import data

    digits = data.load("digits").train
    for i in range(n):
        x = digits.images[i, 0]
        if i % 2:
            x = data.rescale(x[None, None], (12, 10))[0, 0]
        folder = root / str(int(digits.labels[i]) % 2)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x.numpy() * 255).astype("uint8")).save(folder / f"{i}.png")
    png = (root / "0").glob("*.png").__next__().read_bytes()
    (root / "0" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "1" / "notes.jpg").write_text("a text file named .jpg")
    (root / "1" / "empty.png").write_bytes(b"")


def test_global_pooling_head_trains_on_a_mixed_size_folder_at_each_images_size(tmp_path, capsys):
    mixed_folder(tmp_path / "imgs")
    cfg = TrainConfig(data=f"folder:{tmp_path / 'imgs'}", model="convnet-tiny", head="gap",
                      epochs=2, batch_size=4, threads=1, out_dir=str(tmp_path / "run"))  # fmt: skip
    seen_sizes = set()
    original = T._train_step

    def spy(run, batch, e, k):
        seen_sizes.add(tuple(batch.images.shape[-2:]))
        return original(run, batch, e, k)

    with pytest.MonkeyPatch.context() as mp, pytest.warns(UserWarning) as caught:
        mp.setattr(T, "_train_step", spy)
        result = train(cfg, progress=False)
    named = " ".join(str(w.message) for w in caught)
    assert all(name in named for name in ("truncated.png", "notes.jpg", "empty.png"))
    assert seen_sizes == {(8, 8), (12, 10)}  # no resize: each batch holds one size
    assert result.metrics[-1]["epoch"] == 2
    # 2 found when the folder is opened, 1 (truncated) only when decoded: all counted at the end
    assert "skipped 3 unreadable image files, named above" in capsys.readouterr().err


def test_fc_head_on_a_mixed_size_folder_resizes_and_says_so(tmp_path, capsys):
    mixed_folder(tmp_path / "imgs")
    cfg = TrainConfig(data=f"folder:{tmp_path / 'imgs'}", model="convnet-tiny", head="fc",
                      epochs=1, batch_size=4, threads=1, out_dir=str(tmp_path / "run"),
                      model_overrides={"input_size": 12})  # fmt: skip
    with pytest.warns(UserWarning):
        result = train(cfg, progress=False)
    assert "resizing every image (8x8, 12x10) to 12x12: the fc head takes one input size" in (
        capsys.readouterr().err
    )
    assert result.model.input_size == 12


# (what it checks, sizes, batch, order, rank, world, pad, expected local batches)
STEP_BATCH_CASES = [
    ("one size: runs of the order", [(8, 8)] * 5, 2, [4, 3, 2, 1, 0], 0, 1, True,
     [[4, 3], [2, 1], [0]]),
    ("two sizes never mix; batches in order of their first image",
     [(8, 8), (9, 9), (8, 8), (9, 9), (8, 8)], 2, None, 0, 1, True, [[0, 2], [1, 3], [4]]),
    ("rank 1 of 2 takes every 2nd image of each global batch", [(8, 8)] * 6, 4, None, 1, 2, True,
     [[1, 3], [5]]),
    ("a last batch smaller than the world repeats its images", [(8, 8)] * 5, 4, None, 1, 2, True,
     [[1, 3], [4]]),
    ("evaluation: no repeats, a rank may get nothing", [(8, 8)] * 5, 4, None, 1, 2, False,
     [[1, 3], []]),
]  # fmt: skip


@pytest.mark.parametrize(
    "sizes,batch,order,rank,world,pad,expected",
    [c[1:] for c in STEP_BATCH_CASES],
    ids=[c[0] for c in STEP_BATCH_CASES],
)
def test_step_batches(sizes, batch, order, rank, world, pad, expected):
    import numpy as np

    perm = None if order is None else torch.tensor(order)
    got = T.StepBatches(np.array(sizes), batch, perm, rank=rank, world=world, pad=pad)
    assert list(got) == expected
    resumed = T.StepBatches(np.array(sizes), batch, perm, rank=rank, world=world, pad=pad, start=1)
    assert list(resumed) == expected[1:]  # a resumed epoch starts at its step
