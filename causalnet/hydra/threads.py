"""The thread executor: prompts computed side by side in one process, one torch thread each.

Why threads, and why one torch thread each: :mod:`causalnet.hydra.parallel`.

Results are unchanged: :func:`causalnet.hydra.plan.compute_prompt` depends on the plan and the
prompt index only (its random draws are seeded by them), every prompt is computed with one torch
thread whichever worker takes it, and the rows are written in prompt order by the calling thread.

:class:`ThreadExecutor` is what :func:`causalnet.hydra.sweep.run_sweep` uses for plain adapters
on the CPU when more than one torch thread is available
(:func:`~causalnet.hydra.parallel.prompt_threads`); ``CAUSALNET_PROMPT_THREADS=1`` turns it off
(one prompt at a time, torch's own threading), ``=N`` asks for N threads.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..errors import CausalNetError
from .parallel import map_in_threads, prompt_threads
from .plan import PromptRows, SweepPlan, compute_prompt

if TYPE_CHECKING:
    from ..adapters import TransformerAdapter

__all__ = ["ThreadExecutor", "compute_in_threads", "map_in_threads", "prompt_threads"]


def compute_in_threads(
    adapter: TransformerAdapter,
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

    bar = tqdm(total=len(todo), desc="hydra sweep", unit="prompt", disable=not progress)
    try:
        torch.set_num_threads(1)  # also the default that torch gives threads it has not seen
        queue = iter(todo)
        if threads > 1:  # parallel.SERIAL_FIRST: oneDNN's first calls run alone
            for i in queue:
                write(work(i))
                bar.update()
                break
        with ThreadPoolExecutor(threads, initializer=one_torch_thread) as pool:
            pending: deque[Future[PromptRows]] = deque()
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
    finally:
        bar.close()
        torch.set_num_threads(before)


@dataclass
class ThreadExecutor:
    """Prompts side by side on ``threads`` Python threads with ``adapter``
    (:func:`compute_in_threads`); an :class:`~causalnet.hydra.executors.Executor`."""

    adapter: TransformerAdapter
    threads: int

    def __post_init__(self) -> None:
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise CausalNetError(f"threads must be an int of at least 1, got {self.threads!r}")

    @property
    def workers(self) -> int:
        return 1

    @property
    def prompt_threads(self) -> int:
        return self.threads

    def run(
        self,
        plan: SweepPlan,
        todo: list[int],
        write: Callable[[PromptRows], None],
        figure_prompts: int = 1,
        progress: bool = True,
    ) -> None:
        compute_in_threads(self.adapter, plan, todo, write, self.threads, figure_prompts, progress)
