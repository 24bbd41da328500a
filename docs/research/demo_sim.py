"""The proposed demo, end to end, with gapnet.train.train(): per-model seconds and all accuracies.

Usage: PYTHONPATH=. python docs/research/demo_sim.py THREADS OUT.jsonl [seed]
"""
import json, sys, tempfile, time
import torch
from gapnet import data
from gapnet.train import TrainConfig, evaluate, train

threads, out = int(sys.argv[1]), sys.argv[2]
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
only = sys.argv[4].split(",") if len(sys.argv) > 4 else None
T0 = time.perf_counter()
COMMON = dict(model="convnet", model_overrides={"widths": [16, 32, 64]}, threads=threads, lr=5e-3, seed=seed)
FINAL = dict(label_smoothing=0.1, augmentation="shift", shift=1, epochs=12)  # every run's recipe
ROBUST = dict(augmentation="canvas", canvas_size=(28, 40), epochs=10)  # on top of FINAL
FINAL_RUNS = [(f"final {h}", {**FINAL, "head": h}) for h in ("fc", "fc-dropout", "gap", "gap-fc", "gmp", "gem")] + [
    ("final gem-canvas (robust)", {**FINAL, **ROBUST, "head": "gem"}),
    ("final gmp-canvas", {**FINAL, **ROBUST, "head": "gmp"}),
    ("final gap-canvas", {**FINAL, **ROBUST, "head": "gap"}),
    ("final gap-canvas 28-56", {**FINAL, **ROBUST, "canvas_size": (28, 56), "head": "gap"}),
    ("final gem-canvas 28-56", {**FINAL, **ROBUST, "canvas_size": (28, 56), "head": "gem"}),
    ("final sweep fc n=250", {**FINAL, "head": "fc", "epochs": 60, "train_size": 250}),
    ("final sweep gap n=250", {**FINAL, "head": "gap", "epochs": 60, "train_size": 250}),
    ("final sweep fc n=1000", {**FINAL, "head": "fc", "epochs": 15, "train_size": 1000}),
    ("final sweep gap n=1000", {**FINAL, "head": "gap", "epochs": 15, "train_size": 1000}),
]
RUNS = FINAL_RUNS + [
    ("fc", dict(head="fc", epochs=12)),
    ("fc-dropout", dict(head="fc-dropout", epochs=12)),
    ("gap", dict(head="gap", epochs=12)),
    ("gap-fc", dict(head="gap-fc", epochs=12)),
    ("gmp", dict(head="gmp", epochs=12)),
    ("gem", dict(head="gem", epochs=12)),
    ("gmp-canvas (robust)", dict(head="gmp", epochs=10, augmentation="canvas", canvas_size=(28, 40))),
    ("gem-canvas", dict(head="gem", epochs=10, augmentation="canvas", canvas_size=(28, 40))),
    ("gap-canvas", dict(head="gap", epochs=10, augmentation="canvas", canvas_size=(28, 40))),
    ("gap 8ep", dict(head="gap", epochs=8)),
    ("gap 6ep", dict(head="gap", epochs=6)),
    ("gap 6ep lr1e-2", dict(head="gap", epochs=6, lr=1e-2)),
    ("gap 8ep default-lr", dict(head="gap", epochs=8, lr=3e-3)),
    ("gmp-canvas 8ep", dict(head="gmp", epochs=8, augmentation="canvas", canvas_size=(28, 40))),
    ("gmp-canvas 28-56", dict(head="gmp", epochs=10, augmentation="canvas", canvas_size=(28, 56))),
    ("fc n=250", dict(head="fc", epochs=60, train_size=250)),
    ("gap n=250", dict(head="gap", epochs=60, train_size=250)),
    ("fc n=1000", dict(head="fc", epochs=25, train_size=1000)),
    ("gap n=1000", dict(head="gap", epochs=25, train_size=1000)),
]
t = time.perf_counter()
ds = data.load("mnist-5k")
canv = {S: data.canvas_mnist(S)[0] for S in (28, 40, 56, 84, 112)}
resc = {s: data.rescale(ds.test.images, s) for s in (20, 28, 36, 48, 64)}
print(json.dumps({"data_s": round(time.perf_counter() - t, 1)}), flush=True)
for name, r in RUNS:
    if only and name not in only:
        continue
    import re
    rd = "runs/research/" + re.sub(r"[^A-Za-z0-9_.=-]+", "_", name) + f"-s{seed}"
    cfg = TrainConfig(**{**COMMON, **r}, eval_every=1000, out_dir=rd)
    t = time.perf_counter()
    res = train(cfg, progress=False, overwrite=True)
    wall = time.perf_counter() - t
    row = {"name": name, "seed": seed, "threads": threads, "head_params": res.param_counts["head"],
           "train_s": round(res.train_seconds, 1), "epoch_s": round(res.train_seconds / cfg.epochs, 2),
           "run_wall_s": round(wall, 1), "test28": round(100 * res.test_acc, 1)}
    if not r["head"].startswith("fc") and "train_size" not in r:
        torch.set_num_threads(threads)
        t = time.perf_counter()
        for S, s in canv.items():
            row[f"c{S}"] = round(100 * evaluate(res.model, s.images, s.labels, batch_size=256)[0], 1)
        for s, x in resc.items():
            row[f"r{s}"] = round(100 * evaluate(res.model, x, ds.test.labels, batch_size=256)[0], 1)
        row["eval_s"] = round(time.perf_counter() - t, 1)
    print(json.dumps(row), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
print(json.dumps({"total_s": round(time.perf_counter() - T0, 1)}), flush=True)
