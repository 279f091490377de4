"""Per-layer statistics on effects tables with known answers."""

import numpy as np
import pandas as pd
import pytest

from causalnet.errors import ResultsError
from causalnet.hydra.analysis import (
    compensation_regression,
    fraction_restored,
    identity_residual,
    linear_fit,
    peak_r2_layer,
    pearson,
    per_layer_agreement,
    removed_direct_effect,
    response_split,
    summary_table,
)


def _effects(de, te=None, ablated_self=0.0, ce_attn=0.0, ce_mlp=0.0, kind="attn", layer=3):
    """An effects table for one (kind, layer) whose identity holds (upstream takes the rest)."""
    de = np.asarray(de, dtype=float)
    n = len(de)
    ablated_self = np.broadcast_to(np.asarray(ablated_self, dtype=float), (n,))
    ce_attn = np.broadcast_to(np.asarray(ce_attn, dtype=float), (n,))
    ce_mlp = np.broadcast_to(np.asarray(ce_mlp, dtype=float), (n,))
    ce = ce_attn + ce_mlp
    te = (ablated_self - de) + ce if te is None else np.asarray(te, dtype=float)
    return pd.DataFrame(
        {
            "prompt_id": np.arange(n),
            "kind": kind,
            "layer": layer,
            "direct_effect": de,
            "total_effect": te,
            "direct_effect_ablated_self": ablated_self,
            "compensatory_effect": ce,
            "compensatory_attn": ce_attn,
            "compensatory_mlp": ce_mlp,
            "delta_de_upstream": te - ((ablated_self - de) + ce),
        }
    )


DE = np.array([2.0, -1.0, 0.5, 3.0, 1.5, -0.5, 0.0, 2.5])


def test_linear_fit_and_pearson_known_answers():
    fit = linear_fit(DE, 0.7 * DE + 0.1)
    assert fit.slope == pytest.approx(0.7) and fit.intercept == pytest.approx(0.1)
    assert fit.r2 == pytest.approx(1.0) and fit.n == 8
    noisy = linear_fit(DE, 0.7 * DE + np.array([0.3, -0.3] * 4))
    assert 0.5 < noisy.r2 < 1.0
    assert np.isnan(linear_fit(np.ones(5), DE[:5]).slope)
    assert np.isnan(linear_fit(DE[:1], DE[:1]).r2)
    assert np.isnan(linear_fit(DE, np.zeros(8)).r2) and linear_fit(DE, np.zeros(8)).slope == 0
    assert pearson(DE, DE) == pytest.approx(1.0)
    assert pearson(DE, -3 * DE + 2) == pytest.approx(-1.0)
    assert np.isnan(pearson(DE, np.ones(8)))


def test_agreement_compares_direct_effect_with_the_ablation_drop():
    # an ablation that removes exactly the direct effect: drop = -TE = DE
    same = per_layer_agreement(_effects(DE, te=-DE))
    row = same.iloc[0]
    assert (row["kind"], row["layer"], row["n"]) == ("attn", 3, 8)
    assert row["corr_direct_drop"] == pytest.approx(1.0)
    assert row["frac_direct_gt_drop"] == 0.0
    assert row["mean_direct_effect"] == pytest.approx(DE.mean())
    # the drop is one logit below the direct effect for 6 of 8 prompts (compensation)
    te = -(DE - np.array([1, 1, 1, 1, 1, 1, -1, -1]))
    row = per_layer_agreement(_effects(DE, te=te)).iloc[0]
    assert row["frac_direct_gt_drop"] == pytest.approx(0.75)
    assert row["mean_total_effect"] == pytest.approx(te.mean())
    assert row["mean_drop"] == pytest.approx(-te.mean())


def test_regression_recovers_slope_intercept_and_r2_under_zero_ablation():
    frame = _effects(DE, ablated_self=0.0, ce_attn=0.5 * DE + 0.1, ce_mlp=0.2 * DE)
    row = compensation_regression(frame).iloc[0]
    assert row["slope"] == pytest.approx(0.7)
    assert row["intercept"] == pytest.approx(0.1)
    assert row["r2"] == pytest.approx(1.0)
    # zero ablation removes exactly the direct effect: both views coincide
    assert row["restoration_slope"] == pytest.approx(row["slope"])
    assert row["restoration_r2"] == pytest.approx(row["r2"])


def test_peak_r2_layer_is_the_best_fitting_layer():
    noise = np.array([0.3, -0.3] * 4)
    frame = pd.concat(
        [
            _effects(DE, ce_attn=0.5 * DE + noise, layer=0),
            _effects(DE, ce_attn=0.5 * DE + 0.1 * noise, layer=1),
            _effects(DE, ce_attn=0.5 * DE + 2 * noise, layer=2),
        ],
        ignore_index=True,
    )
    reg = compensation_regression(frame)
    assert peak_r2_layer(reg, "attn") == 1
    assert peak_r2_layer(reg, "mlp") is None


def test_restoration_view_uses_the_removed_direct_effect():
    # resample patches leave 20 % of the direct effect; CE restores 40 % of what was removed
    frame = _effects(DE, ablated_self=0.2 * DE, ce_attn=0.4 * 0.8 * DE)
    assert removed_direct_effect(frame).to_numpy() == pytest.approx(0.8 * DE)
    row = compensation_regression(frame).iloc[0]
    assert row["restoration_slope"] == pytest.approx(0.4)
    assert row["slope"] == pytest.approx(0.4 * 0.8)
    f = fraction_restored(frame)
    assert f.per_layer["fraction_restored"].iloc[0] == pytest.approx(0.4)
    assert f.overall["fraction_restored"].iloc[0] == pytest.approx(0.4)


def test_response_split_parts_add_up_to_the_compensation_slope():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    frame = _effects(x, ce_attn=0.3 * x + 0.05 * rng.normal(size=50), ce_mlp=0.1 * x)
    split = response_split(frame).iloc[0]
    reg = compensation_regression(frame).iloc[0]
    assert split["slope_attn"] + split["slope_mlp"] == pytest.approx(reg["slope"])
    assert split["slope_mlp"] == pytest.approx(0.1) and split["r2_mlp"] == pytest.approx(1.0)
    assert split["slope_attn"] == pytest.approx(0.3, abs=0.03) and split["r2_attn"] < 1.0
    assert split["attn_share"] == pytest.approx(split["slope_attn"] / reg["slope"])
    assert split["mean_compensatory_mlp"] == pytest.approx(0.1 * x.mean())


def test_fraction_restored_sign_convention_and_peak_layer():
    # one prompt: removed 2, CE 1.5 -> 75 % restored
    one = fraction_restored(_effects([2.0], ce_attn=1.5))
    assert one.per_layer["fraction_restored"].iloc[0] == pytest.approx(0.75)
    # a removed negative effect restored by a negative CE is also a positive fraction
    neg = fraction_restored(_effects([-2.0], ce_attn=-0.5))
    assert neg.per_layer["fraction_restored"].iloc[0] == pytest.approx(0.25)
    # amplification: removed 1, CE -0.5 -> -50 %
    amp = fraction_restored(_effects([1.0], ce_mlp=-0.5))
    assert amp.per_layer["fraction_restored"].iloc[0] == pytest.approx(-0.5)
    layers = pd.concat(
        [
            _effects(DE, ce_attn=0.3 * DE, layer=0),
            _effects(DE, ce_attn=0.8 * DE, layer=1),
            _effects(DE, ce_attn=0.5 * DE, layer=2),
            _effects(1e-3 * DE, ce_attn=5e-3 * DE, layer=3),  # removes ~nothing: ratio 5
            _effects(DE, ce_mlp=0.9 * DE, kind="mlp", layer=0),
            _effects(DE, ce_mlp=0.2 * DE, kind="mlp", layer=1),
        ],
        ignore_index=True,
    )
    f = fraction_restored(layers)
    attn = f.per_layer[f.per_layer["kind"] == "attn"]
    assert attn["fraction_restored"].to_numpy() == pytest.approx([0.3, 0.8, 0.5, 5.0])
    assert attn["eligible"].tolist() == [True, True, True, False]
    assert f.peak.to_dict("records") == [
        {"kind": "attn", "layer": 1, "fraction_restored": pytest.approx(0.8)},
        {"kind": "mlp", "layer": 0, "fraction_restored": pytest.approx(0.9)},
    ]
    assert f.per_layer["is_peak"].sum() == 2
    # pooled through the origin: sum(CE * removed) / sum(removed^2) over the 4 attention layers
    expected = (0.3 + 0.8 + 0.5 + 5e-6) / (3 + 1e-6)
    overall = f.overall.set_index("kind")["fraction_restored"]
    assert overall["attn"] == pytest.approx(expected)
    assert overall["mlp"] == pytest.approx((0.9 + 0.2) / 2)


def test_identity_residual_is_zero_on_protocol_tables_and_sees_a_broken_row(synth):
    effects = synth.tables(n_prompts=4, n_layers=3)["effects"]
    assert identity_residual(effects).abs().max() < 1e-12
    broken = effects.copy()
    broken.loc[5, "total_effect"] += 0.25
    residual = identity_residual(broken)
    assert residual[5] == pytest.approx(0.25) and residual.drop(5).abs().max() < 1e-12


def test_summary_table_on_a_sweep_that_restores_70_percent(synth):
    effects = synth.tables(n_prompts=12, n_layers=6, restore=0.7)["effects"]
    table = summary_table(effects)
    assert list(zip(table["kind"], table["layer"], strict=True)) == (
        [("embed", -1)] + [("attn", i) for i in range(6)] + [("mlp", i) for i in range(6)]
    )
    assert (table["n"] == 12).all()
    assert table["max_abs_identity_residual"].max() < 1e-12
    for column in (
        "corr_direct_drop",
        "r2",
        "restoration_slope",
        "attn_share",
        "fraction_restored",
        "is_peak",
    ):
        assert column in table.columns
    with_downstream = table[(table["kind"] != "mlp") | (table["layer"] < 5)]
    assert with_downstream["restoration_slope"].to_numpy() == pytest.approx(0.7, abs=0.1)
    assert with_downstream["fraction_restored"].to_numpy() == pytest.approx(0.7, abs=0.1)
    last_mlp = table[(table["kind"] == "mlp") & (table["layer"] == 5)].iloc[0]
    assert last_mlp["restoration_slope"] == 0.0  # nothing downstream of the last MLP


def test_heads_are_pooled_per_layer(synth):
    effects = synth.tables(n_prompts=5, n_layers=3, n_heads=4)["effects"]
    table = summary_table(effects)
    heads = table[table["kind"] == "head"]
    assert heads["layer"].tolist() == [0, 1, 2] and (heads["n"] == 5 * 4).all()
    assert "attn" not in set(table["kind"])


def test_bad_tables_raise_results_error():
    with pytest.raises(ResultsError, match=r"lacks columns \['compensatory_effect'"):
        summary_table(_effects(DE).drop(columns="compensatory_effect"))
    with pytest.raises(ResultsError, match="no rows"):
        per_layer_agreement(_effects(DE).iloc[:0])
