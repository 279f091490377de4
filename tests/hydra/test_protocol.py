"""The protocol's bookkeeping: the downstream rule of Eq 33 and the split of Eqs 33, 34.

The rule is pinned three ways: (1) site sets written out by hand for a sequential model, a
parallel-residual model (the MLP of layer l reads the same input as attn.l, so it is not
downstream of attn.l) and head ablations (the other heads of the same layer are not
downstream); (2) ``decompose`` on small tensors whose terms are computed by hand in the test;
(3) the models themselves: in a hooked Hugging Face forward with a site ablated, every site
the rule calls upstream keeps its value and every site it calls downstream changes.

The identity total = Delta_DE(self) + CE + Delta_DE(upstream) is tested only with totals
from the model's own logits (upstream is the complement of downstream, so on numbers built to
decompose it would hold by construction and prove nothing).
"""

from __future__ import annotations

import pytest
import torch

from causalnet.adapters import adapt
from causalnet.adapters.naive import naive_patch, naive_readout
from causalnet.errors import ShapeError
from causalnet.hydra.protocol import decompose
from causalnet.sites import downstream_masks
from tiny_lm import OTHER_FAMILIES

LAYERS = ["embed", "attn.0", "mlp.0", "attn.1", "mlp.1", "attn.2", "mlp.2"]
HEADS = ["embed", "attn.0.h0", "attn.0.h1", "mlp.0", "attn.1.h0", "attn.1.h1", "mlp.1"]

# ablated site -> (downstream attention sites, downstream MLP sites), written out by hand.
SEQUENTIAL = {
    "embed": ({"attn.0", "attn.1", "attn.2"}, {"mlp.0", "mlp.1", "mlp.2"}),
    "attn.0": ({"attn.1", "attn.2"}, {"mlp.0", "mlp.1", "mlp.2"}),
    "mlp.0": ({"attn.1", "attn.2"}, {"mlp.1", "mlp.2"}),
    "attn.1": ({"attn.2"}, {"mlp.1", "mlp.2"}),
    "mlp.1": ({"attn.2"}, {"mlp.2"}),
    "attn.2": (set(), {"mlp.2"}),
    "mlp.2": (set(), set()),
}
PARALLEL = {
    "embed": ({"attn.0", "attn.1", "attn.2"}, {"mlp.0", "mlp.1", "mlp.2"}),
    "attn.0": ({"attn.1", "attn.2"}, {"mlp.1", "mlp.2"}),  # not mlp.0: same input
    "mlp.0": ({"attn.1", "attn.2"}, {"mlp.1", "mlp.2"}),
    "attn.1": ({"attn.2"}, {"mlp.2"}),  # not mlp.1
    "mlp.1": ({"attn.2"}, {"mlp.2"}),
    "attn.2": (set(), set()),  # not mlp.2
    "mlp.2": (set(), set()),
}
# (ablated head, parallel) -> downstream sets; the other head of the layer is never downstream
HEAD_CASES = {
    ("attn.0.h1", False): ({"attn.1.h0", "attn.1.h1"}, {"mlp.0", "mlp.1"}),
    ("attn.0.h1", True): ({"attn.1.h0", "attn.1.h1"}, {"mlp.1"}),
    ("attn.1.h0", False): (set(), {"mlp.1"}),
    ("attn.1.h0", True): (set(), set()),
    ("mlp.0", False): ({"attn.1.h0", "attn.1.h1"}, {"mlp.1"}),
    ("mlp.0", True): ({"attn.1.h0", "attn.1.h1"}, {"mlp.1"}),
}


def _sets(ablated: str, readouts: list[str], parallel: bool) -> tuple[set, set, set]:
    """(downstream attention, downstream MLP, self) as sets of names, from the masks."""
    down_attn, down_mlp, is_self = downstream_masks([ablated], readouts, parallel)
    pick = lambda mask: {r for r, m in zip(readouts, mask[0].tolist(), strict=True) if m}  # noqa: E731
    return pick(down_attn), pick(down_mlp), pick(is_self)


# ---- (1) the rule, as site sets ---------------------------------------------------------------
@pytest.mark.parametrize("ablated", list(SEQUENTIAL))
def test_downstream_sites_of_a_sequential_model(ablated):
    attn, mlp, self_ = _sets(ablated, LAYERS, parallel=False)
    assert (attn, mlp) == SEQUENTIAL[ablated]
    assert self_ == {ablated}


@pytest.mark.parametrize("ablated", list(PARALLEL))
def test_downstream_sites_of_a_parallel_residual_model(ablated):
    attn, mlp, self_ = _sets(ablated, LAYERS, parallel=True)
    assert (attn, mlp) == PARALLEL[ablated]
    assert self_ == {ablated}


@pytest.mark.parametrize(("ablated", "parallel"), list(HEAD_CASES))
def test_downstream_sites_of_a_head_ablation(ablated, parallel):
    attn, mlp, self_ = _sets(ablated, HEADS, parallel)
    assert (attn, mlp) == HEAD_CASES[(ablated, parallel)]
    assert self_ == {ablated}
    layer = ablated.split(".")[1]
    siblings = {h for h in HEADS if h.startswith(f"attn.{layer}.h")} - {ablated}
    assert not siblings & (attn | mlp)


# ---- (2) decompose on numbers computed by hand -------------------------------------------------
# Delta_DE of readout r is 2**r (embed 1, attn.0 2, mlp.0 4, attn.1 8, mlp.1 16, attn.2 32,
# mlp.2 64), so every sum below names its set of sites uniquely.
POWERS = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0], dtype=torch.float64)

# (ablated, parallel, readouts) -> (self, CE_attn, CE_mlp, upstream), added up by hand
HAND = {
    ("attn.1", False, "layers"): (8.0, 32.0, 16.0 + 64.0, 1.0 + 2.0 + 4.0),
    ("attn.1", True, "layers"): (8.0, 32.0, 64.0, 1.0 + 2.0 + 4.0 + 16.0),
    ("mlp.0", False, "layers"): (4.0, 8.0 + 32.0, 16.0 + 64.0, 1.0 + 2.0),
    ("mlp.0", True, "layers"): (4.0, 8.0 + 32.0, 16.0 + 64.0, 1.0 + 2.0),
    ("attn.0", True, "layers"): (2.0, 8.0 + 32.0, 16.0 + 64.0, 1.0 + 4.0),
    ("attn.2", True, "layers"): (32.0, 0.0, 0.0, 1.0 + 2.0 + 4.0 + 8.0 + 16.0 + 64.0),
    ("embed", False, "layers"): (1.0, 2.0 + 8.0 + 32.0, 4.0 + 16.0 + 64.0, 0.0),
    # heads: embed 1, attn.0.h0 2, attn.0.h1 4, mlp.0 8, attn.1.h0 16, attn.1.h1 32, mlp.1 64
    ("attn.0.h1", False, "heads"): (4.0, 16.0 + 32.0, 8.0 + 64.0, 1.0 + 2.0),
    ("attn.0.h1", True, "heads"): (4.0, 16.0 + 32.0, 64.0, 1.0 + 2.0 + 8.0),
    ("attn.1.h0", False, "heads"): (16.0, 0.0, 64.0, 1.0 + 2.0 + 4.0 + 8.0 + 32.0),
}


@pytest.mark.parametrize(("ablated", "parallel", "kind"), list(HAND))
def test_decompose_splits_delta_de_into_hand_computed_terms(ablated, parallel, kind):
    readouts = LAYERS if kind == "layers" else HEADS
    de_clean = torch.tensor([0.5, -1.0, 2.0, 0.25, -3.0, 1.5, 0.0], dtype=torch.float64)
    de_ablated = (de_clean + POWERS).reshape(1, 1, 7)
    total = torch.tensor([[999.0]], dtype=torch.float64)  # passed through, never recomputed
    dec = decompose([ablated], readouts, de_clean, de_ablated, total, parallel)
    self_, ce_attn, ce_mlp, upstream = HAND[(ablated, parallel, kind)]
    assert float(dec.delta_self) == self_
    assert float(dec.compensatory_attn) == ce_attn
    assert float(dec.compensatory_mlp) == ce_mlp
    assert float(dec.compensatory) == ce_attn + ce_mlp
    assert float(dec.delta_upstream) == upstream
    assert float(dec.total) == 999.0
    torch.testing.assert_close(dec.delta_de[0, 0], POWERS, rtol=0, atol=0)


def test_decompose_per_site_and_patch_with_hand_computed_values():
    """Two ablated sites x two patches of a parallel model; every term computed by hand."""
    readouts = ["embed", "attn.0", "mlp.0", "attn.1", "mlp.1"]
    de_clean = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    de_ablated = torch.tensor(
        [
            # ablating attn.0 (parallel: mlp.0 is not downstream)
            [[1.5, 0.0, 3.0, 7.0, 4.0], [0.5, -1.0, 2.0, 4.0, 9.0]],
            # ablating mlp.0
            [[1.0, 2.0, -1.0, 6.0, 5.5], [2.0, 2.0, 0.0, 4.0, 5.0]],
        ],
        dtype=torch.float64,
    )
    total = torch.zeros(2, 2, dtype=torch.float64)
    dec = decompose(["attn.0", "mlp.0"], readouts, de_clean, de_ablated, total, True)
    # delta = ablated - clean:
    #   attn.0, p0: [0.5, -2, 0, 3, -1]     attn.0, p1: [-0.5, -3, -1, 0, 4]
    #   mlp.0,  p0: [0, 0, -4, 2, 0.5]      mlp.0,  p1: [1, 0, -3, 0, 0]
    expect = {
        "delta_self": [[-2.0, -3.0], [-4.0, -3.0]],
        "compensatory_attn": [[3.0, 0.0], [2.0, 0.0]],  # attn.1
        "compensatory_mlp": [[-1.0, 4.0], [0.5, 0.0]],  # mlp.1 only
        "delta_upstream": [[0.5 + 0.0, -0.5 - 1.0], [0.0 + 0.0, 1.0 + 0.0]],  # embed (+ mlp.0)
    }
    for name, values in expect.items():
        got = getattr(dec, name)
        torch.testing.assert_close(
            got, torch.tensor(values, dtype=torch.float64), rtol=0, atol=0, msg=name
        )


def test_decompose_rejects_readouts_of_the_wrong_shape():
    z = torch.zeros
    with pytest.raises(ShapeError, match="de_ablated"):
        decompose(["attn.0"], LAYERS, z(7), z(1, 2, 6), z(1, 2), False)
    with pytest.raises(ShapeError, match="de_clean"):
        decompose(["attn.0"], LAYERS, z(6), z(1, 2, 7), z(1, 2), False)
    with pytest.raises(ShapeError, match="total"):
        decompose(["attn.0"], LAYERS, z(7), z(1, 2, 7), z(2, 1), False)


# ---- (3) the rule and the identity against the models' own forward passes -------------------
# gpt2: sequential residual; gpt_neox (use_parallel_residual) and gptj: parallel.
FAMILIES = {"gpt2": False, "gpt_neox": True, "gptj": True}
TOKENS = torch.tensor([5, 77, 3, 200, 41, 9, 120])


@pytest.fixture(scope="module", params=list(FAMILIES))
def model64(request: pytest.FixtureRequest):
    """A seeded tiny model of one family in float64, its adapter and its parallel flag."""
    torch.manual_seed(0)
    model = OTHER_FAMILIES[request.param]().double().eval()
    adapter = adapt(model)
    assert adapter.arch.parallel_residual == FAMILIES[request.param]
    return adapter


def _patches(adapter, clean, site: str, n: int = 2) -> torch.Tensor:
    """n random values for ``site`` of its clean norm, plus (row 0) its clean value."""
    gen = torch.Generator().manual_seed(11)
    ref = clean.value(site)
    v = torch.randn(n, ref.shape[0], generator=gen, dtype=ref.dtype)
    v = v / v.norm(dim=-1, keepdim=True) * ref.norm().clamp_min(1e-3) * 2
    return torch.cat([ref[None], v])


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_sites_the_rule_calls_upstream_keep_their_value_in_the_models_own_forward(
    model64, granularity
):
    """In the Hugging Face model's hooked forward (float64), ablating a site leaves every
    non-downstream site's value unchanged (<= 1e-12) and changes every downstream one (> 1e-6):
    Eq 33's rule read off the model, including the parallel MLP and the sibling heads."""
    a = model64
    parallel = a.arch.parallel_residual
    clean = a.clean_run(TOKENS, granularity=granularity)
    readouts = clean.readout_sites
    ablated = ["attn.0.h1", "attn.1.h2"] if granularity == "head" else ["attn.0", "attn.1"]
    for site in ["embed", *ablated, "mlp.0", "mlp.1"]:
        run = naive_patch(a, TOKENS, site, _patches(a, clean, site), granularity=granularity)
        down_attn, down_mlp, _ = _sets(site, readouts, parallel)
        for r in readouts:
            if r == site:
                continue
            change = (run.site_values[r][1:] - run.site_values[r][0]).abs().max()
            if r in down_attn | down_mlp:
                assert change > 1e-6, f"{r} should be downstream of {site}"
            else:
                assert change <= 1e-12, f"{r} should not be downstream of {site}"


def test_identity_holds_with_totals_from_the_models_own_logits(model64):
    """total = Delta_DE(self) + CE + Delta_DE(upstream) where total is the change of the
    Hugging Face model's centred target logit (Eq 12) and the direct effects are read from the
    same hooked forward at its own sigma (Eq 13). float64: 1e-9."""
    a = model64
    clean = a.clean_run(TOKENS)
    sites = a.sites("layer")
    with torch.no_grad():
        logits = a.model(input_ids=TOKENS[None]).logits[0, -1]
    clean_centred = logits[clean.target] - logits.mean()
    direct, totals = [], []
    for site in sites:
        run = naive_patch(a, TOKENS, site, _patches(a, clean, site)[1:])
        centred, de, _ = naive_readout(a, run, clean.target)
        direct.append(de)
        totals.append(centred - clean_centred)
    dec = decompose(
        sites,
        clean.readout_sites,
        clean.direct_effects,
        torch.stack(direct),
        torch.stack(totals),
        a.arch.parallel_residual,
    )
    assert dec.total.abs().max() > 1e-3  # the ablations did something
    assert dec.compensatory.abs().max() > 1e-6
    assert dec.identity_residual().abs().max() <= 1e-9
