"""GPT-NeoX / Pythia (``GPTNeoXForCausalLM``) as a residual stream of sites.

The residual stream, block by block (LayerNorm everywhere, partial rotary embedding)::

    z^0  = embed_in[x_t]                                                     (embed)
    a^l  = dense( Attn( rotary( query_key_value( ln1(z^{l-1}) ) ) ) )        (attn.l, Eq 5)
    parallel residual (use_parallel_residual=True, Pythia):
        m^l = mlp( ln2(z^{l-1}) )              -- both blocks read the same residual
    sequential residual (use_parallel_residual=False):
        m^l = mlp( ln2(z^{l-1} + a^l) )                                      (mlp.l, Eq 6)
    z^l  = z^{l-1} + a^l + m^l                                               (Eq 4)
    pi_t = final_layer_norm(z^L_t) W_U^T (+ bias)                            (Eq 3, W_U untied)

``query_key_value`` is fused per head: its output viewed as [..., H, 3 * dh] is
``[q_H | k_H | v_H]`` for each head H (interleaved by head, not [q | k | v]). The rotary
embedding covers the first ``rotary_ndims = int(dh * partial_rotary_factor)`` dimensions of each
head (``rotary_pct``) and is taken from the model's own rotary module, so that the cos/sin
tables (and any rope scaling) are exactly the model's. The ``dense`` bias is split equally over
the heads, so ``attn.l = sum_H attn.l.hH``. The readout (Eqs 9, 10, 24-28) is the LayerNorm one:
``w_i = centre(g * u_i)``, ``const_i = b . u_i (+ beta_i - mean(beta))``.

Weights are read from the Hugging Face modules by reference at every call, never copied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers.activations import ACT2FN

from causalnet.errors import ModelError

from .base import Architecture, HookPoints, TransformerAdapter
from .blocks import layer_norm, linear_head_outputs, rotate_half
from .readout import LayerNormHead

#: Rope types whose cos/sin tables depend on the position only (not on the sequence length).
_STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})


def _check_modules(body: nn.Module) -> None:
    """Refuse a model whose layers are not the plain modules this file's math describes."""
    for i, layer in enumerate(body.layers):
        parts = {
            "input_layernorm": (layer.input_layernorm, nn.LayerNorm),
            "post_attention_layernorm": (layer.post_attention_layernorm, nn.LayerNorm),
            "attention.query_key_value": (layer.attention.query_key_value, nn.Linear),
            "attention.dense": (layer.attention.dense, nn.Linear),
            "mlp.dense_h_to_4h": (layer.mlp.dense_h_to_4h, nn.Linear),
            "mlp.dense_4h_to_h": (layer.mlp.dense_4h_to_h, nn.Linear),
        }
        for name, (module, kind) in parts.items():
            if type(module) is not kind:
                raise ModelError(
                    f"NeoXAdapter: layers.{i}.{name} is a {type(module).__name__}, expected "
                    f"{kind.__name__}"
                )
    if type(body.final_layer_norm) is not nn.LayerNorm:
        raise ModelError("NeoXAdapter: final_layer_norm is not a LayerNorm")


class NeoXAdapter(LayerNormHead, TransformerAdapter):
    """``GPTNeoXForCausalLM`` seen as the sites ``embed``, ``attn.l``, ``attn.l.hH``, ``mlp.l``.

    Read from the config, not assumed: ``use_parallel_residual`` (``arch.parallel_residual``),
    ``rope_parameters`` (``partial_rotary_factor`` / ``rotary_pct``, ``rope_theta``, rope scaling:
    all through the model's rotary module), ``attention_bias`` (biases read if present),
    ``hidden_act`` (``ACT2FN``), ``tie_word_embeddings`` (the unembedding is read from the output
    embedding module, tied or not, with its bias if it has one). A ``head_dim`` other than
    ``hidden_size / num_attention_heads`` is refused.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        body = getattr(model, "gpt_neox", None)
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) != "gpt_neox" or body is None:
            raise ModelError(
                f"NeoXAdapter needs a GPTNeoXForCausalLM, got {type(model).__name__} "
                f"(model_type={getattr(config, 'model_type', None)!r})"
            )
        d, n_heads = config.hidden_size, config.num_attention_heads
        if d % n_heads:
            raise ModelError(f"NeoXAdapter: hidden_size {d} is not divisible by {n_heads} heads")
        d_head = d // n_heads
        if getattr(config, "head_dim", None) not in (None, d_head):
            raise ModelError(
                f"NeoXAdapter: head_dim {config.head_dim} != hidden_size / num_attention_heads "
                f"= {d_head} is not supported"
            )
        if config.hidden_act not in ACT2FN:
            raise ModelError(f"NeoXAdapter: unknown hidden_act {config.hidden_act!r}")
        if not isinstance(config.use_parallel_residual, bool):
            raise ModelError(
                f"NeoXAdapter: use_parallel_residual must be a bool, "
                f"got {config.use_parallel_residual!r}"
            )
        head = model.get_output_embeddings()
        if head is None or tuple(head.weight.shape) != (config.vocab_size, d):
            raise ModelError("NeoXAdapter: the model has no [vocab, d] unembedding (embed_out)")
        rotary = getattr(body, "rotary_emb", None)
        if rotary is None:
            raise ModelError("NeoXAdapter: the model has no rotary embedding module (rotary_emb)")
        rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type not in _STATIC_ROPE_TYPES:
            raise ModelError(
                f"NeoXAdapter: rope_type {rope_type!r} is not supported (its tables depend on the "
                f"sequence length of each call); supported: {sorted(_STATIC_ROPE_TYPES)}"
            )
        _check_modules(body)

        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self._body = body
        self._head = head
        self._rotary = rotary
        self._act = ACT2FN[config.hidden_act]
        self.arch = Architecture(
            family="gpt_neox",
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=n_heads,
            d_model=d,
            d_head=d_head,
            vocab_size=config.vocab_size,
            parallel_residual=config.use_parallel_residual,
            norm="layer",
        )
        # The scale the attention module itself uses (head_size ** -0.5).
        self.attn_scale = float(body.layers[0].attention.scaling)

    # ---- the family's blocks -------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        """``z^0_t = embed_in[x_t]`` (no learned positions): [B, T] -> [B, T, d]."""
        return self._body.embed_in.weight[tokens]

    def _rotary_tables(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """The model's own cos/sin tables at ``positions``: [T, rotary_ndims] each."""
        cos, sin = self._rotary(x, positions.reshape(1, -1))
        return cos[0], sin[0]

    def qkv(self, layer: int, resid: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head fused projection, then partial rotary on q and k: [..., T, H, dh] each.

        ``qkv = query_key_value(ln1(z))`` viewed as [..., T, H, 3 * dh] and chunked into q, k, v;
        the first ``r`` dims of q and k are rotated, ``x_rot * cos + rotate_half(x_rot) * sin``.
        """
        block = self._body.layers[layer]
        x = layer_norm(block.input_layernorm, resid)
        proj = block.attention.query_key_value
        fused = F.linear(x, proj.weight, proj.bias)
        fused = fused.view(*x.shape[:-1], self.arch.n_heads, 3 * self.arch.d_head)
        q, k, v = fused.chunk(3, dim=-1)
        cos, sin = self._rotary_tables(x, positions)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [T, 1, r] against [..., T, H, dh]
        r = cos.shape[-1]
        q_rot, q_pass = q[..., :r], q[..., r:]
        k_rot, k_pass = k[..., :r], k[..., r:]
        q = torch.cat((q_rot * cos + rotate_half(q_rot) * sin, q_pass), dim=-1)
        k = torch.cat((k_rot * cos + rotate_half(k_rot) * sin, k_pass), dim=-1)
        return q, k, v

    def head_outputs(self, layer: int, z: Tensor) -> Tensor:
        """``attn.l.hH = z_H @ W_O[:, H]^T + b_O / H`` (dense's columns of head H): [..., H, d]."""
        dense = self._body.layers[layer].attention.dense
        return linear_head_outputs(dense, z, self.arch.n_heads)

    def attn_output(self, layer: int, z: Tensor) -> Tensor:
        """``attn.l = dense(concat_H z_H)``: [..., H, dh] -> [..., d]."""
        return self._body.layers[layer].attention.dense(z.flatten(-2))

    def mlp(self, layer: int, resid: Tensor) -> Tensor:
        """``mlp.l = dense_4h_to_h(act(dense_h_to_4h(ln2(z))))``: [..., d].

        ``resid`` is the residual the MLP reads: ``z^{l-1}`` (parallel) or ``z^{l-1} + a^l``.
        """
        block = self._body.layers[layer]
        x = layer_norm(block.post_attention_layernorm, resid)
        return block.mlp.dense_4h_to_h(self._act(block.mlp.dense_h_to_4h(x)))

    # ---- hooks for the naive oracle ----------------------------------------------------------
    def hook_points(self, layer: int) -> HookPoints:
        """``(layers[l], .attention, .mlp, .attention.dense)``: the layer's input is z^{l-1},
        the attention module's first output is attn.l, dense's input the heads' concatenation."""
        block = self._body.layers[layer]
        return HookPoints(
            block=block, attn=block.attention, mlp=block.mlp, o_proj=block.attention.dense
        )

    def final_norm_module(self) -> nn.Module:
        """``gpt_neox.final_layer_norm``, whose input is z^L."""
        return self._body.final_layer_norm
