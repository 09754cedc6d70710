#!/usr/bin/env bash
# The device run: GPU benchmarks and GPU tests in one go. Each step has its own time limit (420 s
# in all, so run it with timeout_s 450, which leaves a 15-minute budget room for a partial rerun), so one slow step cannot starve the rest, and the most
# wanted figures come first; a step stopped by its limit still leaves its partial report.
# Never run yet: how long each step really takes on an H200 is for its log to say.
# Runs from the checkout with PYTHONPATH=. (no install). Random-weight models of real shapes,
# pruned 2:4: kernel speed depends on shapes, dtype and pattern, not on the values, and the
# default model's wheel is too large to travel.
# Output (at most 8 files, as the device tool returns): $OUT/gpu_check.log, gemm.tar.gz,
# model.tar.gz, plan_llama2-70b.{json,md}, solver_gpu.json.
# On the device tool: run(command="bash scripts/gpu_check.sh", timeout_s=450), then give_back.
# Afterwards, here: untar the two reports into docs/results/h200/ (gemm/, model/), copy the other
# files beside them, list them in docs/results/README.md, and quote the figures in the README
# (crossover M per shape, best speed-up, the 70B plan, one-Cholesky vs per-block on CUDA).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}
WORK=$(mktemp -d)
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2; shift 2
    echo "=== $name (limit ${limit}s) $(date +%T)"
    timeout "$limit" "$@"; echo "=== $name: exit $? $(date +%T)"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"

step 150 "GEMM level: LLaMA-2-7B and 70B shapes (and the default model's), fp16 and bf16, 2:4 and 2:4 + 5% dense rows" \
    python cli.py bench random:smollm2-135m --levels gemm --shapes llama2-7b,llama2-70b --dtypes float16,bfloat16 \
    --tokens 1,16,256,1024,4096,16384 --backends torch-dense,torch-2:4 --quiet --out "$WORK/gemm"
tar -czf "$OUT/gemm.tar.gz" -C "$WORK" gemm

# The runtimes last: where that machine has onnxruntime-gpu (its TensorRT provider) or
# onnxruntime-genai-cuda they are measured, else recorded as skipped with the reason.
step 45 "Model level: default model's shapes" \
    python cli.py bench random:smollm2-135m --levels model --grid 1x128,1x2048,8x2048 \
    --backends torch-dense,torch-2:4,tensorrt-dense,tensorrt-sparse,onnxruntime-tensorrt,genai --quiet \
    --out "$WORK/model"
tar -czf "$OUT/model.tar.gz" -C "$WORK" model

# The default preset permutes channels with scipy's linear assignment; a machine without scipy
# plans without them (the plan's report records which).
PERMUTE=$(python -c "import scipy" 2>/dev/null && echo --permute-channels || echo --no-permute-channels)
step 90 "Pruning plan: one LLaMA-2-70B layer, 128 x 2048 calibration tokens ($PERMUTE)" \
    python -m runtime_bench.plan --config llama2-70b --device cuda --ranks 1,8 $PERMUTE \
    --json-out "$OUT/plan_llama2-70b.json" --md-out "$OUT/plan_llama2-70b.md"

step 45 "Solver on CUDA: one-Cholesky vs per-block re-inversion" \
    python -m runtime_bench.solver --device cuda --shapes 4096x4096,4096x11008 --patterns 2:4 \
    --block-sizes 128,512 --json-out "$OUT/solver_gpu.json"

step 90 "GPU tests" python -m pytest -q -m gpu -p no:cacheprovider tests
