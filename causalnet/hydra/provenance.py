"""How a sweep's numbers were computed, for its run record: the adapter, its checks, its path.

A researcher who sweeps a model the library has no hand-written family for needs to know, from
the results folder alone, that the decomposition was proved on the model before any number was
read, and whether the patches took the fast final-position replay or fell back to hooked
re-forwards of the whole prompt (and why). :func:`computed_by` is what ``run_sweep`` records
under ``info.computed_by`` in ``run.json``; :func:`describe` is the line the ``causalnet hydra``
command prints from it.

Example (a random Qwen3 of SmolLM2's size, 2026-12-03)::

    {"adapter": "GenericAdapter", "family": "qwen3", "dtype": "float32",
     "decomposition": "discovered",
     "verification": {"logits": 0.0, "eq21": 3.2e-07, "readout": 2.2e-07, "heads": 7.7e-07,
                      "tolerance": 1e-05, "readout_tolerance": 1e-05},
     "patching": "final-position replay of the model's own blocks",
     "fast_probe_error": 9.0e-07, "fast_refusal": null, "cache_note": null}

Sets of sites (``a+b``) are always patched by the hooked re-forward; ``patching`` is the way of
single sites.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

#: the three ways a sweep's patches are computed (``patching`` in :func:`computed_by`)
HAND_WRITTEN = "final-position rows on the hand-written family's blocks"
REPLAY = "final-position replay of the model's own blocks"
RECURRENT = "final position from the model's own recurrent states"
REFORWARD = "hooked re-forward of the whole prompt per patch"


def computed_by(adapter: Any) -> dict[str, Any]:
    """The adapter that computes a sweep and how (module docstring): its class, family and
    dtype; ``decomposition`` "hand-written" (a family of :data:`causalnet.adapters.
    SUPPORTED_FAMILIES`, pinned by its tests) or "discovered" with the errors its probe
    verification found (:class:`causalnet.adapters.verify.Verification`); ``patching``, one of
    :data:`HAND_WRITTEN`, :data:`REPLAY`, :data:`RECURRENT`, :data:`REFORWARD`, and for a
    discovered model the fast path's disagreement with the re-forward on its probe, why it was
    refused (None: not refused) and why its cached forwards get a plain cache (None: its own).

    Asking a discovered model runs its fast-path check once (a probe, every site patched), which
    its first patch would otherwise run."""
    out: dict[str, Any] = {
        "adapter": type(adapter).__name__,
        "family": adapter.arch.family,
        "dtype": str(adapter.dtype).removeprefix("torch."),
    }
    check = getattr(adapter, "verification", None)
    if check is None:
        out.update(decomposition="hand-written", patching=HAND_WRITTEN)
        return out
    refusal = adapter.fast_refusal
    fast = RECURRENT if adapter.parts.one_part else REPLAY
    out.update(
        decomposition="discovered",
        verification={
            k: v for k, v in asdict(check).items() if k != "blocks"
        },  # not the per-block list
        patching=REFORWARD if refusal is not None else fast,
        fast_probe_error=adapter.fast_error,
        fast_refusal=refusal,
        cache_note=adapter.cache_note,
    )
    return out


def describe(info: dict[str, Any]) -> str:
    """One line from :func:`computed_by`'s record, e.g. ``GenericAdapter (qwen3, float32):
    decomposition discovered and verified on a probe (largest error 7.7e-07 of its scale,
    tolerance 1e-05); patches: final-position replay of the model's own blocks (9.0e-07 off the
    re-forward on the probe)``."""
    head = f"{info['adapter']} ({info['family']}, {info['dtype']})"
    if info["decomposition"] == "hand-written":
        return f"{head}: hand-written family; patches: {info['patching']}"
    v = info["verification"]
    worst = max(v[k] for k in ("logits", "eq21", "readout", "heads") if v[k] is not None)
    line = (
        f"{head}: decomposition discovered and verified on a probe (largest error {worst:.1e} "
        f"of its scale, tolerance {v['tolerance']:.0e}); patches: {info['patching']}"
    )
    if info["fast_refusal"] is not None:
        return f"{line} (the fast path was refused: {info['fast_refusal']})"
    if info["fast_probe_error"] is not None:
        line += f" ({info['fast_probe_error']:.1e} off the re-forward on the probe)"
    return line
