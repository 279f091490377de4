"""Attribution patching (issue 13, §5): exact where the outcome is linear, the first-order limit
of the exact patch engine, and the gradient of the model's own forward.

Tolerances: float64 throughout. Linear SCMs: 1e-12. Finite differences of the patch engine:
central differences at eps = 1e-6 (truncation ~eps^2 times the curvature, measured <= 3e-8
on these models), 1e-7 of the estimate's scale. Gradients against autograd through the hooked
Hugging Face model: 1e-10.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from causalnet import SCM
from causalnet.adapters import adapt
from causalnet.errors import InterventionError, ModelError, ResultsError, ShapeError
from causalnet.hydra.attribution import (
    attribution_patch,
    attribution_table,
    node_gradients,
    prompt_gradients,
)
from causalnet.hydra.attribution_compare import (
    compensation_link,
    disagreements,
    joined,
    per_layer,
    spearman,
)
from causalnet.hydra.config import SweepConfig
from causalnet.hydra.data import load_prompts
from causalnet.hydra.plan import compute_prompt, plan_sweep
from causalnet.toys import erasure, self_repair
from tiny_lm import OTHER_FAMILIES, byte_tokenizer, write_prompts

TOKENS = torch.tensor([5, 77, 3, 200, 41, 9, 120])


# ---- the engine ------------------------------------------------------------------------------


def _linear_scm() -> tuple[SCM, dict]:
    """u [B, 3] -> x = A u -> m = B x + c -> y = a . x + b . m (everything affine)."""
    gen = torch.Generator().manual_seed(0)
    a_mat, b_mat = (torch.randn(3, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    c, a, b = (torch.randn(3, generator=gen, dtype=torch.float64) for _ in range(3))
    scm = SCM()
    scm.add_exogenous("u")
    scm.add_node("x", ["u"], lambda u: u @ a_mat.T)
    scm.add_node("m", ["x"], lambda x: x @ b_mat.T + c)
    scm.add_node("y", ["x", "m"], lambda x, m: x @ a + m @ b)
    return scm, {"u": torch.randn(4, 3, generator=gen, dtype=torch.float64)}


@pytest.mark.parametrize("node", ["x", "m"])
def test_attribution_patching_is_exact_on_a_linear_scm(node):
    """AtP = TE (Eq 14) for every context when the outcome is affine in the node."""
    scm, ctx = _linear_scm()
    value = torch.tensor([1.5, -2.0, 0.25], dtype=torch.float64)
    exact = scm.total_effect(node, "y", ctx, value=value)
    estimate = attribution_patch(scm, ctx, node, "y", value)
    assert torch.allclose(estimate, exact, atol=1e-12, rtol=0)
    assert exact.abs().min() > 0.1  # a real effect, not 0 = 0


def test_attribution_patching_is_exact_for_erasure_and_misses_self_repair():
    """Erasure (Eq 31) is linear: AtP = TE = 0. Self-repair (Eq 32) switches on off the clean
    point: the exact total effect of do(x = 0) is 0 (y kept at u), AtP sees only the direct
    path and says -u."""
    u = {"u": torch.tensor([2.0, -3.0], dtype=torch.float64)}
    assert torch.equal(attribution_patch(erasure(), u, "x", "y", 0.0), torch.zeros(2).double())
    repair = self_repair()
    assert torch.equal(repair.total_effect("x", "y", u, value=0.0), torch.zeros(2).double())
    assert torch.equal(attribution_patch(repair, u, "x", "y", 0.0), -u["u"])


def test_node_gradients_refuse_an_intervened_node_and_a_non_scalar_outcome():
    scm, ctx = _linear_scm()
    with pytest.raises(InterventionError, match="'x'"):
        node_gradients(scm, ctx, ["x"], "y", do={"x": 0.0})
    with pytest.raises(ShapeError, match=r"\[B\]"):
        node_gradients(scm, ctx, ["x"], "m")
    natural, grads, y = node_gradients(scm, ctx, ["x"], "y", do={"m": 0.0})
    assert torch.equal(y, scm.run(ctx, do={"m": 0.0})["y"])  # m held: dy/dx = a only


# ---- a transformer ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["gpt2", "gpt_neox", "gptj"])
def model64(request: pytest.FixtureRequest):
    """A seeded tiny model (sequential gpt2; parallel-residual gpt_neox and gptj), float64."""
    torch.manual_seed(0)
    return adapt(OTHER_FAMILIES[request.param]().double().eval())


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_attribution_equals_the_finite_difference_limit_of_the_patch_engine(model64, granularity):
    """(v' - v) . grad = lim (TE(v + eps (v' - v)) - TE(v - eps (v' - v))) / (2 eps), the
    total effects from the fast patch engine (Eq 12), for every site of the granularity."""
    a = model64
    clean = a.clean_run(TOKENS, granularity=granularity)
    grads = prompt_gradients(a, TOKENS, granularity)
    assert grads.target == clean.target
    assert grads.centred_logit == pytest.approx(clean.centred_logit, abs=1e-12)
    assert torch.allclose(grads.values, clean.site_values, atol=1e-12, rtol=0)
    gen = torch.Generator().manual_seed(3)
    eps = 1e-6
    for site in clean.readout_sites:
        v = clean.value(site)
        step = torch.randn(v.shape, generator=gen, dtype=v.dtype)
        run = a.patch(clean, [site], torch.stack([v + eps * step, v - eps * step])[None])
        limit = float(run.total_effect[0, 0] - run.total_effect[0, 1]) / (2 * eps)
        estimate = float(grads.estimate([site], (v + step)[None, None])[0, 0])
        assert estimate == pytest.approx(limit, abs=1e-7 * max(1.0, abs(estimate))), site


def _hf_gradients(adapter, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """d(centred target logit)/d(site value at t) by torch.autograd through the Hugging Face
    model itself: a zero leaf is added at t to layer 0's input (embed) and to every attention
    and MLP module's output (the hook points of the naive oracle)."""
    t = tokens.shape[0] - 1
    leaves: dict[str, torch.Tensor] = {}
    handles = []

    def add_leaf(name: str, x: torch.Tensor) -> torch.Tensor:
        leaf = torch.zeros(x.shape[-1], dtype=x.dtype, requires_grad=True)
        leaves[name] = leaf
        out = x.clone()
        out[:, t] = out[:, t] + leaf
        return out

    def pre(module, args, kwargs):
        if args:
            return (add_leaf("embed", args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": add_leaf("embed", kwargs["hidden_states"])}

    def post(name):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (add_leaf(name, output[0]), *output[1:])
            return add_leaf(name, output)

        return hook

    try:
        handles.append(
            adapter.hook_points(0).block.register_forward_pre_hook(pre, with_kwargs=True)
        )
        for layer in range(adapter.arch.n_layers):
            pts = adapter.hook_points(layer)
            handles.append(pts.attn.register_forward_hook(post(f"attn.{layer}")))
            handles.append(pts.mlp.register_forward_hook(post(f"mlp.{layer}")))
        with torch.enable_grad():
            logits = adapter.model(input_ids=tokens[None], use_cache=False).logits[0, t]
            target = int(logits.argmax())
            y = logits[target] - logits.mean()
            names = list(leaves)
            grads = torch.autograd.grad(y, [leaves[n] for n in names])
    finally:
        for h in handles:
            h.remove()
    return dict(zip(names, grads, strict=True))


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_gradients_equal_autograd_through_the_hooked_hugging_face_model(model64, granularity):
    """The SCM's gradients equal torch.autograd's through the model's own modules; a head's
    gradient is its layer's (attn.l = sum of its heads, Eq 21)."""
    a = model64
    hf = _hf_gradients(a, TOKENS)
    grads = prompt_gradients(a, TOKENS, granularity)
    for site, g in zip(grads.sites, grads.gradients, strict=True):
        key = site.rsplit(".h", 1)[0] if ".h" in site else site
        assert torch.allclose(g, hf[key], atol=1e-10, rtol=0), site
    assert hf["mlp.0"].abs().max() > 1e-3


def test_head_attribution_is_refused_under_a_norm_after_the_attention():
    torch.manual_seed(0)
    adapter = adapt(OTHER_FAMILIES["gemma3_text"]().eval())
    with pytest.raises(ModelError, match="norm after the attention"):
        prompt_gradients(adapter, TOKENS, "head")


# ---- the sweep's rows ------------------------------------------------------------------------


def test_attribution_table_estimates_the_sweeps_rows_with_the_sweeps_patches(tmp_path):
    """Noise patches of std s (float64): the estimate of each row must differ from the exact
    total effect of the very same row (same patches, target, site) by a second-order term,
    so the largest error falls 100-fold when s falls 10-fold (measured 4.9e-6 -> 4.9e-8); a
    wiring error (other patches, other target) would leave a first-order difference."""
    torch.manual_seed(0)
    adapter = adapt(OTHER_FAMILIES["gpt2"]().double().eval(), byte_tokenizer())
    prompts = load_prompts(str(write_prompts(tmp_path / "p.jsonl", 4)))
    errors = {}
    for std in (1e-4, 1e-5):
        config = SweepConfig(model="x", ablation="noise", noise_std=std, k=3, dtype="float64")
        plan = plan_sweep(config, adapter, prompts=prompts)
        effects = pd.concat([compute_prompt(adapter, plan, i, False).effects for i in range(4)])
        rows = joined(attribution_table(adapter, plan), effects)
        assert len(rows) == 4 * len(plan.sites)
        errors[std] = rows["abs_error"].max()
        assert errors[std] < 0.02 * rows["total_effect"].abs().max()
    assert 80 < errors[1e-4] / errors[1e-5] < 125


def _rows() -> pd.DataFrame:
    """Hand-made joined-style rows: AtP exact except where the compensation is large."""
    exact = [1.0, 2.0, -1.0, 0.5, 3.0, -2.0]
    ce = [0.0, 0.1, 0.0, 2.0, 0.0, -1.5]
    atp = [e + c for e, c in zip(exact, ce, strict=True)]  # misses exactly the compensation
    return pd.DataFrame(
        {
            "prompt_id": [0, 0, 0, 1, 1, 1],
            "site": ["attn.0", "mlp.0", "attn.1"] * 2,
            "kind": ["attn", "mlp", "attn"] * 2,
            "layer": [0, 0, 1] * 2,
            "target_token": 7,
            "total_effect": exact,
            "compensatory_effect": ce,
            "direct_effect": exact,
            "direct_effect_ablated_self": 0.0,
        }
    ), pd.DataFrame(
        {
            "prompt_id": [0, 0, 0, 1, 1, 1],
            "site": ["attn.0", "mlp.0", "attn.1"] * 2,
            "target_token": 7,
            "atp_total_effect": atp,
        }
    )


def test_comparison_flags_the_rows_with_the_largest_compensation():
    effects, atp = _rows()
    rows = joined(atp, effects)
    flagged = disagreements(rows, top=2)
    assert set(flagged["site"]) == {"attn.0", "attn.1"} and set(flagged["prompt_id"]) == {1}
    assert flagged["compensation_rank"].tolist() == [1, 2]
    link = compensation_link(rows, quantile=1 / 3)
    assert link.top_overlap == 1.0 and link.chance_overlap == pytest.approx(1 / 3)
    assert link.spearman_error_compensation == pytest.approx(1.0)
    table = per_layer(rows)
    assert table[["kind", "layer"]].values.tolist() == [["attn", 0], ["attn", 1], ["mlp", 0]]
    assert table.loc[2, "mean_abs_error"] == pytest.approx(0.05)


def test_comparison_refuses_rows_of_another_sweep():
    effects, atp = _rows()
    with pytest.raises(ResultsError, match="another target"):
        joined(atp.assign(target_token=8), effects)
    with pytest.raises(ResultsError, match="no \\(prompt_id, site\\) row"):
        joined(atp.assign(prompt_id=atp["prompt_id"] + 5), effects)
    with pytest.raises(ResultsError, match="more than one row"):
        joined(pd.concat([atp, atp]), effects)
    with pytest.raises(ResultsError, match="lacks columns"):
        joined(atp.drop(columns="atp_total_effect"), effects)


def test_spearman_uses_ranks():
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
