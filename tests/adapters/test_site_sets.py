"""Sets of sites ablated together in one row (``docs/conventions.md``, "Sets of sites").

Oracle: :func:`causalnet.adapters.naive_sets.naive_patch_set`, the Hugging Face model's own
forward with every member hooked. Tolerances: 1e-4 in float32, 1e-9 in float64 (relative to
max(1, |clean centred logit|)).
"""

from __future__ import annotations

import pytest
import torch

from causalnet.adapters.generic import GenericAdapter
from causalnet.adapters.naive import naive_readout
from causalnet.adapters.naive_sets import naive_patch_set
from causalnet.errors import InterventionError, UnknownNodeError
from causalnet.sites import downstream_masks, members, parse_site_set

TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


def _set_sites(a, granularity: str) -> list[str]:
    last = a.arch.n_layers - 1
    if granularity == "layer":
        return [
            "attn.1+attn.2" if last >= 2 else "attn.0+attn.1",
            f"mlp.0+attn.{last}",
            f"embed+mlp.{last}",
            f"attn.0+mlp.0+attn.{last}",
            "attn.0",
        ]
    n_heads = a.arch.n_heads
    but_one = "+".join(f"attn.1.h{h}" for h in range(n_heads) if h != 1)
    return [
        "attn.1.h0+attn.1.h2",
        but_one,  # all heads of a layer but one
        f"attn.0.h1+attn.{last}.h0",
        f"attn.0.h3+mlp.0+attn.{last}.h2",
        "attn.1.h1",
    ]


def _member_values(a, clean, sites: list[str], n_patch: int, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    names = [m for s in sites for m in members(s)]
    base = torch.stack([clean.value(m) for m in names]).double()
    noise = torch.randn(len(names), n_patch, base.shape[-1], generator=gen).double()
    return (base[:, None] + noise * base.abs().amax(-1, keepdim=True)[:, None]).to(a.dtype)


def _check_against_naive(a, tokens, granularity: str, sites: list[str]) -> float:
    clean = a.clean_run(tokens, granularity=granularity)
    values = _member_values(a, clean, sites, n_patch=3)
    fast = a.patch(clean, sites, values)
    tol = TOL[a.dtype] * max(1.0, abs(clean.centred_logit))
    worst, start = 0.0, 0
    for i, s in enumerate(sites):
        n_m = len(members(s))
        per = values[start : start + n_m].transpose(0, 1)  # [P, n_members, d]
        start += n_m
        run = naive_patch_set(a, tokens, s, per, -1, granularity)
        centred, direct, sigma = naive_readout(a, run, clean.target)
        assert fast.sites[i] == parse_site_set(s).name if "+" in s else s
        err = max(
            float((fast.centred_logit[i] - centred).abs().max()),
            float((fast.direct_effects[i] - direct).abs().max()),
            float((fast.sigma[i] - sigma).abs().max()),
        )
        assert err <= tol, f"{s}: fast vs naive {err:.2e} > {tol:.1e}"
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_fast_engine_patches_every_member_of_a_set_as_the_hooked_reforward(tiny, granularity):
    a = tiny.adapter
    if a.arch.n_layers < 2 or a.arch.n_heads < 4:
        pytest.skip("needs 2 layers and 4 heads")
    if granularity == "head" and tiny.spec.post_norm_heads:
        clean = a.clean_run(tiny.tokens, granularity="head")
        values = torch.stack([clean.value("attn.1.h0"), clean.value("attn.1.h2")])[None, None]
        with pytest.raises(InterventionError, match="sets of heads"):  # refused with the reason
            a.patch(clean, ["attn.1.h0+attn.1.h2"], values)
        pytest.skip("sets of heads under a post-attention norm are refused (checked above)")
    _check_against_naive(a, tiny.tokens, granularity, _set_sites(a, granularity))


@pytest.mark.parametrize("name", ["llama-tied-gqa", "neox-parallel", "gpt2-inverse-layer-idx"])
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_generic_adapter_patches_sets_by_the_hooked_reforward(shared_tiny, name, granularity):
    tiny = shared_tiny(name, torch.float64)
    g = GenericAdapter(tiny.model)
    _check_against_naive(g, tiny.tokens, granularity, _set_sites(g, granularity))


def test_a_set_equals_its_single_site_when_the_other_member_is_patched_to_its_clean_value(
    shared_tiny,
):
    """attn.0+attn.2 with attn.2 patched to what it computes when attn.0 is patched == attn.0
    alone is not true in general; but with attn.0 patched to its clean value the set equals
    attn.2 alone (the earlier member changes nothing)."""
    tiny = shared_tiny("llama-tied-gqa", torch.float64)
    a = tiny.adapter
    clean = a.clean_run(tiny.tokens)
    v2 = _member_values(a, clean, ["attn.2"], 2)
    both = torch.cat([clean.value("attn.0").expand(1, 2, -1), v2])
    got = a.patch(clean, ["attn.0+attn.2"], both)
    alone = a.patch(clean, ["attn.2"], v2)
    assert torch.allclose(got.direct_effects, alone.direct_effects, atol=1e-10)
    assert torch.allclose(got.centred_logit, alone.centred_logit, atol=1e-10)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("attn.3+attn.3", "twice"),
        ("attn.3+", "empty member"),
        ("+attn.3", "empty member"),
        ("attn.3+attn.x", "not a site name"),
        ("attn.3+attn.4.h0", "mixes granularities"),
    ],
)
def test_bad_site_sets_are_refused_naming_the_set(bad, message):
    with pytest.raises(UnknownNodeError, match=message):
        parse_site_set(bad)


def test_patch_refuses_a_set_with_a_member_outside_the_model_or_wrong_values(shared_tiny):
    tiny = shared_tiny("llama-tied-gqa", torch.float32)
    a = tiny.adapter
    clean = a.clean_run(tiny.tokens)
    d = a.arch.d_model
    with pytest.raises(UnknownNodeError, match="attn.99"):
        a.patch(clean, ["attn.0+attn.99"], torch.zeros(2, 1, d))
    with pytest.raises(Exception, match="n_members"):
        a.patch(clean, ["attn.0+attn.1"], torch.zeros(1, 1, d))


def test_set_names_are_canonical_and_eq33_runs_from_the_earliest_member():
    assert parse_site_set("attn.23+attn.22").name == "attn.22+attn.23"
    readouts = ["embed", "attn.0", "mlp.0", "attn.1", "mlp.1", "attn.2", "mlp.2"]
    down_attn, down_mlp, own = downstream_masks(["mlp.2+attn.1"], readouts, False)
    assert own[0].tolist() == [False, False, False, True, False, False, True]
    assert down_attn[0].tolist() == [False, False, False, False, False, True, False]
    assert down_mlp[0].tolist() == [False, False, False, False, True, False, False]
