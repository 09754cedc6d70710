"""`--target torch` for an 8-bit model: 2:4 linears whose weights and inputs are 8-bit, on cuSPARSELt.

Each qualifying linear becomes a `Sparse8bitLinear`: its weight as the 8-bit values behind the
stored (dequantized) weight, compressed once (`torch._cslt_compress`); at run time its input is
rounded with the linear's static scale (or each token's own, `thanos.quantize.input_scale_of`)
exactly as the fake-quantized model rounds it (`thanos.quantize.fake_quantize`), multiplied on
cuSPARSELt (`torch._cslt_sparse_mm`; INT8 accumulates in int32, FP8 in fp32 and returns bf16),
and scaled back per output channel (and per token) in fp32.
FP8 needs compute capability 8.9+, and both need a torch whose cuSPARSELt takes that dtype: each
missing piece is refused, by name, before any work.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import nn

from exporters.base import BackendMissingError, ValidationError
from exporters.patterns import analyse
from thanos.experts import serve_experts_
from thanos.linears import stores_transposed, weight_view
from thanos.models import LayerSelection, prunable_linears
from thanos.quantize import FORMATS, Format, grid_of, input_grid, input_scale_of
from thanos.quantized_model import quantization_of, quantized_linears

# The dense operand's token count is padded to a multiple of this (zeros; their outputs are
# dropped): cuSPARSELt's 8-bit kernels take operands in multiples of 16 (FP8) / 32 (INT8) along
# each dimension, as the GEMM benchmark pads them (runtime_bench/gemm.py).
ALIGNMENT = {"fp8": 16, "int8": 32}
# What the kernel returns before the per-channel scales: exact int32 sums for INT8; FP8's
# cuSPARSELt product rounds its fp32 sums to bf16.
ACCUMULATOR = {"fp8": torch.bfloat16, "int8": torch.int32}


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A 2:4 8-bit product: `prepare(grid)` once per weight, then `multiply(prepared, q)` = grid @ q^T
    (out, tokens) in fp32, for q (tokens, in) in the weight's 8-bit dtype, tokens a multiple of `alignment`."""

    name: str
    prepare: Callable[[torch.Tensor], torch.Tensor]
    multiply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cusparselt_kernel(fmt: str) -> Kernel:
    out_dtype = ACCUMULATOR[fmt]
    return Kernel("cusparselt", torch._cslt_compress,
                  lambda compressed, q: torch._cslt_sparse_mm(compressed, q.t(), out_dtype=out_dtype).float())


class Sparse8bitLinear(nn.Module):
    """y = (W_q @ round(x / s_in)) * s_w * s_in + b, with W_q 2:4 and 8-bit, returned in the model's dtype.

    `input_scale` None: s_in is each token's own (`input_scale_of`), found at run time. Built on the
    device it runs on. The compressed weight and the scales are plain attributes, not buffers:
    `model.to(dtype)` would cast a float8 buffer and the fp32 scales.
    """

    def __init__(self, grid: torch.Tensor, weight_scale: torch.Tensor, input_scale: Optional[float], fmt: Format,
                 bias: Optional[torch.Tensor], dtype: torch.dtype, kernel: Kernel):
        super().__init__()
        self.fmt, self.kernel, self.dtype = fmt, kernel, dtype
        self.out_features, self.in_features = grid.shape
        self.input_scale = None if input_scale is None else float(input_scale)
        self.prepared = kernel.prepare(grid)
        self.output_scale = weight_scale.float().to(grid.device) * (self.input_scale or 1.0)  # (out,)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, "float | torch.Tensor"]:
        """x (tokens, in) as 8-bit values in the format's dtype, the grid the fake-quantized model rounds
        to, and its scale: the static one, or the tokens' own (tokens, 1)."""
        scale = input_scale_of(x, self.input_scale, self.fmt)
        return input_grid(x, scale, self.fmt).to(self.fmt.dtype), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        q, scale = self.quantize_input(x.reshape(-1, self.in_features))  # (tokens, in)
        tokens = q.shape[0]
        pad = -tokens % ALIGNMENT[self.fmt.name]
        if pad:
            q = torch.cat([q, torch.zeros(pad, self.in_features, dtype=q.dtype, device=q.device)])
        y = self.kernel.multiply(self.prepared, q)[:, :tokens].t() * self.output_scale  # (tokens, out) fp32
        if self.input_scale is None:
            y = y * scale
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(self.dtype).reshape(*lead, self.out_features)


@dataclasses.dataclass
class Sparse8bitReport:
    format: str
    kernel: str
    converted: list[str]
    dense: dict[str, str]  # name -> why it stays a fake-quantized dense linear


def require_8bit_sparse(fmt: str, device: torch.device) -> Kernel:
    """cuSPARSELt's 8-bit 2:4 kernel for `fmt`, once a probe ran it here; refused, naming what is
    missing, where this device or this torch has none."""
    device = torch.device(device)
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if fmt == "fp8" and capability < (8, 9):
            raise BackendMissingError(
                f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}; FP8 "
                "2:4 kernels need 8.9 or newer (Ada, Hopper): prune with --quantize int8 for this GPU")
    probe = torch.zeros(64, 64, device=device)
    probe[:, ::2] = 1.0  # 2:4 along K
    probe = probe.to(FORMATS[fmt].dtype)
    try:  # one compression and one product, as every converted linear will run them
        kernel = cusparselt_kernel(fmt)  # a torch without the ops has no attribute
        kernel.multiply(kernel.prepare(probe), probe[:ALIGNMENT[fmt]])
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        first_line = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise BackendMissingError(
            f"torch {torch.__version__} has no cuSPARSELt kernel for {fmt} 2:4 weights on {device} "
            f"({type(exc).__name__}: {first_line}); use --target tensorrt for an 8-bit 2:4 engine, or a CUDA "
            "torch built with cuSPARSELt 0.6+") from exc
    return kernel


@torch.no_grad()
def reference_run(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The fake-quantized model's logits on `ids` (fp32), and {name: (quantized linear, the input it
    received, already rounded)}: what `check_linears` compares the converted linears with."""
    linears = quantized_linears(model)
    inputs, hooks = {}, []
    for name, mod in linears.items():
        hooks.append(mod.register_forward_hook(lambda m, args, output, name=name: inputs.__setitem__(name, args[0])))
    try:
        logits = model(ids, use_cache=False).logits.float()
    finally:
        for hook in hooks:
            hook.remove()
    return logits, {name: (mod, inputs[name]) for name, mod in linears.items()}


@torch.no_grad()
def check_linears(model: nn.Module, captured: dict) -> dict:
    """Each converted linear against the fake-quantized one it replaced, on that one's own input.

    `captured[name]` is (the replaced module, its input as it received it, already rounded). The
    reference is that input times the replaced module's stored weight (its dequantized 8-bit
    values), in float64 (so TF32, where allowed, cannot blur it). The bound per output: (|x| @ |W|^T) times the round-off of fp32 sums over
    K, the kernel's own output rounding (bf16 for FP8) and twice the model dtype's (the rounded
    input and the weight are stored in it), plus the model dtype's rounding of the output.
    Raises ValidationError past it; returns the largest share of the bound used.
    """
    worst = 0.0
    for name, (replaced, x) in captured.items():
        module = model.get_submodule(name)
        W = weight_view(replaced).double()  # (out, in)
        x2 = x.reshape(-1, module.in_features).double()
        reference = x2 @ W.t()
        bias = getattr(replaced, "bias", None)
        if bias is not None:
            reference = reference + bias.double()
        got = module(x).reshape(-1, module.out_features).double()
        eps = torch.finfo(module.dtype).eps
        accumulator = ACCUMULATOR[module.fmt.name]
        kernel_rounding = torch.finfo(accumulator).eps if accumulator.is_floating_point else 0.0
        bound = ((x2.abs() @ W.abs().t()) * (module.in_features * torch.finfo(torch.float32).eps + kernel_rounding
                                              + 2 * eps) + eps * reference.abs() + torch.finfo(torch.float32).tiny)
        share = float(((got - reference).abs() / bound).max())
        if not share <= 1.0:  # NaN too
            raise ValidationError(f"{name}: the 8-bit 2:4 linear's outputs", float((got - reference).abs().max()),
                                  float(bound.max()))
        worst = max(worst, share)
    return dict(linears=len(captured), largest_share_of_bound=worst)


@torch.no_grad()
def to_8bit_semi_structured_(model: nn.Module, kernel: Optional[Kernel] = None) -> Sparse8bitReport:
    """Replace every qualifying quantized linear of `model` in place by a `Sparse8bitLinear`.

    `kernel`: the product to use (default: cuSPARSELt, after `require_8bit_sparse`). A linear
    stays the fake-quantized dense one it was, listed with the reason, where its weight is not
    exact 2:4 along K, its sizes are not multiples of the kernel's alignment, or its input scale was never set.
    """
    fmt_name = None
    converted, dense = [], {}
    for layer in prunable_linears(model, LayerSelection()).values():
        for name, mod in layer.items():
            quant = quantization_of(mod)
            if quant is None:
                dense[name] = "not quantized"
                continue
            fmt_name = quant.format
            if kernel is None:
                kernel = require_8bit_sparse(fmt_name, weight_view(mod).device)
            grid, reason = _grid_or_reason(name, mod, quant)
            if grid is None:
                dense[name] = reason
                continue
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    Sparse8bitLinear(grid, quant.weight_scale, None if quant.per_token else float(quant.input_scale),
                                     FORMATS[quant.format],
                                     getattr(mod, "bias", None), weight_view(mod).dtype, kernel))
            converted.append(name)
    serve_experts_(model)  # an expert no token is routed to is not called with zero rows
    return Sparse8bitReport(fmt_name or "-", kernel.name if kernel else "-", converted, dense)


def _grid_or_reason(name: str, mod: nn.Module, quant) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """The 8-bit values behind `mod`'s weight, or why it cannot become a `Sparse8bitLinear`."""
    if stores_transposed(mod):
        return None, "GPT-2 Conv1D (x @ W) is not an nn.Linear"
    if not quant.inputs_ready:
        return None, "no input scale"
    weight = weight_view(mod)
    alignment = ALIGNMENT[quant.format]
    if any(size % alignment for size in weight.shape):
        return None, f"{tuple(weight.shape)} is not a multiple of {alignment} in both sizes ({quant.format} kernels)"
    info = analyse(name, weight, "cusparselt")
    if not info.hardware_2to4:
        return None, info.reason
    grid = grid_of(weight, quant.weight_scale.to(weight.device), FORMATS[quant.format])
    if grid is None:
        return None, "the stored weight is not its 8-bit values times its scales"
    return grid, None
