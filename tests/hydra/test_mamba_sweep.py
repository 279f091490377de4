"""The Hydra protocol on a model without attention: Mamba's sites mixer.l (issue 11, section 3).

A tiny random Mamba (hidden 64, 4 layers, state 8, byte vocabulary) is saved beside the byte
tokenizer and swept from its folder. Pinned: the downstream rule on the model itself (a naive
hooked re-forward with mixer.l patched leaves every earlier mixer's value exactly and moves
every later one); the exact identity total = dDE(self) + CE + dDE(upstream) on every row with
totals from the model's own centred logits, checked against a naive hooked re-forward; the
attention / MLP parts of the compensation stored as NaN (not applicable) and nowhere else;
the findings comparing attention with MLP "not applicable"; ``causalnet report`` and ``plot``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as T

from causalnet.adapters import load
from causalnet.adapters.naive import naive_patch, naive_readout
from causalnet.cli import main
from causalnet.errors import ResultsError
from causalnet.hydra.findings import NOT_APPLICABLE, findings_table
from causalnet.hydra.protocol import decompose, split_repair
from causalnet.hydra.store import ResultsStore
from causalnet.hydra.sweep import SweepConfig, ablation_values, run_sweep
from causalnet.hydra.tables import NOT_APPLICABLE as NAN_COLUMNS
from causalnet.hydra.tables import TABLES, to_arrow
from tiny_lm import byte_tokenizer, write_prompts

N_PROMPTS = 6
N_LAYERS = 4


def save_tiny_mamba(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = T.MambaConfig(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=N_LAYERS,
        state_size=8,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        T.MambaForCausalLM(cfg).eval().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, SweepConfig]:
    root = tmp_path_factory.mktemp("mamba")
    folder = save_tiny_mamba(root / "mamba")
    prompts = write_prompts(root / "prompts.jsonl", N_PROMPTS)
    config = SweepConfig(model=str(folder), prompts=str(prompts), k=3, ablation="zero")
    return run_sweep(config, root / "r", progress=False), folder, config


def test_the_downstream_rule_holds_on_the_model_itself(swept):
    _, folder, _ = swept
    adapter = load(str(folder))
    tokens = adapter.encode("Paris 3 is the capital of")
    clean = adapter.clean_run(tokens)
    for layer in range(N_LAYERS):
        site = f"mixer.{layer}"
        value = (clean.value(site) * 0.0)[None]  # zero ablation
        run = naive_patch(adapter, tokens, site, value)
        for r in range(N_LAYERS):
            got, was = run.site_values[f"mixer.{r}"][0], clean.value(f"mixer.{r}")
            if r < layer:  # upstream: unchanged
                assert torch.allclose(got, was, atol=1e-6), (site, r)
            elif r > layer:  # downstream: moved
                assert float((got - was).abs().max()) > 1e-4, (site, r)


def test_sweep_of_a_mamba_keeps_the_exact_identity_on_every_row(swept):
    out, folder, config = swept
    store = ResultsStore(out)
    effects = store.load_effects()
    assert len(effects) == N_PROMPTS * N_LAYERS and set(effects["kind"]) == {"mixer"}
    residual = effects["total_effect"] - (
        (effects["direct_effect_ablated_self"] - effects["direct_effect"])
        + effects["compensatory_effect"]
        + effects["delta_de_upstream"]
    )
    assert float(residual.abs().max()) < 1e-5  # float32 model, float64 bookkeeping
    assert effects["total_effect"].abs().max() > 1e-3  # the ablations did something
    # the last mixer has nothing downstream: no compensation
    assert (effects.loc[effects["layer"] == N_LAYERS - 1, "compensatory_effect"] == 0).all()
    # attention / MLP parts: NaN on every row (not applicable); every other float finite
    for name in NAN_COLUMNS:
        assert effects[name].isna().all(), name
    others = effects.drop(columns=list(NAN_COLUMNS)).select_dtypes("number")
    assert np.isfinite(others.to_numpy()).all()

    # the oracle: the model's own centred logits in a naive hooked re-forward (Eq 12)
    adapter = load(str(folder))
    texts = [json.loads(line)["prompt"] for line in Path(config.prompts).read_text().splitlines()]
    tokens = [adapter.encode(t) for t in texts]
    pool = torch.stack([adapter.clean_run(t).site_values[1:] for t in tokens])
    i = 2
    values, _ = ablation_values(config, pool, i)
    clean = adapter.clean_run(tokens[i])
    for s_idx, site in enumerate(adapter.sites()):
        run = naive_patch(adapter, tokens[i], site, values[s_idx])
        centred, _, _ = naive_readout(adapter, run, clean.target)
        expected = float((centred.double() - clean.centred_logit).mean())
        got = effects.query("prompt_id == @i and site == @site")["total_effect"].item()
        assert got == pytest.approx(expected, abs=1e-4), site


def test_decompose_puts_later_mixers_in_the_mixer_part_and_nothing_in_attention_or_mlp():
    readouts = ["embed", "mixer.0", "mixer.1", "mixer.2"]
    de_clean = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    de_abl = torch.tensor([[[1.1, 0.0, -0.5, 0.25]]], dtype=torch.float64)
    total = torch.tensor([[-2.0]], dtype=torch.float64)
    dec = decompose(["mixer.0"], readouts, de_clean, de_abl, total, False)
    assert float(dec.compensatory_mixer) == pytest.approx(0.5 - 0.25)  # mixer.1 + mixer.2
    assert float(dec.compensatory_attn) == 0.0 and float(dec.compensatory_mlp) == 0.0
    assert float(dec.compensatory) == float(dec.compensatory_mixer)
    assert float(dec.delta_self) == pytest.approx(-2.0) and float(dec.delta_upstream) == (
        pytest.approx(0.1)
    )
    split = split_repair(
        ["mixer.0"], readouts, de_clean, de_abl, 1.0, torch.tensor([[1.0]]), total, False
    )  # sigma unchanged: the repair is the downstream mixers' value part plus the embedding's
    assert float(split.repair_mixer) == pytest.approx(0.25)
    assert float(split.repair_norm) == 0.0 and float(split.repair_sibling) == pytest.approx(0.1)


def test_nan_parts_are_refused_in_a_prompt_with_attention_rows(swept):
    out, _, _ = swept
    rows = ResultsStore(out).load_effects().query("prompt_id == 0").drop(columns="prompt_id")
    to_arrow(TABLES["effects"], rows, 0)  # a model of mixers: accepted
    attn = rows.assign(site=[f"attn.{i}" for i in range(N_LAYERS)], kind="attn")
    with pytest.raises(ResultsError, match="compensatory_attn is not finite"):
        to_arrow(TABLES["effects"], attn, 0)
    broken = rows.assign(total_effect=np.nan)
    with pytest.raises(ResultsError, match="total_effect is not finite"):
        to_arrow(TABLES["effects"], broken, 0)


def test_findings_comparing_attention_with_mlp_are_not_applicable(swept):
    out, _, _ = swept
    store = ResultsStore(out)
    table = findings_table(store.load_effects(), store.load_readouts(), "mamba")
    verdicts = table[table["subset"] == "all prompts"].set_index("finding")["verdict"]
    for key in ("hydra", "erasure", "erasure_attenuated", "shift_to_mlp"):
        assert verdicts[key] == NOT_APPLICABLE, key
    for key in ("agreement", "unembed_gt_ablate", "ce_predicted", "restored_70", "early_total"):
        assert verdicts[key] in ("holds", "partly", "fails"), key
    measures = table.set_index("finding")["measure"]
    assert "mixer" in measures["ce_predicted"].iloc[0]
    assert "no attention and no MLP" in measures["hydra"].iloc[0]


def test_report_and_plot_run_on_a_mamba_folder(swept, capsys):
    out, _, _ = swept
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mixer" in printed and "NaN" in printed
    assert main(["report", str(out), "--repair"]) == 0
    repair = capsys.readouterr().out.splitlines()
    mixer_rows = [line for line in repair if line.strip().startswith(("mixer.", "all mixer"))]
    assert len(mixer_rows) == N_LAYERS + 1  # per layer and pooled
    assert all(line.split().count("n/a") == 2 for line in mixer_rows)  # attn, mlp: not 0
    assert main(["plot", str(out)]) == 0
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert {"fig2_direct_vs_total.png", "fig7_compensation.png"} <= figures
    assert {"fig8_response_split.png", "fig_repair_patches.png"} <= figures
    assert {"fig1_prompt.png", "fig3_examples.png"} <= figures  # one mixer panel each
    summary = pd.read_parquet(out / "effects.parquet")
    assert summary["kind"].eq("mixer").all()


def test_figure_prompt_of_a_mamba_run_draws_one_mixer_panel_of_its_numbers(swept):
    from causalnet.hydra.figures import figure_prompt  # noqa: PLC0415

    out, _, _ = swept
    readouts = ResultsStore(out).load_readouts()
    pid = readouts["prompt_id"].iloc[0]
    fig = figure_prompt(readouts, pid, "mixer.1")
    axes = [ax for ax in fig.axes if ax.get_lines()]
    assert len(axes) == 1 and axes[0].get_title() == "mixer direct effects"
    rows = readouts[(readouts["prompt_id"] == pid) & (readouts["ablated_site"] == "mixer.1")]
    rows = rows[rows["readout_site"].str.startswith("mixer.")]
    by_layer = rows.assign(layer=rows["readout_site"].str.split(".").str[1].astype(int))
    by_layer = by_layer.sort_values("layer")
    lines = {ln.get_label(): ln for ln in axes[0].get_lines()}
    np.testing.assert_allclose(lines["clean"].get_ydata(), by_layer["direct_effect_clean"])
    ablated = next(ln for name, ln in lines.items() if name.startswith("mixer.1 ablated"))
    np.testing.assert_allclose(ablated.get_ydata(), by_layer["direct_effect_ablated"])
