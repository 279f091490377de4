"""Speed-ups of the discovered models' fast patching that must not change a value (issue 11):
sibling linears in one stacked product (:mod:`causalnet.adapters.linears`), the clean run's
own cache reused as the replay's earlier keys and values (:func:`causalnet.adapters.frozencache.
prefix_caches`), and the blocks' arguments at t shared by prompts of one length
(:func:`causalnet.adapters.replay.arguments_by_length`).

Oracles: each linear layer's own ``F.linear`` on the same input, the block's plain forward, and
the hooked re-forward of the whole prompt (:func:`causalnet.adapters.trace.reforward_patch`).
Tolerances: float64 1e-12 (same products, another grouping of rows), float32 1e-5 relative.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers as T
from tiny_models import DECODER_SIZES
from torch.nn import functional as F

from causalnet.adapters import adapt, frozencache, linears, replay
from causalnet.adapters.trace import reforward_patch


def _llama(dtype: torch.dtype = torch.float64, **kw: object) -> T.PreTrainedModel:
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(**{**DECODER_SIZES, **kw})).to(dtype).eval()


def _watched(model: T.PreTrainedModel) -> list:
    blocks = list(model.model.layers)
    x = torch.randn(1, 5, 32, dtype=model.dtype)
    with torch.no_grad(), linears.fast_linears(blocks, watch=True):
        model(inputs_embeds=x)
    return blocks


def test_siblings_are_the_linears_a_block_calls_on_one_input():
    model = _llama()
    blocks = _watched(model)
    attn, mlp = blocks[0].self_attn, blocks[0].mlp
    qkv = linears.siblings_of(attn.q_proj)
    assert qkv is not None and qkv is linears.siblings_of(attn.v_proj)
    assert [r() for r in qkv.members] == [attn.q_proj, attn.k_proj, attn.v_proj]
    gate_up = linears.siblings_of(mlp.gate_proj)
    assert [r() for r in gate_up.members] == [mlp.gate_proj, mlp.up_proj]
    # the output projection and down projection are called on inputs of their own
    assert linears.siblings_of(attn.o_proj) is None
    assert linears.siblings_of(mlp.down_proj) is None
    assert linears.siblings_of(blocks[1].self_attn.q_proj) is not qkv  # per block


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_a_block_with_stacked_siblings_computes_what_its_own_forward_does(dtype, tol):
    model = _llama(dtype)
    blocks = _watched(model)
    x = torch.randn(1, 6, 32, dtype=dtype)
    with torch.no_grad():
        want = model(inputs_embeds=x).logits
        with linears.fast_linears(blocks):
            assert "forward" in vars(blocks[0].self_attn.q_proj)
            got = model(inputs_embeds=x).logits
    assert float((got - want).abs().max() / want.abs().max()) < tol
    assert all("forward" not in vars(m) for b in blocks for m in b.modules())  # restored


def test_a_sibling_called_on_another_tensor_computes_on_that_tensor():
    model = _llama()
    blocks = _watched(model)
    attn = blocks[0].self_attn
    x, y = torch.randn(3, 32, dtype=torch.float64), torch.randn(3, 32, dtype=torch.float64)
    with torch.no_grad(), linears.fast_linears(blocks):
        q = attn.q_proj(x)
        x.mul_(2.0)  # x edited in place: the product of x is stale
        v = attn.v_proj(x)
        k = attn.k_proj(y)  # not the product of x
    torch.testing.assert_close(q, F.linear(x / 2, attn.q_proj.weight), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k, F.linear(y, attn.k_proj.weight), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, F.linear(x, attn.v_proj.weight), rtol=1e-12, atol=1e-12)


def test_an_edited_sibling_weight_is_stacked_again():
    model = _llama()
    blocks = _watched(model)
    attn = blocks[0].self_attn
    x = torch.randn(3, 32, dtype=torch.float64)
    with torch.no_grad():
        with linears.fast_linears(blocks):
            attn.q_proj(x)
        attn.k_proj.weight.mul_(3.0)
        with linears.fast_linears(blocks):
            attn.q_proj(x)
            k = attn.k_proj(x)
    torch.testing.assert_close(k, F.linear(x, attn.k_proj.weight), rtol=1e-12, atol=1e-12)


def test_the_clean_run_keeps_its_cache_and_patching_from_it_is_exact():
    adapter = adapt(_llama(), generic=True)
    assert adapter.fast_refusal is None
    tokens = torch.tensor([3, 9, 4, 17, 8, 2, 11])
    clean = adapter.clean_run(tokens)
    kept = frozencache.prefix_of(clean)
    assert kept is not None and kept.get_seq_length() == len(tokens) - 1
    without = dataclasses.replace(clean)  # the same clean run, no cache kept for it
    assert frozencache.prefix_of(without) is None
    sites = adapter.sites()
    values = torch.randn(len(sites), 3, 32, dtype=torch.float64)
    with_cache = adapter.patch(clean, sites, values)
    assert kept.get_seq_length() == len(tokens) - 1  # the replay copied it, never extended it
    no_cache = adapter.patch(without, sites, values)
    parsed = [adapter.site(s) for s in sites]
    oracle = reforward_patch(adapter, clean, parsed, values)
    for run in (with_cache, no_cache):
        for name in ("centred_logit", "sigma", "direct_effects"):
            torch.testing.assert_close(
                getattr(run, name), getattr(oracle, name), rtol=1e-9, atol=1e-9
            )


def test_a_sliding_window_the_prompt_has_passed_keeps_no_cache():
    cfg = T.MistralConfig(**DECODER_SIZES, sliding_window=3)
    torch.manual_seed(0)
    model = T.MistralForCausalLM(cfg).double().eval()
    adapter = adapt(model, generic=True)
    long = adapter.clean_run(torch.tensor([3, 9, 4, 17, 8, 2]))
    assert frozencache.prefix_of(long) is None  # its window layers hold the last positions only
    short = adapter.clean_run(torch.tensor([3, 9]))
    assert frozencache.prefix_of(short) is not None


def _patch_is_exact(adapter, clean) -> None:
    sites = adapter.sites()
    values = torch.randn(len(sites), 2, 32, dtype=torch.float64)
    run = adapter.patch(clean, sites, values)
    oracle = reforward_patch(adapter, clean, [adapter.site(s) for s in sites], values)
    for name in ("centred_logit", "sigma", "direct_effects"):
        torch.testing.assert_close(getattr(run, name), getattr(oracle, name), rtol=1e-9, atol=1e-9)


def test_prompts_of_one_length_share_the_block_arguments_once_seen_equal(monkeypatch):
    adapter = adapt(_llama(), generic=True)
    assert adapter.fast_refusal is None
    calls = []
    real = replay.capture
    monkeypatch.setattr(replay, "capture", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompts = [torch.tensor(p) for p in ([3, 9, 4, 17, 8], [5, 1, 60, 2, 2], [7, 7, 30, 12, 40])]
    for i, tokens in enumerate(prompts):
        clean = adapter.clean_run(tokens)
        _patch_is_exact(adapter, clean)
        assert replay.arguments_by_length(adapter) is (None if i == 0 else True)
    assert len(calls) == 2  # the third prompt's replay needed no forward of its own
    _patch_is_exact(adapter, adapter.clean_run(torch.tensor([1, 2, 3])))  # a new length
    assert len(calls) == 3


def test_block_arguments_that_differ_between_prompts_of_one_length_are_never_shared(monkeypatch):
    adapter = adapt(_llama(), generic=True)
    assert adapter.fast_refusal is None
    real = replay.capture
    calls = []

    def token_dependent(adapter_, prompt, *a, **k):  # as if an argument followed the tokens
        one = real(adapter_, prompt, *a, **k)
        calls.append(1)
        kw = one.kwargs[0]
        cos, sin = kw["position_embeddings"]
        kw["position_embeddings"] = (cos * (1 + 1e-3 * int(prompt[0])), sin)
        return one

    monkeypatch.setattr(replay, "capture", token_dependent)
    for tokens in ([3, 9, 4, 17, 8], [5, 1, 60, 2, 2], [7, 7, 30, 12, 40]):
        adapter.clean_run(torch.tensor(tokens))
        clean = adapter.clean_run(torch.tensor(tokens))
        adapter.patch(clean, ["attn.0"], torch.zeros(1, 1, 32, dtype=torch.float64))
    assert replay.arguments_by_length(adapter) is False
    assert len(calls) == 3  # every prompt captured its own


def test_a_prompts_patch_is_the_same_whether_its_arguments_were_shared_or_captured():
    sites = ["embed", "attn.0", "mlp.0", "attn.1", "mlp.1"]
    values = torch.randn(len(sites), 2, 32, dtype=torch.float32)
    prompts = [torch.tensor(p) for p in ([3, 9, 4, 17, 8], [5, 1, 60, 2, 2], [7, 7, 30, 12, 40])]
    fresh = adapt(_llama(torch.float32), generic=True)
    alone = fresh.patch(fresh.clean_run(prompts[2]), sites, values)  # captured
    shared = adapt(_llama(torch.float32), generic=True)
    for tokens in prompts[:2]:
        shared.patch(shared.clean_run(tokens), sites, values)
    assert replay.arguments_by_length(shared) is True
    after = shared.patch(shared.clean_run(prompts[2]), sites, values)  # from the template
    for name in ("centred_logit", "sigma", "direct_effects"):
        assert torch.equal(getattr(alone, name), getattr(after, name)), name


def test_batched_clean_runs_keep_each_prompts_cache_and_patching_from_them_is_exact():
    adapter = adapt(_llama(), generic=True)
    assert adapter.fast_refusal is None
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 64, (n,), generator=gen) for n in (5, 9, 1, 7)]
    runs = adapter.clean_runs(prompts)
    kept = [frozencache.prefix_of(run) for run in runs]
    assert [c is not None for c in kept] == [True, True, False, True]  # 1 token: no earlier
    for prompt, cache in zip(prompts, kept, strict=True):
        if cache is not None:  # each prompt's own rows and positions, not the padded batch's
            assert cache.get_seq_length() == len(prompt) - 1
            assert all(layer.keys.shape[0] == 1 for layer in cache.layers)
    sites = adapter.sites()
    for run, prompt in zip(runs, prompts, strict=True):
        single = adapter.clean_run(prompt)
        torch.testing.assert_close(run.site_values, single.site_values, rtol=1e-12, atol=1e-12)
        values = torch.randn(len(sites), 2, 32, dtype=torch.float64, generator=gen)
        got = adapter.patch(run, sites, values)
        oracle = reforward_patch(adapter, single, [adapter.site(s) for s in sites], values)
        for name in ("centred_logit", "sigma", "direct_effects"):
            torch.testing.assert_close(
                getattr(got, name), getattr(oracle, name), rtol=1e-9, atol=1e-9
            )


def test_a_batched_clean_run_keeps_no_cache_past_a_sliding_window():
    torch.manual_seed(0)
    model = T.MistralForCausalLM(T.MistralConfig(**{**DECODER_SIZES, "sliding_window": 6}))
    adapter = adapt(model.to(torch.float64).eval(), generic=True)
    gen = torch.Generator().manual_seed(4)
    short, long = (torch.randint(3, 64, (n,), generator=gen) for n in (4, 12))
    # padded to 12 positions the window dropped the earliest: neither prompt's cut is exact
    assert all(frozencache.prefix_of(r) is None for r in adapter.clean_runs([short, long]))
    # two short prompts within the window: both kept
    both = adapter.clean_runs([short, short[:3]])
    assert [frozencache.prefix_of(r).get_seq_length() for r in both] == [3, 2]
    sites = adapter.sites()
    values = torch.randn(len(sites), 2, 32, dtype=torch.float64, generator=gen)
    for run in adapter.clean_runs([short, long]) + both:
        got = adapter.patch(run, sites, values)
        oracle = reforward_patch(adapter, run, [adapter.site(s) for s in sites], values)
        torch.testing.assert_close(got.centred_logit, oracle.centred_logit, rtol=1e-9, atol=1e-9)
