"""Total, direct and indirect effects (Defs 3.2-3.4) against independent oracles."""

from __future__ import annotations

import math

import networkx as nx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from causalnet import (
    SCM,
    Mean,
    Noise,
    Resample,
    Zero,
    direct_effect,
    indirect_effect,
    total_effect,
)
from causalnet.errors import InterventionError, UnknownNodeError

# ---- random linear SCMs vs a path-sum oracle ---------------------------------------------
#
# v_i = e_i + sum_{j -> i} w_ji v_j on a random upper-triangular DAG, intervention
# do(v_x = v_x(u) + delta) (a callable). The oracle is built from the edge list alone, with
# networkx.all_simple_paths on its own graph:
#   TE = delta * sum over directed paths x ~> y of the product of their edge weights
#   DE = delta * (the same sum over paths with no interior node in M)   (= w_xy * delta for the
#        default M = every other endogenous node; 0 without an x -> y edge)
#   IE = delta * (the same sum over paths with an interior node in M)   (= TE - DE)
# Tolerances: |engine - oracle| <= tol * (1 + max|Y(u)|), tol = 1e-9 in float64, 1e-5 in float32
# (a difference of two runs loses precision relative to the size of Y itself).

TOL = {torch.float64: 1e-9, torch.float32: 1e-5}


def _linear_node(weights: list[float]):
    def fn(e: torch.Tensor, *parents: torch.Tensor) -> torch.Tensor:
        out = e
        for w, p in zip(weights, parents, strict=True):
            out = out + w * p
        return out

    return fn


@st.composite
def linear_cases(draw):
    n = draw(st.integers(2, 7))
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    edges = [e for e in pairs if draw(st.booleans())]
    weight = st.floats(-2, 2, allow_nan=False, allow_infinity=False)
    weights = {e: draw(weight) for e in edges}
    batch = draw(st.integers(1, 4))
    value = st.floats(-3, 3, allow_nan=False, allow_infinity=False)
    noise = [[draw(value) for _ in range(batch)] for _ in range(n)]
    delta = draw(value)
    x, y = draw(st.sampled_from([(a, b) for a in range(n) for b in range(n) if a != b]))
    others = [i for i in range(n) if i not in (x, y)]
    mediators = draw(
        st.none() | st.lists(st.sampled_from(others), unique=True) if others else st.none()
    )
    order = draw(st.permutations(range(n)))  # declaration order: parents before or after
    return n, weights, noise, delta, x, y, mediators, order


def _build_linear(n, weights, order) -> SCM:
    scm = SCM()
    for i in order:
        parents = [j for j in range(n) if (j, i) in weights]
        scm.add_node(
            f"v{i}",
            parents=[f"e{i}"] + [f"v{j}" for j in parents],
            fn=_linear_node([weights[(j, i)] for j in parents]),
        )
        scm.add_exogenous(f"e{i}")
    return scm


def _oracle(n, weights, delta, x, y, mediators) -> tuple[float, float, float]:
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    g.add_edges_from(weights)
    med = set(range(n)) - {x, y} if mediators is None else set(mediators)
    te = de = 0.0
    for path in nx.all_simple_paths(g, x, y):
        gain = math.prod(weights[(a, b)] for a, b in zip(path, path[1:], strict=False))
        te += gain
        if not med & set(path[1:-1]):
            de += gain
    return delta * te, delta * de, delta * (te - de)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=60, deadline=None)
@given(case=linear_cases())
def test_linear_effects_match_the_path_sum_oracle(dtype, case) -> None:
    n, weights, noise, delta, x, y, mediators, order = case
    scm = _build_linear(n, weights, order)
    ctx = {f"e{i}": torch.tensor(noise[i], dtype=dtype) for i in range(n)}
    shift = lambda nat: nat + delta  # noqa: E731
    X, Y = f"v{x}", f"v{y}"
    M = None if mediators is None else [f"v{i}" for i in mediators]

    te = total_effect(scm, X, Y, ctx, shift)
    de = direct_effect(scm, X, Y, ctx, shift, mediators=M)
    ie = indirect_effect(scm, X, Y, ctx, shift, mediators=M)

    want_te, want_de, want_ie = _oracle(n, weights, delta, x, y, mediators)
    scale = 1 + scm.run(ctx)[Y].abs().max().item()
    for got, want in ((te, want_te), (de, want_de), (ie, want_ie)):
        assert got.dtype == dtype and got.shape == (len(noise[0]),)
        assert torch.allclose(
            got.double(), torch.full_like(got.double(), want), rtol=0, atol=TOL[dtype] * scale
        )
    if mediators is None:  # the default M: the direct effect is the x -> y edge alone
        assert want_de == pytest.approx(weights.get((x, y), 0.0) * delta)


def test_linear_effect_methods_equal_the_functions() -> None:
    scm = _build_linear(3, {(0, 1): 2.0, (1, 2): 3.0, (0, 2): 5.0}, [0, 1, 2])
    ctx = {f"e{i}": torch.tensor([1.0, 2.0]) for i in range(3)}
    assert torch.equal(
        scm.total_effect("v0", "v2", ctx, 1.5), total_effect(scm, "v0", "v2", ctx, 1.5)
    )
    assert torch.equal(
        scm.direct_effect("v0", "v2", ctx, 1.5, mediators=["v1"]),
        direct_effect(scm, "v0", "v2", ctx, 1.5, mediators=["v1"]),
    )
    assert torch.equal(
        scm.indirect_effect("v0", "v2", ctx, 1.5), indirect_effect(scm, "v0", "v2", ctx, 1.5)
    )


# ---- nonlinear models, worked by hand ----------------------------------------------------


def square_product() -> SCM:
    """x = u, m = x^2, y = x * m (= x^3)."""
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("x", ["u"], lambda u: u)
    scm.add_node("m", ["x"], lambda x: x**2)
    scm.add_node("y", ["x", "m"], lambda x, m: x * m)
    return scm


def test_nonlinear_effects_do_not_add_up() -> None:
    # do(x = 3):  TE = 3^3 - u^3,  DE = 3 u^2 - u^3 (m held at u^2),
    #             IE = u * 3^2 - u^3 (x kept at u, m switched to 9).
    u = torch.tensor([1.0, 2.0, -1.0])
    ctx = {"u": u}
    scm = square_product()
    te = total_effect(scm, "x", "y", ctx, 3.0)
    de = direct_effect(scm, "x", "y", ctx, 3.0)
    ie = indirect_effect(scm, "x", "y", ctx, 3.0)
    assert torch.equal(te, torch.tensor([26.0, 19.0, 28.0]))
    assert torch.equal(de, torch.tensor([2.0, 4.0, 4.0]))
    assert torch.equal(ie, torch.tensor([8.0, 10.0, -8.0]))
    assert not torch.allclose(te, de + ie)


def test_nonlinear_soft_intervention() -> None:
    # do(x = 2 x(u)):  TE = 8u^3 - u^3,  DE = 2u * u^2 - u^3,  IE = u * 4u^2 - u^3
    u = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    ctx, scm, g = {"u": u}, square_product(), (lambda nat: 2 * nat)
    assert torch.allclose(total_effect(scm, "x", "y", ctx, g), 7 * u**3)
    assert torch.allclose(direct_effect(scm, "x", "y", ctx, g), u**3)
    assert torch.allclose(indirect_effect(scm, "x", "y", ctx, g), 3 * u**3)


def two_mediators() -> SCM:
    """x = u, a = x^2, b = 3x, y = a * b + x."""
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("x", ["u"], lambda u: u)
    scm.add_node("a", ["x"], lambda x: x**2)
    scm.add_node("b", ["x"], lambda x: 3 * x)
    scm.add_node("y", ["a", "b", "x"], lambda a, b, x: a * b + x)
    return scm


def test_mediator_subset_holds_or_switches_only_those_nodes() -> None:
    u = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    ctx, scm, xp = {"u": u}, two_mediators(), 1.5
    y_nat = 3 * u**3 + u
    # TE: everything follows x' = 1.5
    assert torch.allclose(total_effect(scm, "x", "y", ctx, xp), 3 * xp**3 + xp - y_nat)
    # M = {a}: a held at u^2, b follows x'      -> y = u^2 * 3x' + x'
    de_a = direct_effect(scm, "x", "y", ctx, xp, mediators=["a"])
    assert torch.allclose(de_a, 3 * u**2 * xp + xp - y_nat)
    # M = {a}: x kept at u, a switched to x'^2  -> y = x'^2 * 3u + u
    ie_a = indirect_effect(scm, "x", "y", ctx, xp, mediators=["a"])
    assert torch.allclose(ie_a, 3 * u * xp**2 + u - y_nat)
    # default M = {a, b}: both held            -> y = u^2 * 3u + x'
    assert torch.allclose(direct_effect(scm, "x", "y", ctx, xp), 3 * u**3 + xp - y_nat)
    # default M = {a, b}: both switched        -> y = x'^2 * 3x' + u
    assert torch.allclose(indirect_effect(scm, "x", "y", ctx, xp), 3 * xp**3 + u - y_nat)
    # M = {}: nothing held, so the direct effect is the total effect and the indirect is 0
    assert torch.allclose(
        direct_effect(scm, "x", "y", ctx, xp, mediators=[]), total_effect(scm, "x", "y", ctx, xp)
    )
    assert torch.equal(
        indirect_effect(scm, "x", "y", ctx, xp, mediators=[]), torch.zeros(3, dtype=torch.float64)
    )


def test_effect_on_a_node_not_downstream_is_zero() -> None:
    scm = two_mediators()
    ctx = {"u": torch.tensor([1.0, 2.0])}
    assert torch.equal(total_effect(scm, "a", "b", ctx, 5.0), torch.zeros(2))
    assert torch.equal(total_effect(scm, "y", "x", ctx, 5.0), torch.zeros(2))


def test_effects_keep_the_shape_of_y() -> None:
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("h", ["u"], lambda u: u.unsqueeze(-1) * torch.ones(3))
    scm.add_node("y", ["h"], lambda h: h.unsqueeze(-1) * torch.ones(2))
    ctx = {"u": torch.arange(4.0)}
    assert total_effect(scm, "h", "y", ctx, 0.0).shape == (4, 3, 2)
    assert total_effect(scm, "h", "y", ctx, 0.0, per_draw=True).shape == (1, 4, 3, 2)
    assert total_effect(scm, "h", "y", ctx, Resample(k=3), per_draw=True).shape == (3, 4, 3, 2)


def test_effects_respect_the_models_own_interventions() -> None:
    scm = two_mediators().do(b=1.0)  # y = a + x, a = x^2
    u = torch.tensor([1.0, 2.0])
    assert torch.allclose(total_effect(scm, "x", "y", {"u": u}, 3.0), 12 - (u**2 + u))
    # with several draws the model's own interventions are tiled too
    eff = total_effect(scm, "x", "y", {"u": u}, Noise(0.0, k=3), per_draw=True)
    assert torch.equal(eff, torch.zeros(3, 2))


# ---- ablation-valued effects (Appendix A, Eq 39) ------------------------------------------


def linear_readout() -> SCM:
    """x = u, y = 10 x + u: the source of a resampled x can be read back from the effect."""
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("x", ["u"], lambda u: u)
    scm.add_node("y", ["x", "u"], lambda x, u: 10 * x + u)
    return scm


def test_zero_and_mean_ablation_effects_equal_the_fixed_value_effects() -> None:
    u = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    scm = linear_readout()
    assert torch.equal(
        total_effect(scm, "x", "y", {"u": u}, Zero()), total_effect(scm, "x", "y", {"u": u}, 0.0)
    )
    loo = (u.sum() - u) / 3
    assert torch.allclose(total_effect(scm, "x", "y", {"u": u}, Mean()), 10 * (loo - u))


def test_resample_effect_draws_k_distinct_other_contexts() -> None:
    u = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    eff = total_effect(linear_readout(), "x", "y", {"u": u}, Resample(k=4), per_draw=True)
    sources = u + eff / 10  # the x each draw put in
    for b in range(5):
        got = sorted(sources[:, b].tolist())
        assert got == sorted(v for i, v in enumerate(u.tolist()) if i != b)


def test_stochastic_effect_is_the_mean_over_draws() -> None:
    u = torch.randn(6, generator=torch.Generator().manual_seed(1))
    scm, ctx = square_product(), {"u": u}
    for fn in (total_effect, direct_effect, indirect_effect):
        per = fn(scm, "x", "y", ctx, Resample(k=3), seed=7, per_draw=True)
        assert per.shape == (3, 6)
        assert torch.allclose(fn(scm, "x", "y", ctx, Resample(k=3), seed=7), per.mean(0))


@pytest.mark.parametrize("fn", [total_effect, direct_effect, indirect_effect])
def test_batched_draws_equal_one_run_per_draw(fn) -> None:
    """The tiled evaluation agrees with running each drawn value on its own."""
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("x", ["u"], lambda u: torch.stack([u, u**2], -1))
    scm.add_node("m", ["x"], lambda x: torch.tanh(x).sum(-1))
    scm.add_node("y", ["x", "m"], lambda x, m: x.prod(-1) * m)
    ctx = {"u": torch.linspace(-1, 1, 5, dtype=torch.float64)}
    value = Noise(0.5, k=4)
    per = fn(scm, "x", "y", ctx, value, seed=3, per_draw=True)
    draws = value.sample(scm.run(ctx)["x"], torch.Generator().manual_seed(3), node="x")
    loop = torch.stack([fn(scm, "x", "y", ctx, draws[k]) for k in range(4)])
    assert torch.allclose(per, loop, atol=1e-12)


def test_stochastic_effects_are_seeded_and_reproducible() -> None:
    u = torch.arange(8.0)
    scm = linear_readout()
    a = total_effect(scm, "x", "y", {"u": u}, Resample(k=2), seed=11, per_draw=True)
    b = total_effect(scm, "x", "y", {"u": u}, Resample(k=2), seed=11, per_draw=True)
    c = total_effect(scm, "x", "y", {"u": u}, Resample(k=2), seed=12, per_draw=True)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    n1 = total_effect(scm, "x", "y", {"u": u}, Noise(1.0, k=2), seed=5)
    n2 = total_effect(scm, "x", "y", {"u": u}, Noise(1.0, k=2), seed=5)
    assert torch.equal(n1, n2)


def test_deterministic_value_per_draw_has_one_draw() -> None:
    eff = total_effect(linear_readout(), "x", "y", {"u": torch.ones(3)}, 0.0, per_draw=True)
    assert eff.shape == (1, 3)


# ---- errors ------------------------------------------------------------------------------


def test_effect_errors_name_the_node() -> None:
    scm, ctx = two_mediators(), {"u": torch.ones(2)}
    with pytest.raises(InterventionError, match="'u'"):
        total_effect(scm, "u", "y", ctx, 0.0)
    with pytest.raises(UnknownNodeError, match="'nope'"):
        total_effect(scm, "nope", "y", ctx, 0.0)
    with pytest.raises(UnknownNodeError, match="'nope'"):
        direct_effect(scm, "x", "nope", ctx, 0.0)
    with pytest.raises(InterventionError, match="'x'"):
        total_effect(scm, "x", "x", ctx, 0.0)
    with pytest.raises(InterventionError, match="'x'"):
        direct_effect(scm, "x", "y", ctx, 0.0, mediators=["a", "x"])
    with pytest.raises(InterventionError, match="'y'"):
        indirect_effect(scm, "x", "y", ctx, 0.0, mediators=["y"])
    with pytest.raises(InterventionError, match="'u'"):
        indirect_effect(scm, "x", "y", ctx, 0.0, mediators=["u"])
    with pytest.raises(UnknownNodeError, match="'c'"):
        direct_effect(scm, "x", "y", ctx, 0.0, mediators=["c"])
    with pytest.raises(InterventionError, match="'x'"):
        total_effect(scm, "x", "y", ctx, "zero")


def test_effect_errors_come_before_any_computation() -> None:
    calls = []
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("x", ["u"], lambda u: calls.append(1) or u)
    scm.add_node("y", ["x"], lambda x: x)
    with pytest.raises(InterventionError):
        total_effect(scm, "x", "y", {"u": torch.ones(2)}, None)
    with pytest.raises(InterventionError):
        direct_effect(scm, "x", "y", {"u": torch.ones(2)}, 0.0, mediators=["u"])
    assert calls == []


def test_resample_on_too_small_a_batch_names_the_node() -> None:
    scm = linear_readout()
    with pytest.raises(InterventionError, match="'x'"):
        total_effect(scm, "x", "y", {"u": torch.ones(1)}, Resample())
    with pytest.raises(InterventionError, match="'x'"):
        total_effect(scm, "x", "y", {"u": torch.ones(3)}, Resample(k=3))
    with pytest.raises(InterventionError, match="'x'"):
        total_effect(scm, "x", "y", {"u": torch.ones(1)}, Mean())
