"""The centred readout (Eqs 9, 10, 24-28): how a final residual becomes the centred logit of
the target, and so every site's direct effect.

``readout(i)`` returns ``(w_i, const_i)`` with ``w_i`` the centred readout direction and
``const_i`` the term that belongs to no site, such that for any run with final-norm scale
``sigma``:  centred logit_i = sum_sites (c_site . w_i) / sigma + const_i.
RMSNorm with gain G:  w_i = G * (W_U[i] - mean_j W_U[j]),  const_i = 0 (+ a centred lm_head
bias if the model has one). LayerNorm with gain g, bias b: the centring over the hidden dimension
is folded into the direction, w_i = centre(g * u_i) with u_i = W_U[i] - mean_j W_U[j] (so
c . w_i = centre(c) . (g * u_i)), and const_i = b . u_i (+ centred lm_head bias). Here: the
centred unembedding every family reads out through (:func:`centred_unembed`, with the cached
vocabulary mean :func:`vocab_mean`), the LayerNorm readout and final head the LayerNorm families
share (:class:`LayerNormHead`), and the dtype readouts accumulate in (:func:`accumulation_dtype`).
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from causalnet.errors import ModelError

from .blocks import layer_norm, layer_norm_scale


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype readouts accumulate in: float64 for float64 models, else float32 (so half-
    precision models get float32 direct effects, sigma and centred logits)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_VOCAB_MEANS: dict[int, tuple[weakref.ref, tuple, Tensor]] = {}


def vocab_mean(w_u: Tensor) -> Tensor:
    """``mean_j W_U[j]`` [d] of an unembedding matrix [V, d], computed once per weight.

    Every readout needs it (the centring of Eq 9) and it reads the whole [V, d] matrix, so it
    is cached per tensor, keyed by its storage, shape, dtype, device and in-place version counter
    (an edited or replaced weight is averaged again).
    """
    key = (w_u.data_ptr(), tuple(w_u.shape), w_u.dtype, w_u.device, w_u._version)
    hit = _VOCAB_MEANS.get(id(w_u))
    if hit is not None and hit[0]() is w_u and hit[1] == key:
        return hit[2]
    with torch.no_grad():
        mean = w_u.mean(0)
    ident = id(w_u)

    def forget(_: weakref.ref) -> None:
        _VOCAB_MEANS.pop(ident, None)

    _VOCAB_MEANS[ident] = (weakref.ref(w_u, forget), key, mean)
    return mean


def centred_unembed(w_u: Tensor, head_bias: Tensor | None, token: int) -> tuple[Tensor, float]:
    """``u_i = W_U[i] - mean_j W_U[j]`` and the centred unembedding bias ``beta_i - mean(beta)``
    (0 without a bias): the centred logit of i is ``norm(z) . u_i + that`` (Eq 9)."""
    try:
        token = operator.index(token)
    except TypeError:
        raise ModelError(f"token must be an integer id, got {token!r}") from None
    if not 0 <= token < w_u.shape[0]:
        raise ModelError(f"token {token} is outside the vocabulary [0, {w_u.shape[0]})")
    with torch.no_grad():
        u = w_u[token] - vocab_mean(w_u)
        const = 0.0 if head_bias is None else float(head_bias[token] - head_bias.mean())
    return u, const


def layer_norm_readout(
    ln: nn.LayerNorm, w_u: Tensor, head_bias: Tensor | None, token: int
) -> tuple[Tensor, float]:
    """LayerNorm readout (Eqs 9, 10, 24-28): ``w_i = centre(g * u_i)``, ``const_i = b . u_i``.

    For ``LN(z) = g * centre(z) / sigma + b``: ``LN(z) . u_i = centre(z) . (g * u_i) / sigma
    + b . u_i = z . centre(g * u_i) / sigma + b . u_i``; an unembedding bias ``beta`` adds
    ``beta_i - mean(beta)``.
    """
    u, const = centred_unembed(w_u, head_bias, token)
    with torch.no_grad():
        gu = ln.weight * u
        w = gu - gu.mean()
        if ln.bias is not None:
            const += float(ln.bias @ u)
    return w, const


class LayerNormHead:
    """The final LayerNorm and unembedding of the LayerNorm families (GPT-2, GPT-NeoX, GPT-J):
    sigma, logits and the readout from :meth:`final_norm_module` and ``_head`` (the output
    embedding, with or without a bias), through the model's own norm. Mixed in before the base
    class: ``class GPT2Adapter(LayerNormHead, TransformerAdapter)``."""

    final_norm_module: Callable[[], nn.Module]
    _head: nn.Module

    def final_scale(self, resid: Tensor) -> Tensor:
        """``sigma = sqrt(var(z) + eps)`` of the final LayerNorm (biased var): [..., d] -> [...]."""
        return layer_norm_scale(self.final_norm_module(), resid)

    def logits(self, resid: Tensor) -> Tensor:
        """``pi = LN_f(z) W_U^T (+ beta)`` (Eq 3): [..., d] -> [..., V]."""
        return self._head(layer_norm(self.final_norm_module(), resid))

    def readout(self, token: int) -> tuple[Tensor, float]:
        """``w_i = centre(g * u_i)``, ``const_i = b . u_i (+ beta_i - mean beta)``."""
        bias = getattr(self._head, "bias", None)
        return layer_norm_readout(self.final_norm_module(), self._head.weight, bias, token)

    @torch.no_grad()
    def centred_logit(self, resid: Tensor, token: int) -> Tensor:
        """``LN_f(z) . u_i (+ beta_i - mean beta)`` through the model's own final norm (Eq 9)."""
        u, const = centred_unembed(self._head.weight, getattr(self._head, "bias", None), token)
        return layer_norm(self.final_norm_module(), resid) @ u + const
