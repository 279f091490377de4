"""Numerical proof of a discovered decomposition before it is used (issue 10, section 1).

:func:`verify` runs the adapter's own hooked forward (the one clean runs and patches use) on a
probe and checks, at EVERY position:

- Eq 21 block by block: block l's input + attn.l + mlp.l (+ mixer.l alone in a model of
  one-part blocks, :mod:`causalnet.adapters.onepart`) = block l + 1's input (the final
  norm's input after the last block), and embed + sum of all sites = the final residual, within
  the dtype's tolerance of the stream's scale (1e-5 float32, 1e-10 float64);
- the logits: cap(s * (W_U norm(z) + beta)) from the identified final norm and readout equals
  the model's own logits;
- the readout: sum of direct effects (c . w_i) / sigma + const_i = the model's centred logit of
  i = argmax (before any soft-cap) (Eqs 9, 10, 24-28);
- heads (where available): the heads of each layer sum to its attention site.

A final norm computed in float32 inside a float64 model (Hugging Face's RMSNorms) bounds the
logit and readout checks at the float32 tolerance. A failure raises UnsupportedModelError naming
the block or part, the identity and by how much; nothing is approximated silently.

:func:`check_patching` is the independent oracle for patching: one plain hooked forward per
(site, patch), written separately from the adapter's batched engine, compared on the centred
logit, sigma and every readout site's direct effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from causalnet.errors import UnsupportedModelError

from .heads import head_terms
from .hooks import (
    HookSet,
    call_model,
    first,
    hidden_in,
    rel_err,
    tolerance,
    with_first,
    with_hidden_in,
)
from .measure import probe_tokens
from .readout import accumulation_dtype


@dataclass
class Verification:
    """The largest relative errors found on the probe, and the tolerances they passed."""

    blocks: list[float]  # per block, Eq 21 step (relative to the stream's scale)
    eq21: float  # embed + all sites vs the final residual
    logits: float  # the reconstructed logits vs the model's own
    readout: float  # sum of direct effects + const vs the centred logit
    heads: float | None  # heads vs their layer's attention site (None: no heads)
    tolerance: float
    readout_tolerance: float


def _fail(what: str, err: float, tol: float) -> UnsupportedModelError:
    return UnsupportedModelError(f"{what}: off by {err:.2e} of its scale (tolerance {tol:g})")


@torch.no_grad()
def verify(adapter: Any, tokens: Tensor | None = None) -> Verification:
    """Check ``adapter``'s decomposition on ``tokens`` [B, T] (default: a seeded probe); returns
    the errors, raises UnsupportedModelError on the first identity that fails (module doc)."""
    p = adapter.parts
    if tokens is None:
        tokens = probe_tokens(adapter.model, p.vocab_size)
    tr = adapter.record(tokens, heads=p.o_proj is not None)
    dtype = tr.final.dtype
    tol = tolerance(dtype)
    tol_r = max(tol, tolerance(p.final_norm.compute_dtype))
    scale = max(float(tr.final.abs().max()), max(float(x.abs().max()) for x in tr.pre), 1e-30)
    blocks = []
    # what each block adds: attn.l + mlp.l, or mixer.l in a model of one-part blocks
    parts = (
        [(m.double(), f"mixer.{i}") for i, m in enumerate(tr.mixer)]
        if tr.mixer is not None
        else [
            (a.double() + m.double(), f"attn.{i} + mlp.{i}")
            for i, (a, m) in enumerate(zip(tr.attn, tr.mlp, strict=True))
        ]
    )
    for layer, (added, names) in enumerate(parts):
        nxt = tr.pre[layer + 1] if layer + 1 < p.n_layers else tr.final
        err = float((tr.pre[layer].double() + added - nxt.double()).abs().max()) / scale
        blocks.append(err)
        if err > tol:
            what = "the final norm's input" if layer + 1 == p.n_layers else "the next block's input"
            raise _fail(
                f"block {p.block_names[layer]}: Eq 21 (its input + {names} = {what})", err, tol
            )
    total = tr.embed.double() + sum(added for added, _ in parts)
    eq21 = float((total - tr.final.double()).abs().max()) / scale
    if eq21 > tol:
        raise _fail("Eq 21 (embed + every site = the final residual)", eq21, tol)
    ro = p.readout
    with torch.no_grad():
        unembedded = (p.final_norm.apply(tr.final) * ro.input_scale) @ ro.weight.T
        if ro.bias is not None:
            unembedded = unembedded + ro.bias
        logit_err = rel_err(ro.logits(unembedded), tr.logits.double())
    if logit_err > tol_r:
        raise _fail("the logits from the identified final norm and unembedding", logit_err, tol_r)
    acc = accumulation_dtype(dtype)
    values = [tr.embed] + (
        list(tr.mixer)
        if tr.mixer is not None
        else [x for a, m in zip(tr.attn, tr.mlp, strict=True) for x in (a, m)]
    )
    stacked = torch.stack(values, -2).to(acc)  # [B, T, R, d]
    sigma = adapter.final_scale(tr.final)
    pi = ro.logit_scale * tr.unembedded.to(acc)
    readout_err = 0.0
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            target = int(torch.argmax(tr.logits[b, t]))
            w, const = adapter.readout(target)
            de = stacked[b, t] @ w / sigma[b, t]
            centred = float(pi[b, t, target] - pi[b, t].mean())
            size = max(float(de.abs().sum()) + abs(const), abs(centred), 1e-30)
            readout_err = max(readout_err, abs(float(de.sum()) + const - centred) / size)
    if readout_err > tol_r:
        raise _fail("direct effects + const = the centred logit (Eqs 9, 24)", readout_err, tol_r)
    head_err = None
    if tr.heads is not None:
        post = p.post_norms or [None] * p.n_layers
        for layer, (h, a) in enumerate(zip(tr.heads, tr.attn, strict=True)):
            err = rel_err(h.sum(-2), a)
            head_err = max(head_err or 0.0, err)
            # shares under a norm after the attention: the norm's own compute dtype bounds it
            norm = post[layer]
            tol_h = tol if norm is None else max(tol, tolerance(norm.fit.compute_dtype))
            if err > tol_h:
                where = f"block {p.block_names[layer]}: the heads of attn.{layer}"
                raise _fail(f"{where} sum to their attention site", err, tol_h)
    return Verification(blocks, eq21, logit_err, readout_err, head_err, tol, tol_r)


def _oracle_row(
    adapter: Any, prompt: Tensor, site: Any, value: Tensor
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """One plain hooked forward of ``prompt`` [T] with do(site = value) at its last position:
    (every readout site's value there [R, d] in layer granularity or heads, the final residual
    there [d], the centred logits there [V] before any cap)."""
    p = adapter.parts
    t = prompt.shape[0] - 1
    got: dict[str, Tensor] = {}

    def out_hook(name: str, scale: float, replace: bool) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            y = first(output)
            if replace:
                y = y.clone()
                y[0, t] = value / scale
            got[name] = y[0, t] * scale
            return with_first(output, y)

        return hook

    def embed_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        x = hidden_in(args, kwargs)
        if site.kind == "embed":
            x = x.clone()
            x[0, t] = value
            args, kwargs = with_hidden_in(args, kwargs, x)
        got["embed"] = x[0, t]
        return args, kwargs

    post = p.post_norms or [None] * p.n_layers

    def z_hook(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            z = args[0][0, t]
            got[f"z.{layer}"] = z
            if site.kind == "head" and site.layer == layer:
                output = output.clone()
                own = head_terms(module, z[None], p.n_heads)[0, site.head]
                if post[layer] is None:
                    output[0, t] += value / p.alpha[layer] - own
                else:  # the term whose share at this run's clean scale is the value
                    c = post[layer].factor(output[0, t], p.alpha[layer])
                    got["moved"] = (value.to(c.dtype) - c * own.to(c.dtype)) / c
                    output[0, t] = (output[0, t].to(c.dtype) + got["moved"]).to(output.dtype)
            got[f"o.{layer}"] = output[0, t]
            return output

        return hook

    def final_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        got["final"] = hidden_in(args, kwargs)[0, -1]

    def unembed_hook(module: nn.Module, args: tuple, output: Any) -> None:
        got["u"] = first(output)[0, -1]

    with HookSet() as hooks:
        hooks.pre(p.blocks[0], "embed", embed_hook)
        for layer in range(p.n_layers):
            if p.mixer is not None:
                hit = site.kind == "mixer" and site.layer == layer
                mix = out_hook(f"mixer.{layer}", p.gamma[layer], hit)
                hooks.part(p.blocks[layer], p.mixer[layer], f"x{layer}", mix)
                continue
            if p.o_proj is not None:
                hooks.post(p.o_proj[layer], f"z.{layer}", z_hook(layer))
            hit = site.layer == layer
            hooks.part(
                p.blocks[layer],
                p.attn[layer],
                f"a{layer}",
                out_hook(f"attn.{layer}", p.alpha[layer], hit and site.kind == "attn"),
            )
            hooks.part(
                p.blocks[layer],
                p.mlp[layer],
                f"m{layer}",
                out_hook(f"mlp.{layer}", p.beta[layer], hit and site.kind == "mlp"),
            )
        hooks.pre(p.final_norm.module or p.readout.unembed, "final", final_hook)
        hooks.post(p.readout.unembed, "unembed", unembed_hook)
        call_model(adapter.model, prompt[None])
        hooks.check()
    vals = {k: v for k, v in got.items() if k.startswith(("embed", "attn.", "mlp.", "mixer."))}
    if p.o_proj is not None:
        for layer in range(p.n_layers):
            h = head_terms(p.o_proj[layer], got[f"z.{layer}"][None], p.n_heads)[0]
            hit = site.kind == "head" and site.layer == layer
            if post[layer] is not None:  # shares at this run's own (patched) scale
                c = post[layer].factor(got[f"o.{layer}"], p.alpha[layer])
                h = h.to(c.dtype)
                if hit:
                    h[site.head] += got["moved"]
                h = (h * c).to(got[f"o.{layer}"].dtype)
            elif hit:
                h = h * p.alpha[layer]
                h[site.head] = vals[f"attn.{layer}"] - (h.sum(0) - h[site.head])
            else:
                h = h * p.alpha[layer]
            for i in range(p.n_heads):
                vals[f"attn.{layer}.h{i}"] = h[i]
    return vals, got["final"], got["u"]


@torch.no_grad()
def check_patching(
    adapter: Any, tokens: Tensor, granularity: str = "layer", n_patches: int = 2, seed: int = 0
) -> float:
    """Patch every site with ``n_patches`` random values through ``adapter.patch`` and through
    the one-forward-per-row oracle; returns the largest absolute difference of the centred
    logit, sigma and direct effects, relative to the clean centred logit's scale (at least 1).
    UnsupportedModelError if it exceeds 1e-4 (float32) / 1e-9 (float64)."""
    clean = adapter.clean_run(tokens, granularity)
    sites = adapter.sites(granularity)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(
        len(sites), n_patches, adapter.arch.d_model, generator=gen, dtype=torch.float64
    )
    base = torch.stack([clean.value(s) for s in sites]).double()
    values = (base[:, None] + noise * base.abs().amax(-1, keepdim=True)[:, None]).to(adapter.dtype)
    run = adapter.patch(clean, sites, values)
    acc = accumulation_dtype(adapter.dtype)
    w = clean.readout_dir
    worst = 0.0
    prompt = clean.tokens[: clean.position + 1].to(adapter.device)
    for i, name in enumerate(sites):
        site = adapter.site(name)
        for j in range(n_patches):
            vals, final, u = _oracle_row(adapter, prompt, site, values[i, j])
            sigma = adapter.final_scale(final)
            de = torch.stack([vals[r] for r in clean.readout_sites]).to(acc) @ w / sigma
            pi = adapter.parts.readout.logit_scale * u.to(acc)
            centred = pi[clean.target] - pi.mean()
            diffs = [
                abs(float(run.centred_logit[i, j] - centred)),
                abs(float(run.sigma[i, j] - sigma)),
                float((run.direct_effects[i, j] - de).abs().max()),
            ]
            worst = max(worst, max(diffs))
    scale = max(1.0, abs(clean.centred_logit))
    atol = 1e-9 if adapter.dtype == torch.float64 else 1e-4
    if worst / scale > atol:
        raise _fail("patching vs one hooked forward per patch", worst / scale, atol)
    return worst / scale
