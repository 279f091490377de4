"""Figures from small synthetic results: what is drawn is the table's numbers, axes labelled.

Each ``figure_*`` function (the figure its ``plot_*`` twin saves) is checked on what it
draws: the plotted lines' and scatters' data equal numbers computed here from the tables
(pandas group-bys and ``numpy.polyfit`` / ``numpy.corrcoef``, not the analysis module),
and every visible panel has a title and labelled axes. ``make_all`` is checked for the files
it writes, each a PNG with something drawn on it (not a blank canvas). Tolerance: 1e-12
(float64 arithmetic in a different order).
"""

from __future__ import annotations

import struct

import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection, PathCollection
from matplotlib.figure import Figure
from matplotlib.image import imread

from causalnet.errors import ResultsError
from causalnet.hydra import figures
from causalnet.hydra.store import ResultsStore

EXPECTED = [
    "fig1_prompt.png",
    "fig2_direct_vs_total.png",
    "fig3_examples.png",
    "fig7_compensation.png",
    "fig8_response_split.png",
]
ATOL = 1e-12
KIND_LABEL = {"attn": "attention layers", "head": "attention heads", "mlp": "MLP layers"}


# ---- helpers: read a figure back ---------------------------------------------------------------
def _panels(fig: Figure) -> list[Axes]:
    """The figure's visible data panels: no colorbars, no hidden or switched-off axes."""
    return [
        ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.get_visible() and ax.axison
    ]


def _assert_labelled(fig: Figure) -> None:
    panels = _panels(fig)
    assert panels, "nothing drawn"
    for ax in panels:
        assert ax.get_title(), "a panel without a title"
        assert ax.get_xlabel() and ax.get_ylabel(), f"unlabelled axes in {ax.get_title()!r}"


def _line(ax: Axes, label: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the one line whose legend label starts with ``label``."""
    found = [ln for ln in ax.get_lines() if ln.get_label().startswith(label)]
    assert len(found) == 1, f"{len(found)} lines labelled {label!r} in {ax.get_title()!r}"
    return np.asarray(found[0].get_xdata(), float), np.asarray(found[0].get_ydata(), float)


def _scatters(ax: Axes) -> list[np.ndarray]:
    """The [n, 2] point sets of the panel's scatter plots, in drawing order."""
    return [np.asarray(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection)]


def _vertical_lines(ax: Axes) -> list[float]:
    """x of every vertical line (axvline) on the panel."""
    out = []
    for ln in ax.get_lines():
        x = np.asarray(ln.get_xdata(), float)
        if len(x) == 2 and x[0] == x[1] and ln.get_transform() != ax.transData:
            out.append(float(x[0]))
    return out


def _close(got: np.ndarray, expect: np.ndarray) -> None:
    np.testing.assert_allclose(got, np.asarray(expect, float), rtol=0, atol=ATOL)


def _prompt_table(readouts: pd.DataFrame, pid: object, ablated: str, kind: str) -> pd.DataFrame:
    """Per layer, the clean and ablated direct effects of ``kind`` (heads summed per layer)."""
    rows = readouts[(readouts["prompt_id"] == pid) & (readouts["ablated_site"] == ablated)]
    site = rows["readout_site"]
    rows = rows[site.str.startswith(kind + ".")].copy()
    rows["layer"] = rows["readout_site"].str.split(".").str[1].astype(int)
    return rows.groupby("layer")[["direct_effect_clean", "direct_effect_ablated"]].sum()


def _assert_prompt_panels(axes, readouts, patches, pid, ablated, n_patches) -> None:
    for ax, kind in zip(axes, ("attn", "mlp"), strict=True):
        expect = _prompt_table(readouts, pid, ablated, kind)
        x, clean = _line(ax, "clean")
        _close(x, expect.index)
        _close(clean, expect["direct_effect_clean"])
        x, abl = _line(ax, f"{ablated} ablated")
        _close(abl, expect["direct_effect_ablated"])
        # the faint per-patch lines: each patch's ablated direct effects, summed per layer
        faint = [ln for ln in ax.get_lines() if ln.get_label().startswith("_") and ln.get_alpha()]
        assert len(faint) == n_patches
        if n_patches:
            sel = patches[(patches["prompt_id"] == pid) & (patches["ablated_site"] == ablated)]
            sel = sel[sel["readout_site"].str.startswith(kind + ".")].copy()
            sel["layer"] = sel["readout_site"].str.split(".").str[1].astype(int)
            per_patch = sel.pivot_table(
                index="patch", columns="layer", values="direct_effect_ablated", aggfunc="sum"
            )
            for ln, (_, row) in zip(faint, per_patch.iterrows(), strict=True):
                _close(np.asarray(ln.get_ydata(), float), row.to_numpy())
            # the solid line is the mean over the patches (Eq 39)
            _close(abl, per_patch.mean(axis=0).to_numpy())
        layer = int(ablated.split(".")[1])
        assert _vertical_lines(ax) == [layer]  # dashed line at the ablated layer


# ---- Figures 1 and 3 -------------------------------------------------------------------------
@pytest.mark.parametrize("n_heads", [0, 2], ids=["layers", "heads"])
def test_figure_prompt_draws_the_prompts_direct_effects_per_layer(synth, n_heads):
    t = synth.tables(n_prompts=2, n_layers=3, n_heads=n_heads, n_patches=3)
    ablated = "attn.1.h0" if n_heads else "attn.1"
    fig = figures.figure_prompt(t["readouts"], 1, ablated, patches=t["patches"])
    _assert_labelled(fig)
    assert len(_panels(fig)) == 2
    _assert_prompt_panels(_panels(fig), t["readouts"], t["patches"], 1, ablated, 3)
    assert fig.get_suptitle() == f"prompt 1: ablating {ablated}"
    # without per-patch rows: no faint lines, same solid lines
    bare = figures.figure_prompt(t["readouts"], 1, ablated, title="mine")
    _assert_prompt_panels(_panels(bare), t["readouts"], None, 1, ablated, 0)
    assert bare.get_suptitle() == "mine"


def test_figure_prompt_of_another_ablation_draws_other_numbers(synth):
    """The drawn lines follow the arguments: a wrong prompt or site would not pass above."""
    t = synth.tables(n_prompts=2, n_layers=3, n_patches=1)
    a = _line(_panels(figures.figure_prompt(t["readouts"], 0, "attn.0"))[1], "attn.0 ablated")
    b = _line(_panels(figures.figure_prompt(t["readouts"], 0, "mlp.1"))[1], "mlp.1 ablated")
    c = _line(_panels(figures.figure_prompt(t["readouts"], 1, "attn.0"))[1], "attn.0 ablated")
    assert not np.allclose(a[1], b[1]) and not np.allclose(a[1], c[1])


def test_figure_examples_draws_one_row_per_example(synth):
    t = synth.tables(n_prompts=3, n_layers=3, n_patches=2)
    examples = [(2, "attn.0"), (0, "mlp.1")]
    fig = figures.figure_examples(t["readouts"], examples, patches=t["patches"], titles=["A", "B"])
    _assert_labelled(fig)
    panels = _panels(fig)
    assert len(panels) == 4
    for row, (pid, site) in enumerate(examples):
        # patches were kept for every prompt of the synthetic tables
        _assert_prompt_panels(
            panels[2 * row : 2 * row + 2], t["readouts"], t["patches"], pid, site, 2
        )
        assert panels[2 * row].get_title().startswith(f"{'AB'[row]}: ablating {site}")


def test_plot_prompt_alone_and_a_missing_ablation(tmp_path, synth):
    t = synth.tables(n_prompts=2, n_layers=3, n_patches=2)
    path = figures.plot_prompt(
        t["readouts"], 0, "attn.1", tmp_path / "a" / "one.png", patches=t["patches"]
    )
    assert _png_size(path)[0] > 300
    with pytest.raises(ResultsError, match=r"no readouts for prompt 0 with 'attn.7' ablated"):
        figures.plot_prompt(t["readouts"], 0, "attn.7", tmp_path / "two.png")
    with pytest.raises(ResultsError, match="at least one"):
        figures.plot_examples(t["readouts"], [], tmp_path / "three.png")
    assert not (tmp_path / "two.png").exists() and not (tmp_path / "three.png").exists()


# ---- Figure 2 --------------------------------------------------------------------------------
@pytest.mark.parametrize("n_heads", [0, 2], ids=["layers", "heads"])
def test_figure_agreement_draws_per_prompt_lines_scatter_and_per_layer_agreement(synth, n_heads):
    effects = synth.tables(n_prompts=5, n_layers=4, n_heads=n_heads)["effects"]
    attn = "head" if n_heads else "attn"
    fig = figures.figure_agreement(effects)
    _assert_labelled(fig)
    panels = _panels(fig)
    assert len(panels) == 6
    top = {
        (column, kind): ax
        for ax, (column, kind) in zip(
            panels[:4],
            [
                ("direct_effect", attn),
                ("direct_effect", "mlp"),
                ("total_effect", attn),
                ("total_effect", "mlp"),
            ],
            strict=True,
        )
    }
    for (column, kind), ax in top.items():
        rows = effects[effects["kind"] == kind]
        matrix = rows.groupby(["prompt_id", "layer"])[column].mean().unstack()  # heads: mean
        (grey,) = [c for c in ax.collections if isinstance(c, LineCollection)]
        segments = grey.get_segments()
        assert len(segments) == 5  # one line per prompt
        for seg, (_, row) in zip(segments, matrix.iterrows(), strict=True):
            _close(seg[:, 0], matrix.columns)
            _close(seg[:, 1], row.to_numpy())
        x, mean = _line(ax, "mean")
        _close(x, matrix.columns)
        _close(mean, matrix.mean(axis=0).to_numpy())
    # (c): direct effect against the drop -TE, every row of each kind
    points = _scatters(panels[4])
    for got, kind in zip(points, [attn, "mlp"], strict=True):
        sel = effects[effects["kind"] == kind]
        _close(got, np.column_stack([sel["direct_effect"], -sel["total_effect"]]))
    # (d): per layer, Pearson r of DE and -TE, and the fraction of prompts with DE > -TE
    for kind in (attn, "mlp"):
        label = KIND_LABEL[kind]
        x, corr = _line(panels[5], f"correlation, {label}")
        _, frac = _line(panels[5], f"fraction direct > drop, {label}")
        for i, layer in enumerate(x):
            sel = effects[(effects["kind"] == kind) & (effects["layer"] == layer)]
            de, drop = sel["direct_effect"].to_numpy(), -sel["total_effect"].to_numpy()
            assert corr[i] == pytest.approx(np.corrcoef(de, drop)[0, 1], abs=ATOL)
            assert frac[i] == pytest.approx(np.mean(de > drop), abs=ATOL)


# ---- Figure 7 --------------------------------------------------------------------------------
def _polyfit(effects: pd.DataFrame, kind: str, y: str) -> pd.DataFrame:
    """Per layer: slope and r^2 of ``y`` on direct_effect, by numpy."""
    out = {}
    for layer, g in effects[effects["kind"] == kind].groupby("layer"):
        x, v = g["direct_effect"].to_numpy(), g[y].to_numpy()
        with np.errstate(invalid="ignore"):  # r^2 of a constant part (the last layer's MLP) is NaN
            r2 = np.corrcoef(x, v)[0, 1] ** 2
        out[layer] = {"slope": np.polyfit(x, v, 1)[0], "r2": r2}
    return pd.DataFrame(out).T


def test_figure_compensation_draws_direct_vs_compensatory_and_the_regression(synth):
    effects = synth.tables(n_prompts=6, n_layers=4)["effects"]
    fig = figures.figure_compensation(effects)
    _assert_labelled(fig)
    ax_a, ax_b, ax_c, ax_d = _panels(fig)
    for ax, kind in ((ax_a, "attn"), (ax_c, "mlp")):
        sel = effects[effects["kind"] == kind]
        (points,) = [c for c in ax.collections if isinstance(c, PathCollection)]
        _close(points.get_offsets(), sel[["direct_effect", "compensatory_effect"]].to_numpy())
        _close(points.get_array(), sel["layer"])  # coloured by layer
    expect = _polyfit(effects, "attn", "compensatory_effect")
    peak = int(expect["r2"].idxmax())
    assert ax_b.get_title().startswith(f"(b) layer {peak} ")
    sel = effects[(effects["kind"] == "attn") & (effects["layer"] == peak)]
    (points,) = _scatters(ax_b)
    _close(points, sel[["direct_effect", "compensatory_effect"]].to_numpy())
    x, y = _line(ax_b, "fit")
    slope, intercept = np.polyfit(sel["direct_effect"], sel["compensatory_effect"], 1)
    _close(y, slope * x + intercept)
    x, r2 = _line(ax_d, "variance explained")
    _close(x, expect.index)
    _close(r2, expect["r2"])
    _close(_line(ax_d, "slope")[1], expect["slope"])
    assert _vertical_lines(ax_d) == [peak]


def test_figure_compensation_without_attention_ablations_says_so(synth):
    effects = synth.tables(n_prompts=4, n_layers=3)["effects"]
    fig = figures.figure_compensation(effects[effects["kind"] == "mlp"])
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "(a) no such sites ablated" in texts and "(b) no attention sites ablated" in texts
    (ax_c,) = _panels(fig)  # the MLP panel only
    sel = effects[effects["kind"] == "mlp"]
    _close(_scatters(ax_c)[0], sel[["direct_effect", "compensatory_effect"]].to_numpy())


# ---- Figure 8 --------------------------------------------------------------------------------
def test_figure_response_split_draws_both_parts_and_their_slopes(synth):
    effects = synth.tables(n_prompts=6, n_layers=5)["effects"]
    fig = figures.figure_response_split(effects, layers=[1, 3])
    _assert_labelled(fig)
    panels = _panels(fig)
    assert len(panels) == 3
    for ax, layer in zip(panels[:2], [1, 3], strict=True):
        assert ax.get_title() == f"ablating attention layer {layer}"
        sel = effects[(effects["kind"] == "attn") & (effects["layer"] == layer)]
        hydra, erasure = _scatters(ax)
        _close(hydra, sel[["direct_effect", "compensatory_attn"]].to_numpy())
        _close(erasure, sel[["direct_effect", "compensatory_mlp"]].to_numpy())
        for label, column in (("attention", "compensatory_attn"), ("MLP", "compensatory_mlp")):
            x, y = _line(ax, label)
            slope, intercept = np.polyfit(sel["direct_effect"], sel[column], 1)
            _close(y, slope * x + intercept)
    last = panels[2]
    for label, column in (
        ("attention part", "compensatory_attn"),
        ("MLP part", "compensatory_mlp"),
    ):
        x, slopes = _line(last, label)
        expect = _polyfit(effects, "attn", column)
        _close(x, expect.index)
        _close(slopes, expect["slope"])
    assert sorted(_vertical_lines(last)) == [1, 3]
    # the default selection: the layers of select_layers
    default = figures.figure_response_split(effects)
    chosen = figures.select_layers(effects, "attn")
    titles = [ax.get_title() for ax in _panels(default)[:-1]]
    assert titles == [f"ablating attention layer {layer}" for layer in chosen]


def test_select_layers_spreads_and_includes_the_best_fit(synth):
    effects = synth.tables(n_prompts=6, n_layers=10)["effects"]
    picks = figures.select_layers(effects, "attn", count=4)
    assert picks[0] == 0 and picks[-1] == 9 and {3, 6} <= set(picks)
    assert len(picks) in (4, 5)
    assert figures.select_layers(effects, "head") == []
    assert figures.select_layers(pd.concat([effects[effects["layer"] == 2]]), "attn") == [2]


# ---- make_all: the files ---------------------------------------------------------------------
def _png_size(path):
    """(width, height) of a PNG file; fails unless it starts with the PNG signature + IHDR."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND", f"{path} is truncated"
    return struct.unpack(">II", data[16:24])


def _assert_drawn_png(path) -> None:
    """A PNG of a real size with a drawing on it: >= 2 % of its pixels not background."""
    width, height = _png_size(path)
    assert width > 300 and height > 200
    pixels = imread(path)[..., :3]
    inked = (np.abs(pixels - pixels[0, 0]).sum(-1) > 0.05).mean()
    assert inked > 0.02, f"{path.name} is (nearly) blank: {inked:.3%} of pixels drawn"


def _folder(tmp_path, synth, keep=lambda name, rows: rows, prompts_spec="known_1000", **kw):
    """A finalized results folder of synthetic prompts; patches kept for prompt 0."""
    store = ResultsStore(tmp_path / "results").open({"prompts": prompts_spec})
    for pid, t in synth.prompts(**kw).items():
        e, r, p = (keep(name, t[name]) for name in ("effects", "readouts", "patches"))
        store.write_prompt(pid, e, r, p if pid == 0 else None)
    store.finalize({})
    return tmp_path / "results"


def _check_all(paths, folder):
    assert [p.name for p in paths] == EXPECTED
    for path in paths:
        assert path.parent == folder / "figures"
        _assert_drawn_png(path)


def test_a_blank_png_fails_the_drawn_check(tmp_path):
    """The check above can fail: an empty 800x600 canvas is refused."""
    fig = Figure(figsize=(8, 6))
    fig.savefig(tmp_path / "blank.png", dpi=100)
    with pytest.raises(AssertionError, match="blank"):
        _assert_drawn_png(tmp_path / "blank.png")


def test_make_all_with_three_prompts(tmp_path, synth):
    folder = _folder(tmp_path, synth, n_prompts=3, n_layers=4, n_patches=2)
    _check_all(figures.make_all(folder), folder)


def test_make_all_with_head_granularity_and_string_ids(tmp_path, synth):
    folder = _folder(
        tmp_path,
        synth,
        n_prompts=3,
        n_layers=3,
        n_heads=3,
        str_ids=True,
        prompts_spec="moved_away.jsonl",
    )  # titles fall back to prompt ids
    _check_all(figures.make_all(folder), folder)


def test_make_all_when_only_attention_sites_were_ablated(tmp_path, synth):
    def attention_only(name, rows):
        column = "site" if name == "effects" else "ablated_site"
        return rows[rows[column].str.startswith("attn")]

    folder = _folder(tmp_path, synth, keep=attention_only, n_prompts=4, n_layers=3)
    assert set(ResultsStore(folder).load_effects()["kind"]) == {"attn"}
    out = tmp_path / "elsewhere"
    paths = figures.make_all(folder, out)
    assert [p.parent for p in paths] == [out] * 5
    for path in paths:
        _assert_drawn_png(path)
