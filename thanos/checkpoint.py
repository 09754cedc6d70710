"""Resumable output: each finished decoder layer is committed to disk atomically.

`OUT/.thanos_partial/run.json` records the settings of the run; `layer_00007.safetensors` holds
layer 7's pruned state (and its linears' 8-bit scales, under `QUANT_PREFIX`) with its per-linear
report in the file's metadata. A file appears only
by `os.replace` of a complete temporary, so a killed run leaves whole layers or nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from thanos.outputs import OutputDirError, atomic_write_text
from thanos.quantized_model import layer_tensors, restore_layer_

PARTIAL_DIR = ".thanos_partial"
REPORT_NAME = "thanos_report.json"
QUANT_PREFIX = "thanos_quantization/"  # cannot clash with a state-dict key, which has no '/'


def check_output_dir(out: Path, overwrite: bool = False, reuse_finished: bool = False) -> None:
    """Refuse an output path that holds something else, before any work starts.

    Nothing is deleted here: with `overwrite`, a finished model is replaced only when the new one
    is complete (`thanos.outputs.commit_staging`); `reuse_finished` lets the caller keep a finished
    model made with the same settings.
    """
    if not out.exists() or not any(out.iterdir()):  # a file at `out` was refused by check_writable
        return
    if (out / REPORT_NAME).is_file():
        if overwrite or reuse_finished:
            return
        raise OutputDirError(f"{out} already holds a finished pruned model; pass --overwrite to replace it (once "
                             "the new one is complete) or choose another --out")
    if (out / PARTIAL_DIR / "run.json").is_file():
        return  # an interrupted run: resumable if the settings match (checked by LayerCheckpoints)
    raise OutputDirError(f"{out} is not empty and holds no thanos-export run; choose a new or empty --out")


class LayerCheckpoints:
    def __init__(self, out: Path, fingerprint: dict):
        self.dir = Path(out) / PARTIAL_DIR
        self.fingerprint = fingerprint
        self.earlier_seconds = 0.0  # time spent by the interrupted runs this one resumes
        self._opened_at = time.time()

    def open(self) -> int:
        """Create or validate the partial directory; returns how many layers are already done."""
        run_file = self.dir / "run.json"
        if run_file.is_file():
            try:
                previous = json.loads(run_file.read_text())
            except ValueError as exc:
                raise OutputDirError(f"{run_file} is damaged ({exc}); delete {self.dir} to start the run over") from exc
            if previous != self.fingerprint:
                changed = sorted(k for k in set(previous) | set(self.fingerprint)
                                 if previous.get(k) != self.fingerprint.get(k))
                raise OutputDirError(
                    f"{self.dir.parent} holds an interrupted run with different settings ({', '.join(changed)}); "
                    "rerun with the same settings to resume, or choose another --out"
                )
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_file, json.dumps(self.fingerprint, indent=1, sort_keys=True))
        done = 0
        while self._path(done).is_file():
            done += 1
        elapsed = self.dir / "elapsed.json"
        if done and elapsed.is_file():
            try:
                self.earlier_seconds = float(json.loads(elapsed.read_text())["seconds"])
            except (ValueError, KeyError, TypeError):
                self.earlier_seconds = 0.0  # only the report's total time depends on it
        self._opened_at = time.time()
        return done

    def _path(self, index: int) -> Path:
        return self.dir / f"layer_{index:05d}.safetensors"

    def save(self, index: int, layer: torch.nn.Module, reports: list[dict]) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
        scales, formats = layer_tensors(layer)
        state.update({QUANT_PREFIX + k: v.contiguous() for k, v in scales.items()})
        tmp = self._path(index).with_suffix(".tmp")
        try:
            save_file(state, str(tmp), metadata={"reports": json.dumps(reports), "quantization": json.dumps(formats)})
            os.replace(tmp, self._path(index))
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk must not stay full of a half-written layer
            raise
        spent = self.earlier_seconds + time.time() - self._opened_at
        atomic_write_text(self.dir / "elapsed.json", json.dumps(dict(seconds=spent)))

    def load(self, index: int, layer: torch.nn.Module) -> list[dict]:
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = self._path(index)
        try:
            state = load_file(str(path))
            scales = {k[len(QUANT_PREFIX):]: state.pop(k) for k in list(state) if k.startswith(QUANT_PREFIX)}
            layer.load_state_dict(state)
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata()
            restore_layer_(layer, scales, json.loads(metadata.get("quantization", "{}")))
            return json.loads(metadata["reports"])
        except Exception as exc:  # truncated or foreign file: say which, and how to redo just that layer
            raise OutputDirError(f"the saved layer {path} is damaged ({type(exc).__name__}: {exc}); delete that "
                                 "file and rerun the same command to prune the layer again") from exc

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
