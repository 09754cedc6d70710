"""What every exporter shares: the format enum, the options, the errors and the registry."""
from __future__ import annotations

import dataclasses
import enum
import re
from pathlib import Path
from typing import Callable, Optional

from thanos.errors import ThanosExportError


class ExportFormat(str, enum.Enum):
    TORCH = "torch"
    ONNX = "onnx"
    TENSORRT = "tensorrt"
    SAFETENSORS = "safetensors"
    GENAI = "genai"


class ExportError(ThanosExportError, RuntimeError):
    """An export that could not be made or did not match the pruned model."""


class BackendMissingError(ExportError):
    """An optional runtime (TensorRT, a CUDA GPU) is not available; the message says what to install."""


class ValidationError(ExportError):
    """An exported model whose outputs differ from the pruned PyTorch model by more than the tolerance."""

    def __init__(self, what: str, max_diff: float, tolerance: float):
        super().__init__(f"{what}: largest difference from the pruned PyTorch model is {max_diff:.3g}, "
                         f"over the tolerance {tolerance:.3g}")
        self.max_diff, self.tolerance = max_diff, tolerance


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    # float32, float16 or bfloat16 (ONNX: float32 or float16); None: the target's default
    # (`default_dtype`), and the summary reports any cast from the source's dtype.
    dtype: Optional[str] = None
    allow_dense: bool = False  # hardware targets: build dense instead of refusing non-2:4 models
    split_dense_rows: bool = False  # alpha > 0: a 2:4 linear plus a dense one per layer (exporters.row_split)
    validate: bool = True
    opset: int = 18
    with_cache: bool = False  # ONNX: also write the KV-cache graph for decoding (exporters.onnx_cache)
    # TensorRT optimisation profile: (min, opt, max) for batch and sequence length
    batch: tuple[int, int, int] = (1, 1, 4)
    seqlen: tuple[int, int, int] = (1, 128, 512)
    workspace_gib: float = 4.0
    timing_cache: Optional[str] = None
    backend: str = "auto"  # torch semi-structured: auto, cusparselt or cutlass
    # GenAI folders of INT8 models: let onnxruntime fuse each INT8 linear into its integer kernel,
    # exact only on CPUs with VNNI or on Arm (`exporters.onnx_qdq.fused_int8_is_exact`)
    fused_int8: bool = False
    trust_remote_code: bool = False  # let the model directory's own Python code run while loading it

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def overflow_hint(dtype: str) -> str:
    """Why an export's outputs may not be finite, and the fix, for a message ending in a clause."""
    if dtype != "float16":
        return ""
    return ("; the model's activations likely overflow float16's range (65504), as those of models trained in "
            "bfloat16 can: export with --dtype bfloat16 where the target has it, else float32")


# Where each token's input scale can come from at run time: QDQ graphs (onnx, and the tensorrt and
# genai targets built from them) carry constant QuantizeLinear scales only.
PER_TOKEN_TARGETS = ("torch", "safetensors")


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a package's version string ("5.18.0.dev0", "2.11.0+cu130", "1.30.0rc1")."""
    major, minor = (re.match(r"\d*", part).group() or "0" for part in (version.split(".") + ["0"])[:2])
    return int(major), int(minor)


def check_inputs_carried(fmt: "str | ExportFormat", inputs: str) -> None:
    """Refuse, before any work, a target that cannot carry the model's input scaling."""
    fmt = ExportFormat(fmt)
    if inputs == "per-token" and fmt.value not in PER_TOKEN_TARGETS:
        raise ExportError(f"--target {fmt.value} writes QuantizeLinear nodes with one constant scale per linear input, "
                          f"so it cannot carry per-token input scales; use --target {' or '.join(PER_TOKEN_TARGETS)}, "
                          "or prune with --quantize-inputs static")


# Serving targets run in half precision; the compact checkpoint is the lossless format and keeps
# the source's dtype (None) unless a dtype is asked for.
DEFAULT_DTYPE = {"onnx": "float16", "tensorrt": "float16", "torch": "float16", "genai": "float16", "safetensors": None}
# The dtypes a target exports in where not all three (its ONNX graphs are float32 or float16).
ONNX_DTYPES = ("float32", "float16")
TARGET_DTYPES = {"onnx": ONNX_DTYPES, "genai": ONNX_DTYPES}


def lossless_dtype(fmt: "str | ExportFormat", source: str) -> str:
    """The dtype a `fmt` export can be asked for that keeps every value of `source` weights."""
    return source if source in TARGET_DTYPES.get(ExportFormat(fmt).value, (source,)) else "float32"


# onnxruntime's CPU provider, which GenAI folders name, dequantizes a float16 graph's INT8 weights at
# every step, a float32 graph's once, and fuses INT8 linears into integer kernels in float32 graphs
# only (docs/results/onnx_qdq_cpu.md)
INT8_GENAI_DTYPE = ("float32", "INT8 in a GenAI folder: onnxruntime's CPU provider dequantizes float16 graphs' INT8 "
                               "weights at every step, float32 ones' once (and fuses them, with --fused-int8)")


def default_dtype(fmt: "str | ExportFormat", quantized: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(dtype, why it differs from `DEFAULT_DTYPE`, or None) of a `fmt` export of a model quantized to
    `quantized` ("fp8", "int8" or None) when no dtype is asked for."""
    fmt = ExportFormat(fmt)
    if fmt is ExportFormat.GENAI and quantized == "int8":
        return INT8_GENAI_DTYPE
    return DEFAULT_DTYPE[fmt.value], None

Exporter = Callable[[Path, Path, ExportOptions, Optional[tuple]], dict]  # model_dir, out, options, source
_REGISTRY: dict[ExportFormat, Exporter] = {}


def register(fmt: ExportFormat):
    def decorator(fn: Exporter) -> Exporter:
        _REGISTRY[fmt] = fn
        return fn

    return decorator
