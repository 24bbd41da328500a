"""Scratch harness for the any-size research: flexible heads/backbones, own loop mirroring train.py."""
import json, math, sys, time
import torch, torch.nn as nn, torch.nn.functional as F
from gapnet import data, models
from gapnet.train import TrainConfig, lr_at

DS = data.load("mnist-5k")
CANVAS = {}
def canvas_set(S):
    if S not in CANVAS:
        s, _ = data.canvas_mnist(S)
        CANVAS[S] = (s.images, s.labels)
    return CANVAS[S]

# ---------------------------------------------------------------- zero-preserving norm
class ScaleNorm2d(nn.Module):
    """BatchNorm without centering and without beta: y = gamma * x / sqrt(var + eps); 0 -> 0."""
    def __init__(self, c, momentum=0.1, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.register_buffer("running_var", torch.ones(c))
        self.momentum, self.eps = momentum, eps
    def forward(self, x):
        if self.training:
            var = x.var((0, 2, 3), unbiased=False)
            with torch.no_grad():
                self.running_var.lerp_(var, self.momentum)
        else:
            var = self.running_var
        return x * (self.weight * torch.rsqrt(var + self.eps))[None, :, None, None]

def make_blank_preserving(model):
    for mod in model.backbone.modules():
        if isinstance(mod, models.ConvBnAct):
            mod.bn = ScaleNorm2d(mod.bn.num_features)
    return model

# ---------------------------------------------------------------- heads
class MapHead(nn.Module):
    """1x1 conv to K maps (+ extra maps) then a pooling rule."""
    def __init__(self, c, k, pool, bias=True, r=1.0):
        super().__init__()
        self.pool, self.k = pool, k
        extra = {"attn": 1, "bgclass": 1}.get(pool, 0)
        self.conv = nn.Conv2d(c, k + extra, 1, bias=bias)
        if pool == "lse":
            self.r = nn.Parameter(torch.tensor(float(r)))
    def forward(self, x, pre_logits=False):
        m = self.conv(x)  # (N, K[+1], h, w)
        if self.pool == "mean":
            return m.mean((2, 3))
        if self.pool == "sum49":  # sum / 49: equals mean at 28x28
            return m.sum((2, 3)) / 49
        if self.pool == "max":
            return m.amax((2, 3))
        if self.pool == "lse":  # log-mean-exp
            r = self.r.clamp(min=0.1)
            return (torch.logsumexp(r * m.flatten(2), 2) - math.log(m[0, 0].numel())) / r
        if self.pool == "attn":
            a = m[:, -1:].flatten(2).softmax(2)  # (N, 1, hw)
            return (m[:, :-1].flatten(2) * a).sum(2)
        if self.pool == "bgclass":
            p = m.softmax(1)[:, :-1].mean((2, 3))  # (N, K)
            return torch.log(p + 1e-6)
        if self.pool == "relumean":
            return F.relu(m).mean((2, 3))
        raise ValueError(self.pool)

def build(spec):
    m = models.create("convnet", head=spec.get("head", "gap"), widths=tuple(spec.get("widths", (16, 32, 64))),
                      depth=spec.get("depth", 2))
    if spec.get("blank0"):
        make_blank_preserving(m)
    if "pool" in spec:
        m.head = MapHead(m.num_features, 10, spec["pool"], bias=spec.get("bias", True))
    return m

# ---------------------------------------------------------------- augmentation
def augment(spec, x, g):
    aug = spec.get("aug", "none")
    if aug == "none":
        return x
    if aug == "shift":
        return data.random_shift(x, spec.get("shift", 2), g)
    if aug == "canvas":
        lo, hi = spec.get("canvas", (28, 56))
        sc = spec.get("scale")
        if sc:  # one digit size per batch
            s = int(torch.randint(sc[0], sc[1] + 1, (1,), generator=g))
            x = data.rescale(x, s)
            lo = max(lo, s)
            hi = max(hi, lo)
        return data.random_canvas(x, lo, hi, g)[0]
    raise ValueError(aug)

# ---------------------------------------------------------------- train / eval
def run(spec, threads=2, quiet=False):
    torch.set_num_threads(threads)
    torch.manual_seed(spec.get("seed", 0))
    model = build(spec)
    cfg = TrainConfig(lr=spec.get("lr", 3e-3), epochs=spec.get("epochs", 6), schedule=spec.get("schedule", "onecycle"),
                      warmup=spec.get("warmup", 0.2), weight_decay=spec.get("wd", 5e-2))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=cfg.lr)
    tr = DS.train
    if spec.get("train_size"):
        tr = data.stratified_subset(tr, spec["train_size"], seed=0)
    n, bs = len(tr), spec.get("bs", 128)
    steps = -(-n // bs)
    total = cfg.epochs * steps
    step = 0
    t0 = time.perf_counter()
    model.train()
    for e in range(cfg.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + e))
        for k in range(steps):
            idx = order[k * bs:(k + 1) * bs]
            g = torch.Generator().manual_seed(e * 10000 + k)
            x = augment(spec, tr.images[idx], g)
            y = tr.labels[idx]
            for grp in opt.param_groups:
                grp["lr"] = lr_at(cfg, step, total)
            loss = F.cross_entropy(model(x), y, label_smoothing=spec.get("ls", 0.0))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    secs = time.perf_counter() - t0
    res = {"name": spec.get("name", ""), "spec": {k: v for k, v in spec.items() if k != "name"},
           "train_s": round(secs, 1), "epoch_s": round(secs / cfg.epochs, 2),
           "head_params": sum(p.numel() for p in model.head.parameters())}
    if hasattr(model.head, "r"):
        res["lse_r"] = round(float(model.head.r), 2)
    if hasattr(model.head, "global_pool") and hasattr(model.head.global_pool, "p") and isinstance(model.head.global_pool.p, torch.Tensor):
        res["gem_p"] = round(float(model.head.global_pool.p), 2)
    res.update(evaluate_all(model, spec.get("eval", "full")))
    res["eval_s"] = round(time.perf_counter() - t0 - secs, 1)
    import os, re
    os.makedirs("runs/research/models", exist_ok=True)
    fn = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.get("name", "model"))
    torch.save({"spec": spec, "state": model.state_dict()}, f"runs/research/models/{fn}.pt")
    if not quiet:
        print(json.dumps(res), flush=True)
    return res, model

def load(path):
    """A model `run` saved (runs/research/models/*.pt), rebuilt from its spec, in eval mode."""
    ck = torch.load(path)
    model = build(ck["spec"])
    model.load_state_dict(ck["state"])
    return model.eval()

@torch.no_grad()
def acc(model, x, y, bs=250):
    model.eval()
    c = 0
    for i in range(0, len(x), bs):
        c += (model(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum().item()
    return round(100 * c / len(x), 1)

def evaluate_all(model, which="full"):
    out = {"t28": acc(model, DS.test.images, DS.test.labels)}
    if which == "plain":
        return out
    for S in (28, 40, 56, 84, 112):
        out[f"c{S}"] = acc(model, *canvas_set(S))
    if which in ("full", "full224"):
        for s in (20, 36, 48, 64):
            out[f"r{s}"] = acc(model, data.rescale(DS.test.images, s), DS.test.labels)
    if which == "full224":
        c, _ = data.canvas_mnist(224, n=500)
        out["c224_n500"] = acc(model, c.images, c.labels, bs=50)
    return out

if __name__ == "__main__":
    specs = json.loads(sys.argv[1])
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    log = sys.argv[3] if len(sys.argv) > 3 else "runs/research/results.jsonl"
    for spec in specs if isinstance(specs, list) else [specs]:
        res, _ = run(spec, threads)
        with open(log, "a") as f:
            f.write(json.dumps(res) + "\n")
