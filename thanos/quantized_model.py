"""A model's 8-bit state: the scales beside each quantized linear, in memory and on disk.

The weights of a quantized linear are stored dequantized (`thanos.quantize.dequantize`), so
transformers loads the directory as the plain model it is. In memory each such linear carries a
`LinearQuantization` as its attribute `thanos_quantization`; on disk the scales sit beside the
weights in `thanos_quantization.safetensors` (`<linear>.weight_scale` (out,) and
`<linear>.input_scale` (), fp32; the format in the metadata). `load_quantization_` reads them back
and checks that every weight is exactly its 8-bit values times its scales;
`simulate_activations_` rounds each quantized linear's input as an 8-bit runtime does, so the
perplexity and generations of the loaded model are those of the 8-bit model.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from thanos.errors import InputError
from thanos.linears import is_prunable, weight_view
from thanos.quantize import FORMATS, fake_quantize, grid_of

QUANTIZATION_FILE = "thanos_quantization.safetensors"
ATTRIBUTE = "thanos_quantization"
_HOOK = "_thanos_activation_hook"


@dataclasses.dataclass
class LinearQuantization:
    format: str  # a key of thanos.quantize.FORMATS
    weight_scale: torch.Tensor  # (out,) fp32 on the CPU, one per output channel
    input_scale: Optional[torch.Tensor] = None  # () fp32: the static scale of the linear's input, once calibrated


def quantization_of(module: nn.Module) -> Optional[LinearQuantization]:
    return getattr(module, ATTRIBUTE, None)


def set_quantization(module: nn.Module, value: LinearQuantization) -> None:
    setattr(module, ATTRIBUTE, value)


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """{full name: module} of the model's linears that carry 8-bit scales."""
    return {name: mod for name, mod in model.named_modules() if quantization_of(mod) is not None}


def model_format(model: nn.Module) -> Optional[str]:
    """The 8-bit format of a quantized model ("fp8", "int8"), or None for a model without scales."""
    formats = {quantization_of(mod).format for mod in quantized_linears(model).values()}
    return formats.pop() if len(formats) == 1 else (None if not formats else "mixed")


def layer_tensors(layer: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One decoder layer's scales as tensors named by module (for a layer checkpoint), and their formats."""
    tensors, formats = {}, {}
    for name, mod in layer.named_modules():
        quant = quantization_of(mod)
        if quant is None:
            continue
        formats[name] = quant.format
        tensors[f"{name}.weight_scale"] = quant.weight_scale
        if quant.input_scale is not None:
            tensors[f"{name}.input_scale"] = quant.input_scale
    return tensors, formats


def restore_layer_(layer: nn.Module, tensors: dict[str, torch.Tensor], formats: dict[str, str]) -> None:
    """Undo `layer_tensors`."""
    for name, fmt in formats.items():
        set_quantization(layer.get_submodule(name),
                         LinearQuantization(fmt, tensors[f"{name}.weight_scale"], tensors.get(f"{name}.input_scale")))


def save_quantization(model: nn.Module, directory: Path) -> Optional[Path]:
    """Write the model's scales beside its weights; nothing (None) for a model without any."""
    from safetensors.torch import save_file

    linears = quantized_linears(model)
    if not linears:
        return None
    tensors = {}
    for name, mod in linears.items():
        quant = quantization_of(mod)
        tensors[f"{name}.weight_scale"] = quant.weight_scale.float().contiguous()
        if quant.input_scale is None:
            raise InputError(f"{name} has weight scales but no input scale: the calibration pass that sets it "
                             "did not run")
        tensors[f"{name}.input_scale"] = quant.input_scale.float().reshape(())
    path = Path(directory) / QUANTIZATION_FILE
    save_file(tensors, str(path), metadata={"format": model_format(model),
                                            "weights": "symmetric, one scale per output channel",
                                            "activations": "symmetric, one static scale per linear input"})
    return path


def load_quantization_(model: nn.Module, directory: Path, simulate: bool = True) -> Optional[str]:
    """Attach the scales saved in `directory` to `model`'s linears; returns the format, or None without a file.

    Every weight is checked to be exactly its 8-bit values times its scales. With `simulate`,
    each quantized linear's input is rounded with its scale (`simulate_activations_`).
    """
    from safetensors import safe_open

    path = Path(directory) / QUANTIZATION_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            fmt = (f.metadata() or {}).get("format")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # a truncated or foreign file
        raise InputError(f"{path} is damaged ({type(exc).__name__}: {exc}); prune the model again") from exc
    if fmt not in FORMATS:
        raise InputError(f"{path} names format {fmt!r}, which this version cannot read; known: {', '.join(FORMATS)}")
    modules = dict(model.named_modules())
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    for name in names:
        mod = modules.get(name)
        scale = tensors.get(f"{name}.weight_scale")
        if mod is None or not is_prunable(mod) or scale is None or f"{name}.input_scale" not in tensors:
            raise InputError(f"{path}: the scales of {name} do not match the model beside them (no such linear, "
                             "or a scale missing); the directory was mixed from two runs: prune it again")
        if grid_of(weight_view(mod), scale, FORMATS[fmt]) is None:
            raise InputError(f"{path}: {name}.weight is not its {fmt} values times the saved scales; the weights or "
                             "the scales were changed after quantizing: prune the model again")
        set_quantization(mod, LinearQuantization(fmt, scale, tensors[f"{name}.input_scale"]))
    if simulate:
        simulate_activations_(model)
    return fmt


def simulate_activations_(model: nn.Module) -> None:
    """Round every quantized linear's input with its static scale before the product (idempotent)."""
    for mod in quantized_linears(model).values():
        if quantization_of(mod).input_scale is not None and not hasattr(mod, _HOOK):
            _round_inputs(mod)


def _round_inputs(mod: nn.Module) -> None:
    quant = quantization_of(mod)
    fmt, scale = FORMATS[quant.format], float(quant.input_scale)
    setattr(mod, _HOOK, mod.register_forward_pre_hook(
        lambda m, args: (fake_quantize(args[0], scale, fmt), *args[1:])))


def _stop_rounding(mod: nn.Module) -> None:
    handle = getattr(mod, _HOOK, None)
    if handle is not None:
        handle.remove()
        delattr(mod, _HOOK)


def stop_simulating_activations_(model: nn.Module) -> None:
    for mod in quantized_linears(model).values():
        _stop_rounding(mod)


@contextlib.contextmanager
def inputs_rounded(linears):
    """Within: each of `linears` (quantized, input scale set) rounds its input as the 8-bit runtime does."""
    added = [mod for mod in linears if not hasattr(mod, _HOOK)]
    for mod in added:
        _round_inputs(mod)
    try:
        yield
    finally:
        for mod in added:
            _stop_rounding(mod)


@contextlib.contextmanager
def activations_unrounded(model: nn.Module):
    """Within: the model's linears see their inputs unrounded (to trace a graph that quantizes them
    itself); on leaving, the rounding is back where it was on."""
    simulated = [mod for mod in quantized_linears(model).values() if hasattr(mod, _HOOK)]
    stop_simulating_activations_(model)
    try:
        yield
    finally:
        for mod in simulated:
            _round_inputs(mod)


def describe(model: nn.Module) -> Optional[dict]:
    """The model's 8-bit state for a summary: format and how many linears, or None."""
    linears = quantized_linears(model)
    if not linears:
        return None
    return dict(format=model_format(model), linears=len(linears),
                activations_simulated=all(hasattr(mod, _HOOK) for mod in linears.values()))


__all__ = ["QUANTIZATION_FILE", "LinearQuantization", "load_quantization_", "save_quantization",
           "simulate_activations_", "quantized_linears", "describe"]
