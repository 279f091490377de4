"""The per-patch distribution of the repair for one ablated site (issue 13, section 2).

From the ``patch_effects`` table (one row per prompt, ablated site and patch; kept for every
prompt) joined with the ``effects`` table's clean direct effect: per patch,
``removed = direct_effect - direct_effect_ablated_self`` and
``repair = total_effect + removed`` (``docs/conventions.md``, "The repair, split"). Two panels:

- (a) repair against removed, one point per (prompt, patch), with the lines repair = removed
  (full repair) and repair = 0;
- (b) the parts ``repair_attn``, ``repair_mlp``, ``repair_norm`` and the whole ``repair`` per
  patch, one strip of points each (jittered sideways), with each strip's median marked; in a
  model of one-part blocks (Mamba: the attention / MLP parts are NaN, not applicable) the
  strips are the downstream mixers' value part ``repair - repair_norm - repair_sibling``,
  ``repair_norm`` and ``repair``.

:func:`figure_repair_patches` returns the Figure, :func:`plot_repair_patches` saves it,
:func:`make_repair_figures` makes it for a results folder (nothing for a folder without
per-patch effects).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..errors import ResultsError
from .store import ResultsStore

#: The strips of panel (b): (column of the per-patch rows, label).
STRIPS = (
    ("repair_attn", "attn"),
    ("repair_mlp", "MLP"),
    ("repair_norm", "norm"),
    ("repair", "repair"),
)
FILE = "fig_repair_patches.png"


def patch_rows(patch_effects: pd.DataFrame, effects: pd.DataFrame, site: str) -> pd.DataFrame:
    """The per-patch rows of ``site`` with ``direct_effect`` (clean), ``removed`` and
    ``repair`` added, in (prompt, patch) order. ResultsError when there are none."""
    rows = patch_effects[patch_effects["site"] == site]
    if rows.empty:
        kept = sorted(set(patch_effects["site"]))
        raise ResultsError(
            f"no per-patch effects of site {site!r}"
            + (f"; sites with some: {kept[:6]}" if kept else " (none kept in this folder)")
        )
    clean = effects[effects["site"] == site][["prompt_id", "direct_effect"]]
    rows = rows.merge(clean, on="prompt_id", how="left", validate="many_to_one")
    if rows["direct_effect"].isna().any():
        raise ResultsError(f"per-patch effects of {site!r} for prompts without an effects row")
    removed = rows["direct_effect"] - rows["direct_effect_ablated_self"]
    rows = rows.assign(removed=removed, repair=rows["total_effect"] + removed)
    return rows.sort_values(["prompt_id", "patch"], kind="stable").reset_index(drop=True)


def default_site(effects: pd.DataFrame) -> str:
    """The attention site (layer or head) with the largest RMS clean direct effect."""
    attn = effects[effects["kind"].isin(["attn", "head"])]
    if attn.empty:
        attn = effects
    rms = attn.groupby("site", sort=False)["direct_effect"].apply(lambda x: np.sqrt((x**2).mean()))
    return str(rms.idxmax())


def figure_repair_patches(rows: pd.DataFrame, site: str, seed: int = 0) -> Figure:
    """The figure of :func:`patch_rows`'s rows for ``site`` (module doc)."""
    fig = Figure(figsize=(11, 4.5))
    ax_a, ax_b = fig.subplots(1, 2)
    n_prompts = rows["prompt_id"].nunique()
    x, y = rows["removed"].to_numpy(), rows["repair"].to_numpy()
    ax_a.scatter(x, y, s=8, alpha=0.5, color="tab:blue", label="one patch")
    lim = float(np.max(np.abs(np.concatenate([x, y, [1e-3]])))) * 1.05
    ax_a.plot([-lim, lim], [-lim, lim], color="k", lw=0.8, ls="--", label="full repair")
    ax_a.plot([-lim, lim], [0, 0], color="grey", lw=0.8, label="no repair")
    ax_a.set_xlabel("removed direct effect (DE - DE ablated)")
    ax_a.set_ylabel("repair (total effect + removed)")
    ax_a.set_title(f"(a) {site}: {len(rows)} patches of {n_prompts} prompts")
    ax_a.legend(fontsize=8)
    jitter = np.random.default_rng(seed).uniform(-0.25, 0.25, len(rows))
    colours = ("tab:orange", "tab:green", "tab:purple", "tab:blue")
    strips = STRIPS
    if rows["repair_attn"].isna().all():  # mixers: no attention / MLP part
        mixer = rows["repair"] - rows["repair_norm"] - rows["repair_sibling"]
        rows = rows.assign(repair_mixer=mixer)
        strips, colours = (("repair_mixer", "mixers"), *STRIPS[2:]), colours[1:]
    for i, ((column, label), colour) in enumerate(zip(strips, colours, strict=True)):
        values = rows[column].to_numpy()
        ax_b.scatter(i + jitter, values, s=6, alpha=0.4, color=colour, label=label)
        median = float(np.median(values))
        ax_b.plot([i - 0.35, i + 0.35], [median, median], color="k", lw=2, label=f"median {label}")
    ax_b.axhline(0.0, color="grey", lw=0.8)
    ax_b.set_xticks(range(len(strips)), [label for _, label in strips])
    ax_b.set_xlabel("part of the repair")
    ax_b.set_ylabel("per patch (centred logit)")
    ax_b.set_title(f"(b) {site}: the repair's parts per patch")
    fig.tight_layout()
    return fig


def plot_repair_patches(
    rows: pd.DataFrame, site: str, path: str | os.PathLike[str], seed: int = 0
) -> Path:
    """Save :func:`figure_repair_patches` as a PNG at ``path``; returns the path."""
    path = Path(path)
    figure_repair_patches(rows, site, seed).savefig(path, dpi=120)
    return path


def make_repair_figures(
    results_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    site: str | None = None,
) -> list[Path]:
    """``fig_repair_patches.png`` for ``site`` (default :func:`default_site`) in ``out_dir``
    (default ``<results_dir>/figures``); [] when the folder kept no per-patch effects and no
    site was asked for."""
    store = ResultsStore(results_dir)
    patch_effects = store.load_patch_effects()
    if patch_effects.empty and site is None:
        return []
    effects = store.load_effects()
    site = site or default_site(effects[effects["site"].isin(set(patch_effects["site"]))])
    out = Path(out_dir) if out_dir is not None else store.path / "figures"
    out.mkdir(parents=True, exist_ok=True)
    return [plot_repair_patches(patch_rows(patch_effects, effects, site), site, out / FILE)]
