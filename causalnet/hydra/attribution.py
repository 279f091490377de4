"""Attribution patching: the first-order estimate of every site's total effect (issue 13, §5).

Attribution patching (AtP) replaces each patched re-forward by one gradient. For an outcome Y
(here the centred target logit, Eq 9) and a node Z with natural value z, the total effect of
do(Z = z') (Eq 14) is estimated by its first-order Taylor term at the clean run,

    TE_AtP(Z -> z') = (z' - z) . dY/dz,

so ONE forward and ONE backward pass per prompt give the gradient with respect to every site at
once, and every patch source's estimate is a dot product. The exact total effect is what the
protocol computes by re-running the model (:mod:`causalnet.hydra.plan`); AtP is exact when Y is
affine in z along the segment z -> z' and misses exactly what is not: a downstream response
that switches on, saturates or cancels nonlinearly -- self-repair (``causalnet.toys``).

Two levels, one definition:

- :func:`node_gradients` / :func:`attribution_patch`: any :class:`causalnet.scm.SCM`, through
  the engine's soft interventions (a zero leaf tensor is added to every asked node, and the
  outcome is differentiated with respect to those leaves). Contexts of a batch must not
  interact (the gradient of the batch's summed outcome is taken), as the engine's effects
  assume.
- :func:`prompt_gradients` / :func:`attribution_table`: a transformer through its SCM
  (:func:`causalnet.adapters.scm.to_scm`); the outcome is the model's own centred logit of the
  clean target at the last position, its final norm's scale sigma *not* frozen (the total
  effect moves sigma too). :func:`attribution_table` takes the ablation values of a sweep's plan
  (:func:`causalnet.hydra.pool.ablation_values`), so its rows estimate exactly the rows of the
  sweep's ``effects`` table; :mod:`causalnet.hydra.attribution_compare` sets them side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import torch
from torch import Tensor

from ..errors import InterventionError, ModelError, ShapeError, UnknownNodeError
from ..sites import is_site_set, members, parse_unit
from .pool import ablation_values

if TYPE_CHECKING:
    from ..adapters import TransformerAdapter
    from ..scm import SCM, DoValue
    from .plan import SweepPlan

Outcome = str | Callable[[Mapping[str, Tensor]], Tensor]


def node_gradients(
    scm: SCM,
    ctx: Mapping[str, Tensor],
    nodes: Sequence[str],
    outcome: Outcome,
    do: Mapping[str, DoValue] | None = None,
    hold_at: int | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """(natural values, gradients, outcome) of one differentiable run of ``scm``.

    ``outcome`` is a node whose value is [B] or a function ``values -> [B]``. The gradient of
    node Z is dY_b/dz_b for each context b, of Z's full shape [B, ...] (zero where Z does not
    reach Y). ``do`` may fix other nodes; an asked node may not be intervened on.

    ``hold_at``: a position (dimension 1). The asked nodes' values there are cut from what
    computes them, so at that position the gradient of each asked node holds the others fixed:
    the partial derivatives of one joint intervention on all of them there (a set of sites),
    not the total derivative through the later ones.
    """
    do = dict(do or {})
    clash = sorted(set(nodes) & set(do))
    if clash:
        raise InterventionError(f"node(s) {clash} are intervened on; their gradient is not asked")
    leaves: dict[str, Tensor] = {}

    def probe(name: str) -> Callable[[Tensor], Tensor]:
        def add_zero(natural: Tensor) -> Tensor:
            if not natural.is_floating_point():
                raise ShapeError(f"node {name!r} holds {natural.dtype} values: no gradient")
            leaf = torch.zeros_like(natural, requires_grad=True)
            leaves[name] = leaf
            if hold_at is not None:
                held = torch.zeros_like(natural, dtype=torch.bool)
                held[:, hold_at] = True
                natural = torch.where(held, natural.detach(), natural)
            return natural + leaf

        return add_zero

    with torch.enable_grad():
        values = scm.run(ctx, do={**do, **{n: probe(n) for n in nodes}})
        y = values[outcome] if isinstance(outcome, str) else outcome(values)
        if not isinstance(y, Tensor) or y.dim() != 1:
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ShapeError(f"the outcome must be one number per context, [B]; got {shape}")
        grads = torch.autograd.grad(y.sum(), [leaves[n] for n in nodes], allow_unused=True)
    gradients = {
        n: torch.zeros_like(leaves[n]) if g is None else g
        for n, g in zip(nodes, grads, strict=True)
    }
    natural = {n: values[n].detach() for n in nodes}  # the leaves are zero: natural values
    return natural, gradients, y.detach()


def attribution_patch(
    scm: SCM, ctx: Mapping[str, Tensor], node: str, outcome: Outcome, value: Tensor | float
) -> Tensor:
    """First-order estimate of TE(node -> value, outcome) (Eq 14) per context: [B].

    ``(value - z) . dY/dz`` summed over the node's trailing dimensions; ``value`` broadcasts
    to the node's shape. Exact when the outcome is affine in the node (test: a linear SCM).
    """
    natural, grads, _ = node_gradients(scm, ctx, [node], outcome)
    z = natural[node]
    v = torch.as_tensor(value, dtype=z.dtype, device=z.device)
    try:
        step = v.broadcast_to(z.shape) - z
    except RuntimeError as err:
        raise ShapeError(
            f"a value of shape {tuple(v.shape)} does not broadcast to node {node!r}'s shape "
            f"{tuple(z.shape)}"
        ) from err
    return (step * grads[node]).reshape(z.shape[0], -1).sum(1)


# ---- a transformer ---------------------------------------------------------------------------


@dataclass
class PromptGradients:
    """One prompt's clean run and its gradient at the last position t.

    ``sites``: the readout sites of the granularity (``embed`` first); ``values`` [R, d]: their
    clean values at t; ``gradients`` [R, d]: d(centred logit of ``target``)/d(site value at t),
    sigma moving with the sites; ``centred_logit``: that logit in the clean run (Eq 9).
    """

    target: int
    position: int
    sites: list[str]
    values: Tensor
    gradients: Tensor
    centred_logit: float

    def estimate(self, sites: list[str], patch_values: Tensor) -> Tensor:
        """AtP total effects [S, P] of do(site_s = patch_values[s, p]) at t, in float64."""
        unknown = [s for s in sites if s not in self.sites]
        if unknown:
            raise UnknownNodeError(f"site(s) {unknown} are not readout sites of this run")
        index = [self.sites.index(s) for s in sites]
        d = self.values.shape[1]
        if (
            patch_values.dim() != 3
            or patch_values.shape[0] != len(index)
            or patch_values.shape[2] != d
        ):
            raise ShapeError(
                f"patch values have shape {tuple(patch_values.shape)}, expected "
                f"({len(index)}, n_patches, {d})"
            )
        v = self.values[index].double()[:, None]
        g = self.gradients[index].double()[:, None]
        return ((patch_values.double().to(v.device) - v) * g).sum(-1)


def prompt_gradients(
    adapter: TransformerAdapter, tokens: Tensor, granularity: str = "layer", scm: SCM | None = None
) -> PromptGradients:
    """One forward and one backward pass of the adapter's SCM on ``tokens`` [T].

    The outcome is the centred logit (Eq 9) of i = argmax of the clean logits at t = T - 1
    (Eq 10) from the SCM's ``logits`` node (the model's own logits at the natural sigma).
    ``scm``: ``to_scm(adapter, granularity)``, built once by the caller for many prompts.
    """
    from ..adapters.scm import to_scm

    if granularity == "head" and getattr(adapter.arch, "sublayer_norms", False):
        raise ModelError(
            f"{adapter.arch.family}: attribution patching of heads is not offered under a norm "
            "after the attention (a head's patch moves the norm's scale, docs/conventions.md "
            "'Heads under a norm after the attention'); use granularity='layer'"
        )
    if scm is None:
        scm = to_scm(adapter, granularity)
    sites = adapter.readout_sites(granularity)
    tokens = torch.as_tensor(tokens).reshape(1, -1).to(adapter.device)
    t = tokens.shape[1] - 1
    chosen: list[int] = []

    def centred(values: Mapping[str, Tensor]) -> Tensor:
        logits = values["logits"][:, t]
        target = int(logits[0].detach().argmax())
        chosen.append(target)
        return logits[:, target] - logits.mean(-1)

    natural, grads, y = node_gradients(scm, {"tokens": tokens}, sites, centred)
    return PromptGradients(
        target=chosen[0],
        position=t,
        sites=list(sites),
        values=torch.stack([natural[s][0, t] for s in sites]),
        gradients=torch.stack([grads[s][0, t] for s in sites]),
        centred_logit=float(y[0]),
    )


def set_estimate(
    adapter: TransformerAdapter,
    tokens: Tensor,
    site_set: str,
    patch_values: Tensor,
    granularity: str = "layer",
    scm: SCM | None = None,
) -> Tensor:
    """AtP total effects [P] of one set of sites ablated together (``a+b``, docs/conventions.md
    "Sets of sites"): the first-order term of the joint intervention, in float64,

        TE_AtP = sum over members m of (v'_m - v_m) . dY/dv_m (the other members held),

    the partial derivatives at t with every other member's value there fixed
    (:func:`node_gradients`' ``hold_at``): a later member is patched, so the path from an earlier
    member through it is cut, as in the exact run. ``patch_values`` [n_members, P, d]: each
    member's patch values (members in residual order). One more forward and backward pass.
    """
    from ..adapters.scm import to_scm

    names = members(site_set)
    if scm is None:
        scm = to_scm(adapter, granularity)
    tokens = torch.as_tensor(tokens).reshape(1, -1).to(adapter.device)
    t = tokens.shape[1] - 1
    if patch_values.dim() != 3 or patch_values.shape[0] != len(names):
        raise ShapeError(
            f"patch values of set {site_set!r} have shape {tuple(patch_values.shape)}, expected "
            f"({len(names)}, n_patches, d)"
        )

    def centred(values: Mapping[str, Tensor]) -> Tensor:
        logits = values["logits"][:, t]
        return logits[:, int(logits[0].detach().argmax())] - logits.mean(-1)

    natural, grads, _ = node_gradients(scm, {"tokens": tokens}, names, centred, hold_at=t)
    v = torch.stack([natural[m][0, t] for m in names]).double()[:, None]
    g = torch.stack([grads[m][0, t] for m in names]).double()[:, None]
    return ((patch_values.double().to(v.device) - v) * g).sum(-1).sum(0)


def attribution_table(
    adapter: TransformerAdapter, plan: SweepPlan, indices: Sequence[int] | None = None
) -> pd.DataFrame:
    """AtP estimates of the total effects of a sweep's rows: one per (prompt, ablated site).

    The patch values are the sweep's own (``ablation_values(plan.config, plan.pool, index)``),
    so row (u, k) estimates the ``total_effect`` of the sweep's row (u, k): the mean over the
    same patches (Eq 39) of (v_p - v) . dY/dv. A set of sites (kind ``"set"``) is estimated by
    :func:`set_estimate` (its members' terms summed, the other members held). Columns:
    prompt_id, site, kind, layer, head, target_token, clean_centred_logit, atp_total_effect,
    atp_total_effect_std (over patches).
    """
    from ..adapters.scm import to_scm
    from .plan import pool_sites

    granularity = plan.config.granularity
    scm = to_scm(adapter, granularity)
    parsed = [parse_unit(s) for s in plan.sites]
    columns = pool_sites(plan.sites, plan.readout_sites)  # the pool's (member) columns
    frames = []
    for index in range(len(plan.prompts)) if indices is None else indices:
        grads = prompt_gradients(adapter, plan.tokens[index], granularity, scm)
        values, _ = ablation_values(plan.config, plan.pool, index)
        rows = []
        for site in plan.sites:
            own = values[[columns.index(m) for m in members(site)]]
            if is_site_set(site):
                rows.append(set_estimate(adapter, plan.tokens[index], site, own, granularity, scm))
            else:
                rows.append(grads.estimate([site], own)[0])
        est = torch.stack(rows).cpu()
        frames.append(
            pd.DataFrame(
                {
                    "prompt_id": [plan.prompts[index].id] * len(plan.sites),
                    "site": plan.sites,
                    "kind": [p.kind for p in parsed],
                    "layer": [p.layer for p in parsed],
                    "head": [p.head for p in parsed],
                    "target_token": grads.target,
                    "clean_centred_logit": grads.centred_logit,
                    "atp_total_effect": est.mean(1).numpy(),
                    "atp_total_effect_std": est.std(1, unbiased=False).numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)
