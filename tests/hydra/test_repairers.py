"""Who repairs (issue 13, §3): the compensation map and the replacement heads."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from causalnet.adapters import adapt
from causalnet.errors import ResultsError
from causalnet.hydra.config import SweepConfig
from causalnet.hydra.data import load_prompts
from causalnet.hydra.plan import compute_prompt, plan_sweep
from causalnet.hydra.repairers import (
    chance_jaccard,
    compensation_map,
    compensation_matrix,
    infer_parallel_residual,
    replacement_heads,
    top_compensators,
)
from tiny_lm import OTHER_FAMILIES, byte_tokenizer, write_prompts


def test_compensation_map_sums_to_the_sweeps_compensatory_effect(synth):
    """Per ablated site, the map's downstream means sum to the mean CE of the effects table
    (Eq 33: CE is the sum of Delta_DE over the downstream sites); one cell by hand."""
    tables = synth.tables(n_prompts=4, n_layers=3, n_heads=2)
    cmap = compensation_map(tables["readouts"])
    sums = cmap.groupby("ablated_site")["mean_delta_de"].sum()
    ce = tables["effects"].groupby("site")["compensatory_effect"].mean()
    assert np.allclose(sums.to_numpy(), ce.loc[sums.index].to_numpy(), atol=1e-12)
    assert set(sums.index) == set(ce.index) - {"mlp.2"}  # the last MLP has no downstream site
    r = tables["readouts"]
    by_hand = r[(r.ablated_site == "attn.0.h1") & (r.readout_site == "attn.2.h0")]["delta_de"]
    cell = cmap[(cmap.ablated_site == "attn.0.h1") & (cmap.readout_site == "attn.2.h0")]
    assert cell["mean_delta_de"].item() == pytest.approx(by_hand.mean())
    assert cell["n"].item() == 4
    # non-downstream readouts are not in the map: the sibling head, upstream sites, itself
    pairs = set(zip(cmap.ablated_site, cmap.readout_site, strict=True))
    assert ("attn.1.h0", "attn.1.h1") not in pairs
    assert ("attn.1.h0", "mlp.0") not in pairs and ("attn.1.h0", "attn.1.h0") not in pairs
    assert ("attn.1.h0", "mlp.1") in pairs


def test_compensation_matrix_is_in_residual_order_with_gaps_where_nothing_is_downstream(synth):
    tables = synth.tables(n_prompts=2, n_layers=2, n_heads=2)
    matrix = compensation_matrix(compensation_map(tables["readouts"]))
    assert list(matrix.index) == [
        "embed",
        "attn.0.h0",
        "attn.0.h1",
        "mlp.0",
        "attn.1.h0",
        "attn.1.h1",
    ]
    assert list(matrix.columns) == [
        "attn.0.h0",
        "attn.0.h1",
        "mlp.0",
        "attn.1.h0",
        "attn.1.h1",
        "mlp.1",
    ]
    assert np.isnan(matrix.loc["attn.1.h0", "attn.1.h1"])
    assert not np.isnan(matrix.loc["attn.0.h0", "attn.1.h1"])
    top = top_compensators(compensation_map(tables["readouts"]), n=1)
    assert top.groupby("ablated_site").size().eq(1).all()


@pytest.mark.parametrize(("family", "parallel"), [("gpt2", False), ("gpt_neox", True)])
def test_the_residual_wiring_is_read_off_a_real_sweeps_tables(tmp_path, family, parallel):
    torch.manual_seed(0)
    adapter = adapt(OTHER_FAMILIES[family]().double().eval(), byte_tokenizer())
    assert adapter.arch.parallel_residual == parallel
    prompts = load_prompts(str(write_prompts(tmp_path / "p.jsonl", 3)))
    config = SweepConfig(model="x", ablation="mean", dtype="float64", granularity="head")
    plan = plan_sweep(config, adapter, prompts=prompts)
    rows = [compute_prompt(adapter, plan, i, False) for i in range(3)]
    effects = pd.concat([r.effects for r in rows])
    readouts = pd.concat([r.readouts for r in rows])
    assert infer_parallel_residual(effects, readouts) is parallel
    cmap = compensation_map(readouts, parallel)
    sums = cmap.groupby("ablated_site")["mean_delta_de"].sum()
    ce = effects.groupby("site")["compensatory_effect"].mean().loc[sums.index]
    assert np.allclose(sums.to_numpy(), ce.to_numpy(), atol=1e-10)


def _readouts(delta: dict[str, list[list[float]]], self_de: list[float]) -> pd.DataFrame:
    """Readouts of ablating attn.0.h0 in 2-layer, 3-head model for len(self_de) prompts:
    ``delta[readout]`` per prompt; the ablated head's own Delta_DE is ``self_de``."""
    rows = []
    for p, own in enumerate(self_de):
        rows.append(("attn.0.h0", "attn.0.h0", own, p))
        for site, values in delta.items():
            rows.append(("attn.0.h0", site, values[p], p))
    return pd.DataFrame(rows, columns=["ablated_site", "readout_site", "delta_de", "prompt_id"])


def test_the_same_replacement_head_in_every_prompt_is_fully_consistent():
    """attn.1.h2 repairs most in all three prompts, attn.1.h0 second: overlap 1, rank
    correlation 1. In prompt 2 the removed direct effect is negative (Delta_DE(self) > 0), so
    the repairing head is the one whose Delta_DE is most negative."""
    delta = {
        "attn.1.h0": [0.2, 0.3, -0.3],
        "attn.1.h1": [-0.1, 0.0, 0.1],
        "attn.1.h2": [0.5, 0.9, -0.7],
        "attn.0.h1": [9.0, 9.0, 9.0],  # a sibling head: never a candidate
        "mlp.1": [3.0, 3.0, 3.0],  # an MLP: not a head
    }
    result = replacement_heads(_readouts(delta, [-1.0, -1.0, 1.0]), k=2)
    row = result.consistency.iloc[0]
    assert row["n_candidates"] == 3 and row["k"] == 2
    assert row["mean_jaccard"] == 1.0 and row["mean_spearman"] == pytest.approx(1.0)
    assert row["chance_jaccard"] == pytest.approx(chance_jaccard(2, 3))
    assert row["frequent"] == "attn.1.h2 (1.00), attn.1.h0 (1.00)"
    first = result.per_prompt[result.per_prompt["rank"] == 1]
    assert first["readout_site"].tolist() == ["attn.1.h2"] * 3
    assert first["repair"].tolist() == [0.5, 0.9, 0.7]


def test_different_replacement_heads_per_prompt_are_inconsistent():
    delta = {"attn.1.h0": [1.0, 0.0], "attn.1.h1": [0.5, 0.5], "attn.1.h2": [0.0, 1.0]}
    row = replacement_heads(_readouts(delta, [-1.0, -1.0]), k=1).consistency.iloc[0]
    assert row["mean_jaccard"] == 0.0
    assert row["mean_spearman"] == pytest.approx(-1.0)


def test_chance_jaccard_equals_enumeration_of_all_subset_pairs():
    for k, n in [(1, 4), (2, 5), (3, 6), (5, 5)]:
        subsets = list(itertools.combinations(range(n), k))
        mean = np.mean(
            [len(set(a) & set(b)) / len(set(a) | set(b)) for a in subsets for b in subsets]
        )
        assert chance_jaccard(k, n) == pytest.approx(mean)


def test_replacement_heads_need_a_head_sweep_and_a_valid_k(synth):
    layer_tables = synth.tables(n_prompts=2, n_layers=2)
    with pytest.raises(ResultsError, match="--granularity head"):
        replacement_heads(layer_tables["readouts"])
    with pytest.raises(ResultsError, match="k must be"):
        replacement_heads(layer_tables["readouts"], k=0)
    with pytest.raises(ResultsError, match="lacks columns"):
        compensation_map(layer_tables["readouts"].drop(columns="delta_de"))
