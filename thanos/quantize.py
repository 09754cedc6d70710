"""8-bit weights and activations for a pruned linear: pure tensor work, no modules.

Weights are quantized per output channel (one scale per row), symmetrically: `W ~ q * s` with
`q` on the format's grid (FP8 E4M3 up to 448, or the integers in [-127, 127]). Activations get
one static scale per linear input, from the largest magnitude seen in calibration, or
("per-token") a scale per token, from that token's largest magnitude, computed at run time. A
pruned weight is exactly 0 and its `q` is 0, so the n:m pattern survives quantization unchanged.

Two ways to pick `q`, both returned as dequantized fp32 values:

* `round_to_nearest`: each weight on its own.
* `compensated`: column by column, each column's rounding error is spread over the columns not
  yet quantized, through the factor `U` of the damped inverse Hessian (`inv(H) = U^T U`,
  docs/ALGORITHM.md section 6): the optimal-brain-quantization update GPTQ uses. The update is
  applied to kept weights only, never to a pruned position, so the support stays what the
  pruning chose.

The scales are rounded to the model's storage dtype before use, so `q * s` is exact in fp32 for
fp16 and bf16 models (at most 8 + 11 significant bits) and the stored weights are the one
rounding of that product to the storage dtype: what a DequantizeLinear in that dtype computes.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

import torch

from thanos.hessian import Curvature


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    qmax: float  # the largest magnitude on the grid
    dtype: torch.dtype  # how the 8-bit values are stored
    lowest: float  # where a runtime's QuantizeLinear saturates below (int8: -128, one past -qmax)


FORMATS = {
    "fp8": Format("fp8", 448.0, torch.float8_e4m3fn, -448.0),  # E4M3: 4 significant bits, max 448
    "int8": Format("int8", 127.0, torch.int8, -128.0),  # weights symmetric in [-127, 127]
}
INPUT_SCALES = ("static", "per-token")  # static: one constant per linear input, which QDQ graphs carry
ROUNDINGS = ("compensated", "nearest")  # compensated: the better of the two per linear, by output error
COMPENSATION_BLOCK = 32  # columns whose updates are applied lazily together (docs/results/quantize_cost_cpu.md)


def to_grid(x: torch.Tensor, fmt: Format, lowest: Optional[float] = None) -> torch.Tensor:
    """`x` (already divided by its scale) rounded to the nearest value of the format's grid, in fp32,
    saturating at +-qmax (or below at `lowest`)."""
    x = x.float().clamp(-fmt.qmax if lowest is None else lowest, fmt.qmax)
    if fmt.dtype == torch.int8:
        return torch.round(x)  # ties to even, like QuantizeLinear
    return x.to(fmt.dtype).to(torch.float32)  # the cast rounds to nearest even


def weight_scales(weight: torch.Tensor, fmt: Format, dtype: torch.dtype) -> torch.Tensor:
    """Per-row scales (r,) in fp32, each representable in `dtype` (the model's storage dtype).

    The row's largest magnitude maps to the grid's largest value; a row of zeros gets scale 1.
    """
    amax = weight.detach().abs().amax(dim=1).float()  # (r,)
    scale = (amax / fmt.qmax).to(dtype).float()
    tiny = torch.finfo(dtype).tiny
    return torch.where(amax > 0, scale.clamp(min=tiny), torch.ones_like(scale))


def dequantize(grid: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`grid * scale` per row, rounded once to `dtype`: the weights a runtime's dequantization sees."""
    return (grid.float() * scale.float()[:, None]).to(dtype)


def round_to_nearest(weight: torch.Tensor, scale: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Grid values (r, c) in fp32: every weight rounded on its own."""
    return to_grid(weight.float() / scale[:, None], fmt)


def compensation_factor(hessian: torch.Tensor, damp: float, layer: str = "layer") -> torch.Tensor:
    """`U` with inv(H + damp) = U^T U, never-active inputs given a unit diagonal: what `compensated`
    sweeps with (the driver takes it from the linears' shared `Curvature` instead)."""
    return Curvature(hessian.detach().float(), layer).factor(damp).upper


def compensated(weight: torch.Tensor, hessian: Optional[torch.Tensor], scale: torch.Tensor, fmt: Format,
                damp: float, layer: str = "layer", block: int = COMPENSATION_BLOCK,
                upper: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Grid values (r, c) in fp32, each column's rounding error compensated on the kept weights after it.

    `weight` (r, c) holds the pruned weights (zeros are pruned positions and stay zero);
    `hessian` (c, c) is the mean of x x^T over the calibration inputs; `upper`, if given, its
    `compensation_factor` computed once already (then `hessian` is not read).

    The updates land on every later column, pruned positions included, which is cheaper than
    masking them (in-place products, no r x c temporaries); a pruned position's value is never
    read, since its grid value and its error are set to zero, so the kept weights get exactly
    the masked update.
    """
    W = weight.detach().float().clone()  # (r, c), updated as columns are quantized
    pruned = W == 0
    U = compensation_factor(hessian, damp, layer) if upper is None else upper
    grid = torch.zeros_like(W)
    s = scale.float()  # (r,)
    columns = W.shape[1]
    for i1 in range(0, columns, block):
        i2 = min(i1 + block, columns)
        W1 = W[:, i1:i2]  # a view: the in-block updates write W
        E1 = torch.empty_like(W1)  # scaled errors, for the lazy update of the columns after the block
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            w, off = W1[:, j], pruned[:, i1 + j]
            g = to_grid(w / s, fmt).masked_fill_(off, 0.0)
            err = ((w - g * s) / U1[j, j]).masked_fill_(off, 0.0)
            W1[:, j + 1:].addr_(err, U1[j, j + 1:], alpha=-1)
            grid[:, i1 + j] = g
            E1[:, j] = err
        W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1)
    return grid


def activation_scale(amax: float, fmt: Format) -> float:
    """One static scale for a linear input whose largest calibration magnitude is `amax`."""
    return amax / fmt.qmax if amax > 0 else 1.0


def token_scales(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Per-token input scales (..., 1) in fp32: each token's largest magnitude maps to the grid's largest
    value (a token of zeros gets scale 1)."""
    top = x.detach().float().abs().amax(-1, keepdim=True)
    return torch.where(top > 0, top / fmt.qmax, torch.ones_like(top))


def input_scale_of(x: torch.Tensor, static: Optional[float], fmt: Format) -> "float | torch.Tensor":
    """The scale `x` is rounded with: the `static` one, or (None) each token's own (`token_scales`)."""
    return token_scales(x, fmt) if static is None else static


def input_grid(x: torch.Tensor, scale: "float | torch.Tensor", fmt: Format) -> torch.Tensor:
    """A linear input's 8-bit values (fp32) under its static `scale` (or per-token scales `token_scales`):
    ONNX's QuantizeLinear (TensorRT's too: int8 inputs saturate at -128 below, not -127)."""
    return to_grid(x.float() / scale, fmt, fmt.lowest)


def fake_quantize(x: torch.Tensor, scale: "float | torch.Tensor", fmt: Format) -> torch.Tensor:
    """`x` through quantize and dequantize with `scale`, in `x`'s dtype: what an 8-bit runtime feeds its GEMM."""
    return (input_grid(x, scale, fmt) * scale).to(x.dtype)


@dataclasses.dataclass
class QuantizationReport:
    """What quantizing one linear did (its "quantization" entry in thanos_report.json)."""

    format: str
    rounding: str  # what was kept: "compensated" or "nearest"
    error: float  # relative output error of the quantized weights against the unquantized ones
    nearest_error: float  # the same for round-to-nearest, the baseline compensation must beat
    seconds: float
    input_scale: Optional[float] = None  # set after the layer's final calibration pass (static inputs)
    input_amax: Optional[float] = None


@dataclasses.dataclass
class QuantizedWeight:
    weight: torch.Tensor  # (r, c) the dequantized values, in the input weight's dtype
    scale: torch.Tensor  # (r,) fp32, representable in that dtype
    report: QuantizationReport


def quantize_weight(weight: torch.Tensor, hessian: Optional[torch.Tensor], fmt: Format, rounding: str = "compensated",
                    damp: float = 0.01, layer: str = "layer",
                    curvature: Optional[Curvature] = None) -> QuantizedWeight:
    """Quantize one (pruned) weight (r, c) per output channel; zeros stay zeros.

    With `rounding="compensated"` and the statistics `hessian` (c, c), the compensated values are
    kept only where their output error is below round-to-nearest's, so compensation never makes a
    linear worse. The errors are of the undamped `hessian` (0 without one), each from one
    triangular solve with the damped factor the compensation sweeps with (`Curvature.quadratic`:
    half a product's flop). `curvature`: the hessian's, when the caller shares one (and its
    factor) between linears.
    """
    start = time.perf_counter()
    scale = weight_scales(weight, fmt, weight.dtype)
    W = weight.detach().float()
    if curvature is None and hessian is not None:
        curvature = Curvature(hessian.detach().float(), layer)
    base = curvature.quadratic(W, damp) if curvature is not None else 0.0

    def measured(grid: torch.Tensor) -> tuple[torch.Tensor, float]:
        values = dequantize(grid, scale, weight.dtype)
        if curvature is None:
            return values, 0.0
        num = curvature.quadratic(values.float() - W, damp)
        return values, num / base if base > 0 else num

    values, nearest_error = measured(round_to_nearest(W, scale, fmt))
    error, kept = nearest_error, "nearest"
    if rounding == "compensated" and curvature is not None:
        grid = compensated(W, None, scale, fmt, damp, layer, upper=curvature.factor(damp).upper)
        candidate, candidate_error = measured(grid)
        if candidate_error < nearest_error:
            values, error, kept = candidate, candidate_error, "compensated"
    report = QuantizationReport(fmt.name, kept, error, nearest_error, time.perf_counter() - start)
    return QuantizedWeight(values, scale, report)


def grid_of(weight: torch.Tensor, scale: torch.Tensor, fmt: Format) -> Optional[torch.Tensor]:
    """The 8-bit values (in the format's dtype) behind dequantized weights, or None if `weight` is not
    exactly `dequantize(values, scale)`: a file edited after quantizing, or scales that do not belong to it."""
    grid = to_grid(weight.float() / scale.float()[:, None], fmt)
    if not torch.equal(dequantize(grid, scale, weight.dtype), weight):
        return None
    return grid.to(fmt.dtype)  # grid values are exact in the 8-bit dtype
