#!/usr/bin/env bash
# The one call to make on a CUDA machine (the GPU box has torch, triton, numpy and pytest
# preinstalled; gapnet runs from the repo root, not installed):
#
#   bash benchmarks/gpu_check.sh [bench_ops.py options, e.g. --no-compile or --only "resnet"]
#
# 1. every kernel against the float64 reference on the GPU (the `cuda` tests) and the
#    custom-op checks (opcheck, gradcheck, torch.compile, CUDA graphs);
# 2. the GPU table (`bench_ops.py --device cuda`: gapnet vs eager vs torch.compile, fractions
#    of the copy-bandwidth floor, peak memory, the NiN training step) and the CAM cost;
# RESULTS.md, with the tables appended, and the logs are copied to $OUT when it is set (the
# device tool brings back only what is under $OUT). The tables print last.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=.
out="${OUT:-}"
py="${PYTHON:-python}"  # PYTHON=.venv/bin/python to dry-run it here
log() { if [ -n "$out" ]; then tee -a "$out/gpu_check.log"; else cat; fi; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | log
"$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | log
timeout 150 "$py" -m pytest -q -x -p no:cacheprovider -m "cuda or triton" \
    tests/test_kernels_global_pool.py tests/test_kernels_window_pool.py tests/test_ops.py \
    2>&1 | tail -15 | log
timeout 380 "$py" benchmarks/bench_ops.py --device cuda "$@" 2>&1 | log
timeout 50 "$py" benchmarks/bench_cam.py --device cuda 2>&1 | tail -15 | log
if [ -n "$out" ]; then cp benchmarks/RESULTS.md "$out/RESULTS.md"; fi
