#!/usr/bin/env bash
# The device run: GPU benchmarks and GPU tests in one go, most wanted figures first.
#
# On the device tool: run(command="bash scripts/gpu_check.sh", timeout_s=560), then give_back.
# The steps' limits add up to 510 s, so a 15-minute device budget (start-up included) leaves room
# for a partial rerun. Each limit is set from the step's expected work on an H200 (below); a step
# stopped by its limit still leaves its figures: the benchmarks write after every measurement and
# on SIGTERM (what `timeout` sends), and every backend call sits inside its skip-with-reason guard,
# with reasons kept per shape.
#
# GPU_CHECK_DEVICE=cpu runs the same steps on tiny shapes (tests/test_gpu_check.py does, in CI), so
# the script itself is tested everywhere except for what only CUDA does.
#
# Runs from the checkout with PYTHONPATH=. (no install). Random-weight models of real shapes,
# pruned 2:4: kernel speed depends on shapes, dtype and pattern, not on the values, and the
# default model's wheel is too large to travel.
# Output (at most 8 files, as the device tool returns): $OUT/gpu_check.log, gemm.tar.gz,
# model8.tar.gz, model.tar.gz, plan_llama2-70b_default.json, plan_llama2-70b_default_tf32.json,
# plan_llama2-70b_fast.json, solver_gpu.json (each plan's Markdown is rebuilt here from its JSON:
# python -c 'import sys; from runtime_bench.plan import markdown_from_json; print(markdown_from_json(sys.argv[1]))' F.json).
# Afterwards, here: untar the three reports into docs/results/h200/ (gemm/, model8/, model/), copy the other
# files beside them, list them in docs/results/README.md, and quote the figures in the README
# (crossover M per shape, best speed-up, the 70B plan, one-Cholesky vs per-block on CUDA).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
WORK=$(mktemp -d)
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

if [ "$DEVICE" = cpu ]; then  # the dry run: every step, tiny shapes, float32
    GEMM=(--shapes smollm2-135m --dtypes float8_e4m3fn,int8,float32 --tokens 1,16)
    MODEL=(--grid 1x16 --decode-steps 2 --backends torch-dense)
    MODEL8=(random:smollm2-135m --grid 1x16 --decode-steps 2 --backends torch-dense,torch-2:4)
    # a LLaMA layer 64 wide: the plan's flow, not its shapes, is what a CPU can check
    echo '{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 384}' > "$WORK/tiny_llama.json"
    PLAN=(--config "$WORK/tiny_llama.json" --calib-samples 2 --seqlen 32)
    SOLVER=(--shapes 64x128 --block-sizes 32)
else
    GEMM=(--shapes llama2-7b,llama2-70b --dtypes float8_e4m3fn,int8,float16 --tokens 1,16,256,2048,8192)
    MODEL=(--grid 1x128,1x2048,8x2048
           --backends torch-dense,torch-2:4,tensorrt-dense,tensorrt-sparse,onnxruntime-tensorrt,genai)
    MODEL8=(random:llama2-7b --grid 1x128,1x2048,8x2048 --backends torch-dense,torch-2:4,tensorrt-sparse)
    PLAN=(--config llama2-70b)  # 128 x 2048 calibration tokens, the GPU default
    SOLVER=(--shapes 4096x4096,4096x11008 --block-sizes 128,512)
fi

step() {  # step SECONDS NAME COMMAND... (the dry run checks the flow, not the GPU timings: 300 s each)
    local limit=$1 name=$2; shift 2
    [ "$DEVICE" = cpu ] && limit=300
    echo "=== $name (limit ${limit}s) $(date +%T)"
    timeout "$limit" "$@"; echo "=== $name: exit $? $(date +%T)"
}

if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
fi
python -c "import platform, onnxruntime, torch, transformers; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cusparselt', torch.backends.cusparselt.version(), 'transformers', transformers.__version__, 'onnxruntime', onnxruntime.__version__)"

# 8-bit first (the figures issue 19 needs): 7 shapes x 5 token counts x (2 FP8 kernels + 2 INT8 +
# 3 fp16: dense, cuSPARSELt, 2:4 + dense rows; CUTLASS is off on Hopper), at most 0.5 s each: ~125 s;
# and for each 8-bit M the input's quantization, static and per-token, at 0.125 s each: ~18 s.
step 160 "GEMM level: LLaMA-2-7B and 70B shapes, FP8, INT8 and fp16, dense against 2:4" \
    python cli.py bench random:smollm2-135m --levels gemm "${GEMM[@]}" --device "$DEVICE" \
    --backends torch-dense,torch-2:4 --quiet --out "$WORK/gemm"
tar -czf "$OUT/gemm.tar.gz" -C "$WORK" gemm

# One 70B decoder layer: the statistics pass (~4e14 fp32 flop for down_proj's Hessian, seconds),
# then the solves, counted at 586 TFLOP for the default preset (`thanos-export plan --config
# llama2-70b --count-only`; down_proj's mask search and refit 180 + 148 of it, its peak 35 GiB):
# about 10 s at the H200's fp32 rate, more where kernels fall short of it. The JSON is rewritten
# after every solve, so a stop at the limit keeps the linears done so far.
# The default preset permutes channels with scipy's linear assignment; a machine without scipy
# plans without them (the plan's report records which).
PERMUTE=$(python -c "import scipy" 2>/dev/null && echo --permute-channels || echo --no-permute-channels)
step 100 "Pruning plan: one LLaMA-2-70B layer, default preset ($PERMUTE)" \
    python cli.py plan "${PLAN[@]}" --device "$DEVICE" --ranks 1,8 --preset default $PERMUTE \
    --json-out "$OUT/plan_llama2-70b_default.json"

# The same with TF32 for the mask search's and refit's products (issue 23): what it saves in time,
# and the layer errors (computed in full fp32 either way) beside the run above.
step 60 "Pruning plan: the same, mask search and refit products in TF32" \
    python cli.py plan "${PLAN[@]}" --device "$DEVICE" --ranks 1,8 --preset default $PERMUTE --tf32 \
    --json-out "$OUT/plan_llama2-70b_default_tf32.json"

step 40 "Pruning plan: one LLaMA-2-70B layer, fast preset (the block solve alone)" \
    python cli.py plan "${PLAN[@]}" --device "$DEVICE" --ranks 1,8 --preset fast \
    --json-out "$OUT/plan_llama2-70b_fast.json"

# The default preset + FP8 last: the 8-bit step's cost per linear (its own seconds in the JSON).
step 35 "Solver on $DEVICE: one-Cholesky vs per-block re-inversion; the presets beside the reference SparseGPT" \
    python cli.py bench-solvers --device "$DEVICE" "${SOLVER[@]}" --patterns 2:4 \
    --methods thanos,sparsegpt,sparsegpt:reference,thanos:fast,thanos:default,thanos:default+fp8 \
    --json-out "$OUT/solver_gpu.json"

# The 8-bit cuSPARSELt linears of the torch target first: that path has never run on a GPU.
step 25 "GPU tests: the torch target's 8-bit 2:4 linears (FP8, INT8, FP8 with per-token inputs)" \
    python -m pytest -q -m gpu -p no:cacheprovider tests/exporters/test_torch_8bit.py
step 40 "GPU tests: the rest" \
    python -m pytest -q -m gpu -p no:cacheprovider --ignore=tests/exporters/test_torch_8bit.py tests

# The 8-bit model as served (issue 19's model level): LLaMA-2-7B shapes, random 2:4 weights made
# FP8, PyTorch dense fp16 against the torch target's FP8 2:4 cuSPARSELt linears (TensorRT's engine
# where TensorRT is installed): 13.5 GB of weights built on the GPU in seconds, 224 linears
# compressed, 3 prefill shapes and 16 decode steps per backend at about 1 s each.
step 35 "Model level, FP8: LLaMA-2-7B shapes, fp16 dense against FP8 2:4" \
    python cli.py bench "${MODEL8[@]}" --quantize fp8 --levels model --device "$DEVICE" --quiet --out "$WORK/model8"
tar -czf "$OUT/model8.tar.gz" -C "$WORK" model8

# The runtimes last: where that machine has onnxruntime-gpu (its TensorRT provider) or
# onnxruntime-genai-cuda they are measured, else recorded as skipped with the reason.
step 15 "Model level: default model's shapes" \
    python cli.py bench random:smollm2-135m --levels model "${MODEL[@]}" --device "$DEVICE" --quiet \
    --out "$WORK/model"
tar -czf "$OUT/model.tar.gz" -C "$WORK" model
