"""Training throughput (images/s): gapnet's pooling against PyTorch's, in the models gapnet trains.

One optimizer step (forward, cross-entropy, backward, AdamW) of NiN on 32x32 RGB images and of
the MNIST backbone (``convnet``, 32-64-128, on 28x28 gray) with a global-pooling head, timed
with gapnet's pooling (``backend="auto"``: strided CPU paths, Triton kernels on CUDA) and with
PyTorch's own ops (``gapnet.use_backend("torch")``), interleaved step by step in alternating
order (on CPU) so that the machine's drift falls on both; fp32 and bf16 autocast. Inputs are
random (never zeros), the same for both. Appends its table to ``benchmarks/RESULTS.md`` unless
``--no-save``.

    .venv/bin/python benchmarks/bench_train.py              # CPU
    PYTHONPATH=. python benchmarks/bench_train.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ops import cpu_times, environment, gpu_time, publish

import gapnet
from gapnet.models import create

# (label, model name, head, input channels, side, batch on CPU, batch on CUDA)
MODELS = [
    ("NiN, 32x32 RGB", "nin", "gap", 3, 32, 64, 512),
    ("convnet 32-64-128, 28x28 gray", "convnet", "gap", 1, 28, 128, 1024),
    ("convnet 32-64-128 + gem head, 28x28 gray", "convnet", "gem", 1, 28, 128, 1024),
]
BACKENDS = ("torch", "auto")  # PyTorch's pooling, gapnet's


def training_step(
    name: str, head: str, chans: int, side: int, batch: int, device: str, bf16: bool
) -> Callable[[], None]:
    """One optimizer step on a fixed random batch, as `gapnet.train` takes it."""
    torch.manual_seed(0)
    model = create(name, head=head, in_chans=chans, num_classes=10).to(device)
    fmt = torch.channels_last if device == "cuda" else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.rand(batch, chans, side, side, device=device, generator=gen).contiguous(
        memory_format=fmt
    )
    y = torch.randint(0, 10, (batch,), device=device, generator=gen)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def with_backend(backend: str, fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with gapnet.use_backend(backend):
            fn()

    return run


def measure(device: str, budget: float) -> list[list[str]]:
    rows = []
    for label, name, head, chans, side, cpu_batch, cuda_batch in MODELS:
        batch = cuda_batch if device == "cuda" else cpu_batch
        for bf16 in (False, True):
            # each backend trains its own copy, so both start from the same weights
            steps = {
                b: with_backend(b, training_step(name, head, chans, side, batch, device, bf16))
                for b in BACKENDS
            }
            if device == "cuda":
                seconds = {b: gpu_time(fn, graph=False) for b, fn in steps.items()}
            else:
                seconds = cpu_times(steps, budget=budget)
            ips = {b: batch / s for b, s in seconds.items()}
            rows.append([
                label, "bf16 autocast" if bf16 else "fp32", str(batch),
                f"{ips['torch']:,.0f}", f"{ips['auto']:,.0f}",
                f"{ips['auto'] / ips['torch']:.2f}x",
            ])  # fmt: skip
            print(" | ".join(rows[-1]), file=sys.stderr)
    return rows


def markdown(rows: list[list[str]]) -> str:
    header = [
        "model",
        "precision",
        "batch",
        "PyTorch pooling img/s",
        "gapnet img/s",
        "gapnet/PyTorch",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--budget", type=float, default=6.0, help="CPU seconds per row")
    parser.add_argument("--no-save", action="store_true", help="do not append to RESULTS.md")
    a = parser.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here")
    rows = measure(a.device, a.budget)
    note = (
        "Images per second of one training step (forward, backward, AdamW), median over "
        "interleaved steps; the ratio > 1 means gapnet's pooling trains faster."
    )
    title = f"Training throughput, {a.device.upper()}"
    publish(title, [environment(a.device, None), note, markdown(rows)], save=not a.no_save)


if __name__ == "__main__":
    main()
