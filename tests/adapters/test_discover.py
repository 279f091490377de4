"""Any decoder without a hand-written adapter: discovery, verification and patching (issue 10).

Oracles: the model's own logits (clean runs, readouts), the one-forward-per-patch oracle of
:func:`causalnet.adapters.verify.check_patching` and, where a hand-written family applies,
that family's adapter (block methods and fast patch engine: independent code). Tolerances:
1e-5 relative in float32 / 1e-10 in float64 for the identities, 1e-4 / 1e-9 for patching.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T
from tiny_models import DECODER_SIZES

from causalnet.adapters import adapt
from causalnet.adapters.generic import GenericAdapter
from causalnet.adapters.naive import naive_patch, naive_readout
from causalnet.adapters.tiny_configs import tiny_model
from causalnet.adapters.verify import check_patching
from causalnet.errors import ModelError, UnsupportedModelError


def _base(**kw: object) -> dict:
    return {**DECODER_SIZES, **kw}


# name -> (config class, model class, config kwargs, parallel residual, norm form, heads)
GENERIC = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _base(), False, "rms", True),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        _base(num_local_experts=4, num_experts_per_tok=2),
        False,
        "rms",
        True,
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _base(pad_token_id=0), False, "rms", True),
    # one weightless norm module applied to the embeddings and again after the last block
    "nanochat": ("NanoChatConfig", "NanoChatForCausalLM", _base(), False, "rms", True),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _base(), False, "rms", True),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", _base(head_dim=8), False, "rms", True),
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        _base(residual_multiplier=0.5, logits_scaling=4.0, embedding_multiplier=3.0),
        False,
        "rms",
        True,
    ),
    "bloom": (
        "BloomConfig",
        "BloomForCausalLM",
        dict(n_layer=2, n_head=4, hidden_size=32, vocab_size=64),
        False,
        "layer",
        True,
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64),
        False,
        "layer",
        True,
    ),
    "neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        _base(use_parallel_residual=True),
        True,
        "layer",
        True,
    ),
}
DTYPES = {"f32": torch.float32, "f64": torch.float64}
CASES = [(n, d) for n in GENERIC for d in DTYPES if not (n == "mixtral" and d == "f64")]
TOKENS = torch.tensor([3, 5, 7, 11, 13, 2, 1, 9])


def build(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    cfg_cls, model_cls, kwargs, *_ = GENERIC[name]
    torch.manual_seed(seed)
    model = getattr(T, model_cls)(getattr(T, cfg_cls)(**kwargs))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # norm gains away from their init, so the forms are told apart
        for pname, p in model.named_parameters():
            if p.ndim == 1 and pname.endswith("weight"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval().to(dtype)


@pytest.fixture(params=CASES, ids=[f"{n}-{d}" for n, d in CASES])
def generic(request: pytest.FixtureRequest) -> tuple[str, GenericAdapter]:
    name, d = request.param
    return name, adapt(build(name, DTYPES[d]), generic=True)


def test_discovery_finds_the_parts_the_residual_kind_and_the_norm(generic):
    name, adapter = generic
    _, _, _, parallel, form, heads = GENERIC[name]
    parts = adapter.parts
    assert parts.parallel_residual is parallel
    assert parts.final_norm.form == form
    assert (adapter.head_refusal is None) is heads
    assert len(parts.blocks) == 2
    if name == "granite":
        assert parts.alpha == parts.beta == [0.5, 0.5]
        assert parts.readout.logit_scale == pytest.approx(0.25)
    if name == "gemma2":
        assert parts.readout.softcap == 30.0
        assert parts.final_norm.gain_source == "1 + weight"
        assert parts.attn_names[0].endswith("post_attention_layernorm")
    v = adapter.verification
    assert max(v.blocks) <= v.tolerance and v.eq21 <= v.tolerance
    assert v.logits <= v.readout_tolerance and v.readout <= v.readout_tolerance


def test_clean_run_reads_out_the_models_own_logits(generic):
    name, adapter = generic
    tol = 1e-5 if adapter.dtype == torch.float32 else 1e-6
    with torch.no_grad():
        logits = adapter.model(input_ids=TOKENS[None], use_cache=False).logits[0, -1].double()
    clean = adapter.clean_run(TOKENS)
    assert clean.target == int(torch.argmax(logits))
    cap = adapter.parts.readout.softcap
    pre_cap = logits if cap is None else cap * torch.atanh(logits / cap)  # Gemma 2: before the cap
    centred = float(pre_cap[clean.target] - pre_cap.mean())
    assert abs(clean.centred_logit - centred) <= tol * max(1.0, abs(centred))
    summed = float(clean.direct_effects.sum()) + clean.readout_const
    assert abs(summed - centred) <= tol * max(1.0, abs(centred))


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_patch_matches_one_hooked_forward_per_patch(generic, granularity):
    name, adapter = generic
    if granularity == "head" and adapter.head_refusal is not None:
        with pytest.raises(ModelError, match="use granularity='layer'"):
            adapter.clean_run(TOKENS, granularity)
        return
    err = check_patching(adapter, TOKENS, granularity, n_patches=2)
    assert err <= (1e-4 if adapter.dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("name", ["qwen3", "gpt2", "neox"])
def test_patch_matches_the_naive_oracle_of_the_hand_written_families(name):
    adapter = adapt(build(name), generic=True)
    clean = adapter.clean_run(TOKENS, "head")
    gen = torch.Generator().manual_seed(3)
    for site in ["embed", "attn.0.h1", "mlp.0", "attn.1.h3", "mlp.1"]:
        values = torch.randn(1, 3, adapter.arch.d_model, generator=gen)
        run = adapter.patch(clean, [site], values)
        naive = naive_patch(adapter, TOKENS, site, values[0], granularity="head")
        centred, direct, sigma = naive_readout(adapter, naive, clean.target)
        assert (run.centred_logit[0] - centred).abs().max() <= 1e-4, site
        assert (run.direct_effects[0] - direct).abs().max() <= 1e-4, site
        assert (run.sigma[0] - sigma).abs().max() <= 1e-5, site


def test_patching_the_clean_values_reproduces_the_clean_run():
    adapter = adapt(build("olmo2"), generic=True)
    clean = adapter.clean_run(TOKENS)
    values = clean.site_values[1:, None, :]
    run = adapter.patch(clean, adapter.sites(), values)
    assert run.total_effect.abs().max() <= 1e-5
    assert (run.direct_effects - clean.direct_effects).abs().max() <= 1e-5


def test_final_values_equal_the_clean_runs_site_values():
    adapter = adapt(build("phi3"), generic=True)
    prompts = [TOKENS[:5], TOKENS, TOKENS[2:]]
    pool = adapter.final_values(prompts, "head")
    for i, p in enumerate(prompts):
        assert torch.allclose(pool[i], adapter.clean_run(p, "head").site_values, atol=1e-6)


# ---- refusals ---------------------------------------------------------------------------------
class _CappedBlock(torch.nn.Module):
    """A block with a nonlinearity after its residual add: tanh(x + attn + mlp)."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.inner = block

    def forward(self, hidden_states, *args, **kwargs):
        out = self.inner(hidden_states, *args, **kwargs)
        return torch.tanh(out[0] if isinstance(out, tuple) else out)


def test_a_nonlinearity_after_the_residual_add_is_refused_naming_the_block():
    model = build("qwen3")
    model.model.layers[1] = _CappedBlock(model.model.layers[1])
    with pytest.raises(UnsupportedModelError, match=r"block model\.layers\.1: .*nonlinearity"):
        adapt(model)


class _StdNorm(torch.nn.Module):
    """A final norm of no supported form: g * x / (std(x) + eps)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d) + 0.1)

    def forward(self, x):
        return self.weight * x / (x.std(-1, keepdim=True) + 1e-2)


def test_a_final_norm_of_unknown_form_is_refused_with_the_best_fit():
    model = build("qwen3")
    model.model.norm = _StdNorm(32)
    with pytest.raises(UnsupportedModelError, match=r"final norm model\.norm .*no known form"):
        adapt(model)


def test_a_final_norm_that_also_runs_before_the_first_block_is_found_by_its_last_call():
    model = build("nanochat")  # float32: its norm computes in float32 in any model dtype
    adapter = adapt(model, generic=True)
    assert adapter.final_norm_module() is model.model.norm
    clean = adapter.clean_run(TOKENS)
    # read at the norm's last call: the direct effects sum to the centred logit (at its first
    # call, on the embeddings, they would not)
    total = float(clean.direct_effects.sum()) + clean.readout_const
    assert abs(total - clean.centred_logit) < 1e-5 * max(1.0, abs(clean.centred_logit))
    assert check_patching(adapter, TOKENS, "layer") < 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-9)])
def test_an_unembedding_reading_a_constant_times_the_final_norm_is_read_out_with_it(dtype, tol):
    # MiniCPM3: lm_head(norm(z) / logits_scaling)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model("minicpm3").to(dtype)
    scaling = model.config.logits_scaling
    assert scaling != 1.0
    adapter = adapt(model, generic=True)
    assert adapter.final_norm_module() is model.model.norm
    assert adapter.parts.readout.input_scale == pytest.approx(1 / scaling, rel=1e-6)
    tokens = TOKENS[TOKENS < model.config.vocab_size]
    clean = adapter.clean_run(tokens)
    logits = model(input_ids=tokens[None]).logits[0, -1].double()
    want = float(logits[clean.target] - logits.mean())
    assert abs(clean.centred_logit - want) <= tol * max(1.0, abs(want))
    # the direct effects carry the input scale (off by 1 / logits_scaling without it); 1e-6:
    # the model's RMSNorm rounds to float32 even in a float64 model, the readout's sigma does not
    total = float(clean.direct_effects.sum()) + clean.readout_const
    assert abs(total - want) <= max(tol, 1e-6) * max(1.0, abs(want))
    assert check_patching(adapter, tokens, "layer") <= tol


def test_heads_under_a_norm_after_the_attention_are_shares_of_that_norm():
    """(tests/adapters/test_postnorm_heads.py checks them against the naive oracle)"""
    adapter = adapt(build("gemma2"))
    assert isinstance(adapter, GenericAdapter)  # no hand-written Gemma 2 family
    assert adapter.head_refusal is None and adapter.arch.sublayer_norms
    assert adapter.parts.post_norms[0].name == "model.layers.0.post_attention_layernorm"
    assert adapter.sites("head")[:2] == ["attn.0.h0", "attn.0.h1"]


def test_a_module_that_is_not_a_transformers_model_needs_a_declaration():
    with pytest.raises(UnsupportedModelError, match="Declaration"):
        adapt(torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10)))
