"""The shared run engine of the hand-written families: the forward pass, the clean runs and the
pool of site values, built once from a family's block methods (:class:`TransformerAdapter`).

:func:`run_layers` runs the decoder layer by layer (Eqs 3-6) and records every site's value at
every position (or at one position per sequence), with the per-layer keys/values and residuals
that patching reuses (:class:`FullRun`). :func:`clean_runs` turns one batched pass over several
prompts into one :class:`CleanRun` per prompt: target i = argmax of the clean logits (Eq 10),
the readout w_i, every readout site's value and direct effect (c . w_i) / sigma at the clean
sigma (Delta_unembed, Eqs 10, 24-28). :func:`final_values` is the pool of a sweep's ablation
values: every readout site at each prompt's last token, in length-sorted, right-padded batches.
Right padding is exact: attention is causal and positions are absolute.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .readout import accumulation_dtype
from .records import CleanRun, FullRun, Granularity

if TYPE_CHECKING:
    from .base import TransformerAdapter


def forward(
    adapter: TransformerAdapter,
    tokens: Tensor,
    granularity: Granularity = "layer",
    cache: bool = False,
) -> FullRun:
    """:meth:`TransformerAdapter.forward`: :func:`run_layers` on checked tokens [B, T] (or [T],
    read as B = 1), then the vocabulary projection of every position."""
    adapter._check_granularity(granularity)
    tokens = adapter._check_tokens(tokens, ndim=2)
    run = run_layers(adapter, tokens, granularity, cache)
    with torch.no_grad():
        run.logits = adapter.logits(run.resid_final)
    return run


def run_layers(
    adapter: TransformerAdapter,
    tokens: Tensor,
    granularity: Granularity,
    cache: bool,
    at: Tensor | None = None,
) -> FullRun:
    """:meth:`TransformerAdapter.forward` without the vocabulary projection (``logits`` left
    empty): the clean run needs the logits at one position only, the pool of site values none.
    With ``at`` [B] (one position per sequence) the site values are kept at those positions
    only ([B, d] instead of [B, T, d])."""
    n_layers, n_heads = adapter.arch.n_layers, adapter.arch.n_heads
    rows = None if at is None else torch.arange(tokens.shape[0], device=tokens.device)

    def keep(x: Tensor) -> Tensor:
        return x if at is None else x[rows, at]

    with torch.no_grad():
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        z = adapter.embed(tokens)
        values: dict[str, Tensor] = {"embed": keep(z)}
        k_cache: list[Tensor] = []
        v_cache: list[Tensor] = []
        zh_cache: list[Tensor] = []
        pre_cache: list[Tensor] = []
        mid_cache: list[Tensor] = []
        for layer in range(n_layers):
            q, k, v = adapter.qkv(layer, z, positions)
            zh = adapter.attend(layer, q, k, v, positions, positions)
            a = adapter.attn_output(layer, zh)
            if granularity == "head":
                hc = adapter.head_outputs(layer, zh)
                for h in range(n_heads):
                    values[f"attn.{layer}.h{h}"] = keep(hc[..., h, :])
            else:
                values[f"attn.{layer}"] = keep(a)
            pre = z
            if adapter.arch.parallel_residual:
                m = adapter.mlp(layer, z)
                mid = z
                z = z + a + m
            else:
                z = z + a
                mid = z
                m = adapter.mlp(layer, z)
                z = z + m
            values[f"mlp.{layer}"] = keep(m)
            if cache:
                k_cache.append(k)
                v_cache.append(v)
                zh_cache.append(zh)
                pre_cache.append(pre)
                mid_cache.append(mid)
        sigma = adapter.final_scale(z)
    return FullRun(
        tokens=tokens,
        logits=z.new_empty(0),
        resid_final=z,
        sigma=sigma,
        values=values,
        granularity=granularity,
        k_cache=k_cache if cache else None,
        v_cache=v_cache if cache else None,
        z_heads=zh_cache if cache else None,
        resid_pre=pre_cache if cache else None,
        resid_mid=mid_cache if cache else None,
    )


def clean_runs(
    adapter: TransformerAdapter,
    prompts: list[Tensor | str],
    granularity: Granularity = "layer",
    positions: list[int] | None = None,
) -> list[CleanRun]:
    """:meth:`TransformerAdapter.clean_run` of several prompts in one batched pass (same
    numbers up to float rounding: other matrix shapes).

    The prompts, cut at their positions t_b, are right-padded to the longest and run
    together: attention is causal, so no real position reads a padded (later) one, and
    positions are absolute. On a CPU the weights are then read from memory once for the
    batch instead of once per prompt (a clean run of ~10 tokens is bound by that), and the
    vocabulary projection of the readout positions is one matrix product.
    """
    adapter._check_granularity(granularity)
    padded, toks, ts = adapter.pad_prompts(prompts, positions)
    run = run_layers(adapter, padded, granularity, cache=True)
    assert run.k_cache is not None and run.v_cache is not None and run.z_heads is not None
    assert run.resid_pre is not None and run.resid_mid is not None
    readout_sites = adapter.readout_sites(granularity)
    n_layers = adapter.arch.n_layers
    rows = torch.arange(len(toks), device=adapter.device)
    at = torch.tensor(ts, device=adapter.device)
    acc = accumulation_dtype(adapter.dtype)
    out: list[CleanRun] = []
    with torch.no_grad():
        final = run.resid_final[rows, at]  # [B, d]
        all_logits = adapter.logits(final)  # [B, V]
        sigmas = adapter.final_scale(final.to(acc))
        values = torch.stack([run.values[s][rows, at] for s in readout_sites], dim=1)
        heads = torch.stack(
            [adapter.head_outputs(layer, zh[rows, at]) for layer, zh in enumerate(run.z_heads)],
            dim=1,
        )  # [B, L, H, d]
        attn = torch.stack(
            [adapter.attn_output(layer, zh[rows, at]) for layer, zh in enumerate(run.z_heads)],
            dim=1,
        )  # [B, L, d]
        pre = torch.stack([r[rows, at] for r in run.resid_pre], dim=1)
        mid = torch.stack([r[rows, at] for r in run.resid_mid], dim=1)
        mlp = torch.stack([run.values[f"mlp.{lay}"][rows, at] for lay in range(n_layers)], 1)
        for b, (tokens, t) in enumerate(zip(toks, ts, strict=True)):
            logits = all_logits[b]
            target = int(torch.argmax(logits))
            w, const = adapter.readout(target)
            site_values = values[b]
            out.append(
                CleanRun(
                    tokens=tokens,
                    position=t,
                    granularity=granularity,
                    readout_sites=readout_sites,
                    target=target,
                    logits=logits,
                    sigma=float(sigmas[b]),
                    readout_dir=w,
                    readout_const=float(const),
                    site_values=site_values,
                    direct_effects=site_values.to(acc) @ w.to(acc) / sigmas[b],
                    centred_logit=float(logits[target].to(acc) - logits.to(acc).mean()),
                    _k=[k[b, :t].clone() for k in run.k_cache],
                    _v=[v[b, :t].clone() for v in run.v_cache],
                    _resid_pre=pre[b],
                    _resid_mid=mid[b],
                    _attn=attn[b],
                    _heads=heads[b],
                    _mlp=mlp[b],
                )
            )
    return out


def final_values(
    adapter: TransformerAdapter,
    prompts: list[Tensor],
    granularity: Granularity = "layer",
    batch_tokens: int = 1024,
) -> Tensor:
    """Every readout site's value at each prompt's last token: [n_prompts, R, d].

    The numbers of ``torch.stack([clean_run(p, granularity).site_values for p in prompts])``
    (up to float rounding: other matrix shapes), for many prompts at once -- the pool of a
    sweep's ablation values. Prompts sorted by length are cut into batches of at most
    ``batch_tokens`` padded tokens, right-padded to their batch's longest prompt, and run
    through the layers without the vocabulary projection. Right padding is exact: attention
    is causal, so a real position never reads a padded (later) one, and positions (rotary
    or learned) are absolute, the same as the prompt's alone.
    """
    adapter._check_granularity(granularity)
    sites = adapter.readout_sites(granularity)
    out = torch.empty(
        len(prompts), len(sites), adapter.arch.d_model, dtype=adapter.dtype, device=adapter.device
    )
    for batch, padded, last in adapter.length_batches(prompts, batch_tokens):
        run = run_layers(adapter, padded, granularity, cache=False, at=last)
        index = torch.tensor(batch, device=adapter.device)
        with torch.no_grad():
            out[index] = torch.stack([run.values[s] for s in sites], dim=1)
    return out
