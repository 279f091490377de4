"""Where one prompt's sweep spends its time: a torch.profiler table of causalnet's path.

    python benchmarks/profile_patch.py [--model smollm2-135m] [--prompt 1] [--k 15]

Times the clean run and the patch of every site with K resample patches (sources from the first
32 known_1000 prompts) for one prompt, then prints the operators by self CPU time.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from causalnet.adapters import load
from causalnet.hydra.data import load_prompts
from causalnet.hydra.sweep import SweepConfig, ablation_values


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt", type=int, default=1, help="index among the first 32 prompts")
    ap.add_argument("--k", type=int, default=15)
    ap.add_argument("--rows", type=int, default=18, help="operators to list")
    args = ap.parse_args(argv)
    adapter = load(args.model)
    sites = adapter.sites()
    index = torch.tensor([adapter.readout_sites().index(s) for s in sites])
    tokens = [adapter.encode(p.text) for p in load_prompts("known_1000")[:32]]
    pool = adapter.final_values(tokens)[:, index]
    values = ablation_values(SweepConfig(k=args.k), pool, args.prompt)[0].contiguous()
    prompt = tokens[args.prompt]

    def one() -> None:
        t0 = time.perf_counter()
        clean = adapter.clean_run(prompt)
        t1 = time.perf_counter()
        adapter.patch(clean, sites, values)
        print(f"clean run {t1 - t0:.3f} s, patch {time.perf_counter() - t1:.3f} s")

    one()  # warm-up: kernel selection, packed weights
    threads = torch.get_num_threads()
    print(f"{len(prompt)} tokens, {len(sites)} sites x K={args.k}, {threads} torch threads")
    one()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
