"""Figure 2: direct vs total effects per layer, over every prompt of a results folder.

Direct effect (Delta_unembed, Eq 10) against the total effect (Delta_ablate, Eq 12) per layer
and prompt, their scatter and their per-layer agreement
(:func:`~causalnet.hydra.analysis.per_layer_agreement`). Re-exported by
:mod:`causalnet.hydra.figures`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from .analysis import per_layer_agreement
from .figures_style import (
    CLEAN,
    KIND_LABEL,
    UNIT,
    identity_line,
    kind_colour,
    layer_axis,
    layer_kinds,
    save_figure,
)


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
    layer_axis(ax, "layer")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="best")


def plot_agreement(effects: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Figure 2: (a) direct effect (Delta_unembed, Eq 10) per layer, grey per prompt, blue
    mean, attention and MLP; (b) the same for the total effect (Delta_ablate, Eq 12); (c)
    direct vs total effect over all layers and prompts; (d) per layer, the Pearson correlation
    of the two and the fraction of prompts with direct > total (:func:`per_layer_agreement`).
    Returns path."""
    return save_figure(figure_agreement(effects), path)


def figure_agreement(effects: pd.DataFrame) -> Figure:
    """:func:`plot_agreement`'s figure, not saved."""
    kinds = layer_kinds(effects)
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
                f"({letter}) {what} ({how}) effect, {KIND_LABEL[kind]}",
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
            color=kind_colour(kind),
            label=KIND_LABEL[kind],
        )
    identity_line(ax, rows["direct_effect"], -rows["total_effect"], "drop = direct")
    ax.set_title("(c) direct effect vs ablation drop, all layers and prompts", fontsize=9)
    ax.set_xlabel(f"direct effect, Eq 10 ({UNIT})")
    ax.set_ylabel(f"drop = clean - ablated = -total effect ({UNIT})")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[1, 2:4])
    agreement = per_layer_agreement(effects)
    for kind in kinds:
        sel = agreement[agreement["kind"] == kind]
        colour = kind_colour(kind)
        ax.plot(
            sel["layer"],
            sel["corr_direct_drop"],
            color=colour,
            marker="o",
            markersize=3,
            label=f"correlation, {KIND_LABEL[kind]}",
        )
        ax.plot(
            sel["layer"],
            sel["frac_direct_gt_drop"],
            color=colour,
            linestyle="--",
            marker="s",
            markersize=3,
            label=f"fraction direct > drop, {KIND_LABEL[kind]}",
        )
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_ylim(-1.05, 1.05)
    ax.set_title("(d) agreement of direct effect and ablation drop per layer", fontsize=9)
    layer_axis(ax, "layer")
    ax.set_ylabel("Pearson r / fraction of prompts")
    ax.legend(fontsize=7)
    fig.suptitle(f"Direct vs total effects ({effects['prompt_id'].nunique()} prompts)")
    return fig
