"""What a GAP head says about blank background: class maps of an all-zero canvas."""
import sys, torch
sys.path.insert(0, "docs/research")
import harness as H
torch.set_num_threads(1)
for path in sys.argv[1:]:
    m = H.load(path)
    with torch.no_grad():
        maps = m.class_maps(torch.zeros(1, 1, 112, 112))[0]  # (K, 28, 28)
        if hasattr(m.head, "fc"):
            maps = maps + m.head.fc.bias[:, None, None]
        inner = maps[:, 14, 14]
        border = maps[:, 0, 14]
        corner = maps[:, 0, 0]
        # mean logit on a real digit at 28 (the digit term), for comparison
        x = H.DS.test.images[:500]
        logits = m(x)
        top2 = logits.topk(2, 1).values
        margin = (top2[:, 0] - top2[:, 1]).median()
        spread = lambda v: (v.max() - v.min()).item()
        print(path.split("/")[-1], f"interior bg map spread over classes {spread(inner):.2f} (argmax {inner.argmax().item()}),"
              f" edge {spread(border):.2f}, corner {spread(corner):.2f}; median top1-top2 logit margin at 28: {margin:.2f}")
        # prediction for a blank canvas of each size
        print("   blank canvas predicted class by size:", {S: m(torch.zeros(1, 1, S, S)).argmax().item() for S in (28, 56, 112)})
        # how many interior cells are exactly equal to the interior value
        eq = (maps - inner[:, None, None]).abs().amax(0) < 1e-4
        print("   cells equal to interior value:", eq.sum().item(), "of", eq.numel())
