"""What a class activation map costs: `gapnet.cam.class_activation_maps` against a plain forward.

CAM needs no second pass: the backbone runs once, and the maps are the head's weights applied to
the same features (plus an upsample and a normalisation). This times both on the same batch,
interleaved (alternating order each round), and prints the ratio; the issue's bound is 1.3x on
CPU. Appends its table to ``benchmarks/RESULTS.md`` unless ``--no-save``.

    .venv/bin/python benchmarks/bench_cam.py              # CPU, the threads torch picks
    PYTHONPATH=. python benchmarks/bench_cam.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ops import cpu_times, environment, gpu_time, publish

from gapnet.cam import class_activation_maps
from gapnet.models import create

# (model, head, model overrides): the default backbone with NiN's and ResNet's heads, and the
# demo's robust model; each on 256 images of 28x28 and the same pixels as 64 of 56x56 and 16 of
# 112x112 (each batch about 0.1-1 s on 2 cores)
MODELS = [
    ("convnet", "gap", {}),
    ("convnet", "gap-fc", {}),
    ("convnet", "gem", {"widths": (16, 32, 64)}),
]
BATCHES = {28: 256, 56: 64, 112: 16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--no-save", action="store_true", help="don't append to RESULTS.md")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU here")
    rows = []
    for name, head, overrides in MODELS:
        model = create(name, head=head, **overrides).to(args.device).eval()
        for side, batch in BATCHES.items():
            x = torch.rand(batch, 1, side, side, device=args.device)
            with torch.no_grad():
                fns = {
                    "forward": lambda model=model, x=x: model(x),
                    "cam": lambda model=model, x=x: class_activation_maps(model, x),
                }
                if args.device == "cpu":
                    t = cpu_times(fns, budget=3.0)
                else:
                    t = {k: gpu_time(fn, graph=False) for k, fn in fns.items()}
            label = f"{name} {'-'.join(map(str, model.config.widths))}, {head}"
            rows.append((label, f"{batch}x1x{side}x{side}", t["forward"], t["cam"]))
            print("done", label, side, flush=True)
    table = [
        "| model, head | input | forward ms | CAM ms | CAM / forward |",
        "|---|---|---|---|---|",
    ]
    table += [
        f"| {m} | {s} | {f * 1e3:.2f} | {c * 1e3:.2f} | {c / f:.2f}x |" for m, s, f, c in rows
    ]
    title = f"CAM cost ({args.device}): {environment(args.device, None)}"
    publish(title, ["\n".join(table)], save=not args.no_save)


if __name__ == "__main__":
    main()
