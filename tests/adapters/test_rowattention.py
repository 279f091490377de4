"""The final-position rows' attention over the clean prefix (adapters/rowattention.py).

Oracles: ``torch.nn.functional.scaled_dot_product_attention`` on the concatenated keys and
values (the tensors the frozen cache hands out without the context), and, for a whole model,
the one-forward-per-patch check (:func:`causalnet.adapters.verify.check_patching`).
Tolerances: 1e-6 (float32) and 1e-12 (float64) for one attention call; 1e-4 / 1e-9 of
max(1, |clean centred logit|) for a model's patches.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers as T
from tiny_models import DECODER_SIZES, decoder_prompt
from torch.nn import functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

from causalnet.adapters import adapt, rowattention
from causalnet.adapters.rowattention import PrefixKV, attend, prefixed, row_attention
from causalnet.adapters.verify import check_patching

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _parts(n, heads, kv_heads, t, d, d_v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return (
        r(n, heads, 1, d),
        r(1, kv_heads, t, d),
        r(n, kv_heads, 1, d),
        r(1, kv_heads, t, d_v),
        r(n, kv_heads, 1, d_v),
    )


def _full(prefix, own):
    return torch.cat([prefix.expand(own.shape[0], *prefix.shape[1:]), own], dim=-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_attend_equals_sdpa_over_the_concatenated_keys_and_values(dtype, heads, kv_heads, mask):
    n, t, d, d_v = 7, 5, 8, 6
    q, kp, ko, vp, vo = _parts(n, heads, kv_heads, t, d, d_v, dtype)
    m = None
    if mask is not None:  # per row: some prefix positions cut (a window), its own kept
        keep = torch.rand(n, 1, 1, t + 1, generator=torch.Generator().manual_seed(2)) > 0.4
        keep[..., -1] = True
        m = keep if mask == "bool" else torch.where(keep, 0.0, -1e4).to(dtype) + 0.1
    scale = 0.3
    got = attend(q, PrefixKV(kp, ko), PrefixKV(vp, vo), m, scale)  # [n, 1, H, d_v]
    want = F.scaled_dot_product_attention(
        q, _full(kp, ko), _full(vp, vo), attn_mask=m, scale=scale, enable_gqa=heads != kv_heads
    )
    assert got.shape == (n, 1, heads, d_v)
    assert (got.transpose(1, 2) - want).abs().max() <= TOL[dtype]


def test_any_other_operation_sees_the_concatenated_tensor():
    q, kp, ko, vp, vo = _parts(3, 4, 2, 5, 8, 8, torch.float64)
    key, whole = PrefixKV(kp, ko), _full(kp, ko)
    assert key.shape == whole.shape and key.dtype == whole.dtype
    assert torch.equal(key.transpose(2, 3), whole.transpose(2, 3))
    assert torch.equal(key[:, :, -2:], whole[:, :, -2:])
    assert torch.equal(torch.matmul(q[:, :2], key.transpose(2, 3)), q[:, :2] @ whole.mT)
    out = key * 2.0
    assert type(out) is torch.Tensor and torch.equal(out, whole * 2)


def test_outside_the_context_the_frozen_cache_hands_out_plain_tensors():
    _, kp, ko, _, _ = _parts(3, 4, 2, 5, 8, 8, torch.float32)
    assert type(prefixed(kp, ko)) is torch.Tensor
    assert torch.equal(prefixed(kp, ko), _full(kp, ko))
    with row_attention():
        assert isinstance(prefixed(kp, ko), PrefixKV)
        with row_attention():  # nested
            assert isinstance(prefixed(kp, ko), PrefixKV)
        assert isinstance(prefixed(kp, ko), PrefixKV)
    assert type(prefixed(kp, ko)) is torch.Tensor


def test_the_sdpa_entry_is_wrapped_only_within_the_context_even_when_it_raises():
    mapping = AttentionInterface._global_mapping
    before = mapping["sdpa"]
    with pytest.raises(RuntimeError, match="inside"):
        with row_attention():
            assert mapping["sdpa"] is not before
            assert mapping["sdpa"].original is before
            raise RuntimeError("inside")
    assert mapping["sdpa"] is before


class _Attn(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


def test_what_it_does_not_compute_goes_to_the_original_sdpa_with_the_whole_tensors():
    q, kp, ko, vp, vo = _parts(3, 4, 2, 5, 8, 8, torch.float32)
    bias = torch.randn(3, 4, 1, 6)
    with row_attention():
        wrapped = AttentionInterface._global_mapping["sdpa"]
        got, _ = wrapped(_Attn(), q, PrefixKV(kp, ko), PrefixKV(vp, vo), None, position_bias=bias)
        with pytest.raises(ValueError, match="softcap"):
            wrapped(_Attn(), q, PrefixKV(kp, ko), PrefixKV(vp, vo), None, softcap=2.0)
        plain, _ = wrapped(_Attn(), q, _full(kp, ko), _full(vp, vo), None, scaling=0.2)
    want, _ = sdpa_attention_forward(
        _Attn(), q, _full(kp, ko), _full(vp, vo), None, position_bias=bias
    )
    assert (got - want).abs().max() <= 1e-6
    ref, _ = sdpa_attention_forward(_Attn(), q, _full(kp, ko), _full(vp, vo), None, scaling=0.2)
    assert torch.equal(plain, ref)


def _qwen3(attn: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = T.Qwen3Config(**{**DECODER_SIZES, "pad_token_id": 0}, attn_implementation=attn)
    return T.Qwen3ForCausalLM(cfg).eval().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_an_sdpa_model_patches_through_the_row_attention_and_stays_exact(monkeypatch, dtype):
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return attend(*args, **kwargs)

    monkeypatch.setattr(rowattention, "attend", counted)
    adapter = adapt(_qwen3("sdpa", dtype), generic=True)
    assert adapter.fast_refusal is None, adapter.fast_refusal
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    calls.clear()
    assert check_patching(adapter, decoder_prompt(9), "layer", n_patches=2) <= tol
    assert calls, "the fast path never reached the row attention"
    assert max(calls) > 1  # rows, not one sequence


def test_an_eager_model_reads_the_whole_keys_and_stays_exact(monkeypatch):
    calls = []
    monkeypatch.setattr(rowattention, "attend", lambda *a, **k: calls.append(1))
    adapter = adapt(_qwen3("eager", torch.float32), generic=True)
    assert adapter.fast_refusal is None, adapter.fast_refusal
    assert check_patching(adapter, decoder_prompt(9), "layer", n_patches=2) <= 1e-4
    assert calls == []
    assert math.isfinite(adapter.fast_error) and adapter.fast_error <= 1e-4
