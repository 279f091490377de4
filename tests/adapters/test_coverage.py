"""Coverage, measured: every causal-LM model type of the installed transformers is adapted
exactly (identities inside ``adapt``; patching vs an independent hooked re-forward at 1e-4,
float32) or refused / out of scope with a named reason -- never a crash, never a wrong number.

The walk of one type builds its tiny random model (``adapters/tiny_configs.py``) and runs
:func:`causalnet.adapters.coverage.walk_one`; each type is one parametrized case. Where the
installed transformers is the one of the recorded run (``docs/coverage.json``), the live status
must equal the recorded one (the reason's wording may change), so the README's table
(rendered from the record) stays true. The default tier walks :data:`DEFAULT_TIER`; ``-m slow``
walks every type.
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers

from causalnet.adapters import adapt
from causalnet.adapters.coverage import (
    STATUSES,
    WORKS,
    CoverageRow,
    non_causal_reason,
    patch_error,
    readme_section,
    render_table,
    walk_one,
)
from causalnet.adapters.tiny_configs import (
    causal_lm_types,
    probe_tokens,
    scope,
    tiny_config,
    tiny_model,
)
from causalnet.errors import ModelError, UnsupportedModelError

ROOT = Path(__file__).resolve().parents[2]
RECORD_PATH = ROOT / "docs" / "coverage.json"
RECORD = json.loads(RECORD_PATH.read_text(encoding="utf-8"))
RECORDED = {r["model_type"]: r for r in RECORD["rows"]}
SAME_TRANSFORMERS = RECORD["transformers"] == transformers.__version__

#: The issue's goal list (section 4): each must work exactly, at layer or head granularity.
GOAL = [
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "phi",
    "phi3",
    "olmo",
    "olmo2",
    "gemma",
    "gemma2",
    "gemma3_text",
    "granite",
    "stablelm",
    "starcoder2",
    "cohere",
    "falcon",
    "gpt2",
    "gpt_neox",
    "gptj",
    "gpt_neo",
    "opt",
    "bloom",
    "codegen",
    "smollm3",
]

#: Types whose tiny config this walk cannot build yet: a gap of the walk, not of the adapters.
NOT_BUILT: dict[str, str] = {
    "blt": "tiny config: BLT's patcher / local encoder / decoder sub-configs stay at full size",
    "cohere_compass_text": "tiny config: rope_parameters keyed by layer type not rebuilt",
    "dory": "tiny config: Dory doubles its layer counts in to_dict (attention + mlp blocks)",
    "dots3_note": "tiny config: some Dots3NoteTextConfig size field is not shrunk (38M params)",
    "dots3_note_text": "tiny config: some Dots3NoteTextConfig size field is not shrunk (38M)",
    "gemma3n_text": "tiny config: altup / per-layer input sizes not shrunk (6.4M params)",
    "qwen4_exp": "tiny config: the indexer fields (indexer_n_heads ...) default to None",
    "qwen4_exp_text": "tiny config: the indexer fields (indexer_n_heads ...) default to None",
    "xlstm": "tiny config: xLSTM's head / chunk sizes inconsistent at width 64",
}
#: In-scope types the adapters do not handle yet although they should (bugs to fix).
KNOWN_BUGS: dict[str, str] = {}
#: Goal-list types refused (with a named reason) that should work: the adapters' gaps.
GOAL_GAPS: dict[str, str] = {}


def _case(model_type: str, slow: bool, gaps: dict[str, str] | None = None) -> object:
    marks = [pytest.mark.slow] if slow else []
    known = NOT_BUILT | KNOWN_BUGS | (gaps or {})
    reason = known.get(model_type)
    if reason is not None:
        marks.append(pytest.mark.xfail(strict=True, reason=reason))
    return pytest.param(model_type, marks=marks)


@functools.cache
def _walk(model_type: str) -> CoverageRow:
    return walk_one(model_type)


#: Walked in the default tier (the goal list plus one of each kind of outcome); the full walk
#: of every type (minutes on 2 cores) is in the slow tier.
DEFAULT_TIER = {
    *GOAL,
    *("bert", "bart", "gemma3", "musicgen", "mamba", "jamba", "deepseek_v3", "lfm3"),
}


@pytest.mark.parametrize(
    "model_type", [_case(mt, mt not in DEFAULT_TIER) for mt in causal_lm_types()]
)
def test_every_causal_lm_type_works_or_is_refused_with_a_named_reason(model_type):
    row = _walk(model_type)
    assert row.status in STATUSES[:4], (row.status, row.reason)
    assert row.status == WORKS[0] or len(row.reason) > 10, row
    if row.status in WORKS:
        assert row.patch_error is not None and row.patch_error <= 1e-4, row
    if SAME_TRANSFORMERS:
        recorded = RECORDED[model_type]
        assert row.status == recorded["status"], (
            "the recorded coverage is stale: rerun python -m causalnet.adapters.coverage"
        )
        if row.status in WORKS:  # fast patching or the re-forward, as recorded
            assert (row.patching == "fast") == (recorded.get("patching") == "fast"), (
                row.patching,
                recorded.get("patching"),
            )


@pytest.mark.parametrize("model_type", [_case(mt, False, GOAL_GAPS) for mt in GOAL])
def test_the_issues_goal_models_work_exactly(model_type):
    row = _walk(model_type)
    assert row.status in WORKS, (row.status, row.reason)


def test_the_recorded_run_covers_every_type_and_at_least_80_work():
    if SAME_TRANSFORMERS:
        assert list(RECORDED) == list(causal_lm_types())
    works = [r for r in RECORD["rows"] if r["status"] in WORKS]
    assert len(works) >= 80, len(works)
    for r in RECORD["rows"]:
        if r["status"] == "not built":
            assert r["model_type"] in NOT_BUILT, r
        elif r["status"] not in STATUSES[:4]:  # error / wrong: only the known bugs
            assert r["model_type"] in KNOWN_BUGS, r


def test_readme_and_coverage_md_are_rendered_from_the_recorded_run():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme_section(RECORD) in readme
    md = (ROOT / "docs" / "coverage.md").read_text(encoding="utf-8")
    assert md == "# Coverage\n\n" + render_table(RECORD)


def test_render_table_counts_each_status_and_lists_each_row():
    rows = [
        CoverageRow("a", "A", "works (heads)", "", "X", 0.0, 0.1, "fast"),
        CoverageRow(
            "b", "B", "layer granularity only", "norm after attention", "X", 0.0, 0.1, "re-forward"
        ),
        CoverageRow("c", "C", "refused", "block c.0: Eq 21 off by 1e-1", "", None, 0.1),
        CoverageRow("d", "D", "out of scope", "encoder-decoder | multimodal", "", None, 0.1),
    ]
    record = {"transformers": "9", "torch": "9", "seconds": 1.0, "rows": [vars(r) for r in rows]}
    text = render_table(record)
    assert (
        "| **works** (exact: identities and patching vs the hooked re-forward) | **2** (2 " in text
    )
    assert "| refused | 1 |" in text and "| in scope (all but out of scope) | 3 |" in text
    assert "| `d` | D | out of scope |  | encoder-decoder \\| multimodal |" in text
    assert "| of those that work: patched at the final position (fast) | 1 |" in text
    assert "| `b` | B | layer granularity only | re-forward | norm after attention |" in text


# ---- the tiny configs ------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["gpt2", "opt", "falcon", "mixtral", "deepseek_v3"])
def test_tiny_config_shrinks_the_fields_each_config_names_its_own_way(model_type):
    config = tiny_config(model_type)
    model = tiny_model(model_type)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert config.num_hidden_layers <= 3 and config.hidden_size <= 64
    assert config.vocab_size <= 256 and config.num_attention_heads == 4
    assert not model.training


def test_tiny_config_keeps_one_layer_of_each_kind_so_hybrids_keep_attention():
    config = tiny_config("qwen3_next")  # default: 48 layers, 3 linear attention : 1 full
    assert config.num_hidden_layers == len(config.layer_types) == 2
    assert set(config.layer_types) == {"linear_attention", "full_attention"}
    gemma = tiny_config("gemma2")  # alternating sliding and full attention
    assert set(gemma.layer_types) == {"sliding_attention", "full_attention"}
    assert gemma.sliding_window == 4 < probe_tokens(128).shape[0]


def test_tiny_model_is_seeded_and_its_gains_and_biases_are_not_trivial():
    a, b = tiny_model("gpt2", seed=3), tiny_model("gpt2", seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert (a.transformer.ln_f.weight - 1).abs().max() > 0.05
    assert a.transformer.h[0].attn.c_proj.bias.abs().max() > 0.01


def test_scope_names_encoder_decoder_multimodal_audio_and_draft_models():
    assert "encoder-decoder" in scope("bart")
    assert "multimodal" in scope("gemma3") and "vision_config" in scope("gemma3")
    assert "audio" in scope("musicgen")
    assert "draft" in scope("gemma4_assistant")
    assert scope("llama") is None and scope("llama4") is None  # Llama 4's text decoder


def test_an_encoder_is_measured_as_not_causal():
    encoder = tiny_model("bert", is_decoder=False)
    assert "encoder" in non_causal_reason(encoder, probe_tokens(128))
    assert non_causal_reason(tiny_model("bert"), probe_tokens(128)) is None


def test_unknown_type_and_oversized_model_raise_model_error_naming_them(monkeypatch):
    with pytest.raises(ModelError, match="'no_such_type'"):
        tiny_config("no_such_type")
    monkeypatch.setattr("causalnet.adapters.tiny_configs.MAX_PARAMETERS", 1000)
    with pytest.raises(ModelError, match="GPT2LMHeadModel of model type 'gpt2'"):
        tiny_model("gpt2")


# ---- the patching check can fail ------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])  # hand-written, discovered
def test_patch_error_catches_a_patch_that_is_off_by_more_than_1e_4(model_type):
    adapter = adapt(tiny_model(model_type))
    tokens = probe_tokens(128)
    assert patch_error(adapter, tokens, "layer") <= 1e-4
    honest = adapter.patch

    def off(clean, sites, values):
        run = honest(clean, sites, values)
        return replace(
            run, centred_logit=run.centred_logit + 1e-3 * max(1.0, abs(clean.centred_logit))
        )

    adapter.patch = off
    with pytest.raises(UnsupportedModelError, match="off by"):
        patch_error(adapter, tokens, "layer")
