"""The demo's robust model (gem, canvases 28-40, no label smoothing) over seeds: box rule and
threshold chosen on the validation split, then localization on 300 test canvases per size.

Usage: PYTHONPATH=. python docs/research/cam_seeds.py SEED [SEED ...]"""
import json, sys, torch
from gapnet import cam
from gapnet.compare import DEMO, _train_config
from pathlib import Path

torch.set_num_threads(2)
spec = DEMO.spec
sizes = spec.canvases
for seed in map(int, sys.argv[1:]):
    cfg = _train_config(spec.replace(seed=seed), Path("runs/research"), f"gem-robust-s{seed}",
                        head=spec.robust_head, **spec.robust)
    from gapnet.train import train
    result = train(cfg, progress=False, overwrite=True)
    model = result.model
    choice = cam.choose_threshold(model, sizes, n=spec.loc_n, seed=seed)
    rows = cam.localize(model, sizes, n=spec.loc_n, threshold=choice.threshold,
                        region=choice.region, seed=seed)
    paper = cam.choose_threshold(model, sizes, n=spec.loc_n, seed=seed, regions=("largest",))
    rows_paper = cam.localize(model, sizes, n=spec.loc_n, threshold=paper.threshold, seed=seed)
    print(json.dumps({
        "seed": seed, "test_acc": result.test_acc,
        "chosen": [choice.region, choice.threshold],
        "loc": {r["size"]: round(r["loc_acc"], 3) for r in rows},
        "acc": {r["size"]: round(r["acc"], 3) for r in rows},
        "paper_rule": [paper.threshold, {r["size"]: round(r["loc_acc"], 3) for r in rows_paper}],
    }), flush=True)
