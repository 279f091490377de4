"""The hooked forward of a discovered decoder, and patching by batched hooked re-forwards.

:func:`record` runs the model's OWN forward with hooks on the discovered modules
(:class:`causalnet.adapters.discover.Decomposition`) and returns every site's value
(:class:`Trace`), optionally with do(site = value) at one position per row:

- ``embed`` = the first block's input; ``attn.l`` = alpha_l * (the attention part's output);
  ``mlp.l`` = beta_l * (the MLP part's output); ``attn.l.hH`` = alpha_l * head H's term of the
  output projection (:mod:`causalnet.adapters.heads`);
- do(site = v) at position t replaces that output at t (by v / alpha_l); a head's term is
  replaced inside the output projection's output;
- in a model of one-part blocks (``parts.one_part``, Mamba) ``mixer.l`` = gamma_l * (the
  mixer's output), patched the same way; ``attn`` and ``mlp`` are then empty;
- under a norm after the attention (``parts.post_norms``) a head's value is its share
  c(o) * o_H, c(o) = alpha_l * gamma / s(o) (:class:`causalnet.adapters.heads.PostNorm`), at the
  run's own scale; do(attn.l.hH = v) moves its term to o_H + (v - c(o) o_H) / c(o) at the clean
  scale and the model's own norm renormalises o' (see docs/conventions.md,
  "Heads under a norm after the attention"); the heads of the patched run are shares at s(o').

:func:`reforward_patch` is the patch engine of last resort (and the fast engine's reference,
:mod:`causalnet.adapters.replay`): the prompt re-run in full for every (site, patch) row, rows
batched in chunks. Hooks are global to the modules, so the caller holds the adapter's lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from causalnet.sites import Site

from .heads import head_terms
from .hooks import HookSet, call_model, first, hidden_in, with_first, with_hidden_in
from .readout import accumulation_dtype
from .records import CleanRun, Granularity, PatchedRun

ROW_BUDGET = 1 << 25  # rows * tokens * d of one patch forward


@dataclass
class Trace:
    """One hooked forward, every value at the chosen positions ([B, ...] with ``at``, else
    [B, T, ...]). ``attn``/``mlp``/``pre`` hold one entry per layer; ``heads`` [.., H, d] (None
    for a layer whose heads were not recorded: a head patched in a layer-granularity run records
    its own layer's only)."""

    embed: Tensor
    pre: list[Tensor]
    attn: list[Tensor]
    mlp: list[Tensor]
    heads: list[Tensor | None] | None
    final: Tensor
    unembedded: Tensor
    logits: Tensor
    mixer: list[Tensor] | None = None  # one-part blocks: mixer.l per layer (attn, mlp empty)
    cache: Any = None  # the model's own cache of this forward (``record(keep_cache=True)``)


def record(
    adapter: Any,
    tokens: Tensor,
    at: Tensor | None = None,
    patches: list[tuple[Site, Tensor, Tensor]] | None = None,
    heads: bool = False,
    last_only: bool = False,
    keep_cache: bool = False,
) -> Trace:
    """Run ``adapter``'s model on ``tokens`` [B, T] with do(site = value) for every ``(site,
    rows, values [n, d])`` of ``patches`` at the positions ``at[rows]``, recording every site at
    the positions ``at`` [B] (None: all positions); with ``keep_cache`` the model runs with its
    own cache and the trace keeps it (the fast patch engine's earlier keys and values)."""
    p = adapter.parts
    n_b, n_t = tokens.shape
    rows_all = torch.arange(n_b, device=tokens.device)
    by: dict[tuple[str, int], list[tuple[Site, Tensor, Tensor]]] = {}
    for site, rows, vals in patches or []:
        kind = "o_proj" if site.kind == "head" else site.kind
        by.setdefault((kind, site.layer), []).append((site, rows, vals))

    def pick(x: Tensor) -> Tensor:
        if at is None:
            return x
        if x.shape[1] == n_t:
            return x[rows_all, at]
        return x[:, -1]  # logits kept at one position per row (last_only, or ``at``)

    rec: dict[str, Any] = {"pre": [None] * p.n_layers, "z": [None] * p.n_layers}
    rec.update(o=[None] * p.n_layers, moved=[])
    post = p.post_norms or [None] * p.n_layers
    rec.update(attn=[None] * p.n_layers, mlp=[None] * p.n_layers, mixer=[None] * p.n_layers)

    def put(x: Tensor, key: tuple[str, int], scale: float) -> Tensor:
        entries = by.get(key)
        if not entries:
            return x
        x = x.clone()
        for _, rows, vals in entries:
            x[rows, at[rows]] = (vals / scale).to(x.dtype)
        return x

    def block_pre(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            x = hidden_in(args, kwargs)
            if layer == 0 and ("embed", -1) in by:
                x = put(x, ("embed", -1), 1.0)
                args, kwargs = with_hidden_in(args, kwargs, x)
            rec["pre"][layer] = pick(x).clone()
            return args, kwargs

        return hook

    def part(kind: str, layer: int, scale: float) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            y = put(first(output), (kind, layer), scale)
            rec[kind][layer] = pick(y) * scale
            return with_first(output, y)

        return hook

    def o_pre(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            rec["z"][layer] = pick(hidden_in(args, kwargs)).clone()

        return hook

    def o_patch(layer: int, scale: float) -> Any:
        norm = post[layer]

        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            out = output.clone()
            for site, rows, vals in by.get(("o_proj", layer), []):
                z = args[0][rows, at[rows]]
                own = head_terms(module, z, p.n_heads)[:, site.head]
                if norm is None:
                    out[rows, at[rows]] += (vals / scale).to(out.dtype) - own
                    continue
                c = norm.factor(output[rows, at[rows]], scale)  # at this run's unpatched o
                delta = (vals.to(c.dtype) - c * own.to(c.dtype)) / c
                out[rows, at[rows]] = (out[rows, at[rows]].to(c.dtype) + delta).to(out.dtype)
                rec["moved"].append((layer, rows, site.head, delta))
            if norm is not None:
                rec["o"][layer] = pick(out).clone()
            return out

        return hook

    def final_pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        rec["final"] = pick(hidden_in(args, kwargs)).clone()

    def unembed_post(module: nn.Module, args: tuple, out: Any) -> None:
        rec["unembedded"] = pick(first(out)).clone()

    with HookSet() as hooks, torch.no_grad():
        for layer in range(p.n_layers):
            hooks.pre(p.blocks[layer], f"block.{layer}", block_pre(layer))
            if p.mixer is not None:
                mix = part("mixer", layer, p.gamma[layer])
                hooks.part(p.blocks[layer], p.mixer[layer], f"mixer.{layer}", mix)
                continue
            alpha = p.alpha[layer]
            if p.o_proj is not None and (heads or ("o_proj", layer) in by):
                hooks.pre(p.o_proj[layer], f"o_proj.{layer}", o_pre(layer))
                if ("o_proj", layer) in by or post[layer] is not None:
                    hooks.post(p.o_proj[layer], f"patch.{layer}", o_patch(layer, alpha))
            hooks.part(p.blocks[layer], p.attn[layer], f"attn.{layer}", part("attn", layer, alpha))
            hooks.part(
                p.blocks[layer], p.mlp[layer], f"mlp.{layer}", part("mlp", layer, p.beta[layer])
            )
        final = p.final_norm.module
        hooks.pre(p.readout.unembed if final is None else final, "final", final_pre)
        hooks.post(p.readout.unembed, "unembed", unembed_post)
        kept: list[Any] | None = [] if keep_cache else None
        # a clean run's logits are read at ``at`` only: the model projects just those rows
        # where it can (not a patched run: a refused first try would record patches twice)
        where = at if at is not None and not last_only and not by else None
        logits = call_model(adapter.model, tokens, last_only, kept, positions=where)
        hooks.check()
        head_vals = None
        if p.o_proj is not None and (heads or any(k[0] == "o_proj" for k in by)):
            # every layer's heads (a head-granularity run), or the patched layers' (a head
            # patched in a layer-granularity run: only their o_proj inputs were recorded)
            head_vals = [
                None
                if rec["z"][lay] is None
                else head_terms(p.o_proj[lay], rec["z"][lay], p.n_heads) * p.alpha[lay]
                if post[lay] is None
                else _shares(post[lay], p, lay, rec)
                for lay in range(p.n_layers)
            ]
            for (kind, lay), entries in by.items():
                if kind != "o_proj" or post[lay] is not None:
                    continue
                hits = torch.zeros(n_b, dtype=torch.long, device=tokens.device)
                for _, rows, _ in entries:
                    hits[rows] += 1
                for site, rows, vals in entries:  # read the patched head back
                    others = head_vals[lay][rows].sum(-2) - head_vals[lay][rows, site.head]
                    back = rec["attn"][lay][rows] - others
                    shared = hits[rows] > 1  # a set patched several heads of this layer
                    back[shared] = vals[shared].to(back.dtype)
                    head_vals[lay][rows, site.head] = back
    return Trace(
        embed=rec["pre"][0],
        pre=rec["pre"],
        attn=[] if p.one_part else rec["attn"],
        mlp=[] if p.one_part else rec["mlp"],
        heads=head_vals,
        final=rec["final"],
        unembedded=rec["unembedded"],
        logits=pick(logits),
        mixer=rec["mixer"] if p.one_part else None,
        cache=kept[0] if kept else None,
    )


def _shares(norm: Any, p: Any, layer: int, rec: dict[str, Any]) -> Tensor:
    """The heads of a layer under a norm after the attention: shares c(o') * o_H' at the run's
    own (patched) o', each patched head's term moved as the patch hook moved it."""
    o = rec["o"][layer]
    c = norm.factor(o, p.alpha[layer])
    terms = head_terms(p.o_proj[layer], rec["z"][layer], p.n_heads).to(c.dtype)
    for lay, rows, head, delta in rec["moved"]:
        if lay == layer:
            terms[rows, head] += delta
    return (terms * c.unsqueeze(-2)).to(o.dtype)


def site_values(tr: Trace, n_layers: int, granularity: Granularity) -> Tensor:
    """The readout sites' values [B, R, d] of a trace taken at one position per row."""
    if tr.mixer is not None:
        return torch.stack([tr.embed, *tr.mixer], dim=1)
    cols = [tr.embed]
    for layer in range(n_layers):
        if granularity == "head":
            assert tr.heads is not None
            cols += list(tr.heads[layer].unbind(-2))
        else:
            cols.append(tr.attn[layer])
        cols.append(tr.mlp[layer])
    return torch.stack(cols, dim=1)


def centred_logit(adapter: Any, tr: Trace, token: int) -> Tensor:
    """The model's centred logit of ``token`` (before any soft-cap) per row of a trace [B]."""
    pi = adapter.parts.readout.logit_scale * tr.unembedded.to(accumulation_dtype(adapter.dtype))
    return pi[..., token] - pi.mean(-1)


def reforward_patch(
    adapter: Any,
    clean: CleanRun,
    parsed: list[Site] | list[tuple[Site, ...]],
    values: Tensor,
    rows_per_forward: int | None = None,
) -> PatchedRun:
    """do(site_s = values[s, p]) (checked [S, P, d] in the model's dtype) at the clean run's
    position t for every (s, p) (a tuple of sites in ``parsed``: a set, every member patched
    in its rows, ``values`` one entry per member, flattened): a batched hooked re-forward of
    the prompt, each row read out at its own final scale (Eq 13), its centred logit the
    model's own and its total effect against the clean run (Eq 12). ``rows_per_forward``:
    at most that many rows in one forward (default: as many as fit :data:`ROW_BUDGET`; 1 for a
    model whose numbers depend on the batch)."""
    groups = [g if isinstance(g, tuple) else (g,) for g in parsed]
    n_s, (_, n_p, d) = len(groups), values.shape
    offsets = [0]
    for g in groups:
        offsets.append(offsets[-1] + len(g))
    t = clean.position
    prompt = clean.tokens[: t + 1].to(adapter.device)
    chunk = max(1, ROW_BUDGET // ((t + 1) * d * 8))
    if rows_per_forward is not None:
        chunk = max(1, min(chunk, rows_per_forward))
    w, acc = clean.readout_dir, accumulation_dtype(adapter.dtype)
    head = clean.granularity == "head"
    direct, sigma, centred = [], [], []
    for start in range(0, n_s * n_p, chunk):
        rows = torch.arange(start, min(start + chunk, n_s * n_p), device=adapter.device)
        patches = []
        for s_i, group in enumerate(groups):
            mine = rows[(rows // n_p) == s_i]
            if len(mine):
                for j, member in enumerate(group):  # a set: every member in the same rows
                    patches.append((member, mine - start, values[offsets[s_i] + j, mine % n_p]))
        tokens = prompt[None].expand(len(rows), -1)
        at = torch.full((len(rows),), t, device=adapter.device)
        tr = record(adapter, tokens, at=at, patches=patches, heads=head, last_only=True)
        s = adapter.final_scale(tr.final)
        vals = site_values(tr, adapter.arch.n_layers, clean.granularity)
        direct.append(vals.to(acc) @ w / s[:, None])
        sigma.append(s)
        centred.append(centred_logit(adapter, tr, clean.target))
    cent = torch.cat(centred).view(n_s, n_p)
    return PatchedRun(
        sites=["+".join(m.name for m in g) for g in groups],
        readout_sites=list(clean.readout_sites),
        direct_effects=torch.cat(direct).view(n_s, n_p, -1),
        sigma=torch.cat(sigma).view(n_s, n_p),
        centred_logit=cent,
        total_effect=cent - clean.centred_logit,
    )
