"""GPT-J (``GPTJForCausalLM``) as a residual stream of sites.

The residual stream, block by block (one LayerNorm per block read by both sublayers, partial
rotary embedding on interleaved pairs)::

    z^0  = wte[x_t]                                                          (embed)
    x^l  = ln_1(z^{l-1})                  -- attention and MLP read the same normed input
    a^l  = out_proj( Attn( rotary(q_proj(x^l)), rotary(k_proj(x^l)), v_proj(x^l) ) )  (attn.l)
    m^l  = fc_out( act( fc_in(x^l) ) )                                       (mlp.l)
    z^l  = z^{l-1} + a^l + m^l                                               (Eq 4, parallel)
    pi_t = ln_f(z^L_t) W_U^T + beta                                          (Eq 3, untied)

The rotary embedding covers the first ``rotary_dim`` dimensions of each head and rotates
adjacent pairs ``(x_{2j}, x_{2j+1})`` (``rotate_every_two``), not halves as in GPT-NeoX and
Llama; the sin/cos tables are the model's own (``rotary_emb``), so they are exactly the numbers
Hugging Face uses. There are no attention biases. The readout (Eqs 9, 10, 24-28) is the
LayerNorm one: ``w_i = centre(g * u_i)``, ``const_i = b . u_i + beta_i - mean(beta)``.

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
from .blocks import layer_norm, linear_head_outputs
from .readout import LayerNormHead


def _check_modules(body: nn.Module) -> None:
    """Refuse a model whose layers are not the plain modules this file's math describes."""
    for i, block in enumerate(body.h):
        parts = {
            "ln_1": (block.ln_1, nn.LayerNorm),
            "attn.q_proj": (block.attn.q_proj, nn.Linear),
            "attn.k_proj": (block.attn.k_proj, nn.Linear),
            "attn.v_proj": (block.attn.v_proj, nn.Linear),
            "attn.out_proj": (block.attn.out_proj, nn.Linear),
            "mlp.fc_in": (block.mlp.fc_in, nn.Linear),
            "mlp.fc_out": (block.mlp.fc_out, nn.Linear),
        }
        for name, (module, kind) in parts.items():
            if type(module) is not kind:
                raise ModelError(
                    f"GPTJAdapter: h.{i}.{name} is a {type(module).__name__}, expected "
                    f"{kind.__name__}"
                )
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            if getattr(block.attn, name).bias is not None:
                raise ModelError(f"GPTJAdapter: h.{i}.attn.{name} has a bias; GPT-J has none")
    if type(body.ln_f) is not nn.LayerNorm:
        raise ModelError("GPTJAdapter: ln_f is not a LayerNorm")


def _rotate_every_two(x: Tensor) -> Tensor:
    """``(x_0, x_1, x_2, x_3, ...) -> (-x_1, x_0, -x_3, x_2, ...)`` (GPT-J's rotary pairs)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class GPTJAdapter(LayerNormHead, TransformerAdapter):
    """``GPTJForCausalLM`` seen as the sites ``embed``, ``attn.l``, ``attn.l.hH``, ``mlp.l``.

    Read from the config, not assumed: ``rotary_dim`` (through the model's rotary module),
    ``activation_function`` (``ACT2FN``), the unembedding and its bias (read from the output
    embedding module). The residual is always parallel (``arch.parallel_residual``): both
    sublayers read ``ln_1(z^{l-1})``.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        body = getattr(model, "transformer", None)
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) != "gptj" or body is None:
            raise ModelError(
                f"GPTJAdapter needs a GPTJForCausalLM, got {type(model).__name__} "
                f"(model_type={getattr(config, 'model_type', None)!r})"
            )
        d, n_heads = config.n_embd, config.n_head
        if d % n_heads:
            raise ModelError(f"GPTJAdapter: n_embd {d} is not divisible by {n_heads} heads")
        d_head = d // n_heads
        rotary_dim = config.rotary_dim
        if rotary_dim is None or rotary_dim > d_head or rotary_dim % 2:
            raise ModelError(
                f"GPTJAdapter: rotary_dim {rotary_dim} must be set, even and at most the head "
                f"size {d_head} (Hugging Face sizes the tables by hidden_size when it is None)"
            )
        if config.activation_function not in ACT2FN:
            raise ModelError(
                f"GPTJAdapter: unknown activation_function {config.activation_function!r}"
            )
        head = model.get_output_embeddings()
        if head is None or tuple(head.weight.shape) != (config.vocab_size, d):
            raise ModelError("GPTJAdapter: the model has no [vocab, d] unembedding (lm_head)")
        rotary = getattr(body, "rotary_emb", None)
        if rotary is None:
            raise ModelError("GPTJAdapter: the model has no rotary embedding module (rotary_emb)")
        _check_modules(body)

        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self._body = body
        self._head = head
        self._rotary = rotary
        self._rotary_dim = rotary_dim
        self._act = ACT2FN[config.activation_function]
        self.arch = Architecture(
            family="gptj",
            n_layers=config.n_layer,
            n_heads=n_heads,
            n_kv_heads=n_heads,
            d_model=d,
            d_head=d_head,
            vocab_size=config.vocab_size,
            parallel_residual=True,
            norm="layer",
        )
        # The scale the attention module itself uses (head_dim ** -0.5).
        self.attn_scale = float(body.h[0].attn.scaling)

    # ---- the family's blocks -------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        """``z^0_t = wte[x_t]`` (no learned positions): [B, T] -> [B, T, d]."""
        return self._body.wte.weight[tokens]

    def qkv(self, layer: int, resid: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q, k, v = {q,k,v}_proj(ln_1(z))`` per head, the first ``rotary_dim`` dims of q and
        k rotated pairwise: ``x_rot * cos + rotate_every_two(x_rot) * sin``: [..., T, H, dh]."""
        attn = self._body.h[layer].attn
        x = layer_norm(self._body.h[layer].ln_1, resid)
        heads = (*x.shape[:-1], self.arch.n_heads, self.arch.d_head)
        q = F.linear(x, attn.q_proj.weight).view(heads)
        k = F.linear(x, attn.k_proj.weight).view(heads)
        v = F.linear(x, attn.v_proj.weight).view(heads)
        sin, cos = self._rotary(x, positions.reshape(1, -1))  # [1, T, r/2] each
        sin = sin[0].repeat_interleave(2, dim=-1).unsqueeze(-2)  # [T, 1, r] against [.., T, H, dh]
        cos = cos[0].repeat_interleave(2, dim=-1).unsqueeze(-2)
        r = self._rotary_dim

        def rotate(x: Tensor) -> Tensor:
            x_rot, x_pass = x[..., :r], x[..., r:]
            return torch.cat((x_rot * cos + _rotate_every_two(x_rot) * sin, x_pass), dim=-1)

        return rotate(q), rotate(k), v

    def head_outputs(self, layer: int, z: Tensor) -> Tensor:
        """``attn.l.hH = z_H @ W_O[:, H]^T`` (out_proj's columns of head H): [..., H, d]."""
        return linear_head_outputs(self._body.h[layer].attn.out_proj, z, self.arch.n_heads)

    def attn_output(self, layer: int, z: Tensor) -> Tensor:
        """``attn.l = out_proj(concat_H z_H)``: [..., H, dh] -> [..., d]."""
        return self._body.h[layer].attn.out_proj(z.flatten(-2))

    def mlp(self, layer: int, resid: Tensor) -> Tensor:
        """``mlp.l = fc_out(act(fc_in(ln_1(z^{l-1}))))``: [..., d] (``resid`` is z^{l-1})."""
        block = self._body.h[layer]
        x = layer_norm(block.ln_1, resid)
        return block.mlp.fc_out(self._act(block.mlp.fc_in(x)))

    # ---- hooks for the naive oracle ----------------------------------------------------------
    def hook_points(self, layer: int) -> HookPoints:
        """``(h[l], .attn, .mlp, .attn.out_proj)``: the block's input is z^{l-1}, the attention
        module's first output is attn.l, out_proj's input the heads' concatenation."""
        block = self._body.h[layer]
        return HookPoints(block=block, attn=block.attn, mlp=block.mlp, o_proj=block.attn.out_proj)

    def final_norm_module(self) -> nn.Module:
        """``transformer.ln_f``, whose input is z^L."""
        return self._body.ln_f
