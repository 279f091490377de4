"""The GPT-NeoX adapter against Hugging Face's ``GPTNeoXForCausalLM`` (tiny seeded random models).

Both residual wirings (``use_parallel_residual`` True, as Pythia, and False), partial rotary
(``rotary_pct`` 0.25, an odd rotary width, full rotary with linear rope scaling), with and
without attention biases, tied and untied unembedding. Checked in float32 (<= 1e-4) and float64
(<= 1e-10): logits equal the model's; sites sum to the model's own final residual (Eq 21); heads
sum to their layer; direct effects plus the readout constant equal the centred logit (Eqs 9, 24);
the fast patch equals the naive hooked re-forward of the Hugging Face model (Eqs 11-13).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_neox as build
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel

from causalnet.adapters import adapt
from causalnet.adapters.naive import naive_patch, naive_readout
from causalnet.adapters.neox import NeoXAdapter
from causalnet.errors import ModelError

VOCAB = 101
DTYPES = {"f32": torch.float32, "f64": torch.float64}
ATOL = {torch.float32: 1e-4, torch.float64: 1e-10}

# Config switches that change the math (each must be followed, not assumed).
VARIANTS: dict[str, dict] = {
    "parallel": {"use_parallel_residual": True},
    "sequential": {"use_parallel_residual": False},
    "nobias-tied-relu": {
        "attention_bias": False,
        "tie_word_embeddings": True,
        "hidden_act": "relu",
    },
    "odd-rotary-width": {"rotary_pct": 0.35},
    "full-rotary-linear-scaling": {
        "rope_parameters": {
            "rope_type": "linear",
            "factor": 2.0,
            "rope_theta": 500.0,
            "partial_rotary_factor": 1.0,
        }
    },
    "yarn-scaling": {
        "rope_parameters": {
            "rope_type": "yarn",
            "factor": 2.0,
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "original_max_position_embeddings": 32,
        }
    },
}


def prompt(n: int = 7, seed: int = 123) -> Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def hf_logits(model: nn.Module, tokens: Tensor) -> Tensor:
    with torch.no_grad():
        return model(input_ids=tokens if tokens.ndim == 2 else tokens[None], use_cache=False).logits


@pytest.fixture(params=list(DTYPES), ids=list(DTYPES))
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return DTYPES[request.param]


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("parallel", [True, False])
def test_adapt_picks_the_neox_adapter_and_reads_the_wiring_from_the_config(parallel) -> None:
    a = adapt(build(use_parallel_residual=parallel))
    assert isinstance(a, NeoXAdapter)
    arch = a.arch
    assert (arch.family, arch.n_layers, arch.n_heads, arch.n_kv_heads) == ("gpt_neox", 3, 4, 4)
    assert (arch.d_model, arch.d_head, arch.vocab_size) == (64, 16, VOCAB)
    assert arch.parallel_residual is parallel and arch.norm == "layer"
    assert a.attn_scale == pytest.approx(16**-0.5)


def test_logits_match_hugging_face(variant: str, dtype: torch.dtype) -> None:
    model = build(**VARIANTS[variant]).to(dtype)
    tokens = torch.stack([prompt(), prompt(seed=5)])
    run = NeoXAdapter(model).forward(tokens)
    ref = hf_logits(model, tokens)
    assert run.logits.shape == ref.shape == (2, 7, VOCAB)
    assert (run.logits - ref).abs().max() <= ATOL[dtype]


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "parallel"])
def test_each_config_switch_changes_the_logits(variant: str) -> None:
    """The switches tested above matter: ignoring one would miss by far more than the tolerance."""
    tokens = prompt()
    switched = hf_logits(build(**VARIANTS[variant]).double(), tokens)
    plain = hf_logits(build().double(), tokens)
    assert (switched - plain).abs().max() > 1e-3


def test_partial_rotary_rotates_only_the_first_dims_of_q_and_k(dtype: torch.dtype) -> None:
    """rotary_pct = 0.25 of d_head 16: the first 4 dims of q and k depend on the position."""
    a = NeoXAdapter(build().to(dtype))
    resid = torch.randn(1, 1, 64, dtype=dtype, generator=torch.Generator().manual_seed(4))
    q0, k0, v0 = a.qkv(1, resid, torch.tensor([0]))
    q5, k5, v5 = a.qkv(1, resid, torch.tensor([5]))
    assert q0.shape == k0.shape == v0.shape == (1, 1, 4, 16)
    for x0, x5 in ((q0, q5), (k0, k5)):
        assert torch.equal(x0[..., 4:], x5[..., 4:])
        assert (x0[..., :4] - x5[..., :4]).abs().max() > 1e-3
        # a rotation: the norm is unchanged (to float32 precision: Hugging Face computes the
        # cos/sin tables in float32 and casts them to the model's dtype)
        assert (x0[..., :4].norm(dim=-1) - x5[..., :4].norm(dim=-1)).abs().max() <= 1e-5
    assert torch.equal(v0, v5)


@pytest.mark.parametrize("granularity", ["layer", "head"])
@pytest.mark.parametrize("parallel", [True, False])
def test_sites_sum_to_the_models_own_final_residual_eq21(
    dtype: torch.dtype, granularity, parallel
) -> None:
    model = build(use_parallel_residual=parallel).to(dtype)
    a = NeoXAdapter(model)
    tokens = prompt()
    captured: list[Tensor] = []
    handle = a.final_norm_module().register_forward_pre_hook(
        lambda m, args: captured.append(args[0])
    )
    try:
        hf_logits(model, tokens)
    finally:
        handle.remove()
    run = a.forward(tokens, granularity=granularity)
    assert list(run.values) == a.readout_sites(granularity)
    total = torch.stack(list(run.values.values())).sum(0)
    scale = float(captured[0].abs().max())
    assert (total - captured[0]).abs().max() <= ATOL[dtype] * scale
    assert (run.resid_final - captured[0]).abs().max() <= ATOL[dtype] * scale


@pytest.mark.parametrize("attention_bias", [True, False])
def test_heads_sum_to_their_layers_attention_output(dtype: torch.dtype, attention_bias) -> None:
    a = NeoXAdapter(build(attention_bias=attention_bias).to(dtype))
    tokens = prompt()
    heads = a.forward(tokens, granularity="head").values
    layers = a.forward(tokens, granularity="layer").values
    for layer in range(a.arch.n_layers):
        summed = sum(heads[f"attn.{layer}.h{h}"] for h in range(a.arch.n_heads))
        assert (summed - layers[f"attn.{layer}"]).abs().max() <= ATOL[dtype] / 10
        assert (heads[f"attn.{layer}.h0"] - layers[f"attn.{layer}"]).abs().max() > 1e-3


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_direct_effects_plus_constant_equal_the_models_centred_logit(
    variant: str, dtype: torch.dtype, granularity
) -> None:
    model = build(**VARIANTS[variant]).to(dtype)
    a = NeoXAdapter(model)
    tokens = prompt()
    clean = a.clean_run(tokens, granularity=granularity)
    logits = hf_logits(model, tokens)[0, -1]
    assert clean.target == int(logits.argmax())
    centred = logits[clean.target] - logits.mean()
    got = clean.direct_effects.sum() + clean.readout_const
    assert abs(float(got - centred)) <= ATOL[dtype]
    assert clean.readout_const != 0.0  # the final LayerNorm's bias term is exercised


def test_readout_handles_an_unembedding_bias(dtype: torch.dtype) -> None:
    """centred logit_i(z) = (z . w_i) / sigma(z) + const_i for any z, with an embed_out bias."""
    model = build().to(dtype)
    gen = torch.Generator().manual_seed(9)
    head = model.get_output_embeddings()
    head.bias = nn.Parameter(torch.randn(VOCAB, generator=gen, dtype=dtype))
    a = NeoXAdapter(model)
    tokens = prompt()
    assert (a.forward(tokens).logits - hf_logits(model, tokens)).abs().max() <= ATOL[dtype]
    z = 3 * torch.randn(5, 64, generator=gen, dtype=dtype)
    logits = a.logits(z)
    for token in (0, 17, VOCAB - 1):
        w, const = a.readout(token)
        assert abs(float(w.sum())) <= ATOL[dtype]  # centred over the hidden dimension
        expect = logits[:, token] - logits.mean(-1)
        assert ((z @ w) / a.final_scale(z) + const - expect).abs().max() <= ATOL[dtype]
        assert (a.centred_logit(z, token) - expect).abs().max() <= ATOL[dtype]


@pytest.mark.parametrize("granularity", ["layer", "head"])
@pytest.mark.parametrize("parallel", [True, False])
def test_patch_matches_the_naive_hooked_hugging_face_reforward(parallel, granularity) -> None:
    model = build(use_parallel_residual=parallel)
    a = NeoXAdapter(model)
    tokens = prompt()
    clean = a.clean_run(tokens, granularity=granularity)
    last = a.arch.n_layers - 1
    sites = ["embed", "attn.0.h1", "mlp.0", f"attn.{last}.h3", f"mlp.{last}", "mlp.1"]
    if granularity == "layer":
        sites += ["attn.1"]
    gen = torch.Generator().manual_seed(7)
    values = torch.stack(
        [
            clean.value(s) + torch.randn(3, 64, generator=gen) * clean.value(s).norm() / 8
            for s in sites
        ]
    )
    run = a.patch(clean, sites, values)
    logits = hf_logits(model, tokens)[0, -1]
    clean_centred = logits[clean.target] - logits.mean()
    for i, site in enumerate(sites):
        naive = naive_patch(a, tokens, site, values[i], granularity=granularity)
        centred, direct, sigma = naive_readout(a, naive, clean.target)
        assert (run.centred_logit[i] - centred).abs().max() <= 1e-4, site
        assert (run.total_effect[i] - (centred - clean_centred)).abs().max() <= 1e-4, site
        assert (run.direct_effects[i] - direct).abs().max() <= 1e-4, site
        assert (run.sigma[i] - sigma).abs().max() <= 1e-4, site
        assert run.total_effect[i].abs().max() > 1e-4, site  # the patch did something


def test_parallel_mlp_does_not_see_its_own_layers_attention() -> None:
    """With the parallel residual, patching attn.l at t leaves mlp.l at t unchanged."""
    for parallel in (True, False):
        a = NeoXAdapter(build(use_parallel_residual=parallel).double())
        clean = a.clean_run(prompt())
        values = (3 * clean.value("attn.1"))[None, None]
        run = a.patch(clean, ["attn.1"], values)
        col = clean.readout_sites.index("mlp.1")
        # numerator c . w_i of mlp.1, compared at the clean scale
        patched = run.direct_effects[0, 0, col] * run.sigma[0, 0]
        natural = clean.direct_effects[col] * clean.sigma
        assert (abs(float(patched - natural)) <= 1e-10) is parallel


def test_weights_are_read_by_reference_not_copied() -> None:
    model = build()
    a = NeoXAdapter(model)
    tokens = prompt()
    before = a.forward(tokens).logits
    with torch.no_grad():
        model.gpt_neox.layers[1].attention.query_key_value.weight.mul_(1.5)
        model.gpt_neox.layers[2].post_attention_layernorm.bias.add_(0.5)
    after = a.forward(tokens).logits
    assert (after - before).abs().max() > 1e-3
    assert (after - hf_logits(model, tokens)).abs().max() <= ATOL[torch.float32]


def test_other_models_and_unsupported_head_dims_are_refused() -> None:
    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=11, bos_token_id=0, eos_token_id=0)
    )
    with pytest.raises(ModelError, match="GPTNeoXForCausalLM"):
        NeoXAdapter(gpt2)
    model = build()
    model.config.head_dim = 8
    with pytest.raises(ModelError, match="head_dim"):
        NeoXAdapter(model)


def test_sequence_length_dependent_rope_and_foreign_modules_are_refused() -> None:
    dynamic = {
        "rope_type": "dynamic",
        "factor": 2.0,
        "rope_theta": 1e4,
        "partial_rotary_factor": 0.25,
    }
    with pytest.raises(ModelError, match="dynamic"):
        NeoXAdapter(build(rope_parameters=dynamic))
    model = build()
    model.gpt_neox.layers[1].post_attention_layernorm = nn.RMSNorm(64)
    with pytest.raises(ModelError, match=r"layers\.1\.post_attention_layernorm is a RMSNorm"):
        NeoXAdapter(model)
