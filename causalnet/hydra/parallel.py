"""Python threads that each run torch on one thread: the sweep's CPU parallelism.

Why: on a CPU the per-prompt work is ~1,000 tensor operations of modest size (matrix products of
[rows <= 900, 576] activations with the layer weights, and small elementwise ones). With torch's
default of one OpenMP team spanning every core, each operation is split across the cores and
joined again; the joins cost little on an idle machine but a great deal on a shared one (a
thread descheduled by another process stalls every join: measured here up to 3x slower per
prompt than one thread). Computing different prompts on different cores, each single-threaded,
has no joins at all, keeps every core busy through the small operations, and overlaps one
prompt's bookkeeping (rows, writing) with another's arithmetic. Torch releases the GIL inside
its operations, so Python threads suffice.

:func:`prompt_threads` decides how many (``CAUSALNET_PROMPT_THREADS``, read at each call, or
torch's thread count for a plain adapter on the CPU); :func:`map_in_threads` maps a function
over items on them. Used by the pool pass (:func:`causalnet.hydra.pool.build_pool`) and by the
thread executor (:class:`causalnet.hydra.threads.ThreadExecutor`). This module imports no other
module of :mod:`causalnet.hydra`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from ..errors import CausalNetError

T = TypeVar("T")
R = TypeVar("R")


#: Why threaded work starts with one item computed alone. oneDNN (the float32 CPU linear layers
#: of :mod:`causalnet.adapters.kernels`) initialises some of its kernels lazily, on their first
#: call in the process, and two threads making those first calls at the same moment can get wrong
#: numbers -- not rounding: measured on a 3-layer d=32 Llama, a fresh process's pool of 60
#: prompts' clean runs on 2 threads differed from the serial one by up to 2e-3 in 5 of 16 runs
#: (0 of 16 with oneDNN off, 0 of 20 after one prompt's clean run alone). So the first item (a
#: batch of clean runs, or a prompt's whole computation) runs in the calling thread on one torch
#: thread, the rest side by side. The oneDNN probe alone
#: (:func:`causalnet.adapters.kernels.status`) was not enough (1 of 20).
SERIAL_FIRST = True


def prompt_threads(adapter: object, device: str) -> int:
    """How many prompts to compute side by side: ``CAUSALNET_PROMPT_THREADS`` if set, else
    torch's thread count for a plain adapter on the CPU, else 1.

    Only plain adapters qualify: a model dispatched over devices
    (:mod:`causalnet.hydra.devices`) moves weights in and out around each call, which is not
    safe to do from two threads at once.
    """
    raw = os.environ.get("CAUSALNET_PROMPT_THREADS", "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            raise CausalNetError(
                f"CAUSALNET_PROMPT_THREADS must be an integer, got {raw!r}"
            ) from None
        if n < 1:
            raise CausalNetError(f"CAUSALNET_PROMPT_THREADS must be at least 1, got {n}")
        return n
    from ..adapters import TransformerAdapter

    plain = isinstance(adapter, TransformerAdapter) and type(adapter).__module__.startswith(
        "causalnet.adapters"
    )
    if device != "cpu" or not plain or adapter.device.type != "cpu":
        return 1
    return max(1, torch.get_num_threads())


def map_in_threads(fn: Callable[[T], R], items: Sequence[T], threads: int) -> Iterator[R]:
    """``map(fn, items)`` on ``threads`` worker threads with one torch thread each, results in
    order (torch's thread count restored afterwards); plain ``map`` for one thread.

    The first item is computed in the calling thread before any worker starts (see
    :data:`SERIAL_FIRST`)."""
    if threads <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        yield fn(items[0])  # SERIAL_FIRST: oneDNN's first calls never run side by side
        with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            yield from pool.map(fn, items[1:])
    finally:
        torch.set_num_threads(before)
