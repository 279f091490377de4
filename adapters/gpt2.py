"""GPT-2 (``GPT2LMHeadModel``) as a residual stream of sites.

The residual stream, block by block (sequential residual, LayerNorm everywhere)::

    z^0      = wte[x_t] + wpe[t]                                        (embed)
    a^l      = c_proj( Attn( c_attn( ln_1(z^{l-1}) ) ) )                (attn.l, Eq 5)
    m^l      = c_proj( act( c_fc( ln_2(z^{l-1} + a^l) ) ) )             (mlp.l,  Eq 6)
    z^l      = z^{l-1} + a^l + m^l                                      (Eq 4)
    pi_t     = ln_f(z^L_t) W_U^T                                        (Eq 3, W_U tied to wte)

``Conv1D`` is ``x @ W + b`` with ``W`` of shape [in, out]. The attention output projection's bias
is split equally over the heads, so ``attn.l = sum_H attn.l.hH``. The final norm is a LayerNorm
with ``sigma = sqrt(var(z) + eps)`` (biased variance, as ``torch.nn.LayerNorm``), so the readout
(Eqs 9, 10, 24-28) is ``w_i = centre(g * u_i)``, ``const_i = b . u_i`` with
``u_i = W_U[i] - mean_j W_U[j]`` (see :mod:`causalnet.adapters.readout`).

Weights are read from the Hugging Face modules by reference at every call, never copied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from causalnet.errors import ModelError, ShapeError

from .base import Architecture, HookPoints, TransformerAdapter
from .blocks import layer_norm
from .readout import LayerNormHead


def _check_modules(transformer: nn.Module) -> None:
    """Refuse a model whose blocks are not the plain modules this file's math describes."""
    for i, block in enumerate(transformer.h):
        parts = {
            "ln_1": (block.ln_1, nn.LayerNorm),
            "ln_2": (block.ln_2, nn.LayerNorm),
            "attn.c_attn": (block.attn.c_attn, Conv1D),
            "attn.c_proj": (block.attn.c_proj, Conv1D),
            "mlp.c_fc": (block.mlp.c_fc, Conv1D),
            "mlp.c_proj": (block.mlp.c_proj, Conv1D),
        }
        for name, (module, kind) in parts.items():
            if type(module) is not kind:
                raise ModelError(
                    f"GPT2Adapter: h.{i}.{name} is a {type(module).__name__}, expected "
                    f"{kind.__name__}"
                )
    if type(transformer.ln_f) is not nn.LayerNorm:
        raise ModelError("GPT2Adapter: ln_f is not a LayerNorm")


class GPT2Adapter(LayerNormHead, TransformerAdapter):
    """``GPT2LMHeadModel`` seen as the sites ``embed``, ``attn.l``, ``attn.l.hH``, ``mlp.l``.

    Config switches that change the math are read, not assumed: ``scale_attn_weights``
    (``attn_scale = d_head ** -0.5`` or 1), ``scale_attn_by_inverse_layer_idx`` (the extra factor
    ``1 / (l + 1)`` is folded into the queries returned by :meth:`qkv`, so that
    ``softmax(q . k * attn_scale)`` stays the layer's attention), ``activation_function``
    (``transformers.activations.ACT2FN``), ``n_inner`` (read from the weight shapes).
    ``reorder_and_upcast_attn`` only changes the floating-point order of the attention scores,
    which this adapter computes in the model's dtype. Cross-attention models are refused.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        transformer = getattr(model, "transformer", None)
        config = getattr(model, "config", None)
        if (
            config is None
            or getattr(config, "model_type", None) != "gpt2"
            or transformer is None
            or not hasattr(transformer, "h")
        ):
            raise ModelError(
                f"GPT2Adapter needs a GPT2LMHeadModel, got {type(model).__name__} "
                f"(model_type={getattr(config, 'model_type', None)!r})"
            )
        if getattr(config, "add_cross_attention", False):
            raise ModelError("GPT2Adapter: cross-attention GPT-2 (add_cross_attention) is refused")
        if config.activation_function not in ACT2FN:
            raise ModelError(
                f"GPT2Adapter: unknown activation_function {config.activation_function!r}"
            )
        d, n_heads = config.n_embd, config.n_head
        if d % n_heads:
            raise ModelError(f"GPT2Adapter: n_embd {d} is not divisible by n_head {n_heads}")
        head = model.get_output_embeddings()
        if head is None or tuple(head.weight.shape) != (config.vocab_size, d):
            raise ModelError("GPT2Adapter: the model has no [vocab, d] unembedding (lm_head)")

        _check_modules(transformer)

        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self._tr = transformer
        self._head = head
        self._act = ACT2FN[config.activation_function]
        d_head = d // n_heads
        self.arch = Architecture(
            family="gpt2",
            n_layers=config.n_layer,
            n_heads=n_heads,
            n_kv_heads=n_heads,
            d_model=d,
            d_head=d_head,
            vocab_size=config.vocab_size,
            parallel_residual=False,
            norm="layer",
        )
        self.attn_scale = float(d_head**-0.5) if config.scale_attn_weights else 1.0
        self._inverse_layer_idx = bool(config.scale_attn_by_inverse_layer_idx)

    # ---- the family's blocks -------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        """``z^0_t = wte[x_t] + wpe[t]`` (token + learned position): [B, T] -> [B, T, d]."""
        n_pos = self._tr.wpe.weight.shape[0]
        if tokens.shape[-1] > n_pos:
            raise ShapeError(
                f"GPT-2: sequence length {tokens.shape[-1]} exceeds n_positions {n_pos}"
            )
        positions = torch.arange(tokens.shape[-1], device=tokens.device)
        return self._tr.wte.weight[tokens] + self._tr.wpe.weight[positions]

    def qkv(self, layer: int, resid: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[q | k | v] = ln_1(z) @ W_attn + b_attn``, split into heads: [..., T, H, dh] each.

        GPT-2's positions are in the embedding, so ``positions`` is not used here. With
        ``scale_attn_by_inverse_layer_idx`` the queries carry the factor ``1 / (layer + 1)``.
        """
        block = self._tr.h[layer]
        c_attn = block.attn.c_attn
        x = layer_norm(block.ln_1, resid)
        fused = torch.addmm(c_attn.bias, x.reshape(-1, x.shape[-1]), c_attn.weight)
        fused = fused.view(*x.shape[:-1], 3, self.arch.n_heads, self.arch.d_head)
        q, k, v = fused.unbind(-3)
        if self._inverse_layer_idx:
            q = q / float(layer + 1)
        return q, k, v

    def head_outputs(self, layer: int, z: Tensor) -> Tensor:
        """``attn.l.hH = z_H @ W_O[H] + b_O / H`` with ``W_O[H]`` the head's rows of c_proj.

        [..., H, dh] -> [..., H, d]; the heads sum exactly to :meth:`attn_output`.
        """
        c_proj = self._tr.h[layer].attn.c_proj
        n_heads, d_head = self.arch.n_heads, self.arch.d_head
        w_o = c_proj.weight.view(n_heads, d_head, -1)
        return torch.einsum("...hk,hkd->...hd", z, w_o) + c_proj.bias / n_heads

    def attn_output(self, layer: int, z: Tensor) -> Tensor:
        """``attn.l = concat_H(z_H) @ W_O + b_O`` (fused c_proj): [..., H, dh] -> [..., d]."""
        c_proj = self._tr.h[layer].attn.c_proj
        flat = z.reshape(-1, self.arch.d_model)
        return torch.addmm(c_proj.bias, flat, c_proj.weight).view(*z.shape[:-2], -1)

    def mlp(self, layer: int, resid: Tensor) -> Tensor:
        """``mlp.l = c_proj(act(c_fc(ln_2(z))))`` from the mid-layer residual: [..., d]."""
        block = self._tr.h[layer]
        c_fc, c_proj = block.mlp.c_fc, block.mlp.c_proj
        x = layer_norm(block.ln_2, resid)
        flat = x.reshape(-1, x.shape[-1])
        h = self._act(torch.addmm(c_fc.bias, flat, c_fc.weight))
        return torch.addmm(c_proj.bias, h, c_proj.weight).view(*resid.shape)

    # ---- hooks for the naive oracle ----------------------------------------------------------
    def hook_points(self, layer: int) -> HookPoints:
        """``(h[l], h[l].attn, h[l].mlp, h[l].attn.c_proj)``: the block's input is z^{l-1}, the
        attention module's first output is attn.l, c_proj's input the heads' concatenation."""
        block = self._tr.h[layer]
        return HookPoints(block=block, attn=block.attn, mlp=block.mlp, o_proj=block.attn.c_proj)

    def final_norm_module(self) -> nn.Module:
        """``transformer.ln_f``, whose input is z^L."""
        return self._tr.ln_f
