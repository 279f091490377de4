"""The Llama family adapter (adapters/llama.py): Llama, Mistral, Qwen2 switches.

Tolerances: logits vs Hugging Face 1e-4 (float32) / 1e-10 (float64), as in test_base.py.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from causalnet.adapters import SUPPORTED_FAMILIES, adapt
from causalnet.adapters.llama import LlamaAdapter
from causalnet.errors import ContextError, ModelError, UnsupportedModelError


def _tiny_llama(dtype: torch.dtype = torch.float64, **kw) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=101,
        initializer_range=0.15,
    )
    config.update(kw)
    return LlamaForCausalLM(LlamaConfig(**config)).to(dtype).eval()


def _max_logit_diff(model, adapter, tokens) -> float:
    with torch.no_grad():
        ref = model(input_ids=tokens[None], use_cache=False).logits
    return float((adapter.forward(tokens).logits - ref).abs().max())


TOKENS = torch.tensor([5, 17, 3, 99, 42, 8, 64, 23, 11])


def test_architecture_is_read_from_the_config(shared_tiny):
    a = shared_tiny("llama-tied-gqa", torch.float32).adapter
    arch = a.arch
    assert (arch.family, arch.n_layers, arch.n_heads, arch.n_kv_heads) == ("llama", 3, 4, 2)
    assert (arch.d_model, arch.d_head, arch.vocab_size) == (64, 16, 101)
    assert arch.norm == "rms" and not arch.parallel_residual
    assert a.attn_scale == 16**-0.5


def test_sigma_is_the_final_rmsnorm_scale_as_hugging_face_computes_it(llama):
    a = llama.adapter
    run = a.forward(llama.tokens)
    norm = llama.model.model.norm
    with torch.no_grad():
        expect = norm(run.resid_final)
        got = norm.weight * run.resid_final / run.sigma[..., None]
    tol = 1e-6 if llama.dtype == torch.float32 else 1e-7  # HF's RMSNorm runs in float32
    assert (got - expect).abs().max() <= tol * expect.abs().max()


def test_readout_direction_is_gain_times_centred_unembedding(shared_tiny):
    t = shared_tiny("llama-untied-bias", torch.float64)
    w, const = t.adapter.readout(7)
    w_u = t.model.lm_head.weight
    assert not torch.equal(w_u, t.model.model.embed_tokens.weight)  # untied
    expect = t.model.model.norm.weight * (w_u[7] - w_u.mean(0))
    assert torch.allclose(w, expect, atol=1e-14) and const == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_weights_are_read_by_reference_not_copied(tiny_factory, dtype):
    llama = tiny_factory("llama-tied-gqa", dtype)  # a private copy: its weights are edited
    a = llama.adapter
    with torch.no_grad():
        llama.model.model.layers[1].mlp.down_proj.weight.mul_(3.0)
        llama.model.model.norm.weight.add_(0.5)
    assert _max_logit_diff(llama.model, a, llama.tokens) <= llama.logit_atol
    w, _ = a.readout(3)
    w_u = llama.model.lm_head.weight
    assert torch.allclose(w, llama.model.model.norm.weight * (w_u[3] - w_u.mean(0)))


def test_qwen2_qkv_biases_are_used(tiny_factory):
    t = tiny_factory("qwen2-bias", torch.float64)  # a private copy: its biases are edited
    attn = t.model.model.layers[0].self_attn
    assert attn.q_proj.bias.abs().max() > 0.01 and attn.o_proj.bias is None
    assert _max_logit_diff(t.model, t.adapter, TOKENS) <= 1e-10
    with torch.no_grad():
        attn.k_proj.bias.mul_(20.0)  # a change the adapter must see through the module
    assert _max_logit_diff(t.model, t.adapter, TOKENS) <= 1e-10


def test_o_proj_bias_is_split_equally_over_the_heads(shared_tiny):
    t = shared_tiny("llama-untied-bias", torch.float64)
    run = t.adapter.forward(TOKENS, granularity="head", cache=True)
    b = t.model.model.layers[0].self_attn.o_proj.bias
    zero = torch.zeros(4, 16, dtype=torch.float64)
    assert torch.allclose(t.adapter.head_outputs(0, zero), (b / 4).expand(4, -1))
    layer = t.adapter.forward(TOKENS).values["attn.0"]
    heads = sum(run.values[f"attn.0.h{h}"] for h in range(4))
    assert (heads - layer).abs().max() <= 1e-12


def test_mistral_sliding_window_masks_old_keys(tiny_factory):
    t = tiny_factory("mistral-window", torch.float64)  # private: its windows are switched off
    assert t.adapter.attention_window(0) == 3
    assert _max_logit_diff(t.model, t.adapter, TOKENS) <= 1e-10
    t.adapter._windows = [None] * t.adapter.arch.n_layers  # the window must matter here
    assert _max_logit_diff(t.model, t.adapter, TOKENS) > 1e-3


def test_qwen2_sliding_window_applies_to_its_sliding_layers_only():
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=101,
        use_sliding_window=True,
        sliding_window=3,
        max_window_layers=1,
        initializer_range=0.15,
    )
    model = Qwen2ForCausalLM(config).double().eval()
    a = adapt(model)
    assert [a.attention_window(layer) for layer in range(3)] == [None, 3, 3]
    assert _max_logit_diff(model, a, TOKENS) <= 1e-10


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
            "rope_theta": 500000.0,
        },
    ],
    ids=["linear", "llama3"],
)
def test_rope_scaling_goes_through_the_models_rotary_module(rope):
    model = _tiny_llama(rope_parameters=rope)
    assert _max_logit_diff(model, adapt(model), TOKENS) <= 1e-10


def test_explicit_head_dim_different_from_hidden_over_heads():
    model = _tiny_llama(head_dim=8)
    a = adapt(model)
    assert a.arch.d_head == 8 and a.attn_scale == 8**-0.5
    assert _max_logit_diff(model, a, TOKENS) <= 1e-10


def test_float32_model_matches_hugging_face(shared_tiny):
    t = shared_tiny("qwen2-bias", torch.float32)
    assert _max_logit_diff(t.model, t.adapter, TOKENS) <= 1e-4


def test_adapter_puts_the_model_in_eval_mode():
    model = _tiny_llama().train()
    adapt(model)
    assert not model.training


# ---- refusals -----------------------------------------------------------------------------
def test_unsupported_family_lists_the_supported_ones():
    class Config:
        model_type = "gemma2"

    class Fake(torch.nn.Module):
        config = Config()

    with pytest.raises(UnsupportedModelError, match="gemma2") as err:
        adapt(Fake())
    for family in SUPPORTED_FAMILIES:
        assert repr(family) in str(err.value)


def test_a_llama_class_other_than_the_causal_lm_is_refused():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=96,
        vocab_size=101,
        pad_token_id=0,
    )
    with pytest.raises(ModelError, match="LlamaForSequenceClassification"):
        adapt(LlamaForSequenceClassification(config))


def test_config_switches_that_change_the_math_are_refused():
    model = _tiny_llama()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ModelError, match="final_logit_softcapping"):
        LlamaAdapter(model)


def test_a_nonstandard_attention_scale_is_refused():
    model = _tiny_llama()
    model.model.layers[1].self_attn.scaling = 0.5
    with pytest.raises(ModelError, match="layer 1 attention scale"):
        LlamaAdapter(model)


# ---- tokens -------------------------------------------------------------------------------
def _word_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    vocab = {"<s>": 0, "<unk>": 1, "the": 2, "cat": 3, "sat": 4, "Ġcat": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 0)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")


@pytest.mark.parametrize("add_bos", [True, False])
def test_encode_follows_the_tokenizers_own_bos_default(add_bos):
    a = adapt(_tiny_llama(), _word_tokenizer(add_bos))
    ids = a.encode("the cat sat").tolist()
    assert ids == ([0] if add_bos else []) + [2, 3, 4]
    assert a.first_token("cat sat") == 3  # never a special token


def test_encode_refuses_an_empty_prompt_and_a_missing_tokenizer():
    a = adapt(_tiny_llama(), _word_tokenizer(False))
    with pytest.raises(ContextError, match="empty prompt"):
        a.encode("")
    with pytest.raises(ModelError, match="no tokenizer"):
        adapt(_tiny_llama()).encode("the cat")
