"""Part 3 of docs/research_any_size.md: trained checkpoints on the any-size sets (the 1,000
held-out digits rescaled to 20-280 px and on canvases of 28-224 px), one pass and with the
pyramid, from one set of forward passes per set (`inference.level_probs`): one pass is level 0,
`--scales 1,0.5` the most confident of the input and its half (a level under 20 px left out),
and `--scales 2,1,0.5` adds the doubled input where the input is at most 56 px.

usage: PYTHONPATH=. python docs/research/pyramid_eval.py THREADS single|pyramid MAX_SIZE RUN_DIR...
"""

import json
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from any_size import eval_sets

from gapnet import checkpoint, inference

torch.set_num_threads(int(sys.argv[1]))
mode, max_size = sys.argv[2], int(sys.argv[3])
sets = [t for t in eval_sets(None) if t[1] <= max_size]
for path in sys.argv[4:]:
    model, _ = checkpoint.load_model(path)
    out = {}
    t0 = time.time()
    for kind, s, ds in sets:
        side = min(ds.images.shape[-2:])
        doubled = mode != "single" and side <= 56
        scales = (1,) if mode == "single" else (1, 0.5, 2) if doubled else (1, 0.5)
        halved = mode != "single" and side * 0.5 >= 20
        half = [0, 1] if halved else [0]  # levels: input, half (if >= 20 px), double
        correct = [0, 0, 0]  # one pass, --scales 1,0.5, --scales 2,1,0.5
        for start, p in inference.level_probs(model, ds.images, 100, scales):
            y = ds.labels[start : start + p.shape[1]]
            correct[0] += int((p[0].argmax(1) == y).sum())
            correct[1] += int((inference.most_confident(p[half]).argmax(1) == y).sum())
            correct[2] += int((inference.most_confident(p).argmax(1) == y).sum()) if doubled else 0
        out[f"{kind}{s}"] = [round(c / len(ds.labels) * 100, 1) for c in correct]
    print(path, f"{time.time() - t0:.0f}s", json.dumps(out), flush=True)
