"""``causalnet repairers`` and ``causalnet attribution``: who repairs, and what a cheap estimate
misses, from a results folder (issue 13, §3 and §5). Presentation only: the numbers are
:mod:`causalnet.hydra.repairers` and :mod:`causalnet.hydra.attribution_compare`'s.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd

from ..errors import ResultsError
from .attribution import attribution_table
from .attribution_compare import compensation_link, disagreements, joined, per_layer
from .repairers import (
    compensation_map,
    compensation_matrix,
    infer_parallel_residual,
    replacement_heads,
    top_compensators,
)
from .store import ResultsStore


def _fmt(frame: pd.DataFrame) -> str:
    with pd.option_context("display.max_rows", None, "display.width", 200):
        return frame.to_string(index=False, float_format=lambda v: f"{v:.3f}")


def repairers_report(
    results: str | os.PathLike[str], k: int = 5, n_top: int = 3, figure: str | None = None
) -> str:
    """The text of ``causalnet repairers``: per ablated site its largest compensators (mean
    Delta_DE and share of the mean CE), and at head granularity the replacement heads'
    consistency across prompts. ``figure``: also save the compensation map there."""
    store = ResultsStore(results)
    effects, readouts = store.load_effects(), store.load_readouts()
    parallel = infer_parallel_residual(effects, readouts)
    cmap = compensation_map(readouts, parallel)
    lines = [
        f"compensation map: {cmap['ablated_site'].nunique()} ablated sites x "
        f"{cmap['readout_site'].nunique()} downstream readouts, "
        f"{readouts['prompt_id'].nunique()} prompts "
        f"({'parallel' if parallel else 'sequential'} residual, read off the tables)",
        "",
        f"largest compensators (top {n_top} by |mean Delta_DE|; share of the total |mean|):",
        _fmt(top_compensators(cmap, n_top)),
    ]
    if (effects["kind"] == "head").any():
        heads = replacement_heads(readouts, k, parallel).consistency
        lines += [
            "",
            f"replacement heads: top-{k} downstream heads by repair, consistency over prompts",
            _fmt(heads),
            f"mean over ablated heads: Jaccard {heads['mean_jaccard'].mean():.3f} "
            f"(chance {heads['chance_jaccard'].mean():.3f}), "
            f"Spearman {heads['mean_spearman'].mean():.3f}",
        ]
    if figure:
        from .compensation_figures import plot_compensation_map

        path = plot_compensation_map(compensation_matrix(cmap), figure)
        lines.append(f"figure: {path}")
    return "\n".join(lines)


def attribution_report(
    results: str | os.PathLike[str],
    limit: int | None = None,
    top: int = 10,
    figure: str | None = None,
) -> str:
    """The text of ``causalnet attribution``: attribution patching on the folder's own model,
    prompts and patches (checked by the fingerprints in run.json), against its exact total
    effects -- per layer, the worst rows, and their link to the compensation."""
    from .config import SweepConfig
    from .devices import load_for_config
    from .fingerprints import model_fingerprint, prompts_fingerprint
    from .plan import plan_sweep, pool_sites, sweep_prompts, sweep_sites
    from .pool import read_pool

    store = ResultsStore(results)
    args = store.load_run()["args"]
    config = SweepConfig(**{k: args[k] for k in SweepConfig.field_names() if k in args})
    prompts = sweep_prompts(config)
    stored_fp = args.get("prompts_fingerprint")
    if stored_fp is not None and stored_fp != prompts_fingerprint(prompts):
        raise ResultsError(f"{results}: the prompts changed since the sweep (fingerprint)")
    adapter = load_for_config(config.model, config.dtype, config.device)
    stored_model = args.get("model_fingerprint")
    if stored_model is not None and stored_model != model_fingerprint(config.model, None):
        raise ResultsError(f"{results}: the model changed since the sweep (fingerprint)")
    pool = read_pool(Path(results))
    if pool is None:
        raise ResultsError(f"{results} holds no ablation pool (pool.json): cannot re-draw patches")
    pool.check([p.id for p in prompts], pool_sites(*sweep_sites(config, adapter)))
    plan = plan_sweep(config, adapter, prompts=prompts, pool=pool.values)
    effects = store.load_effects()
    done = set(effects["prompt_id"])
    indices = [i for i, p in enumerate(prompts) if p.id in done][:limit]
    if not indices:
        raise ResultsError(f"{results} has no completed prompt")
    start = time.perf_counter()
    atp = attribution_table(adapter, plan, indices)
    seconds = time.perf_counter() - start
    rows = joined(atp, effects[effects["prompt_id"].isin({prompts[i].id for i in indices})])
    link = compensation_link(rows)
    info = store.load_run().get("info", {})
    sweep_s = info.get("s_per_prompt")
    lines = [
        f"attribution patching on {len(indices)} prompts x {len(plan.sites)} sites "
        f"({config.granularity} granularity, {config.ablation} ablation, k={config.k}): "
        f"{seconds / len(indices):.3f} s per prompt"
        + (f"; the exact sweep took {sweep_s:.3f} s per prompt" if sweep_s else ""),
        "",
        "per layer of the ablated site (estimate vs exact total effect, Eq 12):",
        _fmt(per_layer(rows)),
        "",
        f"largest disagreements (compensation_rank 1 = largest |CE| of {len(rows)} rows):",
        _fmt(disagreements(rows, top)),
        "",
        f"the top {link.quantile:.0%} rows by |error| are {link.top_overlap:.0%} among the top "
        f"{link.quantile:.0%} by |CE| (chance {link.chance_overlap:.0%}); Spearman(|error|, |CE|)"
        f" = {link.spearman_error_compensation:.3f}; mean |CE| there "
        f"{link.mean_abs_compensation_top_error:.3f} vs {link.mean_abs_compensation_all:.3f} "
        "over all rows",
    ]
    if figure:
        from .compensation_figures import plot_attribution

        lines.append(f"figure: {plot_attribution(rows, figure)}")
    return "\n".join(lines)
