"""The GPT-J adapter (adapters/gptj.py): what is particular to the family.

The shared identities (logits vs Hugging Face, Eq 21, heads sum to the layer, direct effects
sum to the centred logit, fast patch vs the naive hooked re-forward) run on the
``gptj-partial-rotary`` entry of ``TINY_MODELS`` in ``test_base.py`` and ``test_fast_paths.py``.
Here: the rotary convention (adjacent pairs of the first ``rotary_dim`` dims), the parallel
wiring with one shared ln_1, weights by reference, and the refusals. Tolerances: float64 1e-10
(GPT-J's LayerNorm and rotary tables compute in the model's dtype except the tables, which are
float32 cast, hence 1e-5 for the rotation's norm), float32 1e-4 against Hugging Face.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import gptj_config
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM

from causalnet.adapters import adapt
from causalnet.adapters.gptj import GPTJAdapter
from causalnet.errors import ModelError, UnsupportedModelError

VOCAB = 101


def build(**overrides: object) -> GPTJForCausalLM:
    """The registry's tiny GPT-J config with its Hugging Face init (seed 0; norm gains and biases
    left at 1 and 0, unlike the registry's randomised ones)."""
    torch.manual_seed(0)
    return GPTJForCausalLM(gptj_config(**overrides)).eval()


def prompt(n: int = 7) -> Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(123))


def hf_logits(model: nn.Module, tokens: Tensor) -> Tensor:
    with torch.no_grad():
        return model(input_ids=tokens[None], use_cache=False).logits[0]


def test_adapt_picks_the_gptj_adapter_with_the_parallel_residual() -> None:
    a = adapt(build())
    assert isinstance(a, GPTJAdapter)
    assert a.arch.family == "gptj" and a.arch.parallel_residual and a.arch.norm == "layer"
    assert (a.arch.n_heads, a.arch.n_kv_heads, a.arch.d_head) == (4, 4, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotary_rotates_adjacent_pairs_of_the_first_rotary_dims(dtype: torch.dtype) -> None:
    """rotary_dim 8 of d_head 16: dims 0-7 of q and k turn with the position, pair by pair."""
    a = GPTJAdapter(build().to(dtype))
    resid = torch.randn(1, 1, 64, dtype=dtype, generator=torch.Generator().manual_seed(4))
    q0, k0, v0 = a.qkv(1, resid, torch.tensor([0]))
    q5, k5, v5 = a.qkv(1, resid, torch.tensor([5]))
    assert q0.shape == k0.shape == v0.shape == (1, 1, 4, 16)
    for x0, x5 in ((q0, q5), (k0, k5)):
        assert torch.equal(x0[..., 8:], x5[..., 8:])
        assert (x0[..., :8] - x5[..., :8]).abs().max() > 1e-3
        # each adjacent pair (2j, 2j+1) keeps its length: a rotation of pairs, not of halves
        pairs0, pairs5 = x0[..., :8].unflatten(-1, (4, 2)), x5[..., :8].unflatten(-1, (4, 2))
        assert (pairs0.norm(dim=-1) - pairs5.norm(dim=-1)).abs().max() <= 1e-5
    assert torch.equal(v0, v5)


def test_mlp_reads_the_same_ln_1_as_attention_and_not_its_output() -> None:
    """Parallel: patching attn.l at t leaves the numerator of mlp.l's direct effect unchanged."""
    a = GPTJAdapter(build().double())
    clean = a.clean_run(prompt())
    run = a.patch(clean, ["attn.1"], (3 * clean.value("attn.1"))[None, None])
    col = clean.readout_sites.index("mlp.1")
    patched = run.direct_effects[0, 0, col] * run.sigma[0, 0]
    assert abs(float(patched - clean.direct_effects[col] * clean.sigma)) <= 1e-10
    later = clean.readout_sites.index("mlp.2")
    assert abs(float(run.direct_effects[0, 0, later] - clean.direct_effects[later])) > 1e-6


def test_weights_are_read_by_reference_not_copied() -> None:
    model = build()
    a = GPTJAdapter(model)
    tokens = prompt()
    before = a.forward(tokens).logits
    with torch.no_grad():
        model.transformer.h[1].attn.k_proj.weight.mul_(1.5)
        model.transformer.h[2].ln_1.bias.add_(0.5)
        model.lm_head.bias.add_(torch.linspace(0, 1, VOCAB))
    after = a.forward(tokens).logits
    assert (after - before).abs().max() > 1e-3
    assert (after - hf_logits(model, tokens)).abs().max() <= 1e-4


def test_models_it_cannot_describe_are_refused_naming_the_part() -> None:
    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=11, bos_token_id=0, eos_token_id=0)
    )
    with pytest.raises(ModelError, match="GPTJForCausalLM"):
        GPTJAdapter(gpt2)
    model = build()
    object.__setattr__(model.config, "rotary_dim", None)  # older transformers allow it
    with pytest.raises(ModelError, match="rotary_dim None"):
        GPTJAdapter(model)
    with pytest.raises(ModelError, match="rotary_dim 24"):
        GPTJAdapter(build(rotary_dim=24))
    model = build()
    model.transformer.h[2].attn.q_proj = nn.Linear(64, 64, bias=True)
    with pytest.raises(ModelError, match=r"h\.2\.attn\.q_proj has a bias"):
        GPTJAdapter(model)
    model = build()
    model.transformer.h[0].ln_1 = nn.RMSNorm(64)
    with pytest.raises(ModelError, match=r"h\.0\.ln_1 is a RMSNorm"):
        GPTJAdapter(model)


def test_the_unsupported_model_error_lists_gptj() -> None:
    class Other(nn.Module):
        config = GPTJConfig(n_embd=8, n_layer=1, n_head=2)

    Other.config.model_type = "gemma2"
    with pytest.raises(UnsupportedModelError, match="'gptj'"):
        adapt(Other())
