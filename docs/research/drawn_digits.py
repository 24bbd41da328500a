"""Part 3 of docs/research_any_size.md: held-out digits drawn dark-on-light at 280x280 (as a
paint program makes them), saved as PNG and classified by `gapnet predict` at its default
options, as a user would.

usage: PYTHONPATH=. python docs/research/drawn_digits.py RUN_DIR [N] [SIDE]
"""

import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

from gapnet import data
from gapnet.cli import main

run_dir, n, side = (sys.argv[1:] + ["100", "280"][len(sys.argv) - 2 :])[:3]
n, side = int(n), int(side)
test = data.stratified_subset(data.load("mnist-5k").test, n, seed=1)
with tempfile.TemporaryDirectory() as folder:
    paths = []
    for i, x in enumerate(data.rescale(test.images, side)):  # (1, side, side), light on dark
        paths.append(str(Path(folder) / f"drawn{i}.png"))
        gray = ((1 - x[0]).clamp(0, 1) * 255).round().to(torch.uint8)
        Image.fromarray(gray.numpy(), "L").save(paths[-1])
    out = Path(folder) / "predictions.json"
    with open(out, "w") as f, contextlib.redirect_stdout(f):
        main(["predict", *paths, "--checkpoint", run_dir, "--json"])
    answers = torch.tensor([r["top_k"][0]["class"] for r in json.loads(out.read_text())])
right = int((answers == test.labels).sum())
print(f"{run_dir}: {right} of {n} digits drawn at {side}x{side} right")
