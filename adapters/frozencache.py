"""The clean run's cache as the final-position replay uses it: frozen, and kept per clean run.

:class:`FrozenCache` hands each replayed block the clean keys and values of the positions
before t (:mod:`causalnet.adapters.replay`); :func:`prefix_caches` cuts each prompt's cache of
positions 0..t-1 from the cache of a clean forward, and :func:`remember_prefix` keeps it with
its clean run, so the replay needs no forward of the prefix of its own.

A hybrid's linear-attention / convolution / state-space layers (transformers'
``LinearAttentionCacheLayerMixin``: a Qwen3-Next gated delta net, an LFM short convolution, a
Jamba or Bamba Mamba layer) keep states, not keys: the state after t - 1 is everything such a
layer reads of the earlier positions, and each step updates it in place. Before block l runs on
n rows, :meth:`FrozenCache.rows` gives layer l a copy of its clean states expanded to the n
rows, which the model's own step then reads and updates through the cache's own methods
(``get_conv_state``, ``update_conv_state``, ``update_recurrent_state``): each row its own.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionCacheLayerMixin,
)

from causalnet.errors import UnsupportedModelError

from .rowattention import prefixed


class FrozenCache(Cache):
    """The clean run's cache, frozen: ``update(k, v, layer)`` returns the captured earlier keys
    and values (batch 1, expanded to the rows) followed by the rows' own ``k``, ``v``, and
    stores nothing; ``update_indexer(k, layer)`` likewise for a sparse-attention indexer's keys
    (sequence on dimension 1). A state layer is the rows' own copy once :meth:`rows` made it
    (module docstring). Every other attribute is the prefix cache's (as the model saw it); its
    other ``update_*`` methods are refused."""

    def __init__(
        self,
        base: Any,
        prefix: dict[int, tuple[Tensor, Tensor]],
        indexer: dict[int, Tensor] | None = None,
    ) -> None:
        self.__dict__["_base"] = base
        self.__dict__["_prefix"] = prefix
        self.__dict__["_indexer"] = indexer or {}
        self.__dict__["_rows"] = {}  # layer -> the rows' copy of its clean states

    @property
    def layers(self) -> list[Any]:  # type: ignore[override]
        """The prefix cache's layers, a state layer replaced by the rows' copy of it."""
        rows = self.__dict__["_rows"]
        base = getattr(self.__dict__["_base"], "layers", None) or []
        return [rows.get(i, layer) for i, layer in enumerate(base)]

    def rows(self, layer_idx: int, n: int) -> None:
        """Before block ``layer_idx`` runs on ``n`` rows: if its cache layer keeps states, the
        rows' own copy of the clean ones (batch 1 expanded to n; see the module docstring)."""
        base = getattr(self.__dict__["_base"], "layers", None) or []
        if layer_idx < len(base) and isinstance(base[layer_idx], LinearAttentionCacheLayerMixin):
            self.__dict__["_rows"][layer_idx] = rows_copy(base[layer_idx], n, layer_idx)

    def update_conv_state(self, conv_states: Tensor, layer_idx: int, *a: Any, **kw: Any) -> Any:
        self._own_rows(layer_idx, "update_conv_state")
        return Cache.update_conv_state(self, conv_states, layer_idx, *a, **kw)

    def update_recurrent_state(
        self, recurrent_states: Tensor, layer_idx: int, *a: Any, **kw: Any
    ) -> Any:
        self._own_rows(layer_idx, "update_recurrent_state")
        return Cache.update_recurrent_state(self, recurrent_states, layer_idx, *a, **kw)

    def _own_rows(self, layer_idx: int, name: str) -> None:
        if layer_idx not in self.__dict__["_rows"]:
            _refuse_update(f"{name} (layer {layer_idx}, with no copy of its states for the rows)")

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
        return prefixed(k, key_states), prefixed(v, value_states)

    def update_indexer(self, key_states: Tensor, layer_idx: int) -> Tensor:
        indexer = self.__dict__["_indexer"]
        if layer_idx not in indexer:
            _refuse_update("update_indexer")
        k = indexer[layer_idx]
        return torch.cat([k.expand(key_states.shape[0], *k.shape[1:]), key_states], dim=1)


def rows_copy(layer: Any, n: int, layer_idx: int) -> Any:
    """A copy of state layer ``layer`` whose convolution and recurrent states are its own
    (batch 1) expanded and copied to ``n`` rows; its bookkeeping dicts copied too, so nothing
    the rows' step writes reaches ``layer``."""
    new = copy.copy(layer)
    for name, value in vars(layer).items():
        if isinstance(value, dict):
            setattr(new, name, dict(value))
    for name in ("conv_states", "recurrent_states"):
        states = getattr(new, name)
        for i, state in states.items():
            if isinstance(state, Tensor):
                if state.shape[0] != 1:
                    raise UnsupportedModelError(
                        f"the cache's layer {layer_idx} holds {name}[{i}] of batch "
                        f"{state.shape[0]}, not the clean run's 1"
                    )
                states[i] = state.expand(n, *state.shape[1:]).clone()
    return new


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
    """UnsupportedModelError if ``cache`` holds anything but attention keys/values and the
    states of transformers' linear-attention layers (which :meth:`FrozenCache.rows` copies to
    the rows): a state of another kind would be read and written in place by each step, so
    rows replayed at t would share (and overwrite) the clean one."""
    for i, layer in enumerate(getattr(cache, "layers", None) or ()):
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            continue
        stateful = any(hasattr(layer, a) for a in ("conv_states", "recurrent_states"))
        if stateful or not isinstance(layer, CacheLayerMixin):
            raise UnsupportedModelError(
                f"the cache's layer {i} is a {type(layer).__name__} (a convolution / recurrent "
                "state that is not a transformers linear-attention layer): the final-position "
                "replay cannot freeze it"
            )


def _plain_layers(cache: Any, n_pos: int) -> list[Any] | None:
    """The cache's layers if every one is a plain (sliding-window) key/value layer holding all
    ``n_pos`` positions of the forward, else None."""
    layers = list(getattr(cache, "layers", None) or ()) if is_cache(cache) else []
    for layer in layers:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            return None
        keys = getattr(layer, "keys", None)
        if not isinstance(keys, Tensor) or keys.shape[-2] != n_pos:
            return None
    return layers or None


def _within_windows(layers: list[Any], t: int) -> bool:
    """No sliding-window layer has dropped a position of 0..t (the window holds t + 1 more)."""
    windows = [getattr(layer, "sliding_window", None) for layer in layers]
    return all(w is None or t + 1 < w for w in windows)


def prefix_caches(cache: Any, ts: list[int]) -> list[Any]:
    """Each prompt's cache of its earlier positions from the model's cache of one right-padded
    clean forward of one or more prompts (prompt b read at its position ``ts[b]``, the batch
    padded to max(ts) + 1): row b of every layer cut to positions 0..ts[b] - 1, copied; None for
    a prompt where that is not exact: no cache, t = 0, or a layer that is not a plain key/value
    layer holding every position (a sliding-window layer past its window, a convolution or
    recurrent state); :func:`capture` then runs the model on the prefix itself. Under causal
    attention a prompt's positions before its own t never read the padding after them, so each
    cut equals that prompt's own forward's up to the rounding of batched products."""
    layers = _plain_layers(cache, max(ts) + 1) if ts else None
    out: list[Any] = []
    for b, t in enumerate(ts):
        if t == 0 or layers is None or not _within_windows(layers, t):
            out.append(None)
            continue
        one = copy.copy(cache)
        one.layers = []
        for layer in layers:
            mine = copy.copy(layer)
            mine.keys = layer.keys[b : b + 1, :, :t].clone()
            mine.values = layer.values[b : b + 1, :, :t].clone()
            if isinstance(mine, DynamicSlidingWindowLayer):
                mine.cumulative_length = t
            one.layers.append(mine)
        out.append(one)
    return out


#: id(clean run) -> the model's cache of its earlier positions (:func:`remember_prefix`)
_PREFIXES: dict[int, Any] = {}


def remember_prefix(clean: Any, cache: Any) -> None:
    """Keep ``cache`` (:func:`prefix_caches`, or None) as ``clean``'s earlier keys and values for
    as long as the clean run object lives: :func:`block_calls` then skips the prefix forward."""
    if cache is None:
        return
    ident = id(clean)
    _PREFIXES[ident] = cache
    weakref.finalize(clean, _PREFIXES.pop, ident, None)


def prefix_of(clean: Any) -> Any:
    """The cache :func:`remember_prefix` kept for ``clean`` (None if none)."""
    return _PREFIXES.get(id(clean))
