"""A transformer adapter seen as a :class:`causalnet.scm.SCM` (paper Section 3, Figure 4).

:func:`to_scm` builds the structural causal model of an adapter's compute graph in the paper's
unrolled view (Eqs 21-24). The exogenous node is ``tokens`` [B, T] (the prompt ``x_{<=t}``); every
endogenous node holds a full-sequence tensor, so that attention's reads across positions stay
inside the node mechanisms:

=============  ========================================  =====================================
node           parents                                   value
=============  ========================================  =====================================
``embed``      ``tokens``                                z^0 [B, T, d]
``attn.l``     ``resid.{l-1}`` (``embed`` for l = 0)     a^l = Attn(z^{l-1}_{<=t}) (Eq 5)
``attn.l.hH``  ``resid.{l-1}``                           head H's share of a^l (head view)
``mlp.l``      sequential: ``resid.{l-1}``, ``attn.l``   m^l = MLP(z^{l-1} + a^l) (Eq 6)
               parallel: ``resid.{l-1}``                 m^l = MLP(z^{l-1})
``resid.l``    ``resid.{l-1}``, ``attn.l``, ``mlp.l``    z^l = z^{l-1} + a^l + m^l (Eq 4)
``sigma``      ``embed``, every attn / head, every mlp   sigma(z^L) [B, T] (Eq 8)
``logits``     ``embed``, every attn / head, every mlp,  pi = norm_sigma(z^L) W_U (Eqs 22-24)
               ``sigma``
=============  ========================================  =====================================

At head granularity (``granularity="head"``) the nodes ``attn.l.hH`` replace ``attn.l`` wherever
it appears (there is no ``attn.l`` node). ``sigma`` and ``logits`` read the sites themselves,
never ``resid.L``, with ``z^L = embed + sum_l (a^l + m^l)`` (Eq 21). Hence the engine's direct
effect of a site on ``logits`` -- every other endogenous node, ``sigma`` included, held at its
natural value (Def 3.3, Eq 20) -- is exactly the unembedding of the change at the frozen final
scale (Eqs 25-28): ``DE = (c' - c) . w_i / sigma`` for the centred logit of token i.

The ``logits`` mechanism evaluates the final norm at the scale given by its ``sigma`` parent,
``pi(z, s) = pi(0) + (pi(z) - pi(0)) * sigma(z) / s``, which for a final norm of the form
``g * P z / sigma(z) + b`` (RMSNorm: P = 1; LayerNorm: P = centring) followed by an affine
unembedding is exactly ``(g * P z / s + b) W_U (+ beta)``, using only the adapter's contract
(:meth:`logits`, :meth:`final_scale`). At the natural ``s = sigma(z)`` it is the model's logits.

Interventions are the engine's: ``scm.run({"tokens": x}, do={"attn.3": at_positions(0.0)})``
zero-ablates attention layer 3 at the final position only (Eq 11).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from causalnet.errors import CausalNetError, ModelError, ShapeError
from causalnet.scm import SCM

from .base import Granularity, TransformerAdapter

__all__ = ["to_scm", "at_positions"]

Positions = int | Sequence[int] | Tensor


def at_positions(value: Tensor | float, positions: Positions = -1) -> Callable[[Tensor], Tensor]:
    """A soft intervention replacing a node's value at the given token positions only.

    Returns ``g(natural) -> natural'`` with ``natural'[:, p] = value`` for ``p`` in
    ``positions`` (default: the final position ``t``, as in Eq 11) and ``natural'`` equal to the
    node's natural value everywhere else. ``value`` is a number or a tensor broadcastable to
    ``natural[:, positions]`` (e.g. ``[d]`` or ``[B, d]`` for one position of a [B, T, d] node).
    """
    if isinstance(positions, Tensor):
        if positions.dtype not in (torch.int64, torch.int32, torch.bool):
            raise ShapeError(f"positions must be integer indices, got dtype {positions.dtype}")
    elif not isinstance(positions, int):
        positions = list(positions)

    def intervene(natural: Tensor) -> Tensor:
        if natural.dim() < 2:
            raise ShapeError(
                f"at_positions needs a node of shape [B, T, ...], got {tuple(natural.shape)}"
            )
        out = natural.clone()
        try:
            target = out[:, positions]
        except IndexError as e:
            raise ShapeError(
                f"at_positions: positions {positions!r} are out of range for a node of shape "
                f"{tuple(natural.shape)}"
            ) from e
        v = torch.as_tensor(value, dtype=natural.dtype, device=natural.device)
        try:
            out[:, positions] = v.broadcast_to(target.shape)
        except RuntimeError as e:
            raise ShapeError(
                f"at_positions: a value of shape {tuple(v.shape)} does not broadcast to the "
                f"shape {tuple(target.shape)} of positions {positions!r} of a node of shape "
                f"{tuple(natural.shape)}"
            ) from e
        return out

    return intervene


def _check_granularity(granularity: str) -> None:
    if granularity not in ("layer", "head"):
        raise CausalNetError(f"granularity must be 'layer' or 'head', got {granularity!r}")


def _attn_names(adapter: TransformerAdapter, layer: int, granularity: Granularity) -> list[str]:
    if granularity == "layer":
        return [f"attn.{layer}"]
    return [f"attn.{layer}.h{h}" for h in range(adapter.arch.n_heads)]


def _heads_z(adapter: TransformerAdapter, layer: int, resid: Tensor) -> Tensor:
    """Layer ``layer``'s heads before the output projection, z [B, T, H, dh] (Eq 5).

    The adapter's shared causal attention (:meth:`TransformerAdapter.attention`: grouped
    key/value heads, sliding windows) over the full sequence read at positions 0 .. T-1.
    """
    positions = torch.arange(resid.shape[-2], device=resid.device)
    return adapter.attention(layer, resid, positions)


class _HeadOutputs:
    """All heads' outputs of one layer, computed once per run (head granularity).

    In one run every ``attn.l.hH`` node of layer l receives the same ``resid.{l-1}`` tensor, so
    the layer's attention is computed for the first head asked and served to the others. The
    cache is dropped as soon as every head has been served, and ignored when the residual is a
    different tensor (or was changed in place, seen through ``Tensor._version``), so nothing is
    carried from one run to the next.
    """

    def __init__(self, adapter: TransformerAdapter, layer: int) -> None:
        self.adapter = adapter
        self.layer = layer
        self._clear()

    def _clear(self) -> None:
        self._resid: Tensor | None = None
        self._version = -1
        self._value: Tensor | None = None
        self._served: set[int] = set()

    def __call__(self, head: int, resid: Tensor) -> Tensor:
        """``attn.l.hH`` = head H's contribution to a^l [B, T, d]."""
        if self._value is None or self._resid is not resid or self._version != resid._version:
            z = _heads_z(self.adapter, self.layer, resid)
            self._value = self.adapter.head_outputs(self.layer, z)  # [B, T, H, d]
            self._resid, self._version, self._served = resid, resid._version, set()
        out = self._value[..., head, :]
        self._served.add(head)
        if len(self._served) == self.adapter.arch.n_heads:
            self._clear()
        return out


def _attention_layer(adapter: TransformerAdapter, layer: int, resid: Tensor) -> Tensor:
    """``attn.l`` = the layer's attention output a^l [B, T, d] (Eq 5)."""
    return adapter.attn_output(layer, _heads_z(adapter, layer, resid))


def _mlp(adapter: TransformerAdapter, layer: int, resid: Tensor, *attn: Tensor) -> Tensor:
    """``mlp.l`` = MLP(z^{l-1} + a^l) (sequential) or MLP(z^{l-1}) (parallel; no ``attn``)."""
    for a in attn:
        resid = resid + a
    return adapter.mlp(layer, resid)


def _sum(*summands: Tensor) -> Tensor:
    """``resid.l = z^{l-1} + a^l + m^l`` (Eq 4), added left to right as the model does."""
    out = summands[0]
    for s in summands[1:]:
        out = out + s
    return out


def _sigma(adapter: TransformerAdapter, *sites: Tensor) -> Tensor:
    """``sigma = sigma(z^L)`` with ``z^L = embed + sum_l (a^l + m^l)`` (Eqs 8, 21): [B, T]."""
    return adapter.final_scale(_sum(*sites))


def _logits(adapter: TransformerAdapter, *sites_and_sigma: Tensor) -> Tensor:
    """``pi = norm(z^L) W_U`` with the norm's scale set to the ``sigma`` parent (Eqs 22-24).

    ``pi(z, s) = pi(0) + (pi(z) - pi(0)) * sigma(z) / s``: for ``norm(z) = g * P z / sigma(z)
    + b`` and an affine unembedding this is ``(g * P z / s + b) W_U (+ beta)`` exactly.
    """
    *sites, sigma = sites_and_sigma
    z = _sum(*sites)
    natural = adapter.logits(z)
    at_zero = adapter.logits(torch.zeros_like(z[..., :1, :]))
    ratio = adapter.final_scale(z) / sigma
    return at_zero + (natural - at_zero) * ratio.unsqueeze(-1)


def to_scm(adapter: TransformerAdapter, granularity: Granularity = "layer") -> SCM:
    """The adapter's compute graph as a structural causal model (Section 3, Eqs 21-24).

    See the module docstring for the nodes and edges. ``granularity="head"`` splits every
    attention layer into its heads ``attn.l.hH`` (no ``attn.l`` node). The edges follow the
    model's real residual wiring, read from ``adapter.arch.parallel_residual``.

    >>> scm = to_scm(adapter)                                     # doctest: +SKIP
    >>> logits = scm.run({"tokens": tokens})["logits"]            # doctest: +SKIP
    """
    _check_granularity(granularity)
    if not isinstance(adapter, TransformerAdapter):
        family = getattr(getattr(adapter, "arch", None), "family", type(adapter).__name__)
        raise ModelError(
            f"to_scm needs a hand-written family's block methods (embed, attention, MLP as "
            f"functions of the residual); this {family} model is a {type(adapter).__name__} "
            "(discovered: its blocks run only as the model's own modules), so its SCM view, and "
            "attribution patching on it, are not built; its exact effects come from "
            "adapter.patch and the sweep"
        )
    arch = adapter.arch
    scm = SCM()
    scm.add_exogenous("tokens")
    scm.add_node("embed", parents=["tokens"], fn=adapter.embed)
    sites = ["embed"]
    prev = "embed"
    for layer in range(arch.n_layers):
        attn = _attn_names(adapter, layer, granularity)
        if granularity == "layer":
            scm.add_node(attn[0], parents=[prev], fn=partial(_attention_layer, adapter, layer))
        else:
            heads = _HeadOutputs(adapter, layer)
            for h, name in enumerate(attn):
                scm.add_node(name, parents=[prev], fn=partial(heads, h))
        mlp = f"mlp.{layer}"
        mlp_parents = [prev] if arch.parallel_residual else [prev, *attn]
        scm.add_node(mlp, parents=mlp_parents, fn=partial(_mlp, adapter, layer))
        resid = f"resid.{layer}"
        scm.add_node(resid, parents=[prev, *attn, mlp], fn=_sum)
        sites += [*attn, mlp]
        prev = resid
    scm.add_node("sigma", parents=sites, fn=partial(_sigma, adapter))
    scm.add_node("logits", parents=[*sites, "sigma"], fn=partial(_logits, adapter))
    return scm
