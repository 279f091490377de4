"""The layer-synchronous patch engine of a discovered decoder, on its own blocks at t.

:func:`fast_patch` answers :meth:`causalnet.adapters.generic.GenericAdapter.patch` by replaying
the model's blocks at the clean run's position t only (:mod:`causalnet.adapters.replay`). Rows
(site s, patch p) are sorted by entry key e(s) = -1 (embed), 2l (attn.l or its heads), 2l + 1
(mlp.l). At block l the rows with e <= 2l run the block: rows already running (e < 2l) with
their own residual, rows entering at its attention (e = 2l) with the clean residual and their
patched attention output (or head term) put in by a hook; the rows entering at its MLP
(e = 2l + 1) do not run it: their output is the clean input + clean attention + the patched MLP
value. ``num[r, j]`` accumulates c_j . w_i for readout site j of row r, starting from the clean
values (sites below a row's entry are unchanged), and is divided by each row's own sigma.
Under a norm after the attention (``parts.post_norms``) a head patch moves the head's term of
the projection output o by (v - c(o) o_H) / c(o), c(o) = alpha gamma / s(o), and the model's
norm renormalises; the layer's heads are read out as shares c(o') o_H' at each row's own o'.

A Mamba2 mixer whose scan clamps its time step and whose step does not (a hybrid's mixer
block) is replayed under :mod:`causalnet.adapters.timestep`'s guard: a row the scan would clamp
raises ``ClampBinds`` and the adapter patches that call by the re-forward.

:func:`check_fast` compares the engine with the hooked re-forward
(:func:`causalnet.adapters.trace.reforward_patch`) on a probe, every site patched, before the
adapter uses it; a disagreement or an error is the recorded reason to fall back.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch
from torch import Tensor, nn

from causalnet.errors import CausalNetError, UnsupportedModelError
from causalnet.sites import Site

from .base import CleanRun, PatchedRun, accumulation_dtype
from .finalrows import (
    MODULE_ERRORS,
    cached_step_error,
    probe_reference,
    probe_tolerance,
    relative_difference,
    unsorted_run,
)
from .frozencache import prefix_of
from .heads import head_dots, head_term
from .hooks import HookSet, first, with_first
from .linears import fast_linears
from .replay import block_calls
from .rowattention import row_attention
from .timestep import check_guards, clamps, guard, lifted


class _Layer:
    """What the hooks of one block call do: the rows that enter at its attention (whole
    layer: ``attn_rows``/``attn_vals``; heads: ``head_rows``/``head_ids``/``head_vals``), and
    what they record (attention and MLP values, the output projection's input)."""

    def __init__(self) -> None:
        self.set(None, None, None, None, None, 1.0)

    def set(
        self, ar: Any, av: Any, hr: Any, hi: Any, hv: Any, alpha: float, norm: Any = None
    ) -> None:
        self.attn_rows, self.attn_vals, self.alpha = ar, av, alpha
        self.head_rows, self.head_ids, self.head_vals = hr, hi, hv
        self.norm = norm  # the norm after the attention (heads are its shares), or None
        self.attn: Tensor | None = None
        self.mlp: Tensor | None = None
        self.z: Tensor | None = None
        self.o: Tensor | None = None  # the (patched) projection output under a post-norm
        self.moved: Tensor | None = None  # each head row's term moved by, under a post-norm


def _hooks(adapter: Any, hooks: HookSet, state: _Layer, want_z: bool) -> None:
    p = adapter.parts

    def o_pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        state.z = (args[0] if args else next(iter(kwargs.values())))[:, 0].clone()

    def o_post(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        norm = state.norm
        if state.head_rows is None:
            if norm is not None:
                state.o = output[:, 0].clone()
            return None
        out = output.clone()
        rows = state.head_rows
        own = head_term(module, state.z[rows], state.head_ids, p.n_heads)
        if norm is None:
            out[rows, 0] += (state.head_vals / state.alpha).to(out.dtype) - own
            return out
        # the term whose share at the row's unpatched scale is the value; the norm renormalises
        c = norm.factor(output[rows, 0], state.alpha)
        state.moved = (state.head_vals.to(c.dtype) - c * own.to(c.dtype)) / c
        out[rows, 0] = (out[rows, 0].to(c.dtype) + state.moved).to(out.dtype)
        state.o = out[:, 0].clone()
        return out

    def attn_post(module: nn.Module, args: tuple, output: Any) -> Any:
        y = first(output)
        if state.attn_rows is not None:
            y = y.clone()
            y[state.attn_rows, 0] = (state.attn_vals / state.alpha).to(y.dtype)
            output = with_first(output, y)
        state.attn = y[:, 0] * state.alpha
        return output

    def mlp_post(module: nn.Module, args: tuple, output: Any) -> None:
        state.mlp = first(output)[:, 0].clone()  # Falcon adds to it in place

    for layer in range(p.n_layers):
        if p.o_proj is not None and want_z:
            hooks.pre(p.o_proj[layer], f"o_proj.{layer}", o_pre)
            hooks.post(p.o_proj[layer], f"patch.{layer}", o_post)
        hooks.part(p.blocks[layer], p.attn[layer], f"attn.{layer}", attn_post)
        hooks.part(p.blocks[layer], p.mlp[layer], f"mlp.{layer}", mlp_post)


def fast_patch(adapter: Any, clean: CleanRun, parsed: list[Site], values: Tensor) -> PatchedRun:
    """do(site_s = values[s, p]) (checked [S, P, d] in the model's dtype) at the clean run's
    position t, every row at once on the model's own blocks (module docstring)."""
    p = adapter.parts
    n_sites, n_patch, d = values.shape
    n_rows = n_sites * n_patch
    dev = values.device
    col = {name: j for j, name in enumerate(clean.readout_sites)}
    head_gran = clean.granularity == "head"
    acc = accumulation_dtype(values.dtype)
    w = clean.readout_dir.to(acc)

    def dot(x: Tensor) -> Tensor:
        return x.to(acc) @ w

    keys = [-1 if s.kind == "embed" else 2 * s.layer + (s.kind == "mlp") for s in parsed]
    order = sorted(range(n_sites), key=keys.__getitem__)
    sorted_keys = [keys[i] for i in order]
    order_t = torch.tensor(order, device=dev)
    vals = values[order_t].reshape(n_rows, d)
    row_head = torch.tensor([parsed[i].head for i in order], device=dev).repeat_interleave(n_patch)
    any_head = bool((row_head >= 0).any())

    def bound(k: int) -> int:
        return bisect.bisect_left(sorted_keys, k) * n_patch

    calls = block_calls(
        adapter, clean.tokens[: clean.position + 1].to(dev), prefix_of(clean), clean
    )
    cap = calls.one
    num = dot(clean.site_values).expand(n_rows, -1).clone()
    vals_w = dot(vals)
    z = torch.empty(n_rows, d, dtype=values.dtype, device=dev)
    n_embed = bound(0)
    z[:n_embed] = vals[:n_embed]
    num[:n_embed, col["embed"]] = vals_w[:n_embed]
    state = _Layer()
    post = p.post_norms or [None] * p.n_layers
    ran: list[str] = []  # the hooks that must have fired
    want_z = head_gran or any(s.kind == "head" for s in parsed)
    with HookSet() as hooks, torch.no_grad(), fast_linears(p.blocks), row_attention():
        _hooks(adapter, hooks, state, want_z)
        guarded = guard(hooks, clamps(adapter.model)[0])  # a Mamba2 mixer's time-step clamp
        for layer in range(p.n_layers):
            run, a_end, m_end = bound(2 * layer), bound(2 * layer + 1), bound(2 * layer + 2)
            if m_end == 0:
                continue
            if a_end > 0:
                ent = slice(run, a_end)
                heads = row_head[ent]
                is_head = heads >= 0
                if any_head:
                    ar = torch.arange(run, a_end, device=dev)
                    whole, hrows = ar[~is_head], ar[is_head]
                    n_whole = len(whole)
                else:  # every entering row patches the whole attention part: a slice
                    whole, hrows, n_whole = ent, row_head[:0], a_end - run
                state.set(
                    whole if n_whole else None,
                    vals[whole] if n_whole else None,
                    hrows if len(hrows) else None,
                    heads[is_head] if len(hrows) else None,
                    vals[hrows] if len(hrows) else None,
                    p.alpha[layer],
                    post[layer],
                )
                z[ent] = cap.pre[layer]
                z[:a_end] = calls(layer, z[:a_end])
                ran += [f"attn.{layer}", f"mlp.{layer}"] + [f"o_proj.{layer}"] * want_z
                assert state.attn is not None and state.mlp is not None
                if head_gran and post[layer] is not None:  # shares at each row's own s(o')
                    hcol = col[f"attn.{layer}.h0"]
                    assert state.z is not None and state.o is not None
                    inv = post[layer].inv(state.o)  # [rows, 1]
                    wg = w * (p.alpha[layer] * post[layer].gain(w.dtype))
                    dots = head_dots(p.o_proj[layer], state.z, p.n_heads, wg) * inv
                    if len(hrows):
                        assert state.moved is not None
                        moved = (state.moved.to(acc) @ wg) * inv[hrows, 0]
                        dots[hrows, heads[is_head]] += moved
                    num[:a_end, hcol : hcol + p.n_heads] = dots
                elif head_gran:
                    hcol = col[f"attn.{layer}.h0"]
                    assert state.z is not None
                    dots = head_dots(p.o_proj[layer], state.z, p.n_heads, w) * p.alpha[layer]
                    num[:a_end, hcol : hcol + p.n_heads] = dots
                    num[hrows, hcol + heads[is_head]] = vals_w[hrows]
                else:
                    num[:a_end, col[f"attn.{layer}"]] = dot(state.attn)
                beta = p.beta[layer]
                mlp = state.mlp if beta == 1.0 else state.mlp * beta  # x * 1.0 == x exactly
                num[:a_end, col[f"mlp.{layer}"]] = dot(mlp)
            if m_end > a_end:  # rows entering at this layer's MLP skip the block
                z[a_end:m_end] = cap.pre[layer] + cap.attn[layer] + vals[a_end:m_end]
                num[a_end:m_end, col[f"mlp.{layer}"]] = vals_w[a_end:m_end]
        hooks.check(ran)
        stepped = [p.blocks[layer] for layer in range(p.n_layers) if f"attn.{layer}" in ran]
        check_guards(hooks, guarded, stepped)
    return unsorted_run(adapter, parsed, clean, order_t, z, num)


def check_fast(adapter: Any, tokens: Tensor, n_patches: int = 1, seed: int = 0) -> tuple:
    """(None, error) if :func:`fast_patch` agrees with the hooked re-forward on ``tokens`` [T]
    within a tenth (``MARGIN``) of 1e-4 (float32) / 1e-9 (float64) of max(1, |clean centred
    logit|) for every site (layer granularity; heads of the first and last layer where there
    are heads), else (why not, error or None). Mamba2 time-step clamps are lifted for the probe
    (:func:`causalnet.adapters.timestep.lifted`): the guard covers them at every patch."""
    found, mismatch = clamps(adapter.model)
    if mismatch is not None:
        return mismatch, None
    with lifted(found):
        return _probe(adapter, tokens, n_patches, seed)


def _probe(adapter: Any, tokens: Tensor, n_patches: int, seed: int) -> tuple:
    """:func:`check_fast`'s comparison on the probe."""
    grans = ["layer"] + (["head"] if adapter.head_refusal is None else [])
    worst = 0.0
    atol = probe_tolerance(adapter.dtype)
    gen = torch.Generator().manual_seed(seed)
    for gran in grans:
        try:
            clean = adapter.clean_run(tokens, gran)
        except CausalNetError as err:  # e.g. head granularity refused by the base
            if gran == "layer":
                raise
            del err
            continue
        sites = adapter.sites(gran)
        if gran == "head":
            last = adapter.arch.n_layers - 1
            sites = [s for s in sites if s.startswith(("attn.0.", f"attn.{last}."))]
        parsed, values, want = probe_reference(adapter, clean, sites, n_patches, gen)
        try:
            got = fast_patch(adapter, clean, parsed, values)
        except (UnsupportedModelError, *MODULE_ERRORS) as err:
            return f"fast patching failed on the probe: {type(err).__name__}: {err}", None
        diff = relative_difference(got, want, clean)
        worst = max(worst, diff)
        if diff > atol:
            return (
                f"fast patching disagrees with the hooked re-forward on the probe by {diff:.2e} "
                f"({gran} granularity; tolerance {atol:g}, a tenth of the patching tolerance)"
                f"{_own_step(adapter, tokens, atol)}",
                diff,
            )
    return None, worst


def _own_step(adapter: Any, tokens: Tensor, atol: float) -> str:
    """Where the model's own cached decoding is itself off its full forward: saying so (the
    replay computes the final position from the model's cache, as its decoding does)."""
    try:
        own = cached_step_error(adapter.model, tokens)
    except MODULE_ERRORS:
        return ""
    if own is None or own <= atol:
        return ""
    return (
        f"; the model's own cached decoding is off its full forward by {own:.2e} (the last "
        "position's logits), so no replay from its cache can be exact"
    )
