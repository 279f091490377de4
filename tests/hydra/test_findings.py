"""The paper's findings as verdicts (causalnet.hydra.findings) and `causalnet compare`: each
rule is checked on synthetic tables built to sit on either side of its thresholds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from causalnet.cli import main
from causalnet.errors import ResultsError
from causalnet.hydra.compare import read_verdicts, side_by_side_markdown
from causalnet.hydra.findings import (
    CLAIMS,
    FAILS,
    HOLDS,
    PARTLY,
    depth_band,
    findings_table,
    measure_findings,
)
from causalnet.hydra.sweep import SweepConfig, run_sweep
from tiny_lm import save_tiny_llama, write_prompts

N_LAYERS, N_PROMPTS = 9, 60


def synthetic(
    restored: float = 0.7,
    attn_part: float = 0.5,
    eraser_mean: float = -1.0,
    true_eraser_mean: float | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Effects rows for a 9-layer model: CE = restored * removed (removed = DE, plus a little
    noise), split attn_part : 1 - attn_part; the last MLP's direct effect has mean eraser_mean
    (true_eraser_mean on the prompts whose target is true, when given)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(N_PROMPTS):
        is_true = p % 3 == 0
        for kind in ("attn", "mlp"):
            for layer in range(N_LAYERS):
                de = rng.normal(0.5, 1.0)
                if kind == "mlp" and layer == N_LAYERS - 1:
                    mean = true_eraser_mean if (is_true and true_eraser_mean is not None) else None
                    de = rng.normal(eraser_mean if mean is None else mean, 0.3)
                ce = restored * de + rng.normal(0, 0.05)
                rows.append(
                    {
                        "prompt_id": p,
                        "kind": kind,
                        "layer": layer,
                        "site": f"{kind}.{layer}",
                        "target_is_true": is_true,
                        "direct_effect": de,
                        "direct_effect_ablated_self": 0.0,
                        "compensatory_effect": ce,
                        "compensatory_attn": attn_part * ce,
                        "compensatory_mlp": (1 - attn_part) * ce,
                        "delta_de_upstream": 0.0,
                        "total_effect": -de + ce,
                    }
                )
    return pd.DataFrame(rows)


def _verdicts(effects: pd.DataFrame) -> dict[str, str]:
    return {f.key: f.verdict for f in measure_findings(effects)}


def test_depth_bands_are_thirds_of_relative_depth():
    assert [depth_band(layer, 9) for layer in range(9)] == (
        ["early"] * 3 + ["middle"] * 3 + ["late"] * 3
    )
    assert depth_band(0, 1) == "early"


def test_restored_fraction_verdict_follows_the_fraction_restored():
    assert _verdicts(synthetic(restored=0.7))["restored_70"] == HOLDS
    assert _verdicts(synthetic(restored=0.35))["restored_70"] == PARTLY
    assert _verdicts(synthetic(restored=0.05))["restored_70"] == FAILS
    assert _verdicts(synthetic(restored=1.6))["restored_70"] == FAILS


def test_hydra_verdict_needs_a_positive_attention_response():
    assert _verdicts(synthetic(attn_part=0.5))["hydra"] == HOLDS  # slope_attn ~0.35
    assert _verdicts(synthetic(attn_part=0.1))["hydra"] == PARTLY  # positive but ~0.07
    assert _verdicts(synthetic(attn_part=-0.5))["hydra"] == FAILS


def test_erasure_verdict_reads_the_most_negative_late_mlp():
    assert _verdicts(synthetic(eraser_mean=-1.0))["erasure"] == HOLDS
    assert _verdicts(synthetic(eraser_mean=-0.1))["erasure"] == PARTLY
    found = {f.key: f for f in measure_findings(synthetic(eraser_mean=2.0))}
    assert found["erasure"].verdict in (PARTLY, FAILS)  # other late MLPs average +0.5
    assert found["erasure"].values["mean"] > -0.25


def test_findings_are_judged_separately_on_true_target_prompts():
    effects = synthetic(eraser_mean=1.0, true_eraser_mean=-2.0)
    table = findings_table(effects, None, "toy").set_index(["finding", "subset"])
    assert table.loc[("erasure", "target true"), "verdict"] == HOLDS
    assert table.loc[("erasure", "target not true"), "verdict"] != HOLDS
    assert table.loc[("erasure", "target true"), "n_prompts"] == 20
    assert set(table.index.get_level_values("finding")) == set(CLAIMS)


def test_the_ce_rule_reads_r2_and_slope():
    assert _verdicts(synthetic(restored=0.7))["ce_predicted"] == HOLDS  # r^2 ~1, slope 0.7
    assert _verdicts(synthetic(restored=1.2))["ce_predicted"] == PARTLY  # slope > 1


def test_side_by_side_marks_disagreement_and_escapes_pipes():
    a = findings_table(synthetic(restored=0.7), None, "A")
    b = findings_table(synthetic(restored=0.05), None, "B")
    b.loc[b["finding"] == "early_total", "measure"] = "a | b"
    text = side_by_side_markdown({"A": a, "B": b})
    lines = text.strip().splitlines()
    assert len(lines) == 2 + len(CLAIMS)
    restored = next(line for line in lines if line.startswith("| About 70%"))
    assert restored.endswith("| **no** |") and "**holds**" in restored and "**fails**" in restored
    assert "a \\| b" in text
    assert all(line.count(" | ") + 2 == 5 for line in lines[2:] if "\\|" not in line)


def test_findings_of_a_table_without_layer_rows_is_a_named_error():
    effects = synthetic().assign(kind="head")
    with pytest.raises(ResultsError, match="no layer rows"):
        measure_findings(effects)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compare")
    model = save_tiny_llama(root / "model", n_layers=4)
    prompts = write_prompts(root / "prompts.jsonl", 8)
    one = run_sweep(
        SweepConfig(model=str(model), prompts=str(prompts), k=3), root / "a", progress=False
    )
    two = run_sweep(
        SweepConfig(model=str(model), prompts=str(prompts), k=3, seed=1), root / "b", progress=False
    )
    return one, two


def test_compare_command_prints_every_finding_for_each_folder(folders, tmp_path, capsys):
    csv = tmp_path / "verdicts.csv"
    code = main(
        ["compare", str(folders[0]), str(folders[1]), "--names", "s0", "s1", "--csv", str(csv)]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "| paper's finding | s0 | s1 | models agree? |" in out
    assert "- s0: 8 prompts" in out
    table = pd.read_csv(csv)
    assert set(table["model"]) == {"s0", "s1"} and set(table["finding"]) == set(CLAIMS)
    assert set(table["verdict"]) <= {HOLDS, PARTLY, FAILS}


def test_compare_with_the_wrong_number_of_names_is_an_error(folders, capsys):
    assert main(["compare", str(folders[0]), str(folders[1]), "--names", "only"]) == 2
    assert "2 folders" in capsys.readouterr().err


ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_side_by_side_tables_are_what_compare_prints():
    files = sorted((ROOT / "docs" / "report" / "compare").glob("*.csv"))
    assert files, "docs/report/compare holds the verdicts behind the README's tables"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for csv in files:
        assert side_by_side_markdown(read_verdicts(csv)) in readme, csv.name


def test_a_csv_without_the_verdict_columns_is_a_named_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("model,finding\nA,hydra\n")
    with pytest.raises(ResultsError, match="bad.csv: not a verdicts file"):
        read_verdicts(bad)
    with pytest.raises(ResultsError, match="no such verdicts file"):
        read_verdicts(tmp_path / "missing.csv")
