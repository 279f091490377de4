"""The ONE registry of tiny test models (seeded random weights, no download) that every shared
adapter test iterates: ``TINY_MODELS`` maps an id to a :class:`TinySpec` with the model's facts
(builder, hand-written adapter, residual wiring, heads under a post-attention norm, tolerances,
whether the costly sweeps run on it). ``conftest.py`` hands the models out as fixtures
(``tiny``, ``llama``, ``shared_tiny``, ``tiny_factory``); test modules import the facts from here
(``from tiny_models import TINY_MODELS``).

HOW TO ADD A MODEL: add a :class:`TinySpec`; the shared tests (``test_base.py``,
``test_fast_paths.py``, ``test_generic_vs_families.py``; ``representative`` ones also in
``test_device_dtypes.py`` and ``test_scm_view.py``) then run on it unchanged. ``_build`` seeds
the init, puts the model in eval mode and randomises every 1-D parameter (norm gains around 1,
biases around 0), so that gains and biases are exercised, not left at 1 and 0. Its adapter must
implement ``hook_points`` / ``final_norm_module`` for the naive oracle (``adapters/naive.py``).

Tolerances (max abs difference): float32 1e-4 for logits and patches vs Hugging Face and the
naive hooked re-forward, 1e-5 for identities of the adapter's own arithmetic. In float64 the
defaults are 1e-10 (logits), 1e-9 (patches), 1e-12 (own arithmetic); a model whose norms
Hugging Face computes in float32 even in a float64 model states a looser float64 tolerance in
its spec, with the reason (``tol_reason``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
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


def decoder_prompt(length: int, vocab: int = 64, seed: int = 3) -> torch.Tensor:
    """A seeded prompt of ``length`` token ids in [3, vocab) for the DECODER_SIZES models."""
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed))


#: The sizes of the tiny decoders that the discovery and fast-path tests build from Hugging Face
#: configs (Llama, Qwen3, Mixtral ...): two layers of width 32, four heads sharing two key/value
#: heads; each test adds what its family needs
DECODER_SIZES = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    vocab_size=64,
    max_position_embeddings=64,
)
DTYPES = {"f32": torch.float32, "f64": torch.float64}

RMS_IN_F32 = (
    "Hugging Face's RMSNorm normalises in float32 even in a float64 model, so where the exact "
    "linear decomposition meets the model's own logits they differ by float32 rounding"
)
GEMMA_NORMS = (
    "Gemma's RMSNorms compute in float32 even in a float64 model: the head shares sum to attn.l "
    "(and a head patch's o' reaches the renormalised logit) only to float32 rounding"
)


@dataclass(frozen=True)
class TinySpec:
    """One tiny model of the registry and the facts the shared tests need about it."""

    build: Callable[[], nn.Module]  # () -> a seeded Hugging Face causal LM in eval mode
    adapter: str  # the hand-written adapter class adapt() picks
    parallel: bool  # attention and MLP read the same residual (Architecture.parallel_residual)
    post_norm_heads: bool = False  # heads are shares of attn.l under a post-attention norm
    representative: bool = False  # one per adapter and residual wiring: the costly sweeps
    f64_logit_tol: float = 1e-10  # float64: the exact decomposition vs the model's own logits
    f64_patch_tol: float = 1e-9  # float64: fast patch vs the naive hooked re-forward
    # float64: where a norm inside the blocks rounds to float32 (Gemma), its outputs differ by
    # that rounding between two computation orders: heads vs their layer, a no-op patch, the
    # fast path vs a block-method re-forward
    f64_norm_tol: float = 1e-11
    tol_reason: str = ""  # why a float64 tolerance is looser than the default


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


def build_neox(seed: int = 0, **overrides: object) -> GPTNeoXForCausalLM:
    """The registry's tiny GPT-NeoX (parallel residual unless ``use_parallel_residual=False``,
    rotary on 1/4 of each head), its config changed by ``overrides``; seeded, see :func:`_build`."""
    config = dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=96,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        rotary_pct=0.25,
        use_parallel_residual=True,
        initializer_range=0.15,
        bos_token_id=0,
        eos_token_id=0,
    )
    config.update(overrides)
    return _build(GPTNeoXForCausalLM, GPTNeoXConfig(**config), seed)


def gptj_config(**overrides: object) -> GPTJConfig:
    """The registry's tiny GPT-J config (rotary on the first 8 of 16 dims per head), changed by
    ``overrides``."""
    config = dict(
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
    )
    config.update(overrides)
    return GPTJConfig(**config)


def build_gemma3(dtype: torch.dtype = torch.float32, **overrides: object) -> Gemma3ForCausalLM:
    """A tiny seeded Gemma 3: grouped key/value heads, q/k norms, attention biases, a sliding
    window of 3 on layers 0 and 2 (shorter than the 7-token prompt), separate rotary tables per
    layer type, every norm gain (used as 1 + g) and bias randomised around 0."""
    config = dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=96,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        sliding_window=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=16,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
        attention_bias=True,
        initializer_range=0.15,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    config.update(overrides)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**config))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norm gains (used as 1 + g) and biases, randomised
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval().to(dtype)


TINY_MODELS: dict[str, TinySpec] = {
    # Llama, tied embeddings, GQA (4 heads share 2 key/value heads)
    "llama-tied-gqa": TinySpec(
        lambda: _build(LlamaForCausalLM, LlamaConfig(**_llama_config(tie_word_embeddings=True))),
        adapter="LlamaAdapter",
        parallel=False,
        representative=True,
        f64_logit_tol=1e-6,
        tol_reason=RMS_IN_F32,
    ),
    # Llama, untied lm_head, biases on every projection (o_proj bias split over heads)
    "llama-untied-bias": TinySpec(
        lambda: _build(
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
        adapter="LlamaAdapter",
        parallel=False,
        f64_logit_tol=1e-6,
        tol_reason=RMS_IN_F32,
    ),
    # Qwen2: q/k/v biases, untied
    "qwen2-bias": TinySpec(
        lambda: _build(Qwen2ForCausalLM, Qwen2Config(**_llama_config(tie_word_embeddings=False))),
        adapter="LlamaAdapter",
        parallel=False,
        f64_logit_tol=1e-6,
        tol_reason=RMS_IN_F32,
    ),
    # Mistral with a sliding window shorter than the prompt, 1 key/value head (MQA)
    "mistral-window": TinySpec(
        lambda: _build(
            MistralForCausalLM,
            MistralConfig(**_llama_config(sliding_window=3, num_key_value_heads=1)),
        ),
        adapter="LlamaAdapter",
        parallel=False,
        f64_logit_tol=1e-6,
        tol_reason=RMS_IN_F32,
    ),
    # GPT-2: learned positions, LayerNorm, Conv1D, c_proj bias split over heads, tied; the
    # extra 1 / (l + 1) attention scale of scale_attn_by_inverse_layer_idx
    "gpt2-inverse-layer-idx": TinySpec(
        lambda: _build(
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
        adapter="GPT2Adapter",
        parallel=False,
        representative=True,
    ),
    # GPT-NeoX / Pythia: parallel residual, per-head interleaved fused qkv, rotary on 1/4 of
    # each head, untied embed_out
    "neox-parallel": TinySpec(
        lambda: build_neox(use_parallel_residual=True),
        adapter="NeoXAdapter",
        parallel=True,
        representative=True,
    ),
    # GPT-NeoX with the sequential residual
    "neox-sequential": TinySpec(
        lambda: build_neox(use_parallel_residual=False),
        adapter="NeoXAdapter",
        parallel=False,
        representative=True,
    ),
    # GPT-J: one ln_1 read by attention and MLP in parallel, rotary on adjacent pairs of the
    # first 8 of 16 dims per head, no attention biases, untied lm_head with a bias
    "gptj-partial-rotary": TinySpec(
        lambda: _build(GPTJForCausalLM, gptj_config()),
        adapter="GPTJAdapter",
        parallel=True,
        representative=True,
    ),
    # Gemma 3: norms after both sublayers, heads as shares of attn.l at the post-attention
    # norm's scale (a head patch recomputes that norm), q/k norms, GQA, attention biases,
    # sliding windows, per-layer-type rotary tables
    "gemma3-post-norms": TinySpec(
        build_gemma3,
        adapter="GemmaAdapter",
        parallel=False,
        post_norm_heads=True,
        representative=True,
        f64_logit_tol=1e-6,
        f64_patch_tol=1e-5,
        f64_norm_tol=1e-6,
        tol_reason=GEMMA_NORMS,
    ),
}

REPRESENTATIVE = [name for name, spec in TINY_MODELS.items() if spec.representative]


@dataclass
class Tiny:
    """One tiny model in one dtype, with its adapter, its spec and a seeded prompt."""

    name: str
    dtype: torch.dtype
    model: nn.Module
    adapter: TransformerAdapter
    tokens: Tensor  # [PROMPT_LEN] int64
    spec: TinySpec

    def _tol(self, f32: float, f64: float) -> float:
        return f32 if self.dtype != torch.float64 else f64

    @property
    def logit_atol(self) -> float:
        """Forward logits vs Hugging Face."""
        return self._tol(1e-4, 1e-10)

    @property
    def decomposition_atol(self) -> float:
        """Direct effects + constant vs the model's own centred logit."""
        return self._tol(1e-4, self.spec.f64_logit_tol)

    @property
    def patch_atol(self) -> float:
        """Fast patch vs the naive hooked re-forward."""
        return self._tol(1e-4, self.spec.f64_patch_tol)

    @property
    def own_atol(self) -> float:
        """Identities of the adapter's own arithmetic (no Hugging Face norm in between)."""
        return self._tol(1e-5, 1e-12)

    @property
    def norm_atol(self) -> float:
        """Heads vs their layer's attention output; a no-op patch changes nothing; two orders of
        computing the same run (float32 rounding of the blocks' norms where there is some)."""
        return self._tol(1e-4, self.spec.f64_norm_tol)


def make_tiny(name: str, dtype: torch.dtype) -> Tiny:
    """A fresh (private) copy of one entry of ``TINY_MODELS`` in ``dtype``."""
    spec = TINY_MODELS[name]
    model = spec.build().to(dtype)
    gen = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, VOCAB, (PROMPT_LEN,), generator=gen)
    return Tiny(name, dtype, model, adapt(model), tokens, spec)
