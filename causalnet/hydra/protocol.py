"""The Hydra protocol's bookkeeping for one prompt (paper Sections 2.5.1 and 4.1).

Inputs are the readouts of one clean run and of its ablated runs, each run unembedded at its
own frozen final scale (``CONVENTIONS.md``, "Which sigma"):

- ``de_clean[r]``: the direct effect of readout site r in the clean run (Delta_unembed, Eq 10);
- ``de_ablated[s, p, r]``: the direct effect of r in the run where site s was ablated with
  patch p (Eq 13);
- ``total[s, p]``: centred logit of the target in that run minus the clean one (Eq 12).

Then Delta_DE = de_ablated - de_clean (Eq 34) and the compensatory effect of ablating s
(Eq 33) is the sum of Delta_DE over the sites downstream of s, split into attention (the Hydra
effect) and MLP (less erasure). Because every run decomposes exactly into its direct effects,

    total = Delta_DE(s) + CE_attn + CE_mlp + Delta_DE(embedding and upstream sites)   (exact)

where the last term is nonzero only through the change of the final scale sigma.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from ..errors import ShapeError
from ..sites import downstream_masks


@dataclass(frozen=True)
class Decomposition:
    """Per (ablated site, patch) terms of the identity; every tensor is [n_sites, n_patches]."""

    total: Tensor
    delta_self: Tensor
    compensatory_attn: Tensor
    compensatory_mlp: Tensor
    delta_upstream: Tensor
    delta_de: Tensor  # [n_sites, n_patches, n_readouts]

    @property
    def compensatory(self) -> Tensor:
        """CE (Eq 33): attention part + MLP part."""
        return self.compensatory_attn + self.compensatory_mlp

    def identity_residual(self) -> Tensor:
        """total - (Delta_DE(self) + CE + Delta_DE(upstream)); zero up to rounding."""
        return self.total - (self.delta_self + self.compensatory + self.delta_upstream)


def decompose(
    ablated_sites: list[str],
    readout_sites: list[str],
    de_clean: Tensor,
    de_ablated: Tensor,
    total: Tensor,
    parallel_residual: bool,
) -> Decomposition:
    """Split each ablated run's change into self, downstream (CE, Eq 33) and upstream terms.

    >>> import torch
    >>> d = decompose(["attn.0"], ["embed", "attn.0", "mlp.0"], torch.tensor([1.0, 2.0, -1.0]),
    ...               torch.tensor([[[1.0, 0.0, -0.5]]]), torch.tensor([[-1.5]]), False)
    >>> float(d.delta_self), float(d.compensatory_mlp), float(d.identity_residual())
    (-2.0, 0.5, 0.0)
    """
    n_s, n_r = len(ablated_sites), len(readout_sites)
    if de_clean.shape != (n_r,):
        raise ShapeError(f"de_clean has shape {tuple(de_clean.shape)}, expected ({n_r},)")
    if de_ablated.dim() != 3 or de_ablated.shape[0] != n_s or de_ablated.shape[2] != n_r:
        raise ShapeError(
            f"de_ablated has shape {tuple(de_ablated.shape)}, expected ({n_s}, n_patches, {n_r})"
        )
    if total.shape != de_ablated.shape[:2]:
        raise ShapeError(
            f"total has shape {tuple(total.shape)}, expected {tuple(de_ablated.shape[:2])}"
        )
    masks = _masks(tuple(ablated_sites), tuple(readout_sites), parallel_residual)
    down_attn, down_mlp, is_self, upstream = (m.to(de_ablated.dtype) for m in masks)
    delta = de_ablated - de_clean

    def masked_sum(mask: Tensor) -> Tensor:
        return torch.einsum("spr,sr->sp", delta, mask)

    return Decomposition(
        total=total,
        delta_self=masked_sum(is_self),
        compensatory_attn=masked_sum(down_attn),
        compensatory_mlp=masked_sum(down_mlp),
        delta_upstream=masked_sum(upstream),
        delta_de=delta,
    )


@lru_cache(maxsize=16)
def _masks(
    ablated: tuple[str, ...], readouts: tuple[str, ...], parallel_residual: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Downstream attention, downstream MLP, self and upstream masks, computed once per sweep."""
    down_attn, down_mlp, is_self = downstream_masks(
        list(ablated), list(readouts), parallel_residual
    )
    return down_attn, down_mlp, is_self, ~(down_attn | down_mlp | is_self)
