"""Blocks that add ONE part to the residual stream: ``x + gamma * mixer(norm(x))`` (Mamba).

Where no pair of a block's submodules adds up to what the block adds
(:func:`causalnet.adapters.discover.discover`), :func:`find_mixer` looks for one submodule whose
output times a constant gamma equals the block's output minus its input at every position of the
probe, within the dtype's tolerance of the stream's scale (Eq 21 with one part). Among exact
candidates it prefers gamma = 1 (or the config's ``residual_multiplier``), then the outermost
module, then the last one called (Mamba's ``mixer`` over its ``out_proj``). The block's own norm
is never a candidate in practice: its output is not what the block adds.

Such a model has the sites ``embed`` and ``mixer.l`` (docs/conventions.md, "Sites"): no
attention, no MLP, no heads (:data:`NO_HEADS`). Hybrids whose every block is of that form
(Zamba, Nemotron-H: Mamba, attention and MLP blocks, each x + part(norm(x))) are found the same
way; each block's part is then its ``mixer.l``, whatever it computes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from causalnet.errors import UnsupportedModelError

from .hooks import tolerance
from .measure import Recording, snap_multiplier, subtree

#: Why head granularity is refused in a model of one-part blocks.
NO_HEADS = (
    "its blocks each add one part, x + mixer(norm(x)) (a state-space model such as Mamba; in a "
    "hybrid of such blocks an attention or MLP block is a mixer too): the sites are embed and "
    "mixer.L only, and no mixer is split into heads"
)


def fit_one(delta: Tensor, out: Tensor) -> tuple[float, float]:
    """Least-squares gamma with delta = gamma * out; returns (gamma, max abs error), float64."""
    y, x = delta.reshape(-1).double(), out.reshape(-1).double()
    gamma = float((x @ y) / max(float(x @ x), 1e-300))
    return gamma, float((y - gamma * x).abs().max())


def find_mixer(
    block: str,
    x: Tensor,
    y: Tensor,
    candidates: dict[str, Tensor],
    order: dict[str, int],
    tol: float,
    config: Any = None,
) -> tuple[str, float]:
    """(name, gamma) of the submodule of ``block`` whose output (``candidates[name]``, [B, T, d])
    times gamma is the block's output ``y`` minus its input ``x`` at every position (module
    docstring); gamma is rounded to 1 or the ``config``'s multiplier when within rounding.
    UnsupportedModelError naming the block and the best candidate's error otherwise."""
    delta = y.double() - x.double()
    scale = max(float(x.abs().max()), float(y.abs().max()), 1e-30)
    found, best = [], (float("inf"), "")
    for name, out in candidates.items():
        gamma, err = fit_one(delta, out)
        if abs(gamma) < 1e-3:
            continue
        best = min(best, (err, name))
        if err <= tol * scale:
            gamma = snap_multiplier(gamma, config, tol)
            key = (gamma != 1.0, name.count("."), -order.get(name, 0))
            found.append((key, name, gamma))
    if not found:
        detail = (
            f"the best single submodule {best[1]} leaves {best[0] / scale:.2e}"
            if best[1]
            else "no submodule with an output like the block's"
        )
        raise UnsupportedModelError(
            f"block {block}: its output minus its input is not gamma * one of its submodules' "
            f"outputs at every position either ({detail} of the stream's scale, tolerance "
            f"{tol:g})"
        )
    _, name, gamma = min(found)
    return name, gamma


def residual_hint(config: Any, dtype: torch.dtype) -> str:
    """A note for a refusal in a float64 model whose config rounds the residual to float32
    (Mamba's ``residual_in_fp32``): block output - input then carries that rounding."""
    if dtype == torch.float64 and getattr(config, "residual_in_fp32", False):
        return (
            "; config.residual_in_fp32=True rounds each block's residual to float32 in this "
            "float64 model, so no part adds up to float64 precision (set it to False)"
        )
    return ""


def find_mixers(
    blocks: list[str], rec: Recording, config: Any, pair_error: UnsupportedModelError
) -> list[tuple[str, float]]:
    """Per block (mixer name, gamma) of a model of one-part blocks (:func:`find_mixer` on the
    recorded probe); UnsupportedModelError with both reasons (no pair of parts, no single
    part) naming the block otherwise."""
    out = []
    for b in blocks:
        x, y = rec.inp[b], rec.out[b]
        cands = {n: rec.out[n] for n in subtree(b, rec, x.shape)}
        try:
            out.append(find_mixer(b, x, y, cands, rec.order, tolerance(x.dtype), config))
        except UnsupportedModelError as err:
            hint = residual_hint(config, x.dtype)
            raise UnsupportedModelError(f"{pair_error}; {err}{hint}") from err
    return out
