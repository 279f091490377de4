"""Shared machinery of the transformer adapters: a decoder's residual stream as sites.

CONTRACT (filled in by the adapter work; the abstract block methods are fixed):

A family module (``llama.py``, ``gpt2.py``, ``neox.py``) subclasses :class:`TransformerAdapter`
and implements the block methods marked ``@abstractmethod``, reading the Hugging Face module's
weights by reference (never copied). Everything else -- the full-sequence forward, the cached
clean run, the batched fast patching, the readouts -- lives here once, for every family.

Sites (``CONVENTIONS.md``): ``embed``, ``attn.l``, ``mlp.l`` (l = 0..L-1, Hugging Face's layer
index), ``attn.l.hH``. The value of a site is what it adds to the residual stream, so
``z_final = embed + sum_l (attn.l + mlp.l)`` (paper Eq 21) and ``attn.l = sum_H attn.l.hH``.

Readout (Eqs 9, 10, 24-28): ``readout(i)`` returns ``(w_i, const_i)`` with ``w_i`` the centred
readout direction and ``const_i`` the term that belongs to no site, such that for any run with
final-norm scale ``sigma``:  centred logit_i = sum_sites (c_site . w_i) / sigma + const_i.
RMSNorm with gain G:  w_i = G * (W_U[i] - mean_j W_U[j]),  const_i = 0 (+ a centred lm_head
bias if the model has one). LayerNorm with gain g, bias b: the centring over the hidden dimension
is folded into the direction, w_i = centre(g * u_i) with u_i = W_U[i] - mean_j W_U[j] (so
c . w_i = centre(c) . (g * u_i)), and const_i = b . u_i (+ centred lm_head bias).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

Granularity = Literal["layer", "head"]


@dataclass(frozen=True)
class Architecture:
    """The shape facts of one decoder, read from its config."""

    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    vocab_size: int
    parallel_residual: bool  # attn.l and mlp.l both read the residual before layer l
    norm: Literal["rms", "layer"]


class TransformerAdapter(ABC):
    """A Hugging Face causal LM seen as a residual stream of sites.

    Subclasses implement the block methods below; shapes use ``...`` for any leading batch dims.
    """

    arch: Architecture
    model: nn.Module  # the wrapped Hugging Face model (weights by reference)
    attn_scale: float  # softmax(q . k * attn_scale)

    # ---- the family's blocks -------------------------------------------------------------
    @abstractmethod
    def embed(self, tokens: Tensor) -> Tensor:
        """Token (+ learned position) embedding: [B, T] int64 -> [B, T, d]."""

    @abstractmethod
    def qkv(self, layer: int, resid: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Attention inputs from the residual (the block's input norm applied inside).

        resid [..., T, d], positions [T] int64 -> q [..., T, H, dh], k and v [..., T, Hkv, dh],
        rotary embedding already applied to q and k.
        """

    @abstractmethod
    def head_outputs(self, layer: int, z: Tensor) -> Tensor:
        """Per-head contributions through the output projection: [..., H, dh] -> [..., H, d].

        An output-projection bias (GPT-2, GPT-NeoX) is split equally over the heads, so the
        heads of a layer sum exactly to the layer's attention output.
        """

    def attn_output(self, layer: int, z: Tensor) -> Tensor:
        """The layer's attention output [..., H, dh] -> [..., d] (a family may fuse this)."""
        return self.head_outputs(layer, z).sum(-2)

    @abstractmethod
    def mlp(self, layer: int, resid: Tensor) -> Tensor:
        """The MLP's contribution from the residual it reads (its input norm inside): [..., d]."""

    @abstractmethod
    def final_scale(self, resid: Tensor) -> Tensor:
        """The final norm's scale sigma exactly as the model computes it: [..., d] -> [...]."""

    @abstractmethod
    def logits(self, resid: Tensor) -> Tensor:
        """Final norm + unembedding, as the model computes them: [..., d] -> [..., V]."""

    @abstractmethod
    def readout(self, token: int) -> tuple[Tensor, float]:
        """Centred readout direction w_i [d] and constant const_i (see the module docstring)."""
