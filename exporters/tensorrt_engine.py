"""`--target tensorrt`: an engine built from the ONNX export with sparse weights enabled.

TensorRT 10 takes precision from builder flags (FP16/BF16); TensorRT 11 networks are strongly
typed, so precision comes from the ONNX types (we export fp16; bfloat16 is refused there,
`precision_flags`). The builder's verbose log is
captured, and the layers it reports as eligible for sparse math, and those it gave a sparse
implementation, are listed in the summary. A model quantized to 8 bits arrives as the ONNX
export's QuantizeLinear / DequantizeLinear graph (`exporters.onnx_qdq`): TensorRT's explicit
quantization, which picks its FP8 / INT8 kernels from those pairs. The built engine is then run
on the ONNX check's prompts beside PyTorch (`check_engine`).

Weight layout: TensorRT's developer guide (section "Sparsity") asks of convolution and fully
connected weights that, for every output channel, each group of four consecutive input channels
hold at least two zeros: 2:4 along the reduction dimension K, whatever the storage order. Our
ONNX stores each linear as MatMul(x, B) with B a (K, N) initializer whose groups of 4 run along
K (axis 0); `exporters.onnx_export.onnx_weight_patterns` verifies that before the build. The
builder log is the authority on what it accepted, and the summary reports it.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

from exporters.base import BackendMissingError, ExportError, ExportFormat, ExportOptions, register, release
from exporters.onnx_export import export_onnx
from exporters.patterns import NotHardwareSparseError, require_hardware_2to4
from exporters.source import load_pruned, model_patterns
from thanos.quantized_model import model_format

log = logging.getLogger(__name__)
ENGINE_FILE = "model.engine"


def require_tensorrt(dtype: Optional[str] = None):
    """The tensorrt module, once an NVIDIA GPU is seen and this TensorRT can build `dtype` (if given)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendMissingError(
            f"TensorRT is not installed ({exc}); `pip install tensorrt` on a machine with an NVIDIA GPU, "
            "or use --target onnx here and build the engine on the serving machine") from exc
    import torch

    if not torch.cuda.is_available():
        raise BackendMissingError("TensorRT needs an NVIDIA GPU and none is visible here; use --target onnx here "
                                  "and build the engine on the serving machine with --target tensorrt")
    precision_flags(trt.__version__, dtype, None)  # refuses what this release cannot build
    return trt


def precision_flags(version: str, dtype: Optional[str], quantized: Optional[str]) -> list[str]:
    """The BuilderFlag names an engine of `dtype` (8-bit `quantized` if given) needs under TensorRT `version`.

    TensorRT 10 picks reduced precision from flags over our float16 graph (BF16 casts its float16
    weights once more). From 11 on every network is strongly typed and the flags are gone: the
    engine computes in the graph's own types, so a bfloat16 engine would need a bfloat16 graph,
    which the ONNX export does not write; it is refused rather than built in float16 under that name.
    """
    if release(version)[0] >= 11:
        if dtype == "bfloat16":
            raise ExportError(f"TensorRT {version} builds an engine in the ONNX graph's own types, and the graph is "
                              "float16 or float32 (onnxruntime checks it; it runs no bfloat16): use --dtype float16")
        return []
    flags = {"float16": ["FP16"], "bfloat16": ["BF16"]}.get(dtype, [])
    return flags + ([quantized.upper()] if quantized else [])


# The lowest compute capability whose tensor cores take each 8-bit format (FP8: Ada and Hopper).
EIGHT_BIT_CAPABILITY = {"int8": (8, 0), "fp8": (8, 9)}


def require_8bit_gpu(fmt: str, capability: tuple[int, int], device_name: str) -> None:
    """Refuse, before any work, an 8-bit format the GPU's tensor cores do not run."""
    need = EIGHT_BIT_CAPABILITY[fmt]
    if tuple(capability) < need:
        other = [f for f, cap in EIGHT_BIT_CAPABILITY.items() if tuple(capability) >= cap]
        instead = f"prune with --quantize {other[0]} for this GPU, or " if other else ""
        raise BackendMissingError(
            f"{device_name} has compute capability {capability[0]}.{capability[1]}, and TensorRT's {fmt.upper()} "
            f"kernels need {need[0]}.{need[1]} or newer; {instead}build the engine on a newer GPU "
            "(--target onnx writes the graph here)")


def parse_sparsity_log(lines: list[str]) -> dict:
    """Pull TensorRT's '(Sparsity)' report lines apart: eligible layers and those picked sparse."""
    eligible, picked = [], []
    for line in lines:
        match = re.search(r"Layers eligible for sparse math:\s*(.*)", line)
        if match:
            eligible += [s.strip() for s in match.group(1).split(",") if s.strip()]
        match = re.search(r"picked sparse implementation for layers:\s*(.*)", line)
        if match:
            picked += [s.strip() for s in match.group(1).split(",") if s.strip()]
    return dict(eligible=eligible, sparse_implementation=picked)


def build_engine(onnx_path: Path, engine_path: Path, options: ExportOptions, sparse: bool = True,
                 quantized: Optional[str] = None) -> dict:
    """`quantized`: the graph's 8-bit format ("fp8", "int8"), whose QuantizeLinear / DequantizeLinear
    pairs TensorRT 10 takes only with that precision's flag (TensorRT 11 reads the ONNX types)."""
    trt = require_tensorrt()
    lines: list[str] = []

    class _Capture(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            lines.append(msg)
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                log.warning("TensorRT: %s", msg)

    logger = _Capture()
    major = release(trt.__version__)[0]
    builder = trt.Builder(logger)
    flags = 0
    if major >= 11:  # strongly typed: precision comes from the ONNX types
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 1024**3))
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    for flag in precision_flags(trt.__version__, options.dtype, quantized):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for name in ("input_ids", "attention_mask"):
        shapes = [(b, s) for b, s in zip(options.batch, options.seqlen)]
        profile.set_shape(name, *shapes)
    config.add_optimization_profile(profile)
    cache_path = Path(options.timing_cache) if options.timing_cache else engine_path.with_suffix(".timing.cache")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    logger.min_severity = trt.ILogger.Severity.VERBOSE
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT failed to build the engine; see tensorrt_build.log")
    engine_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    (engine_path.parent / "tensorrt_build.log").write_text("\n".join(lines))
    return dict(engine=str(engine_path), tensorrt=trt.__version__, sparse_weights=sparse, quantized=quantized,
                timing_cache=str(cache_path), **parse_sparsity_log(lines))


class EngineRunner:
    """A built engine, loaded once and run on CUDA tensors by name (TensorRT's tensor-address API,
    10 and 11): `bind` the inputs, then `launch` as often as wanted."""

    def __init__(self, engine_path: Path):
        trt = require_tensorrt()
        import torch

        self._torch = {trt.int64: torch.int64, trt.int32: torch.int32, trt.float16: torch.float16,
                       trt.float32: torch.float32, trt.bfloat16: torch.bfloat16}
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
            Path(engine_path).read_bytes())
        if self.engine is None:
            raise ExportError(f"TensorRT could not load {engine_path} (built by another TensorRT or for another GPU?); "
                              "build it again here")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.current_stream()
        self._bound: dict = {}

    def bind(self, input_ids, attention_mask):
        """Point the engine at these inputs (copied to the GPU in its input dtypes); returns the logits
        buffer that each `launch` fills."""
        import torch

        feeds = {}
        for name, tensor in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            feeds[name] = tensor.to("cuda", self._torch[self.engine.get_tensor_dtype(name)]).contiguous()
            self.context.set_input_shape(name, tuple(tensor.shape))
        feeds["logits"] = torch.empty(tuple(self.context.get_tensor_shape("logits")),
                                      dtype=self._torch[self.engine.get_tensor_dtype("logits")], device="cuda")
        for name, tensor in feeds.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        self._bound = feeds  # held while the engine may read or write them
        return feeds["logits"]

    def launch(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ExportError("TensorRT failed to run the engine; see the TensorRT messages above")


def check_engine(model, tokenizer, engine_path: Path, dtype: str = "float16") -> dict:
    """Run the engine on the export's check prompts beside the PyTorch model (float32; an 8-bit model
    with its inputs rounded): the largest logit difference, how often the top token agrees, and
    the ONNX check's bound at the engine's `dtype` for comparison. Refuses non-finite logits; the difference is reported,
    not enforced, until a GPU run shows what TensorRT's fused float16 kernels give."""
    import numpy as np
    import torch

    from exporters.onnx_export import validation_prompts
    from exporters.onnx_graph import TOLERANCE

    ids, mask = validation_prompts(tokenizer)
    held = next(model.parameters()).dtype
    with torch.no_grad():
        expected = model.float()(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()
    model.to(held)
    runner = EngineRunner(engine_path)
    logits = runner.bind(ids, mask)
    runner.launch()
    torch.cuda.synchronize()
    got = logits.float().cpu().numpy()
    valid = mask.bool().numpy()
    if not np.isfinite(got[valid]).all():
        raise ExportError(f"the TensorRT engine's logits on {ids.shape[0]} prompts are not finite; the ONNX graph "
                          "beside it passed onnxruntime's check, so the engine's reduced precision is the suspect: "
                          "build with --dtype float32 to confirm")
    return dict(prompts=int(ids.shape[0]), tokens=int(valid.sum()),
                max_abs_diff=float(np.abs(got - expected)[valid].max()),
                top_token_agrees=float((got.argmax(-1) == expected.argmax(-1))[valid].mean()),
                onnx_bound=TOLERANCE.get(dtype, TOLERANCE["float16"]) * float(np.abs(expected[valid]).max()))


@register(ExportFormat.TENSORRT)
def export_tensorrt(model_dir: Path, out: Path, options: ExportOptions, source: Optional[tuple] = None) -> dict:
    onnx_options = ExportOptions(**{**options.to_json(), "dtype": "float16"
                                    if options.dtype == "bfloat16" else options.dtype})
    # loaded once, for both steps
    loaded = load_pruned(model_dir, onnx_options.dtype, options.split_dense_rows, options.trust_remote_code, source)
    sparse = True
    try:
        require_hardware_2to4(model_patterns(loaded[0]), loaded[2], "TensorRT", options.split_dense_rows)
    except NotHardwareSparseError:
        if not options.allow_dense:
            raise
        sparse = False
    require_tensorrt(options.dtype)  # before the ONNX export, which takes minutes on a big model
    quantized = model_format(loaded[0])
    if quantized:
        import torch

        require_8bit_gpu(quantized, torch.cuda.get_device_capability(), torch.cuda.get_device_name())
    onnx_summary = export_onnx(model_dir, out, onnx_options, loaded=loaded)
    summary = dict(onnx=onnx_summary["onnx"], onnx_export=onnx_summary,
                   **build_engine(out / "model.onnx", out / ENGINE_FILE, options, sparse, quantized))
    if options.validate:
        summary["engine_check"] = check_engine(loaded[0], loaded[1], out / ENGINE_FILE, onnx_options.dtype)
    return summary
