import sys, torch
sys.path.insert(0, "docs/research")
import harness as H
torch.set_num_threads(1)
for path in sys.argv[1:]:
    m = H.load(path)
    with torch.no_grad():
        f = m.forward_features(torch.zeros(1, 1, 112, 112))[0]  # (C, 28, 28)
        inner = f[:, 14, 14]
        print(path.split("/")[-1], "background channels exactly 0:", int((inner == 0).sum()), "of", len(inner),
              "; nonzero ones:", [round(v, 2) for v in inner[inner > 0].tolist()])
        lg = {S: m(torch.zeros(1, 1, S, S))[0] for S in (28, 112, 448)}
        print("   blank-canvas logit spread (max-min over classes):", {S: round((v.max() - v.min()).item(), 2) for S, v in lg.items()})
        x = H.DS.test.images[:500]
        top2 = m(x).topk(2, 1).values
        print("   median top1-top2 margin on 28x28 test digits:", round((top2[:, 0] - top2[:, 1]).median().item(), 2))
