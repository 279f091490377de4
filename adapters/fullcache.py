"""Models whose own cache decodes off their own forward, given a cache that keeps every key.

A replay computes the final position from the cache of the clean run, as the model's own
decoding would (:mod:`causalnet.adapters.fastpatch`). That is exact only where the model's
cached decoding is its full forward. transformers builds a model's default cache from its
config, and a config with a sliding window gets layers that keep only the window's last keys,
even where the model's full forward does not attend through a window. Measured: Moshi
(transformers 5.24, ``sliding_window`` 4 in its config; its forward builds a plain causal mask)
decodes the last of 8 probe tokens 2.0 off its full forward from its own cache, and 1.8e-6 off
from a plain ``DynamicCache()`` (every layer keeps every key; the mask still comes from the
model).

:func:`mark` notes such a model (the generic adapter does, at construction, where the plain
cache decodes as the full forward does and the model's own does not:
:func:`causalnet.adapters.finalrows.settle_cache`); :func:`cache_kwargs` then hands every
cached forward the adapters run on it (clean runs that keep their cache, the replay's captures)
a fresh plain cache. A model not marked gets nothing added: its own cache, as before.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

from .recorders import cache_keyword

_MARKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def mark(model: nn.Module) -> None:
    """Give ``model``'s cached forwards a plain cache from now on (module docstring)."""
    _MARKED.add(model)


def marked(model: nn.Module) -> bool:
    """Whether :func:`mark` was called on ``model``."""
    return model in _MARKED


def cache_kwargs(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """What to add to ``kwargs`` of a call of ``model``: a fresh ``DynamicCache()`` under the
    model's cache keyword where the model is marked, the call keeps a cache (``use_cache``) and
    none is given (under any cache keyword); else nothing."""
    if not kwargs.get("use_cache") or model not in _MARKED:
        return {}
    if any(kwargs.get(k) is not None for k in ("cache", "past_key_values", "cache_params")):
        return {}  # a cache given (under either keyword: transformers takes both for now)
    key = cache_keyword(model)
    from transformers import DynamicCache  # noqa: PLC0415 (only for marked models)

    return {key: DynamicCache()}
