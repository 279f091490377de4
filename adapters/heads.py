"""Heads of a discovered attention: the output projection as a linear map of concatenated heads.

Head H's share of a layer's attention output (site ``attn.l.hH``) is its term of the output
projection, ``alpha * (W_O[:, H] z_H + b_O / H)`` (the bias split equally, as for the hand-written
families), so the heads of a layer sum exactly to ``attn.l``. This needs an ``nn.Linear`` (or
transformers' ``Conv1D``) whose output IS the attention part's output, with nothing nonlinear
after it; :func:`find_o_proj` looks for one in the block and checks the sum numerically.

Under a norm after the attention (OLMo-2, Gemma 2/3: the attention part is ``norm(o)``, o the
projection's output) head H's value is its **share** at the run's own post-norm scale,
``alpha * gamma * o_H / s(o)``, s(o) = sqrt(mean(o^2) + eps) as the module computes it, gamma
its gain (docs/conventions.md, "Heads under a norm after the attention"): the shares sum to
attn.l. :func:`find_post_norm` identifies the norm by fitting its outputs
(:func:`causalnet.adapters.norms.fit_final_norm`) and refuses any but a bias-free RMS norm
with no zero gain entry; :class:`PostNorm` gives the factor ``alpha * gamma / s(o)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from causalnet.errors import UnsupportedModelError

from .hooks import rel_err, tolerance
from .norms import FinalNorm, fit_final_norm
from .readout import accumulation_dtype


def head_terms(proj: nn.Module, z: Tensor, n_heads: int) -> Tensor:
    """Per-head terms of the projection ``proj`` of concatenated heads: [..., H*dh] -> [..., H, d]
    (``Linear``: weight [d, H*dh]; ``Conv1D``: weight [H*dh, d]); a bias is split equally."""
    dtype = torch.promote_types(z.dtype, proj.weight.dtype)
    zh = z.unflatten(-1, (n_heads, -1)).to(dtype)  # [..., H, dh]
    if isinstance(proj, Conv1D):
        w = proj.weight.view(n_heads, -1, proj.weight.shape[1]).to(dtype)  # [H, dh, d]
        out = torch.einsum("...hk,hkd->...hd", zh, w)
    else:
        w = proj.weight.view(proj.weight.shape[0], n_heads, -1).to(dtype)  # [d, H, dh]
        out = torch.einsum("...hk,dhk->...hd", zh, w)
    if proj.bias is not None:
        out = out + proj.bias / n_heads
    return out


def head_dots(proj: nn.Module, z: Tensor, n_heads: int, w: Tensor) -> Tensor:
    """Each head's term of ``proj`` dotted with ``w`` [d], without the terms themselves:
    z [N, H*dh] -> [N, H] (in ``w``'s dtype), equal to ``head_terms(proj, z, n_heads) @ w``."""
    weight = proj.weight.to(w.dtype)
    if isinstance(proj, Conv1D):
        r = (weight @ w).view(n_heads, -1)  # [H, dh]
    else:
        r = (w @ weight).view(n_heads, -1)
    out = (z.to(w.dtype).unflatten(-1, (n_heads, -1)) * r).sum(-1)
    if proj.bias is not None:
        out = out + float(proj.bias.to(w.dtype) @ w) / n_heads
    return out


def head_term(proj: nn.Module, z: Tensor, heads: Tensor, n_heads: int) -> Tensor:
    """Row n's term of head ``heads[n]`` in ``proj``: z [N, H*dh], heads [N] -> [N, d] (the
    entries of :func:`head_terms` picked per row, computed for those heads only)."""
    rows = torch.arange(z.shape[0], device=z.device)
    zh = z.unflatten(-1, (n_heads, -1))[rows, heads]  # [N, dh]
    if isinstance(proj, Conv1D):
        w = proj.weight.view(n_heads, -1, proj.weight.shape[1])[heads]  # [N, dh, d]
        out = (zh[..., None] * w).sum(-2)
    else:
        w = proj.weight.view(proj.weight.shape[0], n_heads, -1)[:, heads]  # [d, N, dh]
        out = (zh[None] * w).sum(-1).T
    if proj.bias is not None:
        out = out + proj.bias / n_heads
    return out


def _linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` (or a subclass of it, e.g. Falcon's ``FalconLinear``: its per-head
    terms are checked against its recorded output before use) or a ``Conv1D``."""
    return isinstance(module, (nn.Linear, Conv1D))


def in_width(module: nn.Module) -> int:
    """The input width of a Linear / Conv1D."""
    return module.weight.shape[0] if isinstance(module, Conv1D) else module.weight.shape[1]


def find_o_proj(
    modules: dict[str, nn.Module],
    candidates: list[str],
    inputs: dict[str, Tensor],
    outputs: dict[str, Tensor],
    attn_out: Tensor,
    n_heads: int,
) -> tuple[str | None, str]:
    """(name, "") of the Linear / Conv1D among ``candidates`` whose recorded output is
    ``attn_out`` and whose per-head terms sum to it, else (None, why not)."""
    if n_heads < 1:
        return None, "the number of heads is unknown (declare n_heads)"
    tol = tolerance(attn_out.dtype)
    why = (
        "no nn.Linear / Conv1D output projection whose output is the attention part's output "
        "(e.g. a mixture of attention experts, or an operation after the projection)"
    )
    for name in candidates:
        mod = modules[name]
        if not _linear_like(mod) or name not in inputs or name not in outputs:
            continue
        if rel_err(outputs[name], attn_out) > tol:
            continue
        if in_width(mod) % n_heads:
            why = f"{name}: input width {in_width(mod)} is not a multiple of {n_heads} heads"
            continue
        err = rel_err(head_terms(mod, inputs[name], n_heads).sum(-2), attn_out)
        if err > tol:
            why = f"{name}: its per-head terms miss the attention output by {err:.2e}"
            continue
        return name, ""
    return None, why


@dataclass(frozen=True)
class PostNorm:
    """The RMS norm after one block's attention, as fitted: its output is gamma * o / s(o)."""

    name: str
    fit: FinalNorm

    def inv(self, o: Tensor) -> Tensor:
        """1 / s(o) [..., 1] of the norm's inputs o [..., d], computed in the dtype the module
        computes in (float32 inside Hugging Face's RMSNorms), in the readout precision."""
        x = o.to(self.fit.compute_dtype)
        inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.fit.eps)
        return inv.to(accumulation_dtype(o.dtype))

    def gain(self, dtype: torch.dtype) -> Tensor | float:
        """gamma [d] (the module's ``weight``, ``1 + weight``), or 1.0 where it has none."""
        return 1.0 if self.fit.gain is None else self.fit.gain.to(dtype)

    def factor(self, o: Tensor, alpha: float) -> Tensor:
        """c = alpha * gamma / s(o) [..., d]: the attention part adds c * o, head H c * o_H."""
        inv = self.inv(o)
        return inv * (alpha * self.gain(inv.dtype))


def find_post_norm(
    module: nn.Module, name: str, inputs: Tensor, config: Any = None
) -> tuple[PostNorm | None, str]:
    """(PostNorm, "") of the norm ``module`` after the attention, fitted on its recorded inputs
    [..., d], else (None, why its heads have no shares)."""
    try:
        fit = fit_final_norm(module, name, inputs, config, what="the norm after the attention")
    except (UnsupportedModelError, TypeError, RuntimeError) as err:
        return None, f"{name}: {err}"
    if fit.form != "rms" or fit.bias is not None:
        kind = "a LayerNorm (centring)" if fit.form != "rms" else "an RMS norm with a bias"
        return None, (
            f"the norm after the attention {name} is {kind}: head shares are defined under a "
            "bias-free RMS norm only (docs/conventions.md, 'Heads under a norm after the "
            "attention')"
        )
    if fit.gain is not None and bool((fit.gain == 0).any()):
        zero = (fit.gain == 0).nonzero().flatten().tolist()
        return None, (
            f"the norm after the attention {name} has a zero gain ({fit.gain_source}) at "
            f"{len(zero)} coordinate(s), e.g. {zero[0]}: a head's share cannot be moved there"
        )
    return PostNorm(name, fit), ""
