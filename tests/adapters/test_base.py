"""The shared adapter machinery (adapters/base.py) on every tiny model of the registry
(tests/adapters/tiny_models.py, Gemma 3 included).

Tolerances (max abs difference), per model from its spec (``tiny.*_atol``): forward logits vs
Hugging Face 1e-4 (float32) / 1e-10 (float64); fast patch vs the naive hooked Hugging Face
re-forward 1e-4 / 1e-9; identities that involve only the adapter's own float64 arithmetic 1e-12
(1e-5 in float32). Where Hugging Face computes a norm in float32 inside a float64 model (RMSNorm:
the decomposition vs the model's logits 1e-6; Gemma 3's post-attention norm: head shares and
head patches 1e-6 / 1e-5) the spec states the looser float64 tolerance and why.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import REPRESENTATIVE, make_tiny
from torch import Tensor, nn

from causalnet.adapters import TransformerAdapter
from causalnet.adapters.naive import naive_patch, naive_readout
from causalnet.errors import (
    CausalNetError,
    ContextError,
    InterventionError,
    NonFiniteError,
    ShapeError,
    UnknownNodeError,
)
from causalnet.sites import parse_site


def own_atol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-5


def hf_centred(model: nn.Module, tokens: Tensor, t: int) -> tuple[int, Tensor]:
    """(argmax, centred logits) at position t from the Hugging Face model itself."""
    with torch.no_grad():
        logits = model(input_ids=tokens[None], use_cache=False).logits[0, t]
    return int(logits.argmax()), logits - logits.mean()


def typical_values(adapter: TransformerAdapter, clean, sites: list[str], n: int) -> Tensor:
    """Random patch values [S, n, d] with each site's clean norm (seeded)."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for s in sites:
        ref = clean.value(s)
        v = torch.randn(n, ref.shape[0], generator=gen, dtype=ref.dtype)
        out.append(v / v.norm(dim=-1, keepdim=True) * ref.norm().clamp_min(1e-3))
    return torch.stack(out)


# ---- forward ------------------------------------------------------------------------------
def test_forward_logits_match_hugging_face(tiny):
    tokens = torch.stack([tiny.tokens, tiny.tokens.flip(0)])
    run = tiny.adapter.forward(tokens)
    with torch.no_grad():
        ref = tiny.model(input_ids=tokens, use_cache=False).logits
    assert run.logits.shape == ref.shape
    assert (run.logits - ref).abs().max() <= tiny.logit_atol


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_sites_sum_to_the_final_residual_eq21(tiny, granularity):
    run = tiny.adapter.forward(tiny.tokens, granularity=granularity)
    assert list(run.values) == tiny.adapter.readout_sites(granularity)
    total = torch.stack(list(run.values.values())).sum(0)
    scale = run.resid_final.abs().max()
    tol = tiny.own_atol * 10 if granularity == "layer" else tiny.norm_atol
    assert (total - run.resid_final).abs().max() <= tol * scale


def test_heads_sum_to_their_layers_attention_output(tiny):
    heads = tiny.adapter.forward(tiny.tokens, granularity="head").values
    layers = tiny.adapter.forward(tiny.tokens, granularity="layer").values
    for layer in range(tiny.adapter.arch.n_layers):
        summed = sum(heads[f"attn.{layer}.h{h}"] for h in range(tiny.adapter.arch.n_heads))
        assert (summed - layers[f"attn.{layer}"]).abs().max() <= tiny.norm_atol


def test_site_lists_are_in_residual_order_numbered_from_zero(llama):
    a = llama.adapter
    assert a.sites("layer") == ["attn.0", "mlp.0", "attn.1", "mlp.1", "attn.2", "mlp.2"]
    assert a.sites("head")[:5] == ["attn.0.h0", "attn.0.h1", "attn.0.h2", "attn.0.h3", "mlp.0"]
    assert a.readout_sites("head")[0] == "embed"
    assert len(a.readout_sites("head")) == 1 + 3 * (4 + 1)


# ---- clean run ----------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_clean_direct_effects_sum_to_the_models_centred_logit(tiny, granularity):
    clean = tiny.adapter.clean_run(tiny.tokens, granularity=granularity)
    target, centred = hf_centred(tiny.model, tiny.tokens, -1)
    assert clean.target == target
    assert abs(clean.centred_logit - float(centred[target])) <= tiny.logit_atol
    assert clean.site_values.shape == (len(clean.readout_sites), tiny.adapter.arch.d_model)
    total = float(clean.direct_effects.sum()) + clean.readout_const
    # Where Hugging Face computes the final norm in float32 even in a float64 model (RMSNorm),
    # the model's own logit and the exact linear decomposition differ by float32 rounding: the
    # spec's float64 tolerance (1e-6 there, 1e-10 for LayerNorm families).
    assert abs(total - float(centred[target])) <= tiny.decomposition_atol
    # Against the adapter's own readout of the final residual (Eq 24) the sum is exact (up to
    # the heads summing to their layer's output under a post-attention norm: norm_atol).
    w, const = tiny.adapter.readout(clean.target)
    resid = clean.site_values.sum(0)
    own = float(resid @ w / tiny.adapter.final_scale(resid)) + const
    assert abs(total - own) <= (tiny.own_atol * 10 if granularity == "layer" else tiny.norm_atol)


def test_clean_run_at_an_inner_position_reads_out_there(llama):
    a = llama.adapter
    inner = a.clean_run(llama.tokens, position=3)
    prefix = a.clean_run(llama.tokens[:4])
    assert inner.position == 3 and inner.target == prefix.target
    assert torch.allclose(inner.direct_effects, prefix.direct_effects, atol=own_atol(llama.dtype))
    target, centred = hf_centred(llama.model, llama.tokens, 3)
    assert inner.target == target
    assert abs(inner.centred_logit - float(centred[target])) <= llama.logit_atol


# ---- patching vs the naive oracle ---------------------------------------------------------
def _sites_for(adapter: TransformerAdapter, granularity: str) -> list[str]:
    last = adapter.arch.n_layers - 1
    heads = ["attn.1.h1", f"attn.{last}.h{adapter.arch.n_heads - 1}", "attn.0.h0"]
    layer_attn = ["attn.0", f"attn.{last}"] if granularity == "layer" else []
    return ["embed", "mlp.0", *heads, "mlp.1", *layer_attn, f"mlp.{last}"]


@pytest.mark.parametrize("position", [-1, 2])
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_patch_matches_the_naive_hooked_hugging_face_reforward(tiny, granularity, position):
    a = tiny.adapter
    clean = a.clean_run(tiny.tokens, granularity=granularity, position=position)
    sites = _sites_for(a, granularity)
    values = typical_values(a, clean, sites, n=3)
    run = a.patch(clean, sites, values)
    assert run.direct_effects.shape == (len(sites), 3, len(clean.readout_sites))
    _, hf_clean = hf_centred(tiny.model, tiny.tokens, position)
    atol, post_norm = tiny.patch_atol, tiny.spec.post_norm_heads
    for i, site in enumerate(sites):
        naive = naive_patch(a, tiny.tokens, site, values[i], position, granularity, batched=True)
        centred, direct, sigma = naive_readout(a, naive, clean.target)
        assert (run.centred_logit[i] - centred).abs().max() <= atol, site
        total = centred - hf_clean[clean.target]
        assert (run.total_effect[i] - total).abs().max() <= atol, site
        assert (run.direct_effects[i] - direct).abs().max() <= atol, site
        assert (run.sigma[i] - sigma).abs().max() <= atol, site
        # The intervention took: the patched site reads back its value in the HF model (a
        # head under a post-attention norm reads back at its patched run's own scale s(o'),
        # not as v: docs/conventions.md "Heads under a norm after the attention").
        if parse_site(site).kind != "head" or (granularity == "head" and not post_norm):
            assert (naive.site_values[site] - values[i]).abs().max() <= atol, site


def test_naive_one_forward_per_patch_equals_batched(llama):
    """The oracle's own batching (a self-comparison, not an oracle test): P copies of the prompt
    in one forward equal P forwards of one. The fast path is compared with the oracle in
    test_patch_matches_the_naive_hooked_hugging_face_reforward."""
    clean = llama.adapter.clean_run(llama.tokens)
    values = typical_values(llama.adapter, clean, ["attn.1"], 3)[0]
    one = naive_patch(llama.adapter, llama.tokens, "attn.1", values, batched=False)
    batch = naive_patch(llama.adapter, llama.tokens, "attn.1", values, batched=True)
    assert (one.logits - batch.logits).abs().max() <= llama.patch_atol
    assert (one.resid_final - batch.resid_final).abs().max() <= llama.patch_atol


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_patched_site_reads_back_its_value(tiny, granularity):
    a = tiny.adapter
    clean = a.clean_run(tiny.tokens, granularity=granularity)
    sites = _sites_for(a, granularity)
    values = typical_values(a, clean, sites, n=2)
    run = a.patch(clean, sites, values)
    w = clean.readout_dir
    col = {r: j for j, r in enumerate(clean.readout_sites)}
    for i, site in enumerate(sites):
        s = parse_site(site)
        if s.kind == "head" and granularity == "layer":  # attn.l = clean - clean head + v
            layer = f"attn.{s.layer}"
            c = clean.value(layer) - clean.value(site) + values[i]
            got = run.direct_effects[i, :, col[layer]]
        else:
            c, got = values[i], run.direct_effects[i, :, col[site]]
        if not (s.kind == "head" and tiny.spec.post_norm_heads):
            # (under a post-attention norm a head patch renormalises attn.l: read back at s(o'),
            # checked against the hooked oracle in test_patch_matches_the_naive_hooked_...)
            expect = (c @ w) / run.sigma[i]
            assert (got - expect).abs().max() <= tiny.own_atol * 10, site
        clean_de = clean.direct_effects[col[site] if site in col else col[f"attn.{s.layer}"]]
        assert not torch.allclose(got, clean_de.expand_as(got)), site  # it changed something


def test_patching_the_clean_value_reproduces_the_clean_run(tiny):
    a = tiny.adapter
    for granularity in ("layer", "head"):
        clean = a.clean_run(tiny.tokens, granularity=granularity)
        sites = _sites_for(a, granularity)
        values = torch.stack([clean.value(s) for s in sites])[:, None, :]
        run = a.patch(clean, sites, values)
        tol = max(tiny.logit_atol, tiny.norm_atol)  # a share's round trip through the norm
        assert run.total_effect.abs().max() <= tol
        assert (run.direct_effects - clean.direct_effects).abs().max() <= tol
        assert (run.sigma - clean.sigma).abs().max() <= tol


def test_sites_below_the_intervention_change_only_through_sigma(llama):
    a = llama.adapter
    clean = a.clean_run(llama.tokens)
    values = typical_values(a, clean, ["mlp.1"], 4)
    run = a.patch(clean, ["mlp.1"], values)
    upstream = [clean.readout_sites.index(s) for s in ("embed", "attn.0", "mlp.0", "attn.1")]
    rescaled = run.direct_effects[0][:, upstream] * run.sigma[0][:, None] / clean.sigma
    assert (rescaled - clean.direct_effects[upstream]).abs().max() <= own_atol(llama.dtype) * 10


# ---- the fast path against a block-method re-forward (sequential AND parallel residual) ----
def reference_patch(
    adapter: TransformerAdapter, tokens: Tensor, t: int, site: str, value: Tensor, gran: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Full-sequence re-forward from the block methods with do(site = value) at t.

    Returns (direct effects [R] at the run's sigma, centred target logit, sigma), for the clean
    target. Independent of the fast path's caching, sorting and prefix reuse.
    """
    with torch.no_grad():
        return _reference_patch(adapter, tokens, t, site, value, gran)


def _reference_patch(
    adapter: TransformerAdapter, tokens: Tensor, t: int, site: str, value: Tensor, gran: str
) -> tuple[Tensor, Tensor, Tensor]:
    s = parse_site(site)
    clean = adapter.clean_run(tokens, granularity=gran, position=t)
    w, const = adapter.readout(clean.target)
    pos = torch.arange(t + 1)
    z = adapter.embed(tokens[None, : t + 1]).clone()
    if s.kind == "embed":
        z[0, t] = value
    reads = [z[0, t].clone()]
    for layer in range(adapter.arch.n_layers):
        zh = adapter.attention(layer, z, pos)
        a = adapter.attn_output(layer, zh).clone()
        heads = adapter.head_outputs(layer, zh)[0, t].clone()
        if s.kind == "attn" and s.layer == layer:
            a[0, t] = value
        if s.kind == "head" and s.layer == layer:
            a[0, t] = a[0, t] - heads[s.head] + value
            heads[s.head] = value
        m = adapter.mlp(layer, z if adapter.arch.parallel_residual else z + a).clone()
        if s.kind == "mlp" and s.layer == layer:
            m[0, t] = value
        z = z + a + m
        reads += list(heads) if gran == "head" else [a[0, t]]
        reads.append(m[0, t])
    zt = z[0, t]
    sigma = adapter.final_scale(zt)
    logits = adapter.logits(zt)
    return torch.stack(reads) @ w / sigma, logits[clean.target] - logits.mean(), sigma


@pytest.mark.parametrize("name", REPRESENTATIVE)
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_fast_patch_equals_block_method_reforward(shared_tiny, name, granularity):
    """One model per hand-written adapter and residual wiring (``representative``), float64.
    The reference adds a head's value to attn.l; under a post-attention norm a head patch
    renormalises instead, so there the head sites are left to the hooked-oracle test."""
    tiny = shared_tiny(name, torch.float64)
    a, tokens = tiny.adapter, tiny.tokens
    assert a.arch.parallel_residual == tiny.spec.parallel
    clean = a.clean_run(tokens, granularity=granularity, position=-2)
    sites = _sites_for(a, granularity)
    if tiny.spec.post_norm_heads:
        sites = [s for s in sites if parse_site(s).kind != "head"]
    values = typical_values(a, clean, sites, n=2)
    run = a.patch(clean, sites, values)
    t, tol = len(tokens) - 2, max(1e-10, tiny.norm_atol)
    for i, site in enumerate(sites):
        for p in range(2):
            de, centred, sigma = reference_patch(a, tokens, t, site, values[i, p], granularity)
            assert (run.direct_effects[i, p] - de).abs().max() <= tol, site
            assert abs(float(run.centred_logit[i, p] - centred)) <= tol, site
            assert abs(float(run.sigma[i, p] - sigma)) <= tol, site


_PRIVATE: dict[str, TransformerAdapter] = {}


def _private_llama64() -> TransformerAdapter:
    """A private float64 Llama of the registry for the hypothesis test (built once)."""
    if "llama" not in _PRIVATE:
        _PRIVATE["llama"] = make_tiny("llama-tied-gqa", torch.float64).adapter
    return _PRIVATE["llama"]


@settings(max_examples=12, deadline=None)
@given(
    n_tokens=st.integers(1, 9),
    data=st.data(),
)
def test_fast_patch_equals_reforward_for_any_prompt_position_and_sites(n_tokens, data):
    a = _private_llama64()
    tokens = torch.tensor(
        data.draw(st.lists(st.integers(0, 100), min_size=n_tokens, max_size=n_tokens))
    )
    t = data.draw(st.integers(0, n_tokens - 1))
    sites = data.draw(
        st.lists(st.sampled_from(a.readout_sites("layer") + ["attn.1.h3"]), min_size=1, max_size=5)
    )
    clean = a.clean_run(tokens, position=t)
    values = typical_values(a, clean, sites, n=1)
    run = a.patch(clean, sites, values)
    for i, site in enumerate(sites):
        de, centred, _ = reference_patch(a, tokens, t, site, values[i, 0], "layer")
        assert (run.direct_effects[i, 0] - de).abs().max() <= 1e-10
        assert abs(float(run.centred_logit[i, 0] - centred)) <= 1e-10


# ---- hooks that do not fire, and errors ---------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_a_hook_that_does_not_fire_raises(tiny_factory, monkeypatch, dtype):
    llama = tiny_factory("llama-tied-gqa", dtype)  # private: its hook_points are replaced
    a = llama.adapter
    real = a.hook_points

    def off_path(layer: int):
        pts = real(layer)
        return pts._replace(mlp=nn.Identity()) if layer == 1 else pts

    monkeypatch.setattr(a, "hook_points", off_path)
    values = torch.zeros(1, a.arch.d_model, dtype=llama.dtype)
    with pytest.raises(InterventionError, match="did not fire"):
        naive_patch(a, llama.tokens, "mlp.1", values)
    # hooks were removed: the model runs clean afterwards
    monkeypatch.undo()
    naive_patch(a, llama.tokens, "mlp.1", values)


@pytest.mark.parametrize("bad", ["attn.3", "mlp.9", "attn.0.h4", "resid.1", "attn"])
def test_unknown_sites_raise_naming_the_site(llama, bad):
    a = llama.adapter
    clean = a.clean_run(llama.tokens)
    values = torch.zeros(1, 1, a.arch.d_model, dtype=llama.dtype)
    with pytest.raises(UnknownNodeError, match=bad.replace(".", r"\.")):
        a.patch(clean, [bad], values)
    with pytest.raises(UnknownNodeError, match=bad.replace(".", r"\.")):
        naive_patch(a, llama.tokens, bad, values[0])


def test_unknown_site_error_lists_valid_sites(llama):
    clean = llama.adapter.clean_run(llama.tokens)
    with pytest.raises(UnknownNodeError, match="attn.0"):
        llama.adapter.patch(clean, ["mlp.3"], torch.zeros(1, 1, 64, dtype=llama.dtype))


@pytest.mark.parametrize("shape", [(1, 2, 64), (2, 2, 63), (2, 64), (2, 0, 64)])
def test_values_of_the_wrong_shape_raise_naming_the_sites(llama, shape):
    clean = llama.adapter.clean_run(llama.tokens)
    with pytest.raises(ShapeError, match="attn.1"):
        llama.adapter.patch(clean, ["attn.1", "mlp.0"], torch.zeros(shape, dtype=llama.dtype))


def test_non_finite_values_raise_naming_the_site(llama):
    clean = llama.adapter.clean_run(llama.tokens)
    values = torch.zeros(2, 1, 64, dtype=llama.dtype)
    values[1, 0, 5] = float("nan")
    with pytest.raises(NonFiniteError, match="mlp.0"):
        llama.adapter.patch(clean, ["attn.1", "mlp.0"], values)


@pytest.mark.parametrize("position", [7, -8, 100])
def test_position_out_of_range_raises(llama, position):
    with pytest.raises(ContextError, match=f"position {position}"):
        llama.adapter.clean_run(llama.tokens, position=position)


def test_empty_prompt_raises(llama):
    with pytest.raises(ContextError, match="empty"):
        llama.adapter.clean_run(torch.zeros(0, dtype=torch.long))
    with pytest.raises(ContextError, match="empty"):
        llama.adapter.forward(torch.zeros(1, 0, dtype=torch.long))


def test_token_ids_outside_the_vocabulary_raise(llama):
    with pytest.raises(ContextError, match="101"):
        llama.adapter.clean_run(torch.tensor([1, 101]))


def test_whole_layer_patch_in_a_head_granularity_run_is_refused(llama):
    clean = llama.adapter.clean_run(llama.tokens, granularity="head")
    with pytest.raises(InterventionError, match="attn.1"):
        llama.adapter.patch(clean, ["attn.1"], torch.zeros(1, 1, 64, dtype=llama.dtype))


def test_unknown_granularity_raises(llama):
    with pytest.raises(CausalNetError, match="granularity"):
        llama.adapter.sites("neuron")  # type: ignore[arg-type]
