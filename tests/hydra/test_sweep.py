"""The Hydra sweep end to end on a tiny local model: tables, identity, oracle, resume, kill."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from causalnet.adapters import load
from causalnet.adapters.naive import naive_patch
from causalnet.errors import CausalNetError, ResultsError
from causalnet.hydra.store import ResultsStore
from causalnet.hydra.sweep import SweepConfig, ablation_values, run_sweep, select_sites
from tiny_lm import OTHER_FAMILIES, save_tiny, save_tiny_llama, write_prompts

N_PROMPTS = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_llama(root / "model"), write_prompts(root / "prompts.jsonl", N_PROMPTS)


def _config(tiny: tuple[Path, Path], **kw: object) -> SweepConfig:
    model, prompts = tiny
    return SweepConfig(model=str(model), prompts=str(prompts), **{"k": 4, **kw})


def test_sweep_writes_one_effects_row_per_prompt_and_site_and_all_readouts(tiny, tmp_path):
    out = run_sweep(_config(tiny), tmp_path / "r", progress=False)
    store = ResultsStore(out)
    effects, readouts = store.load_effects(), store.load_readouts()
    n_sites, n_readouts = 6, 7  # 3 layers x (attn, mlp); + embed
    assert len(effects) == N_PROMPTS * n_sites
    assert len(readouts) == N_PROMPTS * n_sites * n_readouts
    assert not effects.duplicated(["prompt_id", "site"]).any()
    run = store.load_run()
    assert run["args"]["k"] == 4 and run["args"]["ablation"] == "resample"
    assert run["info"]["n_prompts"] == N_PROMPTS and run["info"]["time_total_s"] > 0
    # every patch of a prompt came from another prompt: K distinct sources, never itself
    for _, row in effects.iterrows():
        sources = [int(s) for s in row["sources"].split(",")]
        assert len(set(sources)) == 4 and row["prompt_id"] not in sources


def test_sweep_rows_satisfy_the_exact_identity(tiny, tmp_path):
    effects = ResultsStore(run_sweep(_config(tiny), tmp_path / "r", progress=False)).load_effects()
    residual = effects["total_effect"] - (
        (effects["direct_effect_ablated_self"] - effects["direct_effect"])
        + effects["compensatory_effect"]
        + effects["delta_de_upstream"]
    )
    assert residual.abs().max() < 1e-4  # float32 model, float64 bookkeeping
    split = effects["compensatory_attn"] + effects["compensatory_mlp"]
    assert (split - effects["compensatory_effect"]).abs().max() < 1e-9


@pytest.mark.parametrize("family", list(OTHER_FAMILIES))
def test_sweep_from_a_folder_of_every_family_keeps_the_identity(family, tiny, tmp_path):
    """GPT-2, GPT-NeoX (parallel), GPT-J (parallel) and Gemma 3 (norms after the sublayers)
    through the command's code path: every row, and the exact identity, as for Llama."""
    model = save_tiny(tmp_path / family, family)
    config = SweepConfig(model=str(model), prompts=str(tiny[1]), k=3, limit=6)
    store = ResultsStore(run_sweep(config, tmp_path / "r", progress=False))
    effects, readouts = store.load_effects(), store.load_readouts()
    assert len(effects) == 6 * 6 and len(readouts) == 6 * 6 * 7
    expected = {"gemma3_text": "gemma3"}.get(family, family)  # model_type -> adapter family
    assert load(str(model)).arch.family == expected
    residual = effects["total_effect"] - (
        (effects["direct_effect_ablated_self"] - effects["direct_effect"])
        + effects["compensatory_effect"]
        + effects["delta_de_upstream"]
    )
    assert residual.abs().max() < 1e-4
    assert effects["total_effect"].abs().max() > 1e-3  # the ablations did something


def test_sweep_total_effect_matches_a_naive_hooked_reforward(tiny, tmp_path):
    config = _config(tiny, limit=8, k=3, sites="attn.1,mlp.0")
    effects = ResultsStore(run_sweep(config, tmp_path / "r", progress=False)).load_effects()
    adapter = load(config.model)
    prompts = [line for line in Path(config.prompts).read_text().splitlines()][:8]
    import json

    texts = [json.loads(p)["prompt"] for p in prompts]
    tokens = [adapter.encode(t) for t in texts]
    pool = torch.stack(
        [
            adapter.clean_run(t).site_values[
                [adapter.readout_sites().index(s) for s in ["attn.1", "mlp.0"]]
            ]
            for t in tokens
        ]
    )
    for i in (0, 5):
        values, _ = ablation_values(config, pool, i)
        clean = adapter.clean_run(tokens[i])
        for s_idx, site in enumerate(["attn.1", "mlp.0"]):
            logits = naive_patch(adapter, tokens[i], site, values[s_idx]).logits[:, -1]  # [P, V]
            centred = logits[:, clean.target] - logits.mean(-1)
            expected = float((centred - clean.centred_logit).mean())
            got = effects.query("prompt_id == @i and site == @site")["total_effect"].item()
            assert got == pytest.approx(expected, abs=1e-4)


def test_resume_with_different_arguments_is_an_error(tiny, tmp_path):
    run_sweep(_config(tiny, limit=5), tmp_path / "r", progress=False)
    with pytest.raises(ResultsError, match="k"):
        run_sweep(_config(tiny, limit=5, k=3), tmp_path / "r", progress=False)


def test_zero_mean_and_noise_ablations_run_and_zero_has_one_patch(tiny, tmp_path):
    for ablation in ("zero", "mean", "noise"):
        out = run_sweep(
            _config(tiny, ablation=ablation, limit=4), tmp_path / ablation, progress=False
        )
        effects = ResultsStore(out).load_effects()
        assert len(effects) == 4 * 6
        if ablation != "noise":
            assert (effects["total_effect_std"] == 0).all()  # one patch


def test_site_selection_by_glob_and_unknown_pattern_error():
    sites = ["attn.0", "mlp.0", "attn.1", "mlp.1"]
    assert select_sites(sites, "attn.*") == ["attn.0", "attn.1"]
    assert select_sites(sites, "mlp.1, attn.0") == ["attn.0", "mlp.1"]
    with pytest.raises(CausalNetError, match="attn.7"):
        select_sites(sites, "attn.7")


def test_head_granularity_sweep_reads_out_every_head(tiny, tmp_path):
    out = run_sweep(
        _config(tiny, granularity="head", limit=5, sites="attn.1.*"), tmp_path / "h", progress=False
    )
    effects = ResultsStore(out).load_effects()
    assert sorted(effects["site"].unique()) == [f"attn.1.h{h}" for h in range(4)]
    assert set(effects["kind"]) == {"head"}


def _frames(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    store = ResultsStore(out)
    return store.load_effects(), store.load_readouts()


def test_a_sweep_killed_with_sigkill_resumes_to_identical_results(tiny, tmp_path):
    """Kill a real sweep process mid-run, start it again, compare with an uninterrupted run."""
    model, _ = tiny
    prompts = write_prompts(tmp_path / "many.jsonl", 60)  # enough work to land a kill mid-run
    args = [
        sys.executable,
        "-m",
        "causalnet.cli",
        "hydra",
        "--model",
        str(model),
        "--prompts",
        str(prompts),
        "--k",
        "4",
        "--no-plots",
        "--quiet",
    ]
    reference = tmp_path / "reference"
    subprocess.run([*args, "--out", str(reference)], check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*args, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    shards = killed / "shards"
    while time.monotonic() < deadline:
        done = list(shards.glob("*.effects.parquet")) if shards.exists() else []
        if len(done) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(list(shards.glob("*.effects.parquet")))
    assert 3 <= partial < 60, "the kill must land mid-sweep"
    assert not (killed / "effects.parquet").exists()

    subprocess.run([*args, "--out", str(killed)], check=True, capture_output=True)
    e_ref, r_ref = _frames(reference)
    e_got, r_got = _frames(killed)
    pd.testing.assert_frame_equal(e_got, e_ref)
    pd.testing.assert_frame_equal(r_got, r_ref)
    assert (killed / "effects.parquet").read_bytes() == (reference / "effects.parquet").read_bytes()


def test_mean_ablation_is_the_mean_over_the_other_prompts_by_hand():
    """``mean`` = (sum of the other prompts' values) / (n - 1), as causalnet.ablations.Mean
    computes over a batch: here by hand on a [3 prompts, 2 sites, 2 dims] pool (exact in
    float64; float32 to rounding)."""
    pool = torch.tensor(
        [[[1.0, 2.0], [0.0, 4.0]], [[3.0, -2.0], [6.0, 0.0]], [[5.0, 6.0], [-3.0, 1.0]]],
        dtype=torch.float64,
    )
    config = SweepConfig(ablation="mean")
    values, sources = ablation_values(config, pool, 0)
    assert sources == [] and values.shape == (2, 1, 2)  # one patch per site
    assert values[:, 0].tolist() == [[4.0, 2.0], [1.5, 0.5]]  # ((3+5)/2, (-2+6)/2), ...
    assert ablation_values(config, pool, 2)[0][:, 0].tolist() == [[2.0, 0.0], [3.0, 2.0]]
    from causalnet.ablations import Mean

    for i in range(3):
        engine = Mean().sample(pool, torch.Generator())[0, i]  # the engine's leave-one-out
        assert torch.equal(ablation_values(config, pool, i)[0][:, 0], engine)
    pool32 = torch.randn(7, 3, 5)
    got = ablation_values(config, pool32, 4)[0][:, 0]
    by_hand = (pool32.double().sum(0) - pool32[4].double()) / 6
    assert got.dtype == torch.float32 and torch.allclose(got.double(), by_hand, atol=1e-6)
    with pytest.raises(CausalNetError, match="other prompts"):
        ablation_values(config, pool[:1], 0)


def test_mean_ablation_sweep_total_effect_matches_a_naive_reforward(tiny, tmp_path):
    """The sweep's mean ablation patches the leave-one-out mean of the clean runs' values (by
    hand, float64) and its total effect equals the naive hooked re-forward's (1e-4, float32)."""
    config = _config(tiny, ablation="mean", limit=5, sites="attn.0,mlp.1")
    effects = ResultsStore(run_sweep(config, tmp_path / "r", progress=False)).load_effects()
    adapter = load(config.model)
    import json

    lines = Path(config.prompts).read_text().splitlines()[:5]
    tokens = [adapter.encode(json.loads(line)["prompt"]) for line in lines]
    index = [adapter.readout_sites().index(s) for s in ("attn.0", "mlp.1")]
    values = torch.stack([adapter.clean_run(t).site_values[index] for t in tokens]).double()
    for i in (0, 3):
        others = torch.cat([values[:i], values[i + 1 :]])
        mean = others.mean(0).float()  # [2 sites, d]
        clean = adapter.clean_run(tokens[i])
        for s_idx, site in enumerate(("attn.0", "mlp.1")):
            logits = naive_patch(adapter, tokens[i], site, mean[s_idx : s_idx + 1]).logits[:, -1]
            centred = logits[:, clean.target] - logits.mean(-1)
            expected = float((centred - clean.centred_logit).mean())
            got = effects.query("prompt_id == @i and site == @site")["total_effect"].item()
            assert got == pytest.approx(expected, abs=1e-4)
