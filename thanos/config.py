"""Typed, self-validating pruning settings: the pattern and everything a solver needs to know.

`"2:4"` is parsed once into a `Pattern`; impossible combinations fail here, at construction,
with a message that names the fix, so solvers can trust what they are given.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal, Optional

from thanos.errors import ThanosExportError

METHODS = ("thanos", "sparsegpt", "wanda", "magnitude")
Method = Literal["thanos", "sparsegpt", "wanda", "magnitude"]

# Default block sizes (columns per block) of the methods without presets. The paper uses 128 for
# unstructured and 512 for n:m; SparseGPT's reference code uses 128.
DEFAULT_BLOCK_SIZE = {"unstructured": 128, "nm": 128, "columns": None}
SPARSEGPT_BLOCK_SIZE = 128


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named Thanos setting, chosen on whole-model perplexity and pruning time (docs/results/)."""

    block_size: dict  # pattern kind -> columns per block (None: the whole row)
    refit_iterations: int
    reconstruct_epochs: int
    summary: str
    reconstruct_lr: float = 1e-3  # Adam's step; also the default when reconstruction is asked for by hand
    mask_search_iterations: int = 0  # ADMM iterations over mask and weights before the refit (thanos.mask_search)
    permute_channels: bool = False  # reorder free channels before n:m pruning (thanos.permute)


PRESETS = {
    "fast": Preset({"nm": 128, "unstructured": 128, "columns": None}, 0, 0,
                   "the paper's block-wise solve alone"),
    "default": Preset({"nm": 32, "unstructured": 128, "columns": None}, 10, 0,
                      "free channels permuted for n:m, smaller blocks, a short mask search, then the kept weights "
                      "refit on the final mask", mask_search_iterations=10, permute_channels=True),
    "best": Preset({"nm": 32, "unstructured": 128, "columns": None}, 20, 2,
                   "as default with a longer mask search and refit, then each decoder layer tuned towards the dense "
                   "layer's outputs", mask_search_iterations=30, permute_channels=True),
}


class ConfigError(ThanosExportError, ValueError):
    """A pruning setting that cannot work; the message says what to pass instead."""


@dataclasses.dataclass(frozen=True)
class Pattern:
    """Where zeros may go. `kind` is 'unstructured', 'nm' or 'columns'.

    For n:m, `n` weights are removed from every group of `m` consecutive input columns of a row
    (docs/ALGORITHM.md section 4), leaving at most m - n non-zeros: "2:4" is NVIDIA's sparse tensor
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
                swapped = (f" (did you mean '{self.m}:{self.n}'?)" if 0 < self.m < self.n
                           else "; for example '2:4' or '4:8'")
                raise ConfigError(f"pattern '{self.n}:{self.m}' is impossible: n:m removes n of every m weights, "
                                  f"so 0 < n < m is required{swapped}")

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
    fixes the sparsity). For Thanos, `preset` (a name in `PRESETS`) fills the block size and the
    refit iterations that are left as None; `block_size=None` picks `DEFAULT_BLOCK_SIZE` for the
    other methods. `mask_search_iterations` moves mask and weights together from the solver's
    result (`thanos.mask_search`); `refit_iterations` re-solves the kept weights for the final mask
    (`thanos.refit`); `reconstruct_epochs` tunes each pruned decoder layer's kept weights towards
    `reconstruct_target` in a whole-model run (`thanos.reconstruct`); `permute_channels` reorders
    the channels a model family leaves free before an n:m pattern groups them, in a whole-model
    run (`thanos.permute`).
    """

    method: str = "thanos"
    pattern: Pattern = dataclasses.field(default_factory=lambda: Pattern.parse("2:4"))
    sparsity: Optional[float] = None
    block_size: Optional[int] = None
    alpha: float = 0.0
    damp: float = 0.01
    refit_iterations: Optional[int] = None  # None: the preset's (Thanos), 0 for the other methods
    mask_search_iterations: Optional[int] = None  # None: the preset's (Thanos), 0 for the other methods
    reconstruct_epochs: Optional[int] = None  # None: the preset's (Thanos), 0 for the other methods
    reconstruct_lr: Optional[float] = None  # None: the preset's
    reconstruct_target: str = "layer"  # "layer": the dense layer's outputs; "dense": the dense model's
    preset: str = "default"
    permute_channels: Optional[bool] = None  # None: the preset's for n:m (Thanos), off otherwise

    def __post_init__(self):
        object.__setattr__(self, "pattern", Pattern.parse(self.pattern))
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[self.preset]
        if self.mask_search_iterations and self.pattern.kind == "columns":
            raise ConfigError("mask search moves single weights, which would break the 'columns' pattern; "
                              "use mask_search_iterations=0 with it")
        if self.pattern.kind == "columns":
            object.__setattr__(self, "mask_search_iterations", 0)  # the presets' search is for weight patterns
        if self.permute_channels and not self.pattern.is_nm:
            raise ConfigError(f"channel permutations only change which channels share an n:m group; pattern "
                              f"{self.pattern} has no groups, so leave permute_channels off with it")
        if self.permute_channels is None:
            object.__setattr__(self, "permute_channels",
                               preset.permute_channels and self.method == "thanos" and self.pattern.is_nm)
        for field in ("refit_iterations", "mask_search_iterations", "reconstruct_epochs"):
            if getattr(self, field) is None:
                object.__setattr__(self, field, getattr(preset, field) if self.method == "thanos" else 0)
        if self.reconstruct_lr is None:
            object.__setattr__(self, "reconstruct_lr", preset.reconstruct_lr)
        if self.reconstruct_target not in ("layer", "dense"):
            raise ConfigError(f"reconstruct_target must be 'layer' (the dense layer's outputs) or 'dense' (the dense "
                              f"model's activations), got {self.reconstruct_target!r}")
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
        if not (math.isfinite(self.damp) and self.damp > 0):
            raise ConfigError(f"damp must be a positive finite number (0.01 is the usual value), got {self.damp}")
        if self.reconstruct_epochs < 0 or not (math.isfinite(self.reconstruct_lr) and self.reconstruct_lr > 0):
            raise ConfigError(f"reconstruct_epochs must be >= 0 and reconstruct_lr > 0, got {self.reconstruct_epochs} "
                              f"and {self.reconstruct_lr}")
        if self.refit_iterations < 0:
            raise ConfigError(f"refit_iterations must be 0 (no refit) or positive, got {self.refit_iterations}")
        if self.mask_search_iterations < 0:
            raise ConfigError(f"mask_search_iterations must be 0 (no search) or positive, got "
                              f"{self.mask_search_iterations}")
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
        if self.method == "thanos":
            return PRESETS[self.preset].block_size[self.pattern.kind]
        return DEFAULT_BLOCK_SIZE[self.pattern.kind]

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["pattern"] = str(self.pattern)
        data["block_size"] = self.resolved_block_size
        return data
