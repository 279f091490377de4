"""Total, direct and indirect effects in a structural causal model (paper Section 3.1).

All effects are taken in each context ``u`` of the batch, relative to the natural run, for an
intervention ``do(X = x')`` on an endogenous node ``X`` and an outcome node ``Y``:

- total effect     TE = Y(u | do(X = x'))               - Y(u)   (Def 3.2, Eqs 14, 17)
- direct effect    DE = Y(u | do(X = x', M = m(u)))     - Y(u)   (Def 3.3, Eqs 19, 20)
- indirect effect  IE = Y(u | do(X = x(u), M = m~))     - Y(u)   (Def 3.4, Eq 29)
                   with m~ = M(u | do(X = x')).

``M`` (the mediators) is every endogenous node except ``X`` and ``Y`` unless given. In nonlinear
models ``TE != DE + IE`` in general.

``value`` (the ``x'``) is anything :meth:`SCM.run` accepts as a do value (a number, a tensor of
the node's full or trailing shape, a callable ``g(natural)``) or an ablation distribution from
:mod:`causalnet.ablations` (Appendix A). For an ablation with ``n`` draws the effect is the
Monte-Carlo mean over the draws (Eq 39), ``(1/n) sum_k [Y(u | do(X = x~_k), ...) - Y(u)]``;
the draws are seeded by ``seed`` and evaluated in one batched run (the context tiled ``n``
times). ``per_draw=True`` returns the ``[n, B, ...]`` per-draw effects instead of their mean
(``[1, B, ...]`` for a deterministic value).

Interventions already built into the model (:meth:`SCM.do`) stay in force in every run. A
callable value, or a callable built into the model, is applied to the tiled batch ``[n*B, ...]``
when an ablation has several draws, so it should act on each context independently.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from causalnet.ablations import Ablation
from causalnet.errors import InterventionError, ShapeError
from causalnet.scm import SCM, DoValue

__all__ = ["total_effect", "direct_effect", "indirect_effect"]


@dataclass
class _Setup:
    """What every effect needs: the natural run, the tiled context and the x' values."""

    natural: dict[str, Tensor]
    n_draws: int
    batch: int
    ctx: dict[str, Tensor]  # the context tiled n_draws times: row k*B + b is context b
    x_value: DoValue  # the do value of x for the tiled batch
    base_do: dict[str, DoValue]  # the model's own interventions, for the tiled batch
    mediators: list[str]

    def tile(self, t: Tensor) -> Tensor:
        return _tile(t, self.n_draws)

    def effect(self, y_after: Tensor, y: str, per_draw: bool) -> Tensor:
        d = y_after.unflatten(0, (self.n_draws, self.batch)) - self.natural[y]
        return d if per_draw else d.mean(0)


def _setup(
    scm: SCM,
    x: str,
    y: str,
    ctx: Mapping[str, Tensor],
    value: DoValue | Ablation,
    mediators: Iterable[str] | None,
    seed: int,
) -> _Setup:
    scm.validate()
    scm.check_node(x, endogenous=True, role="intervened node")
    scm.check_node(y, role="outcome node")
    if x == y:
        raise InterventionError(f"the intervened node and the outcome are both {x!r}")
    if not isinstance(value, Ablation):
        scm.check_interventions({x: value})
    if mediators is None:
        meds = [v for v in scm.endogenous if v not in (x, y)]
    else:
        if isinstance(mediators, str):
            raise InterventionError(f"mediators must be a list of names, not {mediators!r}")
        meds = list(dict.fromkeys(mediators))
        for m in meds:
            scm.check_node(m, endogenous=True, role="mediator")
            if m in (x, y):
                raise InterventionError(
                    f"mediator {m!r} is the intervened node or the outcome; M excludes both"
                )

    natural = scm.run(ctx)
    nat_x = natural[x]
    batch = nat_x.shape[0]
    if isinstance(value, Ablation):
        generator = torch.Generator(device=nat_x.device).manual_seed(seed)
        draws = value.sample(nat_x, generator, node=x)
        if draws.dim() != nat_x.dim() + 1 or draws.shape[1:] != nat_x.shape:
            raise ShapeError(
                f"{value!r} drew shape {tuple(draws.shape)} for node {x!r}; expected "
                f"[n_draws, {', '.join(map(str, nat_x.shape))}]"
            )
        n_draws, x_value = draws.shape[0], draws.flatten(0, 1)
    else:
        n_draws, x_value = 1, value
    base_do = {  # fixed values are tiled; callables apply to the tiled batch as it is
        n: (v if callable(v) and not isinstance(v, Tensor) else _tile(natural[n], n_draws))
        for n, v in scm.interventions.items()
    }
    tiled_ctx = {u: _tile(t, n_draws) for u, t in ctx.items()}
    return _Setup(natural, n_draws, batch, tiled_ctx, x_value, base_do, meds)


def _tile(t: Tensor, n: int) -> Tensor:
    """Repeat ``t`` ``n`` times along the batch: row ``k*B + b`` is row ``b``."""
    return t if n == 1 else t.repeat(n, *([1] * (t.dim() - 1)))


def total_effect(
    scm: SCM,
    x: str,
    y: str,
    ctx: Mapping[str, Tensor],
    value: DoValue | Ablation,
    *,
    seed: int = 0,
    per_draw: bool = False,
) -> Tensor:
    """Total effect of ``do(X = x')`` on ``Y`` in each context (Def 3.2, Eqs 14, 17).

    ``TE(x(u) -> x', Y, u) = Y(u | do(X = x')) - Y(u)``: the change propagates along every
    path. Under an ablation distribution this is the ablation impact of Eq 12 / Eq 18, averaged
    over draws (Eq 39). Returns a tensor of ``Y``'s shape (``[n_draws, *Y.shape]`` with
    ``per_draw``).

    >>> scm = SCM(); scm.add_exogenous("u")
    >>> scm.add_node("x", ["u"], lambda u: u); scm.add_node("y", ["x"], lambda x: 3 * x)
    >>> total_effect(scm, "x", "y", {"u": torch.tensor([1.0, 2.0])}, value=0.0)
    tensor([-3., -6.])
    """
    s = _setup(scm, x, y, ctx, value, None, seed)
    after = scm.run(s.ctx, do={**s.base_do, x: s.x_value})
    return s.effect(after[y], y, per_draw)


def direct_effect(
    scm: SCM,
    x: str,
    y: str,
    ctx: Mapping[str, Tensor],
    value: DoValue | Ablation,
    *,
    mediators: Iterable[str] | None = None,
    seed: int = 0,
    per_draw: bool = False,
) -> Tensor:
    """Direct effect of ``do(X = x')`` on ``Y``, mediators held fixed (Def 3.3, Eq 20).

    ``DE(x(u) -> x', Y, u) = Y(u | do(X = x', M = m(u))) - Y(u)``: every mediator in ``M``
    (default: all endogenous nodes but ``X`` and ``Y``) is held at its natural value, so only
    paths from ``X`` to ``Y`` avoiding ``M`` carry the change (with the default, the edge
    ``X -> Y`` alone).

    >>> scm = SCM(); scm.add_exogenous("u"); scm.add_node("x", ["u"], lambda u: u)
    >>> scm.add_node("m", ["x"], lambda x: -x); scm.add_node("y", ["x", "m"], lambda x, m: x + m)
    >>> direct_effect(scm, "x", "y", {"u": torch.tensor([1.0, 2.0])}, value=0.0)
    tensor([-1., -2.])
    """
    s = _setup(scm, x, y, ctx, value, mediators, seed)
    held = {m: s.tile(s.natural[m]) for m in s.mediators}
    after = scm.run(s.ctx, do={**s.base_do, **held, x: s.x_value})
    return s.effect(after[y], y, per_draw)


def indirect_effect(
    scm: SCM,
    x: str,
    y: str,
    ctx: Mapping[str, Tensor],
    value: DoValue | Ablation,
    *,
    mediators: Iterable[str] | None = None,
    seed: int = 0,
    per_draw: bool = False,
) -> Tensor:
    """Indirect effect of ``do(X = x')`` on ``Y`` through the mediators (Def 3.4, Eq 29).

    ``IE(x(u) -> x', Y, u) = Y(u | do(X = x(u), M = m~)) - Y(u)`` with
    ``m~ = M(u | do(X = x'))``: ``X`` keeps its natural value and the mediators ``M`` (default:
    all endogenous nodes but ``X`` and ``Y``) are switched to the values they take under the
    intervention, each draw with its own ``m~``.

    >>> scm = SCM(); scm.add_exogenous("u"); scm.add_node("x", ["u"], lambda u: u)
    >>> scm.add_node("m", ["x"], lambda x: -x); scm.add_node("y", ["x", "m"], lambda x, m: x + m)
    >>> indirect_effect(scm, "x", "y", {"u": torch.tensor([1.0, 2.0])}, value=0.0)
    tensor([1., 2.])
    """
    s = _setup(scm, x, y, ctx, value, mediators, seed)
    switched = scm.run(s.ctx, do={**s.base_do, x: s.x_value})
    kept = s.tile(s.natural[x])
    after = scm.run(s.ctx, do={**s.base_do, **{m: switched[m] for m in s.mediators}, x: kept})
    return s.effect(after[y], y, per_draw)
