"""Model level: prefill latency over (batch, sequence) and decode tokens/s, per backend.

Backends: torch dense, torch 2:4 semi-structured (CUDA), onnxruntime on the exported ONNX (its
CUDA provider on a GPU where the build has it), onnxruntime's TensorRT provider with sparse
weights allowed, ONNX Runtime GenAI on the `--target genai` folder, TensorRT dense and sparse
engines. Whatever this machine lacks is recorded as skipped, with why; each record names the
provider that ran.

A model quantized to 8 bits (`--quantize`) is timed as each runtime serves it: onnxruntime and
GenAI on its QuantizeLinear / DequantizeLinear graph, TensorRT on engines built from that graph
with the format's precision, the torch 2:4 backend on cuSPARSELt's 8-bit kernels; each record's
`quantization` is read back from what was timed (the graph's 8-bit initializers, the converted
linears). `torch-dense` times the same weights in floating point with dense kernels, the reference
an 8-bit runtime is measured against.
"""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Optional

import psutil
import torch

from exporters import untraceable
from runtime_bench.protocol import measure
from thanos.errors import InputError
from thanos.model_config import text_config
from thanos.quantized_model import (LinearQuantization, activations_unrounded, cast_model_, model_format,
                                    set_quantization, simulate_activations_)

TORCH_BACKENDS = ["torch-dense", "torch-2:4"]
ALL_BACKENDS = [*TORCH_BACKENDS, "onnxruntime", "onnxruntime-tensorrt", "genai", "tensorrt-dense",
                "tensorrt-sparse"]
RANDOM_CONFIGS = {
    # Real shapes, random weights: kernel speed depends on shapes, dtype and pattern, not on values.
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
}


def random_config(name: str, **overrides):
    """The transformers LlamaConfig of a named real model (see RANDOM_CONFIGS)."""
    from transformers import LlamaConfig

    if name not in RANDOM_CONFIGS:
        raise InputError(f"unknown model config {name!r}; choose one of {', '.join(RANDOM_CONFIGS)}")
    return LlamaConfig(**{**RANDOM_CONFIGS[name], "max_position_embeddings": 4096, **overrides})


def random_model(name: str, dtype=torch.float16, device="cpu", quantize: Optional[str] = None):
    """A LLaMA-architecture model of a real config with random 2:4 weights in every decoder linear,
    8-bit ones with `quantize` ("fp8", "int8": `quantize_random_`)."""
    from transformers import LlamaForCausalLM

    from runtime_bench.gemm import two_four_weight
    from thanos.models import LayerSelection, prunable_linears

    config = random_config(name)
    with torch.device("meta"):
        needed = sum(p.numel() for p in LlamaForCausalLM(config).parameters()) * dtype.itemsize
    available = torch.cuda.mem_get_info(device)[0] if str(device).startswith("cuda") else psutil.virtual_memory().available
    if needed > 0.9 * available:
        raise InputError(f"random:{name} needs {needed / 2**30:.0f} GiB of weights in {dtype}, more than the "
                         f"{available / 2**30:.0f} GiB free on {device}; benchmark its matrix shapes with "
                         f"--levels gemm --shapes {name}, or its pruning cost with thanos-export plan --config {name}")
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    with torch.no_grad():
        for layer in prunable_linears(model, LayerSelection()).values():
            for mod in layer.values():
                mod.weight.copy_(two_four_weight(*mod.weight.shape, dtype, device))
    if quantize:
        quantize_random_(model, quantize)
    return model


@torch.no_grad()
def quantize_random_(model, fmt: str) -> None:
    """Make every decoder linear of a random model 8-bit, as `prune --quantize` leaves a pruned one:
    weights rounded to nearest on per-channel scales (zeros stay zeros), one static input scale from
    the largest input magnitude of one forward pass on random tokens. No calibration: the values
    do not change kernel speed, and these keep the activations on the grid's range."""
    from thanos.models import LayerSelection, prunable_linears
    from thanos.quantize import FORMATS, activation_scale, dequantize, round_to_nearest, weight_scales

    if fmt not in FORMATS:
        raise InputError(f"unknown 8-bit format {fmt!r}; choose {' or '.join(FORMATS)}")
    spec = FORMATS[fmt]
    linears = [mod for layer in prunable_linears(model, LayerSelection()).values() for mod in layer.values()]
    amax = {}
    hooks = [mod.register_forward_pre_hook(lambda m, args: amax.__setitem__(m, float(args[0].abs().amax())))
             for mod in linears]
    try:
        model(torch.randint(0, text_config(model).vocab_size, (1, 16), device=model.device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    for mod in linears:
        weight = mod.weight
        scale = weight_scales(weight, spec, weight.dtype)
        weight.copy_(dequantize(round_to_nearest(weight, scale, spec), scale, weight.dtype))
        set_quantization(mod, LinearQuantization(fmt, scale.cpu(), torch.tensor(activation_scale(amax[mod], spec))))
    simulate_activations_(model)


def _prefill(model, batch: int, seq: int, device: str):
    ids = torch.randint(0, text_config(model).vocab_size, (batch, seq), device=device)

    def run():
        with torch.no_grad():
            model(ids, use_cache=False)

    return run


def _decode_tokens_per_s(model, batch: int, prompt: int, steps: int, device: str) -> dict:
    from thanos.models import cache_after

    ids = torch.randint(0, text_config(model).vocab_size, (batch, prompt), device=device)

    def run():
        with torch.no_grad():
            output = model(ids, use_cache=True)
            cache = cache_after(model, output)  # filled in place by every call
            token = output.logits[:, -1:].argmax(-1)
            for _ in range(steps):
                token = model(token, **cache, use_cache=True).logits[:, -1:].argmax(-1)

    t = measure(run, device, warmup=1, min_repeats=2, max_repeats=5, budget_s=2.0)
    return dict(tokens_per_s=batch * steps / (t.median_ms / 1e3), **t.to_json())


def run_model(model, grid: list[tuple[int, int]], device: str, backends: list[str], decode_steps: int = 16,
              progress=None, sink: Optional[list] = None) -> list[dict]:
    """Measure every backend in `backends` on `model` (the ONNX one is exported on the fly).

    Records go into `sink` as they are measured (and are returned), so an interrupted run keeps them.
    """
    records = [] if sink is None else sink
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cuda = device.startswith("cuda")
    quantized = model_format(model)

    def skip(backend, reason):
        records.append(dict(level="model", backend=backend, status="skipped", reason=reason))

    def time_torch(backend, m, precision: dict):
        for i, (batch, seq) in enumerate(grid):
            t = measure(_prefill(m, batch, seq, device), device, budget_s=1.0)
            records.append(dict(level="model", backend=backend, status="ok", phase="prefill", batch=batch,
                                seqlen=seq, tokens_per_s=batch * seq / (t.median_ms / 1e3),
                                weight_bytes=weight_bytes, **precision, **t.to_json()))
            if progress:
                progress(backend, i + 1, len(grid))
        records.append(dict(level="model", backend=backend, status="ok", phase="decode", batch=1,
                            seqlen=grid[0][1], steps=decode_steps, weight_bytes=weight_bytes, **precision,
                            **_decode_tokens_per_s(m, 1, grid[0][1], decode_steps, device)))

    def guarded(backend: str, run) -> None:
        """One backend's failure (a kernel this GPU lacks, out of memory) is its record, not the run's end."""
        try:
            run()
        except (RuntimeError, NotImplementedError, ValueError, ImportError, OSError) as exc:
            skip(backend, f"{type(exc).__name__}: {exc}"[:200])

    def dense_torch():
        with activations_unrounded(model):  # floating-point kernels throughout: no rounding to simulate
            time_torch("torch-dense", model, dict(dtype=_dtype_name(model)))

    def sparse_torch():
        import copy

        sparse = copy.deepcopy(model)
        if quantized:
            from exporters.torch_8bit import to_8bit_semi_structured_

            report = to_8bit_semi_structured_(sparse)
            precision = dict(dtype=_dtype_name(model), quantization=report.format if report.converted else None)
        else:
            from exporters.torch_sparse import to_semi_structured_

            report = to_semi_structured_(sparse)
            precision = dict(dtype=_dtype_name(model))
        time_torch("torch-2:4", sparse, precision)
        records[-1]["converted_linears"] = len(report.converted)

    if "torch-dense" in backends:
        guarded("torch-dense", dense_torch)
    if "torch-2:4" in backends:
        if not cuda:
            skip("torch-2:4", "needs a CUDA GPU of compute capability 8.0+; this run is on the CPU")
        else:
            guarded("torch-2:4", sparse_torch)
    reason = untraceable(model.config)
    if reason:  # the rest run exported graphs
        for backend in [b for b in backends if b not in TORCH_BACKENDS]:
            skip(backend, f"not exported: {reason}")
        backends = [b for b in backends if b in TORCH_BACKENDS]
    if "onnxruntime" in backends:
        guarded("onnxruntime", lambda: records.extend(_onnxruntime(model, grid, decode_steps, progress, cuda)))
    if "onnxruntime-tensorrt" in backends:
        if quantized:
            skip("onnxruntime-tensorrt", f"not set up for {quantized} QuantizeLinear / DequantizeLinear graphs; "
                                         "tensorrt-sparse times the 8-bit engine")
        else:
            guarded("onnxruntime-tensorrt",
                    lambda: records.extend(_onnxruntime_tensorrt(model, grid, progress, cuda)))
    if "genai" in backends:
        guarded("genai", lambda: records.extend(_genai(model, grid, decode_steps, progress, cuda)))
    wanted = [b for b in ("tensorrt-dense", "tensorrt-sparse") if b in backends]
    if wanted:
        if not cuda or importlib.util.find_spec("tensorrt") is None:
            for backend in wanted:
                skip(backend, "TensorRT needs an NVIDIA GPU and the tensorrt package; "
                              f"{'no GPU' if not cuda else 'tensorrt is not installed'} here")
        else:
            guarded("+".join(wanted), lambda: records.extend(_tensorrt(model, grid, wanted, progress)))
    return records


def _dtype_name(model) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _graph_precision(path: Path, dtype: str) -> dict:
    """What an ONNX graph computes in: its float dtype, and the 8-bit format of its weights if any."""
    from exporters.onnx_qdq import weight_formats

    formats = weight_formats(path)
    return dict(dtype=dtype, quantization=", ".join(sorted(formats)) if formats else None)


def _cpu_copy(model, dtype):
    """The model as ONNX export wants it (on the CPU), leaving the caller's model where it is."""
    import copy

    copied = copy.deepcopy(model).to("cpu")
    cast_model_(copied, dtype)  # an 8-bit model's weights dequantized anew, as the export checks them
    return copied


def _onnxruntime(model, grid, decode_steps: int, progress, cuda: bool = False) -> list[dict]:
    if importlib.util.find_spec("onnxruntime") is None:
        return [dict(level="model", backend="onnxruntime", status="skipped",
                     reason="onnxruntime is not installed (pip install 'thanos-export[onnx]')")]
    import onnxruntime as ort

    from exporters.onnx_cache import OnnxDecoder, write_onnx_with_cache

    # onnxruntime's CUDA provider where this build has one and the run is on a GPU; else the CPU's.
    providers = ["CPUExecutionProvider"]
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    common = dict(level="model", backend="onnxruntime", status="ok", dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        cpu_model = _cpu_copy(model, torch.float32)
        records = _onnx_prefill(cpu_model, Path(tmp), grid, providers, common, progress)
        # Decode on the KV-cache graph: a prefill of the first grid length, then one token per step
        # (the same count as the PyTorch decode figure).
        cached = Path(tmp) / "cached" / "model_with_cache.onnx"
        cached.parent.mkdir()
        write_onnx_with_cache(cpu_model, cached)
        decoder = OnnxDecoder(cached, providers)
        common.update(_graph_precision(cached, common["dtype"]))
        ids = torch.randint(0, text_config(model).vocab_size, (1, grid[0][1])).numpy()
        t = measure(lambda: decoder.generate(ids, ids * 0 + 1, decode_steps + 1), "cpu", warmup=1, min_repeats=2,
                    max_repeats=5, budget_s=2.0)
        records.append(dict(common, provider=decoder.session.get_providers()[0], phase="decode", batch=1,
                            seqlen=grid[0][1], steps=decode_steps, tokens_per_s=decode_steps / (t.median_ms / 1e3),
                            file_bytes=sum(f.stat().st_size for f in cached.parent.iterdir()), **t.to_json()))
    return records


def _onnx_prefill(cpu_model, folder: Path, grid, providers, common: dict, progress, provider_options=None) -> list:
    """Export the full-sequence graph into `folder` and time one prefill per grid point."""
    from exporters.onnx_export import write_onnx
    from exporters.onnx_qdq import onnxruntime_session

    path = folder / "model.onnx"
    write_onnx(cpu_model, path)
    common = {**common, **_graph_precision(path, common["dtype"])}
    file_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    session = onnxruntime_session(path, providers, provider_options)
    records = []
    for i, (batch, seq) in enumerate(grid):
        ids = torch.randint(0, text_config(cpu_model).vocab_size, (batch, seq)).numpy()
        feed = {"input_ids": ids, "attention_mask": (ids * 0 + 1)}
        t = measure(lambda: session.run(["logits"], feed), "cpu", budget_s=1.0)
        records.append(dict(common, provider=session.get_providers()[0], phase="prefill", batch=batch, seqlen=seq,
                            tokens_per_s=batch * seq / (t.median_ms / 1e3), file_bytes=file_bytes, **t.to_json()))
        if progress:
            progress(common["backend"], i + 1, len(grid))
    return records


def _onnxruntime_tensorrt(model, grid, progress, cuda: bool) -> list[dict]:
    """onnxruntime's TensorRT provider in float16 with sparse weights allowed (TensorRT picks the kernels)."""
    backend = "onnxruntime-tensorrt"
    available = []
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if not cuda or "TensorrtExecutionProvider" not in available:
        why = "no GPU in this run" if not cuda else f"this onnxruntime build has no TensorRT provider ({available})"
        return [dict(level="model", backend=backend, status="skipped",
                     reason=f"needs onnxruntime-gpu with its TensorRT provider and an NVIDIA GPU: {why}")]
    options = [{"trt_fp16_enable": True, "trt_sparsity_enable": True}, {}]
    with tempfile.TemporaryDirectory() as tmp:
        return _onnx_prefill(_cpu_copy(model, torch.float16), Path(tmp), grid,
                             ["TensorrtExecutionProvider", "CPUExecutionProvider"],
                             dict(level="model", backend=backend, status="ok", dtype="float16", sparsity_enabled=True),
                             progress, options)


def _genai(model, grid, decode_steps: int, progress, cuda: bool) -> list[dict]:
    """ONNX Runtime GenAI on the `--target genai` folder: prefill through its generator, then decode.
    An INT8 model's folder is timed as exported (for any CPU) and, where this CPU runs onnxruntime's
    fused INT8 kernel exactly, as `--fused-int8` writes it too."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return [dict(level="model", backend="genai", status="skipped",
                     reason="onnxruntime-genai is not installed (pip install 'thanos-export[genai]', or "
                            "onnxruntime-genai-cuda with the gpu extra)")]
    import onnxruntime_genai as og

    from exporters.onnx_qdq import fused_int8_is_exact

    provider = "cuda" if cuda and og.is_cuda_available() else "cpu"
    dtype = torch.float16 if provider == "cuda" else torch.float32
    fused = [False] + ([True] if provider == "cpu" and model_format(model) == "int8" and fused_int8_is_exact() else [])
    records = []
    for fused_int8 in fused:
        common = dict(level="model", backend="genai", status="ok", provider=provider, dtype=str(dtype)[6:],
                      runtime=f"onnxruntime-genai {og.__version__}", **({"fused_int8": True} if fused_int8 else {}))
        records += _genai_folder(og, model, dtype, fused_int8, common, grid, decode_steps, progress)
    return records


def _genai_folder(og, model, dtype, fused_int8: bool, common: dict, grid, decode_steps: int, progress) -> list[dict]:
    from exporters.genai import MODEL_FILE, GenaiModel, write_genai_folder

    records = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_genai_folder(_cpu_copy(model, dtype), None, folder, fused_int8=fused_int8)
        common = dict(common, **_graph_precision(folder / MODEL_FILE, common["dtype"]))
        runtime = GenaiModel(folder, common["provider"], tokenizer=False)
        file_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())

        def prefill(ids):
            params = og.GeneratorParams(runtime.model)
            params.set_search_options(batch_size=ids.shape[0], max_length=ids.shape[1] + 1)
            og.Generator(runtime.model, params).append_tokens(ids)

        for i, (batch, seq) in enumerate(grid):
            ids = torch.randint(0, text_config(model).vocab_size, (batch, seq)).numpy()
            t = measure(lambda: prefill(ids), "cpu", budget_s=1.0)
            records.append(dict(common, phase="prefill", batch=batch, seqlen=seq, file_bytes=file_bytes,
                                tokens_per_s=batch * seq / (t.median_ms / 1e3), **t.to_json()))
            if progress:
                progress("genai", i + 1, len(grid))
        # Decode: the first grid length as the prompt, then `decode_steps` tokens (the others' protocol).
        prompt = torch.randint(0, text_config(model).vocab_size, (grid[0][1],)).tolist()
        t = measure(lambda: runtime.generate(prompt, decode_steps, max_length=len(prompt) + decode_steps), "cpu",
                    warmup=1, min_repeats=2, max_repeats=5, budget_s=2.0)
        records.append(dict(common, phase="decode", batch=1, seqlen=grid[0][1], steps=decode_steps,
                            tokens_per_s=decode_steps / (t.median_ms / 1e3), file_bytes=file_bytes, **t.to_json()))
    return records


def _tensorrt(model, grid, backends: list[str], progress) -> list[dict]:
    """Build a dense and/or a sparse engine from one fp16 ONNX export (8-bit where the model is) and
    time prefill on each."""
    from exporters import ExportOptions
    from exporters.onnx_export import write_onnx
    from exporters.tensorrt_engine import EngineRunner, build_engine, require_8bit_gpu

    quantized = model_format(model)
    if quantized:  # before the export: FP8 engines need compute capability 8.9
        require_8bit_gpu(quantized, torch.cuda.get_device_capability(), torch.cuda.get_device_name())
    max_batch, max_seq = max(b for b, _ in grid), max(s for _, s in grid)
    options = ExportOptions(dtype="float16", batch=(1, max_batch, max_batch), seqlen=(1, max_seq, max_seq))
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        write_onnx(_cpu_copy(model, torch.float16), onnx_path)
        precision = _graph_precision(onnx_path, "float16")
        for backend in backends:
            engine_path = Path(tmp) / f"{backend}.engine"
            built = build_engine(onnx_path, engine_path, options, sparse=backend == "tensorrt-sparse",
                                 quantized=quantized)
            free_before = torch.cuda.mem_get_info()[0]
            runner = EngineRunner(engine_path)
            engine_memory = free_before - torch.cuda.mem_get_info()[0]
            for i, (batch, seq) in enumerate(grid):
                ids = torch.randint(0, text_config(model).vocab_size, (batch, seq), device="cuda")
                runner.bind(ids, torch.ones_like(ids))
                t = measure(runner.launch, "cuda", budget_s=1.0)
                records.append(dict(
                    level="model", backend=backend, status="ok", phase="prefill", batch=batch, seqlen=seq,
                    tokens_per_s=batch * seq / (t.median_ms / 1e3), **precision,
                    file_bytes=engine_path.stat().st_size, engine_device_bytes=engine_memory,
                    tensorrt=built["tensorrt"], sparse_eligible=len(built["eligible"]),
                    sparse_picked=len(built["sparse_implementation"]),
                    **{**t.to_json(), "peak_memory_bytes": engine_memory,
                       "memory_kind": "device memory taken by the engine and its context"}))
                if progress:
                    progress(backend, i + 1, len(grid))
            runner = None  # free this engine's memory before building the next
            records.append(dict(level="model", backend=backend, status="skipped", phase="decode",
                                reason="decode needs an engine of the KV-cache graph (model_with_cache.onnx) with a "
                                       "profile over the past length; not built yet"))
    return records
