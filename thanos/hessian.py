"""Layer statistics (docs/ALGORITHM.md section 1) and the damped inverse factor (section 6).

`HessianAccumulator` streams calibration inputs into `H = X X^T / N` without keeping them.
`inverse_upper_factor` returns `U` with `inv(H + damping) = U^T U`, escalating the damping when a
factorisation fails, which is all the block solvers need. `Curvature` holds what the steps
derive from one Hessian (its factor, its damped copy), computed once for all linears that read it.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch

from thanos.errors import ThanosExportError

log = logging.getLogger(__name__)

MAX_DAMP_ESCALATIONS = 6


class FactorizationError(ThanosExportError, RuntimeError):
    """The damped Hessian stayed singular after every escalation."""


# Rows of the upper triangle `add` forms per product on the CPU: halves the products' flop, and
# keeps each temporary small (converting a whole fresh c x c one to fp64 cost more than an expert's
# product of a few tokens: docs/results/README.md, round 20). A GPU's allocator reuses its
# temporaries, and each block is a kernel launch, hundreds per sample for a layer of experts:
# there at most GPU_BLOCKS blocks.
ROW_BLOCK = 256
GPU_BLOCKS = 8


class HessianAccumulator:
    """Mean of `x x^T` over calibration tokens: fp32 products per call, summed in fp64.

    >>> acc = HessianAccumulator(576)
    >>> acc.add(hidden_states)          # (..., 576), any float dtype; nothing is stored
    >>> acc.hessian                      # (576, 576) fp32, mean over all tokens seen

    The driver adds one calibration sample per call, so each sample's fp32 product is the same
    however the samples are sharded over processes; adding those in fp64 is exact unless they
    span more than 2^29 in magnitude, and what is left after rounding to fp32 is the same in
    any order: one process and N ranks (`thanos.parallel`) read the same Hessian. Only the upper
    triangle is summed (a block of rows at a time; `sum` holds partial sums below it), and
    reading mirrors it: the Hessian is exactly symmetric.
    Reading `hessian` ends the accumulation (the fp64 sum is freed); the fp32 mean it returns
    may be changed in place (reordered, `thanos.permute`) and is what later readers get.
    """

    def __init__(self, columns: int, device: "torch.device | str | None" = None):
        self.columns = columns
        self.sum: Optional[torch.Tensor] = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self.tokens = 0
        self._mean: Optional[torch.Tensor] = None

    def add(self, inputs: torch.Tensor) -> None:
        if inputs.shape[-1] != self.columns:
            raise ValueError(f"inputs have {inputs.shape[-1]} features, the accumulator expects {self.columns}")
        if self.sum is None:
            raise RuntimeError("these statistics were already read; start a new HessianAccumulator")
        x = inputs.reshape(-1, self.columns).to(device=self.sum.device, dtype=torch.float32)  # (N, c)
        if x.shape[0] == 0:
            return
        block = ROW_BLOCK if x.device.type == "cpu" else max(ROW_BLOCK, -(-self.columns // GPU_BLOCKS))
        for start in range(0, self.columns, block):
            rows = slice(start, start + block)
            self.sum[rows, start:] += x[:, rows].T @ x[:, start:]  # (rows, c - start)
        self.tokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        if self._mean is None:
            # no token at all (an expert the router never picked in calibration): every input weighs
            # the same, so the solve prunes by magnitude rather than zeroing every column as dead
            total = self.sum.triu_()
            total += total.triu(1).T  # the upper triangle mirrored
            self._mean = (total / self.tokens if self.tokens else
                          torch.eye(self.columns, device=total.device, dtype=torch.float64)).to(torch.float32)
            self.sum = None
        return self._mean

    @property
    def nbytes(self) -> int:
        held = self._mean if self.sum is None else self.sum
        return held.numel() * held.element_size()


@dataclasses.dataclass
class Factorization:
    """`U` upper triangular with `inv(H + damp_used * mean(diag H) * I) = U^T U`."""

    upper: torch.Tensor
    damp_used: float
    escalations: int


def handle_dead_inputs_(weight: Optional[torch.Tensor], hessian: torch.Tensor) -> torch.Tensor:
    """Give never-active inputs a unit diagonal and zero their weight columns (if a weight is given);
    returns the mask."""
    dead = torch.diag(hessian) == 0
    if dead.any():
        hessian[dead, dead] = 1.0
        if weight is not None:
            weight[:, dead] = 0.0
    return dead


def inverse_upper_factor(hessian: torch.Tensor, damp: float, layer: str = "layer") -> Factorization:
    """Damped `H`, factorised once: the one-Cholesky route of docs/ALGORITHM.md section 6.

    `U` comes from one Cholesky factorisation and one triangular inverse, without forming
    `inv(H)`: with `P` the reversal permutation, `P H P = L L^T` gives `H = V V^T` for the upper
    triangular `V = P L P`, so `inv(H) = U^T U` with `U = inv(V) = P inv(L) P`. This skips the
    inversion and second factorisation SparseGPT's route takes (timings: docs/results/solver_cpu.md).

    On failure the damping is multiplied by 10 and the factorisation retried, up to
    `MAX_DAMP_ESCALATIONS` times; each escalation is logged and counted.
    """
    mean_diag = torch.diag(hessian).mean()
    current = damp
    for escalation in range(MAX_DAMP_ESCALATIONS + 1):
        damped = hessian.flip(0, 1)  # a copy, damped in place: P (H + d I) P = P H P + d I
        damped.diagonal().add_(current * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info.item() == 0:
            inverse = lower_triangular_inverse(lower)
            del lower
            upper = inverse.flip(0, 1)
            del inverse
            if torch.isfinite(upper.sum()):  # any inf or NaN entry makes the sum non-finite
                return Factorization(upper, current, escalation)
        log.warning("%s: Cholesky failed at damp=%g; retrying with damp=%g", layer, current, current * 10)
        current *= 10
    raise FactorizationError(
        f"{layer}: the Hessian is not positive definite even with damp={current / 10:g}. "
        "Add calibration samples (more tokens make H better conditioned) or raise --damp."
    )


class Curvature:
    """What the steps derive from one Hessian, each computed once, on first use.

    q/k/v (and gate/up) read the same input and so the same Hessian: one `Curvature` serves all
    of them, so the solver's factor and the damped copy that the mask search and the refit use
    are computed once per input instead of once per linear. The Hessian itself is never
    modified; every derived matrix has never-active inputs given a unit diagonal. Drop the
    object (or call `release`) once its linears are done: it holds a few c x c matrices.
    """

    def __init__(self, hessian: torch.Tensor, layer: str = "layer"):
        self.hessian = hessian
        self.layer = layer
        self._factors: dict[float, Factorization] = {}
        self._damped: dict[float, torch.Tensor] = {}
        self._derived: dict = {}
        self._fixed: Optional[torch.Tensor] = None
        self.dead = torch.diag(hessian) == 0  # (c,) inputs no calibration token reached

    def zero_dead_columns_(self, weight: torch.Tensor, damp: float) -> float:
        """Zero `weight`'s columns for never-active inputs (they do nothing, and the solvers keep them
        out); returns what that adds to the error against `damped(damp)`, whose diagonal is
        `1 + damping` there and whose off-diagonal is zero."""
        if not self.dead.any():
            return 0.0
        squares = weight[:, self.dead].double().pow(2).sum()
        weight[:, self.dead] = 0.0
        return float(squares * (1.0 + self.damping(damp).double()))

    def fixed(self) -> torch.Tensor:
        """The Hessian with never-active inputs given a unit diagonal (shared: do not modify)."""
        if self._fixed is None:
            self._fixed = self.hessian.clone()
            handle_dead_inputs_(None, self._fixed)
        return self._fixed

    def factor(self, damp: float) -> Factorization:
        """`inverse_upper_factor` of the fixed Hessian at `damp` (escalated if it must be)."""
        if damp not in self._factors:
            self._factors[damp] = inverse_upper_factor(self.fixed(), damp, self.layer)
        return self._factors[damp]

    def damped(self, damp: float) -> torch.Tensor:
        """The fixed Hessian plus `damping(damp)` on the diagonal (shared: do not modify)."""
        if damp not in self._damped:
            Hd = self.fixed().clone()
            Hd.diagonal().add_(self.damping(damp))
            self._damped[damp] = Hd
        return self._damped[damp]

    def damping(self, damp: float) -> torch.Tensor:
        """What `damped(damp)` adds to the diagonal: `damp * mean(diag)` of the fixed Hessian (a 0-d tensor)."""
        return damp * torch.diag(self.fixed()).mean()

    def undamped_error(self, damped_error: float, delta: torch.Tensor, damp: float) -> float:
        """sum over rows of d H d^T, given the same sum with `damped(damp)`: the damping's and the
        never-active inputs' unit diagonal taken back out (an r x c pass instead of a product)."""
        squares = delta.float().pow(2)
        extra = self.damping(damp).double() * squares.sum(dtype=torch.float64)
        if self.dead.any():
            extra = extra + squares[:, self.dead].sum(dtype=torch.float64)
        return damped_error - float(extra)

    def quadratic(self, delta: torch.Tensor, damp: float) -> float:
        """sum over rows of d H d^T for `delta` (r, c), with the undamped Hessian: the same sum with the
        damped one from one triangular solve with `factor(damp)` (r c^2 flop, half of `delta @ H`),
        less what the damping adds (`undamped_error`)."""
        factor = self.factor(damp)
        # inv(Hd) = U^T U, so Hd = inv(U) inv(U)^T and delta Hd delta^T = ||delta inv(U)||^2
        solved = torch.linalg.solve_triangular(factor.upper, delta.float(), upper=True, left=False)
        damped = float(solved.pow(2).sum(dtype=torch.float64))
        return self.undamped_error(damped, delta, factor.damp_used)

    def derived(self, key, make):
        """`make()`, once per `key`: what a step derives from the damped Hessian, shared the same way."""
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def release(self, keep_factors: bool = False) -> None:
        """Free the derived matrices (but the factors, with `keep_factors`: the 8-bit step reuses them)."""
        if not keep_factors:
            self._factors.clear()
        self._damped.clear()
        self._derived.clear()
        self._fixed = None


# Past this many columns `lower_triangular_inverse` works by halves.
TRIANGULAR_INVERSE_BASE = 3072


def lower_triangular_inverse(lower: torch.Tensor) -> torch.Tensor:
    """`inv(L)` for a lower-triangular `L`.

    A triangular solve against the identity spends most of its flops on known zeros; by halves,
    `inv([[A, 0], [C, D]]) = [[inv(A), 0], [-inv(D) C inv(A), inv(D)]]` moves part of the work
    into a matrix product (faster from a few thousand columns on; docs/results/solver_cpu.md).
    """
    n = lower.shape[0]
    if n <= TRIANGULAR_INVERSE_BASE:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, eye, upper=False)
    h = n // 2
    out = torch.zeros_like(lower)
    out[:h, :h] = lower_triangular_inverse(lower[:h, :h])
    out[h:, h:] = lower_triangular_inverse(lower[h:, h:])
    out[h:, :h] = torch.linalg.solve_triangular(lower[h:, h:], (lower[h:, :h] @ out[:h, :h]).neg_(), upper=False)
    return out


def reconstruction_error(original: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error `||(W' - W) X||^2 / ||W X||^2`, computed from `H = X X^T / N`."""
    delta = pruned.float() - original.float()  # (r, c)
    base = original.float()
    num = torch.sum((delta @ hessian) * delta)
    den = torch.sum((base @ hessian) * base)
    return float(num / den) if den > 0 else float(num)
