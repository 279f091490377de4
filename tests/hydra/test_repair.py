"""The repair split (issue 13, section 1): value and scale parts, and do(sigma = clean).

Pinned three ways: (1) :func:`split_repair` on small tensors whose parts are computed by hand
here (per readout, from the definitions, not from the library's masks); (2) on tiny float64
models of every residual wiring, the fast patch engine's split against the models' own
forward passes -- totals from the patched logits (so the identity is not true by
construction), the value parts against the site values of a naive hooked re-forward, and
``total_effect_sigma_clean`` against the engine's do(sigma = clean) on the transformer SCM;
(3) a sweep on a tiny local model writes the columns and the per-patch rows, and a folder
written without them still loads for ``report`` and ``plot``.

Tolerances: float64 models 1e-9 (the model's forward vs the readout's sums), float32 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from causalnet.adapters import adapt
from causalnet.adapters.naive import naive_patch, naive_readout
from causalnet.adapters.scm import at_positions, to_scm
from causalnet.errors import InterventionError, ResultsError, ShapeError
from causalnet.hydra.protocol import split_repair, total_at_clean_sigma
from causalnet.hydra.store import REPAIR_COLUMNS, ResultsStore
from causalnet.hydra.sweep import SweepConfig, run_sweep
from causalnet.sites import is_downstream, parse_site
from tiny_lm import OTHER_FAMILIES, save_tiny_llama, write_prompts

LAYERS = ["embed", "attn.0", "mlp.0", "attn.1", "mlp.1"]


# ---- (1) by hand ----------------------------------------------------------------------------
def test_split_of_one_patch_computed_by_hand():
    """attn.0 ablated, sigma 2 -> 4: every readout's dDE = c'.w/4 - c.w/2 split by hand."""
    cw_clean = torch.tensor([2.0, 4.0, -2.0, 6.0, 8.0])  # c . w per readout, clean
    cw_abl = torch.tensor([2.0, 0.0, 2.0, 10.0, 8.0])  # after ablating attn.0 (embed unchanged)
    de_clean, de_abl = cw_clean / 2.0, (cw_abl / 4.0)[None, None]
    total = (de_abl.sum() - de_clean.sum()).reshape(1, 1)
    r = split_repair(["attn.0"], LAYERS, de_clean, de_abl, 2.0, torch.tensor([[4.0]]), total, False)
    # value parts (c' - c).w / 4: embed 0, attn.0 -1, mlp.0 1, attn.1 1, mlp.1 0
    assert r.value[0, 0].tolist() == [0.0, -1.0, 1.0, 1.0, 0.0]
    # scale parts c.w (1/4 - 1/2): -c.w / 4
    assert r.scale[0, 0].tolist() == [-0.5, -1.0, 0.5, -1.5, -2.0]
    assert float(r.delta_self) == -1.0 - 1.0  # attn.0: value -1, scale -1
    assert float(r.repair_attn) == 1.0  # attn.1
    assert float(r.repair_mlp) == 1.0 + 0.0  # mlp.0 and mlp.1
    assert float(r.repair_norm) == -0.5 + 0.5 - 1.5 - 2.0  # every site but attn.0
    assert float(r.repair_sibling) == 0.0  # embed's value did not change
    assert float(r.sigma_ratio) == 2.0
    assert abs(float(r.identity_residual())) < 1e-12


def test_sibling_value_parts_are_kept_apart_from_the_downstream_ones():
    """A head whose sibling's value changed (a norm after the attention): that change is
    repair_sibling, neither repair_attn nor the norm's part."""
    readouts = ["embed", "attn.0.h0", "attn.0.h1", "mlp.0"]
    de_clean = torch.tensor([1.0, 1.0, 1.0, 1.0])
    de_abl = torch.tensor([[[1.0, 0.0, 1.5, 2.0]]])  # sigma unchanged: value parts only
    total = (de_abl - de_clean).sum(-1)
    r = split_repair(["attn.0.h0"], readouts, de_clean, de_abl, 1.0, torch.ones(1, 1), total, False)
    assert (float(r.repair_sibling), float(r.repair_mlp)) == (0.5, 1.0)
    assert (float(r.repair_attn), float(r.repair_norm)) == (0.0, 0.0)


@pytest.mark.parametrize("ablated", LAYERS)
@pytest.mark.parametrize("parallel", [False, True])
def test_split_sums_the_parts_over_the_sites_the_rule_names(ablated, parallel):
    """Random numbers, sites classified in the test with is_downstream (the rule itself is
    pinned in test_protocol.py); each aggregate equals its hand-made sum."""
    gen = torch.Generator().manual_seed(3)
    de_clean = torch.randn(len(LAYERS), generator=gen, dtype=torch.float64)
    de_abl = torch.randn(1, 3, len(LAYERS), generator=gen, dtype=torch.float64)
    s_abl = 1.0 + torch.rand(1, 3, generator=gen, dtype=torch.float64)
    total = torch.randn(1, 3, generator=gen, dtype=torch.float64)
    r = split_repair([ablated], LAYERS, de_clean, de_abl, 1.3, s_abl, total, parallel)
    k = parse_site(ablated)
    for p in range(3):
        want = {"attn": 0.0, "mlp": 0.0, "norm": 0.0, "sibling": 0.0}
        for j, name in enumerate(LAYERS):
            value = float(de_abl[0, p, j]) - float(de_clean[j]) * 1.3 / float(s_abl[0, p])
            scale = float(de_clean[j]) * (1.3 / float(s_abl[0, p]) - 1.0)
            if name == ablated:
                continue
            want["norm"] += scale
            site = parse_site(name)
            if is_downstream(site, k, parallel):
                want["attn" if site.is_attention else "mlp"] += value
            else:
                want["sibling"] += value
        got = {
            "attn": r.repair_attn[0, p],
            "mlp": r.repair_mlp[0, p],
            "norm": r.repair_norm[0, p],
            "sibling": r.repair_sibling[0, p],
        }
        for part, value in want.items():
            assert abs(float(got[part]) - value) < 1e-12, part


def test_split_refuses_an_ablated_site_that_is_not_read_out_and_bad_scales():
    z = torch.zeros
    heads = ["embed", "attn.0.h0", "attn.0.h1", "mlp.0"]
    with pytest.raises(InterventionError, match="attn.0'"):
        split_repair(["attn.0"], heads, z(4), z(1, 1, 4), 1.0, torch.ones(1, 1), z(1, 1), False)
    with pytest.raises(ShapeError, match="sigma_ablated"):
        split_repair(["mlp.0"], heads, z(4), z(1, 2, 4), 1.0, torch.ones(2, 1), z(1, 2), False)
    with pytest.raises(ShapeError, match="positive"):
        split_repair(["mlp.0"], heads, z(4), z(1, 1, 4), 1.0, torch.zeros(1, 1), z(1, 1), False)


def test_total_at_clean_sigma_rescales_the_non_constant_part_by_hand():
    """centred' = const + s/sigma' with s = 6, const = 0.5, sigma' = 3: at sigma = 2 it is
    0.5 + 3; minus the clean centred logit 1.0."""
    te = total_at_clean_sigma(torch.tensor([[2.5]]), 1.0, 0.5, 2.0, torch.tensor([[3.0]]))
    assert float(te) == pytest.approx(0.5 + 6.0 / 2.0 - 1.0, abs=1e-12)


# ---- (2) against the models' own forward passes ---------------------------------------------
FAMILIES = {"gpt2": False, "gpt_neox": True, "gptj": True}
TOKENS = torch.tensor([5, 77, 3, 200, 41, 9, 120])


@pytest.fixture(scope="module", params=[*FAMILIES, "llama"])
def model64(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A seeded tiny model of one family (gpt2 LayerNorm sequential, neox/gptj parallel,
    llama RMSNorm) in float64 and its adapter."""
    torch.manual_seed(0)
    if request.param == "llama":
        from transformers import AutoModelForCausalLM

        folder = save_tiny_llama(tmp_path_factory.mktemp("llama") / "m")
        model = AutoModelForCausalLM.from_pretrained(folder)
    else:
        model = OTHER_FAMILIES[request.param]()
    return adapt(model.double().eval())


def _tol(adapter) -> float:
    """1e-9 in float64; 1e-5 where Hugging Face's final RMSNorm computes in float32 inside the
    float64 model (Llama: docs/conventions.md, "Tolerances")."""
    return 1e-5 if adapter.arch.family == "llama" else 1e-9


def _values(adapter, clean, sites: list[str], n: int = 3) -> torch.Tensor:
    """[S, n, d] random values for each site, of about twice its clean norm."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for s in sites:
        ref = clean.value(s)
        v = torch.randn(n, ref.shape[0], generator=gen, dtype=ref.dtype)
        out.append(v / v.norm(dim=-1, keepdim=True) * ref.norm().clamp_min(1e-3) * 2)
    return torch.stack(out)


def _split(adapter, clean, patched):
    return split_repair(
        patched.sites,
        clean.readout_sites,
        clean.direct_effects,
        patched.direct_effects,
        clean.sigma,
        patched.sigma,
        patched.total_effect,
        adapter.arch.parallel_residual,
    )


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_identity_of_the_split_holds_with_totals_from_the_models_logits(model64, granularity):
    """total (the patched model's centred logit minus the clean one) = dDE(self) + repair_attn
    + repair_mlp + repair_norm, repair_sibling = 0: float64, 1e-9 and 1e-12."""
    a = model64
    clean = a.clean_run(TOKENS, granularity=granularity)
    sites = a.sites(granularity)
    patched = a.patch(clean, sites, _values(a, clean, sites))
    r = _split(a, clean, patched)
    assert r.total.abs().max() > 1e-3 and r.repair_norm.abs().max() > 1e-6
    assert (r.repair_attn.abs().max() > 1e-6) and (r.repair_mlp.abs().max() > 1e-6)
    assert r.repair_sibling.abs().max() <= 1e-12
    four = r.delta_self + r.repair_attn + r.repair_mlp + r.repair_norm
    assert (r.total - four).abs().max() <= _tol(a)


def test_value_parts_equal_the_site_changes_of_a_naive_hooked_forward(model64):
    """(c'_r - c_r) . w / sigma' from the hooked Hugging Face forward's site values and its own
    sigma' equals the split's value part of every readout r (float64, 1e-10); so do the
    patched run's sigma' and the ratio the split uses."""
    a = model64
    clean = a.clean_run(TOKENS)
    w = clean.readout_dir
    for site in ["attn.0", "mlp.0", "attn.1"]:
        values = _values(a, clean, [site])
        r = _split(a, clean, a.patch(clean, [site], values))
        run = naive_patch(a, TOKENS, site, values[0])
        _, _, sigma = naive_readout(a, run, clean.target)
        assert torch.allclose(r.sigma_ratio[0], sigma / clean.sigma, atol=1e-12, rtol=0)
        for j, name in enumerate(clean.readout_sites):
            change = (run.site_values[name] - clean.site_values[j]) @ w / sigma
            assert torch.allclose(r.value[0, :, j], change, atol=1e-10, rtol=0), (site, name)


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_total_effect_at_clean_sigma_equals_the_scm_do_of_sigma(model64, granularity):
    """total_effect_sigma_clean against the transformer SCM run with do(site = v at t) and
    do(sigma = its clean value): the engine's intervention, a full-sequence forward (1e-9);
    and it equals sigma'/sigma times the sum of the value parts (the readout is linear at a
    fixed sigma)."""
    a = model64
    clean = a.clean_run(TOKENS, granularity=granularity)
    scm = to_scm(a, granularity)
    with torch.no_grad():
        natural = scm.run({"tokens": TOKENS[None]})
    logits = natural["logits"][0, -1]
    assert abs(float(logits[clean.target] - logits.mean()) - clean.centred_logit) < _tol(a)
    sites = ["embed", a.sites(granularity)[1], a.sites(granularity)[-3]]
    values = _values(a, clean, sites, n=2)
    patched = a.patch(clean, sites, values)
    te = total_at_clean_sigma(
        patched.centred_logit, clean.centred_logit, clean.readout_const, clean.sigma, patched.sigma
    )
    r = _split(a, clean, patched)
    assert torch.allclose(te, r.sigma_ratio * r.value.sum(-1), atol=_tol(a), rtol=0)
    for i, site in enumerate(sites):
        for p in range(values.shape[1]):
            do = {site: at_positions(values[i, p]), "sigma": natural["sigma"]}
            with torch.no_grad():
                out = scm.run({"tokens": TOKENS[None]}, do=do)["logits"][0, -1]
            want = float(out[clean.target] - out.mean()) - clean.centred_logit
            assert abs(float(te[i, p]) - want) < _tol(a), (site, p)
            assert abs(float(te[i, p]) - float(patched.total_effect[i, p])) > 1e-6


def test_sibling_heads_under_a_norm_after_the_attention_carry_value_parts():
    """Gemma 3 renormalises the attention output: ablating a head moves its siblings' shares,
    which the split keeps in repair_sibling; the five-part identity holds (float64 model whose
    final RMSNorm Hugging Face computes in float32: 1e-5)."""
    torch.manual_seed(0)
    a = adapt(OTHER_FAMILIES["gemma3_text"]().double().eval())
    try:
        clean = a.clean_run(TOKENS, granularity="head")
    except Exception as err:  # noqa: BLE001 -- only the adapter's refusal of heads skips
        if "granularity='head'" not in str(err):
            raise
        pytest.skip(f"this Gemma 3 adapter refuses heads: {err}")
    sites = ["attn.1.h0", "attn.1.h2"]
    patched = a.patch(clean, sites, _values(a, clean, sites))
    r = _split(a, clean, patched)
    assert r.repair_sibling.abs().min() > 1e-6
    assert r.identity_residual().abs().max() <= 1e-5
    four = r.delta_self + r.repair_attn + r.repair_mlp + r.repair_norm
    assert (r.total - four).abs().max() > 1e-3  # without repair_sibling it would not hold


# ---- (3) in a sweep, and folders written before the split ------------------------------------
@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("swept")
    model, prompts = save_tiny_llama(root / "model"), write_prompts(root / "p.jsonl", 8)
    config = SweepConfig(model=str(model), prompts=str(prompts), k=3)
    return run_sweep(config, root / "r", progress=False)


def test_sweep_writes_the_repair_columns_and_the_identity_holds_on_every_row(swept):
    effects = ResultsStore(swept).load_effects()
    assert set(REPAIR_COLUMNS) <= set(effects.columns)
    d_self = effects["direct_effect_ablated_self"] - effects["direct_effect"]
    parts = effects["repair_attn"] + effects["repair_mlp"] + effects["repair_norm"]
    assert (effects["total_effect"] - (d_self + parts)).abs().max() < 1e-4  # float32 model
    assert effects["repair_sibling"].abs().max() < 1e-5
    assert effects["repair_norm"].abs().max() > 1e-4
    assert (effects["total_effect_sigma_clean"] - effects["total_effect"]).abs().max() > 1e-4


def test_sweep_keeps_per_patch_effects_whose_means_are_the_effects_rows(swept):
    store = ResultsStore(swept)
    effects, per_patch = store.load_effects(), store.load_patch_effects()
    assert len(per_patch) == 3 * len(effects)  # K = 3 patches of every (prompt, site)
    means = per_patch.groupby(["prompt_id", "site"]).mean(numeric_only=True)
    joined = effects.merge(means.reset_index(), on=["prompt_id", "site"], suffixes=("", "_p"))
    for col in ["total_effect", "direct_effect_ablated_self", *REPAIR_COLUMNS]:
        assert np.allclose(joined[col], joined[f"{col}_p"], atol=1e-12, rtol=0), col
    assert len(joined) == len(effects)
    sources = effects.set_index(["prompt_id", "site"])["sources"]
    first = per_patch[per_patch["patch"] == 0].set_index(["prompt_id", "site"])["source_id"]
    assert (first == sources.str.split(",").str[0].loc[first.index]).all()


def _write_without_repair_columns(folder: Path, swept: Path) -> None:
    """A results folder as an older causalnet wrote it: effects without the five columns and
    no per-patch effects."""
    store = ResultsStore(swept)
    effects, readouts = store.load_effects(), store.load_readouts()
    old = ResultsStore(folder).open({"model": "old"})
    for pid, rows in effects.groupby("prompt_id"):
        old.write_prompt(
            pid,
            rows.drop(columns=list(REPAIR_COLUMNS)),
            readouts[readouts["prompt_id"] == pid],
        )
    old.finalize()


def test_a_folder_without_the_repair_columns_still_loads_reports_and_plots(swept, tmp_path, capsys):
    from causalnet.cli import main

    folder = tmp_path / "old"
    _write_without_repair_columns(folder, swept)
    store = ResultsStore(folder)
    assert not set(REPAIR_COLUMNS) & set(store.load_effects().columns)
    assert store.load_patch_effects().empty
    assert main(["report", str(folder)]) == 0
    assert "fraction restored" in capsys.readouterr().out
    assert main(["plot", str(folder)]) == 0
    # the shards too (a folder never consolidated): remove the consolidated tables
    for name in ("effects", "readouts"):
        (folder / f"{name}.parquet").unlink()
    assert len(ResultsStore(folder).load_effects()) == len(store.load_effects())


def test_a_folder_never_mixes_effects_with_and_without_the_repair_columns(swept, tmp_path):
    folder = tmp_path / "old"
    _write_without_repair_columns(folder, swept)
    new = ResultsStore(swept)
    pid = new.load_effects()["prompt_id"].iloc[0]
    effects, readouts = new.load_effects(), new.load_readouts([pid])
    rows = effects[effects["prompt_id"] == pid].drop(columns="prompt_id")
    store = ResultsStore(folder).open({"model": "old"})
    try:
        with pytest.raises(ResultsError, match="without the repair columns"):
            store.write_prompt(999, rows, readouts.drop(columns="prompt_id"))
    finally:
        store.close()
    assert 999 not in ResultsStore(folder).completed_ids()
