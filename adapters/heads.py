"""Heads of a discovered attention: the output projection as a linear map of concatenated heads.

Head H's share of a layer's attention output (site ``attn.l.hH``) is its term of the output
projection, ``alpha * (W_O[:, H] z_H + b_O / H)`` (the bias split equally, as for the hand-written
families), so the heads of a layer sum exactly to ``attn.l``. This needs an ``nn.Linear`` (or
transformers' ``Conv1D``) whose output IS the attention part's output, with nothing nonlinear
after it; :func:`find_o_proj` looks for one in the block and checks the sum numerically.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .hooks import rel_err, tolerance


def head_terms(proj: nn.Module, z: Tensor, n_heads: int) -> Tensor:
    """Per-head terms of the projection ``proj`` of concatenated heads: [..., H*dh] -> [..., H, d]
    (``Linear``: weight [d, H*dh]; ``Conv1D``: weight [H*dh, d]); a bias is split equally."""
    zh = z.unflatten(-1, (n_heads, -1))  # [..., H, dh]
    if isinstance(proj, Conv1D):
        w = proj.weight.view(n_heads, -1, proj.weight.shape[1])  # [H, dh, d]
        out = (zh[..., None] * w).sum(-2)
    else:
        w = proj.weight.view(proj.weight.shape[0], n_heads, -1)  # [d, H, dh]
        out = (zh[..., None, :] * w.transpose(0, 1)).sum(-1)
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
