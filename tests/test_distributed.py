"""Training under torchrun: two gloo processes on the CPU against one process.

Each test starts `torch.distributed.run` (torchrun) in a subprocess with a small script that
calls `gapnet.train.train`, so the processes, the process group and DDP are all real.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gapnet import checkpoint
from gapnet.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
# small but not trivial: 400 digits, 5 epochs of 10 steps (global batch 40)
RUN = dict(data="digits", model="convnet-tiny", epochs=5, train_size=400, batch_size=40,
           lr=2e-2, threads=1, augmentation="none")  # fmt: skip

SCRIPT = """
import json, os, signal, sys
from gapnet.train import TrainConfig, train

cfg = TrainConfig(**json.loads(sys.argv[1]))
kill_at = json.loads(sys.argv[2])  # [epoch, step] at which rank 1 dies, or null
resume = sys.argv[3] == "resume"

def on_step(epoch, step):
    if kill_at and os.environ["RANK"] == "1" and [epoch, step] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # a rank killed mid-epoch, without warning

result = train(cfg, progress=True, resume=resume, overwrite=not resume, on_step=on_step)
with open(sys.argv[4] + os.environ["RANK"], "w") as f:
    json.dump([result.test_acc, result.train_loss], f)
"""


def torchrun(tmp_path, cfg: TrainConfig, kill_at=None, resume=False, nproc=2):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", str(script), json.dumps(cfg.to_dict()),
        json.dumps(kill_at), "resume" if resume else "fresh", str(tmp_path / "result."),
    ]  # fmt: skip
    for old in tmp_path.glob("result.*"):
        old.unlink()
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def results(tmp_path) -> dict[str, list[float]]:
    """What each rank's train() returned: rank -> [test_acc, train_loss]."""
    return {p.suffix[1:]: json.loads(p.read_text()) for p in tmp_path.glob("result.*")}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors, _ = checkpoint.read(run_dir / checkpoint.CHECKPOINT)
    return checkpoint.prefixed(tensors, "model.")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    cfg = TrainConfig(**RUN, out_dir=str(tmp_path_factory.mktemp("one")))
    return train(cfg, progress=False)


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, one_process):
    cfg = TrainConfig(**RUN, out_dir=str(tmp_path / "two"))
    done = torchrun(tmp_path, cfg)
    assert done.returncode == 0, done.stderr[-3000:]
    got = results(tmp_path)
    assert set(got) == {"0", "1"} and got["0"] == got["1"]  # metrics reduced over both ranks
    test_acc, train_loss = got["0"]
    # Same images in every step and the same schedule; BatchNorm statistics are per process
    # (50 images each instead of 100), so the runs agree within noise, not bit for bit.
    assert abs(test_acc - one_process.test_acc) <= 0.05
    assert abs(train_loss - one_process.train_loss) <= 0.15 * one_process.train_loss
    _, meta = checkpoint.read(Path(cfg.out_dir) / checkpoint.CHECKPOINT)
    assert meta["state"]["complete"] and meta["state"]["global_step"] == 5 * 10
    # only rank 0 writes files and prints the epochs
    assert sorted(os.listdir(cfg.out_dir)) == ["checkpoint.safetensors", "config.json",
                                               "metrics.jsonl"]  # fmt: skip
    assert done.stderr.count("epoch 5/5") == 1
    assert len((Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()) == 5


def test_a_killed_rank_leaves_the_last_checkpoint_and_the_run_resumes_to_the_same_end(tmp_path):
    whole = TrainConfig(**RUN, out_dir=str(tmp_path / "whole"))
    assert torchrun(tmp_path, whole).returncode == 0
    cut = TrainConfig(**RUN, out_dir=str(tmp_path / "cut"))
    killed = torchrun(tmp_path, cut, kill_at=[1, 4])  # rank 1 dies in epoch 2, after step 4
    assert killed.returncode != 0
    _, meta = checkpoint.read(Path(cut.out_dir) / checkpoint.CHECKPOINT)
    assert meta["state"]["epoch"] == 1 and not meta["state"]["complete"]  # epoch 1's, intact
    resumed = torchrun(tmp_path, cut, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights(Path(whole.out_dir)), weights(Path(cut.out_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.stderr.count("resuming") == 1  # rank 0 speaks for both
    assert results(tmp_path)["0"] == results(tmp_path)["1"]
