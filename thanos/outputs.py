"""Outputs that appear whole or not at all, and never replace, swallow or mix with anything else.

Every command that writes a directory:
* takes a lock on it (`output_lock`), so a second run into the same output is refused;
* checks first that it can write there (`check_writable`), before any model is loaded;
* builds it in a staging sibling (`.NAME.staging`) that carries a marker file, so the tool only
  ever removes a staging folder it made itself, and never one that is an input;
* moves it into place only once it is complete and verified (`commit_staging`); `--overwrite`
  replaces an old output only at that moment, so a failed or killed run leaves it as it was.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional

from thanos.errors import ThanosExportError

STAGING_MARKER = ".thanos-export-staging"  # inside every staging folder this tool creates
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


class OutputDirError(ThanosExportError, ValueError):
    """An output directory that cannot be written or resumed; the message names the fix."""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def check_writable(out: Path, flag: str = "--out") -> None:
    """Refuse, before any work, an output whose folder cannot be created or written.

    Tried by writing, not by permission bits: root ignores those, a read-only mount does not.
    """
    out = Path(out)
    existing = next(p for p in (out, *out.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        what = "is a file" if existing == out else f"cannot be created: {existing} is a file, not a folder"
        raise OutputDirError(f"{flag} {out} {what}; pass a directory path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise OutputDirError(f"{flag} {out} cannot be written: {existing} is not writable ({exc.strerror}); "
                             f"choose a writable {flag} or fix the folder's permissions") from exc


@contextlib.contextmanager
def output_lock(out: Path, flag: str = "--out") -> Iterator[None]:
    """Hold an exclusive lock on `out` (`.NAME.lock` beside it) for the block; refuse if another run holds it.

    The lock is an flock: the system releases it when its process dies, so a killed run never
    leaves `out` locked.
    """
    import fcntl

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputDirError(f"another thanos-export run (process {holder}) is writing {flag} {out}; wait for it "
                                 f"to finish or choose another {flag}") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file as we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def staging_path(out: Path) -> Path:
    return out.parent / f".{out.name}.staging"


def check_staging(out: Path, inputs: Iterable[Optional["str | Path"]] = ()) -> Path:
    """The staging sibling of `out`, after refusing one that is an input or that this tool did not create."""
    staging = staging_path(Path(out))
    check_disjoint(staging, inputs, flag=f"{out} is built in {staging.name}, but that folder")
    if (staging.exists() or staging.is_symlink()) and (staging.is_symlink()
                                                        or not (staging / STAGING_MARKER).is_file()):
        raise OutputDirError(f"{staging} exists and was not made by thanos-export ({out} would be built there); "
                             "move or rename it, or choose another output name")
    return staging


def begin_staging(out: Path, inputs: Iterable[Optional["str | Path"]] = (), keep: bool = False) -> Path:
    """The staging sibling of `out`, marked as this tool's; an earlier run's is removed (or kept with `keep`).

    A folder at the staging name that this tool did not create, or that is one of the `inputs`,
    is refused, never removed.
    """
    staging = check_staging(out, inputs)
    if staging.exists() and not keep:
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    (staging / STAGING_MARKER).touch()
    return staging


def discard_staging(staging: Path) -> None:
    """Remove a staging folder this tool made (one without the marker is left alone)."""
    if (staging / STAGING_MARKER).is_file() and not staging.is_symlink():
        shutil.rmtree(staging, ignore_errors=True)


def commit_staging(staging: Path, out: Path) -> None:
    """Move a finished staging directory to `out`, replacing what was there only now.

    The old output is first moved into a fresh folder of this run's own (a unique name), so
    nothing that the run did not create is ever removed.
    """
    (staging / STAGING_MARKER).unlink(missing_ok=True)
    if not out.exists():
        os.replace(staging, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
    os.replace(out, aside / out.name)
    os.replace(staging, out)
    shutil.rmtree(aside, ignore_errors=True)


def write_error(exc: Exception, out: Path, kept: str = "") -> Optional[OutputDirError]:
    """An OutputDirError in one line for a full or read-only disk met while writing `out`, else None.

    Writers that are not Python's own (safetensors) report the system's error number only in
    their message: "(os error N)", or in older ones (0.4) "Os { code: N, ...".
    `kept` says what the run leaves behind on purpose.
    """
    number = getattr(exc, "errno", None)
    if number is None:
        found = re.search(r"os error (\d+)|Os \{ code: (\d+)", str(exc))
        number = int(found.group(1) or found.group(2)) if found else None
    if number in _DISK_FULL:
        what = f"the disk holding {out} is full"
    elif number in _NOT_WRITABLE:
        what = f"{out} cannot be written ({os.strerror(number)})"
    else:
        return None
    where = getattr(exc, "filename", None) or out
    return OutputDirError(f"{what} while writing {where}; free space or choose another output, then run the same "
                          f"command again{'; ' + kept if kept else ''}")
