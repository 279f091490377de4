"""A discovered model's own linear layers on the fastest exact kernel, siblings in one product.

Inside :func:`fast_linears` every plain ``nn.Linear`` of the given modules computes
``x W^T + b`` through :func:`causalnet.adapters.kernels.linear` (oneDNN with packed weights for
float32 on a CPU, else ``F.linear``: equal up to float32 rounding). Linear layers that a block
calls one after another on the SAME input tensor -- a Llama's q, k and v projections, its gate
and up projections -- are *siblings*: the first of them computes all their outputs in one
matrix product with their weights stacked, ``x [W_1; W_2; ...]^T + [b_1; b_2; ...]``, and each
sibling returns its own columns of that product. The product is reused only when a sibling is
called with the very tensor object the product was made from, unchanged since (its in-place
version counter); any other input is computed on its own. So grouping can only change speed,
never a value beyond float32 rounding.

Siblings are found by watching one forward (:func:`fast_linears` with ``watch=True``): runs of
consecutive linear calls, inside one block, on one input object. What was seen is kept per
module until the module is freed; stacked weights are rebuilt when a member's weight or bias is
replaced or edited in place. The stacked copy costs memory: the sum of the siblings' weights
(SmolLM2-135M: q, k, v, gate, up of 30 layers, 71M parameters, 283 MB in float32, plus oneDNN's
packed copy of it).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from . import kernels


class Siblings:
    """Linear layers called on one input: their stacked weight and bias, and the last product."""

    def __init__(self, members: list[nn.Linear]) -> None:
        self.members = [weakref.ref(m) for m in members]
        self.bounds: dict[int, tuple[int, int]] = {}
        start = 0
        for m in members:
            self.bounds[id(m)] = (start, start + m.out_features)
            start += m.out_features
        self.key: tuple = ()
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self.last: tuple[Tensor, int, Tensor] | None = None  # (input, its version, product)

    def _stacked(self, mods: list[nn.Linear]) -> tuple[Tensor, Tensor | None]:
        key = tuple(
            (t.data_ptr(), t._version, t.dtype, t.device)
            for m in mods
            for t in (m.weight, m.bias)
            if t is not None
        ) + tuple(m.bias is None for m in mods)
        if key != self.key or self.weight is None:
            with torch.no_grad():
                self.weight = torch.cat([m.weight for m in mods])
                biases = [m.bias for m in mods]
                self.bias = (
                    None
                    if all(b is None for b in biases)
                    else torch.cat(
                        [
                            m.weight.new_zeros(m.out_features) if b is None else b
                            for m, b in zip(mods, biases, strict=True)
                        ]
                    )
                )
            self.key = key
        return self.weight, self.bias

    def output(self, module: nn.Linear, x: Tensor) -> Tensor:
        """``module``'s output on ``x``: its columns of the stacked product on ``x``."""
        last = self.last
        if last is None or last[0] is not x or last[1] != x._version:
            mods = [r() for r in self.members]
            if any(m is None for m in mods):
                return kernels.linear(x, module.weight, module.bias)
            weight, bias = self._stacked(mods)  # type: ignore[arg-type]
            last = (x, x._version, kernels.linear(x, weight, bias))
            self.last = last
        lo, hi = self.bounds[id(module)]
        return last[2][..., lo:hi]

    def forget(self) -> None:
        self.last = None


#: module -> its siblings (only modules that have some), as watched
_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: blocks already watched (no need to watch again)
_WATCHED: weakref.WeakSet = weakref.WeakSet()
_lock = threading.Lock()


def _plain_linears(block: nn.Module) -> list[nn.Linear]:
    return [m for m in block.modules() if type(m) is nn.Linear]


def siblings_of(module: nn.Linear) -> Siblings | None:
    """The siblings :func:`fast_linears` found for ``module`` (None: it has none)."""
    return _GROUPS.get(module)


@contextlib.contextmanager
def fast_linears(blocks: list[nn.Module], watch: bool = False) -> Iterator[None]:
    """Every plain ``nn.Linear`` inside ``blocks`` computes through
    :func:`causalnet.adapters.kernels.linear` while inside, siblings found earlier in one
    stacked product (module docstring); with ``watch`` (and a block not watched before) the
    calls are watched to find the siblings, which later contexts use. The modules' own
    ``forward`` is back on exit."""
    watching = watch and any(b not in _WATCHED for b in blocks)
    calls: list[tuple[int, nn.Linear, Tensor]] = []
    used: list[Siblings] = []
    linears = [(i, m) for i, b in enumerate(blocks) for m in _plain_linears(b)]
    for i, m in linears:
        group = _GROUPS.get(m)
        if watching:
            m.forward = functools.partial(_watched, calls, i, m)
        elif group is not None:
            used.append(group)
            m.forward = functools.partial(group.output, m)
        else:
            m.forward = functools.partial(_kernel_linear, m)
    try:
        yield
    finally:
        for _, m in linears:
            m.__dict__.pop("forward", None)
        for group in used:
            group.forget()
        if watching:
            _learn(calls, blocks)


def _watched(calls: list, block: int, module: nn.Linear, x: Tensor) -> Tensor:
    calls.append((block, module, x))
    return kernels.linear(x, module.weight, module.bias)


def _learn(calls: list[tuple[int, nn.Linear, Tensor]], blocks: list[nn.Module]) -> None:
    """Siblings from watched calls: runs of consecutive calls in one block on one input object,
    each module once, of one dtype and input width; a module called more than once in the
    watched forward is left alone."""
    count: dict[int, int] = {}
    for _, module, _ in calls:
        count[id(module)] = count.get(id(module), 0) + 1
    runs: list[list[nn.Linear]] = []
    prev: tuple[int, nn.Linear, Tensor] | None = None
    for block, module, x in calls:
        same = (
            prev is not None
            and prev[0] == block
            and prev[2] is x
            and module not in runs[-1]
            and module.weight.dtype == runs[-1][0].weight.dtype
            and module.in_features == runs[-1][0].in_features
        )
        if same:
            runs[-1].append(module)
        else:
            runs.append([module])
        prev = (block, module, x)
    with _lock:
        seen: set[int] = set()
        for run in runs:
            if len(run) < 2 or any(count[id(m)] > 1 or id(m) in seen or m in _GROUPS for m in run):
                continue
            seen.update(id(m) for m in run)
            group = Siblings(run)
            for m in run:
                _GROUPS[m] = group
        for b in blocks:
            _WATCHED.add(b)


def _kernel_linear(module: nn.Linear, x: Tensor) -> Tensor:
    return kernels.linear(x, module.weight, module.bias)
