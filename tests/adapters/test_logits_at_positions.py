"""A batched clean run projects onto the vocabulary only each prompt's last position
(:func:`causalnet.adapters.hooks.call_model` with ``positions``: transformers' ``logits_to_keep``
as a [B, 1] tensor), and a model whose forward refuses that gets all its logits, with the same
numbers. Float32 tiny models; logits within 1e-5 of their scale (another matrix shape's
rounding)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from causalnet.adapters import adapt
from causalnet.adapters.hooks import POSITIONS_REFUSED, call_model


def _config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


class IntegerOnlyLlama(LlamaForCausalLM):
    """A decoder whose forward reads ``logits_to_keep`` as an int only (older code): the last
    ``logits_to_keep`` positions (0: all)."""

    def forward(self, input_ids=None, logits_to_keep=0, **kwargs):  # noqa: ANN001, ANN003, ANN201
        out = super().forward(input_ids=input_ids, **kwargs)
        out.logits = out.logits[:, slice(-logits_to_keep, None)]
        return out


def _model(cls: type) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return cls(_config()).eval()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))


def test_positions_give_each_rows_logits_at_its_own_position_only():
    model = _model(LlamaForCausalLM)
    tokens = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([4, 8, 2])
    full = call_model(model, tokens)
    kept = call_model(model, tokens, positions=positions)
    assert kept.shape == (3, 1, 96)
    assert _close(kept[:, 0], full[torch.arange(3), positions])
    assert LlamaForCausalLM not in POSITIONS_REFUSED


def test_a_forward_that_refuses_position_tensors_gets_all_its_logits():
    model = _model(IntegerOnlyLlama)
    tokens = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    got = call_model(model, tokens, positions=torch.tensor([3, 6]))
    assert got.shape == (2, 7, 96)
    assert "TypeError" in POSITIONS_REFUSED[IntegerOnlyLlama]
    assert _close(got, call_model(model, tokens))


def test_batched_clean_runs_read_each_prompts_logits_with_or_without_position_tensors():
    for cls in (LlamaForCausalLM, IntegerOnlyLlama):
        adapter = adapt(_model(cls), generic=True)
        gen = torch.Generator().manual_seed(3)
        prompts = [torch.randint(0, 96, (n,), generator=gen) for n in (5, 9, 7)]
        for prompt, run in zip(prompts, adapter.clean_runs(prompts), strict=True):
            alone = adapter.clean_run(prompt)
            assert run.target == alone.target, cls.__name__
            assert _close(run.logits, alone.logits), cls.__name__
            top = max(1.0, float(alone.logits.abs().max()))
            assert abs(run.centred_logit - alone.centred_logit) <= 1e-5 * top
