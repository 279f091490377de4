"""glibc's heap kept through a sweep: freed buffers are reused instead of handed back to the OS.

Why: a prompt's patches allocate tensors whose size changes layer by layer (``[rows, 1536]``
floats, rows growing from 15 to ~900: 0.1-5.5 MB). glibc's ``malloc`` serves an allocation above
its mmap threshold (128 KiB at first, then the largest block freed so far) with a fresh mapping,
and hands the heap's free top back to the OS beyond its trim threshold; each fresh page then
faults in, zeroed by the kernel, on its first write. Measured on a random Qwen3 of
SmolLM2-135M's size (2-core Intel Xeon, 2026-12-02, three prompts' patches of 60 sites, K = 15,
six repetitions in each of five processes each way, alternating): 29,000-38,000 page faults per
repetition and medians of 1.24-1.39 s; with :func:`keep_heap`, 1-805 faults and 1.13-1.18 s.
(On an AMD EPYC the same change did not move the time.)

:func:`keep_heap` raises both thresholds with glibc's ``mallopt`` (``M_MMAP_THRESHOLD``
:data:`MMAP_THRESHOLD`, ``M_TRIM_THRESHOLD`` :data:`TRIM_THRESHOLD`). It is process-wide and
stays (glibc has no way back to its moving threshold), so the library calls it only where a
process is given over to the work: :func:`causalnet.hydra.sweep.run_sweep` on the CPU, the Ray
workers (:class:`causalnet.hydra.distributed.SweepWorker`), and the benchmarks, which time what
a sweep runs. The cost: up to :data:`TRIM_THRESHOLD` of freed memory per malloc arena stays with
the process. ``CAUSALNET_KEEP_HEAP=0`` turns it off; on a C library other than glibc (macOS,
musl) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

from ..errors import CausalNetError

#: Allocations below this many bytes come from the heap (glibc's largest allowed value).
MMAP_THRESHOLD = 32 << 20
#: Free memory at the heap's top kept rather than returned to the OS, in bytes.
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's <malloc.h>
_kept = False


def keep_heap() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (module docstring); True once
    they are set (now or by an earlier call), False where switched off or not glibc."""
    global _kept
    if _kept:
        return True
    if os.environ.get("CAUSALNET_KEEP_HEAP", "").strip() == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    for option, value, name in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD, "M_MMAP_THRESHOLD"),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD, "M_TRIM_THRESHOLD"),
    ):
        if libc.mallopt(option, value) != 1:
            raise CausalNetError(f"glibc's mallopt refused {name} = {value}")
    _kept = True
    return True


def keep_heap_on_cpu(adapter: object) -> bool:
    """:func:`keep_heap` where ``adapter``'s model is on the CPU (a sweep's process, a Ray
    worker); False elsewhere."""
    return str(getattr(adapter, "device", "")) == "cpu" and keep_heap()


def heap_kept() -> bool:
    """Whether :func:`keep_heap` has set the thresholds in this process."""
    return _kept
