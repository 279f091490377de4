"""The paper's findings, each measured on a sweep's tables and judged holds / partly / fails.

Pure functions of the ``effects`` and ``readouts`` tables (:mod:`causalnet.hydra.tables`), built
on :mod:`causalnet.hydra.analysis`. Every verdict follows a rule written here (and in
docs/conventions.md, "Findings and their verdicts"), so two models -- or two subsets of prompts
-- are judged alike; the numbers behind each verdict are returned with it.

**Depth.** Models differ in depth (SmolLM2-135M 30 layers, Gemma 3 270M 18), so "early",
"middle" and "late" are thirds of the relative depth ``layer / (n_layers - 1)``: early < 1/3,
middle [1/3, 2/3), late >= 2/3.

The findings (McGrath et al. 2023; the paper's number in brackets) and their rules:

1. ``agreement``: direct effect and ablation agree poorly outside late layers. m = median of
   corr(DE, drop) over the early and middle attention and MLP layers, M = the same over late
   layers. holds: m < 0.3 and M > m + 0.2; partly: m < 0.3; fails otherwise.
2. ``unembed_gt_ablate``: Delta_unembed > Delta_ablate for most prompts and layers. f = share
   of layers whose frac_direct_gt_drop > 0.5; g = the same over the quarter of layers with the
   largest |mean DE|. holds: f >= 0.5; partly: g >= 0.5; fails otherwise.
3. ``hydra``: after an attention ablation, later attention compensates (the Hydra effect).
   Over attention layers with a later attention layer: p = share with slope_attn > 0, s = median
   slope_attn. holds: p >= 2/3 and s >= 0.2; partly: p > 1/2; fails otherwise.
4. ``erasure``: late MLPs erase the top token. e = the most negative mean DE of a late MLP.
   holds: e <= -0.25; partly: e < 0; fails otherwise.
5. ``erasure_attenuated``: ablating attention that promotes the token weakens the erasure. The
   eraser is the late MLP with the most negative mean DE; the promoters are the late attention
   layers before it with positive mean DE; d = the mean Delta_DE of the eraser over the
   promoters' ablations (positive = less erasure), q = the share of those rows with
   Delta_DE > 0. holds: d >= 0.05 and q >= 0.6; partly: d > 0; fails otherwise.
6. ``ce_predicted``: compensation is well predicted by the direct effect (r^2 0.92 at layer 23 of
   32), with slope below one. r = the largest r^2 of CE on DE over middle and late attention
   layers; b = share of those layers with slope < 1. holds: r >= 0.7 and b >= 0.8; partly:
   r >= 0.7 or b >= 0.8; fails otherwise.
7. ``restored_70``: about 70 % of the direct effect is restored at middle layers. f = the
   fraction restored (analysis.fraction_restored: least squares of CE on the removed direct
   effect through 0) pooled over the rows of the middle attention layers, so layers whose
   ablation removes almost nothing weigh almost nothing. holds:
   0.5 <= f <= 1.0; partly: 0.25 <= f < 0.5 or 1.0 < f <= 1.3; fails otherwise.
8. ``shift_to_mlp``: the response shifts from attention to MLP with depth. a_e, a_l = median
   attn_share (analysis.response_split) of the attention ablations in the first and second
   half of the layers. holds: a_e >= 0.5 and a_e - a_l >= 0.2; partly: a_e - a_l >= 0.2;
   fails otherwise.
9. ``early_total``: early ablations have large total effects but little direct effect. t =
   sum |mean TE| / sum |mean DE| over early attention and MLP layers. holds: t >= 2; partly:
   t >= 1; fails otherwise.

**A model without attention.** In a model of one-part blocks (sites ``mixer.l``: Mamba;
docs/conventions.md, "Sites") the findings about attention versus MLP -- 3 ``hydra``, 4
``erasure``, 5 ``erasure_attenuated`` and 8 ``shift_to_mlp`` -- are ``not applicable`` (there
is no attention or MLP site to compare, never a "fails" that reads as a measured absence); 1, 2
and 9 are judged over the mixer layers where they use the attention and MLP layers, and 6 and 7
over the mixer layers where they use the attention layers, by the same rules.

Example::

    >>> table = findings_table(effects, readouts)          # doctest: +SKIP
    >>> table[["finding", "verdict", "measure"]]            # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import ResultsError
from .analysis import (
    compensation_regression,
    fraction_restored,
    per_layer_agreement,
    response_split,
    single_site_rows,
)

HOLDS, PARTLY, FAILS = "holds", "partly", "fails"
NOT_APPLICABLE = "not applicable"
_NO_ATTENTION = "the model has no attention and no MLP sites (mixer.L only)"

#: The paper's statement of each finding, keyed as in the module docstring.
CLAIMS: dict[str, str] = {
    "agreement": "Unembedding (direct effect) and ablation agree poorly outside late layers",
    "unembed_gt_ablate": "Delta_unembed > Delta_ablate for most prompts and layers",
    "hydra": "Hydra effect: after an attention ablation, later attention compensates",
    "erasure": "Late MLPs erase the top token",
    "erasure_attenuated": "Erasure weakens when attention that promotes the token is ablated",
    "ce_predicted": "Compensation is well predicted by the direct effect (r^2 0.92), slope < 1",
    "restored_70": "About 70% of the direct effect is restored at middle layers",
    "shift_to_mlp": "The response shifts from attention to MLP with depth",
    "early_total": "Early ablations: large total effects, little direct effect",
}


@dataclass(frozen=True)
class Finding:
    """One finding measured on one set of rows: its verdict and the numbers behind it."""

    key: str
    verdict: str
    measure: str
    values: dict[str, float]


def depth_band(layer: int, n_layers: int) -> str:
    """``"early"`` (relative depth < 1/3), ``"middle"`` (< 2/3) or ``"late"``.

    >>> [depth_band(layer, 30) for layer in (0, 10, 20, 29)]
    ['early', 'middle', 'late', 'late']
    """
    depth = layer / max(n_layers - 1, 1)
    return "early" if depth < 1 / 3 else ("middle" if depth < 2 / 3 else "late")


def _median(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.median()) if len(values) else float("nan")


def _is_mixers(effects: pd.DataFrame) -> bool:
    """Whether the rows are of a model of one-part blocks (mixer sites, no attention/MLP)."""
    kinds = set(effects["kind"])
    return "mixer" in kinds and not kinds & {"attn", "head", "mlp"}


def _main_kind(effects: pd.DataFrame) -> tuple[str, str]:
    """(kind, words) of the layers findings 6 and 7 judge: attention, or the mixers."""
    return ("mixer", "mixer") if _is_mixers(effects) else ("attn", "attention")


def _banded(table: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    table = table[table["kind"].isin(("attn", "mlp", "mixer"))].copy()
    table["band"] = [depth_band(int(layer), n_layers) for layer in table["layer"]]
    return table


def _agreement(effects: pd.DataFrame, _: pd.DataFrame | None, n_layers: int) -> Finding:
    table = _banded(per_layer_agreement(effects), n_layers)
    m = _median(table.loc[table["band"] != "late", "corr_direct_drop"])
    late = _median(table.loc[table["band"] == "late", "corr_direct_drop"])
    verdict = HOLDS if m < 0.3 and late > m + 0.2 else (PARTLY if m < 0.3 else FAILS)
    measure = f"median r(direct, drop): early+middle layers {m:.2f}, late layers {late:.2f}"
    return Finding("agreement", verdict, measure, {"median_r_not_late": m, "median_r_late": late})


def _unembed_gt_ablate(effects: pd.DataFrame, _: pd.DataFrame | None, n_layers: int) -> Finding:
    table = _banded(per_layer_agreement(effects), n_layers)
    f = float((table["frac_direct_gt_drop"] > 0.5).mean())
    big = table.reindex(table["mean_direct_effect"].abs().sort_values(ascending=False).index)
    big = big.head(max(1, len(big) // 4))
    g = float((big["frac_direct_gt_drop"] > 0.5).mean())
    verdict = HOLDS if f >= 0.5 else (PARTLY if g >= 0.5 else FAILS)
    measure = (
        f"DE > drop on most prompts at {f:.0%} of layers; at {g:.0%} of the quarter with the "
        f"largest absolute mean DE"
    )
    return Finding("unembed_gt_ablate", verdict, measure, {"share_layers": f, "share_big": g})


def _hydra(effects: pd.DataFrame, _: pd.DataFrame | None, n_layers: int) -> Finding:
    if _is_mixers(effects):
        return Finding("hydra", NOT_APPLICABLE, _NO_ATTENTION, {})
    table = response_split(effects)
    table = table[(table["kind"] == "attn") & (table["layer"] < n_layers - 1)]
    slopes = table["slope_attn"].dropna()
    p = float((slopes > 0).mean()) if len(slopes) else float("nan")
    s = _median(slopes)
    verdict = HOLDS if p >= 2 / 3 and s >= 0.2 else (PARTLY if p > 0.5 else FAILS)
    measure = (
        f"later attention's slope on DE > 0 after {p:.0%} of attention ablations, median {s:.2f}"
    )
    return Finding("hydra", verdict, measure, {"share_positive": p, "median_slope_attn": s})


def _late_mlp_means(effects: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    table = _banded(per_layer_agreement(effects), n_layers)
    return table[(table["kind"] == "mlp") & (table["band"] == "late")]


def _erasure(effects: pd.DataFrame, _: pd.DataFrame | None, n_layers: int) -> Finding:
    if _is_mixers(effects):
        return Finding("erasure", NOT_APPLICABLE, _NO_ATTENTION, {})
    late = _late_mlp_means(effects, n_layers)
    if late.empty:
        return Finding("erasure", FAILS, "no late MLP layer in the table", {})
    row = late.loc[late["mean_direct_effect"].idxmin()]
    e = float(row["mean_direct_effect"])
    verdict = HOLDS if e <= -0.25 else (PARTLY if e < 0 else FAILS)
    measure = f"most negative late MLP: mlp.{int(row['layer'])}, mean direct effect {e:.2f}"
    return Finding("erasure", verdict, measure, {"eraser_layer": float(row["layer"]), "mean": e})


def _erasure_attenuated(
    effects: pd.DataFrame, readouts: pd.DataFrame | None, n_layers: int
) -> Finding:
    if _is_mixers(effects):
        return Finding("erasure_attenuated", NOT_APPLICABLE, _NO_ATTENTION, {})
    late = _late_mlp_means(effects, n_layers)
    if readouts is None or late.empty:
        return Finding("erasure_attenuated", FAILS, "needs the readouts table", {})
    eraser = int(late.loc[late["mean_direct_effect"].idxmin(), "layer"])
    table = _banded(per_layer_agreement(effects), n_layers)
    promoters = table[
        (table["kind"] == "attn")
        & (table["band"] == "late")
        & (table["layer"] <= eraser)
        & (table["mean_direct_effect"] > 0)
    ]
    sites = [f"attn.{int(layer)}" for layer in promoters["layer"]]
    rows = readouts[
        readouts["ablated_site"].isin(sites)
        & (readouts["readout_site"] == f"mlp.{eraser}")
        & readouts["prompt_id"].isin(effects["prompt_id"].unique())
    ]
    if rows.empty:
        return Finding("erasure_attenuated", FAILS, f"no promoter before mlp.{eraser}", {})
    d, q = float(rows["delta_de"].mean()), float((rows["delta_de"] > 0).mean())
    verdict = HOLDS if d >= 0.05 and q >= 0.6 else (PARTLY if d > 0 else FAILS)
    measure = (
        f"mlp.{eraser}'s Delta_DE after ablating {', '.join(sites)}: mean {d:+.3f}, "
        f"> 0 on {q:.0%} of rows"
    )
    return Finding("erasure_attenuated", verdict, measure, {"mean_delta": d, "share_up": q})


def _ce_predicted(effects: pd.DataFrame, _: pd.DataFrame | None, n_layers: int) -> Finding:
    kind, words = _main_kind(effects)
    table = _banded(compensation_regression(effects), n_layers)
    table = table[(table["kind"] == kind) & (table["band"] != "early")].dropna(subset=["r2"])
    if table.empty:
        return Finding("ce_predicted", FAILS, f"no middle or late {words} layer", {})
    best = table.loc[table["r2"].idxmax()]
    r, b = float(best["r2"]), float((table["slope"] < 1).mean())
    verdict = HOLDS if r >= 0.7 and b >= 0.8 else (PARTLY if r >= 0.7 or b >= 0.8 else FAILS)
    measure = (
        f"largest r^2 of CE on DE {r:.2f} ({kind}.{int(best['layer'])}); slope < 1 at {b:.0%} "
        f"of middle and late {words} layers"
    )
    return Finding("ce_predicted", verdict, measure, {"peak_r2": r, "share_slope_below_1": b})


def _restored_70(effects: pd.DataFrame, _: pd.DataFrame | None, n_layers: int) -> Finding:
    kind, words = _main_kind(effects)
    bands = [depth_band(int(layer), n_layers) for layer in effects["layer"]]
    middle = effects[(effects["kind"] == kind) & (np.asarray(bands) == "middle")]
    overall = fraction_restored(middle).overall if not middle.empty else pd.DataFrame()
    f = float(overall["fraction_restored"].iloc[0]) if len(overall) else float("nan")
    verdict = HOLDS if 0.5 <= f <= 1.0 else (PARTLY if 0.25 <= f < 0.5 or 1.0 < f <= 1.3 else FAILS)
    measure = f"fraction restored, middle {words} layers pooled: {f:.2f}"
    return Finding("restored_70", verdict, measure, {"fraction": f})


def _shift_to_mlp(effects: pd.DataFrame, _: pd.DataFrame | None, n_layers: int) -> Finding:
    if _is_mixers(effects):
        return Finding("shift_to_mlp", NOT_APPLICABLE, _NO_ATTENTION, {})
    table = response_split(effects)
    table = table[table["kind"] == "attn"]
    first = _median(table.loc[table["layer"] < n_layers / 2, "attn_share"])
    second = _median(table.loc[table["layer"] >= n_layers / 2, "attn_share"])
    drop = first - second
    verdict = HOLDS if first >= 0.5 and drop >= 0.2 else (PARTLY if drop >= 0.2 else FAILS)
    measure = f"attention's share of the response: first half {first:.2f}, second half {second:.2f}"
    return Finding("shift_to_mlp", verdict, measure, {"share_first": first, "share_second": second})


def _early_total(effects: pd.DataFrame, _: pd.DataFrame | None, n_layers: int) -> Finding:
    table = _banded(per_layer_agreement(effects), n_layers)
    early = table[table["band"] == "early"]
    de = float(early["mean_direct_effect"].abs().sum())
    t = float(early["mean_total_effect"].abs().sum()) / de if de > 0 else float("nan")
    verdict = HOLDS if t >= 2 else (PARTLY if t >= 1 else FAILS)
    measure = (
        f"early layers: total effects {t:.2f} times the direct effects (sums of absolute means)"
    )
    return Finding("early_total", verdict, measure, {"ratio": t})


_RULES: dict[str, Callable[[pd.DataFrame, pd.DataFrame | None, int], Finding]] = {
    "agreement": _agreement,
    "unembed_gt_ablate": _unembed_gt_ablate,
    "hydra": _hydra,
    "erasure": _erasure,
    "erasure_attenuated": _erasure_attenuated,
    "ce_predicted": _ce_predicted,
    "restored_70": _restored_70,
    "shift_to_mlp": _shift_to_mlp,
    "early_total": _early_total,
}


def n_layers_of(effects: pd.DataFrame) -> int:
    """The model's layer count as the table shows it (largest attention, MLP or mixer layer
    + 1)."""
    layers = effects.loc[effects["kind"].isin(("attn", "mlp", "head", "mixer")), "layer"]
    if layers.empty:
        raise ResultsError(
            "the effects table has no attention, MLP or mixer rows to judge findings on"
        )
    return int(layers.max()) + 1


def measure_findings(
    effects: pd.DataFrame, readouts: pd.DataFrame | None = None, n_layers: int | None = None
) -> list[Finding]:
    """Every finding of the module docstring on these rows (layer granularity: head and set
    rows are left out), in the docstring's order."""
    singles = single_site_rows(effects)
    singles = singles[singles["kind"] != "head"]
    if singles.empty:
        raise ResultsError(
            "the effects table has no layer rows (attn, mlp or mixer) to judge findings on"
        )
    n = n_layers if n_layers is not None else n_layers_of(singles)
    return [rule(singles, readouts, n) for rule in _RULES.values()]


#: Subsets of prompts each finding is also judged on (``target_is_true`` of the effects table).
SUBSETS: dict[str, Callable[[pd.DataFrame], pd.Series]] = {
    "all prompts": lambda e: pd.Series(True, index=e.index),
    "target true": lambda e: e["target_is_true"].astype(bool),
    "target not true": lambda e: ~e["target_is_true"].astype(bool),
}


def findings_table(
    effects: pd.DataFrame, readouts: pd.DataFrame | None = None, model: str = ""
) -> pd.DataFrame:
    """One row per (finding, subset of prompts): model, finding, claim, subset, n_prompts,
    verdict, measure. Subsets in :data:`SUBSETS`; a subset without prompts is left out."""
    n_layers = n_layers_of(single_site_rows(effects))
    rows = []
    for subset, select in SUBSETS.items():
        part = effects[select(effects)]
        if part.empty:
            continue
        for finding in measure_findings(part, readouts, n_layers):
            rows.append(
                {
                    "model": model,
                    "finding": finding.key,
                    "claim": CLAIMS[finding.key],
                    "subset": subset,
                    "n_prompts": int(part["prompt_id"].nunique()),
                    "verdict": finding.verdict,
                    "measure": finding.measure,
                }
            )
    return pd.DataFrame(rows)
