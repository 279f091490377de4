"""Structural causal models over tensors (paper Section 3, Definition 3.1).

An :class:`SCM` is ``M = <U, V, F, P(u)>``: exogenous nodes ``U`` (inputs, given in a context
``ctx``), endogenous nodes ``V`` each with a deterministic mechanism ``v_i = f_i(pa_i)``, and a
directed acyclic graph (a :class:`networkx.DiGraph`) with an edge ``p -> v`` for every parent.
``P(u)`` is represented by the batch: every value is a tensor whose first dimension indexes
contexts ``u_1 .. u_B``.

An intervention ``do(Z = z')`` replaces ``f_Z`` by a constant, cutting ``Z``'s in-edges, and
recomputes everything downstream; ``Y(u | do(Z = z'))`` is the value of ``Y`` in the intervened
model ``M_Z``. A value ``z'`` may be

- a python number, broadcast to the node's natural shape;
- a tensor of the node's full shape ``[B, ...]``, or of its trailing shape ``[...]`` (broadcast
  over the batch);
- a callable ``g(natural) -> value`` (a *soft* intervention): the mechanism becomes ``g o f_Z``,
  evaluated on ``Z``'s natural value under the other interventions (its in-edges stay).

The mechanism ``f_Z`` is still evaluated for an intervened node (as a forward hook would): its
output gives the shape the intervention value is checked and broadcast against.

This module holds the model only. The checks of what flows through it (mechanisms, contexts,
intervention values) and the value a node takes under ``do`` are in :mod:`causalnet.mechanisms`.
The questions asked of it -- total, direct and indirect effects -- are plain functions in
:mod:`causalnet.effects`; graph queries and drawing are in :mod:`causalnet.graph`. :class:`SCM`
exposes them as thin methods.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch
from torch import Tensor

from causalnet.errors import (
    CycleError,
    DuplicateNodeError,
    GraphError,
    InterventionError,
    NonFiniteError,
    UnknownNodeError,
)
from causalnet.mechanisms import (
    DoValue,
    Mechanism,
    apply_do,
    call_mechanism,
    check_arity,
    check_context,
    check_do_value,
    check_output,
)

if TYPE_CHECKING:
    from causalnet.ablations import Ablation

__all__ = ["SCM", "DoValue", "Mechanism"]

_EXOGENOUS = "exogenous"
_ENDOGENOUS = "endogenous"


class SCM:
    """A structural causal model whose values are batched tensors (Definition 3.1).

    >>> scm = SCM()
    >>> scm.add_exogenous("u")
    >>> scm.add_node("x", parents=["u"], fn=lambda u: 2 * u)
    >>> scm.run({"u": torch.tensor([1.0, 2.0])})["x"]
    tensor([2., 4.])
    >>> scm.run({"u": torch.tensor([1.0, 2.0])}, do={"x": 0.0})["x"]
    tensor([0., 0.])
    """

    def __init__(self) -> None:
        self._structure = nx.DiGraph()
        self._parents: dict[str, tuple[str, ...]] = {}
        self._fns: dict[str, Mechanism] = {}
        self._interventions: dict[str, DoValue] = {}
        self._waiting: dict[str, list[str]] = {}  # undeclared parent -> children listing it

    # ---- building -------------------------------------------------------------------------
    def add_exogenous(self, name: str) -> None:
        """Declare an exogenous node ``name`` (an input, read from the context)."""
        self._declare(name)
        self._structure.add_node(name, kind=_EXOGENOUS)
        self._link(name)

    def add_node(self, name: str, parents: Iterable[str], fn: Mechanism) -> None:
        """Declare an endogenous node ``name = fn(*parents)``.

        ``fn`` receives the parents' values positionally, in ``parents`` order, and must return a
        tensor with the same batch size. Parents may be declared before or after the node; the
        whole graph is checked (every parent exists, no cycle) when the model is run. A node
        listing itself as a parent is a :class:`CycleError` at once; a mechanism whose signature
        cannot take ``len(parents)`` positional arguments is a :class:`MechanismError` at once
        (checked with :func:`inspect.signature` where Python can read one).
        """
        if isinstance(parents, str):
            raise GraphError(f"parents of node {name!r} must be a list of names, not a string")
        parents = tuple(parents)
        self._declare(name)
        if name in parents:
            raise CycleError(f"node {name!r} lists itself as a parent: cycle {name!r} -> {name!r}")
        for p in parents:
            if not isinstance(p, str):
                raise GraphError(f"parent {p!r} of node {name!r} is not a string")
        if not callable(fn):
            raise GraphError(f"mechanism of node {name!r} is not callable: {fn!r}")
        check_arity(name, parents, fn)
        self._structure.add_node(name, kind=_ENDOGENOUS)
        self._parents[name] = parents
        self._fns[name] = fn
        self._link(name)

    def _declare(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise GraphError(f"node names must be non-empty strings, got {name!r}")
        if name in self._structure:
            raise DuplicateNodeError(f"node {name!r} is already declared")

    def _link(self, name: str) -> None:
        """Add the edges between ``name`` and the already declared nodes."""
        for p in self._parents.get(name, ()):
            if p in self._structure:
                self._structure.add_edge(p, name)
            else:
                self._waiting.setdefault(p, []).append(name)
        for child in self._waiting.pop(name, ()):
            self._structure.add_edge(name, child)

    # ---- structure --------------------------------------------------------------------------
    @property
    def graph(self) -> nx.DiGraph:
        """The causal graph, read-only: an edge ``p -> v`` for each parent ``p`` of ``v``.

        For a model made by :meth:`do`, the in-edges of nodes set to a fixed value are removed
        (the graph of ``M_Z``); a soft (callable) intervention keeps them.
        """
        hard = {n for n, v in self._interventions.items() if not callable(v)}
        return nx.subgraph_view(self._structure, filter_edge=lambda _, v: v not in hard)

    @property
    def nodes(self) -> tuple[str, ...]:
        """All node names, in declaration order."""
        return tuple(self._structure.nodes)

    @property
    def exogenous(self) -> tuple[str, ...]:
        """The exogenous nodes ``U``, in declaration order."""
        return tuple(n for n, k in self._structure.nodes(data="kind") if k == _EXOGENOUS)

    @property
    def endogenous(self) -> tuple[str, ...]:
        """The endogenous nodes ``V``, in declaration order."""
        return tuple(n for n, k in self._structure.nodes(data="kind") if k == _ENDOGENOUS)

    @property
    def interventions(self) -> Mapping[str, DoValue]:
        """The interventions built into this model by :meth:`do` (read-only)."""
        return MappingProxyType(self._interventions)

    def parents(self, name: str) -> tuple[str, ...]:
        """The parents of ``name`` in the order its mechanism receives them."""
        self.check_node(name)
        return self._parents.get(name, ())

    def mechanism(self, name: str) -> Mechanism:
        """The mechanism ``f`` of endogenous node ``name``."""
        self.check_node(name, endogenous=True)
        return self._fns[name]

    def is_exogenous(self, name: str) -> bool:
        """Whether ``name`` is an exogenous node."""
        self.check_node(name)
        return self._structure.nodes[name]["kind"] == _EXOGENOUS

    def __contains__(self, name: object) -> bool:
        return name in self._structure

    def __len__(self) -> int:
        return self._structure.number_of_nodes()

    def __repr__(self) -> str:
        do = f", do={sorted(self._interventions)}" if self._interventions else ""
        return f"SCM(exogenous={list(self.exogenous)}, endogenous={list(self.endogenous)}{do})"

    def check_node(self, name: str, *, endogenous: bool = False, role: str = "node") -> None:
        """Raise :class:`UnknownNodeError` unless ``name`` is a node (an endogenous one if asked).

        An exogenous node where an endogenous one is needed is an :class:`InterventionError`.
        """
        if not isinstance(name, str) or name not in self._structure:
            known = ", ".join(map(repr, self.nodes))
            raise UnknownNodeError(f"unknown {role} {name!r}; the model has {known}")
        if endogenous and self._structure.nodes[name]["kind"] == _EXOGENOUS:
            raise InterventionError(
                f"{role} {name!r} is exogenous: its value comes from the context, not from a "
                "mechanism, so it cannot be intervened on or mediate"
            )

    def validate(self) -> list[str]:
        """Check the whole graph and return the evaluation (topological) order.

        Raises :class:`UnknownNodeError` for a parent never declared and :class:`CycleError`
        (listing the cycle) for a directed cycle.
        """
        for child, parents in self._parents.items():
            for p in parents:
                if p not in self._structure:
                    raise UnknownNodeError(f"node {child!r} lists unknown parent {p!r}")
        try:
            return list(nx.topological_sort(self._structure))
        except nx.NetworkXUnfeasible:
            cycle = [u for u, _ in nx.find_cycle(self._structure)]
            path = " -> ".join(map(repr, [*cycle, cycle[0]]))
            raise CycleError(f"the graph has a directed cycle: {path}") from None

    # ---- interventions ----------------------------------------------------------------------
    def do(self, interventions: Mapping[str, DoValue] | None = None, /, **kw: DoValue) -> SCM:
        """The intervened model ``M_Z``: a new :class:`SCM` with ``Z = z'`` built in.

        Give the interventions as keywords (``scm.do(x=0.0)``) or as a mapping for names that
        are not identifiers (``scm.do({"attn.12": 0.0})``). ``self`` is unchanged. A node
        intervened on again (here or in :meth:`run`) takes the newest value.

        >>> scm = SCM(); scm.add_exogenous("u"); scm.add_node("x", ["u"], lambda u: u)
        >>> scm.do(x=0.0).run({"u": torch.ones(2)})["x"]
        tensor([0., 0.])
        """
        new = {**(interventions or {}), **kw}
        self.check_interventions(new)
        out = SCM()
        out._structure = self._structure.copy()
        out._parents = dict(self._parents)
        out._fns = dict(self._fns)
        out._interventions = {**self._interventions, **new}
        out._waiting = {p: list(c) for p, c in self._waiting.items()}
        return out

    def check_interventions(self, do: Mapping[str, DoValue]) -> None:
        """Check intervention targets (known, endogenous) and value types before running."""
        if not isinstance(do, Mapping):
            raise InterventionError(f"do must be a mapping from node names to values, got {do!r}")
        for name, value in do.items():
            self.check_node(name, endogenous=True, role="intervention target")
            check_do_value(name, value)

    # ---- evaluation -------------------------------------------------------------------------
    def run(
        self,
        ctx: Mapping[str, Tensor],
        do: Mapping[str, DoValue] | None = None,
        *,
        check_finite: bool = True,
    ) -> dict[str, Tensor]:
        """Evaluate every node in context ``ctx``: ``{name: v(u | do(...))}``, exogenous included.

        ``ctx`` maps every exogenous node to a tensor ``[B, ...]`` (one batch size ``B``).
        ``do`` maps endogenous nodes to intervention values (see the module docstring); the
        model's own interventions (from :meth:`do`) apply too, ``do`` overriding them. With
        ``check_finite`` a NaN or inf in a computed value raises :class:`NonFiniteError` naming
        the first node (in evaluation order) where it appears.

        >>> scm = SCM(); scm.add_exogenous("u"); scm.add_node("y", ["u"], lambda u: u + 1)
        >>> scm.run({"u": torch.zeros(2)}, do={"y": lambda y: 10 * y})["y"]
        tensor([10., 10.])
        """
        order = self.validate()
        do = {} if do is None else do
        self.check_interventions(do)
        interventions = {**self._interventions, **do}
        batch = check_context(ctx, self.exogenous, self._structure, check_finite)

        values: dict[str, Tensor] = {}
        for name in order:
            if self._structure.nodes[name]["kind"] == _EXOGENOUS:
                values[name] = ctx[name]
                continue
            args = [values[p] for p in self._parents[name]]
            out = call_mechanism(name, self._fns[name], self._parents[name], args)
            batch = check_output(name, out, batch)
            if name in interventions:
                out = apply_do(name, interventions[name], out)
            if check_finite and out.is_floating_point() and not torch.isfinite(out).all():
                bad = int((~torch.isfinite(out)).sum())
                raise NonFiniteError(
                    f"node {name!r} has {bad} non-finite (NaN or inf) entries of {out.numel()}"
                )
            values[name] = out
        return values

    # ---- thin methods over causalnet.effects and causalnet.graph ---------------------------
    def total_effect(
        self,
        x: str,
        y: str,
        ctx: Mapping[str, Tensor],
        value: DoValue | Ablation,
        *,
        seed: int = 0,
        per_draw: bool = False,
    ) -> Tensor:
        """Total effect of ``x`` on ``y`` (Def 3.2, Eqs 14, 17): :func:`effects.total_effect`."""
        from causalnet.effects import total_effect

        return total_effect(self, x, y, ctx, value, seed=seed, per_draw=per_draw)

    def direct_effect(
        self,
        x: str,
        y: str,
        ctx: Mapping[str, Tensor],
        value: DoValue | Ablation,
        *,
        mediators: Iterable[str] | None = None,
        seed: int = 0,
        per_draw: bool = False,
    ) -> Tensor:
        """Direct effect of ``x`` on ``y`` (Def 3.3, Eq 20): :func:`effects.direct_effect`."""
        from causalnet.effects import direct_effect

        return direct_effect(
            self, x, y, ctx, value, mediators=mediators, seed=seed, per_draw=per_draw
        )

    def indirect_effect(
        self,
        x: str,
        y: str,
        ctx: Mapping[str, Tensor],
        value: DoValue | Ablation,
        *,
        mediators: Iterable[str] | None = None,
        seed: int = 0,
        per_draw: bool = False,
    ) -> Tensor:
        """Indirect effect of ``x`` on ``y`` (Def 3.4, Eq 29): :func:`effects.indirect_effect`."""
        from causalnet.effects import indirect_effect

        return indirect_effect(
            self, x, y, ctx, value, mediators=mediators, seed=seed, per_draw=per_draw
        )

    def ancestors(self, name: str) -> set[str]:
        """Nodes with a directed path to ``name``; see :func:`graph.ancestors`."""
        from causalnet.graph import ancestors

        return ancestors(self, name)

    def descendants(self, name: str) -> set[str]:
        """Nodes reachable from ``name``; see :func:`graph.descendants`."""
        from causalnet.graph import descendants

        return descendants(self, name)

    def directed_paths(self, source: str, target: str) -> list[list[str]]:
        """Directed paths from ``source`` to ``target``; see :func:`graph.directed_paths`."""
        from causalnet.graph import directed_paths

        return directed_paths(self, source, target)

    def topological_order(self) -> list[str]:
        """Nodes in an order where parents come first; see :func:`graph.topological_order`."""
        from causalnet.graph import topological_order

        return topological_order(self)

    def draw(self, do: Mapping[str, Any] | None = None, ax: Any = None) -> Any:
        """Draw the graph with interventions marked; see :func:`graph.draw`."""
        from causalnet.graph import draw

        return draw(self, do=do, ax=ax)
