"""Benchmark (issue #5): the Hydra per-prompt sweep three ways, side by side, in one run.

For each prompt of a fixed seeded sample of known_1000, the full per-prompt sweep: every
attention and MLP site (60 on SmolLM2-135M), K resample patches each (K = 15), every readout
(the centred target logit, sigma, and the direct effect of all 61 readout sites), computed

  (a) naive:          one hooked full forward pass of the Hugging Face model per (site, patch)
                      (``causalnet.adapters.naive.naive_patch(batched=False)``: 900 forwards);
  (b) batched naive:  all K patches of one site in one hooked full-sequence forward pass
                      (``naive_patch(batched=True)``: 60 forwards of K sequences);
  (c) causalnet:      the clean run (cached keys/values) and ``adapter.patch``: only position t
                      recomputed, from each site's layer up, all 900 rows layer-synchronously.

(a) and (b) are given the clean target for free (their clean run is not timed); (c)'s time
includes its clean run. Before any time is reported, the three ways are checked to agree on the
same patches (max abs difference of the centred target logit, sigma and every direct effect:
1e-4 in float32/float64, for sigma 1e-4 of max(1, sigma); in half precision 1e-2 (float16) or
5e-2 (bfloat16) times max(1, largest |value| of that quantity), as the device/dtype tests), else
the script exits with status 1 and writes nothing.

Also reported: the machine (CPU, cores, threads, torch, the linear kernel in use, load average
before and after), the floating-point work of (c) counted analytically from the shapes (formula
below), its achieved rate next to this machine's float32 matrix-multiply rate measured in the
same run, peak memory beyond the loaded model, and the end-to-end sweep (``run_sweep``: loading,
pool, every prompt, writing) on ``--e2e-limit`` prompts in a fresh process, extrapolated
linearly to the 1,209 prompts unless ``--e2e-full`` runs them all (the report says which).

FLOPs of (c), one prompt, multiply-add = 2 FLOPs, d model width, H / Hkv heads / key-value
heads of size dh, d_ff the MLP width, L layers, t the position, K patches:

  F_attn(t) = 2 d (H + 2 Hkv) dh  +  2 H dh d  +  4 H dh (t + 1)     (q,k,v; o_proj; scores+mix)
  F_mlp     = 6 d d_ff                                               (SwiGLU gate, up, down)
  F_layer   = F_attn(t) + F_mlp
  patch     = K * sum_l [ (F_mlp + (L-1-l) F_layer)   for attn.l      (its MLP, then the layers
                          + (L-1-l) F_layer           for mlp.l ]      above)
  clean run = (t+1) L (F_attn - 4 H dh (t+1)) + 2 H dh (t+1)(t+2) L + 2 d V   (one logit row)

Run: ``python benchmarks/bench_sweep.py`` (about 5 minutes on 2 CPU cores); see ``--help``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from machine import (  # beside this file
    gemm_rates,
    machine_info,
    peak_rss_bytes,
    peak_rss_since_reset,
    reset_peak_rss,
    rss_bytes,
    sync,
)
from torch import Tensor

from causalnet.adapters import load
from causalnet.adapters.naive import naive_patch, naive_readout
from causalnet.hydra.data import load_prompts
from causalnet.hydra.heap import keep_heap
from causalnet.hydra.sweep import SweepConfig, ablation_values

RESULTS = Path(__file__).resolve().parent / "results"
N_PAPER_PROMPTS = 1209


# ---- analytic FLOPs -------------------------------------------------------------------------
def layer_flops(arch: Any, d_ff: int, t: int) -> tuple[int, int]:
    """(F_attn(t), F_mlp) of one row at position t (module docstring)."""
    d, h, hkv, dh = arch.d_model, arch.n_heads, arch.n_kv_heads, arch.d_head
    f_attn = 2 * d * (h + 2 * hkv) * dh + 2 * h * dh * d + 4 * h * dh * (t + 1)
    return f_attn, 6 * d * d_ff


def patch_flops(arch: Any, d_ff: int, t: int, sites: list[str], k: int) -> int:
    f_attn, f_mlp = layer_flops(arch, d_ff, t)
    n_layers = arch.n_layers
    total = 0
    for site in sites:
        kind, layer = site.split(".")[0], int(site.split(".")[1])
        above = (n_layers - 1 - layer) * (f_attn + f_mlp)
        total += (f_mlp + above) if kind == "attn" else above
    return k * total


def clean_flops(arch: Any, d_ff: int, t: int) -> int:
    f_attn, f_mlp = layer_flops(arch, d_ff, t)
    h, dh, n_layers = arch.n_heads, arch.d_head, arch.n_layers
    proj = f_attn - 4 * h * dh * (t + 1)
    attend = 2 * h * dh * (t + 1) * (t + 2) * n_layers  # causal: sum over positions of 4 H dh (p+1)
    return (t + 1) * n_layers * (proj + f_mlp) + attend + 2 * arch.d_model * arch.vocab_size


# ---- the three ways -------------------------------------------------------------------------
@dataclass
class Readouts:
    """One prompt's sweep readouts: centred logit and sigma [S, K], direct effects [S, K, R]."""

    centred: Tensor
    sigma: Tensor
    direct: Tensor


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)  # one entry per timed prompt (pass)

    @property
    def mean(self) -> float:
        return sum(self.seconds) / len(self.seconds)


def way_c(adapter: Any, tokens: Tensor, sites: list[str], values: Tensor) -> Readouts:
    clean = adapter.clean_run(tokens)
    run = adapter.patch(clean, sites, values)
    return Readouts(run.centred_logit, run.sigma, run.direct_effects)


def way_naive(
    adapter: Any, tokens: Tensor, sites: list[str], values: Tensor, target: int, batched: bool
) -> Readouts:
    out = [
        naive_readout(adapter, naive_patch(adapter, tokens, s, values[i], batched=batched), target)
        for i, s in enumerate(sites)
    ]
    return Readouts(
        torch.stack([o[0] for o in out]),
        torch.stack([o[2] for o in out]),
        torch.stack([o[1] for o in out]),
    )


def max_diff(x: Readouts, y: Readouts, rows: list[int] | None = None) -> dict[str, float]:
    def pick(t: Tensor) -> Tensor:
        return t if rows is None else t[rows]

    return {
        name: float((pick(getattr(x, name)).float() - pick(getattr(y, name)).float()).abs().max())
        for name in ("centred", "sigma", "direct")
    }


# ---- end to end, in a fresh process ---------------------------------------------------------
E2E_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from causalnet.hydra.sweep import SweepConfig, run_sweep
from causalnet.adapters import load
t_imported = time.perf_counter()
mode, limit, out, device, dtype, model = sys.argv[1:7]
def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
if mode == "model-only":
    adapter = load(model, dtype=getattr(torch, dtype), device=device)
    print(json.dumps({"rss_kb": status_kb("VmRSS:"), "peak_kb": status_kb("VmHWM:")}))
    sys.exit(0)
cfg = SweepConfig(
    model=model, limit=None if limit == "all" else int(limit), device=device, dtype=dtype
)
path = run_sweep(cfg, out, progress=False)
t_done = time.perf_counter()
info = json.load(open(path / "run.json"))["info"]
print(json.dumps({"imports_s": t_imported - t0, "run_sweep_s": t_done - t_imported,
                  "info": info, "peak_kb": status_kb("VmHWM:")}))
"""


def end_to_end(limit: int | None, device: str, dtype: str, model: str) -> dict[str, Any]:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        base = subprocess.run(
            [sys.executable, "-c", E2E_SCRIPT, "model-only", "0", tmp, device, dtype, model],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        model_only = json.loads(base.stdout.strip().splitlines()[-1])
        t0 = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                E2E_SCRIPT,
                "sweep",
                "all" if limit is None else str(limit),
                str(Path(tmp) / "out"),
                device,
                dtype,
                model,
            ],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        wall = time.perf_counter() - t0
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    info = res["info"]
    n = info["n_prompts"]
    finalize = res["run_sweep_s"] - info["time_total_s"]  # consolidating the shards
    out = {
        "prompts": n,
        "full_set": n == N_PAPER_PROMPTS,
        "wall_s": wall,
        "startup_s": wall - res["run_sweep_s"],  # interpreter and imports
        "time_load_s": info["time_load_s"],
        "time_pool_s": info["time_pool_s"],
        "time_sweep_s": info["time_sweep_s"],
        "time_finalize_s": finalize,
        "s_per_prompt_sweep": info["time_sweep_s"] / n,
        "s_per_prompt_pool": info["time_pool_s"] / n,
        "peak_rss_bytes": res["peak_kb"] * 1024,
        "model_only_rss_bytes": model_only["rss_kb"] * 1024,
        "model_only_peak_bytes": model_only["peak_kb"] * 1024,
        "peak_beyond_model_bytes": (res["peak_kb"] - model_only["peak_kb"]) * 1024,
    }
    scale = N_PAPER_PROMPTS / n
    out["paper_protocol_s"] = (
        wall
        if out["full_set"]
        else out["startup_s"]
        + info["time_load_s"]
        + (info["time_pool_s"] + info["time_sweep_s"] + finalize) * scale
    )
    out["paper_protocol_is_extrapolated"] = not out["full_set"]
    return out


# ---- main -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8, help="sample prompts for (b) and (c)")
    ap.add_argument("--naive-prompts", type=int, default=1, help="of those, prompts for (a)")
    ap.add_argument(
        "--naive-site-stride",
        type=int,
        default=1,
        help="(a) on every n-th site only, its time scaled to all sites (reported as such)",
    )
    ap.add_argument("--pool", type=int, default=64, help="prompts the resample sources come from")
    ap.add_argument("--k", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes of (c) per prompt")
    ap.add_argument(
        "--model",
        default="smollm2-135m",
        help="the bundled model, or a local folder of the same family (e.g. a same-shape "
        "random-weight copy where the bundled one cannot be installed)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"]
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--e2e-limit", type=int, default=128, help="prompts of the end-to-end run")
    ap.add_argument("--e2e-full", action="store_true", help="end to end on all 1,209 prompts")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_heap()  # as a sweep's process does (causalnet.hydra.heap)
    dtype = getattr(torch, args.dtype)
    load_start = os.getloadavg()

    t0 = time.perf_counter()
    adapter = load(args.model, dtype=dtype, device=device)
    load_s = time.perf_counter() - t0
    rss_model = rss_bytes()
    arch = adapter.arch
    d_ff = int(adapter.model.config.intermediate_size)
    sites = adapter.sites()
    site_index = torch.tensor([adapter.readout_sites().index(s) for s in sites])

    prompts = load_prompts("known_1000")
    gen = torch.Generator().manual_seed(args.seed)
    pool_ids = torch.randperm(len(prompts), generator=gen)[: args.pool].tolist()
    tokens = [adapter.encode(prompts[i].text) for i in pool_ids]
    pool = adapter.final_values(tokens)[:, site_index.to(device)]
    config = SweepConfig(k=args.k, seed=args.seed)
    bench = list(range(args.prompts))  # pool rows 0..n-1: the sample, sources drawn among all
    values = [ablation_values(config, pool, j)[0].contiguous() for j in bench]
    lengths = [len(tokens[j]) for j in bench]

    info = machine_info(device)
    print(
        f"machine: {info['cpu']}, {info['cpu_cores_usable']} cores, torch {info['torch']}, "
        f"{info['torch_threads']} threads, linear: {info['linear_kernel_float32_cpu']}"
    )
    print(f"load average at start: {load_start}")
    rates = gemm_rates(device)
    machine_rate = max(rates.values())
    print("float32 matmul GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()))

    # warm-up (first-call costs: kernel selection, allocator)
    way_c(adapter, tokens[bench[0]], sites, values[0])
    naive_patch(adapter, tokens[bench[0]], sites[0], values[0][0], batched=True)

    # (c), with its peak memory (reset the kernel's peak mark first where possible)
    reset_ok = reset_peak_rss()
    c_time, c_out = Timing(), []
    best_c: list[float] = []
    for j in bench:
        times = []
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            out = way_c(adapter, tokens[j], sites, values[j])
            sync(device)
            times.append(time.perf_counter() - t0)
        c_out.append(out)
        c_time.seconds.append(sum(times) / len(times))
        best_c.append(min(times))
    peak = peak_rss_since_reset() if reset_ok else peak_rss_bytes()
    cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    print(
        f"(c) {c_time.mean:.3f} s/prompt (mean of {args.repeats} passes), "
        f"best {sum(best_c) / len(best_c):.3f}"
    )

    # (b)
    b_time, b_out = Timing(), []
    for n, j in enumerate(bench):
        target = int(adapter.clean_run(tokens[j]).target)
        sync(device)
        t0 = time.perf_counter()
        b_out.append(way_naive(adapter, tokens[j], sites, values[j], target, batched=True))
        sync(device)
        b_time.seconds.append(time.perf_counter() - t0)
        print(f"(b) prompt {n + 1}/{len(bench)}: {b_time.seconds[-1]:.2f} s")

    # (a), on the first prompts, every n-th site
    a_sites_idx = list(range(0, len(sites), args.naive_site_stride))
    a_sites = [sites[i] for i in a_sites_idx]
    a_time, a_out = Timing(), []
    for n, j in enumerate(bench[: args.naive_prompts]):
        target = int(adapter.clean_run(tokens[j]).target)
        sync(device)
        t0 = time.perf_counter()
        a_out.append(
            way_naive(adapter, tokens[j], a_sites, values[j][a_sites_idx], target, batched=False)
        )
        sync(device)
        a_time.seconds.append((time.perf_counter() - t0) * len(sites) / len(a_sites))
        print(f"(a) prompt {n + 1}: {a_time.seconds[-1]:.1f} s (all sites)")
    load_end = os.getloadavg()

    # agreement, before any time is reported
    def tol(ref: Readouts, name: str) -> float:
        """float32/float64: 1e-4 in logit units (centred logit, direct effects), and 1e-4 of
        max(1, sigma) for sigma (a norm of the residual stream, tens on SmolLM2: its float32
        rounding is relative). Half precision, as tests/adapters/test_device_dtypes.py:
        (1e-2 float16, 5e-2 bfloat16) * max(1, largest |reference value| of that quantity)."""
        scale = max(1.0, float(getattr(ref, name).float().abs().max()))
        if dtype in (torch.float32, torch.float64):
            return 1e-4 * (scale if name == "sigma" else 1.0)
        return (1e-2 if dtype == torch.float16 else 5e-2) * scale

    agreement: dict[str, dict[str, float]] = {}
    for j in range(len(bench)):
        agreement[f"prompt{j} b-c"] = max_diff(b_out[j], c_out[j])
    for j in range(len(a_out)):
        c_sub = Readouts(
            *(getattr(c_out[j], f)[a_sites_idx] for f in ("centred", "sigma", "direct"))
        )
        b_sub = Readouts(
            *(getattr(b_out[j], f)[a_sites_idx] for f in ("centred", "sigma", "direct"))
        )
        agreement[f"prompt{j} a-c"] = max_diff(a_out[j], c_sub)
        agreement[f"prompt{j} a-b"] = max_diff(a_out[j], b_sub)
    worst = max(v for d in agreement.values() for v in d.values())
    limits = {name: min(tol(ref, name) for ref in c_out) for name in ("centred", "sigma", "direct")}
    print(f"agreement: worst max |difference| {worst:.2e} (limits {limits})")
    if not all(d[name] <= limits[name] for d in agreement.values() for name in limits):
        for key, diffs in agreement.items():
            print(f"  {key}: {diffs}")
        print("ABORT: the three ways disagree; no timings reported")
        return 1

    # work and rates
    p_flops = [patch_flops(arch, d_ff, t - 1, sites, args.k) for t in lengths]
    c_flops = [clean_flops(arch, d_ff, t - 1) for t in lengths]
    flops_mean = (sum(p_flops) + sum(c_flops)) / len(bench)
    achieved = flops_mean / c_time.mean / 1e9
    achieved_best = flops_mean / (sum(best_c) / len(best_c)) / 1e9
    c_on_a = sum(c_time.seconds[: len(a_out)]) / max(len(a_out), 1)

    e2e = None
    if not args.no_e2e:
        print("end-to-end run in a fresh process ...")
        e2e = end_to_end(
            None if args.e2e_full else args.e2e_limit, args.device, args.dtype, args.model
        )

    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": info,
        "load_average_start": load_start,
        "load_average_end": load_end,
        "model": args.model,
        "dtype": args.dtype,
        "sizes": {
            "layers": arch.n_layers,
            "d_model": arch.d_model,
            "heads": arch.n_heads,
            "kv_heads": arch.n_kv_heads,
            "d_ff": d_ff,
            "vocab": arch.vocab_size,
            "sites": len(sites),
            "readouts": len(sites) + 1,
            "k": args.k,
            "rows_per_prompt": len(sites) * args.k,
            "sample_prompts": len(bench),
            "sample_prompt_tokens": lengths,
            "naive_prompts": len(a_out),
            "naive_sites_timed": len(a_sites),
            "naive_extrapolated_from_site_subset": len(a_sites) < len(sites),
            "seed": args.seed,
        },
        "load_model_s": load_s,
        "seconds_per_prompt": {
            "a_naive": a_time.mean if a_out else None,
            "b_batched_naive": b_time.mean,
            "c_causalnet": c_time.mean,
            "c_causalnet_best_pass": sum(best_c) / len(best_c),
            "c_causalnet_on_the_a_prompts": c_on_a,
        },
        "ratios": {
            "a_over_c": (a_time.mean / c_on_a) if a_out else None,
            "b_over_c": b_time.mean / c_time.mean,
        },
        "agreement_max_abs": agreement,
        "agreement_limits": limits,
        "flops_per_prompt": {
            "patch": sum(p_flops) / len(bench),
            "clean_run": sum(c_flops) / len(bench),
            "total": flops_mean,
        },
        "gflops_per_s": {"c_achieved": achieved, "c_achieved_best_pass": achieved_best, **rates},
        "machine_matmul_gflops": machine_rate,
        "c_fraction_of_machine_matmul": achieved / machine_rate,
        "memory": {
            "rss_after_model_load_bytes": rss_model,
            "peak_rss_during_c_bytes": peak,
            "peak_beyond_model_during_c_bytes": peak - rss_model,
            "peak_reset_supported": reset_ok,
            "cuda_max_allocated_bytes": cuda_peak,
        },
        "end_to_end": e2e,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{dt.date.today().isoformat()}-{info['host']}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = render(result)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    print(f"written: {args.out / stem}.json, .md")
    return 0


def render(r: dict[str, Any]) -> str:
    """The Markdown report of one result."""
    m, s, t = r["machine"], r["sizes"], r["seconds_per_prompt"]
    ratio = r["ratios"]
    gb = 1024**3
    lines = [
        f"# Sweep benchmark, {r['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cpu_cores_usable']} usable cores, {m['torch_threads']} torch "
        f"threads, torch {m['torch']}, Python {m['python']}, device {m['device']}; float32 "
        f"linear kernel: {m['linear_kernel_float32_cpu']}. Load average (1, 5, 15 min) at start "
        f"{_fmt_load(r['load_average_start'])}, at end {_fmt_load(r['load_average_end'])}.",
        "",
        f"Sizes: {r['model']} ({s['layers']} layers, d {s['d_model']}, {s['heads']} heads / "
        f"{s['kv_heads']} kv heads, d_ff {s['d_ff']}, vocab {s['vocab']}), {r['dtype']}; "
        f"{s['sites']} sites x K={s['k']} = {s['rows_per_prompt']} patched runs per prompt, "
        f"{s['readouts']} readouts each; {s['sample_prompts']} seeded known_1000 prompts "
        f"(tokens {s['sample_prompt_tokens']}), seed {s['seed']}.",
        "",
        "| way | per prompt | prompts timed | time / prompt | vs (c) |",
        "|---|---|---|---|---|",
    ]
    a_note = ""
    if s["naive_extrapolated_from_site_subset"]:
        a_note = f" (timed on {s['naive_sites_timed']} of {s['sites']} sites, scaled)"
    if t["a_naive"] is not None:
        lines.append(
            f"| (a) naive | {s['rows_per_prompt']} hooked HF forwards (one per site, patch) | "
            f"{s['naive_prompts']}{a_note} | {t['a_naive']:.2f} s | "
            f"{ratio['a_over_c']:.0f}x |"
        )
    lines += [
        f"| (b) batched naive | {s['sites']} hooked HF forwards of K={s['k']} sequences | "
        f"{s['sample_prompts']} | {t['b_batched_naive']:.2f} s | {ratio['b_over_c']:.0f}x |",
        f"| (c) causalnet | clean run + one KV-cached layer-synchronous patch of all rows | "
        f"{s['sample_prompts']} | {t['c_causalnet']:.3f} s "
        f"(best pass {t['c_causalnet_best_pass']:.3f} s) | 1 |",
        "",
        "(a) and (b) get the clean target for free; (c) includes its clean run. (a)/(c) is taken "
        "on the prompts (a) ran on "
        f"((c) there: {t['c_causalnet_on_the_a_prompts']:.3f} s).",
        "",
        f"Agreement before timing: worst max |difference| of centred target logit, sigma and "
        f"every direct effect between (a), (b), (c): "
        f"{max(v for d in r['agreement_max_abs'].values() for v in d.values()):.1e} "
        "(limits: " + ", ".join(f"{k} {v:.1e}" for k, v in r["agreement_limits"].items()) + ").",
        "",
        f"Work of (c): {r['flops_per_prompt']['total'] / 1e9:.1f} GFLOP per prompt "
        f"({r['flops_per_prompt']['patch'] / 1e9:.1f} patch + "
        f"{r['flops_per_prompt']['clean_run'] / 1e9:.2f} clean run; formula in "
        f"`benchmarks/bench_sweep.py`), achieved {r['gflops_per_s']['c_achieved']:.0f} GFLOP/s "
        f"(best pass {r['gflops_per_s']['c_achieved_best_pass']:.0f}) = "
        f"{100 * r['c_fraction_of_machine_matmul']:.0f}% of this machine's float32 matmul rate "
        f"measured in the same run, {r['machine_matmul_gflops']:.0f} GFLOP/s ("
        + ", ".join(f"{k} {v:.0f}" for k, v in r["gflops_per_s"].items() if not k.startswith("c_"))
        + ").",
        "",
        f"Memory: {r['memory']['rss_after_model_load_bytes'] / gb:.2f} GB resident after loading "
        f"the model; peak during (c) {r['memory']['peak_beyond_model_during_c_bytes'] / gb:.2f} "
        "GB beyond that.",
    ]
    e = r["end_to_end"]
    if e is not None:
        how = (
            "measured on all 1,209 prompts"
            if e["full_set"]
            else (
                f"EXTRAPOLATED from a {e['prompts']}-prompt run: startup + load + (pool + sweep + "
                f"consolidation) x 1,209 / {e['prompts']}"
            )
        )
        lines += [
            "",
            f"End to end (`run_sweep` in a fresh process, {e['prompts']} prompts): "
            f"{e['wall_s']:.1f} s wall (startup {e['startup_s']:.1f} s, "
            f"load {e['time_load_s']:.1f} s, pool {e['time_pool_s']:.1f} s, sweep "
            f"{e['time_sweep_s']:.1f} s = {e['s_per_prompt_sweep']:.3f} s/prompt incl. rows "
            f"and writing, consolidation {e['time_finalize_s']:.1f} s); "
            f"peak memory {e['peak_beyond_model_bytes'] / gb:.2f} GB beyond the "
            f"model alone ({e['model_only_peak_bytes'] / gb:.2f} GB). Paper protocol (1,209 "
            f"prompts, 60 sites, K=15, all readouts): {e['paper_protocol_s'] / 60:.1f} min, {how}.",
        ]
    return "\n".join(lines) + "\n"


def _fmt_load(load: Any) -> str:
    return ", ".join(f"{x:.2f}" for x in load)


if __name__ == "__main__":
    sys.exit(main())
