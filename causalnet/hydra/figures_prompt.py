"""Figures 1 and 3: one prompt's direct effect per layer, clean and with one site ablated.

Per-prompt curves sum the heads of a layer (exact for direct effects: ``attn.l = sum_H
attn.l.hH``); attention and MLP panels (one mixer panel in a model of one-part blocks, Mamba);
faint lines are the single patches when a results folder kept them. Re-exported by
:mod:`causalnet.hydra.figures`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..errors import ResultsError
from ..sites import SiteSet, parse_site, parse_unit
from .figures_style import (
    ABLATED,
    CLEAN,
    KIND_LABEL,
    UNIT,
    empty_panel,
    layer_axis,
    save_figure,
)
from .tables import site_sort_key

PANEL_TITLE = {"attn": "attention", "mlp": "MLP", "mixer": "mixer"}


def panels_of(readouts: pd.DataFrame) -> tuple[str, ...]:
    """The panels of Figures 1 and 3: ("attn", "mlp"), or ("mixer",) in a model whose readout
    sites are mixers (one-part blocks)."""
    names = pd.unique(readouts["readout_site"])
    return ("mixer",) if any(parse_site(s).kind == "mixer" for s in names) else ("attn", "mlp")


def _prompt_curves(
    readouts: pd.DataFrame,
    patches: pd.DataFrame | None,
    prompt_id: Any,
    ablated_site: str,
) -> dict[str, dict[str, np.ndarray]]:
    """Per panel ("attn", "mlp"; or "mixer"): layers, clean and mean-ablated direct effects,
    and the per-patch ablated direct effects [n_patches, n_layers] (empty without patches)."""
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
    for panel in panels_of(rows):
        kinds = {panel} if panel != "attn" or has_attn_layers else {"head"}
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
    ablated = parse_unit(ablated_site)  # a set: a dashed line at each member's layer
    marked = sorted(
        {m.layer for m in ablated.members} if isinstance(ablated, SiteSet) else {ablated.layer}
    )
    for ax, panel in zip(axes, panels_of(readouts), strict=True):
        c = curves.get(panel)
        if c is None:
            empty_panel(ax, f"no {KIND_LABEL[panel]} read out")
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
        for layer in marked:
            if layer >= 0:
                ax.axvline(layer, color="black", linestyle="--", linewidth=1)
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set_title(f"{PANEL_TITLE[panel]} direct effects")
        layer_axis(ax, "layer")
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
    per-patch rows); dashed line at the ablated layer (a set of sites: at each member's).
    Attention and MLP panels (a mixer panel in a model of one-part blocks). Returns path.
    """
    return save_figure(figure_prompt(readouts, prompt_id, ablated_site, patches, title), path)


def figure_prompt(
    readouts: pd.DataFrame,
    prompt_id: Any,
    ablated_site: str,
    patches: pd.DataFrame | None = None,
    title: str | None = None,
) -> Figure:
    """:func:`plot_prompt`'s figure, not saved."""
    n_panels = len(panels_of(readouts))
    fig = Figure(figsize=(5.5 * n_panels, 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n_panels))
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
    return save_figure(figure_examples(readouts, examples, patches, titles), path)


def figure_examples(
    readouts: pd.DataFrame,
    examples: Sequence[tuple[Any, str]],
    patches: pd.DataFrame | None = None,
    titles: Sequence[str] | None = None,
) -> Figure:
    """:func:`plot_examples`' figure, not saved."""
    if not examples:
        raise ResultsError("plot_examples needs at least one (prompt id, ablated site)")
    panels = panels_of(readouts)
    fig = Figure(figsize=(5.5 * len(panels), 3.2 * len(examples)), layout="constrained")
    axes = np.asarray(fig.subplots(len(examples), len(panels), squeeze=False))
    for i, (pid, site) in enumerate(examples):
        _draw_prompt(axes[i], readouts, patches, pid, site)
        label = titles[i] if titles else f"prompt {pid!r}"
        axes[i][0].set_title(
            f"{label}: ablating {site}\n{PANEL_TITLE[panels[0]]} direct effects", fontsize=9
        )
    return fig
