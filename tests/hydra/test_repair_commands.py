"""``causalnet repairers`` and ``causalnet attribution`` on a tiny head-granularity sweep, and
the figures they draw (what is drawn equals the tables' numbers)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from causalnet.cli import main
from causalnet.errors import ResultsError
from causalnet.hydra.compensation_figures import figure_attribution, figure_compensation_map
from causalnet.hydra.repairers import compensation_map, compensation_matrix
from causalnet.hydra.store import ResultsStore
from tiny_lm import save_tiny_llama, write_prompts


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("repair_commands")
    model = save_tiny_llama(root / "model")
    prompts = write_prompts(root / "prompts.jsonl", 6)
    out = root / "results"
    args = ["hydra", "--model", str(model), "--prompts", str(prompts), "--k", "3"]
    args += ["--granularity", "head", "--out", str(out), "--no-plots", "--quiet"]
    assert main(args) == 0
    return out


def test_repairers_command_prints_the_map_and_the_replacement_heads(folder, tmp_path, capsys):
    capsys.readouterr()
    png = tmp_path / "map.png"
    assert main(["repairers", str(folder), "--k", "2", "--figure", str(png)]) == 0
    out = capsys.readouterr().out
    assert "compensation map: " in out and "sequential residual" in out
    assert "replacement heads: top-2" in out and "mean over ablated heads: Jaccard" in out
    assert png.stat().st_size > 5000
    assert main(["repairers", str(tmp_path / "missing")]) == 2


def test_attribution_command_compares_with_the_folders_exact_effects(folder, tmp_path, capsys):
    capsys.readouterr()
    png = tmp_path / "atp.png"
    args = ["attribution", str(folder), "--limit", "4", "--top", "3", "--figure", str(png)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"attribution patching on 4 prompts x \d+ sites \(head granularity", out)
    assert "per layer of the ablated site" in out and "largest disagreements" in out
    assert png.stat().st_size > 5000


def test_the_heatmap_draws_the_matrix(folder):
    readouts = ResultsStore(folder).load_readouts()
    matrix = compensation_matrix(compensation_map(readouts))
    fig = figure_compensation_map(matrix)
    ax = fig.axes[0]
    drawn = ax.images[0].get_array()
    assert drawn.shape == matrix.shape
    values = matrix.to_numpy(dtype=float)
    assert np.array_equal(np.ma.getmaskarray(drawn), np.isnan(values))
    assert np.allclose(drawn.filled(0.0), np.nan_to_num(values))
    low, high = ax.images[0].get_clim()
    assert low == -high == -np.nanmax(np.abs(values))
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    with pytest.raises(ResultsError, match="no value"):
        figure_compensation_map(matrix.iloc[:0])
    with pytest.raises(ResultsError, match="joined rows"):
        figure_attribution(readouts)
