"""Fast patching of a discovered decoder: its own blocks replayed at the final position only.

An intervention at position t changes nothing before t, so the keys and values of the earlier
positions are those of the clean run. :func:`capture` runs the model's OWN forward twice with
its OWN cache (transformers ``Cache``): on the prompt before t, then on the token at t, and
records what each decoder block was called with (masks, rotary or ALiBi tensors, position ids:
whatever the model passes), the keys and values each attention layer's ``cache.update``
returned for the earlier positions (a sliding window already applied by the model's cache),
and the clean residual, attention and MLP values at t.

:func:`causalnet.adapters.fastpatch.fast_patch` then calls the blocks, layer by layer, on
rows [N, 1, d] at t: every (site, patch) row of the prompt in one batch that grows as the layers
go up (rows sorted by the layer they enter at, as in
:meth:`causalnet.adapters.base.TransformerAdapter.patch`). Each block gets the captured
arguments and a :class:`FrozenCache` whose ``update`` returns the clean earlier keys/values
followed by the rows' own, so grouped / multi-query KV heads, sliding windows, rotary variants,
ALiBi and MoE routing (each row routed by its own input) are computed by the model's own
modules. do(site = v) is applied by hooks on the discovered modules, as in
:mod:`causalnet.adapters.trace`. The vocabulary projection is never computed: the centred logit
is the final norm's output (the model's module) dotted with the centred unembedding row.

Where a block is called with an earlier block's output besides the hidden state (a second
stream: GLM-5's top-k indices, Zaya's router states), the capture records which
(:attr:`Capture.streams`) and :class:`BlockCalls` carries it per row: the rows that ran the
earlier block (the first rows) get their own output, the others the clean value. A row entering
at a block's MLP skips the block and gets the clean value, as the hooked re-forward (which
replaces the MLP's output only) hands it on.

Arguments that depend on the batch size are found by capturing at batch 1 and 2 and tiled to
N rows (:mod:`causalnet.adapters.tiling`); anything else that differs (or a block that gets no
transformers Cache) is refused with the reason, and the adapter falls back to
:func:`causalnet.adapters.trace.reforward_patch` (:func:`causalnet.adapters.fastpatch.
check_fast` decides, on a probe, before use).

Two forwards per prompt are saved where they can be: the one-prompt clean run keeps the model's
cache of the earlier positions (:func:`causalnet.adapters.frozencache.prefix_caches`), so the
capture runs the token at t only; and once two different prompts of one length were seen to
give the blocks bit-identical arguments at t (:func:`arguments_by_length`), a later prompt of
that length takes them from the first, with its own cache and clean values, and runs no forward.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from causalnet.errors import UnsupportedModelError

from .finalrows import forward_last, forward_step
from .frozencache import FrozenCache, check_kv_only, is_cache
from .hooks import HookSet, first, hidden_in, with_hidden_in
from .linears import fast_linears
from .recorders import cache_keyword, recording_indexer, recording_update
from .tiling import HIDDEN, block_modes, fill, mark, signature, tile


@dataclass
class Capture:
    """The model's own forward at position t with its cache (module docstring), at one batch
    size: per block the arguments (``HIDDEN`` / ``CACHE`` placeholders) and the clean values
    at t of its input, attention part and MLP part (times alpha / beta) [L, d]."""

    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    #: per block, its arguments that are an earlier block's output besides the hidden state (a
    #: second stream: GLM-5's top-k indices, Zaya's router states): argument position or
    #: keyword -> (that block, the output's index); the clean value stays in args / kwargs
    streams: list[dict[int | str, tuple[int, int]]] = field(default_factory=list)
    prefix: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    indexer: dict[int, Tensor] = field(default_factory=dict)  # a sparse-attention indexer's keys
    cache: Any = None  # the prefix cache before position t (a copy)
    pre: Tensor | None = None
    attn: Tensor | None = None
    mlp: Tensor | None = None


def capture(adapter: Any, prompt: Tensor, batch: int = 1, prefix: Any = None) -> Capture:
    """The model's forward on ``prompt[:-1]`` (its cache) then ``prompt[-1]`` with every block's
    arguments recorded, ``batch`` identical rows (module docstring). ``prefix``: the model's
    cache of ``prompt[:-1]`` from the clean run (:func:`prefix_caches`; batch 1 only), copied and
    used instead of the prefix forward."""
    p = adapter.parts
    model = adapter.model
    cap = Capture()
    n_layers = p.n_layers
    cap.args, cap.kwargs, cap.streams = [()] * n_layers, [{}] * n_layers, [{}] * n_layers
    vals: dict[str, list[Any]] = {"pre": [None] * n_layers, "attn": [None] * n_layers}
    vals["mlp"] = [None] * n_layers
    live: dict[str, Any] = {}

    def block_pre(layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            caches = [x for x in (*args, *kwargs.values()) if is_cache(x)]
            if len(caches) != 1:
                raise UnsupportedModelError(
                    f"block {p.block_names[layer]} gets {len(caches)} transformers caches, not one"
                )
            if layer == 0:
                check_kv_only(caches[0])
                live["cache"] = caches[0]
                cap.cache = copy.deepcopy(caches[0])
                caches[0].update = recording_update(caches[0], cap.prefix)
                if hasattr(caches[0], "update_indexer"):  # a sparse-attention indexer's keys
                    caches[0].update_indexer = recording_indexer(caches[0], cap.indexer)
            elif caches[0] is not live["cache"]:
                raise UnsupportedModelError(f"block {p.block_names[layer]} gets another cache")
            cap.streams[layer] = streams_in(args, kwargs)
            x = hidden_in(args, kwargs)
            vals["pre"][layer] = x[0, -1].clone()
            placeholder = x.new_empty(0)
            a, k = with_hidden_in(args, kwargs, placeholder)
            a = tuple(HIDDEN if y is placeholder else mark(y, live["cache"]) for y in a)
            k = {n: HIDDEN if y is placeholder else mark(y, live["cache"]) for n, y in k.items()}
            cap.args[layer], cap.kwargs[layer] = a, k

        return hook

    def part(kind: str, layer: int, scale: float) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            vals[kind][layer] = first(output)[0, -1] * scale

        return hook

    handed: dict[int, tuple] = {}  # layer -> its block's output (a tuple)

    def block_post(layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(output, (tuple, list)):
                handed[layer] = tuple(output)

        return hook

    def streams_in(args: tuple, kwargs: dict) -> dict[int | str, tuple[int, int]]:
        """The block's arguments (top level) that are an earlier block's output besides the
        hidden state -> (the latest such block, the output's index)."""
        found: dict[int | str, tuple[int, int]] = {}
        for where, x in (*enumerate(args), *kwargs.items()):
            if isinstance(x, Tensor):
                for earlier in sorted(handed, reverse=True):
                    ks = [k for k, y in enumerate(handed[earlier]) if k and y is x]
                    if ks:
                        found[where] = (earlier, ks[0])
                        break
        return found

    key = cache_keyword(model)
    toks = prompt[None].expand(batch, -1)
    with torch.no_grad(), fast_linears(p.blocks, watch=True):
        kwargs: dict[str, Any] = {"use_cache": True}
        if prefix is not None and batch == 1 and prompt.shape[0] > 1:
            kwargs[key] = copy.deepcopy(prefix)
        elif prompt.shape[0] > 1:
            out = forward_last(model, input_ids=toks[:, :-1], use_cache=True)
            cache = out.get(key) if hasattr(out, "get") else None
            if not is_cache(cache):
                raise UnsupportedModelError(
                    f"{type(model).__name__} returned no transformers Cache ({type(cache)})"
                )
            kwargs[key] = cache
        with HookSet() as hooks:
            for layer in range(n_layers):
                hooks.pre(p.blocks[layer], f"block.{layer}", block_pre(layer))
                hooks.post(p.blocks[layer], f"block_out.{layer}", block_post(layer))
                hooks.part(
                    p.blocks[layer],
                    p.attn[layer],
                    f"attn.{layer}",
                    part("attn", layer, p.alpha[layer]),
                )
                hooks.part(
                    p.blocks[layer], p.mlp[layer], f"mlp.{layer}", part("mlp", layer, p.beta[layer])
                )
            forward_step(model, toks, **kwargs)
            hooks.check()
    if "cache" in live:
        del live["cache"].update  # the instance attribute; the class's method is back
        live["cache"].__dict__.pop("update_indexer", None)
    cap.pre, cap.attn, cap.mlp = (torch.stack(vals[k]) for k in ("pre", "attn", "mlp"))
    return cap


class BlockCalls:
    """Each block's call on n rows from its capture at batch 1 and the tiling ``modes``, for one
    pass up the layers: a second stream (:attr:`Capture.streams`) is carried per row."""

    def __init__(self, adapter: Any, one: Capture, modes: list[tuple[Any, Any]]) -> None:
        self.one = one
        self.adapter = adapter
        self.blocks = adapter.parts.blocks
        self.modes = modes
        self.cache = FrozenCache(one.cache, one.prefix, one.indexer)
        self.kept: dict[tuple[int, int], Tensor] = {}  # (block, output index) -> its rows' own
        self.names = names = adapter.parts.block_names
        for layer, streams in enumerate(one.streams):
            for where, (j, k) in streams.items():
                m = self.modes[layer][isinstance(where, str)][where]
                if m != "expand":  # a batch-1 value with a leading row dimension of 1
                    raise UnsupportedModelError(
                        f"block {names[layer]} is called with output {k} of block {names[j]} "
                        f"besides the hidden state (a second stream), which does not scale with "
                        f"the batch along a leading row dimension ({m!r}): the final-position "
                        "replay cannot carry it per row"
                    )

    def _carried(self, layer: int, where: int | str, clean: Tensor, n: int) -> Tensor:
        """The rows' value of a second stream: the first rows' own output of the block that
        hands it (the rows that ran it come first), the clean value for the rest."""
        j, k = self.one.streams[layer][where]
        own = self.kept.get((j, k))
        if own is None:  # no row ran block j
            return clean
        if own.shape[0] > n or own.shape[1:] != clean.shape[1:] or own.dtype != clean.dtype:
            raise UnsupportedModelError(
                f"output {k} of block {self.names[j]} {tuple(own.shape)} cannot feed block "
                f"{self.names[layer]} on {n} rows (clean value {tuple(clean.shape)}): the rows "
                "that ran the earlier block must be the first rows of the later one"
            )
        return torch.cat([own, clean[own.shape[0] :]])

    def __call__(self, layer: int, resid: Tensor) -> Tensor:
        """Block ``layer`` on rows' residuals at t [n, d] -> its output [n, d]. The rows of
        successive calls are prefixes of one row order (growing as rows enter)."""
        n = resid.shape[0]
        hidden = resid[:, None, :].clone()  # a block may write to its input
        self.cache.rows(layer, n)  # a state layer: the rows' own copy of the clean states
        a_mode, k_mode = self.modes[layer]
        args = fill(tile(self.one.args[layer], a_mode, n), hidden, self.cache)
        kwargs = fill(tile(self.one.kwargs[layer], k_mode, n), hidden, self.cache)
        for where in self.one.streams[layer]:
            if isinstance(where, str):
                kwargs[where] = self._carried(layer, where, kwargs[where], n)
            else:
                args = (
                    *args[:where],
                    self._carried(layer, where, args[where], n),
                    *args[where + 1 :],
                )
        output = self.blocks[layer](*args, **kwargs)
        for later in self.one.streams[layer + 1 :]:
            for j, k in later.values():
                if j == layer:
                    self.kept[j, k] = output[k]
        out = first(output)
        if out is None or out.shape != hidden.shape:
            raise UnsupportedModelError(f"block {layer} returned no [n, 1, d] hidden states")
        return out[:, 0]


#: adapter -> {structure of the batch-1 capture: tiling modes}, so that batch 2 is captured
#: once per structure (in practice once, or twice: one-token prompts have no cache), not once
#: per prompt.
_MODES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


#: adapter -> {prompt length: (its tokens, a capture at that length)}; and whether the blocks'
#: arguments at t (hidden state and cache aside) are the same for every prompt of one length
#: (True: seen on two prompts; False: they differ; absent: not known yet)
_BY_LENGTH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LENGTH_ONLY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def arguments_by_length(adapter: Any) -> bool | None:
    """Whether ``adapter``'s blocks get the same arguments at t (hidden state and cache aside)
    for every prompt of one length, as seen on two prompts of one length (None: not seen yet).
    Where True, a prompt's replay takes them from an earlier prompt of its length instead of a
    forward of its own."""
    return _LENGTH_ONLY.get(adapter)


def _same(x: Any, y: Any) -> bool:
    """Whether two captured arguments are identical (tensors bit for bit)."""
    if isinstance(x, Tensor) or isinstance(y, Tensor):
        return (
            isinstance(x, Tensor)
            and isinstance(y, Tensor)
            and x.shape == y.shape
            and x.dtype == y.dtype
            and torch.equal(x, y)
        )
    if isinstance(x, (tuple, list)):
        return (
            type(x) is type(y) and len(x) == len(y) and all(map(_same, x, y))  # type: ignore[arg-type]
        )
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    return x is y or (type(x) is type(y) and x == y)


def _from_template(template: Capture, prefix: Any, clean: Any) -> Capture | None:
    """A capture for ``clean`` built from ``template`` (another prompt of its length): the
    template's block arguments, the earlier keys and values of ``clean``'s own cache
    (``prefix``, cut back to t), its clean values at t. None where the cache's layers do not
    map one to one onto the layers the template's attention updated."""
    layers = getattr(prefix, "layers", None) or []
    if set(template.prefix) != set(range(len(layers))) or clean._resid_pre is None:
        return None
    one = Capture(template.args, template.kwargs, template.streams, cache=prefix)
    for i, layer in enumerate(layers):
        one.prefix[i] = (layer.keys[:1], layer.values[:1])
    one.pre, one.attn, one.mlp = clean._resid_pre, clean._attn, clean._mlp
    return one


def _same_capture(a: Capture, b: Capture) -> bool:
    keys = set(a.prefix) == set(b.prefix) and all(
        _same(a.prefix[i][0], b.prefix[i][0]) and _same(a.prefix[i][1], b.prefix[i][1])
        for i in a.prefix
    )
    same_args = _same(a.args, b.args) and _same(a.kwargs, b.kwargs)
    return keys and same_args and a.streams == b.streams


def _batch_one(adapter: Any, prompt: Tensor, prefix: Any, clean: Any) -> Capture:
    """The batch-1 capture for ``prompt``: built from another prompt of the same length where
    the blocks' arguments were seen to depend on the length only (:data:`_LENGTH_ONLY`), else
    captured (and, the first time another prompt of a length seen before comes, compared with
    the earlier one to find out)."""
    n = prompt.shape[0]
    templates = _BY_LENGTH.setdefault(adapter, {})
    reusable = prefix is not None and clean is not None
    if reusable and _LENGTH_ONLY.get(adapter) is True and n in templates:
        one = _from_template(templates[n][1], prefix, clean)
        if one is not None:
            return one
    one = capture(adapter, prompt, 1, prefix)
    if clean is not None and clean._resid_pre is not None:
        # the clean run's own values at t, as a capture built from a template has them: a
        # prompt's result does not depend on which way its capture was made
        one.pre, one.attn, one.mlp = clean._resid_pre, clean._attn, clean._mlp
    if reusable:
        seen, known = templates.setdefault(n, (prompt.clone(), one))
        other_tokens = not torch.equal(seen, prompt)
        if other_tokens and _LENGTH_ONLY.get(adapter) is None:
            built = _from_template(known, prefix, clean)
            _LENGTH_ONLY[adapter] = built is not None and _same_capture(built, one)
    return one


def block_calls(adapter: Any, prompt: Tensor, prefix: Any = None, clean: Any = None) -> BlockCalls:
    """:class:`BlockCalls` for ``prompt`` [t + 1]: captured at batch 1 (on the clean run's
    ``prefix`` cache where given; from another prompt of its length where the arguments depend
    on the length only, :func:`_batch_one`), and at batch 2 the first time its arguments have
    this structure (how they scale with the batch)."""
    one = _batch_one(adapter, prompt, prefix, clean)
    sig = signature((one.args, one.kwargs))
    known = _MODES.setdefault(adapter, {})
    if sig not in known:
        two = capture(adapter, prompt, 2)
        names = adapter.parts.block_names
        known[sig] = block_modes(names, (one.args, one.kwargs), (two.args, two.kwargs))
    return BlockCalls(adapter, one, known[sig])
