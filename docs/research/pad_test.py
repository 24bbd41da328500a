"""Pure 'more blank' test: the same 56x56 canvases (n=500), padded with blank on the right and
bottom to S x S. The digit does not move, so only the amount of blank changes."""
import json, sys, torch, torch.nn.functional as F
from gapnet import data
from gapnet.train import load_checkpoint
torch.set_num_threads(int(sys.argv[1]))
base, _ = data.canvas_mnist(56, n=500)
for run in sys.argv[2:]:
    model, cfg, _ = load_checkpoint(run)
    row = {"run": run}
    ref = None
    with torch.no_grad():
        for S in (56, 112, 224, 448):
            x = F.pad(base.images, (0, S - 56, 0, S - 56))
            pred = torch.cat([model(x[i:i + 25]).argmax(1) for i in range(0, len(x), 25)])
            ref = pred if ref is None else ref
            row[f"acc{S}"] = round(100 * (pred == base.labels).float().mean().item(), 1)
            row[f"changed{S}"] = int((pred != ref).sum())
    print(json.dumps(row), flush=True)
