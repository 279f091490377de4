"""The SCM engine: evaluation, do(), soft interventions, and every error it raises."""

from __future__ import annotations

import re

import pytest
import torch

from causalnet import SCM
from causalnet.errors import (
    CausalNetError,
    ContextError,
    CycleError,
    DuplicateNodeError,
    GraphError,
    InterventionError,
    MechanismError,
    NonFiniteError,
    ShapeError,
    UnknownNodeError,
)


def chain() -> SCM:
    """u -> x -> m -> y, and x -> y: y = x + 2 m, m = 3 x."""
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("x", parents=["u"], fn=lambda u: u + 1)
    scm.add_node("m", parents=["x"], fn=lambda x: 3 * x)
    scm.add_node("y", parents=["x", "m"], fn=lambda x, m: x + 2 * m)
    return scm


U = torch.tensor([0.0, 1.0, 2.0])


def test_run_returns_every_node_including_exogenous() -> None:
    v = chain().run({"u": U})
    assert list(v) == ["u", "x", "m", "y"]
    assert torch.equal(v["u"], U)
    assert torch.equal(v["x"], U + 1)
    assert torch.equal(v["m"], 3 * (U + 1))
    assert torch.equal(v["y"], 7 * (U + 1))


def test_parents_are_passed_positionally_in_declared_order() -> None:
    scm = SCM()
    scm.add_exogenous("a")
    scm.add_exogenous("b")
    scm.add_node("d", parents=["b", "a"], fn=lambda first, second: first - second)
    v = scm.run({"a": torch.tensor([1.0]), "b": torch.tensor([10.0])})
    assert v["d"].item() == 9.0


def test_parents_may_be_declared_after_the_child() -> None:
    scm = SCM()
    scm.add_node("y", parents=["x"], fn=lambda x: 2 * x)
    scm.add_node("x", parents=["u"], fn=lambda u: u)
    scm.add_exogenous("u")
    assert set(scm.graph.edges) == {("u", "x"), ("x", "y")}
    assert torch.equal(scm.run({"u": U})["y"], 2 * U)


def test_trailing_shapes_are_free() -> None:
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("h", ["u"], lambda u: u.unsqueeze(-1).expand(-1, 4) * torch.arange(4.0))
    scm.add_node("s", ["h"], lambda h: h.sum(-1))
    v = scm.run({"u": U})
    assert v["h"].shape == (3, 4)
    assert torch.equal(v["s"], 6 * U)


def test_hard_do_cuts_in_edges_and_recomputes_downstream() -> None:
    scm = chain()
    v = scm.run({"u": U}, do={"x": torch.zeros(3)})
    assert torch.equal(v["x"], torch.zeros(3))
    assert torch.equal(v["m"], torch.zeros(3))
    assert torch.equal(v["y"], torch.zeros(3))
    v = scm.run({"u": U}, do={"m": 1.0})  # only downstream of m changes
    assert torch.equal(v["x"], U + 1)
    assert torch.equal(v["y"], U + 1 + 2)


def test_scalar_do_value_broadcasts_to_the_natural_shape() -> None:
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("h", ["u"], lambda u: u.unsqueeze(-1).repeat(1, 2))
    v = scm.run({"u": U}, do={"h": 5})
    assert v["h"].shape == (3, 2)
    assert v["h"].dtype == U.dtype
    assert torch.equal(v["h"], torch.full((3, 2), 5.0))
    v = scm.run({"u": U}, do={"h": torch.tensor(4.0)})  # a 0-dim tensor is a scalar too
    assert torch.equal(v["h"], torch.full((3, 2), 4.0))


def test_trailing_shape_do_value_broadcasts_over_the_batch() -> None:
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("h", ["u"], lambda u: u.unsqueeze(-1).repeat(1, 2))
    v = scm.run({"u": U}, do={"h": torch.tensor([7.0, 8.0])})
    assert torch.equal(v["h"], torch.tensor([[7.0, 8.0]] * 3))


def test_full_shape_do_value_is_used_per_context() -> None:
    scm = chain()
    x_new = torch.tensor([5.0, 6.0, 7.0])
    v = scm.run({"u": U}, do={"x": x_new})
    assert torch.equal(v["y"], 7 * x_new)


def test_soft_intervention_composes_with_the_mechanism() -> None:
    scm = chain()
    v = scm.run({"u": U}, do={"x": lambda nat: nat * 10})
    assert torch.equal(v["x"], 10 * (U + 1))
    assert torch.equal(v["y"], 70 * (U + 1))


def test_soft_intervention_sees_the_natural_value_under_the_other_interventions() -> None:
    scm = chain()
    seen = {}

    def g(nat: torch.Tensor) -> torch.Tensor:
        seen["m"] = nat.clone()
        return nat + 1

    v = scm.run({"u": U}, do={"x": 2.0, "m": g})
    assert torch.equal(seen["m"], torch.full((3,), 6.0))  # f_m(x=2), not f_m(x(u))
    assert torch.equal(v["m"], torch.full((3,), 7.0))


def test_soft_intervention_patches_only_some_positions() -> None:
    """The transformer adapter's use: patch one token position of a [B, T, d] node."""
    scm = SCM()
    scm.add_exogenous("tok")
    scm.add_node("resid", ["tok"], lambda t: t.unsqueeze(-1).repeat(1, 1, 2))
    scm.add_node("out", ["resid"], lambda r: r.sum((1, 2)))
    tok = torch.arange(6.0).reshape(2, 3)

    def patch_last(nat: torch.Tensor) -> torch.Tensor:
        out = nat.clone()
        out[:, -1] = 0.0
        return out

    v = scm.run({"tok": tok}, do={"resid": patch_last})
    assert torch.equal(v["resid"][:, :2], tok[:, :2].unsqueeze(-1).repeat(1, 1, 2))
    assert torch.equal(v["resid"][:, -1], torch.zeros(2, 2))
    assert torch.equal(v["out"], 2 * tok[:, :2].sum(1))


def test_do_returns_a_new_model_and_leaves_the_old_unchanged() -> None:
    scm = chain()
    before = scm.run({"u": U})
    scm2 = scm.do(x=0.0)
    assert scm2 is not scm
    assert torch.equal(scm2.run({"u": U})["y"], torch.zeros(3))
    after = scm.run({"u": U})
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert dict(scm.interventions) == {}
    assert scm.graph.has_edge("u", "x")
    assert not scm2.graph.has_edge("u", "x")  # the graph of M_x has x's in-edges cut
    assert scm2.graph.has_edge("x", "m")


def test_do_accepts_a_mapping_for_names_that_are_not_identifiers() -> None:
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("attn.12", ["u"], lambda u: u)
    scm.add_node("out", ["attn.12"], lambda a: a * 2)
    assert torch.equal(scm.do({"attn.12": 1.0}).run({"u": U})["out"], torch.full((3,), 2.0))


def test_do_on_a_do_model_stacks_and_run_do_overrides() -> None:
    scm = chain()
    scm2 = scm.do(x=1.0).do(m=0.0)
    assert set(scm2.interventions) == {"x", "m"}
    assert torch.equal(scm2.run({"u": U})["y"], torch.ones(3))
    assert torch.equal(scm2.run({"u": U}, do={"m": 2.0})["y"], torch.full((3,), 5.0))
    assert torch.equal(scm2.run({"u": U}, do={"x": 3.0})["y"], torch.full((3,), 3.0))


def test_soft_do_model_keeps_in_edges() -> None:
    scm2 = chain().do(x=lambda nat: nat)
    assert scm2.graph.has_edge("u", "x")


def test_graph_is_read_only() -> None:
    import networkx as nx

    scm = chain()
    assert isinstance(scm.graph, nx.DiGraph)
    with pytest.raises(nx.NetworkXError):
        scm.graph.add_edge("y", "u")


def test_model_without_exogenous_nodes_takes_the_batch_from_the_first_node() -> None:
    scm = SCM()
    scm.add_node("c", [], lambda: torch.ones(2))
    scm.add_node("d", ["c"], lambda c: c + 1)
    assert torch.equal(scm.run({})["d"], torch.full((2,), 2.0))


def test_float64_is_preserved() -> None:
    v = chain().run({"u": U.double()}, do={"m": 1})
    assert all(t.dtype == torch.float64 for t in v.values())


# ---- errors ------------------------------------------------------------------------------


def test_every_error_is_a_causalnet_error() -> None:
    for cls in (
        CycleError,
        UnknownNodeError,
        DuplicateNodeError,
        InterventionError,
        ContextError,
        ShapeError,
        NonFiniteError,
        MechanismError,
    ):
        assert issubclass(cls, CausalNetError)


def test_self_parent_is_a_cycle_error_at_once() -> None:
    scm = SCM()
    with pytest.raises(CycleError, match="'a'"):
        scm.add_node("a", parents=["a"], fn=lambda a: a)
    assert "a" not in scm


def test_cycle_is_reported_at_run_listing_the_cycle() -> None:
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("a", parents=["u", "c"], fn=lambda u, c: u + c)
    scm.add_node("b", parents=["a"], fn=lambda a: a)
    scm.add_node("c", parents=["b"], fn=lambda b: b)
    with pytest.raises(CycleError) as err:
        scm.run({"u": U})
    msg = str(err.value)
    assert all(f"'{n}'" in msg for n in "abc")
    assert "'u'" not in msg


def test_cycle_error_comes_before_any_computation() -> None:
    calls = []
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("ok", ["u"], lambda u: calls.append("ok") or u)
    scm.add_node("a", ["b"], lambda b: b)
    scm.add_node("b", ["a"], lambda a: a)
    with pytest.raises(CycleError):
        scm.run({"u": U})
    assert calls == []


def test_unknown_parent_is_reported_at_run_naming_both_nodes() -> None:
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("y", parents=["u", "ghost"], fn=lambda u, g: u)
    with pytest.raises(UnknownNodeError, match=r"'y'.*'ghost'"):
        scm.run({"u": U})


def test_duplicate_node_is_an_error() -> None:
    scm = chain()
    with pytest.raises(DuplicateNodeError, match="'x'"):
        scm.add_node("x", ["u"], lambda u: u)
    with pytest.raises(DuplicateNodeError, match="'u'"):
        scm.add_exogenous("u")


def test_bad_declarations_are_graph_errors() -> None:
    scm = SCM()
    with pytest.raises(GraphError):
        scm.add_node("", [], lambda: torch.ones(1))
    with pytest.raises(GraphError, match="'y'"):
        scm.add_node("y", "x", lambda x: x)  # a string, not a list
    with pytest.raises(GraphError, match="'y'"):
        scm.add_node("y", ["x"], fn=3)


def test_unknown_node_errors_name_the_node() -> None:
    scm = chain()
    with pytest.raises(UnknownNodeError, match="'nope'"):
        scm.run({"u": U}, do={"nope": 0.0})
    with pytest.raises(UnknownNodeError, match="'nope'"):
        scm.do(nope=0.0)
    with pytest.raises(UnknownNodeError, match="'nope'"):
        scm.parents("nope")
    with pytest.raises(KeyError):  # UnknownNodeError is a KeyError too
        scm.mechanism("nope")


def test_intervening_on_an_exogenous_node_is_an_error() -> None:
    scm = chain()
    with pytest.raises(InterventionError, match="'u'"):
        scm.run({"u": U}, do={"u": 0.0})
    with pytest.raises(InterventionError, match="'u'"):
        scm.do(u=0.0)


def test_bad_do_value_type_is_an_error() -> None:
    with pytest.raises(InterventionError, match="'x'"):
        chain().run({"u": U}, do={"x": "zero"})


def test_missing_context_input_is_an_error() -> None:
    scm = chain()
    scm.add_exogenous("v")
    with pytest.raises(ContextError, match="'v'"):
        scm.run({"u": U})


def test_inconsistent_batch_sizes_in_context_are_an_error() -> None:
    scm = SCM()
    scm.add_exogenous("a")
    scm.add_exogenous("b")
    with pytest.raises(ContextError, match=r"a: 3.*b: 2"):
        scm.run({"a": U, "b": torch.zeros(2)})


def test_context_values_must_be_batched_tensors_of_exogenous_nodes() -> None:
    scm = chain()
    with pytest.raises(ContextError, match="'u'"):
        scm.run({"u": [1.0, 2.0]})
    with pytest.raises(ContextError, match="'u'"):
        scm.run({"u": torch.tensor(1.0)})
    with pytest.raises(ContextError, match="'x'"):
        scm.run({"u": U, "x": U})
    with pytest.raises(UnknownNodeError, match="'w'"):
        scm.run({"u": U, "w": U})


def test_mechanism_returning_a_non_tensor_is_a_shape_error() -> None:
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("bad", ["u"], lambda u: 1.0)
    with pytest.raises(ShapeError, match="'bad'.*float"):
        scm.run({"u": U})


def test_mechanism_returning_the_wrong_batch_size_is_a_shape_error() -> None:
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("bad", ["u"], lambda u: u[:2])
    with pytest.raises(ShapeError, match=r"'bad'.*batch size 2.*expected 3"):
        scm.run({"u": U})
    scm2 = SCM()
    scm2.add_exogenous("u")
    scm2.add_node("scalar", ["u"], lambda u: u.sum())
    with pytest.raises(ShapeError, match="'scalar'"):
        scm2.run({"u": U})


def test_do_value_of_the_wrong_shape_is_a_shape_error() -> None:
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("h", ["u"], lambda u: u.unsqueeze(-1).repeat(1, 2))
    with pytest.raises(ShapeError, match=re.escape("'h'") + r".*\(4,\)"):
        scm.run({"u": U}, do={"h": torch.zeros(4)})
    with pytest.raises(ShapeError, match="'h'"):
        scm.run({"u": U}, do={"h": torch.zeros(2, 2)})  # wrong batch size


def test_soft_intervention_of_the_wrong_shape_is_a_shape_error() -> None:
    scm = chain()
    with pytest.raises(ShapeError, match="'m'"):
        scm.run({"u": U}, do={"m": lambda nat: nat[:1]})
    with pytest.raises(ShapeError, match="'m'"):
        scm.run({"u": U}, do={"m": lambda nat: 0.0})


def test_non_finite_value_names_the_first_node_where_it_appears() -> None:
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("r", ["u"], lambda u: 1.0 / u)  # inf at u = 0
    scm.add_node("s", ["r"], lambda r: r * 0.0)  # nan downstream too
    with pytest.raises(NonFiniteError, match="'r'"):
        scm.run({"u": U})
    with pytest.raises(NonFiniteError, match="'s'"):  # r fixed finite, s made NaN by do
        scm.run({"u": U}, do={"r": 1.0, "s": float("nan")})
    v = scm.run({"u": U}, check_finite=False)
    assert torch.isinf(v["r"][0])


def test_a_discarded_non_finite_natural_value_is_not_an_error() -> None:
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("r", ["u"], lambda u: 1.0 / u)
    v = scm.run({"u": U}, do={"r": 2.0})  # f_r(u) has inf, but r = 2 is what is used
    assert torch.equal(v["r"], torch.full((3,), 2.0))


def test_non_finite_context_is_an_error_naming_the_input() -> None:
    with pytest.raises(NonFiniteError, match="'u'"):
        chain().run({"u": torch.tensor([0.0, float("nan")])})


def test_exception_inside_a_mechanism_is_a_mechanism_error_naming_the_node() -> None:
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("boom", ["u"], lambda u: u @ u @ u)  # 1-D @ 1-D is a scalar; then @ fails
    with pytest.raises(MechanismError, match=r"node 'boom' raised RuntimeError") as err:
        scm.run({"u": U})
    assert "u: (3,)" in str(err.value)  # the parents' shapes, to see what it was given
    assert isinstance(err.value.__cause__, RuntimeError)  # the original, chained


def test_a_causalnet_error_inside_a_mechanism_keeps_its_type_and_gains_the_node() -> None:
    def nested(u: torch.Tensor) -> torch.Tensor:
        raise ShapeError("inner shape problem")

    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("outer", ["u"], nested)
    with pytest.raises(ShapeError, match="inner shape problem") as err:
        scm.run({"u": U})
    assert any("'outer'" in note for note in getattr(err.value, "__notes__", []))


@pytest.mark.parametrize(
    ("parents", "fn"),
    [
        (["u", "v"], lambda u: u),  # one argument, two parents
        (["u"], lambda u, v: u + v),  # two required arguments, one parent
        ([], lambda u: u),  # an argument, no parents
        (["u"], lambda u, *, scale: u * scale),  # a required keyword-only argument
        (["u", "v"], torch.nn.Linear(3, 3)),  # a module's forward takes one input
    ],
    ids=["too-few-params", "too-many-params", "no-parents", "keyword-only", "module-forward"],
)
def test_a_mechanism_of_the_wrong_arity_is_refused_when_added_naming_the_node(parents, fn):
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_exogenous("v")
    with pytest.raises(MechanismError, match=r"node 'y' cannot take its \d parent") as err:
        scm.add_node("y", parents, fn)
    assert isinstance(err.value.__cause__, TypeError)
    assert "y" not in scm  # nothing half-declared: the name is still free
    scm.add_node("y", ["u"], lambda u: u)


def test_mechanisms_that_fit_their_parents_are_accepted() -> None:
    from functools import partial

    scm = SCM()
    scm.add_exogenous("u")
    scm.add_exogenous("v")
    scm.add_node("star", ["u", "v"], lambda *xs: sum(xs))
    scm.add_node("default", ["u"], lambda u, v=None: u)
    scm.add_node("part", ["u"], partial(torch.mul, other=2.0))
    scm.add_node("builtin", ["u"], torch.tanh)  # no signature to read: checked when run
    scm.add_node("lin", ["u"], torch.nn.Linear(3, 3).double())
    values = scm.run({"u": torch.ones(2, 3, dtype=torch.float64), "v": torch.ones(2, 3)})
    assert torch.equal(values["star"], torch.full((2, 3), 2.0, dtype=torch.float64))
    assert torch.equal(values["part"], torch.full((2, 3), 2.0, dtype=torch.float64))


def test_a_builtin_of_the_wrong_arity_is_a_mechanism_error_when_run() -> None:
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_exogenous("v")
    scm.add_node("t", ["u", "v"], torch.tanh)  # no readable signature: accepted when added
    with pytest.raises(MechanismError, match=r"node 't' raised TypeError"):
        scm.run({"u": U, "v": U})


def test_an_ablation_given_to_run_points_to_the_effect_functions() -> None:
    from causalnet import Resample

    with pytest.raises(InterventionError, match="'x'.*effect functions"):
        chain().run({"u": U}, do={"x": Resample()})
