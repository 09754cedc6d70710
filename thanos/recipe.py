"""A pruning run as a recipe: the pattern and an ordered list of steps, each one object.

A step owns its options (with their defaults), their validation, and its work; what it did is
a record (a dataclass) in the report. The steps, in the order they run:

    Permute      reorder free channels before an n:m pattern groups them      (per decoder layer)
    Solve        the block solver: the mask and the compensated kept weights  (per linear)
    MaskSearch   ADMM over mask and weights, from the solver's result          (per linear)
    Refit        the kept weights re-solved on the final mask                  (per linear)
    Reconstruct  the pruned decoder layer tuned towards a target               (per decoder layer)
    Quantize     8-bit weights (per output channel) and activation scales      (per linear, after the rest)

`thanos.config.PruneConfig` builds a recipe from a preset and per-step overrides; every report
records it (`Recipe.to_json`), and `Recipe.from_json` reads it back, so a run can be repeated.
Adding a step: a frozen dataclass here with `kind`, its options, `check` and its work, an entry
in `STEPS`, and the call at its place in `thanos.api.prune_weight` or `thanos.driver.prune_layer`
(docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, ClassVar, Optional

import torch
from torch import nn

from thanos.devices import products_precision
from thanos.hessian import Curvature
from thanos.mask_search import RHO_EVERY, ScaledHessian, admm_mask_search
from thanos.pattern import ConfigError, Pattern
from thanos.permute import permute_free_channels_
from thanos.quantize import COMPENSATION_BLOCK, FORMATS, INPUT_SCALES, ROUNDINGS, QuantizedWeight, quantize_weight
from thanos.reconstruct import reconstruct_layer_
from thanos.refit import Refitted, refit_on_support
from thanos.smooth import AUTO
from thanos.solvers import SolverOutput
from thanos.solvers.magnitude import magnitude_prune
from thanos.solvers.sparsegpt import sparsegpt_prune
from thanos.solvers.thanos import thanos_prune
from thanos.solvers.wanda import wanda_prune

METHODS = ("thanos", "sparsegpt", "wanda", "magnitude")


@dataclasses.dataclass(frozen=True)
class Step:
    kind: ClassVar[str]

    def check(self, pattern: Pattern) -> None:
        """Raise ConfigError, naming the fix, if this step cannot work with `pattern`."""

    def to_json(self) -> dict:
        return {"step": self.kind, **dataclasses.asdict(self)}

    def cost(self, rows: int, cols: int) -> Optional["Cost"]:
        """The leading flop and memory terms of this step on one (rows x cols) linear; None if not per linear."""
        return None


@dataclasses.dataclass(frozen=True)
class Cost:
    """Leading terms of one step on one linear: fp32 flop (a multiply-add is 2) and the c x c and
    r x c matrices it holds at its peak, the Hessian included (what the plan turns into bytes)."""

    flop: float
    square: int  # c x c fp32 matrices held at once
    rect: int  # r x c fp32 matrices held at once (the model's own weight included)

    def nbytes(self, rows: int, cols: int) -> int:
        return 4 * (self.square * cols * cols + self.rect * rows * cols)


@dataclasses.dataclass(frozen=True)
class Permute(Step):
    """Reorder the channels a model family leaves free (`thanos.permute`), per decoder layer."""

    kind: ClassVar[str] = "permute"

    def check(self, pattern: Pattern) -> None:
        if not pattern.is_nm:
            raise ConfigError(f"channel permutations only change which channels share an n:m group; pattern "
                              f"{pattern} has no groups, so leave permute_channels off with it")

    def apply_(self, layer: nn.Module, prefix: str, layout, hessian_of: Callable, pattern: Pattern,
               ranges_of: Optional[Callable] = None) -> list:
        return permute_free_channels_(layer, prefix, layout, hessian_of, pattern, ranges_of)


@dataclasses.dataclass(frozen=True)
class Solve(Step):
    """One of the block solvers, or a one-shot mask (wanda, magnitude); `block_size` None = whole rows.

    `sequential`: within a decoder layer, the linears that read one input (q/k/v, o, gate/up, down)
    are solved group after group, each on statistics gathered once the groups before it are
    pruned (and, with the 8-bit step and nothing after the solves, quantized), so each sees the
    inputs the pruned layer gives it; otherwise every linear is solved on the dense layer's one
    pass (`thanos.driver.prune_layer`).
    """

    kind: ClassVar[str] = "solve"
    method: str = "thanos"
    block_size: Optional[int] = None
    alpha: float = 0.0  # fraction of outlier rows kept dense (Thanos)
    damp: float = 0.01  # Hessian damping, x mean(diag H)
    sequential: bool = False

    def check(self, pattern: Pattern) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not (0.0 <= self.alpha < 1.0):
            raise ConfigError(f"alpha (fraction of dense outlier rows) must be in [0, 1), got {self.alpha}")
        if self.alpha > 0 and self.method != "thanos":
            raise ConfigError(f"alpha (dense outlier rows) is a Thanos option; use alpha=0 with method {self.method!r}")
        if not (math.isfinite(self.damp) and self.damp > 0):
            raise ConfigError(f"damp must be a positive finite number (0.01 is the usual value), got {self.damp}")
        if self.block_size is not None:
            if self.block_size <= 0:
                raise ConfigError(f"block_size must be positive, got {self.block_size}")
            if pattern.is_nm and self.block_size % pattern.m:
                lower = max(pattern.m, self.block_size // pattern.m * pattern.m)
                raise ConfigError(f"block_size {self.block_size} is not a multiple of m={pattern.m} (pattern "
                                  f"{pattern}); use {lower} or {lower + pattern.m}")

    def cost(self, rows: int, cols: int) -> Cost:
        """Thanos: the factor (Cholesky and triangular inverse, 2c^3/3), the block updates (r c^2) and
        each block's rows of the inverse (B c^2); SparseGPT: the factor, the lazy updates (r c^2) and
        the in-block column updates (r B c). Holds H, its dead-input copy and the factor; the weight,
        its fp32 working copy and the copy the later steps aim at."""
        block = self.block_size or cols
        if self.method == "thanos":
            return Cost(rows * cols**2 + block * cols**2 + 2 * cols**3 / 3, 3, 3)
        if self.method == "sparsegpt":
            return Cost(rows * cols**2 + rows * block * cols + 2 * cols**3 / 3, 3, 3)
        return Cost(2 * rows * cols, 1, 2)

    def run(self, W: torch.Tensor, H: Optional[torch.Tensor], pattern: Pattern, sparsity: float, name: str,
            solve_memory: int, progress, curvature: Optional[Curvature] = None) -> SolverOutput:
        """Prune `W` (fp32, modified in place) given the statistics `H` (c x c, or the diagonal for wanda);
        `curvature`: what is derived from `H`, when linears share it."""
        if self.method == "thanos":
            return thanos_prune(W, H, pattern, sparsity, self.block_size, self.alpha, self.damp, layer=name,
                                solve_memory=solve_memory, progress=progress, curvature=curvature)
        if self.method == "sparsegpt":
            return sparsegpt_prune(W, H, pattern, sparsity, self.block_size, self.damp, layer=name, progress=progress,
                                   curvature=curvature)
        if self.method == "wanda":
            return wanda_prune(W, H if H.dim() == 1 else torch.diag(H), pattern, sparsity)
        return magnitude_prune(W, pattern, sparsity)


@dataclasses.dataclass(frozen=True)
class MaskSearch(Step):
    """ADMM over mask and weights, from the solver's result (`thanos.mask_search`)."""

    kind: ClassVar[str] = "mask_search"
    iterations: int = 10

    def check(self, pattern: Pattern) -> None:
        if self.iterations <= 0:
            raise ConfigError(f"mask search iterations must be positive, got {self.iterations}; leave the step out "
                              "for none")
        if pattern.kind == "columns":
            raise ConfigError("mask search moves single weights, which would break the 'columns' pattern; "
                              "use mask_search_iterations=0 with it")

    def cost(self, rows: int, cols: int) -> Cost:
        """The target's product and one Cholesky solve per iteration (2 r c^2 each), a factorisation
        per penalty value (c^3/3, a new value every RHO_EVERY iterations at most). Holds H, its
        dead-input, damped and scaled copies, the factor kept from the solve, the current and the
        first penalty's factors, and a copy being factorised; the weight, its working copy and the
        target, D, V, the target's product, the iterate, the kept-weight indicator and three
        buffers every iteration reuses."""
        factorisations = math.ceil(self.iterations / RHO_EVERY)
        return Cost(2 * rows * cols**2 * (self.iterations + 1) + factorisations * cols**3 / 3, 8, 12)

    def run(self, X, mask, target, curvature: Curvature, damp: float, pattern: Pattern, name: str = "layer"):
        """From the solver's `X` and `mask` towards `target`, on `curvature`'s Hessian damped by `damp`."""
        Hd = curvature.damped(damp)
        scaled = curvature.derived(("mask_search", damp), lambda: ScaledHessian.of(Hd))
        with products_precision():
            return admm_mask_search(X, mask, target, Hd, pattern, self.iterations, scaled, name)


@dataclasses.dataclass(frozen=True)
class Refit(Step):
    """The kept weights re-solved on the final mask by at most `iterations` of conjugate gradients,
    ending once one lowers the layer's error by less than `tolerance` of it (0: all of them;
    `thanos.refit`)."""

    kind: ClassVar[str] = "refit"
    iterations: int = 10
    tolerance: float = 0.0

    def check(self, pattern: Pattern) -> None:
        if self.iterations <= 0:
            raise ConfigError(f"refit iterations must be positive, got {self.iterations}; leave the step out for none")
        if not 0.0 <= self.tolerance < 1.0:
            raise ConfigError(f"refit tolerance must be in [0, 1) (a share of the layer's error; 0 runs every "
                              f"iteration), got {self.tolerance}")

    def cost(self, rows: int, cols: int) -> Cost:
        """One product per iteration (counted at the most) plus the first residual's (2 r c^2 each);
        the comparison with the solver's result after a search uses the errors both tracked. Holds H, its dead-input and damped
        copies and the factor; the weight, its copies, the kept-weight indicator and the five
        vectors of conjugate gradients with one buffer for their products."""
        return Cost(2 * rows * cols**2 * (self.iterations + 1), 4, 10)

    def run(self, X, mask, target, Hd: torch.Tensor) -> Refitted:
        """`X`'s kept weights re-solved towards `target` on `mask`, and their error; `Hd` the damped Hessian."""
        with products_precision():
            return refit_on_support(X, mask, target, Hd, self.iterations, self.tolerance)


RECONSTRUCT_TARGETS = ("layer", "dense")


@dataclasses.dataclass(frozen=True)
class Reconstruct(Step):
    """Each pruned decoder layer tuned towards `target` (`thanos.reconstruct`): the dense layer's
    outputs on the pruned path's inputs ("layer"), or the dense model's own activations ("dense")."""

    kind: ClassVar[str] = "reconstruct"
    epochs: int = 2
    lr: float = 1e-3
    target: str = "layer"

    def check(self, pattern: Pattern) -> None:
        if self.epochs <= 0 or not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"reconstruct_epochs must be positive and reconstruct_lr a positive finite number, got "
                              f"{self.epochs} and {self.lr}")
        if self.target not in RECONSTRUCT_TARGETS:
            raise ConfigError(f"reconstruct_target must be 'layer' (the dense layer's outputs) or 'dense' (the dense "
                              f"model's activations), got {self.target!r}")

    def apply_(self, layer, weights, inputs, targets, forward, indices, total, all_reduce):
        return reconstruct_layer_(layer, weights, inputs, targets, forward, self.epochs, self.lr, indices, total,
                                  all_reduce)


@dataclasses.dataclass(frozen=True)
class Quantize(Step):
    """8-bit weights and input scales (`thanos.quantize`), once the weights are final.

    `rounding`: "compensated" spreads each column's rounding error over the kept weights after it
    (kept only where it beats round-to-nearest), "nearest" rounds every weight on its own.
    `smoothing`: the migration strength of activation ranges into the weights before quantizing
    (`thanos.smooth`; 0: none; "auto": chosen per input from an estimate of the INT8 error).
    `inputs`: "static", one scale per linear input from calibration (what ONNX QDQ graphs and
    TensorRT carry), or "per-token", each token's own scale at run time (`--target torch` only).
    """

    kind: ClassVar[str] = "quantize"
    format: str = "fp8"
    rounding: str = "compensated"
    smoothing: "float | str" = 0.0
    inputs: str = "static"

    def check(self, pattern: Pattern) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"unknown 8-bit format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"unknown rounding {self.rounding!r}; choose one of {', '.join(ROUNDINGS)}")
        if self.inputs not in INPUT_SCALES:
            raise ConfigError(f"unknown input scaling {self.inputs!r}; choose one of {', '.join(INPUT_SCALES)}")
        if self.smoothing == AUTO:
            if self.format != "int8":
                raise ConfigError(f"smoothing 'auto' estimates INT8's evenly spaced grid; {self.format}'s grid is "
                                  "relative to each value, so pass a strength in [0, 1] (0, its default, "
                                  "measured as good as 0.5)")
        elif isinstance(self.smoothing, str) or not (0.0 <= self.smoothing <= 1.0):
            raise ConfigError(f"smoothing (the migration strength) must be in [0, 1] or 'auto', got "
                              f"{self.smoothing!r}; 0.5 is SmoothQuant's usual value, 0 turns it off")

    @property
    def smooths(self) -> bool:
        return self.smoothing == AUTO or self.smoothing > 0

    def cost(self, rows: int, cols: int) -> Cost:
        """Round-to-nearest's and the unquantized weight's errors (one triangular solve, r c^2, each);
        compensated: the lazy updates (r c^2), the in-block ones (r B c) and its own error. Holds H,
        its dead-input copy and the factor; the weight, its fp32 and working copies, the grid, both
        candidates' values and a solve's result."""
        if self.rounding == "compensated":
            return Cost(4 * rows * cols**2 + COMPENSATION_BLOCK * rows * cols, 3, 7)
        return Cost(2 * rows * cols**2, 3, 5)

    def run(self, weight: torch.Tensor, hessian: Optional[torch.Tensor], damp: float, name: str,
            curvature: Optional[Curvature] = None) -> QuantizedWeight:
        """`curvature`: `hessian`'s, whose factor the rounding and its errors then reuse instead of computing."""
        return quantize_weight(weight, hessian, FORMATS[self.format], self.rounding, damp, name, curvature)


STEPS: dict[str, type[Step]] = {cls.kind: cls for cls in (Permute, Solve, MaskSearch, Refit, Reconstruct, Quantize)}
ORDER = list(STEPS)  # the order steps run in


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The pattern, the sparsity it removes, and the steps that run, in order; validates itself."""

    pattern: Pattern
    sparsity: float
    steps: tuple[Step, ...]
    preset: Optional[str] = None  # the preset it was built from, if any (a label: the steps say everything)

    def __post_init__(self):
        kinds = [step.kind for step in self.steps]
        if kinds.count("solve") != 1:
            raise ConfigError(f"a recipe needs exactly one solve step, got {kinds.count('solve')}")
        if len(set(kinds)) != len(kinds) or kinds != sorted(kinds, key=ORDER.index):
            raise ConfigError(f"recipe steps {kinds} must each appear once, in the order {', '.join(ORDER)}")
        for step in self.steps:
            step.check(self.pattern)

    def get(self, cls: type) -> Optional[Step]:
        """The step of this class, or None when the recipe leaves it out."""
        return next((step for step in self.steps if isinstance(step, cls)), None)

    @property
    def solve(self) -> Solve:
        return self.get(Solve)

    def costs(self, rows: int, cols: int) -> dict[str, Cost]:
        """Each per-linear step's `Cost` on a (rows x cols) linear, by step kind, in the order they run."""
        return {step.kind: cost for step in self.steps if (cost := step.cost(rows, cols)) is not None}

    def to_json(self) -> dict:
        return dict(preset=self.preset, pattern=str(self.pattern), sparsity=self.sparsity,
                    steps=[step.to_json() for step in self.steps])

    @classmethod
    def from_json(cls, data: dict) -> "Recipe":
        """Read a recipe back (as `to_json` writes it, e.g. from a thanos_report.json); unknown names are refused."""
        try:
            steps = []
            for entry in data["steps"]:
                entry = dict(entry)
                kind = entry.pop("step")
                if kind not in STEPS:
                    raise ConfigError(f"unknown recipe step {kind!r}; known steps: {', '.join(ORDER)}")
                steps.append(STEPS[kind](**entry))
            return cls(Pattern.parse(data["pattern"]), float(data["sparsity"]), tuple(steps), data.get("preset"))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"not a readable recipe ({type(exc).__name__}: {exc}); a recipe is the \"recipe\" "
                              "object of a thanos_report.json: pattern, sparsity and a list of steps") from exc
