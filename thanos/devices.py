"""Where work runs: the one place that resolves a device name and the sizes that suit it."""
from __future__ import annotations

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
