"""Plain-28 recipe grid with gapnet.train.train(); appends one JSON row per run."""
import json, sys, tempfile, time, torch
from gapnet.train import TrainConfig, train
threads, out = int(sys.argv[1]), sys.argv[2]
grid = json.loads(sys.argv[3])
seeds = [int(s) for s in sys.argv[4].split(",")]
BASE = dict(model="convnet", model_overrides={"widths": [16, 32, 64]}, head="gap", lr=5e-3, epochs=12)
for name, over in grid:
    for seed in seeds:
        cfg = TrainConfig(**{**BASE, **over, "seed": seed, "threads": threads, "eval_every": 1000,
                             "out_dir": tempfile.mkdtemp()})
        res = train(cfg, progress=False)
        row = {"name": name, "seed": seed, "test28": round(100 * res.test_acc, 1),
               "train_acc": round(100 * res.train_acc, 2), "train_s": round(res.train_seconds, 1),
               "epoch_s": round(res.train_seconds / cfg.epochs, 2), "threads": threads,
               "head_params": res.param_counts["head"]}
        print(json.dumps(row), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
