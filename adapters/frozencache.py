"""The clean run's cache as the final-position replay uses it: frozen, and kept per clean run.

:class:`FrozenCache` hands each replayed block the clean keys and values of the positions
before t (:mod:`causalnet.adapters.replay`); :func:`prefix_cache` cuts the cache of a clean
forward over 0..t back to 0..t-1, and :func:`remember_prefix` keeps it with its clean run, so
the replay needs no forward of the prefix of its own.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicLayer,
    DynamicSlidingWindowLayer,
)

from causalnet.errors import UnsupportedModelError


class FrozenCache(Cache):
    """The clean run's cache, frozen: ``update(k, v, layer)`` returns the captured earlier keys
    and values (batch 1, expanded to the rows) followed by the rows' own ``k``, ``v``, and
    stores nothing; ``update_indexer(k, layer)`` likewise for a sparse-attention indexer's keys
    (sequence on dimension 1). Every other attribute is the prefix cache's (as the model saw
    it); its other ``update_*`` methods are refused."""

    def __init__(
        self,
        base: Any,
        prefix: dict[int, tuple[Tensor, Tensor]],
        indexer: dict[int, Tensor] | None = None,
    ) -> None:
        self.__dict__["_base"] = base
        self.__dict__["_prefix"] = prefix
        self.__dict__["_indexer"] = indexer or {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("update_"):  # another state the model writes at t (e.g. an indexer)
            _refuse_update(name)
        return getattr(self.__dict__["_base"], name)

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kw: Any
    ) -> tuple[Tensor, Tensor]:
        prefix = self.__dict__["_prefix"]
        if layer_idx not in prefix:
            raise UnsupportedModelError(f"attention layer {layer_idx} updated no cache at t")
        k, v = prefix[layer_idx]
        n = key_states.shape[0]
        return (
            torch.cat([k.expand(n, *k.shape[1:]), key_states], dim=-2),
            torch.cat([v.expand(n, *v.shape[1:]), value_states], dim=-2),
        )

    def update_indexer(self, key_states: Tensor, layer_idx: int) -> Tensor:
        indexer = self.__dict__["_indexer"]
        if layer_idx not in indexer:
            _refuse_update("update_indexer")
        k = indexer[layer_idx]
        return torch.cat([k.expand(key_states.shape[0], *k.shape[1:]), key_states], dim=1)


def _refuse_update(name: str) -> None:
    raise UnsupportedModelError(
        f"the model calls its cache's {name}: a state besides keys and values that each step "
        "extends (e.g. a sparse-attention indexer's keys), which the final-position replay does "
        "not freeze"
    )


def _refusing(name: str) -> Any:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        _refuse_update(name)

    return method


# the cache class's other update methods would extend the frozen clean cache in place: refused
for _name in [n for n in dir(Cache) if n.startswith("update_") and n not in vars(FrozenCache)]:
    setattr(FrozenCache, _name, _refusing(_name))


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


def prefix_cache(cache: Any, t: int) -> Any:
    """The model's cache of a clean forward over positions 0..t cut back to 0..t-1 (in place),
    or None where it cannot be cut exactly: no cache, t = 0, or a layer that is not a plain
    key/value layer holding all t + 1 positions (a sliding-window layer past its window, a
    convolution or recurrent state). :func:`capture` then runs the model on the prefix itself."""
    if t == 0 or not is_cache(cache):
        return None
    layers = getattr(cache, "layers", None) or ()
    for layer in layers:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            return None
        keys = getattr(layer, "keys", None)
        if not isinstance(keys, Tensor) or keys.shape[-2] != t + 1:
            return None
        window = getattr(layer, "sliding_window", None)
        if window is not None and t + 1 >= window:
            return None
    if not layers:
        return None
    cache.crop(-1)
    return cache


#: id(clean run) -> the model's cache of its earlier positions (:func:`remember_prefix`)
_PREFIXES: dict[int, Any] = {}


def remember_prefix(clean: Any, cache: Any) -> None:
    """Keep ``cache`` (:func:`prefix_cache`, or None) as ``clean``'s earlier keys and values for
    as long as the clean run object lives: :func:`block_calls` then skips the prefix forward."""
    if cache is None:
        return
    ident = id(clean)
    _PREFIXES[ident] = cache
    weakref.finalize(clean, _PREFIXES.pop, ident, None)


def prefix_of(clean: Any) -> Any:
    """The cache :func:`remember_prefix` kept for ``clean`` (None if none)."""
    return _PREFIXES.get(id(clean))
