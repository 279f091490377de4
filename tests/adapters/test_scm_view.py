"""The adapter as a causalnet SCM (:func:`causalnet.adapters.scm.to_scm`), on tiny seeded models
of all three families (Llama, GPT-2, GPT-NeoX with both residual wirings).

- ``scm.run`` reproduces the Hugging Face logits (float32 <= 1e-4, float64 <= 1e-10);
- the graph is the model's real compute graph in the unrolled view (Eqs 21-24);
- the engine's direct effect of every site on the logits, zero-ablated at the final position,
  is minus the site's clean direct effect from the adapter's readout (Eq 28, zero ablation);
- the engine's total effect of a final-position patch equals the adapter's fast ``patch``
  (Eqs 12, 14-18), and the intervention really changes the node.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from causalnet.adapters import TransformerAdapter, adapt
from causalnet.adapters.scm import at_positions, to_scm
from causalnet.errors import CausalNetError, ShapeError

VOCAB = 101
D = 64
DTYPES = {"f32": torch.float32, "f64": torch.float64}
ATOL = {torch.float32: 1e-4, torch.float64: 1e-10}
# Effects read through the final norm: Hugging Face's RMSNorm (Llama) normalises in float32 even
# in a float64 model, so the logits of a float64 Llama carry float32 rounding (~1e-7 relative).
# The LayerNorm families compute in the model's dtype.
EFFECT_ATOL = {
    (torch.float32, "rms"): 1e-4,
    (torch.float32, "layer"): 1e-4,
    (torch.float64, "rms"): 2e-6,
    (torch.float64, "layer"): 1e-10,
}
COMMON = dict(vocab_size=VOCAB, initializer_range=0.15, bos_token_id=0, eos_token_id=0)


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Norm gains ~1 and biases ~0 randomised (seeded), so that they are exercised; eval mode."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                noise = torch.randn(p.shape, generator=gen)
                parent = name.split(".")[-2]
                is_gain = ("norm" in parent or parent.startswith("ln")) and name.endswith("weight")
                p.copy_(1.0 + 0.3 * noise if is_gain else 0.1 * noise)
    return model.eval()


def _llama() -> nn.Module:
    config = LlamaConfig(
        hidden_size=D,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=64,
        **COMMON,
    )
    return LlamaForCausalLM(config)


def _gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(n_embd=D, n_layer=3, n_head=4, n_positions=64, **COMMON))


def _neox(parallel: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = GPTNeoXConfig(
            hidden_size=D,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=96,
            max_position_embeddings=64,
            rotary_pct=0.25,
            use_parallel_residual=parallel,
            **COMMON,
        )
        return GPTNeoXForCausalLM(config)

    return build


def _gptj() -> nn.Module:
    config = GPTJConfig(n_embd=D, n_layer=3, n_head=4, rotary_dim=8, n_positions=64, **COMMON)
    return GPTJForCausalLM(config)


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "llama": _llama,
    "gpt2": _gpt2,
    "neox-parallel": _neox(True),
    "neox-sequential": _neox(False),
    "gptj": _gptj,
}
PARALLEL = {"neox-parallel", "gptj"}  # attention and MLP read the same residual


def make(family: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, TransformerAdapter]:
    torch.manual_seed(0)
    model = _randomise(FAMILIES[family](), seed=0).to(dtype)
    return model, adapt(model)


def prompt(n: int = 7, seed: int = 123) -> Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def centred_at_final(logits: Tensor, token: int) -> Tensor:
    """The centred logit (Eq 9) of ``token`` at the final position: [B, T, V] -> [B]."""
    last = logits[:, -1]
    return last[:, token] - last.mean(-1)


@pytest.fixture(params=list(FAMILIES), ids=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=list(DTYPES), ids=list(DTYPES))
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return DTYPES[request.param]


# ---- the model's values ----------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_run_reproduces_the_hugging_face_logits(family, dtype, granularity) -> None:
    model, a = make(family, dtype)
    tokens = torch.stack([prompt(), prompt(seed=5)])
    with torch.no_grad():
        values = to_scm(a, granularity).run({"tokens": tokens})
        ref = model(input_ids=tokens, use_cache=False).logits
    assert values["logits"].shape == ref.shape
    assert (values["logits"] - ref).abs().max() <= ATOL[dtype]


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_node_values_are_the_adapters_sites_and_sum_to_the_final_residual(
    family, granularity
) -> None:
    _, a = make(family, torch.float64)
    tokens = prompt()[None]
    with torch.no_grad():
        values = to_scm(a, granularity).run({"tokens": tokens})
    run = a.forward(tokens, granularity=granularity)
    for site in a.readout_sites(granularity):
        assert (values[site] - run.values[site]).abs().max() <= 1e-12, site
    last = f"resid.{a.arch.n_layers - 1}"
    total = sum(values[s] for s in a.readout_sites(granularity))  # Eq 21
    assert (values[last] - total).abs().max() <= 1e-12
    assert (values[last] - run.resid_final).abs().max() <= 1e-12
    assert (values["sigma"] - run.sigma).abs().max() <= 1e-12


# ---- the graph -------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_graph_follows_the_models_real_residual_wiring(family, granularity) -> None:
    _, a = make(family)
    scm = to_scm(a, granularity)
    edges = set(scm.graph.edges)
    parallel = family in PARALLEL
    assert a.arch.parallel_residual is parallel
    n_heads = a.arch.n_heads
    for layer in range(a.arch.n_layers):
        prev = "embed" if layer == 0 else f"resid.{layer - 1}"
        attn = (
            [f"attn.{layer}"]
            if granularity == "layer"
            else [f"attn.{layer}.h{h}" for h in range(n_heads)]
        )
        for node in attn:
            assert scm.parents(node) == (prev,)
        assert (f"attn.{layer}" in scm) is (granularity == "layer")
        mlp = f"mlp.{layer}"
        if parallel:  # x + attn(ln1(x)) + mlp(ln(x)): the MLP does not read its attention
            assert scm.parents(mlp) == (prev,)
            assert not any((node, mlp) in edges for node in attn)
        else:
            assert scm.parents(mlp) == (prev, *attn)
            assert all((node, mlp) in edges for node in attn)
        assert scm.parents(f"resid.{layer}") == (prev, *attn, mlp)
    sites = tuple(a.readout_sites(granularity))
    assert scm.parents("sigma") == sites
    assert scm.parents("logits") == (*sites, "sigma")
    assert scm.exogenous == ("tokens",)
    expected = {"embed", "sigma", "logits", *sites}
    expected |= {f"resid.{layer}" for layer in range(a.arch.n_layers)}
    assert set(scm.endogenous) == expected


def test_head_view_carries_nothing_from_one_run_to_the_next(family) -> None:
    """The heads of a layer share one attention computation per run, never across runs."""
    model, a = make(family, torch.float64)
    scm = to_scm(a, "head")
    ctx = {"tokens": prompt()[None]}
    with torch.no_grad():
        held = scm.run(ctx)["embed"]
        # the same tensor object as layer 0's input in both runs (a hard do passes it through)
        first = scm.run(ctx, do={"embed": held})
        for name, p in model.named_parameters():
            if p.ndim == 2 and re.search(r"\.(layers|h)\.\d+\.", name):  # the layers' matrices
                p.mul_(1.1)  # weights are read by reference: the next run must see the change
        second = scm.run(ctx, do={"embed": held})
    run = a.forward(ctx["tokens"], granularity="head")
    for site in a.readout_sites("head"):
        assert (second[site] - run.values[site]).abs().max() <= 1e-12, site
    assert (second["attn.0.h3"] - first["attn.0.h3"]).abs().max() > 1e-3


def test_unknown_granularity_raises() -> None:
    _, a = make("gpt2")
    with pytest.raises(CausalNetError, match="granularity"):
        to_scm(a, "neuron")  # type: ignore[arg-type]


# ---- effects ---------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_direct_effect_of_zero_ablation_is_minus_the_clean_direct_effect_eq28(
    family, dtype, granularity
) -> None:
    """DE(c -> 0 at t, centred logit_i) = -(c . w_i) / sigma (Eqs 25-28): sigma held fixed."""
    _, a = make(family, dtype)
    tokens = prompt()
    clean = a.clean_run(tokens, granularity=granularity)
    scm = to_scm(a, granularity)
    ctx = {"tokens": tokens[None]}
    with torch.no_grad():
        for j, site in enumerate(clean.readout_sites):
            de = scm.direct_effect(site, "logits", ctx, value=at_positions(0.0))
            assert de[:, :-1].abs().max() == 0.0, site  # causal: earlier positions untouched
            got = float(centred_at_final(de, clean.target)[0])
            atol = EFFECT_ATOL[dtype, a.arch.norm]
            assert abs(got + float(clean.direct_effects[j])) <= atol, site


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_total_effect_of_a_final_position_patch_equals_the_fast_patch(
    family, dtype, granularity
) -> None:
    _, a = make(family, dtype)
    tokens = prompt()
    clean = a.clean_run(tokens, granularity=granularity)
    scm = to_scm(a, granularity)
    ctx = {"tokens": tokens[None]}
    last = a.arch.n_layers - 1
    head = "attn.1" if granularity == "layer" else "attn.1.h2"
    sites = ["embed", "attn.0" if granularity == "layer" else "attn.0.h0", "mlp.0", head]
    sites.append(f"mlp.{last}")
    gen = torch.Generator().manual_seed(11)
    values = torch.stack([2 * torch.randn(D, generator=gen, dtype=dtype) for _ in sites])
    fast = a.patch(clean, sites, values[:, None, :])
    with torch.no_grad():
        for s, site in enumerate(sites):
            te = scm.total_effect(site, "logits", ctx, value=at_positions(values[s]))
            assert te[:, :-1].abs().max() == 0.0, site  # causal: earlier positions untouched
            got = float(centred_at_final(te, clean.target)[0])
            atol = EFFECT_ATOL[dtype, a.arch.norm]
            assert abs(got - float(fast.total_effect[s, 0])) <= atol, site
            assert abs(got) > 1e-3, site  # the intervention did something


def test_the_intervention_changes_the_node_at_the_final_position_only(family) -> None:
    _, a = make(family, torch.float64)
    scm = to_scm(a, "head")
    ctx = {"tokens": prompt()[None]}
    value = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        natural = scm.run(ctx)
        patched = scm.run(ctx, do={"attn.0.h1": at_positions(value)})
    assert torch.equal(patched["attn.0.h1"][0, -1], value)
    assert torch.equal(patched["attn.0.h1"][:, :-1], natural["attn.0.h1"][:, :-1])
    assert (patched["attn.0.h1"][0, -1] - natural["attn.0.h1"][0, -1]).abs().max() > 1e-3
    # downstream nodes change at t only (causal masking), upstream nodes not at all
    for node in ("attn.1.h0", "mlp.1", "resid.2", "sigma", "logits"):
        assert torch.equal(patched[node][:, :-1], natural[node][:, :-1]), node
        assert (patched[node][:, -1] - natural[node][:, -1]).abs().max() > 1e-6, node
    for node in ("embed", "attn.0.h0", "attn.0.h3"):
        assert torch.equal(patched[node], natural[node]), node


def test_the_logits_read_the_final_scale_from_the_sigma_node(family) -> None:
    """do(sigma_t = 2 sigma_t): every site's direct effect halves, the constant stays (Eq 24)."""
    _, a = make(family, torch.float64)
    tokens = prompt()
    clean = a.clean_run(tokens)
    scm = to_scm(a)
    with torch.no_grad():
        doubled = scm.run({"tokens": tokens[None]}, do={"sigma": at_positions(2 * clean.sigma)})
    got = float(centred_at_final(doubled["logits"], clean.target)[0])
    expect = float(clean.direct_effects.sum()) / 2 + clean.readout_const
    assert abs(got - expect) <= EFFECT_ATOL[torch.float64, a.arch.norm]


# ---- at_positions ----------------------------------------------------------------------------
def test_at_positions_replaces_exactly_the_given_positions() -> None:
    natural = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    out = at_positions(torch.tensor([-1.0, -2.0, -3.0]), [0, 3])(natural)
    assert torch.equal(out[:, [0, 3]], torch.tensor([-1.0, -2.0, -3.0]).expand(2, 2, 3))
    assert torch.equal(out[:, [1, 2, 4]], natural[:, [1, 2, 4]])
    per_row = torch.tensor([[7.0, 7.0, 7.0], [8.0, 8.0, 8.0]])
    out = at_positions(per_row)(natural)  # default: the final position, one value per context
    assert torch.equal(out[:, -1], per_row) and torch.equal(out[:, :-1], natural[:, :-1])
    assert torch.equal(natural.view(-1), torch.arange(30, dtype=torch.float32))  # not in place
    sigma = torch.ones(2, 5)
    assert torch.equal(at_positions(3.0, 2)(sigma)[:, 2], torch.full((2,), 3.0))


def test_at_positions_refuses_bad_values_and_positions() -> None:
    natural = torch.zeros(2, 5, 3)
    with pytest.raises(ShapeError, match="broadcast"):
        at_positions(torch.zeros(4))(natural)
    with pytest.raises(ShapeError, match="out of range"):
        at_positions(0.0, 5)(natural)
    with pytest.raises(ShapeError, match="integer"):
        at_positions(0.0, torch.tensor([0.5]))
    with pytest.raises(ShapeError, match=r"\[B, T"):
        at_positions(0.0)(torch.zeros(3))
