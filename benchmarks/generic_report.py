"""How ``bench_generic.py``'s results read: the Markdown of one run (:func:`render`, written
beside the JSON) and the README's table (:func:`summary_table`, also
``python benchmarks/bench_generic.py --summary FILE``; tests/test_benchmark_tables.py checks the
README's copy against it). Results from before a field was recorded render without it."""

from __future__ import annotations

import statistics
from typing import Any


def smollm2_rates(s: dict[str, Any], mm: float) -> str:
    """Both SmolLM2 paths' rates (results from before they were recorded: '-')."""
    rates = s.get("gflop_per_s")
    if not rates:
        return "-"
    return (
        f"generic {rates['generic']:.0f} GFLOP/s = {100 * rates['generic'] / mm:.0f}%, "
        f"hand-written {rates['hand']:.0f} = {100 * rates['hand'] / mm:.0f}% of {mm:.0f}"
    )


def heap_text(machine: dict[str, Any]) -> str:
    """Whether glibc's heap was kept (causalnet.hydra.heap; results from before: nothing)."""
    if "heap_kept" not in machine:
        return ""
    kept = "kept" if machine["heap_kept"] else "not kept (glibc's defaults)"
    return f". Heap: {kept}, as a CPU sweep keeps it (causalnet.hydra.heap)."


def warm_text(warm: dict[str, Any]) -> str:
    """The warm-up's seconds per path: a clean run and two patched sites per prompt, then (results
    from 2026-12-02 21:00 on) one full patch, a sweep's first prompt, timed on its own."""
    parts = []
    for k, v in warm.items():
        if isinstance(v, dict):
            parts.append(
                f"{v['two_site_patches_s']:.1f} s {k} for the two-site patches, "
                f"{v['first_full_patch_s']:.2f} s for its first full patch"
            )
        else:
            parts.append(f"{v:.1f} s {k}")
    text = ", ".join(parts)
    if any(isinstance(v, dict) for v in warm.values()):
        return (
            text + ": a clean run and two patched sites each, then one prompt's full patch, "
            "which pays once per process oneDNN's kernel for each row count and the first "
            "allocations of the largest buffers"
        )
    return text + ": a clean run and two patched sites each"


def breakdown_lines(r: dict[str, Any], mm: float) -> list[str]:
    """The Markdown table of where the fast paths' time goes (results that have it)."""
    rows: list[tuple[str, dict[str, Any]]] = []
    for k, b in r["smollm2"].get("breakdown", {}).items():
        rows.append((f"SmolLM2-135M, {k}", b))
    for name, m in r["random"].items():
        if "breakdown" in m:
            rows.append((f"{name} (random), generic", m["breakdown"]))
    if not rows:
        return []
    grouped = " (their clean runs in one forward, as a sweep's group)" if r.get("groups") else ""
    lines = [
        "",
        "## Where the fast paths' time goes",
        "",
        f"Prompts 2-4 run again after the timed ones{grouped}, each linear-kernel call timed "
        f"(matmul rate: {mm:.0f} GFLOP/s).",
        "",
        "| model, path | clean runs s | patches s | in linear kernels s | linear kernels' "
        "rate | everything else s | overall rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, b in rows:
        lines.append(
            f"| {label} | {b['clean_s']:.3f} | {b['patch_s']:.3f} | {b['linear_s']:.3f} | "
            f"{b['linear_gflop_per_s']:.0f} GFLOP/s = {100 * b['linear_gflop_per_s'] / mm:.0f}% | "
            f"{b['other_s']:.3f} | {b['gflop_per_s']:.0f} GFLOP/s = "
            f"{100 * b['gflop_per_s'] / mm:.0f}% |"
        )
    return lines


def summary_table(r: dict[str, Any]) -> str:
    """The README's table of a result (``python benchmarks/bench_generic.py --summary FILE``):
    one row per model, the generic path's time per prompt against what it is compared with."""
    s = r["smollm2"]
    mm = max(max(r["gemm_before"].values()), max(r.get("gemm_after", {0: 0}).values()))
    agree = f"{max(s['agreement_rel'].values()):.1e}"
    if "agreement_float64" in s:  # later results also check the paths in float64
        agree += f" (float64: {max(s['agreement_float64']['generic_vs_hand'].values()):.1e})"
    lines = [
        "| model (float32) | generic fast path, s / prompt | compared with | ratio | "
        "fast-path rate |",
        "|---|---|---|---|---|",
        f"| SmolLM2-135M | {s['median_s']['generic']:.3f} | hand-written Llama "
        f"{s['median_s']['hand']:.3f} s | {s['ratio_total_generic_over_hand']:.2f}x the time "
        f"over {len(s['times_s']['hand'])} prompts (medians {s['ratio_generic_over_hand']:.2f}x); "
        f"agree to {agree} | {smollm2_rates(s, mm)} |",
    ]
    names = {"qwen3": "Qwen3", "mixtral": "Mixtral (4 experts of 768, top-2)", "phi3": "Phi-3"}
    for name, m in r["random"].items():
        lines.append(
            f"| {names.get(name, name)} (random, SmolLM2's size) | "
            f"{statistics.median(m['fast_s']):.3f} | batched naive {m['naive_batched_s']:.1f} s / "
            f"re-forward {m['reforward_s']:.1f} s | {m['speedup_vs_naive_batched']:.1f}x / "
            f"{m['speedup_vs_reforward']:.1f}x faster | {m['gflop_per_s']:.0f} GFLOP/s = "
            f"{100 * m['gflop_per_s'] / mm:.0f}% of {mm:.0f} |"
        )
    return "\n".join(lines) + "\n"


def render(r: dict[str, Any]) -> str:
    s = r["smollm2"]
    lines = [
        f"# Generic adapter speed ({r['date']}, {r['machine']['cpu']}, "
        f"{r['machine']['cpu_cores_usable']} cores, torch {r['machine']['torch']})",
        "",
        f"Load average before / after: {r['load_before']} / {r['load_after']} (shared cores).",
        f"Linear kernel: {r['machine']['linear_kernel_float32_cpu']}. Matmul rates (GFLOP/s) "
        "before / after: "
        + ", ".join(
            f"{k} {v:.0f} / {r.get('gemm_after', {}).get(k, float('nan')):.0f}"
            for k, v in r["gemm_before"].items()
        )
        + heap_text(r["machine"]),
        "",
        "## SmolLM2-135M: generic vs hand-written Llama (60 sites, K = 15, every readout)",
        "",
        f"Agreement first (relative to max(1, |value|)): {s['agreement_rel']}",
        "",
        f"In float64, and each float32 path against float64: {s.get('agreement_float64', '-')}",
        "",
        "| path | median s / prompt | total s | per prompt (s) |",
        "|---|---|---|---|",
    ]
    for k in ("hand", "generic"):
        lines.append(
            f"| {k} | {s['median_s'][k]:.3f} | {s['total_s'][k]:.2f} | "
            f"{', '.join(f'{x:.3f}' for x in s['times_s'][k])} |"
        )
    lines += [
        "",
        f"Ratio generic / hand-written over the {len(s['prompt_lengths'])} prompts (total time, "
        f"as a sweep sees it): **{s['ratio_total_generic_over_hand']:.2f}x**; of the medians: "
        f"{s['ratio_generic_over_hand']:.2f}x (prompt lengths {s['prompt_lengths']}; the generic "
        "path's first prompt of each length captures the blocks' arguments with a forward of its "
        "own, later ones of that length share them). Both paths first ran "
        f"{s['warm_up_prompts']} other prompts untimed, as a sweep's earlier prompts would "
        f"({warm_text(s['warm_up_s'])}); prompts of one length share arguments: "
        f"{s['arguments_by_length']}; timed generic prompts that captured their own: "
        f"{s['timed_prompts_that_captured']}.",
        "",
        "## Random-weight models of SmolLM2's size (generic fast path vs batched naive)",
        "",
        "| model | fast s / prompt | naive batched s | speedup | reforward s | speedup | "
        "fast GFLOP/s | % of mm rate | agreement (max rel) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    mm = max(max(r["gemm_before"].values()), max(r.get("gemm_after", {0: 0}).values()))
    for name, m in r["random"].items():
        agree = max(max(v.values()) for v in m["agreement_rel"].values())
        lines.append(
            f"| {name} | {statistics.median(m['fast_s']):.3f} | {m['naive_batched_s']:.2f} | "
            f"{m['speedup_vs_naive_batched']:.1f}x | {m['reforward_s']:.2f} | "
            f"{m['speedup_vs_reforward']:.1f}x | {m['gflop_per_s']:.1f} | "
            f"{100 * m['gflop_per_s'] / mm:.0f}% | {agree:.1e} |"
        )
    lines += [
        "",
        f"% of mm rate: against the best matrix-multiply rate measured in this run ({mm:.0f} "
        "GFLOP/s; a rate far apart before and after means the shared cores were busy). "
        "Speedups on the first timed prompt (length "
        f"{next(iter(r['random'].values()))['prompt_lengths'][0]} tokens; the fast path's median "
        "of four timings of it where recorded), after the same "
        "untimed warm-up prompts as above; fast s / prompt is the median of the timed prompts, "
        "GFLOP/s over all of them.",
    ]
    if r.get("groups"):
        g = r["groups"]
        lines[-1] += (
            f" The timed prompts after the first take their clean runs as a sweep does: one "
            f"forward per group of up to {g['prompts']} consecutive prompts ({g['tokens']} padded "
            "tokens; causalnet.hydra.cleanruns), timed with the group's first prompt."
        )
    firsts = {
        name: m["warm_up_s"]["first_full_patch_s"]
        for name, m in r["random"].items()
        if isinstance(m.get("warm_up_s"), dict)
    }
    if firsts:
        lines[-1] += (
            " The warm-up's first full patch, once per process: "
            + ", ".join(f"{name} {secs:.2f} s" for name, secs in firsts.items())
            + "."
        )
    lines += breakdown_lines(r, mm)
    return "\n".join(lines) + "\n"
