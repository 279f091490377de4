"""The run records every adapter hands out: what one forward, one clean run and one batch of
patched runs are, in numbers.

:class:`FullRun` is a full-sequence forward pass with every site's value at every position;
:class:`CleanRun` is one prompt's clean run read out at one position (target, readout direction,
every readout site's value and direct effect, plus what patching reuses); :class:`PatchedRun` is
do(site = value) for many (site, patch) rows, each read out at its own final scale. The
hand-written families (:mod:`causalnet.adapters.engine`, :mod:`causalnet.adapters.patching`) and
the discovered decoders (:mod:`causalnet.adapters.generic`) fill the same records with the same
meaning (``docs/conventions.md``: sites, Eqs 9-13, 21, 24-28).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from causalnet.errors import CausalNetError, UnknownNodeError
from causalnet.sites import Site, parse_site, site_in_range

Granularity = Literal["layer", "head"]


@dataclass
class FullRun:
    """A full-sequence forward pass from the block methods (:meth:`TransformerAdapter.forward`).

    ``values`` maps every readout site (``embed``, ``attn.l`` or its heads, ``mlp.l``; in residual
    order) to its value at every position [B, T, d], so that
    ``resid_final = sum(values.values())`` (Eq 21). The ``*_cache`` lists (one entry per layer)
    are filled only with ``cache=True``: keys and values after the rotary embedding
    [B, T, Hkv, dh], the heads' pre-projection outputs ``z_heads`` [B, T, H, dh], the residual
    each layer's attention reads (``resid_pre``) and the one its MLP reads (``resid_mid``; equal
    to ``resid_pre`` for parallel-residual models), and the MLP outputs are in ``values``.
    """

    tokens: Tensor  # [B, T] int64
    logits: Tensor  # [B, T, V], as the model computes them
    resid_final: Tensor  # [B, T, d]: z^L before the final norm
    sigma: Tensor  # [B, T]: the final norm's scale
    values: dict[str, Tensor]  # readout site -> [B, T, d]
    granularity: Granularity
    k_cache: list[Tensor] | None = None
    v_cache: list[Tensor] | None = None
    z_heads: list[Tensor] | None = None
    resid_pre: list[Tensor] | None = None
    resid_mid: list[Tensor] | None = None


@dataclass
class CleanRun:
    """One prompt's clean run, cached once and reused by every later question.

    Read out at ``position`` t (non-negative index into ``tokens``) at the clean final scale
    ``sigma``: ``target`` i = argmax_j logits_j (Eq 10); ``readout_dir`` w_i and
    ``readout_const`` (:mod:`causalnet.adapters.readout`); ``site_values`` [R, d] are the
    readout sites' values at t (``readout_sites``, ``embed`` first); ``direct_effects`` [R] =
    ``site_values @ w_i / sigma`` (Delta_unembed, Eq 10; the direct effect of Eqs 24-28);
    ``centred_logit`` = logits[i] - mean_j logits[j] (Eq 9) from the model's full logits, so
    ``direct_effects.sum() + readout_const == centred_logit`` up to rounding (Eq 21, 24).

    The private fields cache, per layer l, what :meth:`TransformerAdapter.patch` reuses: keys
    and values of the positions before t, the residual read by layer l's attention and MLP at t,
    and the clean attention, head and MLP outputs at t.
    """

    tokens: Tensor  # [T] int64, the whole prompt
    position: int  # t, non-negative
    granularity: Granularity
    readout_sites: list[str]
    target: int
    logits: Tensor  # [V] at t
    sigma: float
    readout_dir: Tensor  # [d]
    readout_const: float
    site_values: Tensor  # [R, d]
    direct_effects: Tensor  # [R]
    centred_logit: float
    _k: list[Tensor] = field(repr=False, default_factory=list)  # per layer [t, Hkv, dh]
    _v: list[Tensor] = field(repr=False, default_factory=list)  # per layer [t, Hkv, dh]
    _resid_pre: Tensor | None = field(repr=False, default=None)  # [L, d]
    _resid_mid: Tensor | None = field(repr=False, default=None)  # [L, d]
    _attn: Tensor | None = field(repr=False, default=None)  # [L, d]
    _heads: Tensor | None = field(repr=False, default=None)  # [L, H, d]
    _mlp: Tensor | None = field(repr=False, default=None)  # [L, d]
    _mixer: Tensor | None = field(repr=False, default=None)  # [L, d], one-part blocks only

    def value(self, site: str) -> Tensor:
        """The clean value at t [d] of any site (``embed``, ``attn.l``, ``attn.l.hH``, ``mlp.l``;
        ``mixer.l`` in a model of one-part blocks), whatever the granularity of the run -- the
        source of mean and resample ablations."""
        s = parse_site(site)
        if self._mixer is not None or s.kind == "mixer":
            return self._mixer_value(s)
        assert self._attn is not None and self._heads is not None and self._mlp is not None
        n_layers, n_heads = self._heads.shape[0], self._heads.shape[1]
        if not site_in_range(s, n_layers, n_heads):
            raise UnknownNodeError(
                f"site {site!r} does not exist in a model with {n_layers} layers and {n_heads} "
                f"heads (valid e.g. 'embed', 'attn.0', 'attn.0.h0', 'mlp.{n_layers - 1}')"
            )
        if s.kind == "embed":
            return self.site_values[0]
        if s.kind == "attn":
            return self._attn[s.layer]
        if s.kind == "head":
            return self._heads[s.layer, s.head]
        return self._mlp[s.layer]

    def _mixer_value(self, s: Site) -> Tensor:
        n_layers = 0 if self._mixer is None else self._mixer.shape[0]
        if self._mixer is None or s.kind not in ("embed", "mixer") or s.layer >= n_layers:
            kind = "one-part blocks" if self._mixer is not None else "attention and MLP parts"
            raise UnknownNodeError(
                f"site {s.name!r} does not exist in this run's model, whose blocks add {kind} "
                f"({n_layers or 'no'} mixer sites; e.g. 'embed', 'mixer.0')"
            )
        return self.site_values[0] if s.kind == "embed" else self._mixer[s.layer]


@dataclass
class PatchedRun:
    """The runs do(site_s = values[s, p]) at the clean run's position (Eq 11), one per row.

    Each run is read out at its own final scale ``sigma`` (docs/conventions.md, "Which sigma"):
    ``direct_effects[s, p, r]`` = (c_r . w_i) / sigma[s, p] for every readout site r of the clean
    run (Eq 13: the ablated direct effects); ``centred_logit[s, p]`` is the model's centred logit
    of the clean target computed from the patched final residual (not by summing direct
    effects), and ``total_effect = centred_logit - clean.centred_logit`` (Eqs 12, 14-18).
    """

    sites: list[str]
    readout_sites: list[str]
    direct_effects: Tensor  # [S, P, R]
    sigma: Tensor  # [S, P]
    centred_logit: Tensor  # [S, P]
    total_effect: Tensor  # [S, P]


def check_granularity(granularity: str) -> None:
    """'layer' or 'head' (CausalNetError otherwise)."""
    if granularity not in ("layer", "head"):
        raise CausalNetError(f"granularity must be 'layer' or 'head', got {granularity!r}")
