"""The Llama family (Llama, Mistral, Qwen2, SmolLM2) as a residual stream of sites.

The residual stream, block by block (pre-norm, sequential residual, RMSNorm everywhere)::

    z^0    = embed_tokens[x_t]                                                   (embed)
    q,k,v  = rotary( {q,k,v}_proj( input_layernorm(z^{l-1}) ) )      (GQA: Hkv <= H heads)
    a^l    = o_proj( softmax(q k^T / sqrt(dh) + causal mask) v )                 (attn.l, Eq 5)
    m^l    = down( silu(gate(x)) * up(x) ),  x = post_attention_layernorm(z^{l-1} + a^l)
                                                                                 (mlp.l, Eq 6)
    z^l    = z^{l-1} + a^l + m^l                                                 (Eq 4)
    pi_t   = (G * z^L_t / sigma) W_U^T,  sigma = sqrt(mean(z^L_t ** 2) + eps)   (Eqs 3, 8)

RMSNorm with gain G, so the readout (Eqs 9, 10, 24-28) is ``w_i = G * (W_U[i] - mean_j W_U[j])``
and ``const_i = 0``. The norms, projections and the rotary embedding are the Hugging Face
model's own modules, called by reference (weights never copied), so every number follows the
model's floating-point path: note that Hugging Face's RMSNorm computes in float32 even for a
float64 model, and so does sigma here. Qwen2's q/k/v biases and Llama's optional
``attention_bias`` / ``mlp_bias`` live in those modules; an ``o_proj`` bias is split equally over
the heads. Sliding-window attention (Mistral, Qwen2 ``use_sliding_window``) is honoured per layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from causalnet.errors import ModelError

from . import kernels
from .base import (
    Architecture,
    CleanRun,
    FinalStep,
    HookPoints,
    TransformerAdapter,
)
from .blocks import linear_head_outputs, rotate_half
from .readout import accumulation_dtype, centred_unembed

# Hugging Face classes whose forward is exactly the block structure above.
_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# The families' RMSNorm classes: weight * (x / sqrt(mean(x ** 2) + eps)) computed in float32.
_RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"})
# Config switches of neighbouring families that change the math; refused if set.
_REFUSED_SWITCHES = (
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "logits_scaling",
    "embedding_multiplier",
    "residual_multiplier",
    "attention_multiplier",
)


class LlamaAdapter(TransformerAdapter):
    """``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` seen as sites.

    Checked, not assumed: the model class and ``model_type``; every layer's attention scale is
    ``head_dim ** -0.5``; ``pretraining_tp == 1``; no soft-capping or muP multipliers; the
    rotary module's output has the head size. Anything else is refused with ModelError.
    The model is put in eval mode.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in _CLASSES or type(model).__name__ != _CLASSES[model_type]:
            raise ModelError(
                f"LlamaAdapter needs one of {sorted(_CLASSES.values())}, got "
                f"{type(model).__name__} (model_type={model_type!r})"
            )
        for key in _REFUSED_SWITCHES:
            if getattr(config, key, None) not in (None, 1, 1.0):
                raise ModelError(f"LlamaAdapter: config.{key}={getattr(config, key)!r} is refused")
        if getattr(config, "pretraining_tp", 1) not in (None, 1):
            raise ModelError(f"LlamaAdapter: pretraining_tp={config.pretraining_tp} is refused")
        body = model.model
        first = body.layers[0].self_attn
        d_head = int(first.head_dim)
        n_heads, n_kv = int(config.num_attention_heads), int(config.num_key_value_heads)
        if n_heads % n_kv:
            raise ModelError(f"LlamaAdapter: {n_heads} heads not divisible by {n_kv} kv heads")
        for layer, block in enumerate(body.layers):
            scale = float(block.self_attn.scaling)
            if abs(scale - d_head**-0.5) > 1e-12 * d_head**-0.5:
                raise ModelError(
                    f"LlamaAdapter: layer {layer} attention scale {scale} != head_dim ** -0.5"
                )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self._body = body
        self._head = model.get_output_embeddings()
        self.arch = Architecture(
            family=model_type,
            n_layers=int(config.num_hidden_layers),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            d_model=int(config.hidden_size),
            d_head=d_head,
            vocab_size=int(self._head.weight.shape[0]),
            parallel_residual=False,
            norm="rms",
        )
        self.attn_scale = d_head**-0.5
        self._windows = [self._window_of(layer) for layer in range(self.arch.n_layers)]

    def _window_of(self, layer: int) -> int | None:
        """Mistral: config.sliding_window on every layer; Qwen2: the attention module's own."""
        if self.arch.family == "mistral":
            return getattr(self.config, "sliding_window", None)
        return getattr(self._body.layers[layer].self_attn, "sliding_window", None)

    def attention_window(self, layer: int) -> int | None:
        return self._windows[layer]

    # ---- the family's blocks -------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        """``z^0 = embed_tokens[x]`` (no position embedding: positions enter by rotary)."""
        return self._body.embed_tokens(tokens)

    def qkv(self, layer: int, resid: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v from ``input_layernorm(z)``, with the model's rotary embedding on q and k.

        resid [..., T, d], positions [T] -> q [..., T, H, dh], k and v [..., T, Hkv, dh].
        Rotary: x * cos + rotate_half(x) * sin, cos/sin from ``model.model.rotary_emb``.
        """
        q, k, v = self._qkv_unrotated(layer, resid)
        cos, sin = self._body.rotary_emb(resid, positions[None])  # [1, T, dh]
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # broadcast over heads
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def _qkv_unrotated(self, layer: int, resid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [..., H, dh], k and v [..., Hkv, dh] = {q,k,v}_proj(input_layernorm(z)), no rotary."""
        block = self._body.layers[layer]
        attn = block.self_attn
        x = _norm(block.input_layernorm, resid)
        dh = self.arch.d_head
        q = _linear(attn.q_proj, x).unflatten(-1, (-1, dh))
        k = _linear(attn.k_proj, x).unflatten(-1, (-1, dh))
        v = _linear(attn.v_proj, x).unflatten(-1, (-1, dh))
        return q, k, v

    def head_outputs(self, layer: int, z: Tensor) -> Tensor:
        """``attn.l.hH = W_O[:, H] z_H (+ b_O / H)``: [..., H, dh] -> [..., H, d]."""
        o_proj = self._body.layers[layer].self_attn.o_proj
        return linear_head_outputs(o_proj, z, self.arch.n_heads)

    def attn_output(self, layer: int, z: Tensor) -> Tensor:
        """``attn.l = o_proj(concat_H z_H)`` (fused): [..., H, dh] -> [..., d]."""
        return _linear(self._body.layers[layer].self_attn.o_proj, z.flatten(-2))

    def mlp(self, layer: int, resid: Tensor) -> Tensor:
        """SwiGLU: ``down(act(gate(x)) * up(x))``, x = post_attention_layernorm(z): [..., d].

        With SiLU and plain linear modules the activation and the gating are fused into the
        gate and up matrix multiplies (:mod:`causalnet.adapters.kernels`).
        """
        block = self._body.layers[layer]
        x = _norm(block.post_attention_layernorm, resid)
        mlp = block.mlp
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        if type(mlp.act_fn).__name__ in ("SiLUActivation", "SiLU") and all(
            _plain_linear(m) for m in (gate, up, down)
        ):
            g = kernels.linear_silu(x, gate.weight, gate.bias)
            h = kernels.linear_mul(x, g, up.weight, up.bias)
            return kernels.linear(h, down.weight, down.bias)
        return down(mlp.act_fn(gate(x)) * up(x))

    def final_scale(self, resid: Tensor) -> Tensor:
        """``sigma = 1 / rsqrt(mean(z^2) + eps)`` in float32, as Hugging Face's RMSNorm."""
        norm = self._body.norm
        z = resid.to(torch.float32)
        inv = torch.rsqrt(z.pow(2).mean(-1) + norm.variance_epsilon)
        return (1.0 / inv).to(resid.dtype)

    def logits(self, resid: Tensor) -> Tensor:
        """``pi = norm(z) W_U^T`` (Eq 3) through the model's own final norm and lm_head."""
        return self._head(self._body.norm(resid))

    @torch.no_grad()
    def readout(self, token: int) -> tuple[Tensor, float]:
        """``w_i = G * (W_U[i] - mean_j W_U[j])``, ``const_i = 0`` (+ a centred lm_head bias)."""
        u, const = centred_unembed(self._head.weight, self._head.bias, token)
        return self._body.norm.weight * u, const

    @torch.no_grad()
    def centred_logit(self, resid: Tensor, token: int) -> Tensor:
        """``norm(z) . (W_U[i] - mean_j W_U[j])`` through the model's own final norm (Eq 9)."""
        u, const = centred_unembed(self._head.weight, self._head.bias, token)
        return self._body.norm(resid) @ u + const

    # ---- the patch engine's inner loop -----------------------------------------------------
    def _final_step(self, clean: CleanRun) -> FinalStep:
        """:class:`LlamaFinalStep` where its shortcuts are exact (this class's own block
        methods, not a subclass's; rotary tables with equal halves), else the generic step."""
        own = all(
            getattr(type(self), name) is getattr(LlamaAdapter, name)
            for name in ("qkv", "_qkv_unrotated", "attn_output", "head_outputs", "mlp")
        )
        if own:
            # the rotation tables in the readout precision (float32 for half models)
            probe = clean.readout_dir.new_zeros(1, dtype=accumulation_dtype(self.dtype))
            cos, sin = self._body.rotary_emb(
                probe, torch.tensor([[clean.position]]).to(probe.device)
            )
            cos, sin = cos[0, 0], sin[0, 0]
            half = cos.shape[-1] // 2
            if torch.equal(cos[:half], cos[half:]) and torch.equal(sin[:half], sin[half:]):
                return LlamaFinalStep(self, clean, cos, sin)
        return super()._final_step(clean)

    # ---- hooks for the naive oracle ------------------------------------------------------
    def hook_points(self, layer: int) -> HookPoints:
        block = self._body.layers[layer]
        return HookPoints(block, block.self_attn, block.mlp, block.self_attn.o_proj)

    def final_norm_module(self) -> nn.Module:
        return self._body.norm


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` would run more than its own forward (hooks, accelerate)."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or getattr(module, "_hf_hook", None)
    )


def _plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and not _hooked(module)


def _linear(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` for an ``nn.Linear``, on :func:`causalnet.adapters.kernels.linear` when the
    module is a plain one (else the module's own call)."""
    if _plain_linear(module):
        return kernels.linear(x, module.weight, module.bias)
    return module(x)


def _norm(norm: nn.Module, x: Tensor) -> Tensor:
    """The model's RMSNorm ``weight * x / sqrt(mean(x ** 2) + eps)``: in float32 by
    ``torch.rms_norm`` (one fused pass, equal to the module's float32 arithmetic), otherwise by
    the module itself (which computes in float32 and casts back)."""
    w = getattr(norm, "weight", None)
    plain = type(norm).__name__ in _RMS_NORMS and not _hooked(norm) and w is not None
    if plain and x.dtype == torch.float32 and w.dtype == torch.float32:
        return torch.rms_norm(x, (x.shape[-1],), w, norm.variance_epsilon)
    return norm(x)


class LlamaFinalStep(FinalStep):
    """The patch engine's inner loop for the Llama family, rotary folded into the prefix.

    Rotary at position p is x -> R_p x with R_p x = x * cos_p + rotate_half(x) * sin_p, a
    rotation of each pair (j, j + dh/2) scaled by sqrt(cos^2 + sin^2) when the cos/sin tables
    have equal halves (checked). So for the rows' query and key at t and a clean key k_s (cached
    already rotated, k_s = R_s k'_s):

        (R_t q) . k_s       = q . (R_t^T k_s),      R_t^T y = y * cos_t - rotate_half(y) * sin_t
        (R_t q) . (R_t k)   = sum_j q_j k_j D_j,    D = cos_t^2 + sin_t^2   (1 for plain RoPE)

    The rows' q and k are therefore never rotated: the clean prefix keys are rotated back once
    per layer (:meth:`prefix_keys`) and the self score carries D (:meth:`self_score_weight`).
    Per-head direct effects (head granularity) never form the [N, H, d] contributions:
    contrib_h . w_i = z_h . (W_O[:, h]^T w_i) + (b_O . w_i) / H.
    """

    def __init__(self, adapter: LlamaAdapter, clean: CleanRun, cos: Tensor, sin: Tensor) -> None:
        super().__init__(adapter, clean)
        self.llama = adapter
        self.cos, self.sin = cos, sin
        self.weight = (cos * cos + sin * sin).to(adapter.dtype)

    def rows_qkv(self, layer: int, resid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.llama._qkv_unrotated(layer, resid)

    def prefix_keys(self, layer: int, keys: Tensor) -> Tensor:
        k = keys.to(self.cos.dtype)
        return (k * self.cos - rotate_half(k) * self.sin).to(keys.dtype)

    def self_score_weight(self, layer: int) -> Tensor | None:
        return self.weight

    def attention(self, layer: int, resid: Tensor, per_head: bool) -> tuple[Tensor, Tensor | None]:
        zh = self.heads(layer, resid)  # [N, H, dh]
        a = self.llama.attn_output(layer, zh)
        if not per_head:
            return a, None
        o_proj = self.llama._body.layers[layer].self_attn.o_proj
        arch = self.llama.arch
        w_o = o_proj.weight.view(arch.d_model, arch.n_heads, arch.d_head)
        acc = accumulation_dtype(zh.dtype)
        w = self.readout_dir.to(acc)
        u = torch.einsum("dhk,d->hk", w_o.to(acc), w)  # W_O[:, h]^T w_i, [H, dh]
        num = (zh.to(acc) * u).sum(-1)
        if o_proj.bias is not None:
            num = num + (o_proj.bias.to(acc) @ w) / arch.n_heads
        return a, num
