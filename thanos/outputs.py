"""Outputs that appear whole or not at all, and never replace or swallow their own inputs.

Every command that writes a directory builds it in a staging sibling (`.NAME.staging`) and moves
it into place only once it is complete and verified; `--overwrite` replaces an old output only at
that moment, so a failed or killed run leaves the old output as it was.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

from thanos.errors import ThanosExportError


class OutputDirError(ThanosExportError, ValueError):
    """An output directory that cannot be written or resumed; the message names the fix."""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_disjoint(out: "str | Path", inputs: Iterable[Optional["str | Path"]], flag: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside one of the inputs (replacing it would lose them)."""
    target = Path(out).resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source:
            relation = "is"
        elif source in target.parents:
            relation = "lies inside"
        elif target in source.parents:
            relation = "contains"
        else:
            continue
        raise OutputDirError(f"{flag} {out} {relation} the input {given}; choose an output directory outside it")


def staging_path(out: Path) -> Path:
    return out.parent / f".{out.name}.staging"


def begin_staging(out: Path) -> Path:
    """A fresh, empty staging sibling of `out` (what a killed earlier run left there is removed)."""
    staging = staging_path(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def commit_staging(staging: Path, out: Path) -> None:
    """Move a finished staging directory to `out`, replacing what was there only now."""
    if out.exists():
        aside = out.parent / f".{out.name}.replaced"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(out, aside)
        os.replace(staging, out)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(staging, out)
