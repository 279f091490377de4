"""The ``causalnet`` command line: ``check`` tries a model before a sweep, ``hydra`` runs the sweep,
``plot`` and ``report`` read it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from .errors import CausalNetError


def _sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that say what a sweep computes (``hydra`` and ``check``)."""
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="'smollm2-135m' (the bundled model) or a local Hugging Face model folder",
    )
    parser.add_argument(
        "--prompts",
        default="known_1000",
        help="'known_1000' (bundled Counterfact prompts), 'lre', 'lre:<relation>', or a "
        "JSON/JSONL file with 'prompt' (and optional 'id', 'attribute') per record",
    )
    parser.add_argument("--k", type=int, default=15, help="patches per ablation (default 15)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    parser.add_argument(
        "--sites",
        default=None,
        help="comma-separated sites or globs to ablate, e.g. 'attn.*' or 'attn.12,mlp.12'; "
        "'a+b' ablates a and b together in one run, e.g. 'attn.22+attn.23,attn.20' "
        "(default: all); every site is still read out",
    )
    parser.add_argument(
        "--granularity",
        choices=("layer", "head"),
        default="layer",
        help="ablate and read out whole layers (attn.L, mlp.L) or attention heads (attn.L.hH)",
    )
    parser.add_argument(
        "--ablation",
        choices=("resample", "zero", "mean", "noise"),
        default="resample",
        help="resample: K other prompts' values (default); zero; mean over the other prompts; "
        "noise: the value plus Gaussian noise (K draws)",
    )
    parser.add_argument(
        "--noise-std",
        type=float,
        default=None,
        help="std of noise ablation (default: each site's std over the prompts)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the patch draws (default 0)")
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device, e.g. cpu or cuda; 'auto' spreads a model too big for one device "
        "over all GPUs, then CPU, then disk (accelerate's device_map)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float64", "bfloat16", "float16"),
        default="float32",
        help="model and activation dtype (default float32)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="causalnet",
        description="Neural networks as structural causal models: the Hydra-effect protocol.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    hydra = sub.add_parser(
        "hydra",
        help="run (or resume) the Hydra sweep into a results folder",
        description=(
            "For every prompt: direct effects of every site in the clean run (logit lens, final "
            "norm's scale frozen), total effects of ablating every site (averaged over K "
            "patches), every site's direct effect in each ablated run, compensatory effects. "
            "Writes effects.parquet, readouts.parquet, run.json and figures into --out; a killed "
            "run resumes when started again with the same arguments."
        ),
    )
    _sweep_arguments(hydra)
    hydra.add_argument("--out", required=True, help="results folder (created or resumed)")
    hydra.add_argument(
        "--workers",
        type=int,
        default=1,
        help="compute the prompts on N Ray workers, each loading the model once (needs "
        "pip install 'causalnet-scm[ray]'); results equal a single-process run",
    )
    hydra.add_argument(
        "--ray-address",
        default=None,
        help="join an existing Ray cluster ('auto', 'ray://host:10001') instead of starting a "
        "local one",
    )
    hydra.add_argument("--no-plots", action="store_true", help="skip the figures at the end")
    hydra.add_argument("--quiet", action="store_true", help="no progress bar")

    check = sub.add_parser(
        "check",
        help="before a sweep: will the model work, how, and how long (writes nothing)",
        description=(
            "Load the model as 'hydra' would; print its decomposition (discovered and verified, "
            "or the hand-written family), how the numbers would be computed, the sites, the "
            "sweep's patches of the first prompt against an independent oracle (exit status 1 "
            "if they disagree beyond the tolerance) and the time of two prompts computed as the "
            "sweep computes them, extrapolated to the prompt set. Writes nothing."
        ),
    )
    _sweep_arguments(check)

    plot = sub.add_parser("plot", help="(re)make the figures of a results folder")
    plot.add_argument("results", help="results folder written by 'causalnet hydra'")
    plot.add_argument(
        "--repair-site",
        default=None,
        help="the site of the per-patch repair figure (default: the attention site with the "
        "largest direct effects)",
    )

    report = sub.add_parser("report", help="print the per-layer summary table of a results folder")
    report.add_argument("results", help="results folder written by 'causalnet hydra'")
    report.add_argument(
        "--csv", default=None, help="also write the full table to this CSV file (folder must exist)"
    )
    report.add_argument("--all", action="store_true", help="print every column, not the main ones")
    report.add_argument(
        "--repair",
        action="store_true",
        help="also the repair split per layer: fraction and parts with 95%% bootstrap intervals "
        "over prompts, over-correction and anti-repair shares (docs/conventions.md)",
    )
    report.add_argument(
        "--top",
        type=float,
        default=None,
        help="with --repair: also only the top K%% of rows by |direct effect| per site (e.g. 2)",
    )
    report.add_argument("--boot", type=int, default=1000, help="bootstrap replicates (1000)")
    report.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    report.add_argument(
        "--markdown", action="store_true", help="print the repair tables as markdown"
    )
    repairers = sub.add_parser(
        "repairers",
        help="who repairs: the compensation map and the replacement heads of a results folder",
    )
    repairers.add_argument("results", help="results folder written by 'causalnet hydra'")
    repairers.add_argument("--k", type=int, default=5, help="replacement heads per prompt (5)")
    repairers.add_argument("--figure", default=None, help="save the compensation map (PNG)")

    compare = sub.add_parser(
        "compare",
        help="the paper's findings judged side by side on results folders (holds / partly / "
        "fails, also split by prompts whose target is the true attribute)",
    )
    compare.add_argument("results", nargs="+", help="results folders written by 'causalnet hydra'")
    compare.add_argument("--names", nargs="+", default=None, help="a name per folder (its model)")
    compare.add_argument("--csv", default=None, help="also write every verdict to this CSV file")

    attribution = sub.add_parser(
        "attribution",
        help="attribution patching on a results folder's prompts and patches, against its "
        "exact total effects (loads the folder's model)",
    )
    attribution.add_argument("results", help="results folder written by 'causalnet hydra'")
    attribution.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    attribution.add_argument("--top", type=int, default=10, help="disagreements shown (10)")
    attribution.add_argument("--figure", default=None, help="save estimate vs exact (PNG)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``causalnet`` script; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "hydra":
            from .hydra.figures import make_all
            from .hydra.sweep import run_sweep

            out = run_sweep(
                _config(args),
                args.out,
                progress=not args.quiet,
                workers=args.workers,
                ray_address=args.ray_address,
            )
            print(f"results: {out}")
            if not args.no_plots:
                for path in make_all(out):
                    print(f"figure: {path}")
            _print_report(out, None, False)
        elif args.command == "repairers":
            from .hydra.repair_commands import repairers_report

            print(repairers_report(args.results, args.k, figure=args.figure))
        elif args.command == "compare":
            from .hydra.compare import compare_report

            print(compare_report(args.results, args.names, args.csv), end="")
        elif args.command == "attribution":
            from .hydra.repair_commands import attribution_report

            print(attribution_report(args.results, args.limit, args.top, args.figure))
        elif args.command == "check":
            from .hydra.preflight import preflight, preflight_text

            found = preflight(_config(args))
            print(preflight_text(found), end="")
            return 0 if found.agrees else 1
        elif args.command == "plot":
            from .hydra.figures import make_all
            from .hydra.figures_repair import FILE, make_repair_figures

            paths = make_all(args.results)
            if args.repair_site is not None:  # replaces the default site's figure
                paths = [p for p in paths if p.name != FILE]
                paths += make_repair_figures(args.results, site=args.repair_site)
            for path in paths:
                print(f"figure: {path}")
        else:
            _print_report(args.results, args.csv, args.all)
            if args.repair:
                from .hydra.reliability import print_repair_report

                print_repair_report(args.results, args.top, args.boot, args.seed, args.markdown)
    except CausalNetError as err:
        print(f"causalnet: error: {err}", file=sys.stderr)
        return 2
    return 0


def _config(args: argparse.Namespace) -> Any:
    """The :class:`causalnet.hydra.config.SweepConfig` of ``hydra``'s or ``check``'s arguments
    (each of its fields is an argument of both, :func:`_sweep_arguments`)."""
    import dataclasses

    from .hydra.config import SweepConfig

    return SweepConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SweepConfig)})


#: The columns ``causalnet report`` prints by default (``--all`` prints every column).
REPORT_COLUMNS = [
    "kind",
    "layer",
    "n",
    "mean_direct_effect",
    "mean_total_effect",
    "corr_direct_drop",
    "frac_direct_gt_drop",
    "slope",
    "r2",
    "mean_compensatory_attn",
    "mean_compensatory_mlp",
    "fraction_restored",
    "max_abs_identity_residual",
]


def _print_report(results: str, csv: str | None, every_column: bool) -> None:
    from pathlib import Path

    import pandas as pd

    from .errors import ResultsError
    from .hydra.analysis import fraction_restored, has_single_sites, set_table, summary_table
    from .hydra.provenance import describe
    from .hydra.store import ResultsStore

    # --csv into a missing folder is an error (checked before any work), not a folder created
    # silently: a typo in the path should not scatter folders around.
    target = Path(csv) if csv else None
    if target is not None and target.is_dir():
        raise ResultsError(f"--csv {csv}: is a folder; give the path of a CSV file")
    if target is not None and not target.parent.is_dir():
        raise ResultsError(f"--csv {csv}: the folder {target.parent} does not exist; create it")
    store = ResultsStore(results)
    effects = store.load_effects()  # first: it names a folder that holds no results
    how = store.load_run().get("info", {}).get("computed_by")
    if how is not None:  # how the numbers were computed (causalnet.hydra.provenance)
        print(f"computed by: {describe(how)}")
    sets = set_table(effects)
    if not has_single_sites(effects):  # a folder of sets only: no per-layer table
        if target is not None:
            raise ResultsError(f"--csv {csv}: {results} holds only sets of sites: no layer table")
        print("no single-site rows: every ablated site is a set (per-layer table omitted)")
    else:
        table = summary_table(effects)
        if target is not None:
            try:
                table.to_csv(target, index=False)
            except OSError as err:
                raise ResultsError(f"--csv {csv}: cannot write the file: {err}") from err
        shown = table if every_column else table[REPORT_COLUMNS]
        with pd.option_context("display.max_rows", None, "display.width", 200):
            print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        restored = fraction_restored(effects)
        for r in restored.overall.itertuples():
            print(f"fraction restored, all {r.kind} ablations: {r.fraction_restored:.3f} (n={r.n})")
        for r in restored.peak.itertuples():
            print(f"peak fraction restored, {r.kind}: {r.fraction_restored:.3f} at layer {r.layer}")
    if not sets.empty:
        columns = ["site", "members", *REPORT_COLUMNS[1:]]
        shown = sets if every_column else sets[columns]
        print("\nsets of sites ablated together (one row per set; not in the layer rows above):")
        with pd.option_context("display.max_rows", None, "display.width", 200):
            print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    raise SystemExit(main())
