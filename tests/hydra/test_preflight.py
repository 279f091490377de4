"""``causalnet check``: a model tried before a sweep (causalnet.hydra.preflight).

It prints the decomposition, how the numbers would be computed, the sites, the sweep's patches
of the first prompt against an independent oracle, and the time per prompt; it writes nothing;
a disagreement beyond the tolerance exits with status 1, a model that cannot be adapted with 2.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from test_generic_sweep import save_tiny_generic
from test_mamba_sweep import save_tiny_mamba

from causalnet.adapters import load, trace
from causalnet.cli import main
from causalnet.hydra.config import SweepConfig
from causalnet.hydra.preflight import preflight, preflight_text
from tiny_lm import save_tiny_llama, write_prompts


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_prompts(tmp_path_factory.mktemp("preflight") / "prompts.jsonl", 8)


def _files(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in sorted(folder.rglob("*"))}


def test_check_of_a_discovered_model_reports_it_and_writes_nothing(prompts, tmp_path, capsys):
    folder = save_tiny_generic(tmp_path / "qwen3", "qwen3")
    before = _files(tmp_path)
    assert main(["check", "--model", str(folder), "--prompts", str(prompts), "--k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert _files(tmp_path) == before
    assert lines[0] == f"model: {folder} (Qwen3ForCausalLM, float32 on cpu)"
    assert lines[1] == f"decomposition: {load(str(folder)).parts.summary()}"
    assert lines[2].startswith("computed by: GenericAdapter (qwen3, float32): decomposition")
    assert lines[3] == "sites: 4 at layer granularity (attn.0 ... mlp.1), each read out at 5"
    assert lines[4].startswith("agreement on prompt 0 (")
    assert "agrees with the hooked re-forward of the whole prompt" in lines[4]
    assert lines[5].startswith("time per prompt as a sweep computes it (clean run, K=3 patches")
    assert lines[5].endswith("8 prompts: about " + lines[5].split("about ")[1])


def test_the_agreement_is_measured_against_the_oracle(prompts, tmp_path, monkeypatch):
    """An oracle moved by 0.01 in every centred logit is found 0.01 off (relative to
    max(1, |clean centred logit|)), beyond the float32 tolerance: the check fails."""
    folder = save_tiny_generic(tmp_path / "phi3", "phi3")
    config = SweepConfig(model=str(folder), prompts=str(prompts), k=3)
    honest = preflight(config, n_timed=1)
    assert honest.agrees and honest.disagreement < 1e-5
    real = trace.reforward_patch

    def moved(*args, **kwargs):
        run = real(*args, **kwargs)
        return dataclasses.replace(run, centred_logit=run.centred_logit + 0.01)

    monkeypatch.setattr(trace, "reforward_patch", moved)
    found = preflight(config, n_timed=1)
    adapter = load(str(folder))
    first = json.loads(prompts.read_text().splitlines()[0])["prompt"]
    scale = max(1.0, abs(float(adapter.clean_run(adapter.encode(first)).centred_logit)))
    assert not found.agrees
    assert found.disagreement == pytest.approx(0.01 / scale, abs=1e-6)


def test_check_of_a_hand_written_family_compares_with_the_models_own_forwards(prompts, tmp_path):
    folder = save_tiny_llama(tmp_path / "llama")
    found = preflight(SweepConfig(model=str(folder), prompts=str(prompts), k=3), n_timed=1)
    assert found.computed_by["decomposition"] == "hand-written"
    assert found.oracle == "one hooked full forward of the model per site"
    assert found.agrees and found.disagreement < 1e-5
    assert found.decomposition.startswith("hand-written family llama: 3 layers")


def test_check_of_a_model_that_cannot_be_adapted_names_the_failure(prompts, tmp_path, capsys):
    folder = save_tiny_mamba(tmp_path / "mamba")  # residual_in_fp32: float64 cannot decompose
    argv = ["check", "--model", str(folder), "--prompts", str(prompts), "--k", "3"]
    argv += ["--dtype", "float64"]
    assert main(argv) == 2
    assert "residual_in_fp32" in capsys.readouterr().err


def test_the_timed_prompts_are_later_prompts_of_the_first_prompts_length(tmp_path):
    """After two untimed prompts of its length, a discovered model reuses the blocks' arguments
    at t, as almost every prompt of a long sweep does: those are the prompts timed."""
    texts = ["abcdef gh"] + [f"p{i}" * (i + 2) for i in range(6)] + ["zyxwvu ts", "x" * 20]
    texts += ["mnopqr st", "ijklmn op"]  # 9 bytes, as the first
    records = [json.dumps({"id": i, "prompt": t, "attribute": "x"}) for i, t in enumerate(texts)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(records) + "\n")
    folder = save_tiny_generic(tmp_path / "qwen3", "qwen3")
    found = preflight(SweepConfig(model=str(folder), prompts=str(path), k=3))
    # the first K + 2 = 5 prompts, then ids 7 (untimed), 9 and 10 of the first prompt's length
    assert found.timed == [9, 10]
    assert found.timed_tokens == [found.n_tokens] * 2 and len(found.seconds) == 2


def test_sets_of_sites_are_left_out_of_the_comparison(prompts, tmp_path):
    """A set (a+b) is patched by the re-forward itself: only the single sites are compared."""
    folder = save_tiny_generic(tmp_path / "qwen3", "qwen3")
    config = SweepConfig(model=str(folder), prompts=str(prompts), k=3, sites="attn.0+attn.1,mlp.1")
    text = preflight_text(preflight(config, n_timed=1))
    assert "one patch per single site (1 of 2): agrees with the hooked re-forward" in text
    only_sets = preflight(dataclasses.replace(config, sites="attn.0+attn.1"), n_timed=1)
    assert only_sets.oracle is None and only_sets.disagreement is None and only_sets.agrees
