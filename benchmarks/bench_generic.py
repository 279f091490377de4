"""Benchmark (issue 11): the generic (discovered) adapter's fast patching, side by side.

Prompts are timed as a sweep computes them: each prompt's clean run comes from one forward of
its group of consecutive prompts (:mod:`causalnet.hydra.cleanruns`, timed with the prompt that
asks for the group first), then its patches.

1. The bundled SmolLM2-135M: per prompt, the full sweep (clean run + every attention and MLP
   site, 60, with K = 15 resample patches, every readout) through the hand-written Llama adapter
   and through the generic adapter of the same model (``adapt(model, generic=True)``), timed
   alternately in the same run. Before any time is reported the two agree on the first prompt:
   centred logit, sigma and every direct effect within 1e-5 of max(1, the quantity's largest
   |value|), else the script exits with status 1 and writes nothing.
2. Random-weight models of SmolLM2's width and depth (d = 576, 30 layers, 9 heads, 3 KV heads,
   MLP 1536; Mixtral: 4 experts of 768, top-2) of types with no hand-written adapter (Qwen3,
   Mixtral, Phi-3): the generic fast path (clean run + patch; for the speedups the first prompt's
   clean run alone) against the batched naive
   re-forwards -- ``naive_patch(batched=True)`` (one hooked full forward of K sequences per
   site, as ``bench_sweep.py``'s way (b), the clean target given for free) and the generic
   adapter's own fallback ``reforward_patch`` (all rows in chunks, last-position logits only) --
   after checking that they agree (1e-4 of max(1, |value|)); and the fast path's float32 rate
   (FLOPs counted analytically from the shapes, ``bench_sweep.py``'s formula with each model's
   MLP) next to this machine's matrix-multiply rate measured in the same run.

3. Where the fast paths' time goes: three prompts run again with every call of the adapters'
   linear kernels timed -- clean runs, patches, the linear kernels' seconds and rate, and
   everything else (the models' other operations and the replay's bookkeeping).

The machine is named with its load average before and after (other processes share the cores:
times are wall-clock, the ratios are the point). Results: ``benchmarks/results/<date>-generic-
<host>.json`` and ``.md``. Run: ``python benchmarks/bench_generic.py [--prompts 20]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers as T
from bench_sweep import Readouts, max_diff, way_c, way_naive
from generic_report import render, summary_table
from machine import gemm_rates, machine_info

from causalnet.adapters import adapt, kernels, load, replay
from causalnet.adapters.trace import reforward_patch
from causalnet.hydra import cleanruns
from causalnet.hydra.cleanruns import CleanGroups
from causalnet.hydra.data import load_prompts
from causalnet.hydra.heap import keep_heap

RESULTS = Path(__file__).resolve().parent / "results"
K = 15
SMOL = dict(
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    vocab_size=49152,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
RANDOM = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=64)),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=768, num_local_experts=4, num_experts_per_tok=2),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0)),
}


def mlp_flops(name: str, d: int) -> int:
    """FLOPs of one row's MLP (SwiGLU: 6 d d_ff per expert used; Mixtral's router 2 d E)."""
    if name == "mixtral":
        return 2 * 6 * d * 768 + 2 * d * 4
    return 6 * d * 1536


def patch_flops(name: str, t: int, n_layers: int, k: int) -> int:
    """One prompt's clean run + patches of every attention and MLP site (bench_sweep.py's
    formula; q/k norms and rotary are not counted)."""
    d, h, hkv, dh = 576, 9, 3, 64
    f_attn = 2 * d * (h + 2 * hkv) * dh + 2 * h * dh * d + 4 * h * dh * (t + 1)
    f_mlp = mlp_flops(name, d)
    patch = sum(
        (f_mlp + (n_layers - 1 - layer) * (f_attn + f_mlp))
        + (n_layers - 1 - layer) * (f_attn + f_mlp)
        for layer in range(n_layers)
    )
    clean = (t + 1) * n_layers * (f_attn + f_mlp) + 2 * d * SMOL["vocab_size"]
    return k * patch + clean


def resample(adapter: Any, prompts: list[torch.Tensor], i: int) -> torch.Tensor:
    """Values [S, K, d]: every site's value in K other prompts (a resample ablation)."""
    pool = adapter.final_values(prompts)  # [P, R, d]
    src = [j for j in range(len(prompts)) if j != i][:K]
    while len(src) < K:
        src = src + src
    return pool[src[:K], 1:].transpose(0, 1).contiguous()


def timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def rel_diffs(x: Readouts, y: Readouts) -> dict[str, float]:
    raw = max_diff(x, y)
    return {k: v / max(1.0, float(getattr(y, k).abs().max())) for k, v in raw.items()}


def agreement(
    hand: Any, gen: Any, prompts: list[torch.Tensor], sites: list[str]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The check before any time, on the first prompt, relative to max(1, |value|): (the float32
    generic path against the float32 hand-written one -- gate 1e-4: they sum in different orders
    and on some CPUs differ by ~1e-5 of the largest value, as each differs from float64 --, the
    two paths cast to float64 against each other -- gate 1e-5 -- and each float32 path against
    that float64 result). Every run patches the same values (the float64 resample's)."""
    hand64 = load("smollm2-135m", dtype=torch.float64)
    gen64 = adapt(hand64.model, generic=True)
    values = resample(hand64, prompts, 0)
    truth = way_c(hand64, prompts[0], sites, values)
    exact = {"generic_vs_hand": rel_diffs(way_c(gen64, prompts[0], sites, values), truth)}
    v32 = values.float()
    h32, g32 = (way_c(a, prompts[0], sites, v32) for a in (hand, gen))
    exact["hand_float32_vs_float64"] = rel_diffs(h32, truth)
    exact["generic_float32_vs_float64"] = rel_diffs(g32, truth)
    return rel_diffs(g32, h32), exact


def warm_up(adapter: Any, prompts: list[torch.Tensor]) -> dict[str, float]:
    """What a sweep's earlier prompts leave behind, untimed for the comparison: each prompt's
    clean run and a patch of two sites (the generic path learns there which block arguments
    prompts of one length share), then one full patch (every site, K rows: a sweep's first
    prompt). The full patch pays once per process what every later prompt reuses: oneDNN's
    kernel for each row count the patch's layers see (~1 ms each, ~300 of them) and the first
    allocations of its largest buffers. Returns the seconds each part took."""
    sites = adapter.sites("layer")
    t0 = time.perf_counter()
    for tokens in prompts:
        clean = adapter.clean_run(tokens)
        adapter.patch(clean, sites[:2], clean.site_values[1:3, None].clone())
    t1 = time.perf_counter()
    clean = adapter.clean_run(prompts[0])
    values = clean.site_values[1:, None].expand(-1, K, -1).clone()
    adapter.patch(clean, sites, values)
    t2 = time.perf_counter()
    return {"two_site_patches_s": t1 - t0, "first_full_patch_s": t2 - t1}


class CaptureCount:
    """Counts the generic path's forwards that capture block arguments (a prompt whose length
    has no shared arguments yet)."""

    def __init__(self) -> None:
        self.n = 0
        self.real = replay.capture

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.n += 1
        return self.real(*args, **kwargs)


class LinearClock:
    """Time spent inside the adapters' linear kernels (``kernels.linear``, which every linear
    layer of the generic fast path calls, and ``linear_silu`` / ``linear_mul``, the hand-written
    Llama path's fused MLP) and the FLOPs they did, while installed (:meth:`install`)."""

    NAMES = ("linear", "linear_silu", "linear_mul")

    def __init__(self) -> None:
        self.s = 0.0
        self.flops = 0
        self.real = {n: getattr(kernels, n) for n in self.NAMES}

    def _wrap(self, name: str) -> Any:
        real = self.real[name]

        def fn(x: torch.Tensor, *args: Any) -> torch.Tensor:
            w = args[1] if name == "linear_mul" else args[0]
            t0 = time.perf_counter()
            y = real(x, *args)
            self.s += time.perf_counter() - t0
            self.flops += 2 * (x.numel() // x.shape[-1]) * w.shape[0] * w.shape[1]
            return y

        return fn

    def install(self) -> None:
        for n in self.NAMES:
            setattr(kernels, n, self._wrap(n))

    def remove(self) -> None:
        for n, f in self.real.items():
            setattr(kernels, n, f)


def breakdown(
    adapter: Any, name: str, prompts: list[torch.Tensor], sites: list[str], values: list
) -> dict[str, float]:
    """Where the fast path's time goes on ``prompts`` (run again, after the timed ones): the
    clean runs, the patches, and within both the linear kernels (seconds and GFLOP/s) -- the
    rest is the models' other operations (norms, rotary, attention over the cache, routing,
    activations) and the replay's bookkeeping."""
    clock = LinearClock()
    clock.install()
    clean_s = patch_s = flops = 0.0
    try:
        cleans, clean_s = timed(lambda: adapter.clean_runs(prompts))  # one group, as a sweep
        for tokens, clean, v in zip(prompts, cleans, values, strict=True):
            patch_s += timed(lambda c=clean, v=v: adapter.patch(c, sites, v))[1]
            flops += patch_flops(name, len(tokens) - 1, 30, K)
    finally:
        clock.remove()
    total = clean_s + patch_s
    return {
        "prompts": len(prompts),
        "clean_s": clean_s,
        "patch_s": patch_s,
        "linear_s": clock.s,
        "linear_gflop_per_s": clock.flops / max(clock.s, 1e-9) / 1e9,
        "other_s": total - clock.s,
        "gflop_per_s": flops / total / 1e9,
    }


def way_sweep(
    adapter: Any, groups: CleanGroups, prompts: list, i: int, sites: list, values: torch.Tensor
) -> Readouts:
    """Prompt ``i`` of ``prompts`` as a sweep computes it: its clean run from its group's forward
    (computed at the group's first request), then every site's patches."""
    clean = groups.take(adapter, prompts, "layer", i)
    run = adapter.patch(clean, sites, values)
    return Readouts(run.centred_logit, run.sigma, run.direct_effects)


def smollm2(
    hand: Any, prompts: list[torch.Tensor], n_timed: int, warm: list[torch.Tensor]
) -> dict[str, Any]:
    gen, t_adapt = timed(lambda: adapt(hand.model, generic=True))
    refusal, t_check = timed(lambda: gen.fast_refusal)
    if refusal is not None:
        raise SystemExit(f"the generic fast path is refused on SmolLM2: {refusal}")
    sites = hand.sites("layer")
    diffs, exact = agreement(hand, gen, prompts, sites)
    if max(exact["generic_vs_hand"].values()) > 1e-5 or max(diffs.values()) > 1e-4:
        raise SystemExit(f"generic and hand-written disagree on SmolLM2: {diffs}, {exact}")
    warm_s = {"hand": warm_up(hand, warm), "generic": warm_up(gen, warm)}
    times: dict[str, list[float]] = {"hand": [], "generic": []}
    timed_p = prompts[1 : n_timed + 1]
    kept = {id(hand): CleanGroups(), id(gen): CleanGroups()}
    counter = CaptureCount()
    replay.capture = counter
    try:
        for i in range(1, n_timed + 1):
            values = resample(hand, prompts, i)
            for name, a in (("hand", hand), ("generic", gen)):
                one = functools.partial(way_sweep, a, kept[id(a)], timed_p, i - 1, sites, values)
                times[name].append(timed(one)[1])
    finally:
        replay.capture = counter.real
    med = {k: statistics.median(v) for k, v in times.items()}
    total = {k: sum(v) for k, v in times.items()}
    # SmolLM2 has the shapes of the random Qwen3 (no q/k norms): the same FLOP count
    flops = sum(patch_flops("qwen3", len(p) - 1, 30, K) for p in prompts[1 : n_timed + 1])
    extra = prompts[1:4]
    extra_values = [resample(hand, prompts, i) for i in range(1, 4)]
    return {
        "gflop_per_s": {k: flops / v / 1e9 for k, v in total.items()},
        "breakdown": {
            k: breakdown(a, "qwen3", extra, sites, extra_values)
            for k, a in (("hand", hand), ("generic", gen))
        },
        "warm_up_prompts": len(warm),
        "warm_up_s": warm_s,
        "arguments_by_length": replay.arguments_by_length(gen),
        "timed_prompts_that_captured": counter.n,
        "total_s": total,
        "ratio_total_generic_over_hand": total["generic"] / total["hand"],
        "agreement_rel": diffs,
        "agreement_float64": exact,
        "adapt_s": t_adapt,
        "fast_check_s": t_check,
        "fast_error": gen.fast_error,
        "times_s": times,
        "median_s": med,
        "ratio_generic_over_hand": med["generic"] / med["hand"],
        "prompt_lengths": [len(p) for p in prompts[1 : n_timed + 1]],
    }


def random_model(
    name: str, prompts: list[torch.Tensor], n_timed: int, warm: list[torch.Tensor]
) -> dict[str, Any]:
    cfg_cls, model_cls, extra = RANDOM[name]
    torch.manual_seed(0)
    model = getattr(T, model_cls)(getattr(T, cfg_cls)(**{**SMOL, **extra})).eval()
    gen, t_adapt = timed(lambda: adapt(model, generic=True))
    refusal, t_check = timed(lambda: gen.fast_refusal)
    if refusal is not None:
        raise SystemExit(f"the generic fast path is refused on {name}: {refusal}")
    sites = gen.sites("layer")
    warm_s = warm_up(gen, warm)
    values = resample(gen, prompts, 0)
    fast, t_fast0 = timed(lambda: way_c(gen, prompts[0], sites, values))
    clean = gen.clean_run(prompts[0])
    naive, t_naive = timed(lambda: way_naive(gen, prompts[0], sites, values, clean.target, True))
    parsed = [gen.site(s) for s in sites]
    re_run, t_reforward = timed(lambda: reforward_patch(gen, clean, parsed, values.to(gen.dtype)))
    reforward = Readouts(re_run.centred_logit, re_run.sigma, re_run.direct_effects)
    agree = {"naive": rel_diffs(fast, naive), "reforward": rel_diffs(fast, reforward)}
    if max(max(v.values()) for v in agree.values()) > 1e-4:
        raise SystemExit(f"{name}: the fast path disagrees with the re-forwards: {agree}")
    t_fast = [t_fast0]
    same = [t_fast0] + [timed(lambda: way_c(gen, prompts[0], sites, values))[1] for _ in range(3)]
    flops = [patch_flops(name, len(prompts[0]) - 1, 30, K)]
    kept, timed_p = CleanGroups(), prompts[1:n_timed]
    for i in range(1, n_timed):
        values = resample(gen, prompts, i)
        t_fast.append(
            timed(lambda v=values, i=i: way_sweep(gen, kept, timed_p, i - 1, sites, v))[1]
        )
        flops.append(patch_flops(name, len(prompts[i]) - 1, 30, K))
    extra_values = [resample(gen, prompts, i) for i in range(1, 4)]
    return {
        "breakdown": breakdown(gen, name, prompts[1:4], sites, extra_values),
        "warm_up_s": warm_s,
        "arguments_by_length": replay.arguments_by_length(gen),
        "adapt_s": t_adapt,
        "fast_check_s": t_check,
        "fast_error": gen.fast_error,
        "agreement_rel": agree,
        "fast_s": t_fast,
        "naive_batched_s": t_naive,
        "reforward_s": t_reforward,
        # the first prompt's fast path timed three more times (one sample is noisy on shared
        # cores): the speedups are against the median of the four
        "fast_first_prompt_s": same,
        "speedup_vs_naive_batched": t_naive / statistics.median(same),
        "speedup_vs_reforward": t_reforward / statistics.median(same),
        "gflops": [f / 1e9 for f in flops],
        "gflop_per_s": sum(flops) / sum(t_fast) / 1e9,
        "prompt_lengths": [len(p) for p in prompts[:n_timed]],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=20, help="timed prompts per model")
    ap.add_argument("--models", default="qwen3,mixtral,phi3")
    ap.add_argument(
        "--warmup", type=int, default=40, help="untimed prompts first (a sweep's earlier prompts)"
    )
    ap.add_argument("--summary", help="print the README table of a results JSON and exit")
    args = ap.parse_args(argv)
    if args.summary:
        print(summary_table(json.loads(Path(args.summary).read_text())), end="")
        return 0
    keep_heap()  # as a CPU sweep's process does (causalnet.hydra.heap)
    torch.manual_seed(0)
    r: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(torch.device("cpu")),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "k": K,
        "sizes": SMOL,
        "groups": {"prompts": cleanruns.GROUP, "tokens": cleanruns.GROUP_TOKENS},
    }
    r["gemm_before"] = gemm_rates(torch.device("cpu"), seconds=0.5)
    hand = load("smollm2-135m")
    texts = [p.text for p in load_prompts("known_1000")[: K + args.prompts + 1 + args.warmup]]
    encoded = [hand.encode(t) for t in texts]
    prompts, warm = encoded[: K + args.prompts + 1], encoded[K + args.prompts + 1 :]
    r["smollm2"] = smollm2(hand, prompts, args.prompts, warm)
    print(json.dumps(r["smollm2"], indent=1), flush=True)
    r["random"] = {}
    for name in args.models.split(","):
        r["random"][name] = random_model(name, prompts, max(1, args.prompts - 1), warm)
        print(name, json.dumps(r["random"][name], indent=1), flush=True)
    r["gemm_after"] = gemm_rates(torch.device("cpu"), seconds=0.5)
    r["load_after"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(exist_ok=True)
    stem = f"{dt.date.today().isoformat()}-generic-{r['machine']['host']}"
    if (RESULTS / f"{stem}.json").exists():  # an earlier run of the day is kept
        stem += dt.datetime.now(dt.timezone.utc).strftime("-%H%M")
    (RESULTS / f"{stem}.json").write_text(json.dumps(r, indent=1))
    (RESULTS / f"{stem}.md").write_text(render(r))
    print(render(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
