"""The Hydra sweep, end to end: every prompt, every site, K patches, every readout.

:func:`run_sweep` reads as one pass::

    validate   config fields (SweepConfig), paths (made absolute), device, the --out folder,
               the prompts; a folder that already holds a run must have been written with the
               same arguments and the same prompts (read-only check)
    load       the model; then the same check with the model's fingerprint
    plan       tokens, sites, and the ablation pool (read from the folder, checked, or computed)
    execute    each remaining prompt (:mod:`causalnet.hydra.executors`: serial, threads or Ray),
    store        its rows written as they arrive (:class:`~causalnet.hydra.store.ResultsStore`)
    finalize   consolidate the tables, record timings in run.json

Nothing is written into the results folder before the model is loaded and every input has been
checked: a failed start (a typo in ``--model``, a missing prompt file, ``--device cuda`` on a
machine without CUDA) leaves the folder as it was, and the corrected command then runs there.

**Resuming.** Results are written per prompt, atomically, so a killed sweep resumes where it
stopped when started again with the same arguments. ``run.json`` records the arguments with the
model path and prompt file made absolute, plus two fingerprints of what they held
(:mod:`causalnet.hydra.fingerprints`): ``prompts_fingerprint`` (ids, texts and attributes of
the swept prompts) and ``model_fingerprint`` (config and weights). A resume whose arguments or
fingerprints differ is refused with :class:`~causalnet.errors.ResultsError` naming what changed,
so one folder never mixes results of different inputs; start a new ``--out`` folder instead.
Folders written before the fingerprints existed (and their pickled ``pool.pt``) cannot be
resumed; ``report`` and ``plot`` still read them.

The per-prompt computation is :mod:`causalnet.hydra.plan`, the ablation values and the pool
:mod:`causalnet.hydra.pool` (``mean`` is the mean over the *other* prompts, as in
:class:`causalnet.ablations.Mean`). This module re-exports their public names
(``SweepConfig``, ``plan_sweep``, ``compute_prompt``, ``ablation_values``, ...).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import ConfigError, ResultsError
from .config import (
    ABLATIONS,
    SweepConfig,
    check_device_available,
    check_model_exists,
    normalise_paths,
)
from .data import Prompt
from .executors import Executor, SerialExecutor, Write
from .fingerprints import model_fingerprint, prompts_fingerprint
from .folder import check_out_folder
from .heap import heap_kept, keep_heap_on_cpu
from .parallel import prompt_threads
from .plan import (
    PromptRows,
    SweepPlan,
    adapter_max_length,
    attribute_first_token,
    compute_prompt,
    plan_sweep,
    pool_sites,
    prompt_tables,
    select_sites,
    sweep_prompts,
    sweep_sites,
)
from .pool import ablation_values, build_pool, prompt_generator, read_pool, save_pool
from .provenance import computed_by
from .store import IGNORED_ARG_KEYS, ResultsStore
from .threads import ThreadExecutor

if TYPE_CHECKING:
    from ..adapters import TransformerAdapter

__all__ = [
    "ABLATIONS",
    "PromptRows",
    "SweepConfig",
    "SweepPlan",
    "ablation_values",
    "adapter_max_length",
    "attribute_first_token",
    "build_pool",
    "choose_executor",
    "compute_prompt",
    "plan_sweep",
    "prompt_generator",
    "prompt_tables",
    "run_arguments",
    "run_sweep",
    "select_sites",
]

#: The keys of ``run.json`` args that fingerprint the inputs, and what they stand for.
FINGERPRINTS = {
    "prompts_fingerprint": "the prompts (ids, texts or attributes)",
    "model_fingerprint": "the model (config or weights)",
}


def run_sweep(
    config: SweepConfig,
    out: str | os.PathLike[str],
    *,
    adapter: TransformerAdapter | None = None,
    progress: bool = True,
    figure_prompts: int = 1,
    workers: int = 1,
    ray_address: str | None = None,
    executor: Executor | None = None,
) -> Path:
    """Run (or resume) the Hydra sweep into the results folder ``out``; returns its path.

    See the module docstring for the steps and for resuming. Per-patch readouts are kept for
    the first ``figure_prompts`` prompts (Figure 1/3). ``adapter``: a model already loaded
    (its fingerprint is taken from its weights in memory). ``workers > 1`` or a
    ``ray_address`` computes the prompts on Ray workers
    (:class:`causalnet.hydra.distributed.RayExecutor`), or the given ``executor`` does; this
    process still plans, builds the pool and writes every row, so the results are the same.
    ``config.device == "auto"`` spreads the model over all devices (:mod:`.devices`).
    """
    from .devices import load_for_config  # the adapters import transformers: only when sweeping

    t_start = time.perf_counter()
    # validate: nothing loaded, nothing written
    config, out = check_request(config, out, workers, figure_prompts, adapter is None)
    if executor is not None:
        check_executor(executor)
    prompts = sweep_prompts(config)
    args = run_arguments(config, prompts)
    check_resumable(out, args, skip=("model_fingerprint",))
    # load
    given = adapter
    if adapter is None:
        adapter = load_for_config(config.model, config.dtype, config.device)
    keep_heap_on_cpu(adapter)  # a sweep's process is given over to it (causalnet.hydra.heap)
    args["model_fingerprint"] = model_fingerprint(config.model, given)
    check_resumable(out, args)
    t_loaded = time.perf_counter()
    # plan
    stored = read_pool(out)
    if stored is not None:
        stored.check([p.id for p in prompts], pool_sites(*sweep_sites(config, adapter)))
    pool = None if stored is None else stored.values
    plan = plan_sweep(config, adapter, progress, prompts=prompts, pool=pool)
    t_pool = time.perf_counter()
    # execute and store: the first write into the folder
    store = ResultsStore(out)
    store.open(args, resume=True)
    try:
        if stored is None:
            save_pool(
                out, [p.id for p in prompts], pool_sites(plan.sites, plan.readout_sites), plan.pool
            )
        done = store.completed_ids()
        todo = [i for i, p in enumerate(plan.prompts) if p.id not in done]
        how = computed_by(adapter)  # proved before any prompt is computed (.provenance)
        executor = choose_executor(adapter, config, todo, workers, ray_address, executor)
        adapter = None  # the executor holds what it needs (Ray workers load their own)
        if todo:
            executor.run(plan, todo, _writer(store), figure_prompts, progress)
    except BaseException:
        store.close()
        raise
    # finalize
    t_end = time.perf_counter()
    store.finalize(
        {
            "n_prompts": len(plan.prompts),
            "n_sites": len(plan.sites),
            "n_readout_sites": len(plan.readout_sites),
            "n_computed_this_run": len(todo),
            "workers": executor.workers,
            "prompt_threads": executor.prompt_threads,
            "heap_kept": heap_kept(),
            "computed_by": how,
            "time_load_s": round(t_loaded - t_start, 3),
            "time_pool_s": round(t_pool - t_loaded, 3),
            "time_sweep_s": round(t_end - t_pool, 3),
            "time_total_s": round(t_end - t_start, 3),
            "s_per_prompt": round((t_end - t_pool) / max(len(todo), 1), 4),
        }
    )
    return out


def _writer(store: ResultsStore) -> Write:
    def write(rows: PromptRows) -> None:
        store.write_prompt(
            rows.prompt_id, rows.effects, rows.readouts, rows.patches, rows.patch_effects
        )

    return write


def check_request(
    config: SweepConfig,
    out: str | os.PathLike[str],
    workers: int = 1,
    figure_prompts: int = 1,
    check_model: bool = True,
) -> tuple[SweepConfig, Path]:
    """The checks that need neither the model nor the folder's lock: the config's type, its
    paths made absolute (:func:`~causalnet.hydra.config.normalise_paths`), the model's
    existence (``check_model``: unless a loaded adapter was given), the device's presence,
    ``workers``, ``figure_prompts`` and the ``out`` folder
    (:func:`~causalnet.hydra.folder.check_out_folder`). Returns the normalised config and
    ``out`` as a Path; writes nothing."""
    if not isinstance(config, SweepConfig):
        raise ConfigError(f"config must be a SweepConfig, got {type(config).__name__}")
    for name, value in (("workers", workers), ("figure_prompts", figure_prompts)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an int, got {value!r}")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    if figure_prompts < 0:
        raise ConfigError(f"figure_prompts must be at least 0, got {figure_prompts}")
    config = normalise_paths(config)
    if check_model:
        check_model_exists(config.model)
    check_device_available(config.device)
    out = Path(out).expanduser()
    check_out_folder(out)  # absent, empty or a results folder; writable
    return config, out


def check_executor(executor: object) -> None:
    """ConfigError unless ``executor`` has the :class:`~causalnet.hydra.executors.Executor`
    interface (``run``, ``workers``, ``prompt_threads``)."""
    if not isinstance(executor, Executor):
        raise ConfigError(
            f"{type(executor).__name__} is not an executor: it needs run(plan, todo, write, "
            "figure_prompts, progress), workers and prompt_threads"
        )


def run_arguments(config: SweepConfig, prompts: list[Prompt] | None = None) -> dict[str, Any]:
    """The arguments that define a results folder (``run.json``): the config's fields, the
    library version and, given the prompts, ``prompts_fingerprint``."""
    args: dict[str, Any] = {k: getattr(config, k) for k in SweepConfig.field_names()}
    args["library_version"] = __version__
    if prompts is not None:
        args["prompts_fingerprint"] = prompts_fingerprint(prompts)
    return args


def check_resumable(out: Path, args: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    """Reading only: ResultsError if ``out`` holds a run written with other arguments or other
    inputs (keys in ``skip`` not compared yet), naming what changed. No run: nothing to do."""
    if not (out / "run.json").exists():
        return
    stored = ResultsStore(out).load_run().get("args")
    if not isinstance(stored, dict):
        raise ResultsError(f"{out / 'run.json'} has no 'args' object")
    now = json.loads(json.dumps(args, sort_keys=True))
    keys = sorted((set(stored) | set(now)) - IGNORED_ARG_KEYS - set(skip))
    differ = [k for k in keys if stored.get(k, "<absent>") != now.get(k, "<absent>")]
    if not differ:
        return
    if any(k in FINGERPRINTS and k not in stored for k in differ):
        raise ResultsError(
            f"{out} was written by an older causalnet that did not record its inputs' "
            "fingerprints, so a resume could mix results of different inputs; start a new "
            "--out folder ('causalnet report' and 'plot' still read this one)"
        )
    parts = [
        f"{FINGERPRINTS[k]} changed since the folder was written ({k} {stored[k]} != {now[k]})"
        if k in FINGERPRINTS
        else f"{k}: stored {stored.get(k, '<absent>')!r}, now {now.get(k, '<absent>')!r}"
        for k in differ
    ]
    raise ResultsError(
        f"{out} was written with different arguments or inputs: {'; '.join(parts)}. Its "
        "results cannot be mixed with new ones: rerun with the same arguments and inputs, or "
        "start a new --out folder"
    )


def choose_executor(
    adapter: TransformerAdapter,
    config: SweepConfig,
    todo: list[int],
    workers: int = 1,
    ray_address: str | None = None,
    executor: Executor | None = None,
) -> Executor:
    """The executor of a sweep: the one given; else Ray for ``workers > 1`` or an address;
    else threads where :func:`~causalnet.hydra.parallel.prompt_threads` allows more than one
    (and there is work); else one prompt at a time."""
    if executor is not None:
        check_executor(executor)
        return executor
    if workers > 1 or ray_address is not None:
        from .distributed import RayExecutor

        return RayExecutor(workers=workers, address=ray_address)
    threads = prompt_threads(adapter, config.device) if todo else 1
    return ThreadExecutor(adapter, threads) if threads > 1 else SerialExecutor(adapter)
