"""Typed, self-validating pruning settings: the pattern and everything a solver needs to know.

`"2:4"` is parsed once into a `Pattern`; impossible combinations fail here, at construction,
with a message that names the fix, so solvers can trust what they are given.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Literal, Optional

METHODS = ("thanos", "sparsegpt", "wanda", "magnitude")
Method = Literal["thanos", "sparsegpt", "wanda", "magnitude"]

# Default block sizes (columns per block). The paper uses 128 for unstructured and 512 for n:m.
# `python -m runtime_bench.solver` (table in the README) shows why we use 128 for n:m too: the
# batched k x k solves grow with the square of the block size, so 512 costs 1.1-4x the time of 128
# (2.7-8.4x SparseGPT's) for a reconstruction error lower by only 0.2-3.1% relative.
DEFAULT_BLOCK_SIZE = {"unstructured": 128, "nm": 128, "columns": None}
SPARSEGPT_BLOCK_SIZE = 128


class ConfigError(ValueError):
    """A pruning setting that cannot work; the message says what to pass instead."""


@dataclasses.dataclass(frozen=True)
class Pattern:
    """Where zeros may go. `kind` is 'unstructured', 'nm' or 'columns'.

    For n:m, `n` weights are removed from every group of `m` consecutive input columns of a row
    (ALGORITHM.md section 4), leaving at most m - n non-zeros: "2:4" is NVIDIA's sparse tensor
    core layout.
    """

    kind: Literal["unstructured", "nm", "columns"]
    n: int = 0
    m: int = 0

    def __post_init__(self):
        if self.kind not in ("unstructured", "nm", "columns"):
            raise ConfigError(f"unknown pattern kind {self.kind!r}; use 'unstructured', 'n:m' or 'columns'")
        if self.kind == "nm":
            if not (0 < self.n < self.m):
                raise ConfigError(
                    f"pattern '{self.n}:{self.m}' is impossible: n:m removes n of every m weights, "
                    f"so 0 < n < m is required (did you mean '{min(self.n, self.m)}:{max(self.n, self.m)}'?)"
                )

    @classmethod
    def parse(cls, text: "str | Pattern") -> "Pattern":
        if isinstance(text, Pattern):
            return text
        value = str(text).strip().lower()
        if value in ("unstructured", "columns"):
            return cls(value)
        match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", value)
        if not match:
            raise ConfigError(
                f"cannot read pattern {text!r}; use 'unstructured', 'columns' or 'n:m' such as '2:4' or '4:8'"
            )
        return cls("nm", int(match.group(1)), int(match.group(2)))

    @property
    def is_nm(self) -> bool:
        return self.kind == "nm"

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else self.kind


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Everything that decides how one weight matrix is pruned. Validates itself.

    `sparsity=None` means 0.5 for unstructured and columns, and n/m for an n:m pattern (which
    fixes the sparsity). `block_size=None` picks `DEFAULT_BLOCK_SIZE` for the pattern.
    """

    method: str = "thanos"
    pattern: Pattern = dataclasses.field(default_factory=lambda: Pattern.parse("2:4"))
    sparsity: Optional[float] = None
    block_size: Optional[int] = None
    alpha: float = 0.0
    damp: float = 0.01

    def __post_init__(self):
        object.__setattr__(self, "pattern", Pattern.parse(self.pattern))
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        pattern = self.pattern
        if pattern.is_nm:
            implied = pattern.n / pattern.m
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ConfigError(
                    f"pattern {pattern} fixes the sparsity at {implied:g}, but sparsity={self.sparsity:g} "
                    f"was asked for; omit sparsity or pass {implied:g}, or use pattern 'unstructured' "
                    f"for sparsity {self.sparsity:g}"
                )
            object.__setattr__(self, "sparsity", implied)
        elif self.sparsity is None:
            object.__setattr__(self, "sparsity", 0.5)
        if not (0.0 <= self.sparsity < 1.0):
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if not (0.0 <= self.alpha < 1.0):
            raise ConfigError(f"alpha (fraction of dense outlier rows) must be in [0, 1), got {self.alpha}")
        if self.alpha > 0 and self.method != "thanos":
            raise ConfigError(f"alpha (dense outlier rows) is a Thanos option; use alpha=0 with method {self.method!r}")
        if self.damp <= 0:
            raise ConfigError(f"damp must be positive (0.01 is the usual value), got {self.damp}")
        if self.block_size is not None:
            if self.block_size <= 0:
                raise ConfigError(f"block_size must be positive, got {self.block_size}")
            if pattern.is_nm and self.block_size % pattern.m:
                lower = max(pattern.m, self.block_size // pattern.m * pattern.m)
                raise ConfigError(
                    f"block_size {self.block_size} is not a multiple of m={pattern.m} (pattern {pattern}); "
                    f"use {lower} or {lower + pattern.m}"
                )

    @property
    def resolved_block_size(self) -> Optional[int]:
        if self.block_size is not None:
            return self.block_size
        if self.method == "sparsegpt":
            return SPARSEGPT_BLOCK_SIZE
        return DEFAULT_BLOCK_SIZE[self.pattern.kind]

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["pattern"] = str(self.pattern)
        data["block_size"] = self.resolved_block_size
        return data
