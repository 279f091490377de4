"""A sweep's run record says how its numbers were computed (causalnet.hydra.provenance).

``run.json``'s ``info.computed_by`` names the adapter, whether its decomposition is hand-written
or discovered (then the errors its probe verification found), and which way the patches went:
the fast final-position replay, the recurrent-state replay, or the hooked re-forward with the
reason the fast path was refused. ``causalnet report`` prints it as one line.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers as T
from test_generic_sweep import save_tiny_generic

from causalnet.adapters import adapt, generic
from causalnet.hydra import provenance
from causalnet.hydra.analysis import identity_residual
from causalnet.hydra.provenance import computed_by, describe
from causalnet.hydra.store import ResultsStore
from causalnet.hydra.sweep import SweepConfig, run_sweep
from tiny_lm import save_tiny_llama, write_prompts


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_prompts(tmp_path_factory.mktemp("provenance") / "prompts.jsonl", 6)


def _sweep(model: Path, prompts: Path, out: Path) -> dict:
    config = SweepConfig(model=str(model), prompts=str(prompts), k=3)
    return ResultsStore(run_sweep(config, out, progress=False)).load_run()["info"]


def test_a_discovered_models_record_gives_its_verification_and_the_replay(prompts, tmp_path):
    info = _sweep(save_tiny_generic(tmp_path / "qwen3", "qwen3"), prompts, tmp_path / "r")
    how = info["computed_by"]
    assert how["adapter"] == "GenericAdapter" and how["family"] == "qwen3"
    assert how["decomposition"] == "discovered" and how["dtype"] == "float32"
    assert how["patching"] == provenance.REPLAY and how["fast_refusal"] is None
    v = how["verification"]
    assert v["tolerance"] == 1e-5  # float32
    for name in ("logits", "eq21", "readout", "heads"):
        assert 0.0 <= v[name] <= v["tolerance"], name
    assert 0.0 < how["fast_probe_error"] <= 1e-5  # a tenth of the float32 patching tolerance
    out = subprocess.run(
        [sys.executable, "-m", "causalnet.cli", "report", str(tmp_path / "r")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert out.splitlines()[0] == f"computed by: {describe(how)}"
    assert "decomposition discovered and verified on a probe" in out and "off the re-forward" in out


def test_a_refused_fast_path_is_recorded_with_its_reason(prompts, tmp_path, monkeypatch):
    reason = "fast patching disagrees with the hooked re-forward on the probe (forced)"
    monkeypatch.setattr(generic, "check_fast", lambda adapter, tokens: (reason, None))
    info = _sweep(save_tiny_generic(tmp_path / "phi3", "phi3"), prompts, tmp_path / "r")
    how = info["computed_by"]
    assert how["patching"] == provenance.REFORWARD and how["fast_refusal"] == reason
    assert how["fast_probe_error"] is None
    assert describe(how).endswith(f"(the fast path was refused: {reason})")
    # the numbers themselves came from the re-forward and keep the exact identity
    effects = ResultsStore(tmp_path / "r").load_effects()
    assert float(identity_residual(effects).abs().max()) < 1e-4


def test_a_hand_written_family_is_recorded_as_hand_written(prompts, tmp_path):
    info = _sweep(save_tiny_llama(tmp_path / "llama"), prompts, tmp_path / "r")
    how = info["computed_by"]
    assert how == {
        "adapter": "LlamaAdapter",
        "family": "llama",
        "dtype": "float32",
        "decomposition": "hand-written",
        "patching": provenance.HAND_WRITTEN,
    }
    assert describe(how).startswith("LlamaAdapter (llama, float32): hand-written family")


def test_a_mamba_is_recorded_as_replayed_from_its_recurrent_states():
    torch.manual_seed(0)
    cfg = T.MambaConfig(
        vocab_size=256, hidden_size=32, num_hidden_layers=2, state_size=4, residual_in_fp32=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = T.MambaForCausalLM(cfg)
    how = computed_by(adapt(model))
    assert how["decomposition"] == "discovered" and how["dtype"] == "float32"
    assert how["patching"] == provenance.RECURRENT and how["fast_refusal"] is None
    assert how["verification"]["heads"] is None  # no attention: no heads to verify
    assert 0.0 <= how["fast_probe_error"] <= 1e-5  # a tenth of the float32 tolerance
