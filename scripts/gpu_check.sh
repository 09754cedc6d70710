#!/usr/bin/env bash
# The device run: GPU tests, then the GPU benchmarks, in one go (about 10 minutes on an H200).
# Runs from the checkout with PYTHONPATH=. (no install); writes reports under ${OUT:-out/gpu}.
# Random-weight models of real shapes, pruned 2:4: kernel speed depends on shapes, dtype and
# pattern, not on the values, and the default model's wheel is too large to travel.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log"
python cli.py bench random:llama2-7b --levels gemm --shapes llama2-70b --dtypes float16,bfloat16 \
    --backends torch-dense,torch-2:4 --quiet --out "$OUT/gemm" 2>&1 | tee "$OUT/gemm.log"
python cli.py bench random:smollm2-135m --levels model --grid 1x128,1x2048,8x2048 \
    --backends torch-dense,torch-2:4,onnxruntime,tensorrt-dense,tensorrt-sparse --quiet --out "$OUT/model" 2>&1 | tee "$OUT/model.log"
python -m runtime_bench.solver --device cuda --shapes 4096x4096,4096x11008 --patterns 2:4 \
    --block-sizes 128,512 --json-out "$OUT/solver_gpu.json" 2>&1 | tee "$OUT/solver.log"
