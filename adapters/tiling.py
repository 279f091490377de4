"""How a replayed block's captured arguments scale from one row to n rows.

A block's arguments at t are captured at batch 1 and batch 2 (:mod:`causalnet.adapters.replay`);
:func:`mode` compares the two to find, per tensor, whether it broadcasts (``"same"``) or is
tiled along its first dimension (``"expand"`` / ``"repeat"``), and :func:`tile` applies that to
n rows. :data:`HIDDEN` and :data:`CACHE` stand for the block's hidden-state input and the cache
in a captured argument list: :func:`mark` puts the cache's placeholder in, :func:`fill` puts the
rows' hidden state and cache back.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from causalnet.errors import UnsupportedModelError

from .hooks import rel_err, tolerance

HIDDEN = object()  # where a block's hidden-state input goes in its captured arguments
CACHE = object()  # where the cache goes


def mark(x: Any, live: Any) -> Any:
    """``x`` with the live cache object replaced by :data:`CACHE` (in tuples, lists, dicts)."""
    if x is live:
        return CACHE
    if isinstance(x, (tuple, list)):
        return type(x)(mark(y, live) for y in x)
    if isinstance(x, dict):
        return {k: mark(y, live) for k, y in x.items()}
    return x


def fill(x: Any, hidden: Any, cache: Any) -> Any:
    """``x`` with :data:`HIDDEN` replaced by ``hidden`` and :data:`CACHE` by ``cache`` (in
    tuples, lists, dicts): a captured call made again on the rows."""
    if x is HIDDEN:
        return hidden
    if x is CACHE:
        return cache
    if isinstance(x, (tuple, list)):
        return type(x)(fill(y, hidden, cache) for y in x)
    if isinstance(x, dict):
        return {k: fill(y, hidden, cache) for k, y in x.items()}
    return x


def mode(x1: Any, x2: Any, where: str) -> Any:
    """How a captured argument scales to n rows, from its captures at batch 1 (``x1``) and 2
    (``x2``): per tensor ``"same"`` (broadcasts), ``"expand"`` / ``"repeat"`` (tiled along its
    first dimension); nested as ``x1`` is. UnsupportedModelError for anything else."""
    if x1 is HIDDEN or x1 is CACHE:
        if x2 is not x1:
            raise UnsupportedModelError(f"{where}: the arguments differ between batch sizes")
        return "same"
    if isinstance(x1, Tensor):
        if not isinstance(x2, Tensor):
            raise UnsupportedModelError(f"{where}: a tensor at batch 1 only")
        tol = tolerance(x1.dtype) if x1.is_floating_point() else 0.0
        if x1.shape == x2.shape:
            if rel_err(x2, x1) > tol:
                raise UnsupportedModelError(f"{where} {tuple(x1.shape)} depends on the batch")
            return "same"
        reps = (2,) + (1,) * (x1.ndim - 1)
        if x1.ndim and x2.shape[1:] == x1.shape[1:] and rel_err(x2, x1.repeat(*reps)) <= tol:
            return "expand" if x1.shape[0] == 1 else "repeat"
        raise UnsupportedModelError(
            f"{where} has shape {tuple(x1.shape)} at batch 1 and {tuple(x2.shape)} at batch 2"
        )
    if isinstance(x1, (tuple, list)) and type(x2) is type(x1) and len(x1) == len(x2):
        return [mode(a, b, f"{where}[{i}]") for i, (a, b) in enumerate(zip(x1, x2, strict=True))]
    if isinstance(x1, dict) and isinstance(x2, dict) and x1.keys() == x2.keys():
        return {k: mode(x1[k], x2[k], f"{where}.{k}") for k in x1}
    if type(x1) is not type(x2) or (isinstance(x1, (int, float, str, bool)) and x1 != x2):
        raise UnsupportedModelError(f"{where}: {x1!r} at batch 1, {x2!r} at batch 2")
    return "same"


def block_modes(
    names: list[str], one: tuple[list, list], two: tuple[list, list]
) -> list[tuple[Any, Any]]:
    """Per block, the :func:`mode` of its arguments and of its keywords, from the blocks'
    (args, kwargs) captured at batch 1 (``one``) and batch 2 (``two``)."""
    return [
        (mode(a1, a2, f"block {names[i]} argument"), mode(k1, k2, f"block {names[i]} keyword"))
        for i, (a1, k1, a2, k2) in enumerate(zip(*one, *two, strict=True))
    ]


def tile(x: Any, mode: Any, n: int) -> Any:
    """``x`` (captured at batch 1) for n rows as ``mode`` (:func:`mode`) says."""
    if isinstance(mode, list):
        return type(x)(tile(y, m, n) for y, m in zip(x, mode, strict=True))
    if isinstance(mode, dict):
        return {k: tile(x[k], mode[k], n) for k in x}
    if mode == "expand":
        return x.expand(n, *x.shape[1:])
    if mode == "repeat":
        return x.repeat(n, *(1,) * (x.ndim - 1))
    return x


def signature(x: Any) -> Any:
    """The structure of a captured argument (hashable): types, and per tensor its dtype, number
    of dimensions and first dimension (what tiling depends on; lengths that follow the prompt's
    are left out, so one structure serves every prompt length)."""
    if isinstance(x, Tensor):
        return ("T", x.ndim, x.shape[0] if x.ndim else None, x.dtype)
    if isinstance(x, (tuple, list)):
        return (type(x).__name__, tuple(signature(y) for y in x))
    if isinstance(x, dict):
        return ("dict", tuple((k, signature(y)) for k, y in x.items()))
    if isinstance(x, (int, float, str, bool)) or x is None:
        return ("v", x)
    return (type(x).__name__,)
