"""Fast patching of discovered decoders: the model's own blocks replayed at the final position
against its own cache (issue 11, section 1).

Oracle: :func:`causalnet.adapters.verify.check_patching`, one plain hooked forward of the whole
prompt per (site, patch) -- independent of the replay (no cache, no row batching). Tolerances
1e-4 (float32) and 1e-9 (float64) of max(1, |clean centred logit|). The model types cover what
the model's own modules must honour: grouped KV heads (all), sliding windows shorter than the
prompt (Mistral, Gemma 2, Cohere 2), MoE routing per row (Mixtral, Qwen3-MoE), rotary variants
(partial rotary: Phi-3 / NeoX; interleaved: Cohere), ALiBi (Bloom, Falcon with alibi), learned
positions (GPT-2), parallel residuals (NeoX, Cohere, Falcon), norms after the sublayers
(OLMo-2, Gemma 2) and multipliers (Granite).
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from tiny_models import DECODER_SIZES, decoder_prompt

from causalnet.adapters import adapt, fastpatch
from causalnet.adapters.generic import GenericAdapter
from causalnet.adapters.trace import reforward_patch
from causalnet.adapters.verify import check_patching

PROMPT_LEN = 9
WINDOW = 3  # shorter than the prompt, so the windows cut


def _base(**kw: object) -> dict:
    return {**DECODER_SIZES, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0, **kw}


_GPT = dict(vocab_size=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
_MOE = dict(num_experts_per_tok=2, experts_implementation="eager")
#: id -> (config class, model class, config kwargs)
MODELS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _base()),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        _base(num_experts=4, moe_intermediate_size=24, **_MOE),
    ),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", _base(num_local_experts=4, **_MOE)),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", _base(sliding_window=WINDOW)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _base(partial_rotary_factor=0.5)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _base()),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        _base(head_dim=8, sliding_window=WINDOW, final_logit_softcapping=3.0),
    ),
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        _base(residual_multiplier=0.5, logits_scaling=4.0, embedding_multiplier=3.0),
    ),
    "cohere2": (
        "Cohere2Config",
        "Cohere2ForCausalLM",
        _base(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    ),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, **_GPT)),
    "bloom-alibi": (
        "BloomConfig",
        "BloomForCausalLM",
        dict(n_layer=2, n_head=4, hidden_size=32, **_GPT),
    ),
    "falcon-alibi": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True, **_GPT),
    ),
    "falcon-rotary-mqa": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True, **_GPT),
    ),
    "neox-parallel": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        _base(use_parallel_residual=True, rotary_pct=0.5),
    ),
    "opt-flat-mlp": (  # its MLP (fc1 -> act -> fc2) runs on the stream flattened to [B*T, d]
        "OPTConfig",
        "OPTForCausalLM",
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48, **_GPT),
    ),
}


def _model(name: str, dtype: torch.dtype) -> torch.nn.Module:
    cfg_cls, model_cls, kw = MODELS[name]
    torch.manual_seed(0)
    model = getattr(T, model_cls)(getattr(T, cfg_cls)(**kw)).eval().to(dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # gains around 1, biases around 0: exercised, not left at 1 and 0
        for pname, p in model.named_parameters():
            if p.ndim == 1:
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
                p.copy_(1 + 0.3 * noise if pname.endswith("weight") else 0.1 * noise)
    return model


def _tokens() -> torch.Tensor:
    return decoder_prompt(PROMPT_LEN)


@pytest.fixture(scope="module", params=[torch.float32, torch.float64], ids=["f32", "f64"])
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param


@pytest.mark.parametrize("name", list(MODELS))
def test_fast_patching_equals_one_forward_per_patch(name, dtype):
    adapter = adapt(_model(name, dtype), generic=True)
    assert isinstance(adapter, GenericAdapter)
    assert adapter.fast_refusal is None, adapter.fast_refusal
    atol = 1e-9 if dtype == torch.float64 else 1e-4
    assert adapter.fast_error <= atol
    grans = ["layer"] + (["head"] if adapter.head_refusal is None else [])
    for granularity in grans:
        assert check_patching(adapter, _tokens(), granularity, n_patches=2) <= atol


@pytest.mark.parametrize("name", ["mistral-window", "bloom-alibi", "neox-parallel"])
def test_fast_patching_at_an_earlier_position_and_mixed_sites(name):
    """Position 5 of 9 (the rest of the prompt is not run), embed, heads and whole layers in
    one call: equal to the re-forward of the whole prompt up to t (float64, 1e-9)."""
    adapter = adapt(_model(name, torch.float64), generic=True)
    clean = adapter.clean_run(_tokens(), "layer", position=5)
    sites = ["embed", "mlp.1", "attn.0.h1", "attn.1", "attn.1.h3", "mlp.0"]
    if adapter.head_refusal is not None:
        sites = [s for s in sites if ".h" not in s]
    parsed = [adapter.site(s) for s in sites]
    gen = torch.Generator().manual_seed(4)
    values = torch.randn(len(sites), 3, adapter.arch.d_model, generator=gen, dtype=torch.float64)
    got = adapter.patch(clean, sites, values)
    want = reforward_patch(adapter, clean, parsed, values)
    for field in ("centred_logit", "sigma", "direct_effects", "total_effect"):
        assert (getattr(got, field) - getattr(want, field)).abs().max() <= 1e-9, field


def test_moe_rows_are_routed_by_their_own_patched_input():
    """The replayed Mixtral rows pick different experts (the routing is exercised), and the
    result equals one forward per row (each row routed alone)."""
    adapter = adapt(_model("mixtral", torch.float64), generic=True)
    router = adapter.model.model.layers[1].mlp.gate
    picked: list[torch.Tensor] = []
    handle = router.register_forward_hook(lambda m, a, out: picked.append(a[0].detach()))
    try:
        assert check_patching(adapter, _tokens(), "layer", n_patches=3) <= 1e-9
    finally:
        handle.remove()
    logits = max(picked, key=len) @ router.weight.T  # the replay's batch of rows at layer 1
    top = logits.topk(2, dim=-1).indices.sort(-1).values
    assert len({tuple(r) for r in top.tolist()}) > 1


def test_a_disagreeing_fast_path_is_refused_with_the_reason_and_patching_stays_exact(
    monkeypatch: pytest.MonkeyPatch,
):
    """A replay that is off by 1e-3 (a block's output nudged) is caught on the probe: the
    adapter records why and by how much, and patches by re-forwards that equal the oracle."""
    real = fastpatch.fast_patch

    def nudged(adapter, clean, parsed, values):
        run = real(adapter, clean, parsed, values)
        run.centred_logit = run.centred_logit + 1e-3
        return run

    monkeypatch.setattr(fastpatch, "fast_patch", nudged)
    adapter = adapt(_model("qwen3", torch.float32), generic=True)
    assert adapter.fast_refusal is not None
    assert "disagrees with the hooked re-forward" in adapter.fast_refusal
    assert adapter.fast_error == pytest.approx(1e-3, rel=0.2)
    assert check_patching(adapter, _tokens(), "layer", n_patches=2) <= 1e-4


def test_a_decoder_whose_blocks_get_no_cache_falls_back_with_the_reason():
    """A model that is not a transformers model (its blocks get no Cache) is patched by
    re-forwards, and says so."""
    from test_declare import DECL, TOKENS, NanoGPT  # noqa: PLC0415 (the declared nanoGPT)

    adapter = adapt(NanoGPT(parallel=False).eval(), declare=DECL)
    assert adapter.fast_refusal is not None and "takes no cache" in adapter.fast_refusal
    assert adapter.fast_error is None
    assert check_patching(adapter, TOKENS, "layer", n_patches=2) <= 1e-4


def test_a_sparse_attention_indexers_keys_are_frozen_like_keys_and_values():
    """DeepSeek-V3.2's sparse-attention indexer keeps keys of its own in the cache
    (``update_indexer``): the replay freezes them as it freezes keys and values, so the fast
    path is used and agrees with one plain hooked forward per patch (float32; in float64 its
    router's float32 products make every row a forward of its own, next test)."""
    from causalnet.adapters.tiny_configs import tiny_model  # noqa: PLC0415

    adapter = adapt(tiny_model("deepseek_v32"), generic=True)
    assert adapter.fast_refusal is None, adapter.fast_refusal
    assert check_patching(adapter, _tokens(), "layer", n_patches=2) <= 1e-4


@pytest.mark.parametrize("name", ["deepseek_v3", "minimax_m2", "solar_open"])
def test_a_float64_model_with_float32_router_parts_is_patched_one_row_per_forward(name):
    """These MoE routers compute their logits (a product) or sigmoid in float32 even in a
    float64 model, and float32 rounding there depends on how many rows are batched: batched
    rows were 1.5e-8 to 6.2e-8 off the one-forward-per-patch oracle. The adapter sees the
    float32 operations, says so, and patches one row per forward: within 1e-9 (float64)."""
    from causalnet.adapters.finalrows import low_precision_ops  # noqa: PLC0415
    from causalnet.adapters.tiny_configs import tiny_model  # noqa: PLC0415

    model = tiny_model(name, experts_implementation="eager").to(torch.float64)
    adapter = adapt(model, generic=True)
    assert any("(float32)" in op for op in low_precision_ops(model, _tokens()))
    assert adapter.fast_refusal is not None
    assert "lower precision" in adapter.fast_refusal
    assert check_patching(adapter, _tokens(), "layer", n_patches=2) <= 1e-9
    assert check_patching(adapter, _tokens(), "head", n_patches=2) <= 1e-9


@pytest.mark.parametrize("name", ["qwen3", "mixtral", "gemma2"])
def test_a_float64_model_whose_float32_parts_are_row_wise_keeps_the_fast_path(name):
    """Hugging Face computes norms, rotary tables and softmax (attention, Mixtral's router) in
    float32 even in float64, row by row: no product or elementwise transcendental op is float32,
    so the fast path is kept, and agrees with the oracle within 1e-9."""
    from causalnet.adapters.finalrows import low_precision_ops  # noqa: PLC0415

    model = _model(name, torch.float64)
    assert low_precision_ops(model, _tokens()) == []
    adapter = adapt(model, generic=True)
    assert adapter.fast_refusal is None, adapter.fast_refusal
    assert check_patching(adapter, _tokens(), "layer", n_patches=2) <= 1e-9


def test_the_frozen_cache_refuses_to_extend_any_other_state():
    """A cache method that would extend the frozen clean cache in place (a convolution or
    recurrent state, an indexer the capture did not see) is refused, naming it."""
    from causalnet.adapters.frozencache import FrozenCache  # noqa: PLC0415
    from causalnet.errors import UnsupportedModelError  # noqa: PLC0415

    frozen = FrozenCache(object(), {}, {})
    x = torch.zeros(2, 1, 4)
    for name in ("update_conv_state", "update_recurrent_state", "update_indexer"):
        with pytest.raises(UnsupportedModelError, match=name):
            getattr(frozen, name)(x, 0)
