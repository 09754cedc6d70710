"""Exporters: from a pruned model directory to formats that runtimes load and accelerate.

One module per format, behind one registry keyed by `ExportFormat`:

    from exporters import export, ExportOptions, load_compact
    summary = export("onnx", "pruned/", "pruned-onnx/", ExportOptions(dtype="float16"))
"""
from __future__ import annotations

import dataclasses
import enum
import json
import logging
from pathlib import Path
from typing import Callable, Optional

from exporters.compact import load_compact

log = logging.getLogger(__name__)


class ExportFormat(str, enum.Enum):
    TORCH = "torch"
    ONNX = "onnx"
    TENSORRT = "tensorrt"
    SAFETENSORS = "safetensors"


class ExportError(RuntimeError):
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
    dtype: str = "float16"  # float32, float16 or bfloat16 (ONNX: float32 or float16)
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

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


Exporter = Callable[[Path, Path, ExportOptions], dict]
_REGISTRY: dict[ExportFormat, Exporter] = {}


def register(fmt: ExportFormat):
    def decorator(fn: Exporter) -> Exporter:
        _REGISTRY[fmt] = fn
        return fn

    return decorator


def export(fmt: "str | ExportFormat", model_dir: "str | Path", out: "str | Path",
           options: ExportOptions = ExportOptions()) -> dict:
    """Export a pruned model directory to `fmt`, verify it, and write `export_summary.json` in `out`."""
    fmt = ExportFormat(fmt)
    check_options_apply(fmt, options)
    _load_all()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = _REGISTRY[fmt](Path(model_dir), out, options)
    summary = dict(format=fmt.value, source=str(model_dir), options=options.to_json(), **summary)
    (out / "export_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


# Options that only some targets use: asking for one elsewhere is a mistake worth an error.
_OPTION_TARGETS = {
    "with_cache": ({"onnx", "tensorrt"}, "--with-cache"),
    "split_dense_rows": ({"onnx", "tensorrt", "torch"}, "--split-dense-rows"),
}


def check_options_apply(fmt: "str | ExportFormat", options: ExportOptions) -> None:
    """Raise ExportError for an option the target would ignore (before any work is done)."""
    fmt = ExportFormat(fmt)
    for field, (targets, flag) in _OPTION_TARGETS.items():
        if getattr(options, field) and fmt.value not in targets:
            raise ExportError(f"{flag} applies to the {' / '.join(sorted(targets))} targets, not {fmt.value}; "
                              "drop it, or pick one of those targets")


def _load_all() -> None:
    # Importing the modules registers them; heavy backends inside them stay lazy.
    from exporters import onnx_export, safetensors_compact, tensorrt_engine, torch_sparse  # noqa: F401


__all__ = ["ExportFormat", "ExportOptions", "ExportError", "BackendMissingError", "ValidationError",
           "check_options_apply", "export", "load_compact", "register"]
