"""Graph queries over an SCM's causal graph, and a drawing like the paper's Figures 4 and 5.

The queries read :attr:`SCM.graph`: for a model made by :meth:`SCM.do`, nodes fixed to a value
have lost their in-edges (the graph of the intervened model ``M_Z``).

:func:`draw` uses matplotlib's object API only (a :class:`matplotlib.figure.Figure`, never
``pyplot``), so it works on machines without a display and never switches the user's backend;
save with ``ax.figure.savefig(path)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import networkx as nx
from torch import Tensor

from causalnet.ablations import Ablation
from causalnet.scm import SCM

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["ancestors", "descendants", "directed_paths", "topological_order", "draw"]


def ancestors(scm: SCM, node: str) -> set[str]:
    """The nodes with a directed path to ``node`` (``node`` itself excluded).

    >>> scm = SCM(); scm.add_exogenous("u"); scm.add_node("x", ["u"], lambda u: u)
    >>> ancestors(scm, "x")
    {'u'}
    """
    scm.check_node(node)
    return set(nx.ancestors(scm.graph, node))


def descendants(scm: SCM, node: str) -> set[str]:
    """The nodes reachable from ``node`` along directed edges (``node`` itself excluded).

    >>> scm = SCM(); scm.add_exogenous("u"); scm.add_node("x", ["u"], lambda u: u)
    >>> descendants(scm, "u")
    {'x'}
    """
    scm.check_node(node)
    return set(nx.descendants(scm.graph, node))


def directed_paths(scm: SCM, source: str, target: str) -> list[list[str]]:
    """Every directed path ``[source, ..., target]`` (the paths an effect can flow along).

    >>> scm = SCM(); scm.add_exogenous("u"); scm.add_node("x", ["u"], lambda u: u)
    >>> scm.add_node("y", ["u", "x"], lambda u, x: u + x)
    >>> sorted(directed_paths(scm, "u", "y"))
    [['u', 'x', 'y'], ['u', 'y']]
    """
    scm.check_node(source)
    scm.check_node(target)
    if source == target:
        return [[source]]
    return [list(p) for p in nx.all_simple_paths(scm.graph, source, target)]


def topological_order(scm: SCM) -> list[str]:
    """All nodes, parents before children (the order :meth:`SCM.run` evaluates them in).

    Raises :class:`~causalnet.errors.CycleError` (listing the cycle) if there is none.

    >>> scm = SCM(); scm.add_node("x", ["u"], lambda u: u); scm.add_exogenous("u")
    >>> topological_order(scm)
    ['u', 'x']
    """
    scm.validate()
    return list(nx.topological_sort(scm.graph))


def _label(name: str, value: Any) -> str:
    if isinstance(value, Ablation):
        return f"do({name} ~ {value!r})"
    if isinstance(value, Tensor):
        return f"do({name} = {value.item():g})" if value.numel() == 1 else f"do({name} = {name}')"
    if callable(value):
        return f"do({name} = g({name}))"
    return f"do({name} = {value:g})" if isinstance(value, (int, float)) else f"do({name})"


def draw(scm: SCM, do: Mapping[str, Any] | None = None, ax: Axes | None = None) -> Axes:
    """Draw the causal graph with interventions marked, like the paper's Figures 4 and 5.

    Nodes are laid out left to right by topological generation; exogenous nodes are grey.
    Each intervened node (``do``, plus the model's own interventions) is red and gets an
    intervention edge from a ``do(...)`` marker; its cut in-edges are drawn as faint dotted
    lines (for a hard intervention; a soft, callable one keeps them). ``do`` values may be
    anything :meth:`SCM.run` accepts, or an ablation. Returns the axes (a new figure's if
    ``ax`` is None).

    >>> scm = SCM(); scm.add_exogenous("u"); scm.add_node("x", ["u"], lambda u: u)
    >>> import io
    >>> draw(scm, do={"x": 0.0}).figure.savefig(io.BytesIO(), format="png")
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch

    order = topological_order(scm)  # raises CycleError on a cycle
    interventions = {**scm.interventions, **(do or {})}
    for name in interventions:
        scm.check_node(name, endogenous=True, role="intervention target")
    if ax is None:
        ax = Figure(figsize=(1.6 * (len(order) + 1), 3.2)).add_subplot()

    structure = nx.DiGraph()
    structure.add_nodes_from(order)
    for child in scm.endogenous:
        structure.add_edges_from((p, child) for p in scm.parents(child))
    pos: dict[str, tuple[float, float]] = {}
    for col, gen in enumerate(nx.topological_generations(structure)):
        gen = sorted(gen, key=order.index)
        for row, name in enumerate(gen):
            pos[name] = (float(col), (len(gen) - 1) / 2 - row)

    def arrow(a: tuple[float, float], b: tuple[float, float], **kw: Any) -> None:
        kw = {"arrowstyle": "-|>", "mutation_scale": 14, "shrinkA": 16, "shrinkB": 16, **kw}
        ax.add_patch(FancyArrowPatch(a, b, **kw))

    hard = {n for n, v in interventions.items() if isinstance(v, Ablation) or not callable(v)}
    for a, b in structure.edges:
        (ax_, ay), (bx, by) = pos[a], pos[b]
        # edges skipping a column arc around the nodes between, alternately above and below
        rad = 0.0 if bx - ax_ <= 1 or ay != by else (-0.5 if int(ax_) % 2 == 0 else 0.5)
        style = f"arc3,rad={rad}"
        if b in hard:  # in-edge cut by the intervention
            arrow(pos[a], pos[b], color="0.6", linestyle=":", linewidth=1.5, connectionstyle=style)
        else:
            arrow(pos[a], pos[b], color="black", connectionstyle=style)
    for name, (px, py) in pos.items():
        exo = scm.is_exogenous(name)
        face = "#f4a6a6" if name in interventions else ("0.85" if exo else "white")
        box = {"boxstyle": "circle,pad=0.35", "fc": face, "ec": "black"}
        ax.text(px, py, name, ha="center", va="center", bbox=box, fontsize=11, zorder=3)
    for name, value in interventions.items():
        px, py = pos[name]
        marker = (px - 0.45, py + 0.75)
        ax.text(
            *marker,
            _label(name, value),
            ha="center",
            va="center",
            color="firebrick",
            fontsize=9,
            bbox={"boxstyle": "round", "fc": "white", "ec": "firebrick"},
        )
        arrow(marker, (px, py), color="firebrick", linewidth=1.5, shrinkA=10)

    xs = [p[0] for p in pos.values()] or [0.0]
    ys = [p[1] for p in pos.values()] or [0.0]
    ax.set_xlim(min(xs) - 0.9, max(xs) + 0.6)
    ax.set_ylim(min(ys) - 0.6, max(ys) + (1.2 if interventions else 0.6))
    ax.set_axis_off()
    return ax
