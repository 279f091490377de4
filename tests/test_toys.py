"""The paper's toy models of erasure and self-repair (Section 3.3, Eqs 30-32)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from causalnet import direct_effect, indirect_effect, total_effect
from causalnet.toys import erasure, self_repair

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)
batches = st.lists(finite, min_size=1, max_size=16).map(
    lambda v: torch.tensor(v, dtype=torch.float64)
)
TOYS = pytest.mark.parametrize("toy", [erasure, self_repair], ids=["erasure", "self_repair"])


def test_toys_have_the_papers_structure() -> None:
    for toy in (erasure, self_repair):
        scm = toy()
        assert scm.exogenous == ("u",)
        assert scm.endogenous == ("x", "f", "y")
        assert scm.parents("x") == ("u",)
        assert scm.parents("f") == ("x", "u")
        assert scm.parents("y") == ("x", "f")


@TOYS
@settings(max_examples=50, deadline=None)
@given(u=batches)
def test_ablating_x_has_no_total_effect_on_y(toy, u) -> None:
    assert torch.equal(total_effect(toy(), "x", "y", {"u": u}, 0.0), torch.zeros_like(u))


@TOYS
@settings(max_examples=50, deadline=None)
@given(u=batches)
def test_direct_effect_of_ablating_x_is_minus_u(toy, u) -> None:
    assert torch.equal(direct_effect(toy(), "x", "y", {"u": u}, 0.0), -u)


@TOYS
@settings(max_examples=50, deadline=None)
@given(u=batches)
def test_compensation_is_plus_u(toy, u) -> None:
    scm, ctx = toy(), {"u": u}
    compensation = total_effect(scm, "x", "y", ctx, 0.0) - direct_effect(scm, "x", "y", ctx, 0.0)
    assert torch.equal(compensation, u)
    # here the compensation is exactly the indirect effect through f
    assert torch.equal(indirect_effect(scm, "x", "y", ctx, 0.0), u)


@settings(max_examples=50, deadline=None)
@given(u=batches, x_new=finite)
def test_erasure_clamps_y_to_zero_for_any_intervention(u, x_new) -> None:
    scm = erasure()
    assert torch.equal(scm.run({"u": u})["y"], torch.zeros_like(u))
    assert torch.equal(scm.run({"u": u}, do={"x": x_new})["y"], torch.zeros_like(u))


@settings(max_examples=50, deadline=None)
@given(u=batches)
def test_self_repair_keeps_y_at_u_under_ablation(u) -> None:
    scm = self_repair()
    assert torch.equal(scm.run({"u": u})["y"], u)
    assert torch.equal(scm.run({"u": u}, do={"x": 0.0})["y"], u)


@settings(max_examples=50, deadline=None)
@given(u=batches, x_new=finite)
def test_self_repair_for_a_general_value_follows_eq_32(u, x_new) -> None:
    """y = x' + f(x', u), with f = 0 where x' == u and u elsewhere (Eq 32)."""
    y = self_repair().run({"u": u}, do={"x": x_new})["y"]
    want = torch.where(u == x_new, torch.full_like(u, x_new), x_new + u)
    assert torch.equal(y, want)


def test_toy_models_example_runs_and_writes_the_plot(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "examples" / "toy_models.py"
    out = tmp_path / "toys.png"
    res = subprocess.run(
        [sys.executable, str(script), str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "erasure" in res.stdout and "self_repair" in res.stdout
    assert out.stat().st_size > 10_000
