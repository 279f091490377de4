"""Figures of who repairs and of what attribution patching misses (issue 13, §3 and §5).

As :mod:`causalnet.hydra.figures`: Matplotlib's object-oriented API on the Agg canvas (no
pyplot, headless); each ``plot_*(..., path)`` saves what its ``figure_*`` twin returns. Effects
are in centred logits of the target token (Eqs 9, 10).

- :func:`figure_compensation_map`: the heatmap of :func:`causalnet.hydra.repairers.
  compensation_matrix` -- rows the ablated sites, columns the downstream readout sites, colour
  the mean Delta_DE (Eq 34), red up and blue down, grey where a readout is not downstream.
- :func:`figure_attribution`: attribution patching's estimate against the exact total effect,
  one point per (prompt, ablated site), coloured by |compensatory effect| (Eq 33).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from ..errors import ResultsError
from .analysis import pearson

UNIT = "centred logit"
_DPI = 110


def _ticks(labels: list[str], most: int) -> tuple[list[int], list[str]]:
    step = max(1, int(np.ceil(len(labels) / most)))
    where = list(range(0, len(labels), step))
    return where, [labels[i] for i in where]


def figure_compensation_map(matrix: pd.DataFrame, title: str | None = None) -> Figure:
    """The compensation map as a heatmap (module doc); colour limits symmetric about 0."""
    if matrix.empty or not np.isfinite(matrix.to_numpy(dtype=float)).any():
        raise ResultsError("the compensation matrix holds no value to draw")
    values = matrix.to_numpy(dtype=float)
    limit = float(np.nanmax(np.abs(values))) or 1.0
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.85")
    width = min(18.0, 4.0 + 0.08 * matrix.shape[1])
    height = min(14.0, 2.5 + 0.18 * matrix.shape[0])
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(
        np.ma.masked_invalid(values), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto"
    )
    xs, xl = _ticks([str(c) for c in matrix.columns], 60)
    ys, yl = _ticks([str(r) for r in matrix.index], 60)
    ax.set_xticks(xs, xl, rotation=90, fontsize=6)
    ax.set_yticks(ys, yl, fontsize=7)
    ax.set_xlabel("downstream readout site (head or MLP)")
    ax.set_ylabel("ablated site")
    ax.set_title(title or "Compensation map: mean Delta_DE of each downstream site")
    fig.colorbar(image, ax=ax, label=f"mean Delta_DE ({UNIT})")
    return fig


def plot_compensation_map(
    matrix: pd.DataFrame, path: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Save :func:`figure_compensation_map` as a PNG; returns the path."""
    return _save(figure_compensation_map(matrix, title), path)


def figure_attribution(rows: pd.DataFrame) -> Figure:
    """Estimate (y) against exact total effect (x) for the rows of
    :func:`causalnet.hydra.attribution_compare.joined`, coloured by |CE|, with y = x."""
    needed = {"total_effect", "atp_total_effect", "abs_compensation"}
    if not needed <= set(rows.columns) or rows.empty:
        raise ResultsError(f"expected joined rows with columns {sorted(needed)}")
    x, y = rows["total_effect"].to_numpy(), rows["atp_total_effect"].to_numpy()
    fig = Figure(figsize=(6.0, 5.0), layout="constrained")
    ax = fig.add_subplot()
    points = ax.scatter(x, y, c=rows["abs_compensation"], cmap="viridis", s=8, alpha=0.8)
    low, high = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    ax.plot([low, high], [low, high], color="k", lw=0.8, label="estimate = exact")
    ax.set_xlabel(f"exact total effect ({UNIT}, Eq 12)")
    ax.set_ylabel(f"attribution patching estimate ({UNIT})")
    ax.set_title(f"First-order estimate vs exact (Pearson r = {pearson(x, y):.2f}, n = {len(x)})")
    ax.legend(loc="upper left", fontsize=8)
    fig.colorbar(points, ax=ax, label=f"|compensatory effect| ({UNIT}, Eq 33)")
    return fig


def plot_attribution(rows: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Save :func:`figure_attribution` as a PNG; returns the path."""
    return _save(figure_attribution(rows), path)


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise ResultsError(f"{path}: the folder {path.parent} does not exist; create it")
    fig.savefig(path, dpi=_DPI)
    return path
