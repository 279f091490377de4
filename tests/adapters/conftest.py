"""Shared tiny-model fixtures for the adapter tests (seeded random weights, no download).

``TINY_MODELS`` maps an id to a builder ``() -> Hugging Face causal LM``; the ``tiny`` fixture
runs every test that asks for it on every entry, in float32 AND float64.

Sharing: ``tiny``, ``llama`` and ``shared_tiny(name, dtype)`` hand out ONE model per (entry,
dtype) for the whole session (built on first use), so the default tier does not rebuild a model
per test as families are added. A test must not change a shared model: its parameters, buffers,
dtype, device, training mode, hooks and prompt tokens are fingerprinted when it is handed out
and checked again after the test, which fails naming the model otherwise. A test that edits
weights, moves or casts the model gets a private copy from ``tiny_factory(name, dtype)`` (or
``make_tiny``), built fresh on every call.

HOW TO ADD A FAMILY (GPT-2, GPT-NeoX engineers): add entries to ``TINY_MODELS``, e.g.::

    "gpt2": lambda: _build(GPT2LMHeadModel, GPT2Config(n_embd=64, n_layer=3, n_head=4,
                                                        vocab_size=101, n_positions=64)),
    "neox-parallel": lambda: _build(GPTNeoXForCausalLM, GPTNeoXConfig(...,
                                                        use_parallel_residual=True)),

``_build`` seeds the init, puts the model in eval mode and randomises every 1-D parameter (norm
gains around 1, biases around 0), so that gains and biases are exercised, not left at 1 and 0.
The family's adapter must implement ``hook_points`` / ``final_norm_module`` for the naive-oracle
tests (``tests/adapters/test_base.py``), which then run on the new entries unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from causalnet.adapters import TransformerAdapter, adapt

VOCAB = 101
PROMPT_LEN = 7


def _build(cls: type, config: object, seed: int = 0) -> nn.Module:
    """A seeded random model with randomised norm gains (~1) and biases (~0), in eval mode."""
    torch.manual_seed(seed)
    model = cls(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                noise = torch.randn(p.shape, generator=gen)
                is_gain = "norm" in name or "ln" in name.split(".")[-2]
                p.copy_(1.0 + 0.3 * noise if is_gain and name.endswith("weight") else 0.1 * noise)
    return model.eval()


def _llama_config(**kw: object) -> dict:
    base = dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        initializer_range=0.15,
    )
    base.update(kw)
    return base


def _neox_config(parallel: bool) -> dict:
    return dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=96,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        rotary_pct=0.25,
        use_parallel_residual=parallel,
        initializer_range=0.15,
        bos_token_id=0,
        eos_token_id=0,
    )


TINY_MODELS: dict[str, Callable[[], nn.Module]] = {
    # Llama, tied embeddings, GQA (4 heads share 2 key/value heads)
    "llama-tied-gqa": lambda: _build(
        LlamaForCausalLM, LlamaConfig(**_llama_config(tie_word_embeddings=True))
    ),
    # Llama, untied lm_head, biases on every projection (o_proj bias split over heads)
    "llama-untied-bias": lambda: _build(
        LlamaForCausalLM,
        LlamaConfig(
            **_llama_config(
                tie_word_embeddings=False,
                attention_bias=True,
                mlp_bias=True,
                num_key_value_heads=4,
            )
        ),
    ),
    # Qwen2: q/k/v biases, untied
    "qwen2-bias": lambda: _build(
        Qwen2ForCausalLM, Qwen2Config(**_llama_config(tie_word_embeddings=False))
    ),
    # Mistral with a sliding window shorter than the prompt, 1 key/value head (MQA)
    "mistral-window": lambda: _build(
        MistralForCausalLM,
        MistralConfig(**_llama_config(sliding_window=3, num_key_value_heads=1)),
    ),
    # GPT-2: learned positions, LayerNorm, Conv1D, c_proj bias split over heads, tied; the
    # extra 1 / (l + 1) attention scale of scale_attn_by_inverse_layer_idx
    "gpt2-inverse-layer-idx": lambda: _build(
        GPT2LMHeadModel,
        GPT2Config(
            n_embd=64,
            n_layer=3,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=64,
            initializer_range=0.15,
            scale_attn_by_inverse_layer_idx=True,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    # GPT-NeoX / Pythia: parallel residual, per-head interleaved fused qkv, rotary on 1/4 of
    # each head, untied embed_out
    "neox-parallel": lambda: _build(GPTNeoXForCausalLM, GPTNeoXConfig(**_neox_config(True))),
    # GPT-NeoX with the sequential residual
    "neox-sequential": lambda: _build(GPTNeoXForCausalLM, GPTNeoXConfig(**_neox_config(False))),
    # GPT-J: one ln_1 read by attention and MLP in parallel, rotary on adjacent pairs of the
    # first 8 of 16 dims per head, no attention biases, untied lm_head with a bias
    "gptj-partial-rotary": lambda: _build(
        GPTJForCausalLM,
        GPTJConfig(
            n_embd=64,
            n_layer=3,
            n_head=4,
            rotary_dim=8,
            n_inner=96,
            vocab_size=VOCAB,
            n_positions=64,
            initializer_range=0.15,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
}

DTYPES = {"f32": torch.float32, "f64": torch.float64}
# Tolerances (max abs difference) per dtype: forward logits vs Hugging Face, patch vs naive.
LOGIT_ATOL = {torch.float32: 1e-4, torch.float64: 1e-10}
PATCH_ATOL = {torch.float32: 1e-4, torch.float64: 1e-9}


@dataclass
class Tiny:
    """One tiny model in one dtype, with its adapter and a seeded prompt."""

    name: str
    dtype: torch.dtype
    model: nn.Module
    adapter: TransformerAdapter
    tokens: Tensor  # [PROMPT_LEN] int64

    @property
    def logit_atol(self) -> float:
        return LOGIT_ATOL[self.dtype]

    @property
    def patch_atol(self) -> float:
        return PATCH_ATOL[self.dtype]


def make_tiny(name: str, dtype: torch.dtype) -> Tiny:
    """A fresh (private) copy of one entry of ``TINY_MODELS`` in ``dtype``."""
    model = TINY_MODELS[name]().to(dtype)
    gen = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, VOCAB, (PROMPT_LEN,), generator=gen)
    return Tiny(name, dtype, model, adapt(model), tokens)


def fingerprint(t: Tiny) -> tuple:
    """What a test could change in a shared tiny model: every parameter and buffer (dtype,
    device, sum and sum of squares), training mode, the number of hooks, the prompt tokens, and
    which objects the adapter's attributes are (an override left behind, a replaced list)."""
    with torch.no_grad():
        tensors = [*t.model.named_parameters(), *t.model.named_buffers()]
        state = tuple(
            (n, x.dtype, x.device, float(x.double().sum()), float(x.double().square().sum()))
            for n, x in tensors
        )
    hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in t.model.modules()
    )
    attrs = tuple(
        (k, id(v), tuple(map(id, v)) if isinstance(v, list) else ())
        for k, v in sorted(vars(t.adapter).items())
    )
    return state, t.model.training, hooks, tuple(t.tokens.tolist()), attrs


_SHARED: dict[tuple[str, torch.dtype], tuple[Tiny, tuple]] = {}


def _shared(name: str, dtype: torch.dtype) -> Tiny:
    """The session's one copy of ``(name, dtype)``, checked unchanged since it was built."""
    key = (name, dtype)
    if key not in _SHARED:
        built = make_tiny(name, dtype)
        _SHARED[key] = (built, fingerprint(built))
    t, expected = _SHARED[key]
    if fingerprint(t) != expected:
        del _SHARED[key]  # rebuilt for the next test, so one culprit fails one test
        raise AssertionError(
            f"shared tiny model {name}-{dtype} was changed by a test (weights, buffers, dtype, "
            "device, training mode, hooks, tokens or adapter attributes); a test that changes a "
            "model or its adapter must take a "
            "private copy from tiny_factory(name, dtype)"
        )
    return t


def _handed_out(name: str, dtype: torch.dtype) -> Iterator[Tiny]:
    yield _shared(name, dtype)
    _shared(name, dtype)  # after the test: still unchanged (fails this test's teardown if not)


@pytest.fixture(
    params=[(m, d) for m in TINY_MODELS for d in DTYPES],
    ids=[f"{m}-{d}" for m in TINY_MODELS for d in DTYPES],
)
def tiny(request: pytest.FixtureRequest) -> Iterator[Tiny]:
    """Every entry of ``TINY_MODELS`` in float32 and float64 (shared: read only)."""
    name, d = request.param
    yield from _handed_out(name, DTYPES[d])


@pytest.fixture(params=list(DTYPES), ids=list(DTYPES))
def llama(request: pytest.FixtureRequest) -> Iterator[Tiny]:
    """The plain tiny Llama (tied, GQA) in float32 and float64 (shared: read only)."""
    yield from _handed_out("llama-tied-gqa", DTYPES[request.param])


@pytest.fixture
def shared_tiny() -> Iterator[Callable[[str, torch.dtype], Tiny]]:
    """``shared_tiny(name, dtype)``: the session's copy of one entry (read only; checked after
    the test like ``tiny``)."""
    used: list[tuple[str, torch.dtype]] = []

    def get(name: str, dtype: torch.dtype) -> Tiny:
        used.append((name, dtype))
        return _shared(name, dtype)

    yield get
    for name, dtype in dict.fromkeys(used):
        _shared(name, dtype)


@pytest.fixture
def tiny_factory() -> Callable[[str, torch.dtype], Tiny]:
    """``tiny_factory(name, dtype)`` builds a fresh, private copy of one entry of
    ``TINY_MODELS`` (free to edit, move or cast)."""
    return make_tiny
