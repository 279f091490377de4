"""Sweeps on a local Ray cluster of 2 workers: equal to one process, and nothing lost when a
worker dies mid-sweep. Skipped when Ray is not installed (``pip install 'causalnet-scm[ray]'``).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from causalnet.adapters import load
from causalnet.errors import CausalNetError
from causalnet.hydra.store import ResultsStore
from causalnet.hydra.sweep import SweepConfig, SweepPlan, plan_sweep, run_sweep
from tiny_lm import save_tiny_llama, write_prompts

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'causalnet-scm[ray]'")

from causalnet.hydra.distributed import PackedPlan, RayExecutor, RayProgress  # noqa: E402

N_PROMPTS = 16


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster (2 CPUs) for the whole module: Ray starts slowly."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ray")
    return save_tiny_llama(root / "model"), write_prompts(root / "prompts.jsonl", N_PROMPTS)


@pytest.fixture(scope="module")
def config(tiny) -> SweepConfig:
    model, prompts = tiny
    return SweepConfig(model=str(model), prompts=str(prompts), k=3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This process runs torch on 1 thread, like each worker: float32 kernels may sum in another
    order on another number of threads (here up to ~4e-7 apart), and "exactly" means bit for bit
    -- for the single-process reference and for the pool the driver builds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield threads
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> ResultsStore:
    """The single-process sweep (2 per-patch figure prompts, so patches are compared too)."""
    out = tmp_path_factory.mktemp("ref") / "r"
    return ResultsStore(run_sweep(config, out, progress=False, figure_prompts=2))


def assert_same_results(got: ResultsStore, ref: ResultsStore) -> None:
    """Every table equal to the single-process run, bit for bit; no prompt missing or twice."""
    effects = got.load_effects()
    assert sorted(effects["prompt_id"].unique()) == list(range(N_PROMPTS))
    assert not effects.duplicated(["prompt_id", "site"]).any()
    assert len(got.completed_ids()) == N_PROMPTS
    pd.testing.assert_frame_equal(effects, ref.load_effects(), check_exact=True)
    pd.testing.assert_frame_equal(got.load_readouts(), ref.load_readouts(), check_exact=True)
    pd.testing.assert_frame_equal(got.load_patches(), ref.load_patches(), check_exact=True)


def test_two_workers_equal_one_process_exactly(cluster, config, reference, tmp_path, one_thread):
    out = run_sweep(config, tmp_path / "r", progress=False, figure_prompts=2, workers=2)
    got = ResultsStore(out)
    assert_same_results(got, reference)
    info = got.load_run()["info"]
    assert info["workers"] == 2 and info["n_computed_this_run"] == N_PROMPTS
    # against a run on all of this machine's threads: equal up to float32 summation order
    torch.set_num_threads(one_thread)
    try:
        default = ResultsStore(run_sweep(config, tmp_path / "d", progress=False))
    finally:
        torch.set_num_threads(1)
    pd.testing.assert_frame_equal(got.load_effects(), default.load_effects(), rtol=0, atol=1e-5)


def test_command_line_workers_flag(cluster, config, reference, tmp_path, capsys):
    from causalnet.cli import main

    args = ["hydra", "--model", config.model, "--prompts", config.prompts, "--k", "3"]
    args += ["--no-plots", "--quiet", "--out"]
    assert main([*args, str(tmp_path / "r"), "--workers", "2"]) == 0
    got = ResultsStore(tmp_path / "r")
    assert got.load_run()["info"]["workers"] == 2
    pd.testing.assert_frame_equal(got.load_effects(), reference.load_effects(), check_exact=True)
    assert main([*args, str(tmp_path / "bad"), "--workers", "0"]) == 2
    assert "workers must be at least 1" in capsys.readouterr().err


def _pid(actor) -> int | None:
    """The worker's process id, or None once Ray reports it dead."""
    try:
        return ray.get(actor.pid.remote(), timeout=60)
    except ray.exceptions.RayActorError:
        return None


def _kill_after(n_written: int, slot: int, no_restart: bool):
    """An ``on_result`` hook that learns worker ``slot``'s pid after the first prompt, kills the
    worker once ``n_written`` prompts are written (it has prompts in flight then), and waits until
    Ray reports it dead (``no_restart``) or running again in a new process. ``seen`` records the
    pids, the prompts in flight on it and the prompts each worker had delivered at the kill."""
    seen: dict[str, object] = {}

    def hook(progress: RayProgress) -> None:
        actor = progress.workers[slot]
        if progress.n_written == 1:
            seen["pid"] = _pid(actor)  # waits for its in-flight prompts; none are sent meanwhile
        if progress.n_written == n_written:
            seen["in_flight"] = progress.in_flight[slot]
            seen["delivered"] = list(progress.per_worker)
            ray.kill(actor, no_restart=no_restart)
            deadline = time.monotonic() + 60
            while (new := _pid(actor)) == seen["pid"] and time.monotonic() < deadline:
                time.sleep(0.05)
            seen["new_pid"] = new

    return hook, seen


def test_worker_killed_for_good_mid_sweep_its_prompts_are_redone_elsewhere(
    cluster, config, reference, tmp_path
):
    hook, seen = _kill_after(3, slot=0, no_restart=True)
    executor = RayExecutor(workers=2, on_result=hook)
    out = run_sweep(config, tmp_path / "r", progress=False, figure_prompts=2, executor=executor)
    stats = executor.stats
    assert seen["pid"] is not None and seen["new_pid"] is None  # it was alive, then dead
    assert seen["in_flight"] >= 1
    assert stats.alive == [False, True]
    # what it had in flight, and what was sent to it before the driver knew, went elsewhere
    assert stats.n_resubmitted >= 1
    assert stats.per_worker[0] <= seen["delivered"][0] + seen["in_flight"]
    assert stats.n_written == sum(stats.per_worker) == N_PROMPTS
    assert_same_results(ResultsStore(out), reference)


def test_worker_crash_restarts_it_and_loses_nothing(cluster, config, reference, tmp_path):
    hook, seen = _kill_after(4, slot=1, no_restart=False)  # like a crash: Ray restarts it
    executor = RayExecutor(workers=2, on_result=hook)
    out = run_sweep(config, tmp_path / "r", progress=False, figure_prompts=2, executor=executor)
    stats = executor.stats
    assert seen["new_pid"] not in (None, seen["pid"])  # a new process took its place
    assert seen["in_flight"] >= 1
    assert stats.alive == [True, True]
    assert stats.per_worker[1] > seen["delivered"][1]  # the restarted worker went on working
    assert stats.n_written == sum(stats.per_worker) == N_PROMPTS
    assert_same_results(ResultsStore(out), reference)


def test_resume_with_workers_computes_only_the_missing_prompts(
    cluster, config, reference, tmp_path
):
    out = tmp_path / "r"
    shutil.copytree(reference.path, out)
    missing = [3, 8, 9, 15]
    for pid in missing:  # as if the sweep had been killed before these prompts were written
        for shard in (out / "shards").glob(f"i{pid}.*"):
            shard.unlink()
    assert len(ResultsStore(out).completed_ids()) == N_PROMPTS - len(missing)
    shared: list[bool] = []

    def check_pool(progress: RayProgress) -> None:  # the first run's stored pool, shared
        if not shared:
            shared.extend(
                ray.get([w.pool_is_shared.remote(progress.plan_ref) for w in progress.workers])
            )

    executor = RayExecutor(workers=2, on_result=check_pool)
    run_sweep(config, out, progress=False, figure_prompts=2, executor=executor)
    assert shared == [True, True]
    got = ResultsStore(out)
    assert got.load_run()["info"]["n_computed_this_run"] == len(missing)
    assert_same_results(got, reference)


def test_every_worker_dead_stops_with_an_error_and_keeps_what_was_written(
    cluster, config, tmp_path
):
    def kill_all(progress: RayProgress) -> None:
        if progress.n_written == 2:
            for actor in progress.workers:
                ray.kill(actor, no_restart=True)

    with pytest.raises(CausalNetError, match="every Ray worker died"):
        run_sweep(
            config, tmp_path / "r", progress=False, executor=RayExecutor(2, on_result=kill_all)
        )
    done = ResultsStore(tmp_path / "r").completed_ids()
    assert 2 <= len(done) < N_PROMPTS


def test_workers_that_cannot_load_the_model_stop_the_sweep_with_the_cause(cluster, tiny, tmp_path):
    model, prompts = tiny
    adapter = load(str(model))  # the driver plans with the model; the workers look elsewhere
    config = SweepConfig(model=str(tmp_path / "no-such-model"), prompts=str(prompts), k=3)
    with pytest.raises(CausalNetError, match="(?s)every Ray worker died.*no-such-model"):
        run_sweep(config, tmp_path / "r", adapter=adapter, progress=False, workers=2)
    assert not ResultsStore(tmp_path / "r").completed_ids()


def test_an_error_in_a_prompt_is_raised_in_the_driver_not_retried(cluster, config):
    plan = plan_sweep(config, load(config.model))
    written: list[int] = []
    executor = RayExecutor(workers=2)
    with pytest.raises(IndexError):  # prompt 99 does not exist: compute_prompt raises
        executor.run(plan, [0, 99, 1], write=lambda rows: written.append(rows.index))
    assert executor.stats.n_resubmitted == 0 and 99 not in written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_packed_plan_round_trips_through_the_object_store(cluster, dtype):
    pool = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    plan = SweepPlan(None, [], [], ["attn.0"], ["embed", "attn.0"], pool)  # type: ignore[arg-type]
    back = ray.get(ray.put(PackedPlan.pack(plan))).unpack()
    assert back.pool.dtype == dtype and torch.equal(back.pool, pool)
    assert back.sites == plan.sites and back.readout_sites == plan.readout_sites


def test_missing_ray_gives_the_install_command(monkeypatch):
    from causalnet.hydra import distributed

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(CausalNetError, match=r"pip install 'causalnet-scm\[ray\]'"):
        distributed.import_ray()
