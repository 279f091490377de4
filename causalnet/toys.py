"""The paper's toy models of erasure and self-repair (Section 3.3, Eqs 30-32).

Both are the causal model ``x(u) = u``, ``y = x + f(x, u)`` (Eq 30) with one exogenous node
``u`` and endogenous nodes ``x``, ``f``, ``y``. ``f`` is a node of its own, so that the direct
effect of ``x`` on ``y`` (``f`` held at its natural value ``f(u)``) is defined.

Under the ablation ``do(x = 0)`` both keep ``y`` unchanged: the total effect on ``y`` is 0,
although the direct effect is ``-u``; the compensation ``TE - DE = +u`` is what the rest of the
model does to undo the ablation (the Hydra effect in miniature).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from causalnet.scm import SCM

__all__ = ["erasure", "self_repair"]


def _toy(f: Callable[[Tensor, Tensor], Tensor]) -> SCM:
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("x", parents=["u"], fn=lambda u: u)
    scm.add_node("f", parents=["x", "u"], fn=f)
    scm.add_node("y", parents=["x", "f"], fn=lambda x, f: x + f)
    return scm


def _erase(x: Tensor, u: Tensor) -> Tensor:
    return -x


def _repair(x: Tensor, u: Tensor) -> Tensor:
    return torch.where(x == u, torch.zeros_like(u), u)


def erasure() -> SCM:
    """Erasure, Eq 31: ``f(x, u) = -x``, so ``y = x - x = 0`` whatever ``x`` is.

    ``y`` is clamped to 0 under any intervention ``do(x = x')``. Under ``do(x = 0)``:
    TE = 0, DE = -u, IE = +u, compensation TE - DE = +u.

    >>> scm = erasure()
    >>> scm.run({"u": torch.tensor([2.0])}, do={"x": 5.0})["y"]
    tensor([0.])
    """
    return _toy(_erase)


def self_repair() -> SCM:
    """Self-repair, Eq 32: ``f(x, u) = 0 if x == u else u``.

    Naturally ``f = 0`` and ``y = u``. Under the ablation ``do(x = 0)`` (with ``u != 0``),
    ``f`` switches on and ``y = 0 + u = u``: ``y`` is kept at ``u``, TE = 0, DE = -u,
    IE = +u, compensation +u. For a general ``x' != u`` Eq 32 gives ``y = x' + u``, so
    "keeps ``y`` at ``u``" holds for the ablation ``x' = 0``, not for every ``x'``.

    >>> scm = self_repair()
    >>> scm.run({"u": torch.tensor([2.0])}, do={"x": 0.0})["y"]
    tensor([2.])
    """
    return _toy(_repair)
