"""gapnet._cpu_kernels (compiled C max pooling on NCHW CPU tensors) against PyTorch and the spec.

Values and indices must equal PyTorch's bit for bit (float32 and float64); the backward must
equal scatter_add's in the same order (deterministic). Outputs are poisoned (NaN, or a
nonsense index) before the kernel runs, so an element it forgets to write shows. The fallback
(no compiler) runs in a fresh interpreter with CC pointing at a program that does not exist
and an empty cache, and must give the same answers through `gapnet.functional`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import MAX_POOL_CASES, Case

import gapnet.functional as GF
import gapnet.nn as gnn
from gapnet import _cpu_kernels as cpu_kernels
from gapnet import reference
from gapnet._shapes import window2d

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(), reason=f"no compiled kernels: {cpu_kernels.why_unavailable()}"
)

# Rows for what is particular to the C: its unrolled window kernels (2x2 s2, 3x3 s2, 3x3 s1)
# take the interior of a row, the tap-by-tap loops the border and every other window.
KERNEL_CASES = [
    # ResNet's stem pool on an even size: the unrolled 3x3 s2 kernel, a left border of one
    Case((16, 16), {"kernel_size": 3, "stride": 2, "padding": 1}),
    # the same on an odd size: the last window ends on the last column
    Case((17, 15), {"kernel_size": 3, "stride": 2, "padding": 1}),
    # 3x3 stride 1 padding 1: borders on both sides of every row
    Case((9, 13), {"kernel_size": 3, "stride": 1, "padding": 1}),
    # 2x2 stride 2 on odd sizes: the unrolled kernel, the last row and column dropped
    Case((31, 29), {"kernel_size": 2, "stride": 2}),
    # 2x2 stride 2 with ceil_mode: a last partial window on each axis (tap by tap)
    Case((7, 9), {"kernel_size": 2, "stride": 2, "ceil_mode": True}),
    # an unrolled kernel with dilation: row and column taps two apart
    Case((12, 14), {"kernel_size": 3, "stride": 2, "padding": 1, "dilation": 2}),
    # row stride 3 under a 3x3 s(3, 2) kernel: only the column stride picks the unrolled kernel
    Case((13, 12), {"kernel_size": 3, "stride": (3, 2), "padding": 1}),
    # "same" with an even kernel: asymmetric padding (all after), tap by tap
    Case((9, 10), {"kernel_size": 2, "stride": 1, "padding": "same"}),
    # "same" 3x3 stride 2 on an even size: the odd padding cell bottom/right only
    Case((10, 12), {"kernel_size": 3, "stride": 2, "padding": "same"}),
    # a wide kernel (5x4), stride 3: no unrolled kernel, gaps between windows
    Case((14, 15), {"kernel_size": (5, 4), "stride": 3, "padding": (2, 1)}),
    # rows shorter than a vector: 3 outputs per row
    Case((6, 6), {"kernel_size": 2, "stride": 2}),
    # a single output row and column
    Case((3, 3), {"kernel_size": 3}),
    # a long row, 1000 columns: many vectors per row, several rows per work item
    Case((5, 1001), {"kernel_size": 3, "stride": 2, "padding": 1}),
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _input(shape, seed: int, dtype: torch.dtype, ties: bool = False) -> torch.Tensor:
    """Fresh random input; with ties, few distinct values (many equal maxima per window)."""
    if ties:
        return torch.randint(-2, 3, shape, generator=_gen(seed)).to(dtype)
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


def _torch_reference(x: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's values and indices; "same" as an explicitly -inf-padded F.max_pool2d."""
    kw = {k: (0 if v == "valid" else v) for k, v in kwargs.items()}
    if kw.get("padding") != "same":
        return F.max_pool2d(x, **kw, return_indices=True)
    win = window2d("max_pool2d", x.shape[-2:], **kwargs)
    (top, left), (bottom, right) = win.pad_before, win.pad_after
    padded = F.pad(x, (left, right, top, bottom), value=-math.inf)
    y, idx = F.max_pool2d(padded, win.kernel, win.stride, 0, win.dilation, return_indices=True)
    wp, w = padded.shape[-1], x.shape[-1]
    return y, (idx // wp - top) * w + (idx % wp - left)


def _run(x: torch.Tensor, kwargs: dict, indices: bool = True):
    """The kernel's outputs, from poisoned buffers."""
    win = window2d("max_pool2d", x.shape[-2:], **kwargs)
    shape = (*x.shape[:2], *win.out_size)
    y = torch.full(shape, math.nan, dtype=x.dtype)
    idx = torch.full(shape, -77, dtype=torch.int64) if indices else None
    cpu_kernels.max_pool2d(x, win, y, idx)
    return win, y, idx


def check(x: torch.Tensor, kwargs: dict, seed: int = 0) -> None:
    """Values, indices and the backward against PyTorch; values alone too."""
    win, y, idx = _run(x, kwargs)
    y_ref, idx_ref = _torch_reference(x, kwargs)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(_run(x, kwargs, False)[1], y_ref, rtol=0, atol=0, equal_nan=True)
    gy = torch.randn(y.shape, generator=_gen(seed + 1), dtype=torch.float64).to(x.dtype)
    gx = torch.full(x.shape, math.nan, dtype=x.dtype)
    cpu_kernels.max_pool2d_backward(gy, idx, win, gx)
    n, c, h, w = x.shape
    expect = torch.zeros(n * c, h * w, dtype=x.dtype)  # scatter_add: each plane in order
    expect.scatter_add_(1, idx_ref.reshape(n * c, -1), gy.reshape(n * c, -1))
    assert torch.equal(gx, expect.view(x.shape))


DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", MAX_POOL_CASES + KERNEL_CASES, ids=str)
def test_cases(case: Case, dtype: torch.dtype) -> None:
    check(_input((2, 3, *case.hw), 1, dtype), case.kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", MAX_POOL_CASES + KERNEL_CASES, ids=str)
def test_ties_go_to_the_first_maximum(case: Case, dtype: torch.dtype) -> None:
    check(_input((2, 3, *case.hw), 2, dtype, ties=True), case.kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kwargs", [
    {"kernel_size": 3, "stride": 2, "padding": 1},  # unrolled interior, border tap by tap
    {"kernel_size": 3, "stride": 1, "padding": 1},  # every cell in 9 windows
    {"kernel_size": 2, "stride": 2},  # disjoint windows
    {"kernel_size": (2, 3), "stride": 1, "padding": "same", "dilation": 2},  # generic
])  # fmt: skip
def test_nan_and_inf(kwargs: dict, dtype: torch.dtype) -> None:
    """NaN (the output is NaN, its index the last NaN), +-inf and ties, against PyTorch."""
    x = _input((2, 3, 19, 18), 5, dtype, ties=True)
    g = _gen(6)
    for value, p in ((math.nan, 0.05), (math.inf, 0.05), (-math.inf, 0.1)):
        x[torch.rand(x.shape, generator=g) < p] = value
    check(x, kwargs)


def test_windows_of_minus_inf_choose_their_first_real_cell() -> None:
    x = torch.full((1, 2, 9, 9), -math.inf)
    for kwargs in ({"kernel_size": 3, "stride": 1, "padding": 1}, {"kernel_size": 2}):
        check(x, kwargs)


def test_matches_the_reference_in_float64() -> None:
    x = _input((2, 4, 11, 13), 7, torch.float64)
    for case in KERNEL_CASES[:6]:
        _, y, _ = _run(x, case.kwargs)
        expect = reference.max_pool2d(x.numpy(), **case.kwargs)
        np.testing.assert_array_equal(y.numpy(), expect)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_give_the_same_answer(threads: int) -> None:
    """Work is shared out by output rows and planes; any thread count, the same bits."""
    x = _input((3, 5, 64, 70), 8, torch.float32, ties=True)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        check(x, {"kernel_size": 3, "stride": 2, "padding": 1})
    finally:
        torch.set_num_threads(old)


def test_empty_batch_and_argument_checks() -> None:
    win = window2d("max_pool2d", (8, 8), 2)
    x = torch.empty(0, 3, 8, 8)
    cpu_kernels.max_pool2d(x, win, torch.empty(0, 3, 4, 4), None)  # nothing to do
    with pytest.raises(ValueError, match="y must be"):
        cpu_kernels.max_pool2d(torch.randn(1, 3, 8, 8), win, torch.empty(1, 3, 4, 5), None)
    with pytest.raises(ValueError, match="NCHW-contiguous"):
        cl = torch.randn(1, 3, 8, 8).contiguous(memory_format=torch.channels_last)
        cpu_kernels.max_pool2d(cl, win, torch.empty(1, 3, 4, 4), None)
    bad = torch.full((1, 3, 4, 4), 64, dtype=torch.int64)  # outside the 8x8 plane
    with pytest.raises(ValueError, match="outside its plane"):
        cpu_kernels.max_pool2d_backward(torch.ones(1, 3, 4, 4), bad, win, torch.empty(1, 3, 8, 8))
    assert not cpu_kernels.takes(torch.empty(1, 3, 8, 8, dtype=torch.bfloat16))
    assert not cpu_kernels.takes(torch.empty(1, 3, 8, 16)[..., ::2])
    assert cpu_kernels.takes(torch.empty(1, 3, 8, 8))


def test_functional_and_nn_run_it_under_auto(monkeypatch) -> None:
    """backend="auto" on a large NCHW float32 CPU input reaches the compiled kernel."""
    calls = []
    real = cpu_kernels.max_pool2d
    monkeypatch.setattr(cpu_kernels, "max_pool2d", lambda *a: calls.append(1) or real(*a))
    x = _input((2, 16, 64, 64), 9, torch.float32)
    assert torch.equal(GF.max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1))
    assert torch.equal(gnn.MaxPool2d(3, 2, 1)(x), F.max_pool2d(x, 3, 2, 1))
    assert len(calls) == 2


# ----------------------------------------------------------------------------- the fallback

_FALLBACK_SCRIPT = """
import json, warnings, torch
import gapnet.functional as GF
from gapnet import _cpu_kernels as cpu_kernels
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    x = torch.randn(2, 16, 40, 40, generator=torch.Generator().manual_seed(3))
    x[0, 0, :3, :3] = float("nan")
    xg = x.clone().requires_grad_()
    y, idx = GF.max_pool2d(xg, 3, 2, 1, return_indices=True)
    y.backward(torch.ones_like(y))
    GF.max_pool2d(x, 2)
out = {"available": cpu_kernels.available(), "why": cpu_kernels.why_unavailable(),
       "warnings": [str(w.message) for w in caught if "gapnet" in str(w.message)],
       "y": y.detach().flatten().tolist(), "idx": idx.flatten().tolist(),
       "grad": xg.grad.flatten().tolist()}
print(json.dumps(out))
"""


def _fallback_run(tmp_path: Path, **env: str) -> dict:
    environ = {**os.environ, "GAPNET_CACHE": str(tmp_path / "cache"), **env}
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", _FALLBACK_SCRIPT], env=environ, capture_output=True,
        text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_without_a_compiler_the_strided_path_gives_the_same_answers(tmp_path: Path) -> None:
    compiled = _fallback_run(tmp_path)
    missing = _fallback_run(tmp_path / "fresh", CC=str(tmp_path / "no-such-cc"))
    off = _fallback_run(tmp_path, GAPNET_CPU_KERNELS="0")
    assert compiled["available"] and compiled["warnings"] == []
    assert not missing["available"] and "no C compiler" in missing["why"]
    assert len(missing["warnings"]) == 1  # once, naming why
    assert "no C compiler" in missing["warnings"][0]
    assert not off["available"] and off["warnings"] == []  # switched off: no build, no warning
    for run in (missing, off):
        for key in ("y", "idx", "grad"):
            assert json.dumps(run[key]) == json.dumps(compiled[key]), key  # NaN included
    assert not (tmp_path / "fresh" / "cache").exists()  # no compiler: nothing was written


def test_a_failing_build_falls_back(tmp_path: Path) -> None:
    fake = tmp_path / "fake-cc"
    fake.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo fake 1.0; exit 0; fi\nexit 1\n')
    fake.chmod(0o755)
    run = _fallback_run(tmp_path, CC=str(fake))
    assert not run["available"] and "build failed" in run["why"]
    assert len(run["warnings"]) == 1
    assert list((tmp_path / "cache").rglob("*.so")) == []  # no half-written library left


def test_builds_once_into_the_cache_from_concurrent_processes(tmp_path: Path) -> None:
    """Two interpreters building into one empty cache at once: both load a whole library."""
    environ = {**os.environ, "GAPNET_CACHE": str(tmp_path / "cache")}
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), environ.get("PYTHONPATH", "")])
    script = "from gapnet import _cpu_kernels as k; print(k.available(), k.why_unavailable())"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=environ, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert outs == ["True None", "True None"]
    built = list((tmp_path / "cache").rglob("*"))
    assert [p.name for p in built if p.is_file()] == ["_cpu_kernels.so"]  # no temp file left
