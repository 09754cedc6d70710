"""`run_bench`: the GEMM and model levels for one target, written as a report."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from runtime_bench.gemm import DEFAULT_TOKENS, DTYPES, FORMAT_DTYPES, SHAPE_SETS, run_gemm, sparse_backends, with_8bit
from runtime_bench.model import ALL_BACKENDS, random_model, run_model
from runtime_bench.protocol import machine
from runtime_bench.report import write_report
from thanos.devices import resolve_device
from thanos.errors import InputError
from thanos.linears import is_prunable, weight_view
from thanos.model_config import text_config
from thanos.models import context_length
from thanos.quantized_model import cast_model_, model_format


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    target: str  # a model directory, or random:smollm2-135m / random:llama2-7b
    out: str
    backends: tuple[str, ...] = tuple(ALL_BACKENDS)
    tokens: tuple[int, ...] = tuple(DEFAULT_TOKENS)
    shapes: tuple[str, ...] = ()  # named shape sets added to the model's own linear shapes
    dtypes: tuple[str, ...] = ()  # GEMM dtypes; empty: float16 and bfloat16 on a GPU, float32 on the CPU
    grid: tuple[tuple[int, int], ...] = ((1, 128), (1, 512), (4, 512))
    device: str = "auto"
    levels: tuple[str, ...] = ("gemm", "model")
    decode_steps: int = 16
    trust_remote_code: bool = False  # let a model directory's own Python code run while loading it
    quantize: Optional[str] = None  # random: targets only: 8-bit weights and static input scales ("fp8", "int8")


def run_bench(settings: BenchSettings, progress=None, model=None) -> dict:
    """Measure `settings.target` (or `model`, the same model already in memory: it is not read again)."""
    _check_settings(settings)
    device = str(resolve_device(settings.device))
    known = ALL_BACKENDS + list(sparse_backends("cpu"))  # model-level names, then the GEMM kernels' own
    unknown = [b for b in settings.backends if b not in known]
    if unknown:
        raise InputError(f"unknown backend {unknown[0]!r}; choose from {', '.join(known)}")
    random_name = settings.target.split(":", 1)[1] if settings.target.startswith("random:") else None
    if settings.quantize and (random_name is None or settings.quantize not in FORMAT_DTYPES):
        raise InputError(f"--quantize {settings.quantize} applies to random: targets, as fp8 or int8; a pruned "
                         "directory is timed in the 8 bits it was pruned to (prune --quantize)"
                         if random_name is None else
                         f"unknown 8-bit format {settings.quantize!r}; choose {' or '.join(FORMAT_DTYPES)}")
    if "model" not in settings.levels and random_name in SHAPE_SETS:
        model, shapes = None, list(SHAPE_SETS[random_name])  # GEMMs only: no need to build the model
    else:
        model = (_on_device(model, device) if model is not None
                 else _load_target(settings.target, device, settings.trust_remote_code, settings.quantize))
        # The model's own linear shapes, (out, in), without the LM head (it is never pruned).
        shapes = sorted({tuple(weight_view(mod).shape) for mod in model.modules() if is_prunable(mod)}
                        - {(text_config(model).vocab_size, text_config(model).hidden_size)})
        if "model" in settings.levels:
            _check_context(settings, model)
    for name in settings.shapes:
        if name in SHAPE_SETS:
            named = SHAPE_SETS[name]
        elif Path(name).expanduser().exists():  # a model directory or config.json: its layers' shapes
            from runtime_bench.plan import config_linear_shapes

            named = config_linear_shapes(name)
        else:
            raise InputError(f"unknown shape set {name!r}; choose from {', '.join(SHAPE_SETS)}, or pass a model "
                             "directory or config.json")
        shapes += [s for s in named if s not in shapes]
    eight_bit = settings.quantize or (model_format(model) if model is not None else None)
    dtypes = list(settings.dtypes) or with_8bit(["float16", "bfloat16"] if device.startswith("cuda") else ["float32"],
                                                eight_bit)
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise InputError(f"unknown GEMM dtype {unknown[0]!r}; choose from {', '.join(DTYPES)}")
    info = dataclasses.asdict(settings) | dict(device=device, gemm_shapes=[list(s) for s in shapes], dtypes=dtypes)
    here = machine()
    records = _Records(lambda done: write_report(Path(settings.out), here, info | dict(complete=False), done,
                                                 json_only=True))
    try:
        if "gemm" in settings.levels:
            run_gemm(shapes, list(settings.tokens), dtypes, device,
                     [b for b in settings.backends if b.startswith("torch-2:4")] or None, progress=progress,
                     sink=records)
        if "model" in settings.levels:
            run_model(model, list(settings.grid), device, list(settings.backends), settings.decode_steps,
                      progress, sink=records)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM from a time limit) or failed: keep what was measured
        write_report(Path(settings.out), here, info | dict(complete=False), records)
        raise
    return write_report(Path(settings.out), here, info | dict(complete=True), records)


class _Records(list):
    """The records measured so far, report.json rewritten (marked incomplete) as each arrives: a
    process ended with no chance to write (a kernel's crash, SIGKILL at a time limit) keeps them."""

    def __init__(self, written):
        super().__init__()
        self._written = written

    def append(self, record) -> None:
        super().append(record)
        self._written(self)

    def extend(self, records) -> None:
        super().extend(records)
        self._written(self)

    def __iadd__(self, records):
        self.extend(records)
        return self


LEVELS = ("gemm", "model")


def _check_settings(settings: BenchSettings) -> None:
    """Refuse what would measure nothing, or fail inside a runtime after minutes of loading."""
    unknown = [level for level in settings.levels if level not in LEVELS]
    if unknown or not settings.levels:
        raise InputError(f"unknown level {unknown[0]!r}; choose gemm, model or both (--levels gemm,model)"
                         if unknown else "no level to measure; choose gemm, model or both (--levels gemm,model)")
    if "gemm" in settings.levels and (not settings.tokens or min(settings.tokens) < 1):
        raise InputError(f"GEMM token counts must be 1 or more (--tokens 1,16,256), not {list(settings.tokens)}")
    if "model" in settings.levels:
        bad = [g for g in settings.grid if len(g) != 2 or min(g) < 1]
        if bad or not settings.grid:
            raise InputError(f"model-level grid entries are batch x sequence length, both 1 or more (--grid "
                             f"1x128,4x512), not {'x'.join(map(str, bad[0])) if bad else 'none'}")
        if settings.decode_steps < 1:
            raise InputError(f"--decode-steps must be 1 or more, not {settings.decode_steps}")


def _check_context(settings: BenchSettings, model) -> None:
    context = context_length(model)
    longest = max(max(seq for _, seq in settings.grid), settings.grid[0][1] + settings.decode_steps)
    if context is not None and longest > context:
        raise InputError(f"the model covers {context} positions, and the grid asks for {longest} (the longest "
                         "prefill, or the first one's length plus --decode-steps); use shorter --grid lengths")


def _load_target(target: str, device: str, trust_remote_code: bool = False, quantize: Optional[str] = None):
    if target.startswith("random:"):
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        return random_model(target.split(":", 1)[1], dtype, device, quantize)
    from thanos.models import load_model

    model, _ = load_model(target, trust_remote_code=trust_remote_code)
    return _on_device(model, device)


def _on_device(model, device: str):
    """The model in place on `device`: fp16 on a GPU; fp32 on the CPU, the dtype the GEMM level times
    there (a bfloat16 checkpoint, or a model an export cast to --dtype, would time half-precision
    matmuls, no CPU serving path)."""
    cast_model_(model, torch.float16 if device.startswith("cuda") else torch.float32)
    return model.to(device)
