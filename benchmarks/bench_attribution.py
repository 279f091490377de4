"""Attribution patching timed next to the exact sweep, on the same prompts, sites and patches.

    python benchmarks/bench_attribution.py [--prompts 8] [--granularity layer] [--sites GLOB]

For each prompt (interleaved, so both see the same machine load): (exact) the protocol's
per-prompt work, :func:`causalnet.hydra.plan.compute_prompt` -- one cached clean run and the
batched patched runs of every (site, patch), K = 15 resample patches; (estimate) attribution
patching, :func:`causalnet.hydra.attribution.attribution_table` -- one forward and one backward
pass and a dot product per (site, patch). The pool (shared by both) is built first and not
timed. Prints the machine, both times per prompt and their ratio, and how well the estimate
agrees (Pearson r over all rows, with the exact total effects of the same rows); writes
``benchmarks/results/<date>-attribution-<machine>-<granularity>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from causalnet.adapters import load
from causalnet.hydra.analysis import pearson
from causalnet.hydra.attribution import attribution_table
from causalnet.hydra.attribution_compare import joined
from causalnet.hydra.config import SweepConfig
from causalnet.hydra.data import load_prompts
from causalnet.hydra.plan import compute_prompt, plan_sweep

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """A short description of where this runs."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=8, help="prompts timed (default 8)")
    parser.add_argument("--pool", type=int, default=32, help="prompts in the ablation pool")
    parser.add_argument("--granularity", choices=("layer", "head"), default="layer")
    parser.add_argument("--sites", default=None, help="sites to ablate (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tag", default=None, help="file name tag (default: cpu or cuda)")
    args = parser.parse_args()

    adapter = load(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    prompts = load_prompts("known_1000")[: max(args.pool, args.prompts + 1)]
    config = SweepConfig(
        model=args.model,
        granularity=args.granularity,
        sites=args.sites,
        dtype=args.dtype,
        device=args.device,
    )
    plan = plan_sweep(config, adapter, prompts=prompts)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    compute_prompt(adapter, plan, 0, False)  # warm-up of both paths (kernels, packed weights)
    attribution_table(adapter, plan, [0])
    exact_s, atp_s, effects, estimates = [], [], [], []
    for index in range(1, args.prompts + 1):
        sync()
        start = time.perf_counter()
        rows = compute_prompt(adapter, plan, index, False)
        sync()
        exact_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        atp = attribution_table(adapter, plan, [index])
        sync()
        atp_s.append(time.perf_counter() - start)
        effects.append(rows.effects)
        estimates.append(atp)
    joint = joined(pd.concat(estimates), pd.concat(effects))
    exact, atp = joint["total_effect"].to_numpy(), joint["atp_total_effect"].to_numpy()
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": machine(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "granularity": args.granularity,
        "sites": args.sites or "all",
        "n_sites": len(plan.sites),
        "k": config.k,
        "prompts_timed": args.prompts,
        "exact_s_per_prompt": statistics.median(exact_s),
        "attribution_s_per_prompt": statistics.median(atp_s),
        "ratio_exact_over_attribution": statistics.median(exact_s) / statistics.median(atp_s),
        "pearson_estimate_exact": pearson(exact, atp),
        "median_abs_error": float(np.median(np.abs(atp - exact))),
        "rows": len(joint),
    }
    print(f"machine: {result['machine']} (load average {result['load_average_1min']})")
    print(
        f"{args.model} {args.dtype} on {args.device}, {args.granularity} granularity, "
        f"{len(plan.sites)} sites x K={config.k} patches, median of {args.prompts} prompts:"
    )
    exact_t, atp_t = result["exact_s_per_prompt"], result["attribution_s_per_prompt"]
    print(f"  exact sweep (compute_prompt):         {exact_t:.3f} s/prompt")
    print(f"  attribution patching (1 fwd + 1 bwd): {atp_t:.3f} s/prompt")
    print(f"  ratio exact / estimate: {result['ratio_exact_over_attribution']:.1f}x")
    r = result["pearson_estimate_exact"]
    print(f"  Pearson r(estimate, exact) over {len(joint)} rows: {r:.3f}")
    tag = args.tag or ("cuda" if args.device.startswith("cuda") else "cpu")
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{result['date']}-attribution-{tag}-{args.granularity}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    lines = [f"| {k} | {v} |" for k, v in result.items()]
    md = "# Attribution patching vs the exact sweep\n\n| field | value |\n|---|---|\n"
    stem.with_suffix(".md").write_text(md + "\n".join(lines) + "\n", encoding="utf-8")
    print(f"written: {stem}.json, {stem}.md")


if __name__ == "__main__":
    main()
