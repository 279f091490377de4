"""The clean run's cache as the final-position replay uses it: frozen, and kept per clean run.

:class:`FrozenCache` hands each replayed block the clean keys and values of the positions
before t (:mod:`causalnet.adapters.replay`); :func:`remember_capture` keeps the capture made
with a clean run (:func:`causalnet.adapters.replay.clean_capture`) for as long as the clean run
lives, so its patches need no forward of their own.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
)

from causalnet.errors import UnsupportedModelError

from . import splitattn


class FrozenCache(Cache):
    """The clean run's cache, frozen: ``update(k, v, layer)`` returns the captured earlier keys
    and values (batch 1, expanded to the rows) followed by the rows' own ``k``, ``v``, and
    stores nothing. Every other attribute is the prefix cache's (as the model saw it)."""

    def __init__(self, base: Any, prefix: dict[int, tuple[Tensor, Tensor]]) -> None:
        self.__dict__["_base"] = base
        self.__dict__["_prefix"] = prefix
        self.__dict__["split"] = False  # leave the prefix to the attention (splitattn.py)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_base"], name)

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kw: Any
    ) -> tuple[Tensor, Tensor]:
        prefix = self.__dict__["_prefix"]
        if layer_idx not in prefix:
            raise UnsupportedModelError(f"attention layer {layer_idx} updated no cache at t")
        k, v = prefix[layer_idx]
        pending = splitattn.PENDING.layers
        if self.__dict__["split"] and pending is not None:
            pending[layer_idx] = (k, v)
            return key_states, value_states
        n = key_states.shape[0]
        return (
            torch.cat([k.expand(n, *k.shape[1:]), key_states], dim=-2),
            torch.cat([v.expand(n, *v.shape[1:]), value_states], dim=-2),
        )


def is_cache(x: Any) -> bool:
    return isinstance(x, Cache)


def check_kv_only(cache: Any) -> None:
    """UnsupportedModelError if ``cache`` holds anything but attention keys/values: a
    convolution or recurrent state (LFM, OLMo-hybrid, Mamba-like layers) is read and written
    in place by each step, so rows replayed at t would share (and overwrite) the clean one."""
    for i, layer in enumerate(getattr(cache, "layers", None) or ()):
        stateful = any(hasattr(layer, a) for a in ("conv_states", "recurrent_states"))
        if stateful or not isinstance(layer, CacheLayerMixin):
            raise UnsupportedModelError(
                f"the cache's layer {i} is a {type(layer).__name__} (a convolution / recurrent "
                "state, not keys and values): the final-position replay cannot freeze it"
            )


#: id(clean run) -> its capture (:func:`remember_capture`)
_CAPTURES: dict[int, Any] = {}


def remember_capture(clean: Any, capture: Any) -> None:
    """Keep ``capture`` (:func:`causalnet.adapters.replay.clean_capture`) with ``clean`` for as
    long as the clean run object lives: its patches then replay without a forward of their
    own."""
    ident = id(clean)
    _CAPTURES[ident] = capture
    weakref.finalize(clean, _CAPTURES.pop, ident, None)


def capture_of(clean: Any) -> Any:
    """The capture :func:`remember_capture` kept for ``clean`` (None if none)."""
    return _CAPTURES.get(id(clean))
