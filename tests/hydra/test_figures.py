"""Figures from small synthetic results folders: every file is a real, non-empty PNG."""

import struct

import numpy as np
import pandas as pd
import pytest

from causalnet.errors import ResultsError
from causalnet.hydra import figures
from causalnet.hydra.store import ResultsStore

EXPECTED = [
    "fig1_prompt.png",
    "fig2_direct_vs_total.png",
    "fig3_examples.png",
    "fig7_compensation.png",
    "fig8_response_split.png",
]


def _png_size(path):
    """(width, height) of a PNG file; fails unless it starts with the PNG signature + IHDR."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND", f"{path} is truncated"
    return struct.unpack(">II", data[16:24])


def _folder(tmp_path, synth, keep=lambda name, rows: rows, prompts_spec="known_1000", **kw):
    """A finalized results folder of synthetic prompts; patches kept for prompt 0."""
    store = ResultsStore(tmp_path / "results").open({"prompts": prompts_spec})
    for pid, t in synth.prompts(**kw).items():
        e, r, p = (keep(name, t[name]) for name in ("effects", "readouts", "patches"))
        store.write_prompt(pid, e, r, p if pid == 0 else None)
    store.finalize({})
    return tmp_path / "results"


def _check_all(paths, folder):
    assert [p.name for p in paths] == EXPECTED
    for path in paths:
        assert path.parent == folder / "figures"
        width, height = _png_size(path)
        assert width > 300 and height > 200 and path.stat().st_size > 10_000


def test_make_all_with_three_prompts(tmp_path, synth):
    folder = _folder(tmp_path, synth, n_prompts=3, n_layers=4, n_patches=2)
    _check_all(figures.make_all(folder), folder)


def test_make_all_with_head_granularity_and_string_ids(tmp_path, synth):
    folder = _folder(
        tmp_path,
        synth,
        n_prompts=3,
        n_layers=3,
        n_heads=3,
        str_ids=True,
        prompts_spec="moved_away.jsonl",
    )  # titles fall back to prompt ids
    _check_all(figures.make_all(folder), folder)


def test_make_all_when_only_attention_sites_were_ablated(tmp_path, synth):
    def attention_only(name, rows):
        column = "site" if name == "effects" else "ablated_site"
        return rows[rows[column].str.startswith("attn")]

    folder = _folder(tmp_path, synth, keep=attention_only, n_prompts=4, n_layers=3)
    assert set(ResultsStore(folder).load_effects()["kind"]) == {"attn"}
    out = tmp_path / "elsewhere"
    paths = figures.make_all(folder, out)
    assert [p.parent for p in paths] == [out] * 5
    for path in paths:
        _png_size(path)


def test_prompt_curves_sum_heads_and_average_patches(synth):
    t = synth.tables(n_prompts=2, n_layers=3, n_heads=2, n_patches=3)
    curves = figures._prompt_curves(t["readouts"], t["patches"], 1, "attn.1.h0")
    r = t["readouts"]
    sel = r[(r["prompt_id"] == 1) & (r["ablated_site"] == "attn.1.h0")].set_index("readout_site")
    attn = curves["attn"]
    assert attn["layers"].tolist() == [0, 1, 2]
    heads = sel.loc[["attn.2.h0", "attn.2.h1"]]
    assert attn["clean"][2] == pytest.approx(heads["direct_effect_clean"].sum())
    assert attn["patches"].shape == (3, 3)
    # the readouts' ablated direct effect is the mean over the per-patch values (Eq 39)
    np.testing.assert_allclose(attn["patches"].mean(0), attn["ablated"], atol=1e-12)
    mlp = curves["mlp"]
    assert mlp["clean"][0] == pytest.approx(sel.loc["mlp.0", "direct_effect_clean"])
    assert figures._prompt_curves(t["readouts"], None, 1, "mlp.0")["mlp"]["patches"].size == 0


def test_plot_prompt_alone_and_a_missing_ablation(tmp_path, synth):
    t = synth.tables(n_prompts=2, n_layers=3, n_patches=2)
    path = figures.plot_prompt(
        t["readouts"], 0, "attn.1", tmp_path / "a" / "one.png", patches=t["patches"]
    )
    assert _png_size(path)[0] > 300
    with pytest.raises(ResultsError, match=r"no readouts for prompt 0 with 'attn.7' ablated"):
        figures.plot_prompt(t["readouts"], 0, "attn.7", tmp_path / "two.png")
    with pytest.raises(ResultsError, match="at least one"):
        figures.plot_examples(t["readouts"], [], tmp_path / "three.png")


def test_select_layers_spreads_and_includes_the_best_fit(synth):
    effects = synth.tables(n_prompts=6, n_layers=10)["effects"]
    picks = figures.select_layers(effects, "attn", count=4)
    assert picks[0] == 0 and picks[-1] == 9 and {3, 6} <= set(picks)
    assert len(picks) in (4, 5)
    assert figures.select_layers(effects, "head") == []
    assert figures.select_layers(pd.concat([effects[effects["layer"] == 2]]), "attn") == [2]
