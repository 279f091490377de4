"""The adapter as a causalnet SCM (:func:`causalnet.adapters.scm.to_scm`), on the registry's
representative tiny models (tests/adapters/tiny_models.py: one per hand-written adapter and
residual wiring, Gemma 3 included).

- ``scm.run`` reproduces the Hugging Face logits (float32 <= 1e-4, float64 <= 1e-10);
- the graph is the model's real compute graph in the unrolled view (Eqs 21-24);
- the engine's direct effect of every site on the logits, zero-ablated at the final position,
  is minus the site's clean direct effect from the adapter's readout (Eq 28, zero ablation);
- the engine's total effect of a final-position patch equals the adapter's fast ``patch``
  (Eqs 12, 14-18), and the intervention really changes the node.
"""

from __future__ import annotations

import re

import pytest
import torch
from tiny_models import DECODER_SIZES, DTYPES, REPRESENTATIVE, TINY_MODELS, make_tiny
from torch import Tensor, nn

from causalnet.adapters import TransformerAdapter
from causalnet.adapters.scm import at_positions, to_scm
from causalnet.errors import CausalNetError, ShapeError

VOCAB = 101
D = 64
ATOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def make(family: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, TransformerAdapter]:
    """A fresh (private) copy of one registry model: some tests here edit its weights."""
    tiny = make_tiny(family, dtype)
    return tiny.model, tiny.adapter


def norm_tol(family: str, dtype: torch.dtype) -> float:
    """float64: the model's float32 rounding inside its block norms (``f64_norm_tol``)."""
    return 1e-5 if dtype == torch.float32 else TINY_MODELS[family].f64_norm_tol


def view_tol(family: str, granularity: str, scale: Tensor | float = 1.0) -> float:
    """The SCM view vs the adapter's forward, float64: 1e-12; heads under a post-attention norm
    (shares that sum to attn.l up to the norm's float32 rounding): the spec's f64_norm_tol,
    relative to the compared quantity's scale (at least 1)."""
    spec = TINY_MODELS[family]
    if granularity == "head" and spec.post_norm_heads:
        return spec.f64_norm_tol * max(1.0, float(scale))
    return 1e-12


def effect_atol(family: str, dtype: torch.dtype) -> float:
    """Effects read through the final norm vs the adapter's readout: float32 1e-4; float64 the
    model's decomposition tolerance (float32 rounding where Hugging Face's RMSNorm normalises
    in float32 even in a float64 model: twice the spec's ``f64_logit_tol``, an effect being a
    difference of two logits; see its ``tol_reason``)."""
    return 1e-4 if dtype == torch.float32 else 2 * TINY_MODELS[family].f64_logit_tol


def prompt(n: int = 7, seed: int = 123) -> Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def centred_at_final(logits: Tensor, token: int) -> Tensor:
    """The centred logit (Eq 9) of ``token`` at the final position: [B, T, V] -> [B]."""
    last = logits[:, -1]
    return last[:, token] - last.mean(-1)


@pytest.fixture(params=REPRESENTATIVE, ids=REPRESENTATIVE)
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
    # head view: the residual sums the head shares, equal to attn.l only up to the float32
    # rounding of the model's post-attention norm (the spec's f64_norm_tol, x10 through the
    # final norm and the unembedding)
    tol = ATOL[dtype] if granularity == "layer" else max(ATOL[dtype], 10 * norm_tol(family, dtype))
    assert (values["logits"] - ref).abs().max() <= tol


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_node_values_are_the_adapters_sites_and_sum_to_the_final_residual(
    family, granularity
) -> None:
    _, a = make(family, torch.float64)
    tokens = prompt()[None]
    with torch.no_grad():
        values = to_scm(a, granularity).run({"tokens": tokens})
    run = a.forward(tokens, granularity=granularity)
    tol = view_tol(family, granularity, run.resid_final.abs().max())
    for site in a.readout_sites(granularity):
        assert (values[site] - run.values[site]).abs().max() <= tol, site
    last = f"resid.{a.arch.n_layers - 1}"
    total = sum(values[s] for s in a.readout_sites(granularity))  # Eq 21
    assert (values[last] - total).abs().max() <= tol
    assert (values[last] - run.resid_final).abs().max() <= tol
    assert (values["sigma"] - run.sigma).abs().max() <= tol


# ---- the graph -------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_graph_follows_the_models_real_residual_wiring(family, granularity) -> None:
    _, a = make(family)
    scm = to_scm(a, granularity)
    edges = set(scm.graph.edges)
    parallel = TINY_MODELS[family].parallel
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
    tol = view_tol(family, "head", run.resid_final.abs().max())
    for site in a.readout_sites("head"):
        assert (second[site] - run.values[site]).abs().max() <= tol, site
    assert (second["attn.0.h3"] - first["attn.0.h3"]).abs().max() > 1e-3


def test_unknown_granularity_raises() -> None:
    _, a = make("gpt2-inverse-layer-idx")
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
            atol = effect_atol(family, dtype)
            assert abs(got + float(clean.direct_effects[j])) <= atol, site


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_total_effect_of_a_final_position_patch_equals_the_fast_patch(
    family, dtype, granularity
) -> None:
    if granularity == "head" and TINY_MODELS[family].post_norm_heads:
        pytest.skip(
            "the SCM view's head nodes add to the residual stream; the adapter's head patch "
            "under a post-attention norm renormalises attn.l (docs/conventions.md), a different "
            "intervention: to_scm does not model it yet"
        )
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
            atol = effect_atol(family, dtype)
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
    assert abs(got - expect) <= effect_atol(family, torch.float64)


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


def test_a_discovered_model_has_no_scm_view_and_says_why() -> None:
    import transformers as T  # noqa: PLC0415

    from causalnet.adapters import adapt  # noqa: PLC0415
    from causalnet.errors import ModelError  # noqa: PLC0415

    torch.manual_seed(0)
    cfg = T.Qwen3Config(**DECODER_SIZES, head_dim=8)
    adapter = adapt(T.Qwen3ForCausalLM(cfg).eval())
    with pytest.raises(ModelError, match="qwen3.*GenericAdapter.*not built"):
        to_scm(adapter)
