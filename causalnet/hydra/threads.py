"""Prompts computed side by side in one process: N Python threads, one torch thread each.

Why: on a CPU the per-prompt work is ~1,000 tensor operations of modest size (matrix products of
[rows <= 900, 576] activations with the layer weights, and small elementwise ones). With torch's
default of one OpenMP team spanning every core, each operation is split across the cores and
joined again; the joins cost little on an idle machine but a great deal on a shared one (a
thread descheduled by another process stalls every join: measured here up to 3x slower per
prompt than one thread). Computing different prompts on different cores, each single-threaded,
has no joins at all, keeps every core busy through the small operations, and overlaps one
prompt's bookkeeping (rows, writing) with another's arithmetic. Torch releases the GIL inside
its operations, so Python threads suffice.

Results are unchanged: :func:`causalnet.hydra.sweep.compute_prompt` depends on the plan and the
prompt index only (its random draws are seeded by them), every prompt is computed with one torch
thread whichever worker takes it, and the rows are written in prompt order by the calling thread.

Used by :func:`causalnet.hydra.sweep.run_sweep` (and by its pool pass, for chunks of prompts)
for plain adapters on the CPU when more than one torch thread is available
(:func:`prompt_threads`); ``CAUSALNET_PROMPT_THREADS=1`` turns it off (one prompt at a time,
torch's own threading), ``=N`` asks for N threads.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from ..errors import CausalNetError
from .sweep import PromptRows, SweepPlan, compute_prompt

T = TypeVar("T")
R = TypeVar("R")


def prompt_threads(adapter: Any, device: str) -> int:
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


def compute_in_threads(
    adapter: Any,
    plan: SweepPlan,
    todo: list[int],
    write: Callable[[PromptRows], None],
    threads: int,
    figure_prompts: int = 1,
    progress: bool = True,
) -> None:
    """Compute the prompts ``todo`` on ``threads`` worker threads (one torch thread each) and
    call ``write`` with each prompt's rows, in the order of ``todo``, from this thread.

    At most ``2 * threads`` prompts are in flight, so memory stays bounded. An error in a
    prompt's computation is raised here after the prompts before it were written (those after it
    are dropped; a resume recomputes them). torch's thread count is restored afterwards.
    """
    if threads < 1:
        raise CausalNetError(f"threads must be at least 1, got {threads}")
    before = torch.get_num_threads()

    def one_torch_thread() -> None:
        torch.set_num_threads(1)

    def work(i: int) -> PromptRows:
        return compute_prompt(adapter, plan, i, keep_patches=i < figure_prompts)

    try:
        torch.set_num_threads(1)  # also the default that torch gives threads it has not seen
        with ThreadPoolExecutor(threads, initializer=one_torch_thread) as pool:
            pending: deque[Future[PromptRows]] = deque()
            queue = iter(todo)
            bar = tqdm(total=len(todo), desc="hydra sweep", unit="prompt", disable=not progress)
            try:
                for i in queue:
                    pending.append(pool.submit(work, i))
                    if len(pending) >= 2 * threads:
                        write(pending.popleft().result())
                        bar.update()
                while pending:
                    write(pending.popleft().result())
                    bar.update()
            finally:
                for future in pending:
                    future.cancel()
                bar.close()
    finally:
        torch.set_num_threads(before)


def map_in_threads(fn: Callable[[T], R], items: Sequence[T], threads: int) -> Iterator[R]:
    """``map(fn, items)`` on ``threads`` worker threads with one torch thread each, results in
    order (torch's thread count restored afterwards); plain ``map`` for one thread."""
    if threads <= 1:
        yield from map(fn, items)
        return
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            yield from pool.map(fn, items)
    finally:
        torch.set_num_threads(before)
