"""What :func:`causalnet.adapters.replay.capture` puts on the model's cache and calls to record
the earlier positions' keys and values: the model's own ``cache.update`` (and a sparse-attention
indexer's ``update_indexer``) wrapped to keep what it returns before position t, the name
under which the model's forward takes its cache, and the cache a forward returned."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache

from causalnet.errors import UnsupportedModelError


def cache_keyword(model: nn.Module) -> str:
    """The keyword of ``model.forward`` that takes the cache (``cache`` or ``past_key_values``);
    UnsupportedModelError naming the model if neither."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise UnsupportedModelError(
        f"{type(model).__name__}.forward takes no cache (neither cache= nor past_key_values=)"
    )


def find_cache(out: Any) -> Cache:
    """The transformers ``Cache`` a model's forward returned; UnsupportedModelError if none."""
    for key in ("cache", "cache_params", "past_key_values"):
        value = out.get(key) if hasattr(out, "get") else getattr(out, key, None)
        if isinstance(value, Cache):
            return value
    raise UnsupportedModelError(f"the model returned no transformers Cache ({type(out).__name__})")


def recording_update(cache: Any, prefix: dict[int, tuple[Tensor, Tensor]]) -> Callable:
    """``cache``'s own ``update``, keeping in ``prefix`` per layer the keys and values it returns
    before the new (last) ones, of the first row; refused where a layer is updated twice or the
    new keys/values do not come last."""
    update = type(cache).update

    def wrapped(k: Tensor, v: Tensor, layer_idx: int, *a: Any, **kw: Any) -> Any:
        keys, values = update(cache, k, v, layer_idx, *a, **kw)
        if layer_idx in prefix:
            raise UnsupportedModelError(f"the cache of layer {layer_idx} was updated twice")
        if not (torch.equal(keys[..., -1:, :], k) and torch.equal(values[..., -1:, :], v)):
            raise UnsupportedModelError(
                f"the cache of layer {layer_idx} does not return the new keys/values last"
            )
        prefix[layer_idx] = (keys[:1, ..., :-1, :].clone(), values[:1, ..., :-1, :].clone())
        return keys, values

    return wrapped


def recording_indexer(cache: Any, indexer: dict[int, Tensor]) -> Callable:
    """``cache``'s own ``update_indexer`` (a sparse-attention indexer's keys), keeping in
    ``indexer`` per layer the keys before the new one, of the first row."""
    update = type(cache).update_indexer

    def wrapped(k: Tensor, layer_idx: int) -> Tensor:
        keys = update(cache, k, layer_idx)
        if layer_idx in indexer or not torch.equal(keys[:, -1:], k):
            raise UnsupportedModelError(
                f"the indexer cache of layer {layer_idx} was updated twice or does not "
                "return the new keys last"
            )
        indexer[layer_idx] = keys[:1, :-1].clone()
        return keys

    return wrapped
