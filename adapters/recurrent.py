"""Fast patching of a model of one-part blocks (Mamba, Zamba) from its own cache after t - 1.

An intervention at position t changes nothing before t, and a recurrent block reads the earlier
positions only through its state after t - 1 (Mamba: the convolution window and the SSM state).
:func:`recurrent_patch` therefore

1. runs the model's OWN forward on the prompt before t with its OWN cache (transformers'
   ``Cache`` with per-layer ``conv_states`` / ``recurrent_states``): the states after t - 1;
2. records how the model calls each block at t (one cached step of the model's own forward on
   the token at t, from a copy of those states): the arguments besides the hidden state (masks,
   position ids, Zamba's embedding for its shared blocks), tiled to the rows as the model tiles
   them from batch 1 to 2 (:mod:`causalnet.adapters.stepcalls`);
3. replays the blocks themselves at t only, layer by layer, on rows [N, 1, d]: every
   (site, patch) row of the prompt in one batch that grows as the layers go up. Rows are sorted
   by the layer they enter at: ``embed`` rows run from block 0 with the patched embedding;
   ``mixer.l`` rows skip block l (their residual after it is the clean block input plus the
   patched value) and run from block l + 1. Before block l runs, layer l's states in a copy of
   the cache are the clean states expanded (copied) to the rows running it, so each row's step
   updates its own copy, and its attention keys and values (a hybrid's attention block) the
   clean ones expanded, to which each row's step appends its own; the model's own modules
   compute the step (conv update, selective state update, attention).

``num[r, j]`` accumulates c_j . w_i for readout site j of row r from the clean values (sites
below a row's entry are unchanged), and is divided by each row's own final scale sigma; the
centred logit is the model's final norm module's output dotted with the centred unembedding
row (the vocabulary projection is not computed).

The single-step recurrence is the model's own decoding path, a different computation from the
full-sequence scan of the clean run: Mamba's reference step computes its state update in
float32 even in a float64 model (``dt.float()``, ``state.float()``), so in float64 it
disagrees with the scan by ~1e-9 to 1e-8 of the centred logit. :func:`check_recurrent`
compares the two on a probe, every site patched, before the adapter uses this path, with a
margin of 10 below the tolerance (one probe prompt stands for every prompt): beyond 1e-5
(float32) / 1e-10 (float64) of max(1, |centred logit|) on the probe the adapter patches by the
hooked re-forward of the whole prompt (:func:`causalnet.adapters.trace.reforward_patch`,
exact to 1e-4 / 1e-9) and says why (``fast_refusal``). A time-step clamp in the scan only
(Zamba2, Nemotron-H) is guarded: a replayed row whose time step the scan would clamp raises
:class:`causalnet.adapters.timestep.ClampBinds` and that call is patched by the re-forward
(:mod:`causalnet.adapters.timestep`); one that cannot be guarded is refused before the probe.
"""

from __future__ import annotations

import bisect
import copy
from typing import Any

import torch
from torch import Tensor, nn

from causalnet.errors import CausalNetError
from causalnet.sites import Site

from .finalrows import (
    MARGIN,
    MODULE_ERRORS,
    probe_reference,
    probe_tolerance,
    relative_difference,
    unsorted_run,
)
from .hooks import HookSet, first
from .readout import accumulation_dtype
from .records import CleanRun, PatchedRun
from .stepcalls import Prefix, step_calls
from .timestep import check_guards, clamps, guard, lifted

__all__ = ["MARGIN", "Prefix", "check_recurrent", "recurrent_patch"]


def recurrent_patch(
    adapter: Any, clean: CleanRun, parsed: list[Site], values: Tensor
) -> PatchedRun:
    """do(site_s = values[s, p]) (checked [S, P, d] in the model's dtype; sites ``embed`` and
    ``mixer.l``) at the clean run's position t, every row at once from the model's own states
    after t - 1 (module docstring)."""
    p = adapter.parts
    n_sites, n_patch, d = values.shape
    n_rows = n_sites * n_patch
    dev = values.device
    col = {name: j for j, name in enumerate(clean.readout_sites)}
    acc = accumulation_dtype(values.dtype)
    w = clean.readout_dir.to(acc)
    keys = [-1 if s.kind == "embed" else s.layer for s in parsed]
    order = sorted(range(n_sites), key=keys.__getitem__)
    sorted_keys = [keys[i] for i in order]
    order_t = torch.tensor(order, device=dev)
    vals = values[order_t].reshape(n_rows, d)

    def bound(k: int) -> int:
        """Rows whose entry key is below k (sorted first)."""
        return bisect.bisect_left(sorted_keys, k) * n_patch

    assert clean._resid_pre is not None
    prefix = step_calls(adapter, clean.tokens[: clean.position + 1].to(dev))
    cache = copy.deepcopy(prefix.cache)
    num = (clean.site_values.to(acc) @ w).expand(n_rows, -1).clone()
    vals_w = vals.to(acc) @ w
    z = torch.empty(n_rows, d, dtype=values.dtype, device=dev)
    n_embed = bound(0)
    z[:n_embed] = vals[:n_embed]
    num[:n_embed, col["embed"]] = vals_w[:n_embed]
    got: dict[str, Tensor] = {}

    def mixer_post(module: nn.Module, args: tuple, output: Any) -> None:
        got["mixer"] = first(output)[:, 0]

    with HookSet() as hooks, torch.no_grad():
        for layer in range(p.n_layers):
            hooks.part(p.blocks[layer], p.mixer[layer], f"mixer.{layer}", mixer_post)
        guarded = guard(hooks, clamps(adapter.model)[0])
        ran = []
        for layer in range(p.n_layers):
            run, enter = bound(layer), bound(layer + 1)  # rows running block l; entering at it
            if run:
                rows_cache = prefix.rows_cache(cache, layer, run)
                hidden = z[:run, None].clone()  # a block may write to its input
                z[:run] = prefix.call(p.blocks[layer], layer, hidden, rows_cache)[:, 0]
                num[:run, col[f"mixer.{layer}"]] = (got["mixer"] * p.gamma[layer]).to(acc) @ w
                ran.append(f"mixer.{layer}")
            if enter > run:
                z[run:enter] = clean._resid_pre[layer] + vals[run:enter]
                num[run:enter, col[f"mixer.{layer}"]] = vals_w[run:enter]
        hooks.check(ran)
        stepped = [p.blocks[layer] for layer in range(p.n_layers) if f"mixer.{layer}" in ran]
        check_guards(hooks, guarded, stepped)
    return unsorted_run(adapter, parsed, clean, order_t, z, num)


def check_recurrent(
    adapter: Any, tokens: Tensor, n_patches: int = 1, seed: int = 0
) -> tuple[str | None, float | None]:
    """(None, error) if :func:`recurrent_patch` agrees with the hooked re-forward on ``tokens``
    [T] within a tenth of 1e-4 (float32) / 1e-9 (float64) of max(1, |clean centred logit|) for
    every site, else (why not, error or None); (why, None) without a probe where the step is
    known to differ from the full forward (:func:`causalnet.adapters.timestep.step_mismatch`).
    Mamba2 time-step clamps are lifted for the probe (:func:`causalnet.adapters.timestep.lifted`):
    the guard covers them at every patch."""
    atol = probe_tolerance(adapter.dtype)
    found, mismatch = clamps(adapter.model)
    if mismatch is not None:
        return mismatch, None
    with lifted(found):  # the guard covers the clamps (causalnet.adapters.timestep)
        clean = adapter.clean_run(tokens, "layer")
        gen = torch.Generator().manual_seed(seed)
        sites = adapter.sites("layer")
        parsed, values, want = probe_reference(adapter, clean, sites, n_patches, gen)
        try:
            got = recurrent_patch(adapter, clean, parsed, values)
        except (CausalNetError, *MODULE_ERRORS) as err:
            return f"the recurrent replay failed on the probe: {type(err).__name__}: {err}", None
    diff = relative_difference(got, want, clean)
    if diff > atol:
        return (
            f"the model's own single-step recurrence disagrees with its full forward on the "
            f"probe by {diff:.2e} (tolerance {atol:g}, a tenth of the patching tolerance; e.g. "
            "a step computed in float32)",
            diff,
        )
    return None, diff
