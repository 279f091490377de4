"""How reliably the repair happens: bootstrap intervals, top-k rows, over-correction and
anti-repair shares, the per-patch figure and ``causalnet report --repair``.

Everything on hand-made rows whose answers are worked out here: the bootstrap against
distributions whose percentiles are known exactly (two prompts) or approximately (a normal
mean), and the resampling unit (a prompt's rows move together) by a case where resampling rows
would give a different interval. Tolerance 1e-12 unless stated.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection
from matplotlib.image import imread

from causalnet.cli import main
from causalnet.errors import ConfigError, ResultsError
from causalnet.hydra import figures_repair
from causalnet.hydra.reliability import (
    bootstrap_ratios,
    format_repair_table,
    repair_table,
    top_rows,
)
from causalnet.hydra.store import REPAIR_COLUMNS, ResultsStore


def _rows(removed, repair, prompts=None, site="attn.3", parts=None) -> pd.DataFrame:
    """Effects rows with the given removed direct effect and repair (TE = repair - removed);
    the repair's parts default to all attention."""
    removed, repair = np.asarray(removed, float), np.asarray(repair, float)
    n = len(removed)
    parts = parts or {"repair_attn": repair}
    frame = pd.DataFrame(
        {
            "prompt_id": list(range(n)) if prompts is None else prompts,
            "site": site,
            "kind": "attn",
            "layer": int(site.split(".")[1]),
            "direct_effect": removed + 0.5,
            "direct_effect_ablated_self": np.full(n, 0.5),
            "total_effect": repair - removed,
        }
    )
    for col in REPAIR_COLUMNS:
        frame[col] = parts.get(col, np.zeros(n))
    return frame


# ---- bootstrap --------------------------------------------------------------------------------
def test_bootstrap_of_two_prompts_spans_their_values():
    """Two prompts with ratios 1 and 3: a replicate is 1, 2 or 3 with probabilities 1/4, 1/2,
    1/4, so the 2.5th and 97.5th percentiles are exactly 1 and 3."""
    stat, lo, hi = bootstrap_ratios(np.array([[1.0], [3.0]]), np.array([1.0, 1.0]), 4000)
    assert (stat[0], lo[0], hi[0]) == (2.0, 1.0, 3.0)


def test_bootstrap_interval_of_a_mean_has_the_normal_width():
    """The mean of 400 draws of N(0.7, 0.2^2): the interval is mean +- 1.96 * s / sqrt(n)
    to within 10% of its half-width (2000 replicates), and centred on the mean."""
    x = np.random.default_rng(5).normal(0.7, 0.2, 400)
    stat, lo, hi = bootstrap_ratios(x, np.ones(400), 2000, seed=1)
    half = 1.96 * x.std(ddof=1) / np.sqrt(400)
    assert abs(stat[0] - x.mean()) < 1e-12
    assert abs((hi[0] - lo[0]) / 2 - half) < 0.1 * half
    assert abs((hi[0] + lo[0]) / 2 - x.mean()) < 0.15 * half


def test_bootstrap_is_seeded_and_refuses_bad_arguments():
    x = np.random.default_rng(0).normal(size=(30, 2))
    a, b = bootstrap_ratios(x, np.ones(30), 100, seed=3), bootstrap_ratios(x, np.ones(30), 100, 3)
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    assert not np.array_equal(a[1], bootstrap_ratios(x, np.ones(30), 100, seed=4)[1])
    with pytest.raises(ConfigError, match="replicates"):
        bootstrap_ratios(x, np.ones(30), 0)
    with pytest.raises(ResultsError, match="sums"):
        bootstrap_ratios(x, np.ones(29), 10)


def test_the_resampling_unit_is_the_prompt():
    """Prompt A has two rows (removed 1, repair 1 each), prompt B one (removed 1, repair 0).
    Over prompts a replicate is 1 (AA), 2/3 (AB) or 0 (BB), so the 90% interval is [0, 1];
    over rows it would be [1/3, 1]."""
    stats = bootstrap_ratios(np.array([[2.0], [0.0]]), np.array([2.0, 1.0]), 4000, level=0.9)
    assert (stats[0][0], stats[1][0], stats[2][0]) == (2 / 3, 0.0, 1.0)
    table = repair_table(_rows([1, 1, 1], [1, 1, 0], prompts=[0, 0, 1]), n_boot=4000)
    assert (table.loc[0, "repair_lo"], table.loc[0, "repair_hi"]) == (0.0, 1.0)
    assert table.loc[0, "repair"] == pytest.approx(2 / 3, abs=1e-12)


# ---- fractions, shares, top rows --------------------------------------------------------------
def test_repair_fraction_and_parts_are_least_squares_through_the_origin_by_hand():
    removed, repair = [1.0, 2.0, -1.0], [0.5, 1.0, -1.0]
    parts = {
        "repair_attn": np.array([0.25, 1.0, 0.0]),
        "repair_mlp": np.array([0.25, 0.5, -1.0]),
        "repair_norm": np.array([0.0, -0.5, 0.0]),
    }
    table = repair_table(_rows(removed, repair, parts=parts), n_boot=50)
    # sum(repair * removed) / sum(removed^2) = (0.5 + 2 + 1) / 6
    assert table.loc[0, "repair"] == pytest.approx(3.5 / 6, abs=1e-12)
    assert table.loc[0, "attn"] == pytest.approx(2.25 / 6, abs=1e-12)
    assert table.loc[0, "mlp"] == pytest.approx(2.25 / 6, abs=1e-12)
    assert table.loc[0, "norm"] == pytest.approx(-1.0 / 6, abs=1e-12)
    assert table.loc[0, "sibling"] == 0.0
    assert table.loc[0, "rms_removed"] == pytest.approx(np.sqrt(2.0), abs=1e-12)


def test_pooled_rows_fit_all_layers_of_a_kind_at_once_by_hand():
    a = _rows([1.0, 2.0], [1.0, 0.0], site="attn.1")
    b = _rows([1.0], [3.0], prompts=[5], site="attn.2")
    table = repair_table(pd.concat([a, b], ignore_index=True), n_boot=20, pooled=True)
    assert list(table["layer"]) == [-1] and table.loc[0, "n_rows"] == 3
    assert table.loc[0, "repair"] == pytest.approx((1.0 + 0.0 + 3.0) / 6.0, abs=1e-12)
    per_layer = repair_table(pd.concat([a, b], ignore_index=True), n_boot=20)
    assert list(per_layer["repair"]) == pytest.approx([1.0 / 5.0, 3.0], abs=1e-12)
    assert "all attn" in format_repair_table(table)


def test_over_correction_and_anti_repair_shares_on_hand_made_rows():
    """Ratios repair / removed: 0.5, 1.5 (over), -0.2 (anti), 2 (over), -0.3 (anti); the row
    with removed = 0 counts in neither numerator nor denominator."""
    removed = [1.0, 1.0, 1.0, -1.0, -1.0, 0.0]
    repair = [0.5, 1.5, -0.2, -2.0, 0.3, 5.0]
    table = repair_table(_rows(removed, repair), n_boot=50)
    assert table.loc[0, "over"] == pytest.approx(2 / 5, abs=1e-12)
    assert table.loc[0, "anti"] == pytest.approx(2 / 5, abs=1e-12)
    assert table.loc[0, "n_rows"] == 6 and table.loc[0, "n_prompts"] == 6


def test_top_rows_keep_the_largest_direct_effects_of_each_site_by_hand():
    de = [0.1, -3.0, 2.0, 0.5, -0.2, 1.0, 0.0, -0.4, 0.3, 0.6]
    a = _rows(np.array(de) - 0.5, np.zeros(10), site="attn.1")
    b = _rows(-np.array(de) - 0.5, np.zeros(10), site="attn.2")
    b["prompt_id"] = range(10, 20)
    both = pd.concat([a, b], ignore_index=True)
    top = top_rows(both, 20)  # ceil(0.2 * 10) = 2 per site: |DE| 3 and 2
    assert sorted(top.loc[top["site"] == "attn.1", "prompt_id"]) == [1, 2]
    assert sorted(top.loc[top["site"] == "attn.2", "prompt_id"]) == [11, 12]
    assert list(top_rows(both, 2)["prompt_id"]) == [1, 11]  # ceil(0.2) = 1
    assert len(top_rows(both, 100)) == 20
    for bad in (0, 101, "2"):
        with pytest.raises(ConfigError, match="top percent"):
            top_rows(both, bad)


def test_repair_table_names_a_table_written_before_the_repair_split():
    rows = _rows([1.0], [0.5]).drop(columns=list(REPAIR_COLUMNS))
    with pytest.raises(ResultsError, match="before the repair split"):
        repair_table(rows)


def test_format_repair_table_as_text_and_markdown():
    table = repair_table(_rows([1.0, 2.0, 1.0], [0.5, 1.0, 2.0]), n_boot=50)
    text = format_repair_table(table)
    assert "attn.3" in text and "repair fraction" in text
    assert f"{table.loc[0, 'repair']:.2f} [" in text
    md = format_repair_table(table, markdown=True).splitlines()
    assert md[0].startswith("| site | n |") and md[1].startswith("|---|")
    assert md[2].startswith("| attn.3 | 3 |")


# ---- the per-patch figure ---------------------------------------------------------------------
def _patch_tables(n_prompts: int = 4, n_patches: int = 3) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Effects and per-patch effects of sites attn.0, attn.1 and mlp.1, random numbers."""
    rng = np.random.default_rng(2)
    sites = [("attn.0", "attn", 0), ("attn.1", "attn", 1), ("mlp.1", "mlp", 1)]
    effects, patches = [], []
    for pid in range(n_prompts):
        for site, kind, layer in sites:
            de = rng.normal() * (3.0 if site == "attn.1" else 1.0)
            effects.append({"prompt_id": pid, "site": site, "kind": kind, "layer": layer,
                            "direct_effect": de})  # fmt: skip
            for p in range(n_patches):
                parts = rng.normal(size=4)
                patches.append(
                    {
                        "prompt_id": pid,
                        "site": site,
                        "patch": p,
                        "source_id": str((pid + p + 1) % n_prompts),
                        "total_effect": rng.normal(),
                        "direct_effect_ablated_self": rng.normal(),
                        **dict(zip(REPAIR_COLUMNS[:4], parts, strict=True)),
                        "total_effect_sigma_clean": rng.normal(),
                        "sigma_ratio": 1.0 + 0.1 * rng.normal(),
                    }
                )
    return pd.DataFrame(effects), pd.DataFrame(patches)


def test_the_per_patch_figure_plots_the_tables_numbers():
    effects, patches = _patch_tables()
    assert figures_repair.default_site(effects) == "attn.1"  # largest RMS direct effect
    rows = figures_repair.patch_rows(patches, effects, "attn.1")
    fig = figures_repair.figure_repair_patches(rows, "attn.1")
    ax_a, ax_b = fig.axes
    mine = patches[patches["site"] == "attn.1"].sort_values(["prompt_id", "patch"])
    de = mine["prompt_id"].map(effects[effects["site"] == "attn.1"].set_index("prompt_id")[
        "direct_effect"])  # fmt: skip
    removed = (de - mine["direct_effect_ablated_self"]).to_numpy()
    repair = mine["total_effect"].to_numpy() + removed
    (points,) = [c for c in ax_a.collections if isinstance(c, PathCollection)]
    assert np.allclose(points.get_offsets(), np.c_[removed, repair], atol=1e-12, rtol=0)
    assert "12 patches of 4 prompts" in ax_a.get_title()
    strips = [c for c in ax_b.collections if isinstance(c, PathCollection)]
    for strip, column in zip(strips, ["repair_attn", "repair_mlp", "repair_norm"], strict=False):
        assert np.allclose(strip.get_offsets()[:, 1], mine[column], atol=1e-12, rtol=0)
    assert np.allclose(strips[3].get_offsets()[:, 1], repair, atol=1e-12, rtol=0)
    for label, values in (("median attn", mine["repair_attn"]), ("median repair", repair)):
        (line,) = [ln for ln in ax_b.get_lines() if ln.get_label() == label]
        assert np.allclose(line.get_ydata(), np.median(values), atol=1e-12, rtol=0)
    for ax in (ax_a, ax_b):
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()


def test_the_per_patch_figure_names_a_site_without_rows():
    effects, patches = _patch_tables()
    with pytest.raises(ResultsError, match="mlp.0"):
        figures_repair.patch_rows(patches, effects, "mlp.0")


# ---- a results folder: the CLI and make_repair_figures -----------------------------------------
@pytest.fixture
def folder(tmp_path, synth):
    """A results folder of synthetic rows with repair columns and per-patch effects (the repair
    taken as CE + upstream, so the identity holds)."""
    prompts = synth.prompts(n_prompts=6, n_layers=3)
    _, patches = _patch_tables(n_prompts=6)
    store = ResultsStore(tmp_path / "r").open({"model": "synthetic"})
    for pid, t in prompts.items():
        e = t["effects"].assign(
            repair_attn=t["effects"]["compensatory_attn"],
            repair_mlp=t["effects"]["compensatory_mlp"],
            repair_norm=t["effects"]["delta_de_upstream"],
            repair_sibling=0.0,
            total_effect_sigma_clean=t["effects"]["total_effect"],
        )
        store.write_prompt(pid, e, t["readouts"], None, patches[patches["prompt_id"] == pid])
    store.finalize()
    return tmp_path / "r"


def test_report_repair_prints_the_tables_with_intervals(folder, capsys):
    assert main(["report", str(folder), "--repair", "--top", "50", "--boot", "200"]) == 0
    out = capsys.readouterr().out
    assert "fraction restored" in out  # the usual report first
    assert "repair split per layer, all rows (6 prompts" in out
    assert "top 50% of rows by |direct effect| per site" in out
    effects = ResultsStore(folder).load_effects()
    table = [repair_table(effects, n_boot=200, pooled=p) for p in (False, True)]
    assert format_repair_table(pd.concat(table, ignore_index=True)) in out
    assert "all attn" in out and "all mlp" in out
    assert main(["report", str(folder), "--repair", "--markdown", "--boot", "50"]) == 0
    assert "| site | n | rms removed |" in capsys.readouterr().out
    assert main(["report", str(folder), "--repair", "--top", "0"]) == 2
    assert "top percent" in capsys.readouterr().err


def test_plot_makes_the_per_patch_figure_for_the_asked_site(folder, capsys):
    paths = figures_repair.make_repair_figures(folder)
    assert [p.name for p in paths] == ["fig_repair_patches.png"]
    image = imread(paths[0])
    assert image[..., :3].std() > 0.01  # something is drawn
    assert main(["plot", str(folder), "--repair-site", "mlp.1"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("fig_repair_patches.png") == 1
    assert main(["plot", str(folder), "--repair-site", "mlp.2"]) == 2
    assert "no per-patch effects of site 'mlp.2'" in capsys.readouterr().err
