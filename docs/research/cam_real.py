"""CAM localization with gapnet.cam (the demo's own machinery) on train() checkpoints."""
import json, sys, torch
from gapnet import cam
from gapnet.train import load_checkpoint
torch.set_num_threads(int(sys.argv[1]))
sizes = (28, 40, 56, 84, 112)
for run in sys.argv[2:]:
    model, cfg, _ = load_checkpoint(run)
    choice = cam.choose_threshold(model, sizes, n=300)
    rows = cam.localize(model, sizes, n=300, threshold=choice.threshold, region=choice.region)
    print(json.dumps({"run": run, "threshold": choice.threshold,
                      "val_scores": {str(k): round(v, 3) for k, v in choice.scores.items()},
                      "rows": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "seconds"} for r in rows]}), flush=True)
