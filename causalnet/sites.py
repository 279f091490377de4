"""Site names of a transformer's residual stream, and which sites are downstream of which.

Names a person can type, numbered from 0 as in Hugging Face (``docs/conventions.md``, "Sites"):

- ``embed``: the token (+ position) embedding at the readout position;
- ``attn.l``: attention layer l's output (what it adds to the residual stream);
- ``attn.l.hH``: head H of attention layer l (its output through its slice of the output
  projection); the heads of a layer sum to ``attn.l``;
- ``mlp.l``: MLP layer l's output;
- ``mixer.l``: in a model whose blocks add one part, ``x + mixer(norm(x))`` (Mamba), that
  part's output at block l; such a model has no attention, MLP or head sites;
- ``a+b+...``: a set of sites ablated together in one run; its canonical name lists the
  members in residual order (:func:`parse_site_set`; conventions: "Sets of sites").

>>> parse_site("attn.12.h3")
Site(name='attn.12.h3', kind='head', layer=12, head=3)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .errors import UnknownNodeError

SiteKind = Literal["embed", "attn", "head", "mlp", "mixer"]

_SITE = re.compile(r"^(?:(embed)|(attn|mlp|mixer)\.(\d+)|attn\.(\d+)\.h(\d+))$")


@dataclass(frozen=True)
class Site:
    """A parsed site name: kind, layer (-1 for embed) and head (-1 unless a head)."""

    name: str
    kind: SiteKind
    layer: int
    head: int = -1

    @property
    def is_attention(self) -> bool:
        return self.kind in ("attn", "head")


def parse_site(name: str) -> Site:
    """Parse ``embed``, ``attn.l``, ``mlp.l``, ``attn.l.hH`` or ``mixer.l``; UnknownNodeError
    otherwise."""
    m = _SITE.match(name)
    if m is None:
        raise UnknownNodeError(
            f"site {name!r} is not a site name; expected 'embed', 'attn.L', 'mlp.L', "
            "'attn.L.hH' or 'mixer.L' with L and H numbered from 0 (e.g. 'attn.0', 'mlp.12', "
            "'attn.3.h1', 'mixer.5')"
        )
    if m.group(1):
        return Site(name, "embed", -1)
    if m.group(2):
        return Site(name, m.group(2), int(m.group(3)))  # type: ignore[arg-type]
    return Site(name, "head", int(m.group(4)), int(m.group(5)))


def site_in_range(site: Site, n_layers: int, n_heads: int) -> bool:
    """Whether ``site``'s layer (and head) exist in a model of ``n_layers`` layers and
    ``n_heads`` heads per layer (``embed`` always does).

    >>> site_in_range(parse_site("attn.3.h1"), n_layers=4, n_heads=2)
    True
    >>> site_in_range(parse_site("mlp.4"), n_layers=4, n_heads=2)
    False
    """
    if site.kind != "embed" and not 0 <= site.layer < n_layers:
        return False
    return not (site.kind == "head" and not 0 <= site.head < n_heads)


def is_downstream(readout: Site, ablated: Site, parallel_residual: bool) -> bool:
    """Whether ``readout``'s value can change when ``ablated`` is intervened on (paper Eq 33).

    Attention sites are downstream when their layer is after the ablated site's layer. MLP
    sites are downstream from the ablated layer on when an attention site (a layer or a head)
    is ablated, and after it when an MLP site is ablated; in parallel-residual models (GPT-NeoX,
    GPT-J) the MLP of the ablated attention's own layer reads the same input and is not
    downstream. The embedding is never downstream; nor are other heads of the same layer.
    In a model of one-part blocks (``mixer.l``, Mamba) mixer.m is downstream of mixer.l iff
    m > l, and every mixer site is downstream of the embedding.

    >>> is_downstream(parse_site("mixer.3"), parse_site("mixer.2"), parallel_residual=False)
    True
    >>> is_downstream(parse_site("mixer.2"), parse_site("mixer.2"), parallel_residual=False)
    False
    """
    if readout.kind == "embed" or ablated.kind == "embed":
        return readout.kind != "embed" and ablated.kind == "embed"
    if readout.is_attention:
        return readout.layer > ablated.layer
    if ablated.is_attention and not parallel_residual:
        return readout.layer >= ablated.layer
    return readout.layer > ablated.layer


@dataclass(frozen=True)
class SiteSet:
    """Sites ablated together in one run: ``members`` in residual order (at least two).

    Its ``layer`` is the earliest member's; ``kind`` is ``"set"`` and ``head`` is -1.
    """

    name: str
    members: tuple[Site, ...]
    kind: str = "set"
    head: int = -1

    @property
    def layer(self) -> int:
        return self.members[0].layer

    @property
    def first(self) -> Site:
        """The earliest member: Eq 33's downstream rule applies from it."""
        return self.members[0]


def residual_key(site: Site) -> tuple[int, int, int]:
    """Residual order of a single site: embed, then per layer attn.l (or mixer.l), its heads,
    mlp.l."""
    rank = {"embed": 0, "attn": 0, "mixer": 0, "head": 1, "mlp": 2}[site.kind]
    return (site.layer, rank, site.head)


def is_site_set(name: str) -> bool:
    """Whether ``name`` names a set of sites (contains ``+``)."""
    return isinstance(name, str) and "+" in name


def parse_site_set(name: str) -> SiteSet:
    """Parse ``a+b+...`` into a :class:`SiteSet` whose members are sorted into residual order
    (the canonical name joins them with ``+``). UnknownNodeError for an empty or unknown
    member, a repeated member, or a set mixing a whole attention layer with heads (one
    granularity per set)."""
    parts = [p.strip() for p in name.split("+")]
    if len(parts) < 2 or any(not p for p in parts):
        raise UnknownNodeError(
            f"site set {name!r} has an empty member; write members joined by '+', "
            "e.g. 'attn.22+attn.23'"
        )
    members = [parse_site(p) for p in parts]
    seen: set[str] = set()
    for m in members:
        if m.name in seen:
            raise UnknownNodeError(f"site set {name!r} names {m.name!r} twice")
        seen.add(m.name)
    if any(m.kind == "attn" for m in members) and any(m.kind == "head" for m in members):
        raise UnknownNodeError(
            f"site set {name!r} mixes granularities: whole attention layers ('attn.L') and "
            "heads ('attn.L.hH') cannot be in one set; use one or the other"
        )
    ordered = tuple(sorted(members, key=residual_key))
    return SiteSet("+".join(m.name for m in ordered), ordered)


def parse_unit(name: str) -> Site | SiteSet:
    """A site (:func:`parse_site`) or, for a name with ``+``, a set (:func:`parse_site_set`)."""
    if is_site_set(name):
        return parse_site_set(name)
    return parse_site(name)


def members(name: str) -> list[str]:
    """The member site names of a site or a set, in residual order (a site: itself)."""
    unit = parse_unit(name)
    return [m.name for m in unit.members] if isinstance(unit, SiteSet) else [unit.name]


def unit_sort_key(name: str) -> tuple[int, int, int, int, str]:
    """Residual order of a site or a set (by its earliest member; a site before the sets
    that start at it)."""
    unit = parse_unit(name)
    if isinstance(unit, SiteSet):
        return (*residual_key(unit.first), 1, unit.name)
    return (*residual_key(unit), 0, "")


def _downstream_and_self(
    ablated: list[str], readouts: list[str], parallel_residual: bool
) -> tuple[Tensor, Tensor, list[Site]]:
    """[n_ablated, n_readouts] masks: downstream (not a member of the ablated unit), self; and
    the parsed readout sites."""
    units = [parse_unit(s) for s in ablated]
    firsts = [u.first if isinstance(u, SiteSet) else u for u in units]
    own = [{m.name for m in u.members} if isinstance(u, SiteSet) else {u.name} for u in units]
    r_sites = [parse_site(s) for s in readouts]
    down = torch.tensor(
        [
            [is_downstream(r, a, parallel_residual) and r.name not in mine for r in r_sites]
            for a, mine in zip(firsts, own, strict=True)
        ],
        dtype=torch.bool,
    ).reshape(len(units), len(r_sites))
    self_mask = torch.tensor(
        [[r.name in mine for r in r_sites] for mine in own], dtype=torch.bool
    ).reshape(len(units), len(r_sites))
    return down, self_mask, r_sites


def downstream_masks(
    ablated: list[str], readouts: list[str], parallel_residual: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Boolean masks [n_ablated, n_readouts]: downstream attention, downstream MLP, self.

    An ablated set (``a+b``) counts as its members together: "self" are its members, and
    downstream are the sites downstream of its earliest member that are not members.
    Every readout that is neither downstream nor the ablated site itself is "upstream": its
    direct effect changes only through the final norm's scale sigma -- except the downstream
    mixer sites of a model of one-part blocks, which :func:`downstream_mixer_mask` gives.
    """
    down, self_mask, r_sites = _downstream_and_self(ablated, readouts, parallel_residual)
    is_attn = torch.tensor([r.is_attention for r in r_sites], dtype=torch.bool)
    is_mlp = torch.tensor([r.kind == "mlp" for r in r_sites], dtype=torch.bool)
    return down & is_attn, down & is_mlp, self_mask


def downstream_mixer_mask(
    ablated: list[str], readouts: list[str], parallel_residual: bool
) -> Tensor:
    """Boolean mask [n_ablated, n_readouts] of the downstream ``mixer.l`` readout sites (all
    False in a model with attention and MLP sites).

    >>> downstream_mixer_mask(["mixer.0"], ["embed", "mixer.0", "mixer.1"], False).tolist()
    [[False, False, True]]
    """
    down, _, r_sites = _downstream_and_self(ablated, readouts, parallel_residual)
    return down & torch.tensor([r.kind == "mixer" for r in r_sites], dtype=torch.bool)
