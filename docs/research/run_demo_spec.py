"""The real `gapnet demo` pipeline (compare.run_compare + report.write_report) with the recommended spec.
Usage: PYTHONPATH=. python docs/research/run_demo_spec.py THREADS OUTDIR [heads]"""
import json, sys, time
from gapnet import compare, report
threads, out = int(sys.argv[1]), sys.argv[2]
heads = tuple(sys.argv[3].split(",")) if len(sys.argv) > 3 else ("fc", "fc-dropout", "gap", "gap-fc", "gmp", "gem")
spec = compare.DEMO.spec.replace(
    heads=heads, epochs=12, lr=5e-3, threads=threads,
    train={"model_overrides": {"widths": [16, 32, 64]}, "label_smoothing": 0.1,
           "augmentation": "shift", "shift": 1},
    robust={"augmentation": "canvas", "canvas_size": [28, 40], "epochs": 10, "label_smoothing": 0.0},
    robust_head="gem",
)
t = time.perf_counter()
results = compare.run_compare(spec, out, progress=False)
report.write_report(results, out)
total = time.perf_counter() - t
print(json.dumps({"total_s": round(total, 1), "threads": threads, "heads": heads}))
for r in results["runs"]:
    print(json.dumps({k: r.get(k) for k in ("name", "train_seconds", "test_acc")}
                     | {"canvases": [c.get("acc") for c in r.get("canvases") or []]}))
print(json.dumps(results.get("sweep")))
c = results.get("cam") or {}
print(json.dumps({k: c.get(k) for k in ("model", "threshold")} | {"rows": c.get("rows")}))
