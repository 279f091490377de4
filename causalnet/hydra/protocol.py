"""The Hydra protocol's bookkeeping for one prompt (paper Sections 2.5.1 and 4.1).

Inputs are the readouts of one clean run and of its ablated runs, each run unembedded at its
own frozen final scale (``docs/conventions.md``, "Which sigma"):

- ``de_clean[r]``: the direct effect of readout site r in the clean run (Delta_unembed, Eq 10);
- ``de_ablated[s, p, r]``: the direct effect of r in the run where site s was ablated with
  patch p (Eq 13);
- ``total[s, p]``: centred logit of the target in that run minus the clean one (Eq 12).

Then Delta_DE = de_ablated - de_clean (Eq 34) and the compensatory effect of ablating s
(Eq 33) is the sum of Delta_DE over the sites downstream of s, split into attention (the Hydra
effect) and MLP (less erasure). Because every run decomposes exactly into its direct effects,

    total = Delta_DE(s) + CE_attn + CE_mlp + Delta_DE(embedding and upstream sites)   (exact)

In a model of one-part blocks (sites ``mixer.l``, Mamba; ``docs/conventions.md``, "Sites") the
downstream sites are mixers: CE = CE_mixer, with no attention part and no MLP part (the sweep's
tables hold NaN there: not applicable, never a zero that reads as "no Hydra effect"), and
total = Delta_DE(s) + CE_mixer + Delta_DE(upstream) exactly. In both, the last term is
nonzero only through the change of the final scale sigma.

:func:`split_repair` takes the repair apart (``docs/conventions.md``, "The repair, split"):
each Delta_DE of readout site r in a run at sigma' splits exactly into a value part
``(c'_r - c_r) . w / sigma' = DE_abl - DE_clean * sigma / sigma'`` and a scale part
``c_r . w (1 / sigma' - 1 / sigma) = DE_clean * (sigma / sigma' - 1)``; then

    total = Delta_DE(s) + repair_attn + repair_mlp + repair_norm + repair_sibling

with the value parts of the downstream attention / MLP sites (mixers: ``repair_mixer``), the
scale parts of every site but s, and the value parts of the remaining (non-downstream)
sites, which vanish unless a norm after the attention renormalises s's sibling heads.
:func:`total_at_clean_sigma` is the total effect with sigma held at its clean value,
do(sigma = clean).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from ..errors import InterventionError, ShapeError
from ..sites import downstream_masks, downstream_mixer_mask, members


@dataclass(frozen=True)
class Decomposition:
    """Per (ablated site, patch) terms of the identity; every tensor is [n_sites, n_patches]."""

    total: Tensor
    delta_self: Tensor
    compensatory_attn: Tensor
    compensatory_mlp: Tensor
    delta_upstream: Tensor
    delta_de: Tensor  # [n_sites, n_patches, n_readouts]
    compensatory_mixer: Tensor  # downstream mixers (one-part blocks); zeros elsewhere

    @property
    def compensatory(self) -> Tensor:
        """CE (Eq 33): attention part + MLP part (+ mixer part, in a model of mixers)."""
        return self.compensatory_attn + self.compensatory_mlp + self.compensatory_mixer

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
    down_attn, down_mlp, down_mixer, is_self, upstream = (m.to(de_ablated.dtype) for m in masks)
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
        compensatory_mixer=masked_sum(down_mixer),
    )


@lru_cache(maxsize=16)
def _masks(
    ablated: tuple[str, ...], readouts: tuple[str, ...], parallel_residual: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Downstream attention, MLP and mixer, self and upstream masks, computed once per sweep."""
    down_attn, down_mlp, is_self = downstream_masks(
        list(ablated), list(readouts), parallel_residual
    )
    down_mixer = downstream_mixer_mask(list(ablated), list(readouts), parallel_residual)
    return down_attn, down_mlp, down_mixer, is_self, ~(down_attn | down_mlp | down_mixer | is_self)


@dataclass(frozen=True)
class RepairSplit:
    """Per (ablated site, patch) parts of the repair; every tensor is [n_sites, n_patches].

    ``repair`` = total - Delta_DE(self) is the whole response to the ablation; it splits into
    ``repair_attn`` + ``repair_mlp`` (value parts of the downstream attention / MLP sites, Eq
    33's rule), ``repair_norm`` (scale parts of every site but the ablated one: the final norm
    rescaling what did not change) and ``repair_sibling`` (value parts of the other
    non-downstream sites: zero up to rounding unless a norm after the attention renormalises
    the ablated head's siblings). ``value`` and ``scale`` [S, P, R] are the per-readout parts.
    """

    total: Tensor
    delta_self: Tensor
    repair_attn: Tensor
    repair_mlp: Tensor
    repair_norm: Tensor
    repair_sibling: Tensor
    sigma_ratio: Tensor  # sigma' / sigma
    value: Tensor  # [S, P, R]
    scale: Tensor  # [S, P, R]
    repair_mixer: Tensor  # value parts of the downstream mixers (one-part blocks); else zeros

    @property
    def repair(self) -> Tensor:
        """repair_attn + repair_mlp + repair_mixer + repair_norm + repair_sibling
        (= total - Delta_DE(self))."""
        parts = self.repair_attn + self.repair_mlp + self.repair_mixer
        return parts + self.repair_norm + self.repair_sibling

    def identity_residual(self) -> Tensor:
        """total - (Delta_DE(self) + repair); zero up to rounding when total is the model's."""
        return self.total - (self.delta_self + self.repair)


def split_repair(
    ablated_sites: list[str],
    readout_sites: list[str],
    de_clean: Tensor,
    de_ablated: Tensor,
    sigma_clean: float | Tensor,
    sigma_ablated: Tensor,
    total: Tensor,
    parallel_residual: bool,
) -> RepairSplit:
    """Split each ablated run's Delta_DE into value and scale parts and aggregate the repair.

    ``sigma_clean`` is the clean run's final scale, ``sigma_ablated`` [S, P] each ablated run's
    own; the other arguments are :func:`decompose`'s. Every ablated site must be a readout site
    (its own term is Delta_DE(self); for a set, each member); InterventionError otherwise (e.g.
    a head ablated in a layer-granularity run, whose layer would change without being
    downstream).

    >>> import torch
    >>> r = split_repair(["attn.0"], ["embed", "attn.0", "mlp.0"], torch.tensor([1.0, 2.0, -2.0]),
    ...                  torch.tensor([[[0.5, 0.0, -0.5]]]), 1.0, torch.tensor([[2.0]]),
    ...                  torch.tensor([[-1.0]]), False)
    >>> [float(x) for x in (r.delta_self, r.repair_mlp, r.repair_norm, r.repair_sibling)]
    [-2.0, 0.5, 0.5, 0.0]
    """
    missing = [s for s in ablated_sites if any(m not in readout_sites for m in members(s))]
    if missing:
        raise InterventionError(
            f"split_repair: ablated site(s) {missing[:4]} are not readout sites; the repair is "
            "split only when each ablated site is read out itself (same granularity)"
        )
    shape = de_ablated.shape[:2]
    sigma_ablated = torch.as_tensor(sigma_ablated, dtype=de_ablated.dtype)
    if sigma_ablated.shape != shape:
        raise ShapeError(
            f"sigma_ablated has shape {tuple(sigma_ablated.shape)}, expected {tuple(shape)}"
        )
    sigma_clean = torch.as_tensor(sigma_clean, dtype=de_ablated.dtype)
    if not (bool((sigma_ablated > 0).all()) and float(sigma_clean) > 0):
        raise ShapeError("split_repair: every final scale sigma must be positive")
    dec = decompose(ablated_sites, readout_sites, de_clean, de_ablated, total, parallel_residual)
    masks = _masks(tuple(ablated_sites), tuple(readout_sites), parallel_residual)
    down_attn, down_mlp, down_mixer, is_self, upstream = (m.to(de_ablated.dtype) for m in masks)
    ratio = sigma_clean / sigma_ablated  # sigma / sigma'
    value = de_ablated - de_clean * ratio[..., None]
    scale = de_clean * (ratio - 1.0)[..., None]

    def masked(parts: Tensor, mask: Tensor) -> Tensor:
        return torch.einsum("spr,sr->sp", parts, mask)

    return RepairSplit(
        total=total,
        delta_self=dec.delta_self,
        repair_attn=masked(value, down_attn),
        repair_mlp=masked(value, down_mlp),
        repair_norm=masked(scale, 1.0 - is_self),
        repair_sibling=masked(value, upstream),
        sigma_ratio=1.0 / ratio,
        value=value,
        scale=scale,
        repair_mixer=masked(value, down_mixer),
    )


def total_at_clean_sigma(
    centred_ablated: Tensor,
    centred_clean: float,
    readout_const: float,
    sigma_clean: float,
    sigma_ablated: Tensor,
) -> Tensor:
    """The total effect with the final scale held at its clean value, do(sigma = clean) [S, P].

    Each run's centred target logit is ``const + (z . w) / sigma`` (the readout is affine in
    1 / sigma, ``docs/conventions.md``, "Centred readout direction"), so the ablated run's
    final residual read out at the clean scale is ``const + (centred' - const) sigma' /
    sigma``; minus the clean centred logit. ``centred_ablated`` is the model's centred logit
    of each ablated run (from its final residual), not a sum of direct effects.
    """
    centred = torch.as_tensor(centred_ablated)
    sigma_ablated = torch.as_tensor(sigma_ablated, dtype=centred.dtype)
    return (centred - readout_const) * sigma_ablated / sigma_clean - (centred_clean - readout_const)
