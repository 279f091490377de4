"""A model of one-part blocks stepped at t: its own cache after t - 1 and how it calls each block.

:class:`Prefix` runs the model's OWN forward on the prompt before t with its OWN cache
(transformers ``Cache``), then one cached step of the model's own forward on the token at t
(from a copy of that cache), recording what each block is called with besides its hidden state
and the cache: masks, rotary tables, position ids, layer numbers, Zamba's
``original_hidden_states`` (the embedding module's output, which the shared transformer blocks
read), whatever the model passes. :func:`step_calls` captures that at batch 1 and, once per
structure of the arguments, at batch 2, and finds how each tensor scales to n rows
(:mod:`causalnet.adapters.tiling`).

The cache's per-layer objects may be of four kinds (:func:`cache_kinds`):

- ``state``: convolution / recurrent states (a Mamba or Mamba2 mixer): before block l runs on n
  rows, layer l's states in the rows' cache are the clean ones expanded and copied to the rows,
  so each row's step updates its own copy;
- ``kv``: attention keys and values of a dynamic layer (Nemotron-H's attention blocks): layer
  l's keys and values are the clean ones (batch 1) expanded to the rows; the model's own
  ``update`` appends each row's key and value at t (and applies a sliding window);
- ``state+kv``: both (Zamba's hybrid blocks: a Mamba mixer and a shared transformer block);
- ``none``: a ``DummyLayer`` (Nemotron-H's MLP blocks), nothing to carry.

Anything else (a static or quantised key/value layer, an unknown layer object) is refused with
the reason. So is a block called with a tensor equal to an EARLIER block's output at t (a flow
across blocks): the replay passes the clean tensor, but a row patched below that block changes
it. The embedding module's output is not such a flow: ``embed`` is the first block's input (the
residual stream, :mod:`causalnet.adapters.trace`), and the hooked re-forward and the naive
oracle leave every other copy of the embedding (Zamba's ``original_hidden_states``) clean, as
the replay does.

A Mamba2-style mixer's single step skips the time-step clamp of its full-sequence scan
(Zamba2, Nemotron-H: on a tiny Zamba2, 3.7e-4 of the centred logit at position 5 of 9 with
patches of the sites' own scale, while the probe at the last position happened to see 2e-7):
:mod:`causalnet.adapters.timestep` guards the replay against it.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DummyLayer, DynamicLayer

from causalnet.errors import UnsupportedModelError

from .finalrows import forward_last, forward_step
from .frozencache import rows_copy
from .hooks import HookSet, first, hidden_in, with_hidden_in
from .recorders import find_cache
from .tiling import HIDDEN, block_modes, fill, mark, signature, tile

STATES = ("conv_states", "recurrent_states")


def layer_kind(layer: Any, i: int) -> str:
    """``"state"``, ``"kv"``, ``"state+kv"`` or ``"none"`` for cache layer ``i`` (module
    docstring); UnsupportedModelError naming its type for any other."""
    if isinstance(layer, DummyLayer):
        return "none"
    state = all(isinstance(getattr(layer, a, None), dict) for a in STATES)
    kv = isinstance(getattr(layer, "keys", None), Tensor)
    if (
        kv
        and not isinstance(layer, DynamicLayer)
        or type(layer).__name__.endswith("QuantizedLayer")
    ):
        raise UnsupportedModelError(
            f"the cache's layer {i} ({type(layer).__name__}) keeps keys and values that are "
            "not a dynamic layer's (static or quantised): the replay does not expand them"
        )
    if state or kv:
        return "+".join(k for k, has in (("state", state), ("kv", kv)) if has)
    raise UnsupportedModelError(
        f"the cache's layer {i} ({type(layer).__name__}) holds neither convolution / recurrent "
        "states nor dynamic keys and values"
    )


def cache_kinds(cache: Cache, n_layers: int) -> list[str]:
    """Each cache layer's kind (:func:`layer_kind`); one layer per block."""
    layers = list(getattr(cache, "layers", None) or ())
    if len(layers) != n_layers:
        raise UnsupportedModelError(
            f"the cache has {len(layers)} layers for {n_layers} blocks: not one layer per block"
        )
    return [layer_kind(layer, i) for i, layer in enumerate(layers)]


def tensors(x: Any) -> Iterator[Tensor]:
    """The tensors in a captured argument (in tuples, lists, dicts)."""
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from tensors(y)


class Prefix:
    """The model's own cache after t - 1 (``cache``, None at t = 0) and how it calls each block
    at t (``args`` / ``kwargs`` with ``HIDDEN`` / ``CACHE`` placeholders), for ``batch``
    identical rows; ``modes`` (set by :func:`step_calls`) say how to tile them to n rows."""

    def __init__(self, adapter: Any, prompt: Tensor, batch: int = 1) -> None:
        p = adapter.parts
        model = adapter.model
        self.names = p.block_names
        self.cache: Cache | None = None
        self.kinds: list[str] = []
        self.modes: list[tuple[Any, Any]] | None = None
        toks = prompt[None].expand(batch, -1)
        step: dict[str, Any] = {"use_cache": True}
        with torch.no_grad():
            if prompt.shape[0] > 1:
                out = forward_last(model, input_ids=toks[:, :-1], use_cache=True)
                self.cache = find_cache(out)
                self.kinds = cache_kinds(self.cache, p.n_layers)
                step["cache"] = copy.deepcopy(self.cache)  # the step below updates it
            self.args: list[tuple] = [()] * p.n_layers
            self.kwargs: list[dict] = [{}] * p.n_layers
            outs: list[Tensor | None] = [None] * p.n_layers

            def block_pre(layer: int) -> Any:
                def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                    live = next((v for v in (*args, *kwargs.values()) if isinstance(v, Cache)), 0)
                    placeholder = hidden_in(args, kwargs).new_empty(0)
                    a, k = with_hidden_in(args, kwargs, placeholder)
                    self.args[layer] = tuple(
                        HIDDEN if y is placeholder else mark(y, live) for y in a
                    )
                    self.kwargs[layer] = {
                        n: HIDDEN if y is placeholder else mark(y, live) for n, y in k.items()
                    }

                return hook

            def block_post(layer: int) -> Any:
                def hook(module: nn.Module, args: tuple, output: Any) -> None:
                    outs[layer] = first(output)

                return hook

            with HookSet() as hooks:
                for layer in range(p.n_layers):
                    hooks.pre(p.blocks[layer], f"block.{layer}", block_pre(layer))
                    hooks.post(p.blocks[layer], f"block.{layer}.out", block_post(layer))
                forward_step(model, toks, **step)
                hooks.check()
        self._refuse_flows(outs)

    def _refuse_flows(self, outs: list[Tensor | None]) -> None:
        """UnsupportedModelError if a block is called with an earlier block's output at t."""
        for layer in range(1, len(outs)):
            for x in tensors((self.args[layer], self.kwargs[layer])):
                for k in range(layer):
                    y = outs[k]
                    if y is not None and x.shape == y.shape and torch.equal(x, y):
                        raise UnsupportedModelError(
                            f"block {self.names[layer]} is called with block {self.names[k]}'s "
                            "output besides its hidden state (a flow across blocks): the "
                            "replay would pass it clean to rows patched below it"
                        )

    def rows_cache(self, cache: Any, layer: int, n: int) -> Any:
        """``cache`` (a copy of the prefix's) with layer ``layer``'s states the clean ones
        expanded and copied to ``n`` rows (each row's step updates its own) and its keys and
        values the clean ones expanded (each row's step appends its own)."""
        if self.cache is None:
            return None
        source, kind = self.cache.layers[layer], self.kinds[layer]
        if "state" in kind:
            cache.layers[layer] = rows_copy(source, n, layer)
        target = cache.layers[layer]
        if "kv" in kind:
            target.keys = source.keys.expand(n, *source.keys.shape[1:])
            target.values = source.values.expand(n, *source.values.shape[1:])
        return cache

    def call(self, block: nn.Module, layer: int, hidden: Tensor, cache: Any) -> Tensor:
        """Block ``layer`` on ``hidden`` [N, 1, d] with ``cache`` where the model passed its
        (None at t = 0: the block then runs on the one position without a cache, as the model
        does on a one-token prompt) and the captured arguments tiled to the N rows."""
        n = hidden.shape[0]
        assert self.modes is not None, "Prefix.modes is set by step_calls"
        a_mode, k_mode = self.modes[layer]
        args = fill(tile(self.args[layer], a_mode, n), hidden, cache)
        kwargs = fill(tile(self.kwargs[layer], k_mode, n), hidden, cache)
        out = first(block(*args, **kwargs))
        if out is None or out.shape != hidden.shape:
            raise UnsupportedModelError(f"block {self.names[layer]} returned no [N, 1, d] state")
        return out


#: adapter -> {structure of the batch-1 arguments: tiling modes}: batch 2 is captured once per
#: structure (in practice once, or twice: one-token prompts have no cache), not per prompt
_MODES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def step_calls(adapter: Any, prompt: Tensor) -> Prefix:
    """:class:`Prefix` of ``prompt`` [t + 1] at batch 1 with its tiling modes, found from a
    capture at batch 2 the first time its arguments have this structure."""
    one = Prefix(adapter, prompt)
    sig = signature((one.args, one.kwargs))
    known = _MODES.setdefault(adapter, {})
    if sig not in known:
        two = Prefix(adapter, prompt, batch=2)
        known[sig] = block_modes(one.names, (one.args, one.kwargs), (two.args, two.kwargs))
    one.modes = known[sig]
    return one
