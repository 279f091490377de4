"""Figures 7 and 8: the compensatory response to an ablation and its attention/MLP split.

Figure 7 regresses the compensatory effect (Eq 33) on the ablated site's direct effect per
layer (:func:`~causalnet.hydra.analysis.compensation_regression`); Figure 8 splits the
compensation into its attention part (the Hydra effect) and its MLP part (less erasure) for a
few ablated layers (:func:`select_layers`). Re-exported by :mod:`causalnet.hydra.figures`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..errors import ResultsError
from .analysis import (
    compensation_regression,
    peak_r2_layer,
    response_split,
)
from .figures_style import (
    ATTN_COLOUR,
    CLEAN,
    KIND_LABEL,
    MLP_COLOUR,
    UNIT,
    empty_panel,
    identity_line,
    layer_axis,
    layer_kinds,
    save_figure,
    scatter_fit,
)

# ---- panels both figures draw ----------------------------------------------------------------

# x and y labels (before the unit) of a panel of ablated sites' direct vs compensatory effects
_SITE_AXES = ("direct effect of ablated site", "compensatory effect")


def _label_effects(ax: Axes, title: str, xlabel: str, ylabel: str, legend_size: int) -> None:
    """Title, axis labels (effects in :data:`UNIT`) and legend of a scatter panel of
    ablation effects."""
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(f"{xlabel} ({UNIT})")
    ax.set_ylabel(f"{ylabel} ({UNIT})")
    ax.legend(fontsize=legend_size)


def _per_layer_lines(
    ax: Axes,
    table: pd.DataFrame,
    lines: Mapping[str, Mapping[str, Any]],
    marks: Sequence[tuple[int, Mapping[str, Any]]],
    zero_colour: str,
    title: str,
    ylabel: str,
) -> None:
    """A panel of per-ablated-layer statistics: one line per column of ``table`` in ``lines``
    (its Matplotlib style), vertical lines at the layers in ``marks`` (with theirs), a zero line,
    and a 0-based layer axis."""
    for column, style in lines.items():
        ax.plot(table["layer"], table[column], markersize=3, **style)
    for layer, style in marks:
        ax.axvline(layer, **style)
    ax.axhline(0.0, color=zero_colour, linewidth=0.5)
    ax.set_title(title, fontsize=9)
    layer_axis(ax, "ablated layer")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


# ---- Figure 7: the compensatory response ------------------------------------------------------


def plot_compensation(effects: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Figure 7: (a) direct effect vs compensatory effect (Eq 33) for attention ablations,
    coloured by layer; (b) the attention layer with the highest r^2, with its least-squares line
    and the full-restoration line y = x; (c) as (a) for MLP ablations; (d) r^2 (solid blue) and
    slope (dashed black) of the regression per attention layer, red line at the peak layer
    (:func:`compensation_regression`). Returns path."""
    return save_figure(figure_compensation(effects), path)


def figure_compensation(effects: pd.DataFrame) -> Figure:
    """:func:`plot_compensation`'s figure, not saved."""
    kinds = layer_kinds(effects)
    attn = kinds[0] if kinds and kinds[0] != "mlp" else None  # or the mixers of a Mamba
    reg = compensation_regression(effects)
    fig = Figure(figsize=(12, 9), layout="constrained")
    (ax_a, ax_b), (ax_c, ax_d) = fig.subplots(2, 2)
    n_layers = int(effects["layer"].max()) + 1
    for ax, kind, letter in ((ax_a, attn, "a"), (ax_c, "mlp" if "mlp" in kinds else None, "c")):
        if kind is None:
            why = "no MLP sites: one-part blocks, mixers only" if attn == "mixer" else ""
            empty_panel(ax, f"({letter}) {why or 'no such sites ablated'}")
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
        identity_line(ax, sel["direct_effect"], sel["compensatory_effect"], "full restoration")
        _label_effects(
            ax, f"({letter}) {KIND_LABEL[kind]}: direct vs compensatory effect", *_SITE_AXES, 7
        )
    if attn is None:
        empty_panel(ax_b, "(b) no attention sites ablated")
        empty_panel(ax_d, "(d) no attention sites ablated")
        return fig
    areg = reg[reg["kind"] == attn]
    peak = peak_r2_layer(reg, attn)
    if peak is None:
        empty_panel(ax_b, "(b) no layer with a defined r^2 (too few prompts?)")
    else:
        sel = effects[(effects["kind"] == attn) & (effects["layer"] == peak)]
        x, y = sel["direct_effect"].to_numpy(), sel["compensatory_effect"].to_numpy()
        scatter_fit(ax_b, x, y, ATTN_COLOUR, "fit", line_colour="black")
        identity_line(ax_b, x, y, "full restoration")
        _label_effects(
            ax_b, f"(b) layer {peak} ({KIND_LABEL[attn]}), highest r$^2$", *_SITE_AXES, 7
        )
    peak_label = f"peak r$^2$: layer {peak}"
    marks = [] if peak is None else [(peak, {"color": "red", "linewidth": 1, "label": peak_label})]
    _per_layer_lines(
        ax_d,
        areg,
        {
            "r2": {"color": CLEAN, "marker": "o", "label": "variance explained (r$^2$)"},
            "slope": {"color": "black", "linestyle": "--", "marker": "s", "label": "slope"},
        },
        marks,
        "grey",
        f"(d) regression of compensatory on direct effect, {KIND_LABEL[attn]}",
        "r$^2$ / slope (compensatory per direct effect)",
    )
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
    return save_figure(figure_response_split(effects, layers), path)


def figure_response_split(effects: pd.DataFrame, layers: Sequence[int] | None = None) -> Figure:
    """:func:`plot_response_split`'s figure, not saved."""
    kinds = layer_kinds(effects)
    if kinds == ["mixer"]:  # one-part blocks: the compensation has no attention / MLP part
        fig = Figure(figsize=(6, 2.5), layout="constrained")
        empty_panel(
            fig.subplots(),
            "not applicable: the model's blocks add one part each (mixers, e.g. Mamba),\n"
            "so the compensation has no attention part and no MLP part to split",
        )
        return fig
    if not kinds:
        raise ResultsError("no attention, MLP or mixer sites in the effects table")
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
            empty_panel(ax, f"layer {layer} was not ablated")
            continue
        x = sel["direct_effect"].to_numpy()
        for column, colour, label in (
            ("compensatory_attn", ATTN_COLOUR, "attention (Hydra)"),
            ("compensatory_mlp", MLP_COLOUR, "MLP (erasure)"),
        ):
            scatter_fit(ax, x, sel[column].to_numpy(), colour, label)
        ax.axhline(0.0, color="grey", linewidth=0.5)
        _label_effects(
            ax,
            f"ablating {KIND_LABEL[kind].split()[0]} layer {layer}",
            "direct effect of ablated layer",
            "change in downstream direct effects",
            6,
        )
    split = response_split(effects)
    _per_layer_lines(
        axes[len(chosen)],
        split[split["kind"] == kind],
        {
            "slope_attn": {"color": ATTN_COLOUR, "marker": "o", "label": "attention part"},
            "slope_mlp": {"color": MLP_COLOUR, "marker": "o", "label": "MLP part"},
        },
        [(layer, {"color": "grey", "linestyle": ":", "linewidth": 0.8}) for layer in chosen],
        "black",
        "compensation slope per ablated layer",
        "slope (compensatory per direct effect)",
    )
    for extra in axes[n_panels:]:
        extra.set_visible(False)
    return fig
