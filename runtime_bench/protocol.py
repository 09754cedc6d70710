"""One measurement protocol for every backend (gpt-fast / nanoGPT bench style).

Warm-up runs are discarded; the device is synchronised around every timed call (CUDA events on
the GPU); calls repeat until a time budget or a repeat cap; median and p90 are reported with the
peak memory measured after resetting the counters (allocator peak on the GPU, RSS on the CPU).
"""
from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from typing import Callable, Optional

import torch

from thanos.devices import cpu_name


@dataclasses.dataclass
class Timing:
    median_ms: float
    p90_ms: float
    repeats: int
    peak_memory_bytes: Optional[int]
    memory_kind: str  # "cuda allocator peak", "process RSS peak"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def timed(fn: Callable[[], object], device: "str | torch.device" = "cpu") -> tuple[object, float]:
    """(fn(), seconds) for one call, the device synchronised before and after (long steps, no repeats)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    if cuda:
        torch.cuda.synchronize()
    return value, time.perf_counter() - start


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def measure(fn: Callable[[], object], device: str = "cpu", warmup: int = 2, min_repeats: int = 3,
            max_repeats: int = 50, budget_s: float = 1.0) -> Timing:
    """Time `fn()`; `device` "cuda" uses CUDA events and the allocator's peak."""
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    peak_rss = _rss()
    times = []
    started = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - started < budget_s):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            peak_rss = max(peak_rss, _rss())
    times.sort()
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    if cuda:
        return Timing(statistics.median(times), p90, len(times), torch.cuda.max_memory_allocated(), "cuda allocator peak")
    return Timing(statistics.median(times), p90, len(times), peak_rss, "process RSS peak")


def machine() -> dict:
    """What produced the figures: GPU, capability, driver, CUDA and library versions, CPU."""
    info = dict(cpu=cpu_name(), cpu_threads=torch.get_num_threads(),
                python=platform.python_version(), torch=torch.__version__)
    for module in ("transformers", "onnxruntime", "tensorrt"):
        try:
            info[module] = __import__(module).__version__
        except Exception:
            info[module] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    gpu_memory_bytes=props.total_memory, driver=_driver_version())
    else:
        info.update(gpu=None, compute_capability=None, cuda=torch.version.cuda, driver=None)
    return info


def _driver_version() -> Optional[str]:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except Exception:
        return None
