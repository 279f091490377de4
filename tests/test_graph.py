"""Graph queries (ancestors, descendants, paths, order) and the intervention drawing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.axes import Axes
from matplotlib.patches import FancyArrowPatch

from causalnet import SCM, Resample, ancestors, descendants, directed_paths, draw, topological_order
from causalnet.errors import CycleError, InterventionError, UnknownNodeError
from causalnet.toys import erasure


def diamond() -> SCM:
    """u -> x -> {a, b} -> y, x -> y, and an unrelated w."""
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("x", ["u"], lambda u: u)
    scm.add_node("a", ["x"], lambda x: x)
    scm.add_node("b", ["x"], lambda x: x)
    scm.add_node("y", ["a", "b", "x"], lambda a, b, x: a + b + x)
    scm.add_node("w", ["u"], lambda u: u)
    return scm


def test_ancestors_and_descendants() -> None:
    scm = diamond()
    assert ancestors(scm, "y") == {"u", "x", "a", "b"}
    assert ancestors(scm, "u") == set()
    assert descendants(scm, "x") == {"a", "b", "y"}
    assert descendants(scm, "u") == {"x", "a", "b", "y", "w"}
    assert scm.ancestors("a") == {"u", "x"}
    assert scm.descendants("y") == set()


def test_directed_paths() -> None:
    scm = diamond()
    paths = sorted(directed_paths(scm, "x", "y"))
    assert paths == [["x", "a", "y"], ["x", "b", "y"], ["x", "y"]]
    assert directed_paths(scm, "y", "x") == []
    assert directed_paths(scm, "w", "y") == []
    assert scm.directed_paths("u", "a") == [["u", "x", "a"]]


def test_queries_see_the_intervened_graph() -> None:
    scm = diamond().do(x=0.0)
    assert ancestors(scm, "y") == {"x", "a", "b"}  # u -> x is cut in M_x
    assert descendants(scm, "u") == {"w"}
    assert directed_paths(scm, "u", "y") == []


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_topological_order_puts_parents_first(data) -> None:
    n = data.draw(st.integers(1, 8))
    edges = [(i, j) for i in range(n) for j in range(i + 1, n) if data.draw(st.booleans())]
    order = data.draw(st.permutations(range(n)))
    scm = SCM()
    for i in order:  # declared in a random order
        scm.add_node(
            f"n{i}",
            [f"n{j}" for j in range(n) if (j, i) in edges],
            lambda *a: a[0] if a else torch.zeros(1),
        )
    topo = topological_order(scm)
    assert sorted(topo) == sorted(f"n{i}" for i in range(n))
    pos = {name: k for k, name in enumerate(topo)}
    assert all(pos[f"n{i}"] < pos[f"n{j}"] for i, j in edges)
    assert scm.topological_order() == topo


def test_graph_query_errors() -> None:
    scm = diamond()
    with pytest.raises(UnknownNodeError, match="'z'"):
        ancestors(scm, "z")
    with pytest.raises(UnknownNodeError, match="'z'"):
        directed_paths(scm, "x", "z")
    cyc = SCM()
    cyc.add_node("p", ["q"], lambda q: q)
    cyc.add_node("q", ["p"], lambda p: p)
    with pytest.raises(CycleError, match="'p'"):
        topological_order(cyc)
    with pytest.raises(CycleError):
        draw(cyc)


def _cut_edges(ax: Axes) -> list[FancyArrowPatch]:
    return [p for p in ax.patches if isinstance(p, FancyArrowPatch) and p.get_linestyle() == ":"]


def test_draw_marks_the_intervention(tmp_path) -> None:
    scm = erasure()
    ax = draw(scm, do={"x": 0.0})
    assert isinstance(ax, Axes)
    texts = [t.get_text() for t in ax.texts]
    assert "do(x = 0)" in texts
    assert {"u", "x", "f", "y"} <= set(texts)
    assert len(_cut_edges(ax)) == 1  # u -> x is cut
    arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    assert len(arrows) == 5 + 1  # the 5 edges (one cut) + the intervention edge
    out = tmp_path / "g.png"
    ax.figure.savefig(out)
    assert out.stat().st_size > 1000


def test_draw_marks_a_do_models_own_interventions_and_ablations() -> None:
    ax = erasure().do(f=1.0).draw(do={"x": Resample(k=2)})
    texts = [t.get_text() for t in ax.texts]
    assert "do(f = 1)" in texts
    assert any(t.startswith("do(x ~ Resample") for t in texts)
    assert len(_cut_edges(ax)) == 3  # u -> x, x -> f, u -> f
    soft = erasure().draw(do={"f": lambda nat: nat})
    assert len(_cut_edges(soft)) == 0  # a soft intervention keeps the in-edges


def test_draw_plain_graph_and_given_axes() -> None:
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    assert draw(diamond(), ax=ax) is ax
    assert len(_cut_edges(ax)) == 0
    with pytest.raises(InterventionError, match="'u'"):
        draw(diamond(), do={"u": 0.0})


def test_draw_never_imports_pyplot() -> None:
    code = (
        "import sys, causalnet.toys as t; ax = t.erasure().draw(do={'x': 0.0}); "
        "import io; ax.figure.savefig(io.BytesIO(), format='png'); "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
