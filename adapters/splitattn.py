"""Attention of replayed rows over the clean run's earlier positions, without copying them.

The final-position replay (:mod:`causalnet.adapters.replay`) runs n rows at position t against
one clean prefix of t keys and values. Handing the model's attention the keys of every row,
``cat([prefix expanded to n rows, own key])``, copies the prefix n times per layer. Where the
model computes attention through Hugging Face's attention interface with ``sdpa`` (most
decoders), :func:`split_mode` routes that call here instead: the frozen cache gives the
attention only the rows' own keys and values and leaves the prefix in :data:`PENDING`, and
:func:`split_attention` computes, per KV head j and query head group g (heads grouped as
``repeat_kv`` groups them),

    s_prefix = q . K_prefix^T * scaling     (one product for all rows: [n g, dh] x [dh, t])
    s_own    = q . k_own * scaling
    out      = softmax([s_prefix, s_own]) . [V_prefix; v_own]

with the captured attention mask (if any) added to the scores. Any call it does not cover -- a
soft-cap, attention sinks, a position bias, dropout, more than one query, no prefix pending --
goes to the model's own ``sdpa`` function with the keys concatenated, so the values are the
model's either way (equal up to float32 rounding: another summation order).

A model whose attention does not go through the interface leaves its prefix unused in
:data:`PENDING`; the replay then runs that block again with the concatenated keys and stops
splitting for that model (:class:`causalnet.adapters.replay.BlockCalls`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

NAME = "causalnet_split"
_UNCOVERED = ("softcap", "sinks", "s_aux", "position_bias", "sliding_window")


class _Pending(threading.local):
    """Per thread: layer index -> the clean prefix (keys, values) [1, Hkv, t, dh] left by the
    frozen cache for the attention to use, while a split block call runs (else None)."""

    layers: dict[int, tuple[Tensor, Tensor]] | None = None


PENDING = _Pending()


def _sdpa(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kw: Any):
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, *args, **kw)


def split_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The attention interface's call (module docstring): [n, H, 1, dh] queries, the rows' own
    [n, Hkv, 1, dh] keys and values, the prefix from :data:`PENDING` -> [n, 1, H, dh]."""
    layers = PENDING.layers
    prefix = None if layers is None else layers.pop(getattr(module, "layer_idx", -1), None)
    if prefix is None:
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    pk, pv = prefix
    n, n_heads, q_len, dh = query.shape
    n_kv = key.shape[1]
    covered = (
        q_len == 1
        and key.shape[-2] == 1
        and dropout == 0.0
        and n_heads % n_kv == 0
        and pk.shape[0] == 1
        and pk.shape[1] == n_kv
        and all(kwargs.get(k) is None for k in _UNCOVERED)
        and (attention_mask is None or attention_mask.shape[-2] == 1)
    )
    if not covered:
        key = torch.cat([pk.expand(n, *pk.shape[1:]), key], dim=-2)
        value = torch.cat([pv.expand(n, *pv.shape[1:]), value], dim=-2)
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    g, t = n_heads // n_kv, pk.shape[-2]
    scale = dh**-0.5 if scaling is None else scaling
    q = query.view(n, n_kv, g, dh)
    qj = q.transpose(0, 1).reshape(n_kv, n * g, dh)  # [Hkv, n g, dh]
    s_pre = torch.bmm(qj, pk[0].transpose(-1, -2)).view(n_kv, n, g, t).transpose(0, 1) * scale
    s_own = (q * key.view(n, n_kv, 1, dh)).sum(-1, keepdim=True) * scale  # [n, Hkv, g, 1]
    scores = torch.cat([s_pre, s_own], dim=-1)  # [n, Hkv, g, t + 1]
    if attention_mask is not None:
        m = attention_mask[..., 0, :]  # [1 or n, 1 or H, t + 1]
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=scores.dtype, device=m.device).masked_fill(
                ~m, float("-inf")
            )
        m = m.to(scores.dtype)
        if m.shape[1] == n_heads:
            m = m.view(m.shape[0], n_kv, g, t + 1)
        else:
            m = m[:, :, None, :]
        scores = scores + m
    probs = torch.softmax(scores, dim=-1)
    pj = probs[..., :t].transpose(0, 1).reshape(n_kv, n * g, t)
    out = torch.bmm(pj, pv[0]).view(n_kv, n, g, dh).transpose(0, 1)
    out = out + probs[..., t:] * value.view(n, n_kv, 1, dh)
    return out.reshape(n, n_heads, dh)[:, None].to(query.dtype), None


AttentionInterface.register(NAME, split_attention)


def splittable(blocks: list[nn.Module]) -> list[Any] | None:
    """The configs the attention modules of ``blocks`` read their implementation from, if every
    one of them uses ``sdpa`` (else None: the replay concatenates keys as the model would)."""
    configs: dict[int, Any] = {}
    for block in blocks:
        for m in block.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                configs[id(cfg)] = cfg
    if not configs or any(c._attn_implementation != "sdpa" for c in configs.values()):
        return None
    return list(configs.values())


_switch_lock = threading.RLock()


@contextlib.contextmanager
def split_mode(configs: list[Any]) -> Iterator[None]:
    """While inside, the attention of these configs' modules goes through
    :func:`split_attention` (which falls back to ``sdpa`` for calls with no prefix pending);
    the implementation is set back on exit."""
    with _switch_lock:
        for cfg in configs:
            cfg._attn_implementation = NAME
        try:
            yield
        finally:
            for cfg in configs:
                cfg._attn_implementation = "sdpa"
