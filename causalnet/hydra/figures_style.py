"""The look the paper's figures share: colours, units, layer axes, fitted scatters, saving.

Used by :mod:`causalnet.hydra.figures_prompt`, :mod:`~causalnet.hydra.figures_agreement` and
:mod:`~causalnet.hydra.figures_response`: Matplotlib's object-oriented API on the Agg canvas (no
pyplot); effects in centred logits of the target token (:data:`UNIT`); layers numbered from 0
as in Hugging Face.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .analysis import linear_fit

UNIT = "centred logit"
CLEAN = "tab:blue"
ABLATED = "tab:red"
ATTN_COLOUR = "tab:blue"
MLP_COLOUR = "tab:orange"
MIXER_COLOUR = "tab:green"
DPI = 110
KIND_LABEL = {
    "attn": "attention layers",
    "head": "attention heads",
    "mlp": "MLP layers",
    "mixer": "mixer layers",
}


def layer_kinds(effects: pd.DataFrame) -> list[str]:
    """The per-layer kinds present: attention ("attn", else "head") first, then "mlp"; in a
    model of one-part blocks (Mamba) "mixer" alone."""
    present = set(effects["kind"])
    attn = "attn" if "attn" in present else ("head" if "head" in present else None)
    return [k for k in (attn, "mlp", "mixer") if k is not None and k in present]


def scatter_fit(
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


def kind_colour(kind: str) -> str:
    """The colour of a kind's points and lines: MLP orange, attention (layers or heads) blue,
    mixers green."""
    return {"mlp": MLP_COLOUR, "mixer": MIXER_COLOUR}.get(kind, ATTN_COLOUR)


def identity_line(ax: Axes, x: pd.Series, y: pd.Series, label: str) -> None:
    """The dotted line y = x across the range of both ``x`` and ``y``."""
    values = np.concatenate([np.asarray(x, float), np.asarray(y, float)])
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (-1.0, 1.0)
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle=":", linewidth=1, label=label)


def layer_axis(ax: Axes, label: str) -> None:
    """An x axis of layer numbers (0-based, Hugging Face's index): integer ticks only."""
    ax.set_xlabel(f"{label} (0-based)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def empty_panel(ax: Axes, message: str) -> None:
    """A panel without axes that says why it has nothing to show."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=9)
    ax.set_axis_off()


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Save ``fig`` as ``path`` (PNG at :data:`DPI`; folders made as needed); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path
