"""Accuracy of train() checkpoints far beyond the trained canvas sizes (n=200 fixed test digits)."""
import json, sys, torch
from gapnet import data
from gapnet.train import load_checkpoint, evaluate
torch.set_num_threads(int(sys.argv[1]))
sets = {S: data.canvas_mnist(S, n=200)[0] for S in (112, 224, 448)}
for run in sys.argv[2:]:
    model, cfg, _ = load_checkpoint(run)
    p = getattr(getattr(model.head, "global_pool", None), "p", None)
    row = {"run": run, "gem_p": round(float(p), 2) if isinstance(p, torch.Tensor) else None}
    for S, s in sets.items():
        row[f"c{S}_n200"] = round(100 * evaluate(model, s.images, s.labels, batch_size=20)[0], 1)
    blank = {S: model(torch.zeros(1, 1, S, S))[0] for S in (28, 448)}
    row["blank_spread"] = {S: round(float(v.max() - v.min()), 2) for S, v in blank.items()}
    f = model.forward_features(torch.zeros(1, 1, 112, 112))[0, :, 14, 14]
    row["bg_channels_zero"] = f"{int((f == 0).sum())}/{len(f)}"
    print(json.dumps(row), flush=True)
