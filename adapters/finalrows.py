"""What the two final-position replays of a discovered model share.

:func:`causalnet.adapters.fastpatch.fast_patch` (blocks against a frozen key/value cache) and
:func:`causalnet.adapters.recurrent.recurrent_patch` (blocks from recurrent states) both replay
every (site, patch) row at the clean run's position t, sorted by the layer the row enters at,
and both are checked on a probe against the hooked re-forward of the whole prompt before the
adapter uses them. The pieces they have in common are here, once:

- :func:`forward_last`: the model's own forward keeping the logits of its last position only;
- :func:`centred_from_final`: the centred logit from final residuals, without the vocabulary
  projection;
- :func:`unsorted_run`: the :class:`PatchedRun` of rows computed in entry order, read out from
  their final residuals;
- :func:`probe_values`, :func:`probe_reference`, :func:`probe_tolerance` and
  :func:`relative_difference`: the probe's patch values, the re-forward a replay is checked
  against, how close it must come, and how far it is;
- :func:`cached_step_error`: how far the model's own cached decoding is from its full forward
  (where it is far, no replay from its cache can be exact, and the refusal says so);
- :func:`low_precision_ops`: the operations a float64 model computes in float32 whose
  rounding depends on the batch (an MoE router's products or sigmoid), so batched rows cannot
  be exact to 1e-9 there.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from causalnet.errors import UnsupportedModelError
from causalnet.sites import Site

from .fullcache import cache_kwargs, mark
from .hooks import call_model
from .readout import accumulation_dtype, vocab_mean
from .recorders import cache_keyword, find_cache
from .records import CleanRun, PatchedRun
from .trace import reforward_patch

#: How far below the patching tolerance (1e-4 float32, 1e-9 float64) a replay must agree with
#: the re-forward on the probe before it is used: one probe prompt stands for every prompt, and
#: a part that computes its cached step in float32 inside a float64 model can pass one probe
#: and miss on another
MARGIN = 10

#: Errors a model's own modules may raise on arguments they were not made for; caught only by
#: the probe checks, which record them as the reason to fall back.
MODULE_ERRORS = (RuntimeError, TypeError, ValueError, AttributeError, IndexError, KeyError)


def forward_last(model: nn.Module, **kwargs: Any) -> Any:
    """``model(**kwargs)`` with the logits of the last position only where it takes
    ``logits_to_keep`` (the replays need none)."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    kwargs.update(cache_kwargs(model, kwargs))  # a plain cache where marked (fullcache)
    return model(**kwargs)


def forward_step(model: nn.Module, toks: Tensor, **kwargs: Any) -> Any:
    """The model's own cached step on the last of ``toks`` [B, T] (``kwargs`` hold the cache of
    the first T - 1), through :func:`forward_last`, with its position, T - 1, given explicitly
    where the model's forward takes ``position_ids``: some hybrids (Bamba) count the cache's
    length on their first layer, a state-space layer that holds no positions, and would put the
    token at position 0."""
    if "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = torch.full_like(toks[:, -1:], toks.shape[1] - 1)
    return forward_last(model, input_ids=toks[:, -1:], **kwargs)


def centred_from_final(adapter: Any, z: Tensor, token: int) -> Tensor:
    """The centred logit of ``token`` (before any cap) from final residuals z [N, d]: the model's
    final norm module, times the readout's input scale c, then s * (the unembedding row of
    ``token`` - the mean row) and bias."""
    ro, norm = adapter.parts.readout, adapter.parts.final_norm
    acc = accumulation_dtype(z.dtype)
    x = z if norm.module is None else norm.module(z[:, None])[:, 0]
    u = (ro.weight[token] - vocab_mean(ro.weight)).to(acc)
    out = (x.to(acc) @ u) * ro.input_scale
    if ro.bias is not None:
        out = out + (ro.bias[token].to(acc) - ro.bias.to(acc).mean())
    return out * ro.logit_scale


@torch.no_grad()
def unsorted_run(
    adapter: Any,
    parsed: list[Site],
    clean: CleanRun,
    order: Tensor,
    z: Tensor,
    num: Tensor,
) -> PatchedRun:
    """The :class:`PatchedRun` of rows computed with the sites in ``order`` (row r = sorted site
    r // P, patch r % P) from their final residuals z [S P, d] and readout numerators num
    [S P, R] (c_j . w_i per readout site j): each row read out at its own final scale sigma(z)
    (Eq 13), its centred logit from z (:func:`centred_from_final`), back in the callers' site
    order."""
    sigma = adapter.final_scale(z)
    direct = num / sigma[:, None]
    centred = centred_from_final(adapter, z, clean.target)
    n_sites, n_read = len(parsed), len(clean.readout_sites)
    n_patch = sigma.numel() // n_sites
    inv = torch.argsort(order)
    centred = centred.view(n_sites, n_patch)[inv]
    return PatchedRun(
        sites=[s.name for s in parsed],
        readout_sites=list(clean.readout_sites),
        direct_effects=direct.view(n_sites, n_patch, n_read)[inv],
        sigma=sigma.view(n_sites, n_patch)[inv],
        centred_logit=centred,
        total_effect=centred - clean.centred_logit,
    )


def probe_values(
    adapter: Any, clean: CleanRun, sites: list[str], n_patches: int, gen: torch.Generator
) -> Tensor:
    """Patch values [S, P, d] for a probe: each site's clean value plus noise of its own scale
    (seeded by ``gen``), in the model's dtype and device."""
    base = torch.stack([clean.value(s) for s in sites]).double()
    noise = torch.randn(len(sites), n_patches, base.shape[-1], generator=gen).double()
    scale = base.abs().amax(-1, keepdim=True)[:, None]
    return (base[:, None] + noise * scale).to(adapter.dtype).to(adapter.device)


def probe_tolerance(dtype: torch.dtype) -> float:
    """How close a replay must come to the re-forward on the probe: a tenth (:data:`MARGIN`) of
    the patching tolerance, 1e-4 (float32) / 1e-9 (float64) of max(1, |centred logit|)."""
    return (1e-9 if dtype == torch.float64 else 1e-4) / MARGIN


def probe_reference(
    adapter: Any, clean: CleanRun, sites: list[str], n_patches: int, gen: torch.Generator
) -> tuple[list[Site], Tensor, PatchedRun]:
    """What a replay is checked against on the probe: the parsed ``sites``, their probe values
    (:func:`probe_values`) and the hooked re-forward's run of them."""
    parsed = [adapter.site(s) for s in sites]
    values = probe_values(adapter, clean, sites, n_patches, gen)
    return parsed, values, reforward_patch(adapter, clean, parsed, values)


def relative_difference(got: PatchedRun, want: PatchedRun, clean: CleanRun) -> float:
    """The largest difference of centred logits, sigmas and direct effects between two runs,
    relative to max(1, |clean centred logit|)."""
    return max(
        float((got.centred_logit - want.centred_logit).abs().max()),
        float((got.sigma - want.sigma).abs().max()),
        float((got.direct_effects - want.direct_effects).abs().max()),
    ) / max(1.0, abs(clean.centred_logit))


def cached_step_error(model: nn.Module, tokens: Tensor, cache: Any = None) -> float | None:
    """How far the model's own cached decoding is from its full forward on ``tokens`` [T]
    (T >= 2): the largest difference of the last position's logits between ``model(tokens)``
    and ``model(tokens[:-1])`` followed by the step on ``tokens[-1:]`` from the cache it
    returned (:func:`forward_step`), relative to max(1, their largest magnitude). None where the
    model returns no cache. ``cache``: an empty cache to fill instead of the model's own (the
    one it makes, or the plain one of :mod:`causalnet.adapters.fullcache` where marked)."""
    ids = tokens[None]
    with torch.no_grad():
        full = model(input_ids=ids).logits[0, -1]
        given = {} if cache is None else {cache_keyword(model): cache}
        out = forward_last(model, input_ids=ids[:, :-1], use_cache=True, **given)
        try:
            cache, keyword = find_cache(out), cache_keyword(model)
        except UnsupportedModelError:
            return None
        step = forward_step(model, ids, use_cache=True, **{keyword: cache}).logits[0, -1]
    scale = max(1.0, float(full.abs().max()))
    return float((full.double() - step.double()).abs().max()) / scale


def settle_cache(model: nn.Module, tokens: Tensor, atol: float) -> str | None:
    """Where the model's own cached decoding on ``tokens`` is more than ``atol`` off its full
    forward and decoding from a plain ``DynamicCache()`` is within it, :func:`fullcache.mark
    <causalnet.adapters.fullcache.mark>` the model and say why; else None (nothing changes).
    A model that cannot run either way is left as it is (its fast check says why)."""
    from transformers import DynamicCache  # noqa: PLC0415

    try:
        own = cached_step_error(model, tokens)
        if own is None or own <= atol:
            return None
        plain = cached_step_error(model, tokens, DynamicCache())
    except (UnsupportedModelError, *MODULE_ERRORS):
        return None
    if plain is None or plain > atol:
        return None
    mark(model)
    return (
        f"its own cache decodes {own:.2e} off its full forward, a plain DynamicCache "
        f"{plain:.2e}: its cached forwards get a plain cache (causalnet.adapters.fullcache)"
    )


#: aten ops whose float32 rounding depends on how many rows they run on: matrix products (the
#: blocking) and transcendental elementwise ops (a vectorised body and a scalar tail that round
#: differently; which elements fall in the tail depends on the batch). Not listed, as
#: vectorised along each row (or measured batch-invariant): softmax (attention, routers), norms'
#: pow / mean / rsqrt, rotary tables' cos / sin.
_BATCH_DEPENDENT = (
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "_grouped_mm",
    "addmv",
    "mv",
    "dot",
    "matmul",
    "sigmoid",
    "exp",
    "expm1",
    "log",
    "log1p",
    "tanh",
    "erf",
    "silu",
    "gelu",
)


def low_precision_ops(model: nn.Module, tokens: Tensor) -> list[str]:
    """The operations of a float64 model's forward on ``tokens`` [T] computed in a lower
    precision whose rounding depends on the batch (:data:`_BATCH_DEPENDENT`: Hugging Face MoE
    routers compute their logits, sigmoid or softmax in float32 even in a float64 model), as
    ``"aten op (dtype)"``; empty for a model that is float64 wherever it matters. Such a
    model's numbers move (~1e-8) between a prompt run alone and rows run in a batch."""
    from torch.utils._python_dispatch import TorchDispatchMode  # noqa: PLC0415

    seen: dict[str, None] = {}

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
            name = func.overloadpacket.__name__
            if name in _BATCH_DEPENDENT:
                low = [
                    a.dtype
                    for a in args
                    if isinstance(a, Tensor) and a.is_floating_point() and a.dtype != torch.float64
                ]
                if low:
                    seen[f"{name} ({str(low[0]).removeprefix('torch.')})"] = None
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Watch():
        call_model(model, tokens[None], last_only=True)
    return list(seen)
