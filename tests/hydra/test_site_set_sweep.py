"""A sweep with sets of sites (``--sites 'attn.1+attn.2,attn.0'``): one row per set, its
members ablated together with values from the same source prompt, the protocol identity on
every row with totals from the patched model's logits (float32 model: 1e-4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from causalnet.adapters import adapt
from causalnet.cli import main
from causalnet.errors import CausalNetError
from causalnet.hydra.plan import select_sites
from causalnet.hydra.store import ResultsStore
from tiny_lm import save_tiny_llama, write_prompts


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("sets")
    model, prompts = save_tiny_llama(root / "model"), write_prompts(root / "p.jsonl", 6)
    out = root / "r"
    args = ["hydra", "--model", str(model), "--prompts", str(prompts), "--k", "3"]
    args += ["--sites", "attn.2+attn.1,attn.0", "--out", str(out), "--no-plots", "--quiet"]
    assert main(args) == 0
    return out, model, prompts


def test_cli_sweep_with_a_set_writes_one_row_per_set_with_its_earliest_layer(swept):
    effects = ResultsStore(swept[0]).load_effects()
    assert sorted(set(effects["site"])) == ["attn.0", "attn.1+attn.2"]
    row = effects[effects["site"] == "attn.1+attn.2"].iloc[0]
    assert (row["kind"], row["layer"], row["head"]) == ("set", 1, -1)


def test_set_rows_satisfy_the_protocol_identity_with_totals_from_the_logits(swept):
    effects = ResultsStore(swept[0]).load_effects()
    d_self = effects["direct_effect_ablated_self"] - effects["direct_effect"]
    parts = effects[["repair_attn", "repair_mlp", "repair_norm", "repair_sibling"]].sum(axis=1)
    assert (effects["total_effect"] - (d_self + parts)).abs().max() < 1e-4
    assert effects["repair_sibling"].abs().max() < 1e-5
    sets = effects[effects["kind"] == "set"]
    assert (sets["total_effect"].abs() > 1e-3).all()


def test_a_set_row_is_both_members_patched_from_the_same_source_prompt(swept):
    """Recompute prompt 0's set row by hand: the members' clean values in each source prompt,
    patched together; and its own direct effect is the members' sum."""
    out, model_dir, _ = swept
    from transformers import AutoModelForCausalLM

    store = ResultsStore(out)
    effects, readouts = store.load_effects(), store.load_readouts()
    row = effects[(effects["site"] == "attn.1+attn.2")].iloc[0]
    pid = row["prompt_id"]
    texts = {r["id"]: r["prompt"] for r in _records(swept[2])}
    a = adapt(AutoModelForCausalLM.from_pretrained(model_dir).eval())
    a.tokenizer = _tokenizer(model_dir)
    clean = a.clean_run(a.encode(texts[pid]))
    srcs = [a.clean_run(a.encode(texts[_id(s)])) for s in row["sources"].split(",")]
    values = torch.stack(
        [
            torch.stack([c.value("attn.1") for c in srcs]),
            torch.stack([c.value("attn.2") for c in srcs]),
        ]
    )
    patched = a.patch(clean, ["attn.1+attn.2"], values)
    assert abs(float(patched.total_effect.mean()) - row["total_effect"]) < 1e-4
    own = readouts[(readouts["prompt_id"] == pid) & (readouts["ablated_site"] == "attn.1+attn.2")]
    clean_de = own.set_index("readout_site")["direct_effect_clean"]
    assert abs(clean_de["attn.1"] + clean_de["attn.2"] - row["direct_effect"]) < 1e-6


def test_select_sites_keeps_sets_in_residual_order_and_refuses_unknown_members():
    all_sites = ["attn.0", "mlp.0", "attn.1", "mlp.1", "attn.2", "mlp.2"]
    got = select_sites(all_sites, "attn.2+attn.1,attn.0,mlp.1")
    assert got == ["attn.0", "attn.1+attn.2", "mlp.1"]
    with pytest.raises(CausalNetError, match="attn.7"):
        select_sites(all_sites, "attn.1+attn.7")
    with pytest.raises(CausalNetError, match="mixes granularities"):
        select_sites(all_sites + ["attn.1.h0"], "attn.1+attn.1.h0")
    with pytest.raises(CausalNetError, match="twice"):
        select_sites(all_sites, "attn.1+attn.1")


def _records(path: Path) -> list[dict]:
    import json

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"id": r.get("id", i), "prompt": r["prompt"]} for i, r in enumerate(rows)]


def _id(text: str):
    return int(text) if text.lstrip("-").isdigit() else text


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
