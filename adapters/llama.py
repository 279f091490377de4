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

from .base import Architecture, HookPoints, TransformerAdapter

# Hugging Face classes whose forward is exactly the block structure above.
_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
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
        attn = self._body.layers[layer].self_attn
        x = self._body.layers[layer].input_layernorm(resid)
        dh = self.arch.d_head
        q = attn.q_proj(x).unflatten(-1, (-1, dh))
        k = attn.k_proj(x).unflatten(-1, (-1, dh))
        v = attn.v_proj(x).unflatten(-1, (-1, dh))
        cos, sin = self._body.rotary_emb(x, positions[None])  # [1, T, dh]
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # broadcast over heads
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def head_outputs(self, layer: int, z: Tensor) -> Tensor:
        """``attn.l.hH = W_O[:, H] z_H (+ b_O / H)``: [..., H, dh] -> [..., H, d]."""
        o_proj = self._body.layers[layer].self_attn.o_proj
        w_o = o_proj.weight.view(self.arch.d_model, self.arch.n_heads, self.arch.d_head)
        out = torch.einsum("...hk,dhk->...hd", z, w_o)
        if o_proj.bias is not None:
            out = out + o_proj.bias / self.arch.n_heads
        return out

    def attn_output(self, layer: int, z: Tensor) -> Tensor:
        """``attn.l = o_proj(concat_H z_H)`` (fused): [..., H, dh] -> [..., d]."""
        return self._body.layers[layer].self_attn.o_proj(z.flatten(-2))

    def mlp(self, layer: int, resid: Tensor) -> Tensor:
        """SwiGLU: ``down(act(gate(x)) * up(x))``, x = post_attention_layernorm(z): [..., d]."""
        block = self._body.layers[layer]
        x = block.post_attention_layernorm(resid)
        mlp = block.mlp
        return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))

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
    def _centred_unembed(self, token: int) -> tuple[Tensor, float]:
        w_u = self._head.weight
        if not 0 <= token < w_u.shape[0]:
            raise ModelError(f"token {token} is outside the vocabulary [0, {w_u.shape[0]})")
        u = w_u[token] - w_u.mean(0)
        bias = self._head.bias
        const = 0.0 if bias is None else float(bias[token] - bias.mean())
        return u, const

    @torch.no_grad()
    def readout(self, token: int) -> tuple[Tensor, float]:
        """``w_i = G * (W_U[i] - mean_j W_U[j])``, ``const_i = 0`` (+ a centred lm_head bias)."""
        u, const = self._centred_unembed(token)
        return self._body.norm.weight * u, const

    @torch.no_grad()
    def centred_logit(self, resid: Tensor, token: int) -> Tensor:
        """``norm(z) . (W_U[i] - mean_j W_U[j])`` through the model's own final norm (Eq 9)."""
        u, const = self._centred_unembed(token)
        return self._body.norm(resid) @ u + const

    # ---- hooks for the naive oracle ------------------------------------------------------
    def hook_points(self, layer: int) -> HookPoints:
        block = self._body.layers[layer]
        return HookPoints(block, block.self_attn, block.mlp, block.self_attn.o_proj)

    def final_norm_module(self) -> nn.Module:
        return self._body.norm


def _rotate_half(x: Tensor) -> Tensor:
    """``[x1 | x2] -> [-x2 | x1]`` over the last dimension (Llama's rotary convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
