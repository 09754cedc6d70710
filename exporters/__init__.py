"""Exporters: from a pruned model directory to formats that runtimes load and accelerate.

One module per format, behind one registry keyed by `ExportFormat`:

    from exporters import export, ExportOptions, load_compact
    summary = export("onnx", "pruned/", "pruned-onnx/", ExportOptions(dtype="float16"))
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional

from exporters.base import (_REGISTRY, BackendMissingError, ExportError, ExportFormat,
                            ExportOptions, ValidationError, check_inputs_carried, default_dtype, register)
from thanos.compact import load_compact
from thanos.model_config import (has_per_layer_shapes, has_recurrent_layers, is_mixture_of_experts, is_multimodal,
                                 saved_config)
from thanos.quantized_model import saved_inputs
from thanos.outputs import (begin_staging, check_disjoint, check_writable, commit_staging, discard_staging, output_lock,
                            write_error)

log = logging.getLogger(__name__)

SUMMARY_NAME = "export_summary.json"


def export(fmt: "str | ExportFormat", model_dir: "str | Path", out: "str | Path",
           options: ExportOptions = ExportOptions(), overwrite: bool = False, source: Optional[tuple] = None) -> dict:
    """Export a pruned model directory to `fmt`, verify it, and write `export_summary.json` in `out`.

    The export is built in a staging sibling of `out` and moved into place only once it is
    written and verified, so `out` never holds a half-written or unverified export. `out` must be
    new, empty, or (with `overwrite`) a previous export; it may not overlap `model_dir`.
    `source`: the (model, tokenizer, report) `model_dir` was just saved from, still in memory: the
    exporter uses it instead of reading the directory back (and may cast it in place).
    """
    fmt = ExportFormat(fmt)
    check_options_apply(fmt, options)
    check_traceable(fmt, model_dir)
    out = Path(out)
    if not Path(model_dir).exists():
        raise ExportError(f"{model_dir} does not exist; pass the pruned model directory that `thanos-export prune` "
                          "wrote")
    inputs = saved_inputs(Path(model_dir))
    if inputs:
        check_inputs_carried(fmt, inputs)
    check_disjoint(out, [model_dir])
    check_writable(out)
    with output_lock(out):
        check_export_dir(out, overwrite)
        return _export(fmt, Path(model_dir), out, options, source)


def _export(fmt: ExportFormat, model_dir: Path, out: Path, options: ExportOptions, source: Optional[tuple]) -> dict:
    _load_all()
    from exporters.source import saved_dtype, saved_format

    dtypes = dict(source=saved_dtype(Path(model_dir)))
    if options.dtype is None:
        dtype, why = default_dtype(fmt, saved_format(Path(model_dir)))
        options = dataclasses.replace(options, dtype=dtype)
        if why:
            dtypes["default"] = why
    dtypes["export"] = options.dtype or dtypes["source"]
    staging = begin_staging(out, [model_dir])
    try:
        summary = _REGISTRY[fmt](model_dir, staging, options, source)
        summary = relocated(dict(format=fmt.value, source=str(model_dir), options=options.to_json(), dtype=dtypes,
                                 **summary), str(staging), str(out))
        (staging / SUMMARY_NAME).write_text(json.dumps(summary, indent=1, default=str))
        commit_staging(staging, out)
    except Exception as exc:  # a full or read-only disk is one line; anything else as it was
        raise write_error(exc, out) or exc
    finally:
        discard_staging(staging)
    return summary


def check_export_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an `out` that holds something else, or an export without `overwrite`."""
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / SUMMARY_NAME).is_file():
        raise ExportError(f"{out} is not empty and holds no export; choose a new or empty --out")
    if not overwrite:
        raise ExportError(f"{out} already holds an export; pass --overwrite to replace it (once the new one is "
                          "verified) or choose another --out")


def relocated(value, old: str, new: str):
    """`value` with paths under the staging directory pointing where the output ends up."""
    if isinstance(value, str):
        return new + value[len(old):] if value.startswith(old) else value
    if isinstance(value, dict):
        return {k: relocated(v, old, new) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(relocated(v, old, new) for v in value)
    return value


ONNX_TARGETS = ("onnx", "genai", "tensorrt")  # built from a graph traced from the model's forward

# Options that only some targets use: asking for one elsewhere is a mistake worth an error.
_OPTION_TARGETS = {
    "with_cache": ({"onnx", "tensorrt"}, "--with-cache"),
    "split_dense_rows": ({"onnx", "genai", "tensorrt", "torch"}, "--split-dense-rows"),
    "fused_int8": ({"genai"}, "--fused-int8"),
}


def check_options_apply(fmt: "str | ExportFormat", options: ExportOptions) -> None:
    """Raise ExportError for an option the target would ignore or cannot take (before any work is done)."""
    fmt = ExportFormat(fmt)
    for field, (targets, flag) in _OPTION_TARGETS.items():
        if getattr(options, field) and fmt.value not in targets:
            raise ExportError(f"{flag} applies to the {' / '.join(sorted(targets))} targets, not {fmt.value}; "
                              "drop it, or pick one of those targets")
    if fmt.value in ONNX_TARGETS:
        low, high = opset_range()
        if not low <= options.opset <= high:
            raise ExportError(f"--opset {options.opset} is outside what the export can write here: {low} to {high} "
                              f"({low}: the lowest every supported family traces at; {high}: this torch's "
                              "exporter's highest); the default is 18")



# what the ONNX-based targets' graphs cannot carry, and why ({kind}: the config's model type)
_UNTRACEABLE = (
    (is_multimodal, "a vision-language checkpoint ({kind}); the onnx, genai and tensorrt targets export text-only "
                    "models"),
    (has_recurrent_layers, "a model with linear-attention, Mamba or convolution layers ({kind}), whose recurrent "
                           "state the onnx, genai and tensorrt graphs do not carry (they have a KV cache)"),
    (is_mixture_of_experts, "a mixture-of-experts model ({kind}), whose router picks experts per token: a graph "
                            "traced from the forward would keep the experts the example's tokens picked"),
    (has_per_layer_shapes, "a model whose layers differ in their attention's shape ({kind}: a per-layer config, as "
                           "Gemma 4's wider full-attention heads), where the graphs' KV cache has one head size for "
                           "all layers"),
)


def untraceable(config) -> Optional[str]:
    """Why the ONNX-based targets cannot carry a model (its config, or config.json's dict), or None: a
    vision-language checkpoint (Gemma 3 from 4B up; the trace would be of the multimodal forward), or
    one with linear-attention layers (Qwen3.5; a recurrent state where the graphs have a KV cache), a
    mixture of experts, or one whose layers' attention differs in shape (Gemma 4)."""
    kind = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return next((reason.format(kind=kind) for applies, reason in _UNTRACEABLE if applies(config)), None)


def check_traceable(fmt: "str | ExportFormat", model_dir: "str | Path | None") -> None:
    """Refuse, before any work, an ONNX-based target for a model its graphs cannot carry (`untraceable`)."""
    config = saved_config(model_dir) if ExportFormat(fmt).value in ONNX_TARGETS else None
    if config is None:
        return
    try:  # transformers' reading fills what the file leaves to defaults (Qwen3.5's layer kinds)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
    except Exception:  # custom code not allowed, an unknown family: the file as it is
        pass
    reason = untraceable(config)
    if reason:
        raise ExportError(f"{model_dir} is {reason}: use --target safetensors or torch, which keep it whole"
                          + (" (its language model pruned, its vision tower as it was)" if is_multimodal(config)
                             else ""))


def opset_range() -> tuple[int, int]:
    """The ONNX opsets an export may ask for: 14 (OPT's cumsum needs 11, every family was traced at
    14) up to the highest this torch's exporter writes."""
    from torch.onnx import _constants  # private, so read with a fallback: torch 2.6 to 2.13 have it

    return 14, int(getattr(_constants, "ONNX_MAX_OPSET", 20))


def check_backend(fmt: "str | ExportFormat", quantize: Optional[str] = None, inputs: str = "static",
                  dtype: Optional[str] = None) -> None:
    """Raise BackendMissingError now if `fmt` cannot be built on this machine (before any pruning),
    for a model quantized to `quantize` ("fp8", "int8") if given, with `inputs` scaled so, in
    `dtype` if given (ExportError if the target cannot carry that)."""
    fmt = ExportFormat(fmt)
    if quantize:
        check_inputs_carried(fmt, inputs)
    if fmt is ExportFormat.TENSORRT:
        import torch

        from exporters.tensorrt_engine import require_8bit_gpu, require_tensorrt

        require_tensorrt(dtype)
        if quantize:
            require_8bit_gpu(quantize, torch.cuda.get_device_capability(), torch.cuda.get_device_name())
    elif fmt is ExportFormat.GENAI:
        from exporters.genai import require_genai

        require_genai()
    elif fmt is ExportFormat.TORCH:
        from exporters.torch_8bit import require_8bit_sparse
        from exporters.torch_sparse import require_sparse_gpu

        device = require_sparse_gpu()
        if quantize:
            require_8bit_sparse(quantize, device)


def _load_all() -> None:
    # Importing the modules registers them; heavy backends inside them stay lazy.
    from exporters import genai, onnx_export, safetensors_compact, tensorrt_engine, torch_sparse  # noqa: F401


__all__ = ["ExportFormat", "ExportOptions", "ExportError", "BackendMissingError", "ValidationError",
           "check_backend", "check_options_apply", "export", "load_compact", "register", "relocated"]
