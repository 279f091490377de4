"""The paper's figures from a results folder (Figures 1/3, 2, 7, 8), as PNG files.

Matplotlib's object-oriented API with the Agg canvas (:class:`matplotlib.figure.Figure`, no
pyplot), so importing this module never changes the global backend and works headless. Each
``plot_*(..., path)`` saves the figure its twin ``figure_*(...)`` returns (to show in a
notebook, restyle, or inspect in tests). Every axis is labelled; layers are numbered from 0
as in Hugging Face; effects are in centred logits of the target token (Eqs 9, 10).

Head-granularity results: per-layer figures (2, 7, 8) treat attention heads as their own kind
``"head"`` in place of ``"attn"``: per-prompt curves show the mean over a layer's heads, and
scatter plots and regressions pool every head of a layer (as :mod:`causalnet.hydra.analysis`).
Per-prompt figures (1, 3) sum the heads of a layer, which is exact for direct effects (the
heads of a layer sum to the layer's output, ``attn.l = sum_H attn.l.hH``). The embedding site
is left out of the per-layer panels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..errors import DataError, ResultsError
from ..sites import parse_site
from .analysis import (
    compensation_regression,
    linear_fit,
    peak_r2_layer,
    per_layer_agreement,
    response_split,
)
from .data import load_prompts
from .store import ResultsStore, site_sort_key

UNIT = "centred logit"
CLEAN = "tab:blue"
ABLATED = "tab:red"
ATTN_COLOUR = "tab:blue"
MLP_COLOUR = "tab:orange"
_DPI = 110
_KIND_LABEL = {"attn": "attention layers", "head": "attention heads", "mlp": "MLP layers"}


# ---- Figures 1 and 3: one prompt, one ablation ------------------------------------------------


def _prompt_curves(
    readouts: pd.DataFrame,
    patches: pd.DataFrame | None,
    prompt_id: Any,
    ablated_site: str,
) -> dict[str, dict[str, np.ndarray]]:
    """Per panel ("attn", "mlp"): layers, clean and mean-ablated direct effects, and the
    per-patch ablated direct effects [n_patches, n_layers] (empty without patches)."""
    rows = readouts[
        (readouts["prompt_id"] == prompt_id) & (readouts["ablated_site"] == ablated_site)
    ]
    if rows.empty:
        known = readouts.loc[readouts["prompt_id"] == prompt_id, "ablated_site"].unique()
        raise ResultsError(
            f"no readouts for prompt {prompt_id!r} with {ablated_site!r} ablated; ablated sites "
            f"of that prompt: {sorted(known, key=site_sort_key)[:8]}"
        )
    sites = {s: parse_site(s) for s in pd.unique(rows["readout_site"])}
    per_patch = None
    if patches is not None and not patches.empty:
        sel = patches[
            (patches["prompt_id"] == prompt_id) & (patches["ablated_site"] == ablated_site)
        ]
        if not sel.empty:
            per_patch = sel.pivot_table(
                index="patch", columns="readout_site", values="direct_effect_ablated"
            )
    has_attn_layers = any(s.kind == "attn" for s in sites.values())
    out = {}
    for panel in ("attn", "mlp"):
        kinds = {panel} if panel == "mlp" or has_attn_layers else {"head"}
        chosen = [name for name, s in sites.items() if s.kind in kinds]
        if not chosen:
            continue
        layer_of = pd.Series({name: sites[name].layer for name in chosen})
        sub = rows[rows["readout_site"].isin(chosen)]
        layer = sub["readout_site"].map(layer_of)
        clean = sub.groupby(layer)["direct_effect_clean"].sum()  # heads sum to the layer
        ablated = sub.groupby(layer)["direct_effect_ablated"].sum()
        curves = {
            "layers": clean.index.to_numpy(),
            "clean": clean.to_numpy(),
            "ablated": ablated.to_numpy(),
            "patches": np.empty((0, len(clean))),
        }
        if per_patch is not None:
            cols = [c for c in per_patch.columns if c in layer_of.index]
            summed = per_patch[cols].T.groupby(layer_of[cols]).sum().T
            curves["patches"] = summed.reindex(columns=clean.index).to_numpy()
        out[panel] = curves
    return out


def _draw_prompt(
    axes: Sequence[Axes],
    readouts: pd.DataFrame,
    patches: pd.DataFrame | None,
    prompt_id: Any,
    ablated_site: str,
) -> None:
    curves = _prompt_curves(readouts, patches, prompt_id, ablated_site)
    ablated = parse_site(ablated_site)
    for ax, panel in zip(axes, ("attn", "mlp"), strict=True):
        c = curves.get(panel)
        if c is None:
            _empty(ax, f"no {_KIND_LABEL[panel]} read out")
            continue
        for row in c["patches"]:
            ax.plot(c["layers"], row, color=ABLATED, alpha=0.2, linewidth=0.8)
        ax.plot(c["layers"], c["clean"], color=CLEAN, marker="o", markersize=3, label="clean")
        ax.plot(
            c["layers"],
            c["ablated"],
            color=ABLATED,
            marker="o",
            markersize=3,
            label=f"{ablated_site} ablated (mean"
            + (f" of {len(c['patches'])} patches)" if len(c["patches"]) else ")"),
        )
        if ablated.layer >= 0:
            ax.axvline(ablated.layer, color="black", linestyle="--", linewidth=1)
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set_title(f"{'attention' if panel == 'attn' else 'MLP'} direct effects")
        _layer_axis(ax, "layer")
        ax.set_ylabel(f"direct effect on target ({UNIT})")
        ax.legend(fontsize=7, loc="best")


def plot_prompt(
    readouts: pd.DataFrame,
    prompt_id: Any,
    ablated_site: str,
    path: str | os.PathLike[str],
    *,
    patches: pd.DataFrame | None = None,
    title: str | None = None,
) -> Path:
    """Figure 1: one prompt's direct effect per layer (Delta_unembed, Eq 10) in the clean run
    (blue) and after ablating ``ablated_site`` (solid red: the mean over patches of Eq 13's
    ablated direct effects; faint red: each patch, when ``patches`` holds this prompt's
    per-patch rows); dashed line at the ablated layer. Attention and MLP panels. Returns path.
    """
    return _save(figure_prompt(readouts, prompt_id, ablated_site, patches, title), path)


def figure_prompt(
    readouts: pd.DataFrame,
    prompt_id: Any,
    ablated_site: str,
    patches: pd.DataFrame | None = None,
    title: str | None = None,
) -> Figure:
    """:func:`plot_prompt`'s figure, not saved."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    _draw_prompt(axes, readouts, patches, prompt_id, ablated_site)
    fig.suptitle(title or f"prompt {prompt_id!r}: ablating {ablated_site}", fontsize=10)
    return fig


def plot_examples(
    readouts: pd.DataFrame,
    examples: Sequence[tuple[Any, str]],
    path: str | os.PathLike[str],
    *,
    patches: pd.DataFrame | None = None,
    titles: Sequence[str] | None = None,
) -> Path:
    """Figure 3: :func:`plot_prompt`'s panels for several (prompt id, ablated site) examples,
    one row each. Returns path."""
    return _save(figure_examples(readouts, examples, patches, titles), path)


def figure_examples(
    readouts: pd.DataFrame,
    examples: Sequence[tuple[Any, str]],
    patches: pd.DataFrame | None = None,
    titles: Sequence[str] | None = None,
) -> Figure:
    """:func:`plot_examples`' figure, not saved."""
    if not examples:
        raise ResultsError("plot_examples needs at least one (prompt id, ablated site)")
    fig = Figure(figsize=(11, 3.2 * len(examples)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(examples), 2))
    for i, (pid, site) in enumerate(examples):
        _draw_prompt(axes[i], readouts, patches, pid, site)
        label = titles[i] if titles else f"prompt {pid!r}"
        axes[i][0].set_title(f"{label}: ablating {site}\nattention direct effects", fontsize=9)
    return fig


# ---- Figure 2: direct vs total effects --------------------------------------------------------


def _per_prompt_matrix(effects: pd.DataFrame, kind: str, column: str) -> pd.DataFrame:
    """prompts x layers of ``column`` for ``kind`` (mean over the heads of a layer)."""
    rows = effects[effects["kind"] == kind]
    return rows.pivot_table(index="prompt_id", columns="layer", values=column, aggfunc="mean")


def _draw_layer_lines(ax: Axes, matrix: pd.DataFrame, title: str, ylabel: str) -> None:
    layers = matrix.columns.to_numpy(dtype=float)
    segments = [np.column_stack([layers, row]) for row in matrix.to_numpy()]
    ax.add_collection(LineCollection(segments, colors="grey", alpha=0.25, linewidths=0.6))
    ax.plot(layers, matrix.mean(axis=0).to_numpy(), color=CLEAN, linewidth=2, label="mean")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.autoscale_view()
    ax.set_title(title, fontsize=9)
    _layer_axis(ax, "layer")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="best")


def plot_agreement(effects: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Figure 2: (a) direct effect (Delta_unembed, Eq 10) per layer, grey per prompt, blue
    mean, attention and MLP; (b) the same for the total effect (Delta_ablate, Eq 12); (c)
    direct vs total effect over all layers and prompts; (d) per layer, the Pearson correlation
    of the two and the fraction of prompts with direct > total (:func:`per_layer_agreement`).
    Returns path."""
    return _save(figure_agreement(effects), path)


def figure_agreement(effects: pd.DataFrame) -> Figure:
    """:func:`plot_agreement`'s figure, not saved."""
    kinds = _layer_kinds(effects)
    fig = Figure(figsize=(16, 8), layout="constrained")
    grid = fig.add_gridspec(2, 4)
    for j, (column, letter, what, how) in enumerate(
        [
            ("direct_effect", "a", "direct", "unembedding"),
            ("total_effect", "b", "total", "ablation"),
        ]
    ):
        for i, kind in enumerate(kinds[:2]):
            ax = fig.add_subplot(grid[0, 2 * j + i])
            matrix = _per_prompt_matrix(effects, kind, column)
            per = " per head, mean" if kind == "head" else ""
            _draw_layer_lines(
                ax,
                matrix,
                f"({letter}) {what} ({how}) effect, {_KIND_LABEL[kind]}",
                f"{what} effect{per} ({UNIT})",
            )
    ax = fig.add_subplot(grid[1, 0:2])
    rows = effects[effects["kind"].isin(kinds)]
    for kind in kinds:
        sel = rows[rows["kind"] == kind]
        ax.scatter(
            sel["direct_effect"],
            -sel["total_effect"],
            s=6,
            alpha=0.4,
            color=_kind_colour(kind),
            label=_KIND_LABEL[kind],
        )
    _identity_line(ax, rows["direct_effect"], -rows["total_effect"], "drop = direct")
    ax.set_title("(c) direct effect vs ablation drop, all layers and prompts", fontsize=9)
    ax.set_xlabel(f"direct effect, Eq 10 ({UNIT})")
    ax.set_ylabel(f"drop = clean - ablated = -total effect ({UNIT})")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[1, 2:4])
    agreement = per_layer_agreement(effects)
    for kind in kinds:
        sel = agreement[agreement["kind"] == kind]
        colour = _kind_colour(kind)
        ax.plot(
            sel["layer"],
            sel["corr_direct_drop"],
            color=colour,
            marker="o",
            markersize=3,
            label=f"correlation, {_KIND_LABEL[kind]}",
        )
        ax.plot(
            sel["layer"],
            sel["frac_direct_gt_drop"],
            color=colour,
            linestyle="--",
            marker="s",
            markersize=3,
            label=f"fraction direct > drop, {_KIND_LABEL[kind]}",
        )
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_ylim(-1.05, 1.05)
    ax.set_title("(d) agreement of direct effect and ablation drop per layer", fontsize=9)
    _layer_axis(ax, "layer")
    ax.set_ylabel("Pearson r / fraction of prompts")
    ax.legend(fontsize=7)
    fig.suptitle(f"Direct vs total effects ({effects['prompt_id'].nunique()} prompts)")
    return fig


# ---- Figure 7: compensation ---------------------------------------------------------------


def plot_compensation(effects: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Figure 7: (a) direct effect vs compensatory effect (Eq 33) for attention ablations,
    coloured by layer; (b) the attention layer with the highest r^2, with its least-squares line
    and the full-restoration line y = x; (c) as (a) for MLP ablations; (d) r^2 (solid blue) and
    slope (dashed black) of the regression per attention layer, red line at the peak layer
    (:func:`compensation_regression`). Returns path."""
    return _save(figure_compensation(effects), path)


def figure_compensation(effects: pd.DataFrame) -> Figure:
    """:func:`plot_compensation`'s figure, not saved."""
    kinds = _layer_kinds(effects)
    attn = kinds[0] if kinds and kinds[0] != "mlp" else None
    reg = compensation_regression(effects)
    fig = Figure(figsize=(12, 9), layout="constrained")
    (ax_a, ax_b), (ax_c, ax_d) = fig.subplots(2, 2)
    n_layers = int(effects["layer"].max()) + 1
    for ax, kind, letter in ((ax_a, attn, "a"), (ax_c, "mlp" if "mlp" in kinds else None, "c")):
        if kind is None:
            _empty(ax, f"({letter}) no such sites ablated")
            continue
        sel = effects[effects["kind"] == kind]
        points = ax.scatter(
            sel["direct_effect"],
            sel["compensatory_effect"],
            c=sel["layer"],
            cmap="viridis",
            vmin=0,
            vmax=max(n_layers - 1, 1),
            s=6,
            alpha=0.6,
        )
        fig.colorbar(points, ax=ax, label="layer")
        _identity_line(ax, sel["direct_effect"], sel["compensatory_effect"], "full restoration")
        ax.set_title(f"({letter}) {_KIND_LABEL[kind]}: direct vs compensatory effect", fontsize=9)
        ax.set_xlabel(f"direct effect of ablated site ({UNIT})")
        ax.set_ylabel(f"compensatory effect ({UNIT})")
        ax.legend(fontsize=7)
    if attn is None:
        _empty(ax_b, "(b) no attention sites ablated")
        _empty(ax_d, "(d) no attention sites ablated")
        return fig
    areg = reg[reg["kind"] == attn]
    peak = peak_r2_layer(reg, attn)
    if peak is None:
        _empty(ax_b, "(b) no layer with a defined r^2 (too few prompts?)")
    else:
        sel = effects[(effects["kind"] == attn) & (effects["layer"] == peak)]
        x, y = sel["direct_effect"].to_numpy(), sel["compensatory_effect"].to_numpy()
        _scatter_fit(ax_b, x, y, ATTN_COLOUR, "fit", line_colour="black")
        _identity_line(ax_b, x, y, "full restoration")
        ax_b.set_title(f"(b) layer {peak} ({_KIND_LABEL[attn]}), highest r$^2$", fontsize=9)
        ax_b.set_xlabel(f"direct effect of ablated site ({UNIT})")
        ax_b.set_ylabel(f"compensatory effect ({UNIT})")
        ax_b.legend(fontsize=7)
    ax_d.plot(
        areg["layer"],
        areg["r2"],
        color=CLEAN,
        marker="o",
        markersize=3,
        label="variance explained (r$^2$)",
    )
    ax_d.plot(
        areg["layer"],
        areg["slope"],
        color="black",
        linestyle="--",
        marker="s",
        markersize=3,
        label="slope",
    )
    if peak is not None:
        ax_d.axvline(peak, color="red", linewidth=1, label=f"peak r$^2$: layer {peak}")
    ax_d.axhline(0.0, color="grey", linewidth=0.5)
    ax_d.set_title(
        f"(d) regression of compensatory on direct effect, {_KIND_LABEL[attn]}", fontsize=9
    )
    _layer_axis(ax_d, "ablated layer")
    ax_d.set_ylabel("r$^2$ / slope (compensatory per direct effect)")
    ax_d.legend(fontsize=7)
    return fig


# ---- Figure 8: attention vs MLP share of the compensation ----------------------------------


def select_layers(effects: pd.DataFrame, kind: str, count: int = 4) -> list[int]:
    """``count`` ablated layers of ``kind`` spread evenly from first to last, plus the layer
    with the highest r^2 of the compensation regression; sorted, without repeats."""
    layers = np.sort(effects.loc[effects["kind"] == kind, "layer"].unique())
    if len(layers) == 0:
        return []
    picks = {
        int(layers[i])
        for i in np.linspace(0, len(layers) - 1, min(count, len(layers))).round().astype(int)
    }
    peak = peak_r2_layer(compensation_regression(effects[effects["kind"] == kind]), kind)
    if peak is not None:
        picks.add(peak)
    return sorted(picks)


def plot_response_split(
    effects: pd.DataFrame,
    path: str | os.PathLike[str],
    layers: Sequence[int] | None = None,
) -> Path:
    """Figure 8: for a selection of ablated attention layers (default :func:`select_layers`),
    the compensatory effect split into its attention part (the Hydra effect) and its MLP part
    (less erasure) against the ablated layer's direct effect, with least-squares lines; last
    panel: the two parts' slopes per ablated layer (:func:`response_split`). Returns path."""
    return _save(figure_response_split(effects, layers), path)


def figure_response_split(effects: pd.DataFrame, layers: Sequence[int] | None = None) -> Figure:
    """:func:`plot_response_split`'s figure, not saved."""
    kinds = _layer_kinds(effects)
    if not kinds:
        raise ResultsError("no attention or MLP sites in the effects table")
    kind = kinds[0]  # attention when present, else MLP
    chosen = list(layers) if layers is not None else select_layers(effects, kind)
    n_panels = len(chosen) + 1
    ncols = min(3, n_panels)
    nrows = -(-n_panels // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.6 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax, layer in zip(axes, chosen, strict=False):
        sel = effects[(effects["kind"] == kind) & (effects["layer"] == layer)]
        if sel.empty:
            _empty(ax, f"layer {layer} was not ablated")
            continue
        x = sel["direct_effect"].to_numpy()
        for column, colour, label in (
            ("compensatory_attn", ATTN_COLOUR, "attention (Hydra)"),
            ("compensatory_mlp", MLP_COLOUR, "MLP (erasure)"),
        ):
            _scatter_fit(ax, x, sel[column].to_numpy(), colour, label)
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set_title(f"ablating {_KIND_LABEL[kind].split()[0]} layer {layer}", fontsize=9)
        ax.set_xlabel(f"direct effect of ablated layer ({UNIT})")
        ax.set_ylabel(f"change in downstream direct effects ({UNIT})")
        ax.legend(fontsize=6)
    ax = axes[len(chosen)]
    split = response_split(effects)
    split = split[split["kind"] == kind]
    ax.plot(
        split["layer"],
        split["slope_attn"],
        color=ATTN_COLOUR,
        marker="o",
        markersize=3,
        label="attention part",
    )
    ax.plot(
        split["layer"],
        split["slope_mlp"],
        color=MLP_COLOUR,
        marker="o",
        markersize=3,
        label="MLP part",
    )
    for layer in chosen:
        ax.axvline(layer, color="grey", linestyle=":", linewidth=0.8)
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_title("compensation slope per ablated layer", fontsize=9)
    _layer_axis(ax, "ablated layer")
    ax.set_ylabel("slope (compensatory per direct effect)")
    ax.legend(fontsize=7)
    for extra in axes[n_panels:]:
        extra.set_visible(False)
    return fig


# ---- everything -----------------------------------------------------------------------------


def make_all(
    results_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Write every figure of a results folder into ``out_dir`` (default
    ``<results_dir>/figures``) and return their paths:

    - ``fig1_prompt.png``: the first prompt that kept per-patch rows (else the first prompt),
      ablating its attention site with the largest clean direct effect;
    - ``fig2_direct_vs_total.png``, ``fig3_examples.png`` (up to 4 prompts with the largest
      attention direct effects, each ablating that site), ``fig7_compensation.png``,
      ``fig8_response_split.png``;
    - ``fig_repair_patches.png`` when the folder kept per-patch effects
      (:mod:`causalnet.hydra.figures_repair`).

    Prompt texts for titles come from the run's ``prompts`` argument when it still resolves
    (:func:`causalnet.hydra.data.load_prompts`); otherwise titles name the prompt id.
    """
    store = ResultsStore(results_dir)
    effects = store.load_effects()
    out = Path(out_dir) if out_dir is not None else store.path / "figures"
    out.mkdir(parents=True, exist_ok=True)
    texts = _prompt_texts(store)
    targets = effects.groupby("prompt_id", sort=False)["target_str"].first()

    def label(pid: Any) -> str:
        text = texts.get(pid)
        head = f"{text!r}" if text is not None else f"prompt {pid!r}"
        return f"{head} -> {targets.get(pid, '?')!r}"

    best = _best_attention_ablations(effects)
    kept = store.patch_prompt_ids()
    first = kept[0] if kept else effects["prompt_id"].iloc[0]
    examples = list(best.items())[:4]
    wanted = {first} | {pid for pid, _ in examples}
    readouts = store.load_readouts(wanted)
    patches = store.load_patches(wanted) if kept else None
    paths = []
    if first in best:
        paths.append(
            plot_prompt(
                readouts,
                first,
                best[first],
                out / "fig1_prompt.png",
                patches=patches,
                title=f"{label(first)}: ablating {best[first]}",
            )
        )
    paths.append(plot_agreement(effects, out / "fig2_direct_vs_total.png"))
    if examples:
        paths.append(
            plot_examples(
                readouts,
                examples,
                out / "fig3_examples.png",
                patches=patches,
                titles=[label(pid) for pid, _ in examples],
            )
        )
    paths.append(plot_compensation(effects, out / "fig7_compensation.png"))
    paths.append(plot_response_split(effects, out / "fig8_response_split.png"))
    from .figures_repair import make_repair_figures  # per-patch repair, when kept

    return paths + make_repair_figures(store.path, out)


# ---- helpers --------------------------------------------------------------------------------


def _layer_kinds(effects: pd.DataFrame) -> list[str]:
    """The per-layer kinds present: attention ("attn", else "head") first, then "mlp"."""
    present = set(effects["kind"])
    attn = "attn" if "attn" in present else ("head" if "head" in present else None)
    return [k for k in (attn, "mlp") if k is not None and k in present]


def _best_attention_ablations(effects: pd.DataFrame) -> dict[Any, str]:
    """Per prompt, its ablated attention site with the largest clean direct effect; prompts
    ordered by that effect, largest first."""
    kinds = _layer_kinds(effects)
    if not kinds or kinds[0] == "mlp":
        return {}
    rows = effects[effects["kind"] == kinds[0]]
    top = rows.loc[rows.groupby("prompt_id", sort=False)["direct_effect"].idxmax()]
    top = top.sort_values("direct_effect", ascending=False, kind="stable")
    return dict(zip(top["prompt_id"], top["site"], strict=True))


def _prompt_texts(store: ResultsStore) -> dict[Any, str]:
    spec = store.load_run().get("args", {}).get("prompts")
    if not isinstance(spec, str):
        return {}
    try:
        return {p.id: p.text for p in load_prompts(spec)}
    except DataError:  # the prompt set moved since the sweep: titles fall back to ids
        return {}


def _scatter_fit(
    ax: Axes, x: np.ndarray, y: np.ndarray, colour: str, label: str, line_colour: str | None = None
) -> None:
    """Scatter y on x with its least-squares line, labelled with slope, r^2 and n."""
    fit = linear_fit(x, y)
    ax.scatter(x, y, s=8, alpha=0.5, color=colour)
    if np.isfinite(fit.slope):
        xs = np.linspace(x.min(), x.max(), 2)
        text = f"{label}: slope {fit.slope:.2f}, r$^2$ {fit.r2:.2f}, n {fit.n}"
        ax.plot(xs, fit.slope * xs + fit.intercept, color=line_colour or colour, label=text)
    else:
        ax.plot([], [], color=line_colour or colour, label=f"{label}: no fit (n {fit.n})")


def _kind_colour(kind: str) -> str:
    return MLP_COLOUR if kind == "mlp" else ATTN_COLOUR


def _identity_line(ax: Axes, x: pd.Series, y: pd.Series, label: str) -> None:
    values = np.concatenate([np.asarray(x, float), np.asarray(y, float)])
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (-1.0, 1.0)
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle=":", linewidth=1, label=label)


def _layer_axis(ax: Axes, label: str) -> None:
    """An x axis of layer numbers (0-based, Hugging Face's index): integer ticks only."""
    ax.set_xlabel(f"{label} (0-based)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=9)
    ax.set_axis_off()


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    return path
