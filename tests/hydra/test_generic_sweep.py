"""The Hydra sweep on decoders with no hand-written adapter (issue 10, section 5).

Tiny random Qwen3, Mixtral (MoE), Phi-3, OLMo-2 (norms after the sublayers), Gemma 2 (soft-capped
logits) and Granite (residual and logit multipliers) are saved with ``save_pretrained`` beside a
byte-level tokenizer and swept from their folder: ``load`` discovers and verifies their
residual stream, every row keeps the exact identity total = dDE(self) + CE + dDE(upstream), and
the total effects equal the centred logits of a naive hooked re-forward of the model itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

from causalnet.adapters import load
from causalnet.adapters.generic import GenericAdapter
from causalnet.adapters.naive import naive_patch
from causalnet.hydra.store import ResultsStore
from causalnet.hydra.sweep import SweepConfig, ablation_values, run_sweep
from tiny_lm import byte_tokenizer, write_prompts

_COMMON = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    vocab_size=256,
    max_position_embeddings=128,
    initializer_range=0.2,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
)
FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=8, final_logit_softcapping=3.0)),
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        dict(residual_multiplier=0.5, logits_scaling=2.0, embedding_multiplier=3.0),
    ),
}
N_PROMPTS = 8


def save_tiny_generic(folder: Path, family: str, seed: int = 0) -> Path:
    """A seeded tiny model of ``family`` and the byte tokenizer, as a local folder."""
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    getattr(T, model_cls)(getattr(T, cfg_cls)(**{**_COMMON, **extra})).eval().save_pretrained(
        folder
    )
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_prompts(tmp_path_factory.mktemp("generic") / "prompts.jsonl", N_PROMPTS)


def _identity_residual(effects) -> float:
    residual = effects["total_effect"] - (
        (effects["direct_effect_ablated_self"] - effects["direct_effect"])
        + effects["compensatory_effect"]
        + effects["delta_de_upstream"]
    )
    return float(residual.abs().max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sweep_of_a_model_without_a_hand_written_adapter_keeps_the_identity(
    family, prompts, tmp_path
):
    folder = save_tiny_generic(tmp_path / family, family)
    config = SweepConfig(model=str(folder), prompts=str(prompts), k=3)
    store = ResultsStore(run_sweep(config, tmp_path / "r", progress=False))
    effects, readouts = store.load_effects(), store.load_readouts()
    assert len(effects) == N_PROMPTS * 4 and len(readouts) == N_PROMPTS * 4 * 5
    assert _identity_residual(effects) < 1e-4  # float32 model, float64 bookkeeping
    assert effects["total_effect"].abs().max() > 1e-3  # the ablations did something

    adapter = load(str(folder))
    assert isinstance(adapter, GenericAdapter) and adapter.arch.family == family
    # the oracle: the model's own centred logits in a naive hooked re-forward (Eq 12)
    texts = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()]
    tokens = [adapter.encode(t) for t in texts]
    sites = adapter.sites()
    pool = torch.stack([adapter.clean_run(t).site_values[1:] for t in tokens])
    i = 2
    values, _ = ablation_values(config, pool, i)
    clean = adapter.clean_run(tokens[i])
    cap = adapter.parts.readout.softcap
    for s_idx, site in enumerate(sites):
        if adapter.parts.alpha[0] != 1.0:  # naive_patch has no multipliers: Granite is
            break  # checked against check_patching in tests/adapters/test_discover.py
        logits = naive_patch(adapter, tokens[i], site, values[s_idx]).logits[:, -1].double()
        if cap is not None:  # the readout is the centred logit before the soft-cap
            logits = cap * torch.atanh(logits / cap)
        expected = float((logits[:, clean.target] - logits.mean(-1) - clean.centred_logit).mean())
        got = effects.query("prompt_id == @i and site == @site")["total_effect"].item()
        assert got == pytest.approx(expected, abs=1e-4), site


def test_the_hydra_command_sweeps_a_folder_of_a_tiny_mixtral(prompts, tmp_path):
    folder = save_tiny_generic(tmp_path / "mixtral", "mixtral")
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "causalnet.cli", "hydra", "--model", str(folder)]
    cmd += ["--prompts", str(prompts), "--k", "3", "--out", str(out), "--no-plots", "--quiet"]
    cmd += ["--granularity", "head"]
    subprocess.run(cmd, check=True, capture_output=True)
    effects = ResultsStore(out).load_effects()
    assert len(effects) == N_PROMPTS * 2 * (4 + 1)  # per layer: 4 heads and the MLP
    assert _identity_residual(effects) < 1e-4
