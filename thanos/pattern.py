"""Where zeros may go: the sparsity pattern, parsed once from "2:4", "unstructured" or "columns"."""
from __future__ import annotations

import dataclasses
import re
from typing import Literal

from thanos.errors import ThanosExportError


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
