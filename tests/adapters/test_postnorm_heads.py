"""Heads of discovered decoders with a norm after the attention (issue 12, section 2).

OLMo-2, Gemma 2 and Gemma 3 (through the generic path) add ``norm(o)``, o the output
projection's output. A head's value is its share ``gamma * o_H / s(o)`` at the run's own scale
and do(attn.l.hH = v) moves o_H to the term whose share at the clean scale is v, the model's
own norm renormalising (docs/conventions.md, "Heads under a norm after the attention").

Oracle: :func:`causalnet.adapters.naive.naive_patch`, the Hugging Face model itself hooked, its
post-norm frame read from the norm module (not from the discovered parts), one full re-forward
per patch, read out from the model's own logits. Tolerances: float32 1e-4 of max(1, |clean
centred logit|) for patches, 1e-5 of the layer's scale for the heads' sum; float64 1e-6 for
both, since these models' RMSNorms compute in float32 even inside a float64 model (the
oracle's frame is float64, the module's float32).
"""

from __future__ import annotations

import pytest
import torch

from causalnet.adapters import adapt
from causalnet.adapters.generic import GenericAdapter
from causalnet.adapters.naive import naive_patch, naive_readout
from causalnet.adapters.tiny_configs import probe_tokens, tiny_model
from causalnet.errors import InterventionError, ModelError

TYPES = ["olmo2", "gemma2", "gemma3_text"]
DTYPES = {"f32": torch.float32, "f64": torch.float64}
SUM_TOL = {torch.float32: 1e-5, torch.float64: 1e-6}
PATCH_TOL = {torch.float32: 1e-4, torch.float64: 1e-6}
TOKENS = probe_tokens(128)
_CACHE: dict[tuple[str, torch.dtype], GenericAdapter] = {}


def _adapter(model_type: str, dtype: torch.dtype) -> GenericAdapter:
    key = (model_type, dtype)
    if key not in _CACHE:
        adapter = adapt(tiny_model(model_type).to(dtype), generic=True)
        assert isinstance(adapter, GenericAdapter)
        _CACHE[key] = adapter
    return _CACHE[key]


CASES = [(t, d) for t in TYPES for d in DTYPES]


@pytest.fixture(params=CASES, ids=[f"{t}-{d}" for t, d in CASES])
def post(request: pytest.FixtureRequest) -> GenericAdapter:
    model_type, d = request.param
    return _adapter(model_type, DTYPES[d])


def test_discovery_finds_the_projection_under_the_norm_after_the_attention(post):
    parts = post.parts
    assert post.head_refusal is None and post.arch.sublayer_norms
    assert parts.post_norms is not None and len(parts.post_norms) == parts.n_layers
    for layer, norm in enumerate(parts.post_norms):
        assert norm.name == parts.attn_names[layer]  # the attention part is the norm
        assert parts.o_proj[layer] is post.model.model.layers[layer].self_attn.o_proj
        assert norm.fit.form == "rms" and norm.fit.bias is None
    gemma = post.arch.family.startswith("gemma")
    assert parts.post_norms[0].fit.gain_source == ("1 + weight" if gemma else "weight")


def test_heads_sum_to_their_attention_layer(post):
    heads = post.clean_run(TOKENS, "head")
    layer = post.clean_run(TOKENS, "layer")
    n_h = post.arch.n_heads
    for lay in range(post.arch.n_layers):
        cols = [heads.readout_sites.index(f"attn.{lay}.h{h}") for h in range(n_h)]
        attn = layer.site_values[layer.readout_sites.index(f"attn.{lay}")].double()
        got = heads.site_values[cols].double().sum(0)
        assert (got - attn).abs().max() <= SUM_TOL[post.dtype] * float(attn.abs().max())
        # not additive terms: the shares are not the projection's terms (the norm rescales)
        o_terms = heads.site_values[cols].double()
        assert (o_terms - o_terms.mean(0)).abs().max() > 0
    total = float(heads.direct_effects.sum()) + heads.readout_const
    assert abs(total - heads.centred_logit) <= SUM_TOL[post.dtype] * max(1, abs(total))


def test_clean_head_shares_equal_the_naive_oracles(post):
    """The naive oracle's heads (shares read from the norm module at the clean scale) in a run
    that patches the last MLP with its own clean value (a no-op for the heads)."""
    clean = post.clean_run(TOKENS, "head")
    last = f"mlp.{post.arch.n_layers - 1}"
    value = clean.value(last)[None]
    run = naive_patch(post, TOKENS, last, value, granularity="head")
    scale = float(clean.site_values.abs().max())
    for name, got in run.site_values.items():
        want = clean.value(name)
        assert (got[0].double() - want.double()).abs().max() <= SUM_TOL[post.dtype] * scale, name


@pytest.mark.parametrize("site", ["attn.0.h1", "attn.1.h3", "attn.1.h0", "mlp.0", "embed"])
def test_head_patches_equal_the_naive_hooked_reforward(post, site):
    """Random values and a resample (another prompt's share) through ``GenericAdapter.patch``
    (the fast final-position replay) and the naive oracle: centred logit, total effect, sigma
    and every readout site's direct effect, the layer's heads at the patched scale."""
    assert post.fast_refusal is None, post.fast_refusal
    clean = post.clean_run(TOKENS, "head")
    gen = torch.Generator().manual_seed(7)
    other = post.clean_run(probe_tokens(128, seed=3), "head")
    noise = torch.randn(2, post.arch.d_model, generator=gen, dtype=torch.float64)
    base = clean.value(site).double()
    values = torch.cat([(base + noise * base.abs().max()), other.value(site).double()[None]]).to(
        post.dtype
    )
    run = post.patch(clean, [site], values[None])
    naive = naive_patch(post, TOKENS, site, values, granularity="head")
    cap = post.parts.readout.softcap
    if cap is not None:  # Gemma 2: the readout is before the final soft-cap
        naive.logits = cap * torch.atanh(naive.logits.double() / cap)
    centred, direct, sigma = naive_readout(post, naive, clean.target)
    tol = PATCH_TOL[post.dtype] * max(1.0, abs(clean.centred_logit))
    assert (run.centred_logit[0] - centred).abs().max() <= tol
    assert (run.total_effect[0] - (centred - clean.centred_logit)).abs().max() <= tol
    assert (run.direct_effects[0] - direct).abs().max() <= tol
    assert (run.sigma[0] - sigma).abs().max() <= tol * float(sigma.abs().max())
    assert run.total_effect.abs().max() > 1e3 * tol  # the patch did something


def test_a_head_patch_moves_the_term_and_the_norm_renormalises(post):
    """do(attn.1.h2 = v): the head's share is v only at the clean scale; read back at the
    patched scale it is v * s(o) / s(o'), and every sibling is rescaled by the same factor."""
    clean = post.clean_run(TOKENS, "head")
    site = "attn.1.h2"
    v = clean.value(site) * 3.0 + 0.5  # a share at the clean scale
    run = post.patch(clean, [site], v[None, None])
    w, n_h = clean.readout_dir, post.arch.n_heads
    cols = [clean.readout_sites.index(f"attn.1.h{h}") for h in range(n_h)]
    ratio = run.direct_effects[0, 0, cols] * run.sigma[0, 0]  # shares' . w at s(o')
    clean_w = clean.site_values[cols].to(w.dtype) @ w
    f = float(ratio[0] / clean_w[0])  # s(o) / s(o'), the same for every sibling
    assert abs(f - 1.0) > 1e-3
    tol = 10 * PATCH_TOL[post.dtype]
    for h in range(n_h):
        want = float(v.to(w.dtype) @ w) if h == 2 else float(clean_w[h])
        assert float(ratio[h]) == pytest.approx(f * want, rel=tol, abs=tol)


def test_patching_every_heads_clean_share_reproduces_the_clean_run(post):
    clean = post.clean_run(TOKENS, "head")
    sites = post.sites("head")
    values = torch.stack([clean.value(s) for s in sites])[:, None]
    run = post.patch(clean, sites, values)
    tol = PATCH_TOL[post.dtype] * max(1.0, abs(clean.centred_logit))
    assert run.total_effect.abs().max() <= tol
    assert (run.direct_effects[:, 0] - clean.direct_effects).abs().max() <= tol


@pytest.mark.parametrize("model_type", ["olmo2", "gemma2"])
def test_a_zero_gain_entry_of_the_norm_after_the_attention_refuses_heads_naming_it(model_type):
    model = tiny_model(model_type)
    norm = model.model.layers[1].post_attention_layernorm
    with torch.no_grad():  # gamma = weight (OLMo-2) or 1 + weight (Gemma 2) is 0 at entry 5
        norm.weight[5] = 0.0 if model_type == "olmo2" else -1.0
    adapter = adapt(model, generic=True)
    assert adapter.head_refusal is not None
    assert "model.layers.1.post_attention_layernorm" in adapter.head_refusal
    assert "zero gain" in adapter.head_refusal
    with pytest.raises(ModelError, match="use granularity='layer'"):
        adapter.sites("head")
    adapter.clean_run(TOKENS, "layer")  # layer granularity is unaffected


def test_sets_of_heads_under_the_norm_are_refused_with_the_reason():
    """No oracle patches several heads through the norm at once (as the hand-written Gemma 3
    adapter, sets of heads are refused; whole layers together are not)."""
    adapter = _adapter("olmo2", torch.float32)
    clean = adapter.clean_run(TOKENS, "head")
    values = torch.stack([clean.value("attn.1.h0"), clean.value("attn.1.h2")])[None, None]
    with pytest.raises(InterventionError, match=r"sets of heads \('attn.1.h0'\)"):
        adapter.patch(clean, ["attn.1.h0+attn.1.h2"], values.reshape(2, 1, -1))
    layer = adapter.clean_run(TOKENS, "layer")
    both = torch.stack([layer.value("attn.0"), layer.value("attn.1")])[:, None]
    run = adapter.patch(layer, ["attn.0+attn.1"], both)
    assert run.total_effect.abs().max() <= 1e-4 * max(1.0, abs(layer.centred_logit))


#: Every model type of the coverage table whose heads sit under a norm after the attention.
POST_NORM_TYPES = [
    "afmoe",
    "exaone4",
    "flex_olmo",
    "gemma2",
    "gemma4_unified_text",
    "glm4",
    "hyperclovax",
    "kolibri1",
    "lfm3",
    "olmo2",
    "olmo3",
    "olmo_hybrid",
]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", POST_NORM_TYPES)
def test_every_post_norm_type_patches_heads_as_the_naive_oracle(model_type):
    """float32, 1e-4 of max(1, |clean centred logit|): a head of each layer, and embed."""
    adapter = adapt(tiny_model(model_type), generic=True)
    assert isinstance(adapter, GenericAdapter) and adapter.head_refusal is None
    assert adapter.parts.post_norms is not None
    clean = adapter.clean_run(TOKENS, "head")
    gen = torch.Generator().manual_seed(1)
    sites = [f"attn.{lay}.h{lay % adapter.arch.n_heads}" for lay in range(adapter.arch.n_layers)]
    tol = 1e-4 * max(1.0, abs(clean.centred_logit))
    for site in [*sites, "embed"]:
        base = clean.value(site)
        values = base[None] + torch.randn(2, base.shape[-1], generator=gen) * base.abs().max()
        run = adapter.patch(clean, [site], values[None])
        naive = naive_patch(adapter, TOKENS, site, values, granularity="head")
        cap = adapter.parts.readout.softcap
        if cap is not None:
            naive.logits = cap * torch.atanh(naive.logits.double() / cap)
        centred, direct, sigma = naive_readout(adapter, naive, clean.target)
        assert (run.centred_logit[0] - centred).abs().max() <= tol, site
        assert (run.direct_effects[0] - direct).abs().max() <= tol, site
        assert (run.sigma[0] - sigma).abs().max() <= tol * float(sigma.abs().max()), site


def test_a_layernorm_after_the_attention_refuses_heads_naming_it():
    """A centring norm after the attention: its shares are not defined (refused, named);
    layer granularity still decomposes exactly."""
    model = tiny_model("olmo2")
    d = model.config.hidden_size
    gen = torch.Generator().manual_seed(2)
    for block in model.model.layers:
        norm = torch.nn.LayerNorm(d, eps=1e-6)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.3 * torch.randn(d, generator=gen))
            norm.bias.copy_(0.1 * torch.randn(d, generator=gen))
        block.post_attention_layernorm = norm
    adapter = adapt(model, generic=True)
    assert "model.layers.0.post_attention_layernorm" in adapter.head_refusal
    assert "LayerNorm" in adapter.head_refusal
    clean = adapter.clean_run(TOKENS, "layer")
    total = float(clean.direct_effects.sum()) + clean.readout_const
    assert abs(total - clean.centred_logit) <= 1e-5 * max(1.0, abs(total))
