"""Time gapnet's pooling ops against PyTorch on the labelled shapes of `shapes.py`.

GPU (``--device cuda``): gapnet (backend "auto": the Triton kernels), PyTorch eager and
``torch.compile`` of the same PyTorch code, fp32 and bf16, NCHW and channels_last, forward and
backward; medians of ``triton.testing.do_bench`` (which flushes L2 between runs), also timed as
CUDA-graph replays for inputs under 32 MiB, where launch overhead dominates; each time as a
fraction of the bytes-moved floor at the measured copy bandwidth; peak memory of max pool
forward+backward; and a NiN training step with gapnet's kernels vs PyTorch's pooling.

CPU (``--device cpu``): gapnet (backend "auto"), PyTorch eager, ``torch.compile`` of PyTorch's
op and ``torch.compile`` of gapnet's op, and for max pools gapnet with its compiled CPU kernels
off (``GAPNET_CPU_KERNELS=0``: the strided-view path), with the same threads, fp32, NCHW and
channels_last, forward and forward+backward, median wall time of runs interleaved with each
other (see `cpu_times`), and gapnet's time as a fraction of the bytes-moved floor at the
measured CPU copy bandwidth (`cpu_copy_bandwidth`). The peer to beat is the faster of eager
and compile.

Prints one table last and appends it to ``benchmarks/RESULTS.md`` with the device, versions,
date and git revision. Inputs are random normal (never zeros).

    PYTHONPATH=. python benchmarks/bench_ops.py --device cuda   # on a GPU machine
    .venv/bin/python benchmarks/bench_ops.py --device cpu        # here
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import CPU_CASES, GPU_CASES, Case

import gapnet.functional as GF
from gapnet import _cpu_kernels as cpu_kernels

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MiB = 1 << 20


# ----------------------------------------------------------------------------- the ops


def pytorch_op(case: Case, x: torch.Tensor, extra: dict) -> torch.Tensor:
    """What a PyTorch user writes for this op (timm's formulas for the global kinds)."""
    a = case.args
    if case.op == "global_pool2d":
        kind = a["kind"]
        if kind == "avg":
            return x.mean((2, 3))
        if kind == "catavgmax":
            return torch.cat((x.mean((2, 3)), F.adaptive_max_pool2d(x, 1).flatten(1)), 1)
        if kind == "gem":
            p = extra.get("p", 3.0)
            return x.clamp(min=1e-6).pow(p).mean((2, 3)).pow(1.0 / p)
        raise ValueError(kind)
    if case.op == "gap_linear":
        return F.linear(x.mean((2, 3)), extra["weight"], extra["bias"])
    if case.op == "max_pool2d":
        return F.max_pool2d(x, a["kernel_size"], a.get("stride"), a.get("padding", 0))
    if case.op == "avg_pool2d":
        if a.get("padding") == "same":  # PyTorch has no asymmetric "same": gapnet's torch path
            return GF.avg_pool2d(x, a["kernel_size"], a["stride"], "same", backend="torch")
        return F.avg_pool2d(
            x, a["kernel_size"], a.get("stride"), a.get("padding", 0),
            count_include_pad=a.get("count_include_pad", True),
        )  # fmt: skip
    raise ValueError(case.op)


def gapnet_op(case: Case, x: torch.Tensor, extra: dict) -> torch.Tensor:
    a = dict(case.args)
    if case.op == "gap_linear":
        return GF.gap_linear(x, extra["weight"], extra["bias"])
    a.pop("num_classes", None)
    if a.pop("learnable_p", False):
        a["p"] = extra["p"]
    return getattr(GF, case.op)(x, **a)


def make_input(case: Case, dtype: torch.dtype, channels_last: bool, device: str):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(case.shape, generator=gen, device=device, dtype=torch.float32)
    if case.args.get("kind") == "gem":
        x = x.abs()
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    extra = {}
    if case.op == "gap_linear":
        k, c = case.args["num_classes"], case.shape[1]
        extra["weight"] = torch.randn(k, c, generator=gen, device=device).to(dtype) / c**0.5
        extra["bias"] = torch.randn(k, generator=gen, device=device).to(dtype)
    if case.args.get("learnable_p"):  # GeM's p as gapnet.nn.GeM and timm train it
        extra["p"] = torch.tensor(3.0, device=device, requires_grad=True)
    return x, extra


def floor_bytes(case: Case, x: torch.Tensor, y: torch.Tensor, backward: bool) -> int:
    """Bytes that must move: each input read once, each output written once."""
    moved = x.numel() * x.element_size() + y.numel() * y.element_size()
    if case.op == "max_pool2d":
        moved += y.numel()  # the one byte per output the backward needs
    if backward and case.args.get("kind") == "gem":
        moved += x.numel() * x.element_size()  # the gradient reads x too
    return moved


def grad_inputs(xg: torch.Tensor, extra: dict) -> tuple[torch.Tensor, ...]:
    """What a backward differentiates: the input, and GeM's p where it is learnt."""
    return (xg, extra["p"]) if "p" in extra else (xg,)


# ----------------------------------------------------------------------------- timing


def cpu_times(fns: dict[str, Callable[[], object]], budget: float = 2.0) -> dict[str, float]:
    """Median seconds of each fn, the fns called in turn within one loop of about `budget`.

    Interleaving matters on a shared VM: its speed drifts by 2x or more over seconds, and
    timing one implementation after the other would credit the drift to one of them.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    order = list(fns.items())
    while rounds < 8 or (time.perf_counter() - start < budget and rounds < 200):
        for name, fn in order if rounds % 2 else order[::-1]:  # ABBA: no one always goes first
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(ts) for name, ts in times.items()}


def gpu_time(fn: Callable[[], object], graph: bool) -> float:
    from triton.testing import do_bench, do_bench_cudagraph

    if graph:
        return do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e-3
    return do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e-3


def cpu_copy_bandwidth() -> float:
    """Bytes per second of a 256 MiB CPU copy with PyTorch's threads, reads and writes counted
    (median of interleaved-style repeats: the VM is shared)."""
    src = torch.randn(64 * MiB)
    dst = torch.empty_like(src)
    seconds = cpu_times({"copy": lambda: dst.copy_(src)}, budget=1.0)["copy"]
    return 2 * src.numel() * src.element_size() / seconds


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting reads and writes."""
    src = torch.randn(256 * MiB, device="cuda")
    dst = torch.empty_like(src)
    seconds = gpu_time(lambda: dst.copy_(src), graph=False)
    return 2 * src.numel() * src.element_size() / seconds


# ----------------------------------------------------------------------------- one row


def time_impl(case, op, x, extra, device, bandwidth) -> dict:
    """Forward and backward times of one implementation (and, on GPU, floors and memory)."""
    out: dict = {}
    xg = x.detach().requires_grad_(True)
    y = op(case, xg, extra)
    g = torch.randn_like(y)

    def fwd() -> object:
        return op(case, x, extra)

    with torch.no_grad():
        out["fwd"] = gpu_time(fwd, graph=False)
        if x.numel() * x.element_size() < 32 * MiB:  # launch-bound: also the GPU time alone
            out["fwd graph"] = gpu_time(fwd, graph=True)
    wrt = grad_inputs(xg, extra)
    out["bwd"] = gpu_time(lambda: torch.autograd.grad(y, wrt, g, retain_graph=True), graph=False)
    for part in ("fwd", "bwd"):
        out[f"{part} frac"] = floor_bytes(case, x, y, part == "bwd") / bandwidth / out[part]
    if case.op == "max_pool2d":
        del y
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        op(case, xg, extra).backward(g)
        out["peak MiB"] = (torch.cuda.max_memory_allocated() - base) / MiB
    return out


NO_C = "gapnet no C"  # gapnet with its compiled CPU kernels off: the strided-view path


def without_compiled(fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with GAPNET_CPU_KERNELS=0 (forward and backward both inside)."""

    def run() -> object:
        old = os.environ.get(cpu_kernels.ENV_SWITCH)
        os.environ[cpu_kernels.ENV_SWITCH] = "0"
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[cpu_kernels.ENV_SWITCH]
            else:
                os.environ[cpu_kernels.ENV_SWITCH] = old

    return run


def cpu_row(case: Case, impls: dict, x: torch.Tensor, extra: dict) -> dict:
    """CPU forward and forward+backward medians of every implementation, timed interleaved."""
    xg = x.detach().requires_grad_(True)
    y = pytorch_op(case, x, extra)
    g = torch.randn_like(y)
    fwd = {name: (lambda op=op: op(case, x, extra)) for name, op in impls.items()}
    both = {
        name: (lambda op=op: torch.autograd.grad(op(case, xg, extra), grad_inputs(xg, extra), g))
        for name, op in impls.items()
    }
    for fns in (fwd, both):
        if NO_C in fns:
            fns[NO_C] = without_compiled(fns[NO_C])
    row = {}
    for part, fns in (("fwd", fwd), ("fwd+bwd", both)):
        for name, seconds in cpu_times(fns).items():
            row[f"{name} {part}"] = seconds
    forward = floor_bytes(case, x, y, backward=False)
    row["floor fwd"] = forward
    row["floor fwd+bwd"] = forward + floor_bytes(case, x, y, backward=True)  # + gy in, gx out
    return row


def compiled(case: Case, op: Callable) -> Callable:
    """torch.compile (Inductor, static shapes) of `op` on this case, as a bench impl."""
    fn = torch.compile(lambda x, e: op(case, x, e), dynamic=False)
    return lambda case, x, e: fn(x, e)


def run_row(case, dtype, channels_last, device, bandwidth, compile_too) -> dict:
    x, extra = make_input(case, dtype, channels_last, device)
    row = {
        "label": case.label, "op": case.op, "shape": "x".join(map(str, case.shape)),
        "dtype": str(dtype)[6:], "layout": "CL" if channels_last else "NCHW",
    }  # fmt: skip
    impls = {"gapnet": gapnet_op, "eager": pytorch_op}
    if device == "cpu":
        if case.op == "max_pool2d":  # the op the compiled kernels serve
            impls[NO_C] = gapnet_op
        if compile_too:
            torch._dynamo.reset()  # every row compiles afresh, within the cache's limits
            impls["compile"] = compiled(case, pytorch_op)
            impls["compile gapnet"] = compiled(case, gapnet_op)
        row.update(cpu_row(case, impls, x, extra))
        return row
    if compile_too:
        impls["compile"] = compiled(case, pytorch_op)
    for name, op in impls.items():
        for key, value in time_impl(case, op, x, extra, device, bandwidth).items():
            row[f"{name} {key}"] = value
    return row


def nin_step_ratio() -> str:
    """A NiN training step (batch 512, 32x32, bf16 autocast, channels_last): torch vs gapnet."""
    from gapnet.models import create

    model = create("nin", num_classes=10).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, 3, 32, 32, device="cuda", generator=gen)
    x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (512,), device="cuda", generator=gen)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = {}
    for backend in ("torch", "auto"):
        with GF.use_backend(backend):
            times[backend] = gpu_time(step, graph=False)
    ratio = times["torch"] / times["auto"]
    return (
        f"NiN training step (batch 512, 32x32, bf16 autocast, channels_last, SGD): "
        f"PyTorch pooling {times['torch'] * 1e3:.3f} ms, gapnet kernels "
        f"{times['auto'] * 1e3:.3f} ms: {ratio:.2f}x"
    )


# ----------------------------------------------------------------------------- per-call cost


def call_overhead(device: str) -> str:
    """Wall time per call on a tiny input, gapnet vs PyTorch, where the Python around the
    kernel is the whole cost: "hot" back to back, "cold" each call right after a 64 MiB sweep
    that evicts the CPU caches, as a pooling layer meets them between the big layers of a
    network (on a GPU: the host's side of a launch)."""
    x = torch.randn(1, 8, 8, 8, device=device)
    xcl = x.contiguous(memory_format=torch.channels_last)
    ops = {  # name: (gapnet, PyTorch)
        "max_pool2d 3x3 s2, channels_last": (
            lambda: GF.max_pool2d(xcl, 3, 2, 1), lambda: F.max_pool2d(xcl, 3, 2, 1)
        ),
        "avg_pool2d 2x2, channels_last": (
            lambda: GF.avg_pool2d(xcl, 2), lambda: F.avg_pool2d(xcl, 2)
        ),
        "global avg pool, NCHW": (lambda: GF.global_pool2d(x), lambda: x.mean((2, 3))),
    }  # fmt: skip
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sweep = torch.empty(16 * MiB)  # 64 MiB of float32 on the host

    def hot(fn: Callable[[], object], calls: int = 100) -> Callable[[], None]:
        def run() -> None:
            for _ in range(calls):
                fn()
            sync()

        return run

    def cold_times(fns: dict[str, Callable[[], object]], rounds: int = 300) -> dict:
        times: dict[str, list[float]] = {name: [] for name in fns}
        order = list(fns.items())
        for i in range(rounds):
            for name, fn in order if i % 2 else order[::-1]:
                sweep.mul_(1.0)
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
        return {name: statistics.median(ts) for name, ts in times.items()}

    head = ["op (1x8x8x8 input)", "gapnet hot us", "torch hot us", "gapnet cold us",
            "torch cold us"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, (mine, theirs) in ops.items():
        hot_s = cpu_times({"gapnet": hot(mine), "torch": hot(theirs)}, budget=1.0)
        cold_s = cold_times({"gapnet": mine, "torch": theirs})
        cells = [hot_s["gapnet"] / 100, hot_s["torch"] / 100, cold_s["gapnet"], cold_s["torch"]]
        lines.append(f"| {name} | " + " | ".join(f"{t * 1e6:.1f}" for t in cells) + " |")
    return "Per-call cost on a tiny input (`call_overhead`):\n\n" + "\n".join(lines)


# ----------------------------------------------------------------------------- the table


CPU_IMPLS = ("gapnet", "eager", "compile", "compile gapnet", NO_C)


def cpu_lines(rows: list[dict], bandwidth: float) -> list[list[str]]:
    """One line per row and pass: ms of each impl, gapnet vs the faster peer, floor fractions
    (of gapnet, and of gapnet without its compiled kernels where that was timed)."""
    lines = []
    for r in rows:
        for part in ("fwd", "fwd+bwd"):
            times = [r.get(f"{name} {part}") for name in CPU_IMPLS]
            peer = min(t for t in times[1:3] if t is not None)
            best_gapnet = min(t for t in (times[0], times[3]) if t is not None)
            floor = r[f"floor {part}"] / bandwidth
            no_c = "-" if times[4] is None else f"{floor / times[4]:.2f}"
            lines.append([
                r["label"], r["shape"], r["layout"], part,
                *("-" if t is None else f"{t * 1e3:.3f}" for t in times),
                f"{peer / times[0]:.2f}x", f"{peer / best_gapnet:.2f}x",
                f"{floor / times[0]:.2f}", no_c,
            ])  # fmt: skip
    return lines


def format_table(rows: list[dict], device: str, bandwidth: float | None = None) -> str:
    if device == "cpu":
        assert bandwidth is not None
        head = ["case", "shape", "layout", "pass", "gapnet ms", "eager ms", "compile ms",
                "compile(gapnet) ms", "gapnet no C ms", "gapnet vs peer",
                "best gapnet vs peer", "gapnet / floor", "no C / floor"]  # fmt: skip
        lines = cpu_lines(rows, bandwidth)
    else:
        head = ["case", "dtype", "layout", "pass", "gapnet us (floor)", "eager us (floor)",
                "compile us (floor)", "vs eager", "vs compile", "graph us g/e/c"]  # fmt: skip
        lines = []
        for r in rows:
            for part in ("fwd", "bwd"):
                cells = []
                for name in ("gapnet", "eager", "compile"):
                    t = r.get(f"{name} {part}")
                    frac = r.get(f"{name} {part} frac")
                    cells.append("-" if t is None else f"{t * 1e6:.1f} ({frac:.2f})")
                vs_e = r["eager " + part] / r["gapnet " + part]
                vs_c = r.get("compile " + part, float("nan")) / r["gapnet " + part]
                graph = "-"
                if part == "fwd" and "gapnet fwd graph" in r:
                    graph = "/".join(
                        f"{r.get(n + ' fwd graph', float('nan')) * 1e6:.1f}"
                        for n in ("gapnet", "eager", "compile")
                    )
                lines.append([r["label"], r["dtype"], r["layout"], part, *cells,
                              f"{vs_e:.2f}x", f"{vs_c:.2f}x", graph])  # fmt: skip
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(table)


def environment(device: str, bandwidth: float | None) -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "gapnet"], capture_output=True,
                               text=True).stdout.strip()  # fmt: skip
        rev += " (+ uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    if device == "cuda":
        import triton

        name = torch.cuda.get_device_name()
        versions = f"torch {torch.__version__}, triton {triton.__version__}"
        extra = f", copy bandwidth {bandwidth / 1e12:.2f} TB/s" if bandwidth else ""
    else:
        from gapnet.compare import machine_info

        name = machine_info()["cpu"]
        versions = f"torch {torch.__version__}"
        extra = f", {torch.get_num_threads()} threads, {os.cpu_count()} cores"
        if bandwidth:
            extra += f", copy bandwidth {bandwidth / 1e9:.1f} GB/s (read+write)"
    date = datetime.date.today().isoformat()
    return f"{name}; {versions}; {date}; git {rev}{extra}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--only", default="", help="run cases whose label contains this")
    parser.add_argument("--op", default="", help="run cases of this op (e.g. max_pool2d)")
    parser.add_argument("--no-save", action="store_true", help="don't append to RESULTS.md")
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU here")
    cases = [
        c
        for c in (GPU_CASES if device == "cuda" else CPU_CASES)
        if args.only in c.label and args.op in ("", c.op)
    ]
    dtypes = (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,)
    bandwidth = copy_bandwidth() if device == "cuda" else cpu_copy_bandwidth()
    rows = []
    for case in cases:
        for dtype in dtypes:
            for channels_last in (False, True):
                try:
                    row = run_row(case, dtype, channels_last, device, bandwidth,
                                  not args.no_compile)  # fmt: skip
                except Exception as error:  # one broken row must not lose the table
                    print(f"FAILED {case.label} {dtype} cl={channels_last}: {error!r}")
                    continue
                rows.append(row)
                print("done", case.label, str(dtype)[6:], row["layout"], flush=True)
    notes = [nin_step_ratio()] if device == "cuda" else []
    if not (args.only or args.op):
        notes.append(call_overhead(device))
    if device == "cuda":
        for r in rows:
            if "gapnet peak MiB" in r:
                notes.append(
                    f"peak memory, max pool fwd+bwd, {r['label']} {r['dtype']} {r['layout']}: "
                    f"gapnet {r['gapnet peak MiB']:.0f} MiB, eager {r['eager peak MiB']:.0f} MiB"
                )
    title = f"{device.upper()} pooling ops: {environment(device, bandwidth)}"
    publish(title, [format_table(rows, device, bandwidth), *notes], save=not args.no_save)


def publish(title: str, blocks: list[str], save: bool) -> None:
    """Print a result section (title, the command that made it, blocks) last; with `save`,
    append it to RESULTS.md."""
    command = f"`{shlex.join(['python', os.path.relpath(sys.argv[0]), *sys.argv[1:]])}`"
    text = "\n\n".join([f"## {title}", command, *blocks]) + "\n"
    print()
    print(text)
    if save:
        with RESULTS.open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
