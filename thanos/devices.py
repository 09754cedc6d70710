"""Where work runs: the one place that resolves a device name and the sizes that suit it."""
from __future__ import annotations

import contextlib
import dataclasses
import platform
from typing import Optional

import torch

from thanos.errors import InputError


@dataclasses.dataclass(frozen=True)
class DeviceDefaults:
    """Calibration and evaluation sizes for a kind of device (the summary says which were used)."""

    samples: int
    seqlen: int
    eval_windows: Optional[int]  # None: the whole held-out text


GPU_DEFAULTS = DeviceDefaults(samples=128, seqlen=2048, eval_windows=None)
CPU_DEFAULTS = DeviceDefaults(samples=32, seqlen=512, eval_windows=16)


def resolve_device(name: Optional[str] = "auto") -> torch.device:
    """`auto` (or None): the GPU where torch sees one, else the CPU; a named CUDA device must exist."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"--device {name} is not a device name; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name} was asked for, but torch sees no CUDA GPU (torch {torch.__version__}); "
                         "use --device cpu, or install a CUDA build of torch on a machine with a GPU")
    return device


def defaults_for(device: torch.device) -> DeviceDefaults:
    return GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes free on `device` now: the GPU's (what torch's allocator holds unused counts as free), or
    the host's where psutil is installed; None where unknown."""
    if device.type == "cuda":
        return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                - torch.cuda.memory_allocated(device))
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().available


def device_description(device: torch.device) -> str:
    """The device as a results file names it: the CPU's model too, since CPUs round differently and
    the mask search turns that into other masks (docs/results/README.md)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    names = dict.fromkeys([cpu_name(), platform.machine()])  # one, where only the architecture is known (ARM Linux)
    return f"cpu ({', '.join(names)}, {torch.get_num_threads()} threads)"


def cpu_name() -> str:
    """The CPU's model name where Linux tells it, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_tf32_products = False  # set by `tf32_for_products`; read where the mask search and the refit run


@contextlib.contextmanager
def tf32_for_products(enabled: bool = True):
    """Within: the mask search's and the refit's fp32 products on a CUDA GPU may round their inputs
    to TF32 (10 significant bits; several times the fp32 rate on tensor cores). Without it they run
    in full fp32 even where the process allowed TF32; the statistics, the solves and every reported
    error run as the process set them (full fp32 is torch's default). A measurement switch
    (`thanos-export plan --tf32`): pruning runs without it until the plan's figures show what it
    costs in layer error."""
    global _tf32_products
    previous, _tf32_products = _tf32_products, enabled
    try:
        yield
    finally:
        _tf32_products = previous


def tf32_products_on(device: "torch.device | str") -> bool:
    """Whether the search and refit products on `device` run in TF32 now (`tf32_for_products`)."""
    return _tf32_products and torch.device(device).type == "cuda"


def _tf32_switch() -> tuple[str, object, object]:
    """The attribute of `torch.backends.cuda.matmul` that allows TF32 in this torch, with its on and
    off values: `fp32_precision` from torch 2.9 (which warns about the old one), `allow_tf32` before."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return "fp32_precision", "tf32", "ieee"
    return "allow_tf32", True, False


def matmul_tf32() -> bool:
    """Whether CUDA fp32 matmuls may use TF32 now."""
    name, on, _ = _tf32_switch()
    value = getattr(torch.backends.cuda.matmul, name)
    if value == "none":  # fp32_precision left to the global setting
        value = torch.backends.fp32_precision
    return value == on


def set_matmul_tf32(enabled: bool) -> None:
    name, on, off = _tf32_switch()
    setattr(torch.backends.cuda.matmul, name, on if enabled else off)


@contextlib.contextmanager
def products_precision():
    """Within: CUDA fp32 matmuls use TF32 exactly when `tf32_for_products` allows it; on leaving, the
    process's own setting is back."""
    name = _tf32_switch()[0]
    previous = getattr(torch.backends.cuda.matmul, name)
    set_matmul_tf32(_tf32_products)
    try:
        yield
    finally:
        setattr(torch.backends.cuda.matmul, name, previous)
