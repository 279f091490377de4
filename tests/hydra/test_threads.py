"""Prompts side by side in threads (causalnet.hydra.threads) write what one at a time writes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from causalnet.adapters import load
from causalnet.errors import CausalNetError
from causalnet.hydra.store import ResultsStore
from causalnet.hydra.sweep import PromptRows, SweepConfig, compute_prompt, plan_sweep, run_sweep
from causalnet.hydra.threads import compute_in_threads, prompt_threads
from tiny_lm import save_tiny_llama, write_prompts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_llama(root / "model"), write_prompts(root / "prompts.jsonl", 10)


def _config(tiny: tuple[Path, Path]) -> SweepConfig:
    model, prompts = tiny
    return SweepConfig(model=str(model), prompts=str(prompts), k=3)


def test_threads_write_every_prompt_in_order_with_the_one_thread_rows(tiny):
    config = _config(tiny)
    adapter = load(config.model)
    plan = plan_sweep(config, adapter)
    todo = [7, 0, 3, 4, 9, 1]
    before = torch.get_num_threads()
    written: list[PromptRows] = []
    compute_in_threads(adapter, plan, todo, written.append, threads=3, progress=False)
    assert torch.get_num_threads() == before  # restored
    assert [r.index for r in written] == todo
    torch.set_num_threads(1)
    try:
        for rows in written:
            ref = compute_prompt(adapter, plan, rows.index, keep_patches=rows.index < 1)
            pd.testing.assert_frame_equal(rows.effects, ref.effects)
            pd.testing.assert_frame_equal(rows.readouts, ref.readouts)
            assert (rows.patches is None) == (ref.patches is None)
    finally:
        torch.set_num_threads(before)


def test_an_error_in_a_prompt_stops_the_sweep_after_the_earlier_prompts(tiny, monkeypatch):
    config = _config(tiny)
    adapter = load(config.model)
    plan = plan_sweep(config, adapter)
    import causalnet.hydra.threads as threads_module

    real = threads_module.compute_prompt

    def failing(adapter, plan, i, keep_patches):
        if i == 4:
            raise RuntimeError("prompt 4 failed")
        return real(adapter, plan, i, keep_patches)

    monkeypatch.setattr(threads_module, "compute_prompt", failing)
    written: list[int] = []
    with pytest.raises(RuntimeError, match="prompt 4"):
        compute_in_threads(
            adapter, plan, [0, 1, 2, 3, 4, 5, 6], lambda r: written.append(r.index), 2, 1, False
        )
    assert written == [0, 1, 2, 3]


def test_sweep_with_threads_equals_one_prompt_at_a_time(tiny, tmp_path, monkeypatch):
    config = _config(tiny)
    monkeypatch.setenv("CAUSALNET_PROMPT_THREADS", "3")
    threaded = ResultsStore(run_sweep(config, tmp_path / "threads", progress=False))
    assert threaded.load_run()["info"]["prompt_threads"] == 3
    monkeypatch.setenv("CAUSALNET_PROMPT_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the threads compute with one torch thread each
    try:
        single = ResultsStore(run_sweep(config, tmp_path / "single", progress=False))
    finally:
        torch.set_num_threads(before)
    assert single.load_run()["info"]["prompt_threads"] == 1
    pd.testing.assert_frame_equal(threaded.load_effects(), single.load_effects())
    pd.testing.assert_frame_equal(threaded.load_readouts(), single.load_readouts())


def test_prompt_threads_policy(tiny, monkeypatch):
    adapter = load(_config(tiny).model)
    monkeypatch.delenv("CAUSALNET_PROMPT_THREADS", raising=False)
    assert prompt_threads(adapter, "cpu") == torch.get_num_threads()
    assert prompt_threads(adapter, "cuda") == 1
    assert prompt_threads(object(), "cpu") == 1  # not a plain causalnet adapter
    monkeypatch.setenv("CAUSALNET_PROMPT_THREADS", "5")
    assert prompt_threads(adapter, "cuda") == 5
    for bad in ("0", "two"):
        monkeypatch.setenv("CAUSALNET_PROMPT_THREADS", bad)
        with pytest.raises(CausalNetError, match="CAUSALNET_PROMPT_THREADS"):
            prompt_threads(adapter, "cpu")


NO_CUDA = "no CUDA GPU on this machine: the cuda sweep runs where one is present"


@pytest.mark.parametrize(
    ("device", "dtype", "tol"),
    [
        ("cpu", "bfloat16", 5e-2),
        pytest.param(
            "cuda",
            "float32",
            1e-4,
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA),
        ),
        pytest.param(
            "cuda",
            "bfloat16",
            5e-2,
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA),
        ),
    ],
)
def test_sweep_in_another_device_or_dtype_agrees_with_float32_cpu(
    tiny, tmp_path, monkeypatch, device, dtype, tol
):
    """Tolerance: max abs difference <= tol * max(1, max |float32 value|) per column."""
    model, prompts = tiny
    base = dict(model=str(model), prompts=str(prompts), k=3, limit=6)
    ref = ResultsStore(run_sweep(SweepConfig(**base), tmp_path / "ref", progress=False))
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    other = SweepConfig(**base, device=device, dtype=dtype)
    got = ResultsStore(run_sweep(other, tmp_path / "got", progress=False))
    e_ref, e_got = ref.load_effects(), got.load_effects()
    assert (e_ref["target_token"] == e_got["target_token"]).all()
    for column in ("total_effect", "direct_effect", "compensatory_effect"):
        scale = max(1.0, float(e_ref[column].abs().max()))
        assert (e_ref[column] - e_got[column]).abs().max() <= tol * scale, column
