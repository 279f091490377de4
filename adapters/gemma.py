"""Gemma 3 (``Gemma3ForCausalLM``, text) as a residual stream of sites: norms after the sublayers.

The residual stream, block by block (Gemma's RMSNorm ``n(x) = x / sigma(x) * (1 + g)`` computed
in float32 everywhere)::

    z^0    = embed_tokens[x_t] * sqrt(d)                                          (embed)
    q,k,v  = {q,k,v}_proj( input_layernorm(z^{l-1}) );  q, k <- rotary(q_norm(q)), rotary(k_norm(k))
    a^l    = post_attention_layernorm( o_proj( softmax(q k^T * s + mask) v ) )   (attn.l)
    m^l    = post_feedforward_layernorm( down( gelu(gate(x)) * up(x) ) ),
             x = pre_feedforward_layernorm(z^{l-1} + a^l)                         (mlp.l)
    z^l    = z^{l-1} + a^l + m^l                                                  (Eq 4)
    pi_t   = norm(z^L_t) W_U^T                                                    (Eq 3, tied)

A site's value is what it adds to the residual stream, so attn.l and mlp.l are the *normed*
sublayer outputs (the project's convention for norms after the sublayer). The norm after the
attention mixes the heads (its scale depends on all of them), so no head has an additive share
of attn.l: head granularity is refused (``arch.sublayer_norms``). ``s`` is
``query_pre_attn_scalar ** -0.5``; the layers alternate sliding-window and full attention
(``layer_types``), each with its own rotary tables, taken from the model's rotary module.
The readout (Eqs 9, 10, 24-28) is ``w_i = (1 + G) * (W_U[i] - mean_j W_U[j])``, ``const_i = 0``.
Soft-capped attention or final logits (Gemma 2) are refused: the final cap is not linear, so
direct effects would not sum to the logit.

Weights are read from the Hugging Face modules by reference at every call, never copied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from causalnet.errors import ModelError

from .base import (
    Architecture,
    HookPoints,
    TransformerAdapter,
    linear_head_outputs,
    rotate_half,
)
from .gpt2 import _centred_unembed

#: Rope types whose cos/sin tables depend on the position only (not on the sequence length).
_STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)


def _check_modules(body: nn.Module) -> None:
    """Refuse a model whose layers are not the plain modules this file's math describes."""
    norm_class = type(body.norm)
    if norm_class.__name__ != "Gemma3RMSNorm":
        raise ModelError(f"GemmaAdapter: norm is a {norm_class.__name__}, expected Gemma3RMSNorm")
    for i, layer in enumerate(body.layers):
        attn = layer.self_attn
        parts = {name: (getattr(layer, name), norm_class) for name in _NORMS}
        parts |= {f"self_attn.{n}": (getattr(attn, n), norm_class) for n in ("q_norm", "k_norm")}
        projections = ("q_proj", "k_proj", "v_proj", "o_proj")
        parts |= {f"self_attn.{n}": (getattr(attn, n), nn.Linear) for n in projections}
        for name, (module, kind) in parts.items():
            if type(module) is not kind:
                raise ModelError(
                    f"GemmaAdapter: layers.{i}.{name} is a {type(module).__name__}, expected "
                    f"{kind.__name__}"
                )


class GemmaAdapter(TransformerAdapter):
    """``Gemma3ForCausalLM`` seen as the sites ``embed``, ``attn.l``, ``mlp.l`` (no heads).

    Read from the config, not assumed: ``head_dim``, grouped key/value heads, ``layer_types``
    with ``sliding_window``, the rotary tables per layer type, ``query_pre_attn_scalar``,
    ``attention_bias``, ``hidden_activation`` (through the model's MLP module). Refused:
    ``attn_logit_softcapping``, ``final_logit_softcapping``, bidirectional attention, rope types
    whose tables depend on the sequence length.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        body = getattr(model, "model", None)
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) != "gemma3_text" or body is None:
            raise ModelError(
                f"GemmaAdapter needs a Gemma3ForCausalLM, got {type(model).__name__} "
                f"(model_type={getattr(config, 'model_type', None)!r})"
            )
        for switch in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, switch, None) is not None:
                raise ModelError(
                    f"GemmaAdapter: {switch}={getattr(config, switch)} is not supported (a tanh "
                    "cap is not linear: direct effects would not sum to the logit)"
                )
        if getattr(config, "use_bidirectional_attention", False):
            raise ModelError("GemmaAdapter: use_bidirectional_attention is not causal; refused")
        layer_types = list(config.layer_types)
        for kind in sorted(set(layer_types)):
            rope_type = config.rope_parameters[kind].get("rope_type", "default")
            if rope_type not in _STATIC_ROPE_TYPES:
                raise ModelError(
                    f"GemmaAdapter: rope_type {rope_type!r} of the {kind} layers is not supported "
                    f"(its tables depend on the sequence length of each call); supported: "
                    f"{sorted(_STATIC_ROPE_TYPES)}"
                )
        head = model.get_output_embeddings()
        if head is None or tuple(head.weight.shape) != (config.vocab_size, config.hidden_size):
            raise ModelError("GemmaAdapter: the model has no [vocab, d] unembedding (lm_head)")
        _check_modules(body)

        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self._body = body
        self._head = head
        self._layer_types = layer_types
        self.arch = Architecture(
            family="gemma3",
            n_layers=config.num_hidden_layers,
            n_heads=config.num_attention_heads,
            n_kv_heads=config.num_key_value_heads,
            d_model=config.hidden_size,
            d_head=config.head_dim,
            vocab_size=config.vocab_size,
            parallel_residual=False,
            norm="rms",
            sublayer_norms=True,
        )
        # The scale the attention module itself uses (query_pre_attn_scalar ** -0.5).
        self.attn_scale = float(body.layers[0].self_attn.scaling)

    # ---- the family's blocks -------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        """``z^0_t = embed_tokens[x_t] * sqrt(d)`` (the model's scaled embedding module)."""
        return self._body.embed_tokens(tokens)

    def attention_window(self, layer: int) -> int | None:
        """``sliding_window`` for ``sliding_attention`` layers, None for full attention."""
        if self._layer_types[layer] == "sliding_attention":
            return int(self.config.sliding_window)
        return None

    def qkv(self, layer: int, resid: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q = rotary(q_norm(q_proj(x)))``, ``k = rotary(k_norm(k_proj(x)))``, ``v = v_proj(x)``
        with x = input_layernorm(z), the layer type's rotary tables: [..., T, H or Hkv, dh]."""
        block = self._body.layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(resid)
        d_head = self.arch.d_head
        q = attn.q_norm(attn.q_proj(x).unflatten(-1, (-1, d_head)))
        k = attn.k_norm(attn.k_proj(x).unflatten(-1, (-1, d_head)))
        v = attn.v_proj(x).unflatten(-1, (-1, d_head))
        cos, sin = self._body.rotary_emb(x, positions.reshape(1, -1), self._layer_types[layer])
        cos, sin = cos[0].unsqueeze(-2), sin[0].unsqueeze(-2)  # [T, 1, dh] against [..., T, H, dh]
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def head_outputs(self, layer: int, z: Tensor) -> Tensor:
        """``o_proj``'s per-head terms ``W_O[:, H] z_H (+ b_O / H)`` [..., H, d], before the norm.

        They sum to o_proj's output, not to attn.l (the norm after it mixes them), so they are
        never a site's value here (head granularity is refused).
        """
        o_proj = self._body.layers[layer].self_attn.o_proj
        return linear_head_outputs(o_proj, z, self.arch.n_heads)

    def attn_output(self, layer: int, z: Tensor) -> Tensor:
        """``attn.l = post_attention_layernorm(o_proj(concat_H z_H))``: [..., H, dh] -> [..., d]."""
        block = self._body.layers[layer]
        return block.post_attention_layernorm(block.self_attn.o_proj(z.flatten(-2)))

    def mlp(self, layer: int, resid: Tensor) -> Tensor:
        """``mlp.l = post_feedforward_layernorm(mlp(pre_feedforward_layernorm(z)))``: [..., d]."""
        block = self._body.layers[layer]
        return block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(resid)))

    def final_scale(self, resid: Tensor) -> Tensor:
        """``sigma = 1 / rsqrt(mean(z^2) + eps)`` in float32, as Gemma's RMSNorm."""
        z = resid.to(torch.float32)
        inv = torch.rsqrt(z.pow(2).mean(-1) + self._body.norm.eps)
        return (1.0 / inv).to(resid.dtype)

    def logits(self, resid: Tensor) -> Tensor:
        """``pi = norm(z) W_U^T`` (Eq 3) through the model's own final norm and lm_head."""
        return self._head(self._body.norm(resid))

    @torch.no_grad()
    def readout(self, token: int) -> tuple[Tensor, float]:
        """``w_i = (1 + G) * (W_U[i] - mean_j W_U[j])``, ``const_i = 0`` (no lm_head bias)."""
        u, const = _centred_unembed(self._head.weight, self._head.bias, token)
        return (1.0 + self._body.norm.weight) * u, const

    @torch.no_grad()
    def centred_logit(self, resid: Tensor, token: int) -> Tensor:
        """``norm(z) . (W_U[i] - mean_j W_U[j])`` through the model's own final norm (Eq 9)."""
        u, const = _centred_unembed(self._head.weight, self._head.bias, token)
        return self._body.norm(resid) @ u + const

    # ---- hooks for the naive oracle ------------------------------------------------------
    def hook_points(self, layer: int) -> HookPoints:
        """``(layers[l], .post_attention_layernorm, .post_feedforward_layernorm, .o_proj)``:
        the two post-norms' outputs are what the sublayers add to the residual stream."""
        block = self._body.layers[layer]
        return HookPoints(
            block=block,
            attn=block.post_attention_layernorm,
            mlp=block.post_feedforward_layernorm,
            o_proj=block.self_attn.o_proj,
        )

    def final_norm_module(self) -> nn.Module:
        """``model.norm``, whose input is z^L."""
        return self._body.norm
