"""The GPT-2 adapter against Hugging Face's ``GPT2LMHeadModel`` (tiny seeded random models).

Checked in float32 (<= 1e-4) and float64 (<= 1e-10): the adapter's logits equal the model's for
every config switch that changes the math; the sites sum to the model's own final residual
(Eq 21); the heads sum to their layer; the direct effects plus the readout constant equal the
model's centred logit (Eqs 9, 24); and the fast patch equals the naive hooked re-forward of the
Hugging Face model (Eqs 11-13).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from causalnet.adapters import adapt
from causalnet.adapters.gpt2 import GPT2Adapter
from causalnet.adapters.naive import naive_patch, naive_readout
from causalnet.errors import ModelError, ShapeError

VOCAB = 101
N_POSITIONS = 16
DTYPES = {"f32": torch.float32, "f64": torch.float64}
ATOL = {torch.float32: 1e-4, torch.float64: 1e-10}

# Config switches that change the math (each must be followed, not assumed).
VARIANTS: dict[str, dict] = {
    "default": {},
    "inverse-layer-idx": {"scale_attn_by_inverse_layer_idx": True},
    "unscaled-relu-inner": {
        "scale_attn_weights": False,
        "activation_function": "relu",
        "n_inner": 80,
    },
    "untied-gelu": {"tie_word_embeddings": False, "activation_function": "gelu"},
}


def build(seed: int = 0, **overrides: object) -> GPT2LMHeadModel:
    """A seeded tiny GPT-2 in eval mode, with norm gains ~1 and every bias ~0 randomised."""
    cfg = dict(
        n_embd=64,
        n_layer=3,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=N_POSITIONS,
        initializer_range=0.15,
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**cfg))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                noise = torch.randn(p.shape, generator=gen)
                is_gain = name.split(".")[-2].startswith("ln") and name.endswith("weight")
                p.copy_(1.0 + 0.3 * noise if is_gain else 0.1 * noise)
    return model.eval()


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


def test_adapt_picks_the_gpt2_adapter_and_reads_the_shape_from_the_config() -> None:
    a = adapt(build())
    assert isinstance(a, GPT2Adapter)
    arch = a.arch
    assert (arch.family, arch.n_layers, arch.n_heads, arch.n_kv_heads) == ("gpt2", 3, 4, 4)
    assert (arch.d_model, arch.d_head, arch.vocab_size) == (64, 16, VOCAB)
    assert arch.parallel_residual is False and arch.norm == "layer"
    assert a.attn_scale == pytest.approx(16**-0.5)
    assert GPT2Adapter(build(scale_attn_weights=False)).attn_scale == 1.0


def test_logits_match_hugging_face(variant: str, dtype: torch.dtype) -> None:
    model = build(**VARIANTS[variant]).to(dtype)
    tokens = torch.stack([prompt(), prompt(seed=5)])
    run = GPT2Adapter(model).forward(tokens)
    ref = hf_logits(model, tokens)
    assert run.logits.shape == ref.shape == (2, 7, VOCAB)
    assert (run.logits - ref).abs().max() <= ATOL[dtype]


@pytest.mark.parametrize("variant", ["inverse-layer-idx", "unscaled-relu-inner", "untied-gelu"])
def test_each_config_switch_changes_the_logits(variant: str) -> None:
    """The switches tested above matter: ignoring one would miss by far more than the tolerance."""
    tokens = prompt()
    switched = hf_logits(build(**VARIANTS[variant]).double(), tokens)
    plain = hf_logits(build().double(), tokens)
    assert (switched - plain).abs().max() > 1e-3


def test_reorder_and_upcast_attn_is_harmless() -> None:
    model = build(reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True)
    model.config._attn_implementation = "eager"  # the only path that reorders and upcasts
    tokens = prompt()
    got = GPT2Adapter(model).forward(tokens).logits
    assert (got - hf_logits(model, tokens)).abs().max() <= ATOL[torch.float32]


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_sites_sum_to_the_models_own_final_residual_eq21(dtype: torch.dtype, granularity) -> None:
    model = build().to(dtype)
    a = GPT2Adapter(model)
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


def test_heads_sum_to_their_layers_attention_output(dtype: torch.dtype) -> None:
    a = GPT2Adapter(build(scale_attn_by_inverse_layer_idx=True).to(dtype))
    tokens = prompt()
    heads = a.forward(tokens, granularity="head").values
    layers = a.forward(tokens, granularity="layer").values
    for layer in range(a.arch.n_layers):
        summed = sum(heads[f"attn.{layer}.h{h}"] for h in range(a.arch.n_heads))
        assert (summed - layers[f"attn.{layer}"]).abs().max() <= ATOL[dtype] / 10
        # no head carries the whole layer: the split is a real one
        assert (heads[f"attn.{layer}.h0"] - layers[f"attn.{layer}"]).abs().max() > 1e-3


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_direct_effects_plus_constant_equal_the_models_centred_logit(
    variant: str, dtype: torch.dtype, granularity
) -> None:
    model = build(**VARIANTS[variant]).to(dtype)
    a = GPT2Adapter(model)
    tokens = prompt()
    clean = a.clean_run(tokens, granularity=granularity)
    logits = hf_logits(model, tokens)[0, -1]
    assert clean.target == int(logits.argmax())
    centred = logits[clean.target] - logits.mean()
    got = clean.direct_effects.sum() + clean.readout_const
    assert abs(float(got - centred)) <= ATOL[dtype]
    assert clean.readout_const != 0.0  # ln_f's bias term is exercised


def test_readout_handles_an_unembedding_bias(dtype: torch.dtype) -> None:
    """centred logit_i(z) = (z . w_i) / sigma(z) + const_i for any z, with an lm_head bias."""
    model = build(tie_word_embeddings=False).to(dtype)
    gen = torch.Generator().manual_seed(9)
    model.lm_head.bias = nn.Parameter(torch.randn(VOCAB, generator=gen, dtype=dtype))
    a = GPT2Adapter(model)
    z = 3 * torch.randn(5, 64, generator=gen, dtype=dtype)
    logits = a.logits(z)
    assert (logits - model.lm_head(model.transformer.ln_f(z))).abs().max() <= ATOL[dtype]
    for token in (0, 17, VOCAB - 1):
        w, const = a.readout(token)
        assert abs(float(w.sum())) <= ATOL[dtype]  # centred over the hidden dimension
        expect = logits[:, token] - logits.mean(-1)
        got = (z @ w) / a.final_scale(z) + const
        assert (got - expect).abs().max() <= ATOL[dtype]


def test_final_scale_is_the_layer_norms_biased_standard_deviation(dtype: torch.dtype) -> None:
    a = GPT2Adapter(build().to(dtype))
    z = torch.randn(3, 64, dtype=dtype, generator=torch.Generator().manual_seed(2))
    eps = a.final_norm_module().eps
    expect = ((z - z.mean(-1, keepdim=True)) ** 2).mean(-1).add(eps).sqrt()
    assert (a.final_scale(z) - expect).abs().max() <= ATOL[dtype] / 10


@pytest.mark.parametrize("granularity", ["layer", "head"])
@pytest.mark.parametrize("variant", ["default", "inverse-layer-idx"])
def test_patch_matches_the_naive_hooked_hugging_face_reforward(variant: str, granularity) -> None:
    model = build(**VARIANTS[variant])
    a = GPT2Adapter(model)
    tokens = prompt()
    clean = a.clean_run(tokens, granularity=granularity)
    last = a.arch.n_layers - 1
    sites = ["embed", "attn.0.h1", "mlp.0", f"attn.{last}.h3", f"mlp.{last}"]
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
        assert run.total_effect[i].abs().max() > 1e-3, site  # the patch did something


def test_weights_are_read_by_reference_not_copied() -> None:
    model = build()
    a = GPT2Adapter(model)
    tokens = prompt()
    before = a.forward(tokens).logits
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight.mul_(1.5)
        model.transformer.wpe.weight.add_(0.1)
    after = a.forward(tokens).logits
    assert (after - before).abs().max() > 1e-3
    assert (after - hf_logits(model, tokens)).abs().max() <= ATOL[torch.float32]


def test_other_models_and_cross_attention_are_refused() -> None:
    neox = GPTNeoXForCausalLM(
        GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=11)
    )
    with pytest.raises(ModelError, match="GPT2LMHeadModel"):
        GPT2Adapter(neox)
    with pytest.raises(ModelError, match="cross-attention"):
        GPT2Adapter(build(add_cross_attention=True))


def test_a_prompt_longer_than_the_position_table_raises() -> None:
    a = GPT2Adapter(build())
    with pytest.raises(ShapeError, match="n_positions"):
        a.forward(prompt(N_POSITIONS + 1))


def test_foreign_modules_are_refused() -> None:
    model = build()
    model.transformer.ln_f = nn.RMSNorm(64)
    with pytest.raises(ModelError, match="ln_f is not a LayerNorm"):
        GPT2Adapter(model)
    model = build()
    model.transformer.h[2].mlp.c_fc = nn.Linear(64, 256)
    with pytest.raises(ModelError, match=r"h\.2\.mlp\.c_fc is a Linear"):
        GPT2Adapter(model)
