"""Pieces the family files' block readings share: the rotary convention of Llama, GPT-NeoX and
Gemma (:func:`rotate_half`), each head's term of a linear output projection
(:func:`linear_head_outputs`, the bias split equally so the heads sum to the layer's attention
output) and a LayerNorm exactly as ``torch.nn.LayerNorm`` computes it, with its scale sigma
(:func:`layer_norm`, :func:`layer_norm_scale`; GPT-2, GPT-NeoX and GPT-J). Plain functions of
tensors and modules, read by reference: no family file imports another family's helpers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def linear_head_outputs(o_proj: nn.Linear, z: Tensor, n_heads: int) -> Tensor:
    """Each head's term of an ``nn.Linear`` output projection: ``W_O[:, H] z_H + b_O / H``,
    [..., H, dh] -> [..., H, d]; they sum to ``o_proj(concat_H z_H)`` (a bias split equally)."""
    w_o = o_proj.weight.view(o_proj.out_features, n_heads, -1)  # [d, H, dh]
    out = torch.einsum("...hk,dhk->...hd", z, w_o)
    if o_proj.bias is not None:
        out = out + o_proj.bias / n_heads
    return out


def rotate_half(x: Tensor) -> Tensor:
    """``[x1 | x2] -> [-x2 | x1]`` over the last dimension: the rotary convention of Llama,
    GPT-NeoX and Gemma (``x * cos + rotate_half(x) * sin``)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def layer_norm(ln: nn.LayerNorm, x: Tensor) -> Tensor:
    """``g * (x - mean(x)) / sqrt(var(x) + eps) + b`` exactly as the module computes it."""
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def layer_norm_scale(ln: nn.LayerNorm, x: Tensor) -> Tensor:
    """The LayerNorm's scale ``sigma = sqrt(var(x) + eps)`` (biased variance): [..., d] -> [...]."""
    return torch.sqrt(x.var(-1, unbiased=False) + ln.eps)
