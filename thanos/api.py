"""`prune_weight`: the one public entry point to every solver."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import torch

from thanos.config import ConfigError, Pattern, PruneConfig
from thanos.devices import tf32_products_on
from thanos.errors import ThanosExportError
from thanos.hessian import Curvature
from thanos.mask_search import SearchResult
from thanos.quantize import QuantizationReport
from thanos.recipe import MaskSearch, Quantize, Refit
from thanos.solvers import SolverOutput
from thanos.solvers.thanos import DEFAULT_SOLVE_MEMORY


class PruningError(ThanosExportError, RuntimeError):
    """A solver produced something unusable (NaN or Inf); the message names the layer."""


@dataclasses.dataclass
class PruneResult:
    weight: torch.Tensor  # same shape, dtype and device as the input weight
    mask: torch.Tensor  # bool, True where a weight was removed
    config: PruneConfig
    sparsity: float  # fraction of removed weights
    error: Optional[float]  # relative reconstruction error ||(W'-W)X||^2 / ||WX||^2, if H given
    damp_used: float
    damp_escalations: int
    seconds: float  # the whole solve: mask search, refit, 8-bit step and the error measurement included
    refit_seconds: float = 0.0
    search_seconds: float = 0.0
    mask_changed: float = 0.0  # share of entries the mask search moved between removed and kept
    scale: Optional[torch.Tensor] = None  # (r,) fp32 per-row scales, when the recipe quantizes to 8 bits
    quantization: Optional[QuantizationReport] = None


def prune_weight(
    weight: torch.Tensor,
    hessian: Optional[torch.Tensor],
    method: "str | PruneConfig" = "thanos",
    pattern: "str | Pattern" = "2:4",
    sparsity: Optional[float] = None,
    block_size: Optional[int] = None,
    alpha: float = 0.0,
    damp: float = 0.01,
    *,
    refit_iterations: Optional[int] = None,
    mask_search_iterations: Optional[int] = None,
    preset: Optional[str] = None,
    name: str = "layer",
    solve_memory: int = DEFAULT_SOLVE_MEMORY,
    progress: Optional[Callable[[int, int], None]] = None,
    quantize: bool = True,
    curvature: Optional[Curvature] = None,
) -> PruneResult:
    """Prune one linear weight (r x c) given its input statistics `hessian` (c x c, mean x x^T).

    Pass a `PruneConfig` as the third argument, or its fields as keyword arguments: `method` is
    thanos, sparsegpt, wanda or magnitude (magnitude needs no hessian; wanda also accepts the
    diagonal alone as a (c,) tensor); see `PruneConfig` for the rest. Runs on the weight's
    device in fp32 whatever the weight's dtype, and returns the weight in its own dtype.

    `progress(columns_done, columns)` is called after each block by the block solvers (thanos,
    sparsegpt). A recipe with the 8-bit step returns the dequantized 8-bit weight and its `scale`;
    `quantize=False` leaves that step to the caller (the model driver quantizes a decoder layer
    once it is final, and adds the activation scales). `curvature`: `hessian`'s
    `thanos.hessian.Curvature`, when the caller prunes several linears that read the same input.
    """
    if isinstance(method, PruneConfig):
        config = method
    else:
        config = PruneConfig(method, Pattern.parse(pattern), sparsity, block_size, alpha, damp, refit_iterations,
                             mask_search_iterations, preset=preset)
    _check_inputs(weight, hessian, config, name)
    recipe = config.recipe
    solve, search, refit = recipe.solve, recipe.get(MaskSearch), recipe.get(Refit)
    start = _synchronized_clock(weight)
    W = weight.detach().to(torch.float32).clone()  # (r, c) fp32 working copy
    H = None if hessian is None else hessian.detach().to(device=W.device, dtype=torch.float32)
    full_h = H is not None and H.dim() == 2
    after = full_h and (refit or search)
    target = W.clone() if after else W  # the solvers modify W in place
    if full_h and curvature is None:
        curvature = Curvature(H, name)
    out = solve.run(W, H, recipe.pattern, recipe.sparsity, name, solve_memory, progress,
                    curvature if full_h else None)
    damp = max(out.damp_used, solve.damp)
    search_start = _synchronized_clock(weight)
    found = None
    if search and full_h:
        found = search.run(out.weight, out.mask, target, curvature, damp, recipe.pattern, name)
    refit_start = _synchronized_clock(weight)
    changed, chosen_error = _refit_(out, found, target, curvature.damped(damp), refit) if full_h else (0.0, None)
    refit_seconds = _synchronized_clock(weight) - refit_start
    if not torch.isfinite(out.weight).all():
        raise PruningError(
            f"{name}: pruning produced NaN or Inf weights (method {config.method}); check the layer's "
            "calibration statistics for NaN, or raise --damp"
        )
    pruned, scale, quantized = out.weight.to(weight.dtype), None, None
    if quantize and recipe.get(Quantize):
        # at the solve's own damping: its factor is cached under it, escalated or not (the same matrix)
        result = recipe.get(Quantize).run(pruned, H if full_h else None, solve.damp, name,
                                          curvature if full_h else None)
        pruned, scale, quantized = result.weight, result.scale, result.report
    error = None
    if full_h:
        original = weight.detach().to(W)
        if (pruned is out.weight and chosen_error is not None and found.target_energy is not None
                and not tf32_products_on(weight.device)):
            # fp32, not quantized: the search and the comparison after it computed both sums
            error = _relative_error(original, pruned, curvature, damp, chosen_error, found.target_energy)
        else:
            error = _output_error(original, pruned.float(), curvature, solve.damp)
    # the error's measurement counted: the driver reports one for every linear, so it is solve time
    seconds = _synchronized_clock(weight) - start
    return PruneResult(
        weight=pruned,
        mask=out.mask,
        config=config,
        sparsity=float(out.mask.float().mean()),
        error=error,
        damp_used=out.damp_used,
        damp_escalations=out.escalations,
        seconds=seconds,
        refit_seconds=refit_seconds,
        search_seconds=refit_start - search_start,
        mask_changed=changed,
        scale=scale,
        quantization=quantized,
    )


def _refit_(out: SolverOutput, found: Optional[SearchResult], target: torch.Tensor, Hd: torch.Tensor,
           step: Optional[Refit]) -> tuple[float, Optional[float]]:
    """Refit the searched support if the search found one, else the solver's; returns the share
    moved and, where it was computed, the `quadratic_error` of the weights kept.

    The search is kept when, refit, it is no worse than the solver's result as it stands (which
    it beat on every linear of the default model, docs/results/): then the solver's support is
    never refit, which halves the refit's cost. A search that loses even that comparison is
    dropped and the solver's support refit instead; the share moved is then 0. Both sides of the
    comparison are the errors the solver and the refit tracked where they did (a product each
    fewer per linear).
    """
    if found is not None:
        if step:
            searched, searched_error = step.run(found.weight, found.mask, target, Hd)
        else:
            searched = found.weight
            searched_error = quadratic_error(searched, target, Hd)
        solver_error = out.error if out.error is not None else quadratic_error(out.weight, target, Hd)
        if searched_error <= solver_error:
            out.weight, out.mask = searched, found.mask
            return found.changed, searched_error
    if step:
        out.weight = step.run(out.weight, out.mask, target, Hd).weight
    return 0.0, None


def _relative_error(original: torch.Tensor, pruned: torch.Tensor, curvature: Curvature, damp: float,
                    damped_error: float, target_energy: float) -> float:
    """`reconstruction_error(original, pruned, H)` from the damped errors the steps computed already:
    `damped_error` is `pruned`'s `quadratic_error`, `target_energy` the same sum for `original`
    against zero (the search's). Two (r x c) @ (c x c) products fewer per linear; equal to the
    direct formula to round-off."""
    numerator = max(curvature.undamped_error(damped_error, pruned - original, damp), 0.0)
    denominator = curvature.undamped_error(target_energy, original, damp)
    return numerator / denominator if denominator > 0 else numerator


def _output_error(original: torch.Tensor, pruned: torch.Tensor, curvature: Curvature, damp: float) -> float:
    """`reconstruction_error(original, pruned, H)` through the factor the solve made (at `damp`): two
    triangular solves (`Curvature.quadratic`), half the flop of the direct formula's two products;
    equal to it to round-off."""
    numerator = max(curvature.quadratic(pruned - original, damp), 0.0)
    denominator = curvature.quadratic(original, damp)
    return numerator / denominator if denominator > 0 else numerator


def quadratic_error(weight: torch.Tensor, target: torch.Tensor, Hd: torch.Tensor) -> float:
    """sum over rows of (w - t) Hd (w - t)^T, the objective the refit and the search minimise.

    One fp32 product (relative round-off about c * eps), summed in fp64."""
    delta = (weight - target).float()
    return float(((delta @ Hd.float()) * delta).sum(dtype=torch.float64))


def _synchronized_clock(weight: torch.Tensor) -> float:
    if weight.device.type == "cuda":
        torch.cuda.synchronize(weight.device)
    return time.perf_counter()


def _check_inputs(weight, hessian, config: PruneConfig, name: str) -> None:
    if weight.dim() != 2:
        raise ConfigError(f"{name}: weight must be 2-D (out_features x in_features), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ConfigError(f"{name}: weight must be a floating-point tensor, got {weight.dtype}")
    rows, cols = weight.shape
    pattern = config.pattern
    if pattern.is_nm and cols % pattern.m:
        raise ConfigError(
            f"{name}: {cols} input columns are not a multiple of m={pattern.m}, so pattern {pattern} cannot "
            f"tile the rows; exclude this layer or use pattern 'unstructured'"
        )
    if hessian is None:
        if config.method != "magnitude":
            raise ConfigError(f"{name}: method {config.method!r} needs the input statistics (hessian); "
                              "pass it, or use method 'magnitude'")
        return
    expected = (cols,) if config.method == "wanda" and hessian.dim() == 1 else (cols, cols)
    if tuple(hessian.shape) != expected:
        raise ConfigError(
            f"{name}: hessian has shape {tuple(hessian.shape)} but a weight with {cols} input columns needs "
            f"{cols} x {cols} (the mean of x x^T over inputs x of length {cols}); is the weight transposed?"
        )
    if not torch.isfinite(hessian).all():
        raise ConfigError(f"{name}: hessian contains NaN or Inf; recompute the calibration statistics")
