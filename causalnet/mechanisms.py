"""What flows through an :class:`~causalnet.scm.SCM`, checked: mechanisms, contexts, interventions.

Plain functions the engine (:mod:`causalnet.scm`) calls while building and running a model:

- :func:`check_arity`: a mechanism can take one positional argument per parent (when added);
- :func:`check_context`: a context gives a batched tensor for every exogenous node, one batch size;
- :func:`call_mechanism` and :func:`check_output`: a mechanism's failure named by its node, and
  its output a tensor with the context's batch size;
- :func:`check_do_value` and :func:`apply_do`: an intervention value's type, and the value a
  node takes under ``do(Z = z')`` (a number, a tensor of the full or trailing shape, or a
  callable on the natural value; see the :mod:`causalnet.scm` module docstring).

Every refusal is one of :mod:`causalnet.errors`, naming the node.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from causalnet.errors import (
    CausalNetError,
    ContextError,
    InterventionError,
    MechanismError,
    NonFiniteError,
    ShapeError,
    UnknownNodeError,
)

Mechanism = Callable[..., Tensor]
#: What ``do`` accepts for one node: a number, a tensor ([B, ...] or trailing shape) or a callable.
DoValue = numbers.Number | Tensor | Callable[[Tensor], Tensor]


def check_arity(name: str, parents: tuple[str, ...], fn: Mechanism) -> None:
    """MechanismError unless ``fn`` can be called with one positional argument per parent."""
    try:  # a module's __call__ takes anything: its forward's signature is the one to check
        signature = inspect.signature(fn.forward if isinstance(fn, torch.nn.Module) else fn)
    except (TypeError, ValueError):  # no readable signature (some builtins): checked when run
        return
    try:
        signature.bind(*parents)
    except TypeError as err:
        raise MechanismError(
            f"the mechanism of node {name!r} cannot take its {len(parents)} parent(s) "
            f"{list(parents)} as positional arguments: its signature is {signature} ({err})"
        ) from err


def check_context(
    ctx: Mapping[str, Tensor],
    exogenous: Sequence[str],
    nodes: Container[str],
    check_finite: bool,
) -> int | None:
    """Check a context against a model with these ``exogenous`` nodes (in declaration order)
    among ``nodes``; return its batch size (None when the model has no exogenous node)."""
    if not isinstance(ctx, Mapping):
        raise ContextError(f"the context must be a mapping {{name: tensor}}, got {ctx!r}")
    for name in ctx:
        if name not in nodes:
            raise UnknownNodeError(f"the context gives a value for unknown node {name!r}")
        if name not in exogenous:
            raise ContextError(
                f"the context gives a value for endogenous node {name!r}; set it with do= instead"
            )
    sizes: dict[str, int] = {}
    for name in exogenous:
        if name not in ctx:
            raise ContextError(f"the context has no value for exogenous node {name!r}")
        value = ctx[name]
        if not isinstance(value, Tensor):
            raise ContextError(
                f"context value of {name!r} must be a torch.Tensor, got {type(value).__name__}"
            )
        if value.dim() == 0:
            raise ContextError(
                f"context value of {name!r} is a scalar; it needs a batch dimension [B, ...]"
            )
        if check_finite and value.is_floating_point() and not torch.isfinite(value).all():
            raise NonFiniteError(f"context value of exogenous node {name!r} has NaN or inf")
        sizes[name] = value.shape[0]
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{n}: {b}" for n, b in sizes.items())
        raise ContextError(f"the context's batch sizes differ ({listed})")
    return next(iter(sizes.values()), None)


def call_mechanism(name: str, fn: Mechanism, parents: tuple[str, ...], args: list[Any]) -> Any:
    """``fn(*args)``; an exception it raises becomes a MechanismError naming node ``name`` and
    its parents' shapes (one of ours already is passed on with a note naming the node)."""
    try:
        return fn(*args)
    except CausalNetError as e:  # already one of ours (a nested model, an intervention)
        e.add_note(f"(raised by the mechanism of node {name!r})")
        raise
    except Exception as e:
        inputs = ", ".join(
            f"{p}: {tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__}"
            for p, a in zip(parents, args, strict=True)
        )
        raise MechanismError(
            f"the mechanism of node {name!r} raised {type(e).__name__}: {e} "
            f"(its parents' shapes: {inputs or 'no parents'})"
        ) from e


def check_output(name: str, out: Any, batch: int | None) -> int:
    """Check a mechanism's output is a tensor with the batch size; return the batch size."""
    if not isinstance(out, Tensor):
        raise ShapeError(
            f"mechanism of node {name!r} returned {type(out).__name__}, expected a torch.Tensor"
        )
    if out.dim() == 0:
        raise ShapeError(
            f"mechanism of node {name!r} returned a scalar; it must return [B, ...] with B the "
            f"batch size{'' if batch is None else f' ({batch})'}"
        )
    if batch is not None and out.shape[0] != batch:
        raise ShapeError(
            f"mechanism of node {name!r} returned batch size {out.shape[0]} "
            f"(shape {tuple(out.shape)}), expected {batch}"
        )
    return out.shape[0]


def check_do_value(name: str, value: Any) -> None:
    """InterventionError unless ``value`` is a number, a tensor or a callable."""
    if not (isinstance(value, (numbers.Number, Tensor)) or callable(value)):
        hint = (
            "; an ablation distribution is a value for the effect functions "
            "(total_effect, ...), which average over its draws"
            if hasattr(value, "n_draws") and hasattr(value, "sample")
            else ""
        )
        raise InterventionError(
            f"do value for node {name!r} must be a number, a tensor or a callable, "
            f"got {type(value).__name__}{hint}"
        )


def apply_do(name: str, value: DoValue, natural: Tensor) -> Tensor:
    """The value node ``name`` takes under ``do(name = value)``, given its natural value."""
    shape = tuple(natural.shape)
    if callable(value) and not isinstance(value, Tensor):
        out = value(natural)
        if not isinstance(out, Tensor):
            raise ShapeError(
                f"soft intervention on node {name!r} returned {type(out).__name__}, "
                "expected a torch.Tensor"
            )
        if tuple(out.shape) != shape:
            raise ShapeError(
                f"soft intervention on node {name!r} returned shape {tuple(out.shape)}, "
                f"expected the node's shape {shape}"
            )
        return out
    if isinstance(value, numbers.Number):
        return torch.full_like(natural, value)
    value = value.to(dtype=natural.dtype, device=natural.device)
    if value.dim() == 0 or tuple(value.shape) == shape[1:]:
        return value.expand(shape).clone()
    if tuple(value.shape) == shape:
        return value
    raise ShapeError(
        f"do value for node {name!r} has shape {tuple(value.shape)}; expected the node's shape "
        f"{shape} or its trailing shape {shape[1:]} (broadcast over the batch)"
    )
