import sys, torch, torch.nn.functional as F
from gapnet import cam, data
from gapnet.train import load_checkpoint
torch.set_num_threads(2)
model, cfg, _ = load_checkpoint(sys.argv[1]); model.eval()
S = 4  # model stride

def wf(x, k=None):
    with torch.no_grad():
        f = model.forward_features(x)
        logits = model.forward_head(f)
        k = logits.argmax(1) if k is None else k
        W = model.get_classifier().fc.weight[k]
        return torch.einsum("nc,nchw->nhw", W, f), k

def stitched(x, r):
    """r x r shifts of S/r px: maps on a grid r times finer (shift-and-stitch)."""
    base, k = wf(x)
    n, h, w = base.shape
    out = torch.zeros(n, h * r, w * r)
    step = S // r
    for i in range(r):
        for j in range(r):
            xs = F.pad(x, (0, j * step, 0, i * step))[:, :, i * step:, j * step:]  # shift up/left
            m, _ = wf(xs, k)
            out[:, i::r, j::r] = m[:, :h, :w]
    return out, k, S // r

def up(m, size, stride):
    # cell centre of map cell c is at stride*c + (S-1)/2 in input px; bilinear align_corners=False
    # assumes centre stride*c + (stride-1)/2, so shift by the difference
    m = F.interpolate(m[:, None], scale_factor=stride, mode="bilinear", align_corners=False)[:, 0]
    off = round((S - 1) / 2 - (stride - 1) / 2)
    if off:
        m = F.pad(m, (off, 0, off, 0), mode="replicate")
    return cam.normalize_maps(m[:, :size, :size])

TS = [round(0.05 * i, 2) for i in range(1, 13)]
for r in (1, 2, 4):
    res = {}
    for split in ("train", "test"):
        res[split] = []
        for size in (56, 84, 112):
            s, boxes = data.canvas_mnist(size, n=300, split=split, seed=0)
            if r == 1:
                m, k = wf(s.images); m = up(m, size, S)
            else:
                m, k, st = stitched(s.images, r); m = up(m, size, st)
            res[split].append({t: float((cam.box_iou(cam.cam_boxes(m, t), boxes) >= 0.5).float().mean()) for t in TS})
    val = {t: sum(d[t] for d in res["train"]) / 3 for t in TS}
    t = max(TS, key=val.get)
    print(r, "t", t, "val", round(val[t], 3), "test", [round(d[t], 3) for d in res["test"]], flush=True)
