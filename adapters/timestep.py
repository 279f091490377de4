"""Mamba2-style mixers whose full-sequence scan clamps the time step and whose single step not.

transformers' Mamba2-style mixers (Zamba2, Nemotron-H, ...) compute each head's time step
``dt = softplus(in_proj(x)[..., -H:] + dt_bias)`` (the input projection's columns are
``[gate, x, B, C, dt]``) and clamp it to ``time_step_limit`` in their full-sequence scan -- the
clean run, the hooked re-forward and the oracle -- but not in their single cached step, which the
fast replay runs. Where ``low <= dt <= high`` the clamp is the identity and the two compute one
function; elsewhere they differ.

So the replay runs guarded (:func:`guard`): a hook on each such mixer's input projection reads
the replayed rows' time steps as the step computes them (the same ``softplus`` of the same
sum) and raises :class:`ClampBinds` if any falls outside the limit; the adapter then patches
that call by the exact hooked re-forward (:meth:`causalnet.adapters.generic.GenericAdapter.patch`
counts these in ``clamp_fallbacks``). The fast checks' probe runs with the clamps lifted
(:func:`lifted`): it tests the replay's machinery (cache, arguments, row batching), the guard
covers the clamp, and a probe whose time steps the scan would clamp does not refuse the model.
A mixer that clamps but whose time step cannot be read there (its projection is not laid out
as above) is named by :func:`step_mismatch` and the fast path is refused, as before.

>>> from causalnet.adapters.tiny_configs import tiny_model
>>> [(c.name, c.low) for c in clamps(tiny_model("zamba2"))[0]][:1]
[('model.layers.0.mamba', 0.001)]
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from causalnet.errors import UnsupportedModelError

from .hooks import HookSet

__all__ = ["Clamp", "ClampBinds", "check_guards", "clamps", "guard", "lifted", "step_mismatch"]


class ClampBinds(UnsupportedModelError):
    """A replayed row's time step fell outside a mixer's ``time_step_limit``: there the
    full-sequence scan clamps it and the single step does not (module docstring)."""


@dataclass(frozen=True)
class Clamp:
    """A mixer (``name`` in the model) whose scan clamps its time step to [low, high]."""

    name: str
    mixer: nn.Module
    low: float
    high: float


def _unreadable(mixer: nn.Module) -> str | None:
    """Why the time step cannot be read from ``mixer.in_proj``'s last ``num_heads`` columns."""
    try:
        heads = int(mixer.num_heads)
        width = 2 * mixer.intermediate_size + 2 * mixer.n_groups * mixer.ssm_state_size + heads
    except (AttributeError, TypeError):
        return (
            "its time step's place is not known (no num_heads, intermediate_size, n_groups, "
            "ssm_state_size)"
        )
    proj, bias = getattr(mixer, "in_proj", None), getattr(mixer, "dt_bias", None)
    if not isinstance(proj, nn.Linear) or proj.out_features != width:
        return f"its in_proj is not an nn.Linear of {width} outputs [gate, x, B, C, dt]"
    if not isinstance(bias, Tensor) or tuple(bias.shape) != (heads,):
        return f"its dt_bias is not [{heads}]"
    return None


def clamps(model: nn.Module) -> tuple[list[Clamp], str | None]:
    """(every mixer whose scan clamps its time step, None), or ([], why) where one clamps and
    its time step cannot be read from its input projection."""
    found: list[Clamp] = []
    for name, module in model.named_modules():
        limit = getattr(module, "time_step_limit", None)
        if not (isinstance(limit, (tuple, list)) and len(limit) == 2):
            continue
        low, high = float(limit[0]), float(limit[1])
        if low <= 0.0 and high == math.inf:  # softplus >= 0: the clamp is the identity
            continue
        why = _unreadable(module)
        if why is not None:
            return [], (
                f"the mixer {name} clamps its time step to time_step_limit={tuple(limit)} in "
                "its full-sequence scan but not in its single cached step (transformers' "
                f"Mamba2-style step takes no dt_limit), and {why}: the step cannot be guarded"
            )
        found.append(Clamp(name, module, low, high))
    return found, None


def step_mismatch(model: nn.Module) -> str | None:
    """Why the model's single cached step is not the function its full forward computes and
    cannot be guarded into it, where known; None otherwise."""
    return clamps(model)[1]


def guard(hooks: HookSet, found: list[Clamp]) -> dict[str, nn.Module]:
    """Hooks (in ``hooks``) raising :class:`ClampBinds` when a row's time step at a clamped
    mixer falls outside its limit; returns each hook's key -> its mixer (the caller checks that
    every guard on a mixer that ran fired)."""
    keys: dict[str, nn.Module] = {}
    for c in found:

        def check(module: nn.Module, args: tuple, output: Any, c: Clamp = c) -> None:
            heads = int(c.mixer.num_heads)
            dt = F.softplus(output[..., -heads:] + c.mixer.dt_bias.to(output.dtype))
            if bool((dt < c.low).any()) or bool((dt > c.high).any()):
                raise ClampBinds(
                    f"a replayed row's time step at the mixer {c.name} is outside "
                    f"time_step_limit=({c.low:g}, {c.high:g}), where the full-sequence scan "
                    "clamps it and the single step does not"
                )

        key = f"time_step.{c.name}"
        hooks.post(c.mixer.in_proj, key, check)
        keys[key] = c.mixer
    return keys


def check_guards(hooks: HookSet, guarded: dict[str, nn.Module], blocks: list[nn.Module]) -> None:
    """Raise (:meth:`HookSet.check`) naming a guard of :func:`guard` that did not fire on a
    mixer inside one of ``blocks`` (the blocks the replay ran): a guard that never reads a time
    step would let a clamped row through unseen."""
    inside = {id(m) for block in blocks for m in block.modules()}
    hooks.check([key for key, mixer in guarded.items() if id(mixer) in inside])


@contextlib.contextmanager
def lifted(found: list[Clamp]) -> Iterator[None]:
    """Within: every clamped mixer's ``time_step_limit`` is (0, inf), so its scan and its step
    compute one function (the fast checks' probe runs so); restored on exit, also on error."""
    before = [(c.mixer, c.mixer.time_step_limit) for c in found]
    try:
        for c in found:
            c.mixer.time_step_limit = (0.0, math.inf)
        yield
    finally:
        for mixer, limit in before:
            mixer.time_step_limit = limit
