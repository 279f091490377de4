"""How a sweep's prompts are computed: one interface, three implementations.

An :class:`Executor` takes a plan (:class:`~causalnet.hydra.plan.SweepPlan`), the indices of the
prompts still to do, and a ``write`` callback; it computes each prompt with
:func:`~causalnet.hydra.plan.compute_prompt` and calls ``write`` once per prompt, in the calling
thread. ``write`` stores the rows (:meth:`causalnet.hydra.store.ResultsStore.write_prompt`), so
an executor never touches the results folder and every executor leaves the same folder:

- :class:`SerialExecutor` (here): one prompt at a time in this process;
- :class:`~causalnet.hydra.threads.ThreadExecutor`: prompts side by side in Python threads, one
  torch thread each (the default on a CPU with several cores);
- :class:`~causalnet.hydra.distributed.RayExecutor`: prompts on Ray workers, each loading its
  own model (``--workers N``, ``--ray-address``).

:func:`causalnet.hydra.sweep.run_sweep` picks one (or takes the one it is given). An executor
reports ``workers`` (processes computing prompts) and ``prompt_threads`` (prompts side by side
in one process), which ``run.json`` records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from tqdm.auto import tqdm

from .plan import PromptRows, SweepPlan, compute_prompt

if TYPE_CHECKING:
    from ..adapters import TransformerAdapter

#: The callback an executor hands each prompt's rows to (in the calling thread).
Write = Callable[[PromptRows], None]


@runtime_checkable
class Executor(Protocol):
    """Computes prompts of a plan and hands each one's rows to ``write`` exactly once."""

    @property
    def workers(self) -> int:
        """Processes computing prompts (1 unless distributed)."""
        ...

    @property
    def prompt_threads(self) -> int:
        """Prompts computed side by side within one process."""
        ...

    def run(
        self,
        plan: SweepPlan,
        todo: list[int],
        write: Write,
        figure_prompts: int = 1,
        progress: bool = True,
    ) -> Any:
        """Compute prompts ``todo`` (indices into ``plan.prompts``) and ``write`` each one's
        rows; per-patch rows are kept for indices below ``figure_prompts``. An error in a
        prompt's computation is raised after the rows already written."""
        ...


@dataclass
class SerialExecutor:
    """One prompt at a time, in this process, with ``adapter``; rows written in order."""

    adapter: TransformerAdapter

    @property
    def workers(self) -> int:
        return 1

    @property
    def prompt_threads(self) -> int:
        return 1

    def run(
        self,
        plan: SweepPlan,
        todo: list[int],
        write: Write,
        figure_prompts: int = 1,
        progress: bool = True,
    ) -> None:
        for i in tqdm(todo, desc="hydra sweep", unit="prompt", disable=not progress):
            write(compute_prompt(self.adapter, plan, i, keep_patches=i < figure_prompts))
