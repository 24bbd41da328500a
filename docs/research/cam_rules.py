"""Box rules x thresholds on the demo's gem-robust model; threshold chosen on the train split."""
import sys, torch
from gapnet import cam, data
from gapnet.train import load_checkpoint
torch.set_num_threads(2)
model, cfg, _ = load_checkpoint(sys.argv[1])
TS = [round(0.05 * i, 2) for i in range(2, 13)]
SIZES = (56, 84, 112)
def union_boxes(maps, t):
    level = t * maps.amax((1, 2), keepdim=True)
    return cam._boxes_of(maps >= level)
rules = {"largest": cam.cam_boxes, "union": union_boxes}
res = {r: {"train": [], "test": []} for r in rules}
cls = {}
for split in ("train", "test"):
    for size in SIZES:
        s, boxes = data.canvas_mnist(size, n=300, split=split, seed=0)
        maps = cam.class_activation_maps(model, s.images).maps
        for r, fn in rules.items():
            d = {}
            for t in TS:
                hit = cam.box_iou(fn(maps, t), boxes) >= 0.5
                d[t] = float(hit.float().mean())
                if split == "test" and size == 84:
                    cls[(r, t)] = [round(float(hit[s.labels == c].float().mean()), 2) for c in range(10)]
            res[r][split].append(d)
for r in rules:
    val = {t: sum(d[t] for d in res[r]["train"]) / len(SIZES) for t in TS}
    t = max(TS, key=val.get)
    print(r, "chosen", t, "val", round(val[t], 3), "test", [round(d[t], 3) for d in res[r]["test"]])
    for tt in TS:
        print("   ", tt, "val", round(val[tt], 3), "test", [round(d[tt], 3) for d in res[r]["test"]], "per class @84", cls[(r, tt)])
