"""The machine a benchmark runs on: what it is (CPU, cores, torch, the linear kernel in use), its
memory (resident and peak), and its float32 matrix-multiply rate measured in the same run.

Shared by ``bench_sweep.py`` and ``bench_generic.py``: each records :func:`machine_info` and
:func:`gemm_rates` next to its timings, so a rate is read against the machine it ran on.
"""

from __future__ import annotations

import os
import platform
import resource
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from causalnet.adapters import kernels
from causalnet.hydra.heap import heap_kept


# ---- machine ------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall through to platform's answer
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "cpu_cores_usable": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "linear_kernel_float32_cpu": kernels.status(),
        "device": str(device),
        # glibc's heap kept, as a CPU sweep keeps it (causalnet.hydra.heap)
        "heap_kept": heap_kept(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def rss_bytes() -> int:
    """Current resident set size (Linux /proc), else the peak (getrusage)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass  # not Linux: the peak is the best available answer
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_since_reset() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return peak_rss_bytes()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the machine's matrix-multiply rate ---------------------------------------------------
def gemm_rates(device: torch.device, seconds: float = 1.0) -> dict[str, float]:
    """float32 GFLOP/s of a 2048^3 product and of the model's largest row-block shape
    ([512, 576] x [576, 1536]), through torch.mm and (CPU) through the adapters' linear kernel;
    best of several timed loops of about ``seconds`` each."""
    out: dict[str, float] = {}
    shapes = {"2048x2048x2048": (2048, 2048, 2048), "512x576x1536": (512, 576, 1536)}
    gen = torch.Generator().manual_seed(0)
    for name, (m, k, n) in shapes.items():
        a = torch.randn(m, k, generator=gen).to(device)
        b = torch.randn(k, n, generator=gen).to(device)
        w = b.T.contiguous()  # [n, k], a linear layer's weight
        ways: dict[str, Callable[[], Tensor]] = {"torch.mm": lambda a=a, b=b: torch.mm(a, b)}
        if device.type == "cpu":
            ways["adapters linear"] = lambda a=a, w=w: kernels.linear(a, w)
        else:
            ways["F.linear"] = lambda a=a, w=w: F.linear(a, w)
        for way, fn in ways.items():
            fn()
            sync(device)
            flop = 2 * m * k * n
            t0 = time.perf_counter()
            fn()
            sync(device)
            reps = max(1, int(seconds / 4 / max(time.perf_counter() - t0, 1e-6)))
            best = float("inf")
            for _ in range(4):
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                sync(device)
                best = min(best, (time.perf_counter() - t0) / reps)
            out[f"{way} {name}"] = flop / best / 1e9
    return out
