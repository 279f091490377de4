"""Attention of the final-position rows over the clean prefix, without copying the prefix per row.

In the final-position replay (:mod:`causalnet.adapters.replay`) every row attends from position
t to the clean run's keys and values of positions 0..t-1 -- the same for all n rows -- and to its
own key and value at t. Handing the model's attention ``cat([K_clean expanded to n rows, k_own])``
copies the prefix n times per layer (n up to a few thousand rows), and the attention kernel then
reads all the copies: on a 135M model that is most of the attention's time.

Inside :func:`row_attention` the frozen cache's ``update`` returns a :class:`PrefixKV` instead:
a tensor of the full shape ``[n, H_kv, t + 1, d_head]`` that holds the prefix once
(``[1, H_kv, t, d_head]``) and the rows' own ``[n, H_kv, 1, d_head]``. Two things can happen to
it:

- transformers' ``sdpa`` attention function (the one a model configured for ``sdpa`` calls
  through its ``AttentionInterface``) is wrapped for the duration: given a ``PrefixKV`` key and
  value and one query position it computes the same attention from the prefix and the rows'
  own parts::

      s_j  = scale * q . K_j           (j < t: one matrix product shared by all rows)
      s_t  = scale * q . k_own
      p    = softmax(s + mask)         (the model's mask, broadcast as SDPA broadcasts it)
      out  = sum_{j<t} p_j V_j + p_t v_own

  grouped-query heads as SDPA groups them (query head h reads key/value head h // (H / H_kv));
- anything else done to it (another attention function, a model's own code reading the keys)
  turns it into the full tensor first, ``torch.cat`` of the expanded prefix and the rows' own,
  exactly what the frozen cache returns outside this context. So the context can only change
  speed, never a value beyond float rounding; the fast path's probe against the re-forward
  (:mod:`causalnet.adapters.finalrows`) checks it per model.

The SDPA cases it does not compute itself go to the original function with the full tensors:
a position bias, dropout, a soft cap, more than one query position, a prefix of batch other
than 1, heads that do not group.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map
from transformers.modeling_utils import AttentionInterface

_state = threading.local()  # .on: inside row_attention() in this thread
_install_lock = threading.Lock()
_installed: list[Any] = []  # [original sdpa function, users] while wrapped


class PrefixKV(Tensor):
    """``cat([prefix.expand(n, ...), own], dim=-2)`` [n, H_kv, t + 1, d], kept as its two parts
    and made whole (:meth:`full`) only when an operation needs it."""

    prefix: Tensor
    own: Tensor
    _full: Tensor | None
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, prefix: Tensor, own: Tensor) -> PrefixKV:
        shape = (own.shape[0], *own.shape[1:-2], prefix.shape[-2] + own.shape[-2], own.shape[-1])
        return Tensor._make_wrapper_subclass(cls, shape, dtype=own.dtype, device=own.device)

    def __init__(self, prefix: Tensor, own: Tensor) -> None:
        self.prefix = prefix
        self.own = own
        self._full = None

    def full(self) -> Tensor:
        """The whole tensor (computed once)."""
        if self._full is None:
            self._full = _concatenated(self.prefix, self.own)
        return self._full

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        def whole(x: Any) -> Any:
            return x.full() if isinstance(x, PrefixKV) else x

        return func(*tree_map(whole, args), **tree_map(whole, kwargs or {}))

    def __repr__(self) -> str:  # the default repr would print through dispatch
        return f"PrefixKV(shape={tuple(self.shape)}, prefix={tuple(self.prefix.shape)})"


def prefixed(prefix: Tensor, own: Tensor) -> Tensor:
    """The clean prefix [1, ...] followed by the rows' own [n, ...] on dimension -2: a
    :class:`PrefixKV` inside :func:`row_attention`, else the concatenated tensor."""
    if getattr(_state, "on", False) and prefix.shape[0] == 1 and prefix.dtype == own.dtype:
        return PrefixKV(prefix, own)
    return _concatenated(prefix, own)


def _concatenated(prefix: Tensor, own: Tensor) -> Tensor:
    return torch.cat([prefix.expand(own.shape[0], *prefix.shape[1:]), own], dim=-2)


def attend(
    query: Tensor, key: PrefixKV, value: PrefixKV, mask: Tensor | None, scale: float
) -> Tensor:
    """SDPA of one query position over a prefix and the rows' own: query [n, H, 1, d],
    ``mask`` broadcastable to [n, H, 1, t + 1] (bool: True attends; float: added) ->
    [n, 1, H, d_v], the layout transformers' attention functions return (module docstring).

    The scores and probabilities are laid out [H_kv, n, g, .] (g = H / H_kv query heads per
    key/value head), so that the prefix's part is one batched product per key/value head."""
    n, n_heads, _, d = query.shape
    kv_heads, t = key.prefix.shape[1], key.prefix.shape[2]
    g = n_heads // kv_heads
    q = query.reshape(n, kv_heads, g, d).permute(1, 0, 2, 3)  # [H_kv, n, g, d]
    qg = q.reshape(kv_heads, n * g, d)
    s_pre = torch.bmm(qg, key.prefix[0].transpose(1, 2)).view(kv_heads, n, g, t)
    s_own = (qg.view(kv_heads, n, g, d) * key.own.permute(1, 0, 2, 3)).sum(-1, keepdim=True)
    scores = torch.cat([s_pre, s_own], -1).mul_(scale)
    if mask is not None:
        m = mask.expand(n, n_heads, 1, t + 1).reshape(n, kv_heads, g, t + 1).permute(1, 0, 2, 3)
        scores = scores.masked_fill(~m, -math.inf) if m.dtype == torch.bool else scores + m
    # softmax by hand: torch.softmax over rows of t + 1 (a few) elements is ~6x slower here
    p = (scores - scores.amax(-1, keepdim=True)).exp_()
    p = p.div_(p.sum(-1, keepdim=True))
    pre = torch.bmm(p[..., :t].reshape(kv_heads, n * g, t), value.prefix[0])  # [H_kv, n g, d_v]
    d_v = pre.shape[-1]
    out = torch.empty(n, 1, n_heads, d_v, dtype=pre.dtype, device=pre.device)
    torch.addcmul(
        pre.view(kv_heads, n, g, d_v).permute(1, 0, 2, 3),
        p[..., t:].permute(1, 0, 2, 3),
        value.own,
        out=out.view(n, kv_heads, g, d_v),
    )
    return out


def _handles(module: Any, query: Tensor, key: Any, value: Any, kwargs: dict) -> bool:
    """Whether :func:`attend` computes what SDPA would for these arguments."""
    if not (isinstance(key, PrefixKV) and isinstance(value, PrefixKV)):
        return False
    if kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return False
    if kwargs.get("dropout", 0.0) or kwargs.get("output_attentions", False):
        return False
    if query.dim() != 4 or query.shape[2] != 1 or key.own.shape[2] != 1:
        return False
    n_heads, kv_heads = query.shape[1], key.shape[1]
    groups = getattr(module, "num_key_value_groups", 1)
    if kv_heads * (groups if groups > 1 else 1) != n_heads or value.shape[1] != kv_heads:
        return False
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.shape[-1] != key.shape[2]:
        return False
    return key.prefix.shape[:3] == value.prefix.shape[:3] and query.shape[0] == key.shape[0]


def _wrap(original: Callable) -> Callable:
    def sdpa_rows(
        module: Any,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        names = ("dropout", "scaling", "is_causal", "position_bias")
        kw = {**dict(zip(names, args, strict=False)), **kwargs, "attention_mask": attention_mask}
        if _handles(module, query, key, value, kw):
            scale = kw.get("scaling")
            scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
            return attend(query, key, value, attention_mask, scale), None  # type: ignore[arg-type]
        key = key.full() if isinstance(key, PrefixKV) else key
        value = value.full() if isinstance(value, PrefixKV) else value
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    sdpa_rows.original = original  # type: ignore[attr-defined]
    return sdpa_rows


@contextlib.contextmanager
def row_attention() -> Iterator[None]:
    """Within this context (this thread) the frozen cache hands out :class:`PrefixKV` and
    transformers' ``sdpa`` attention computes them without copying the prefix (module
    docstring); outside, nothing of this module is in effect."""
    mapping = AttentionInterface._global_mapping
    with _install_lock:
        if not _installed:
            _installed[:] = [mapping["sdpa"], 0]
            mapping["sdpa"] = _wrap(mapping["sdpa"])
        _installed[1] += 1
    before = getattr(_state, "on", False)
    _state.on = True
    try:
        yield
    finally:
        _state.on = before
        with _install_lock:
            _installed[1] -= 1
            if _installed[1] == 0:
                mapping["sdpa"] = _installed[0]
                _installed.clear()
