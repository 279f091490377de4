"""Site names of a transformer's residual stream, and which sites are downstream of which.

Names a person can type, numbered from 0 as in Hugging Face (``docs/conventions.md``, "Sites"):

- ``embed``: the token (+ position) embedding at the readout position;
- ``attn.l``: attention layer l's output (what it adds to the residual stream);
- ``attn.l.hH``: head H of attention layer l (its output through its slice of the output
  projection); the heads of a layer sum to ``attn.l``;
- ``mlp.l``: MLP layer l's output.

>>> parse_site("attn.12.h3")
Site(name='attn.12.h3', kind='head', layer=12, head=3)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import UnknownNodeError

SiteKind = Literal["embed", "attn", "head", "mlp"]

_SITE = re.compile(r"^(?:(embed)|(attn|mlp)\.(\d+)|attn\.(\d+)\.h(\d+))$")


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
    """Parse ``embed``, ``attn.l``, ``mlp.l`` or ``attn.l.hH``; UnknownNodeError otherwise."""
    m = _SITE.match(name)
    if m is None:
        raise UnknownNodeError(
            f"site {name!r} is not a site name; expected 'embed', 'attn.L', 'mlp.L' or "
            "'attn.L.hH' with L and H numbered from 0 (e.g. 'attn.0', 'mlp.12', 'attn.3.h1')"
        )
    if m.group(1):
        return Site(name, "embed", -1)
    if m.group(2):
        return Site(name, m.group(2), int(m.group(3)))  # type: ignore[arg-type]
    return Site(name, "head", int(m.group(4)), int(m.group(5)))


def is_downstream(readout: Site, ablated: Site, parallel_residual: bool) -> bool:
    """Whether ``readout``'s value can change when ``ablated`` is intervened on (paper Eq 33).

    Attention sites are downstream when their layer is after the ablated site's layer. MLP
    sites are downstream from the ablated layer on when an attention site (a layer or a head)
    is ablated, and after it when an MLP site is ablated; in parallel-residual models (GPT-NeoX,
    GPT-J) the MLP of the ablated attention's own layer reads the same input and is not
    downstream. The embedding is never downstream; nor are other heads of the same layer.
    """
    if readout.kind == "embed" or ablated.kind == "embed":
        return readout.kind != "embed" and ablated.kind == "embed"
    if readout.is_attention:
        return readout.layer > ablated.layer
    if ablated.is_attention and not parallel_residual:
        return readout.layer >= ablated.layer
    return readout.layer > ablated.layer


def downstream_masks(
    ablated: list[str], readouts: list[str], parallel_residual: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boolean masks [n_ablated, n_readouts]: downstream attention, downstream MLP, self.

    Every readout that is neither downstream nor the ablated site itself is "upstream": its
    direct effect changes only through the final norm's scale sigma.
    """
    a_sites = [parse_site(s) for s in ablated]
    r_sites = [parse_site(s) for s in readouts]
    down = torch.tensor(
        [[is_downstream(r, a, parallel_residual) for r in r_sites] for a in a_sites],
        dtype=torch.bool,
    ).reshape(len(a_sites), len(r_sites))
    is_attn = torch.tensor([r.is_attention for r in r_sites], dtype=torch.bool)
    is_mlp = torch.tensor([r.kind == "mlp" for r in r_sites], dtype=torch.bool)
    self_mask = torch.tensor(
        [[r.name == a.name for r in r_sites] for a in a_sites], dtype=torch.bool
    ).reshape(len(a_sites), len(r_sites))
    return down & is_attn, down & is_mlp, self_mask
