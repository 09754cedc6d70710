"""A model's 8-bit state: the scales beside each quantized linear, in memory and on disk.

The weights of a quantized linear are stored dequantized (`thanos.quantize.dequantize`), so
transformers loads the directory as the plain model it is. In memory each such linear carries a
`LinearQuantization` as its attribute `thanos_quantization`; on disk the scales sit beside the
weights in `thanos_quantization.safetensors` (`<linear>.weight_scale` (out,) and
`<linear>.input_scale` (), fp32; the format and the input scaling in the metadata: with
"per-token" inputs there is no input scale, each token gets its own at run time).
`load_quantization_` reads them back and checks that every weight is exactly its 8-bit values
times its scales; `simulate_activations_` rounds each quantized linear's input as an 8-bit runtime
does, so the perplexity and generations of the loaded model are those of the 8-bit model.
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
from thanos.quantize import FORMATS, INPUT_SCALES, dequantize, fake_quantize, grid_of, input_scale_of

QUANTIZATION_FILE = "thanos_quantization.safetensors"
ATTRIBUTE = "thanos_quantization"
_HOOK = "_thanos_activation_hook"
ACTIVATIONS = {"static": "symmetric, one static scale per linear input",  # the file's metadata, in words
               "per-token": "symmetric, one scale per token, from its largest magnitude at run time"}


@dataclasses.dataclass
class LinearQuantization:
    format: str  # a key of thanos.quantize.FORMATS
    weight_scale: torch.Tensor  # (out,) fp32 on the CPU, one per output channel
    input_scale: Optional[torch.Tensor] = None  # () fp32: the static scale of the linear's input, once calibrated
    inputs: str = "static"  # or "per-token": no input scale, each token's own at run time

    @property
    def per_token(self) -> bool:
        return self.inputs == "per-token"

    @property
    def inputs_ready(self) -> bool:
        """Whether the input can be rounded: per-token always, static once its scale is calibrated."""
        return self.per_token or self.input_scale is not None


def quantization_of(module: nn.Module) -> Optional[LinearQuantization]:
    return getattr(module, ATTRIBUTE, None)


def set_quantization(module: nn.Module, value: LinearQuantization) -> None:
    setattr(module, ATTRIBUTE, value)


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """{full name: module} of the model's linears that carry 8-bit scales."""
    return {name: mod for name, mod in model.named_modules() if quantization_of(mod) is not None}


def _shared(model: nn.Module, field: str) -> Optional[str]:
    """The value of `field` every quantized linear has, "mixed" if they differ, None without any."""
    values = {getattr(quantization_of(mod), field) for mod in quantized_linears(model).values()}
    return values.pop() if len(values) == 1 else (None if not values else "mixed")


def model_inputs(model: nn.Module) -> Optional[str]:
    """How a quantized model scales its linears' inputs ("static", "per-token"), or None without scales."""
    return _shared(model, "inputs")


def model_format(model: nn.Module) -> Optional[str]:
    """The 8-bit format of a quantized model ("fp8", "int8"), or None for a model without scales."""
    return _shared(model, "format")


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
    """Undo `layer_tensors`. A layer is saved once its static input scales are set, so a linear saved
    without one scales its inputs per token."""
    for name, fmt in formats.items():
        input_scale = tensors.get(f"{name}.input_scale")
        set_quantization(layer.get_submodule(name),
                         LinearQuantization(fmt, tensors[f"{name}.weight_scale"], input_scale,
                                            "static" if input_scale is not None else "per-token"))


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
        if not quant.inputs_ready:
            raise InputError(f"{name} has weight scales but no input scale: the calibration pass that sets it "
                             "did not run")
        if not quant.per_token:
            tensors[f"{name}.input_scale"] = quant.input_scale.float().reshape(())
    inputs = model_inputs(model)
    path = Path(directory) / QUANTIZATION_FILE
    save_file(tensors, str(path), metadata={"format": model_format(model), "inputs": inputs,
                                            "weights": "symmetric, one scale per output channel",
                                            "activations": ACTIVATIONS[inputs]})
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
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # a truncated or foreign file
        raise InputError(f"{path} is damaged ({type(exc).__name__}: {exc}); prune the model again") from exc
    fmt = metadata.get("format")
    inputs = metadata.get("inputs", "static")  # files from before per-token inputs say nothing
    if fmt not in FORMATS or inputs not in INPUT_SCALES:
        raise InputError(f"{path} names format {fmt!r} with {inputs!r} inputs, which this version cannot read; "
                         f"known: {', '.join(FORMATS)} with {' or '.join(INPUT_SCALES)} inputs")
    modules = dict(model.named_modules())
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    for name in names:
        mod = modules.get(name)
        scale = tensors.get(f"{name}.weight_scale")
        has_input_scale = f"{name}.input_scale" in tensors
        if mod is None or not is_prunable(mod) or scale is None or has_input_scale != (inputs == "static"):
            raise InputError(f"{path}: the scales of {name} do not match the model beside them (no such linear, "
                             "or a scale missing); the directory was mixed from two runs: prune it again")
        if grid_of(weight_view(mod), scale, FORMATS[fmt]) is None:
            raise InputError(f"{path}: {name}.weight is not its {fmt} values times the saved scales; the weights or "
                             "the scales were changed after quantizing: prune the model again")
        set_quantization(mod, LinearQuantization(fmt, scale, tensors.get(f"{name}.input_scale"), inputs))
    if simulate:
        simulate_activations_(model)
    return fmt


def saved_inputs(directory: Path) -> Optional[str]:
    """How the 8-bit model saved in `directory` scales its inputs (read from the metadata alone), or None."""
    from safetensors import safe_open

    path = Path(directory) / QUANTIZATION_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("inputs", "static")
    except Exception:  # noqa: BLE001 a damaged file is reported by the full read that follows
        return None


def simulate_activations_(model: nn.Module) -> None:
    """Round every quantized linear's input with its scale before the product (idempotent)."""
    for mod in quantized_linears(model).values():
        if quantization_of(mod).inputs_ready and not hasattr(mod, _HOOK):
            _round_inputs(mod)


def _round_inputs(mod: nn.Module) -> None:
    quant = quantization_of(mod)
    fmt, static = FORMATS[quant.format], None if quant.per_token else float(quant.input_scale)
    setattr(mod, _HOOK, mod.register_forward_pre_hook(
        lambda m, args: (fake_quantize(args[0], input_scale_of(args[0], static, fmt), fmt), *args[1:])))


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
    """Within: each of `linears` (quantized, inputs ready) rounds its input as the 8-bit runtime does."""
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


@torch.no_grad()
def cast_model_(model: nn.Module, dtype: torch.dtype) -> None:
    """`model.to(dtype)`, with every quantized linear's weight dequantized anew in `dtype` from its
    8-bit values and scales (one rounding of their product, as a runtime's DequantizeLinear computes
    it) instead of its stored values rounded a second time: the 8-bit model is unchanged, and its
    weights stay exactly its values times its scales, which the exports check. A bfloat16 model's
    weights moved to float16 by a plain cast are no longer that (bfloat16's rounding, then float16's)."""
    grids = {}
    for name, mod in quantized_linears(model).items():
        quant = quantization_of(mod)
        weight = weight_view(mod)
        if weight.dtype == dtype:  # exact in it already: checked when its scales were attached
            continue
        grid = grid_of(weight, quant.weight_scale.to(weight.device), FORMATS[quant.format])
        if grid is None:
            raise InputError(f"{name}'s weights are not its {quant.format} values times its scales (changed after "
                             "quantizing); prune the model again")
        grids[mod] = grid
    model.to(dtype)
    for mod, grid in grids.items():
        weight = weight_view(mod)
        weight.copy_(dequantize(grid, quantization_of(mod).weight_scale.to(weight.device), dtype))


def describe(model: nn.Module) -> Optional[dict]:
    """The model's 8-bit state for a summary: format and how many linears, or None."""
    linears = quantized_linears(model)
    if not linears:
        return None
    return dict(format=model_format(model), inputs=model_inputs(model), linears=len(linears),
                activations_simulated=all(hasattr(mod, _HOOK) for mod in linears.values()))


__all__ = ["QUANTIZATION_FILE", "LinearQuantization", "load_quantization_", "save_quantization",
           "simulate_activations_", "quantized_linears", "cast_model_", "describe"]
