"""The Gemma 3 adapter (adapters/gemma.py): norms after the sublayers, layer granularity.

A tiny seeded Gemma3ForCausalLM (grouped key/value heads, q/k norms, attention biases, a
sliding window of 3 on layers 0 and 2 shorter than the 7-token prompt, separate rotary tables
per layer type, every norm gain randomised). Tolerances (max abs difference): logits and
patches vs Hugging Face and the naive hooked re-forward 1e-4 in float32; in float64 1e-10 for
the logits and the patch (the adapter calls the model's own norm modules), 1e-6 where the exact
linear decomposition meets a logit (Gemma's RMSNorm computes in float32 even in float64).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from causalnet.adapters import adapt
from causalnet.adapters.gemma import GemmaAdapter
from causalnet.adapters.naive import naive_patch, naive_readout
from causalnet.adapters.scm import to_scm
from causalnet.errors import ModelError

VOCAB = 101
DTYPES = {"f32": torch.float32, "f64": torch.float64}
ATOL = {torch.float32: 1e-4, torch.float64: 1e-10}
DECOMPOSITION_ATOL = {torch.float32: 1e-4, torch.float64: 1e-6}


def build(dtype: torch.dtype = torch.float32, **overrides: object) -> Gemma3ForCausalLM:
    config = dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=96,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        sliding_window=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=16,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
        attention_bias=True,
        initializer_range=0.15,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    config.update(overrides)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**config))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norm gains (used as 1 + g) and biases, randomised
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval().to(dtype)


def prompt(n: int = 7, seed: int = 123) -> Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=list(DTYPES), ids=list(DTYPES))
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return DTYPES[request.param]


def hf_centred(model: nn.Module, tokens: Tensor) -> Tensor:
    with torch.no_grad():
        logits = model(input_ids=tokens[None], use_cache=False).logits[0, -1]
    return logits - logits.mean()


def test_adapt_picks_the_gemma_adapter_with_sublayer_norms() -> None:
    a = adapt(build())
    assert isinstance(a, GemmaAdapter)
    assert a.arch.sublayer_norms and not a.arch.parallel_residual and a.arch.norm == "rms"
    assert [a.attention_window(layer) for layer in range(3)] == [3, None, 3]
    assert a.attn_scale == 16**-0.5


def test_forward_logits_match_hugging_face(dtype) -> None:
    model = build(dtype)
    tokens = torch.stack([prompt(), prompt(seed=5)])
    run = adapt(model).forward(tokens)
    with torch.no_grad():
        ref = model(input_ids=tokens, use_cache=False).logits
    assert (run.logits - ref).abs().max() <= ATOL[dtype]


def test_normed_sublayer_outputs_sum_to_the_final_residual_eq21(dtype) -> None:
    a = adapt(build(dtype))
    run = a.forward(prompt())
    total = torch.stack(list(run.values.values())).sum(0)
    assert (total - run.resid_final).abs().max() <= 1e-5 * run.resid_final.abs().max()


def test_clean_direct_effects_sum_to_the_models_centred_logit(dtype) -> None:
    model = build(dtype)
    a = adapt(model)
    clean = a.clean_run(prompt())
    centred = hf_centred(model, prompt())
    assert clean.target == int(centred.argmax())
    assert abs(clean.centred_logit - float(centred[clean.target])) <= ATOL[dtype]
    total = float(clean.direct_effects.sum()) + clean.readout_const
    assert abs(total - float(centred[clean.target])) <= DECOMPOSITION_ATOL[dtype]


def test_patch_matches_the_naive_hooked_hugging_face_reforward(dtype) -> None:
    """Every site, two random values each; the naive oracle patches the post-norms' outputs."""
    model = build(dtype)
    a = adapt(model)
    tokens = prompt()
    clean = a.clean_run(tokens)
    sites = a.sites()
    values = torch.randn(len(sites), 2, 64, generator=torch.Generator().manual_seed(7)).to(dtype)
    run = a.patch(clean, sites, values)
    for i, site in enumerate(sites):
        naive = naive_patch(a, tokens, site, values[i])
        centred, direct, sigma = naive_readout(a, naive, clean.target)
        tol = ATOL[dtype] * 10 if dtype == torch.float64 else ATOL[dtype]
        assert (centred - clean.centred_logit - run.total_effect[i]).abs().max() <= tol, site
        assert (direct - run.direct_effects[i]).abs().max() <= tol, site
        assert (sigma - run.sigma[i]).abs().max() <= tol, site
        # the intervention took: the patched site reads back its value at the run's own sigma
        col = clean.readout_sites.index(site)
        expect = values[i].to(clean.readout_dir.dtype) @ clean.readout_dir / run.sigma[i]
        assert (run.direct_effects[i, :, col] - expect).abs().max() <= 1e-5, site


def test_the_scm_view_reproduces_the_logits() -> None:
    model = build(torch.float64)
    tokens = prompt()[None]
    with torch.no_grad():
        values = to_scm(adapt(model)).run({"tokens": tokens})
        ref = model(input_ids=tokens, use_cache=False).logits
    assert (values["logits"] - ref).abs().max() <= 1e-10


def test_head_granularity_is_refused_naming_the_post_norm() -> None:
    a = adapt(build())
    for call in (
        lambda: a.sites("head"),
        lambda: a.clean_run(prompt(), granularity="head"),
        lambda: a.forward(prompt(), granularity="head"),
        lambda: a.site("attn.1.h2"),
        lambda: a.patch(a.clean_run(prompt()), ["attn.1.h2"], torch.zeros(1, 1, 64)),
    ):
        with pytest.raises(ModelError, match="norm after the attention"):
            call()


def test_models_it_cannot_describe_are_refused_naming_the_part() -> None:
    for switch in ("attn_logit_softcapping", "final_logit_softcapping"):
        with pytest.raises(ModelError, match=switch):
            GemmaAdapter(build(**{switch: 30.0}))
    model = build()
    model.model.layers[1].post_feedforward_layernorm = nn.RMSNorm(64)
    with pytest.raises(ModelError, match=r"layers\.1\.post_feedforward_layernorm is a RMSNorm"):
        GemmaAdapter(model)
    with pytest.raises(ModelError, match="Gemma3ForCausalLM"):
        GemmaAdapter(nn.Linear(2, 2))
