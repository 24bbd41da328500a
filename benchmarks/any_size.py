"""The any-size study: which recipe makes a GAP-family model classify a digit at any image size.

Each variant is a TrainConfig (overrides below) trained on mnist-5k; each trained model is
measured on the 1,000 held-out test digits rescaled to every side from 20 to 112 px (bilinear,
antialiased, as ``gapnet eval --size``) and placed on blank canvases from 28 to 224 px, in one
forward pass at the input's own size and with test-time multi-scale inference. Accuracies carry
95 % Wilson intervals over the 1,000 images. docs/research_any_size.md reports the numbers.

    python benchmarks/any_size.py --variants gem-scale --seeds 0,1,2 --out runs/any_size
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gapnet import data, inference
from gapnet.report import wilson
from gapnet.train import TrainConfig, train

SIZES = (20, 28, 40, 56, 84, 112, 160, 280)  # test digits rescaled to S x S (160, 280: beyond)
CANVASES = (28, 56, 112, 224)  # 28-px test digits on S x S blank canvases
SCALES = (2.0, 1.0, 0.5, 0.25, 0.125)  # the multi-scale pyramid, factors of the input side

BASE = dict(data="mnist-5k", model="convnet", epochs=12, batch_size=128, lr=5e-3, threads=2)
NARROW = {"widths": [16, 32, 64]}
DEEP = {"widths": [16, 32, 64, 128]}
DEEP5 = {"widths": [16, 32, 64, 96, 128]}
DEEP5C = {"widths": [16, 32, 64, 96, 128], "ceil_mode": True}
DEEP5C_GN = {**DEEP5C, "norm": "group"}
DEEP5C_NONE = {**DEEP5C, "norm": "none"}
DEEP6C = {"widths": [16, 32, 48, 64, 96, 128], "ceil_mode": True}
CANVAS = dict(augmentation="canvas", canvas_size=[28, 40])  # today's robust recipe
SCALE = dict(augmentation="scale", scale_size=[20, 112], canvas_ratio=1.5)
SS4 = {"widths": [16, 32, 64], "ceil_mode": True, "levels": 4}  # scale space, 4 levels
SS4_NONE = {**SS4, "norm": "none"}
SS5 = {**SS4, "levels": 5}  # models.create("convnet-scale")
SCALE_SS = dict(augmentation="scale", scale_size=[20, 56], canvas_ratio=1.5)

VARIANTS: dict[str, dict] = {
    # today's robust model: GeM, digits on 28-40 px canvases, 3 stages (receptive field 32 px)
    "gem-canvas": dict(head="gem", model_overrides=NARROW, **CANVAS),
    # object-scale augmentation alone, same backbone
    "gem-scale-3": dict(head="gem", model_overrides=NARROW, **SCALE),
    # ... with a 4th stage (receptive field 68 px)
    "gem-scale": dict(head="gem", model_overrides=DEEP, **SCALE),
    # ... and a 5th (receptive field 140 px)
    "gem-scale-5": dict(head="gem", model_overrides=DEEP5, **SCALE),
    # ... with pools that drop no pixel (ceil_mode), 5 and 6 stages (receptive field 140, 284 px)
    "gem-scale-5c": dict(head="gem", model_overrides=DEEP5C, **SCALE),
    "gem-scale-6c": dict(head="gem", model_overrides=DEEP6C, **SCALE),
    # BatchNorm's eval statistics are those of a mix of scales: per-sample or no normalization
    "gem-scale-5c-gn": dict(head="gem", model_overrides=DEEP5C_GN, **SCALE),
    "gem-scale-5c-none": dict(head="gem", model_overrides=DEEP5C_NONE, **SCALE),
    # no normalization, a gentler optimizer (He init; the default lr and decay stall it)
    "gem-scale-5c-none-slow": dict(
        head="gem", model_overrides=DEEP5C_NONE, lr=2e-3, weight_decay=0.01, **SCALE
    ),
    # ... or BatchNorm frozen (running statistics) for the last epochs
    "gem-scale-5c-fbn": dict(head="gem", model_overrides=DEEP5C, frozen_bn_epochs=4, **SCALE),
    # the pool, on the 4-stage scale recipe
    "gap-scale": dict(head="gap", model_overrides=DEEP, **SCALE),
    "gmp-scale": dict(head="gmp", model_overrides=DEEP, **SCALE),
    # a scale space (models.ScaleSpace): the backbone also sees the input halved 1, 2, 3 times,
    # max over the levels; object scales 20-56 px (each level sees the sizes in one octave)
    "ss4-gem-none": dict(
        head="gem", model_overrides=SS4_NONE, lr=2e-3, weight_decay=0.01, **SCALE_SS
    ),
    "ss4-gem": dict(head="gem", model_overrides=SS4, **SCALE_SS),
    "ss4-gem-112": dict(head="gem", model_overrides=SS4, **{**SCALE_SS, "scale_size": [20, 112]}),
    # ... halved 4 times, without normalization (nothing differs between training and eval)
    "ss-gem-none": dict(
        head="gem",
        model_overrides={**SS5, "norm": "none"},
        lr=2e-3,
        weight_decay=0.01,
        **SCALE_SS,
    ),
    # ... and halved 4 times: the demo's robust model
    "ss-gem": dict(head="gem", model_overrides=SS5, **SCALE_SS),
    # ... trained on one octave of digit sizes (the levels cover the others), or among clutter
    "ss-gem-40": dict(head="gem", model_overrides=SS5, **{**SCALE_SS, "scale_size": [20, 40]}),
    # ... with the plain heads' label smoothing 0.1
    "ss-gem-40-ls": dict(
        head="gem",
        model_overrides=SS5,
        **{**SCALE_SS, "scale_size": [20, 40]},
        label_smoothing=0.1,
    ),
    # ... the pool of that recipe: the plain average (NiN's gap head) or the maximum
    "ss-gap-40": dict(head="gap", model_overrides=SS5, **{**SCALE_SS, "scale_size": [20, 40]}),
    "ss-gmp-40": dict(head="gmp", model_overrides=SS5, **{**SCALE_SS, "scale_size": [20, 40]}),
    "ss-gem-d2": dict(head="gem", model_overrides=SS5, distractors=2, **SCALE_SS),
    "ss-gem-40-d2": dict(
        head="gem", model_overrides=SS5, distractors=2, **{**SCALE_SS, "scale_size": [20, 40]}
    ),
    # ... trained on digits up to 80 or 112 px, so level 0 sees the thick strokes it meets there
    "ss-gem-80": dict(head="gem", model_overrides=SS5, **{**SCALE_SS, "scale_size": [20, 80]}),
    "ss-gem-112": dict(head="gem", model_overrides=SS5, **{**SCALE_SS, "scale_size": [20, 112]}),
    # depth without the scale augmentation
    "gem-canvas-4": dict(head="gem", model_overrides=DEEP, **CANVAS),
}


def eval_sets(n: int | None) -> list[tuple[str, int, data.ImageSet]]:
    test = data.load("mnist-5k").test
    if n is not None:
        test = data.stratified_subset(test, n)
    sets = [
        ("rescaled", s, data.ImageSet(data.rescale(test.images, s), test.labels)) for s in SIZES
    ]
    sets += [("canvas", s, data.canvas_mnist(s, n=n)[0]) for s in CANVASES]
    return sets


def measure(model, sets, scales) -> list[dict]:
    rows = []
    for kind, s, ds in sets:
        for mode, sc in (("single", None), ("scales", scales))[: 1 + (scales is not None)]:
            acc, _ = inference.evaluate(model, ds.images, ds.labels, batch_size=128, scales=sc)
            k, n = round(acc * len(ds.labels)), len(ds.labels)
            rows.append(dict(kind=kind, size=s, mode=mode, correct=k, n=n, acc=acc,
                             ci=wilson(k, n)))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=BASE["epochs"])
    p.add_argument("--eval-n", type=int, default=None, help="test digits per set (default all)")
    p.add_argument("--out", default="runs/any_size")
    p.add_argument("--threads", type=int, default=BASE["threads"])
    p.add_argument("--scales", default=",".join(map(str, SCALES)),
                   help="the pyramid's factors; empty: one pass only")  # fmt: skip
    a = p.parse_args(argv)
    out = Path(a.out)
    sets = eval_sets(a.eval_n)
    scales = tuple(float(f) for f in a.scales.split(",")) if a.scales else None
    for name in a.variants.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            fields = {**BASE, "epochs": a.epochs, "threads": a.threads, **VARIANTS[name]}
            cfg = TrainConfig(**fields, seed=seed, out_dir=str(out / name / f"seed{seed}"))
            t0 = time.perf_counter()
            result = train(cfg, progress=False, overwrite=True)
            rows = measure(result.model, sets, scales)
            record = dict(variant=name, seed=seed, epochs=a.epochs, config=cfg.to_dict(),
                          train_seconds=result.train_seconds, wall=time.perf_counter() - t0,
                          test_acc=result.test_acc, rows=rows)  # fmt: skip
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            single = " ".join(f"{r['acc'] * 100:5.1f}" for r in rows if r["mode"] == "single")
            multi = " ".join(f"{r['acc'] * 100:5.1f}" for r in rows if r["mode"] == "scales")
            print(f"{name} seed{seed} {result.train_seconds:.0f}s | {single} | {multi}",
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
