"""Sweeps over many processes and machines with Ray (``causalnet hydra --workers N``).

No scheduler of our own: Ray runs the workers, and the sweep's results folder stays exactly as in
one process. The design:

- The **driver** (the process that runs :func:`causalnet.hydra.sweep.run_sweep`) opens the one
  :class:`~causalnet.hydra.store.ResultsStore` (it alone holds the folder's lock and writes), plans
  the sweep and builds the ablation pool once (``pool.safetensors``, reused on resume).
  :class:`RayExecutor` is one of the sweep's executors (:mod:`causalnet.hydra.executors`).
- The plan -- prompts, tokens, sites and the pool -- is put into Ray's object store **once**
  (``ray.put``); the pool travels as a NumPy byte array, which Ray shares read-only (zero copy)
  between the workers of a node. Workers never recompute the pool.
- Each **worker** is a Ray actor that loads the model once (:func:`causalnet.hydra.devices.
  load_for_config`) and keeps it, then runs :func:`~causalnet.hydra.plan.compute_prompt` for the
  prompt indices it is sent and returns the rows. ``compute_prompt`` is pure and its random draws
  depend on (seed, prompt index) only, so a worker returns exactly what one process computes --
  bit for bit when that process runs torch on as many threads as a worker (float32 kernels may
  sum in another order on another number of threads: ~1e-7 relative).
- The driver keeps two prompts in flight per worker and writes each prompt's rows as they arrive
  (``ray.wait``). Shards are written atomically per prompt and the final tables are sorted, so the
  folder does not depend on the order of arrival: its tables equal a single-process run's.

**Failures.** A worker that dies (a crash, the OOM killer, ``ray.kill``) loses nothing: Ray
restarts it (``max_restarts``, the model is loaded again and the plan re-read from the object
store) and re-runs its unfinished prompts (``max_task_retries=-1``); a worker that dies for good
(restarts used up, or killed with ``no_restart``) is retired and its unfinished prompts are sent to
the others. A prompt's rows are written only once, when its first result arrives; the store's
completed set makes a later resume skip it. If every worker is gone the sweep stops with
:class:`~causalnet.errors.CausalNetError` (what was written stays; run again to resume). An error
raised by the computation itself (not a dead worker) stops the sweep as it would in one process.

**Threads and devices.** Each worker asks Ray for ``cpus_per_worker`` CPUs (default 1) and runs
torch with that many threads, so N workers on N cores do not oversubscribe them (Ray also sets
``OMP_NUM_THREADS``). With ``device="cuda"`` each worker asks for one GPU (Ray sets
``CUDA_VISIBLE_DEVICES``); with ``device="auto"`` (a model split over devices,
:mod:`causalnet.hydra.devices`) each worker asks for as many GPUs as the driver sees. When the
cluster has fewer GPUs than that for all workers, they share them (fractional GPUs).
A local cluster is started with enough CPUs for the workers when Ray is not running; with an
address (``--ray-address auto`` or ``ray://host:10001``) the sweep joins an existing cluster,
whose nodes need causalnet installed and the model at the same path.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import CausalNetError
from .cleanruns import group_numbers, next_for
from .config import SweepConfig
from .heap import keep_heap_on_cpu
from .plan import PromptRows, SweepPlan, compute_prompt

if TYPE_CHECKING:
    from ..adapters import TransformerAdapter

INSTALL_HINT = "pip install 'causalnet-scm[ray]'"


def import_ray() -> Any:
    """The ``ray`` module, or a CausalNetError saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise CausalNetError(
            f"sweeping with several workers needs Ray, which is not installed: {INSTALL_HINT}"
        ) from err
    return ray


# ---- the plan, packed for the object store ---------------------------------------------------
@dataclass
class PackedPlan:
    """A :class:`SweepPlan` whose pool is a NumPy byte array (any torch dtype, bfloat16 too), so
    that Ray's object store shares it between the workers of a node without copies."""

    plan: SweepPlan  # with ``pool`` replaced by an empty tensor
    pool_bytes: np.ndarray
    pool_dtype: torch.dtype
    pool_shape: tuple[int, ...]

    @classmethod
    def pack(cls, plan: SweepPlan) -> PackedPlan:
        """Pack ``plan`` (its pool moved to the CPU)."""
        pool = plan.pool.detach().to("cpu").contiguous()
        raw = pool.view(torch.uint8).numpy() if pool.numel() else np.zeros(0, np.uint8)
        empty = torch.empty(0, dtype=pool.dtype)
        return cls(replace(plan, pool=empty), raw, pool.dtype, tuple(pool.shape))

    def unpack(self) -> SweepPlan:
        """The plan with its pool as a tensor view of the bytes (no copy). Ray's zero-copy
        arrays are read-only; the sweep only reads the pool, so torch's warning is silenced."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            raw = torch.from_numpy(self.pool_bytes)
        pool = raw.view(self.pool_dtype).reshape(self.pool_shape)
        return replace(self.plan, pool=pool)


# ---- the worker ------------------------------------------------------------------------------
class SweepWorker:
    """One Ray actor: loads the model once and keeps it; fetches the plan once from the object
    store (on its first prompt, and again after a restart) and keeps it; computes prompts.

    The plan's reference comes with every call, inside a list so that Ray passes the reference
    rather than the value: a worker restarted after a crash fetches it again, and the reference
    is not a constructor argument (which Ray would have to keep for restarts).
    """

    def __init__(self, config: SweepConfig, threads: int) -> None:
        from .devices import load_for_config

        torch.set_num_threads(threads)
        device = config.device
        if device.startswith("cuda"):
            device = "cuda"  # Ray gives this worker its GPU(s) as CUDA_VISIBLE_DEVICES
        self.adapter: TransformerAdapter = load_for_config(config.model, config.dtype, device)
        keep_heap_on_cpu(self.adapter)  # this process computes prompts only (hydra.heap)
        self._key: str | None = None
        self._packed: PackedPlan | None = None
        self.plan: SweepPlan | None = None

    def _plan(self, plan_ref: list[Any]) -> SweepPlan:
        import ray

        ref = plan_ref[0]
        if self._key != ref.hex() or self.plan is None:
            self._packed = ray.get(ref)
            self.plan = self._packed.unpack()
            self._key = ref.hex()
        return self.plan

    def compute(self, plan_ref: list[Any], index: int, keep_patches: bool) -> PromptRows:
        """The rows of prompt ``index`` (:func:`causalnet.hydra.plan.compute_prompt`)."""
        return compute_prompt(self.adapter, self._plan(plan_ref), index, keep_patches)

    def pid(self) -> int:
        """The worker's process id."""
        return os.getpid()

    def pool_is_shared(self, plan_ref: list[Any]) -> bool:
        """Whether the pool is a read-only view into Ray's object store (one copy per node,
        shared by its workers) rather than a private copy."""
        self._plan(plan_ref)
        assert self._packed is not None
        return not self._packed.pool_bytes.flags.writeable


@dataclass
class RayProgress:
    """The state of a :class:`RayExecutor` run, shown to its ``on_result`` hook after each write
    (lists are indexed by worker slot)."""

    workers: list[Any]  # the actor handles
    alive: list[bool]  # False once a worker died for good
    per_worker: list[int]  # prompts delivered (and written) by each worker
    in_flight: list[int]  # prompts sent to each worker and not yet returned
    plan_ref: list[Any] = field(default_factory=list)  # [ObjectRef of the PackedPlan]
    n_written: int = 0
    n_resubmitted: int = 0  # prompts sent again after their worker failed
    written: set[int] = field(default_factory=set)  # prompt indices written
    time_start_s: float = 0.0  # connecting to / starting Ray and putting the plan
    time_first_s: float = 0.0  # from then to the first prompt written (workers load the model)
    time_total_s: float = 0.0  # from the call to the last prompt written


@dataclass
class RayExecutor:
    """Runs a sweep's prompts on ``workers`` Ray actors (see the module docstring); an
    :class:`~causalnet.hydra.executors.Executor`.

    ``address``: an existing cluster (``"auto"``, ``"ray://host:10001"``, ...); None joins the
    Ray already initialised in this process or starts a local one (shut down afterwards).
    ``on_result(progress)`` is called after each prompt is written (monitoring, tests).
    """

    workers: int = 2
    address: str | None = None
    cpus_per_worker: int = 1
    gpus_per_worker: float | None = None
    max_restarts: int = 2
    in_flight: int = 2
    on_result: Callable[[RayProgress], None] | None = None
    stats: RayProgress | None = field(default=None, init=False)

    @property
    def prompt_threads(self) -> int:
        """Prompts side by side within one worker: 1 (each worker runs torch on
        ``cpus_per_worker`` threads)."""
        return 1

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int):
            raise CausalNetError(f"workers must be an int, got {self.workers!r}")
        if self.workers < 1:
            raise CausalNetError(f"workers must be at least 1, got {self.workers}")
        if self.cpus_per_worker < 1 or self.in_flight < 1 or self.max_restarts < 0:
            raise CausalNetError("cpus_per_worker and in_flight must be >= 1, max_restarts >= 0")

    def _gpus(self, ray: Any, device: str) -> float:
        """GPUs per worker: ``gpus_per_worker`` if given; else 1 for ``cuda`` and the driver's
        GPU count for ``auto``, shared out (fractions) when the cluster has fewer for all."""
        if self.gpus_per_worker is not None:
            return self.gpus_per_worker
        if device.startswith("cuda"):
            want = 1.0
        elif device == "auto":
            want = float(torch.cuda.device_count())
        else:
            return 0.0
        total = float(ray.cluster_resources().get("GPU", 0.0))
        if total == 0.0 and want > 0.0:
            raise CausalNetError(f"device {device!r} but the Ray cluster has no GPUs")
        return min(want, total / self.workers)

    def _init(self, ray: Any) -> bool:
        """Connect to (or start) Ray; True if this call started it (and must shut it down)."""
        if ray.is_initialized():
            return False
        if self.address is not None:
            ray.init(address=self.address)
        else:
            cpus = max(os.cpu_count() or 1, self.workers * self.cpus_per_worker)
            ray.init(num_cpus=cpus, include_dashboard=False)
        return True

    def run(
        self,
        plan: SweepPlan,
        todo: list[int],
        write: Callable[[PromptRows], None],
        figure_prompts: int = 1,
        progress: bool = True,
    ) -> RayProgress:
        """Compute prompts ``todo`` (indices into ``plan.prompts``) on the workers and ``write``
        each one's rows exactly once, in the driver, as they arrive."""
        ray = import_ray()
        t0 = time.perf_counter()
        started = self._init(ray)
        actors: list[Any] = []
        try:
            packed = ray.put(PackedPlan.pack(plan))
            t_start = time.perf_counter()
            remote = ray.remote(SweepWorker).options(
                num_cpus=self.cpus_per_worker,
                num_gpus=self._gpus(ray, plan.config.device),
                max_restarts=self.max_restarts,
                max_task_retries=-1,
            )
            n = min(self.workers, max(len(todo), 1))
            actors = [remote.remote(plan.config, self.cpus_per_worker) for _ in range(n)]
            state = RayProgress(actors, [True] * n, [0] * n, [0] * n, plan_ref=[packed])
            state.time_start_s = t_start - t0
            self.stats = state
            group_of = group_numbers([len(t) for t in plan.tokens])
            self._loop(ray, state, todo, write, figure_prompts, progress, group_of)
            state.time_total_s = time.perf_counter() - t0
            return state
        finally:
            for actor in actors:
                ray.kill(actor)
            if started:
                ray.shutdown()

    def _loop(
        self,
        ray: Any,
        state: RayProgress,
        todo: list[int],
        write: Callable[[PromptRows], None],
        figure_prompts: int,
        progress: bool,
        group_of: list[int],
    ) -> None:
        from ray.exceptions import RayActorError

        t_loop = time.perf_counter()
        # Ray < 2.10 has no ActorDiedError: any actor error then counts as a death.
        died = getattr(ray.exceptions, "ActorDiedError", RayActorError)

        queue = deque(todo)
        owners: dict[int, int] = {}  # clean-run group -> the worker computing it (cleanruns)
        pending: dict[Any, tuple[int, int]] = {}  # ref -> (prompt index, worker slot)
        load = state.in_flight
        last_error: BaseException | None = None
        bar = tqdm(total=len(todo), desc="hydra sweep (ray)", unit="prompt", disable=not progress)
        try:
            while queue or pending:
                for slot, actor in enumerate(state.workers):
                    while state.alive[slot] and load[slot] < self.in_flight and queue:
                        index = next_for(queue, slot, owners, group_of, state.alive)
                        if index in state.written:
                            continue
                        ref = actor.compute.remote(state.plan_ref, index, index < figure_prompts)
                        pending[ref] = (index, slot)
                        load[slot] += 1
                if not pending:
                    raise CausalNetError(
                        f"every Ray worker died; {len(queue)} prompts were not computed (what "
                        f"was written is kept: run again to resume). Last error: {last_error}"
                    )
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                index, slot = pending.pop(ref)
                load[slot] -= 1
                try:
                    rows = ray.get(ref)
                except RayActorError as err:  # the worker died: redo the prompt elsewhere
                    last_error = err
                    if isinstance(err, died):
                        state.alive[slot] = False
                    if index not in state.written:
                        queue.appendleft(index)
                        state.n_resubmitted += 1
                    continue
                if rows.index in state.written:
                    continue
                write(rows)
                state.written.add(rows.index)
                state.n_written += 1
                state.per_worker[slot] += 1
                if state.n_written == 1:
                    state.time_first_s = time.perf_counter() - t_loop
                bar.update()
                if self.on_result is not None:
                    self.on_result(state)
        finally:
            bar.close()
