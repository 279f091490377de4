"""Per-layer statistics of a Hydra sweep's effects table (paper Figures 2, 7, 8).

Pure functions of the ``effects`` table written by :mod:`causalnet.hydra.store` (one row per
prompt and ablated site). Notation per row (prompt u, ablated site k), all in centred logits:

- ``DE = direct_effect``: k's direct effect in the clean run, Delta_unembed (Eqs 10, 28);
- ``TE = total_effect``: the centred target logit after ablating k minus before, averaged over
  patches, Delta_ablate (Eqs 12, 18, 39);
- ``dDE_self = direct_effect_ablated_self - direct_effect``: the change of k's own direct
  effect (Eq 34 with l = k); ``removed = -dDE_self`` is the direct effect the ablation took away
  (= DE for zero ablation, ~DE on average for resample ablation);
- ``CE = compensatory_effect = compensatory_attn + compensatory_mlp``: the sum of Delta_DE over
  the sites downstream of k (Eq 33), split into the attention part (the Hydra effect) and the MLP
  part (less erasure);
- ``delta_de_upstream``: the sum of Delta_DE over the embedding and the other non-downstream
  sites (nonzero only through the change of the final norm's scale sigma).

Every run decomposes exactly into direct effects, so ``TE = dDE_self + CE + delta_de_upstream``
(:func:`identity_residual` is ~0).

**Sign convention.** A positive CE moves the target logit up. When the ablation removes a
positive direct effect (removed > 0), a positive CE restores part of it: the fraction restored
is ``CE / removed`` (1 = fully restored, 0 = no compensation, < 0 = the ablation's damage is
amplified); for a removed negative effect, a negative CE restores it and the fraction is again
positive. Regressions are ordinary least squares with ``y = CE``:

- the paper's view (Fig 7): ``x = DE``; slope ``s``, intercept, r^2 (the variance of CE that the
  direct effect explains);
- the restoration view: ``x = removed``; ``restoration_slope`` is the fraction restored per unit
  of removed direct effect (0.7 = 70 % restored).

Both slopes share the sign convention above and coincide when ``removed == DE`` (zero
ablation, or resample ablations whose patches carry no direct effect of their own).

**Grouping.** Statistics are per (kind, layer): for kind ``"head"`` every head of a layer is an
observation of that layer (heads are pooled, not summed: a head ablation removes one head).
The embedding is kind ``"embed"``, layer -1. Rows are ordered embed, attn, head, mlp, then by
layer. Statistics with fewer than two observations, or no variance in x, are NaN.

**Sets.** Rows of a set of sites ablated together (kind ``"set"``, e.g. ``attn.1+attn.2``;
docs/conventions.md "Sets of sites") are not observations of any layer: every per-(kind, layer)
statistic here leaves them out (:func:`single_site_rows`), and :func:`set_table` gives the same
statistics per set, one row each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import ResultsError

KIND_ORDER = ("embed", "attn", "head", "mlp", "mixer")

#: The ``kind`` of an effects row whose site is a set of sites ablated together.
SET_KIND = "set"

_NEEDED = (
    "kind",
    "layer",
    "direct_effect",
    "total_effect",
    "direct_effect_ablated_self",
    "compensatory_effect",
    "compensatory_attn",
    "compensatory_mlp",
    "delta_de_upstream",
)


@dataclass(frozen=True)
class Fit:
    """Least-squares line y = slope * x + intercept and its r^2 over n points."""

    slope: float
    intercept: float
    r2: float
    n: int


def linear_fit(x: np.ndarray, y: np.ndarray) -> Fit:
    """Ordinary least squares of y on x: slope = cov(x, y) / var(x), r^2 = corr(x, y)^2.

    NaN slope/intercept when n < 2 or var(x) = 0; NaN r^2 also when var(y) = 0.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(x)
    if n < 2:
        return Fit(np.nan, np.nan, np.nan, n)
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy, sxy = float(dx @ dx), float(dy @ dy), float(dx @ dy)
    if sxx == 0.0:
        return Fit(np.nan, np.nan, np.nan, n)
    slope = sxy / sxx
    r2 = sxy * sxy / (sxx * syy) if syy > 0.0 else np.nan
    return Fit(slope, float(y.mean() - slope * x.mean()), r2, n)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when n < 2 or either variable is constant."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return np.nan
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denom if denom > 0.0 else np.nan


def removed_direct_effect(effects: pd.DataFrame) -> pd.Series:
    """``removed = -(Delta_DE of the ablated site) = direct_effect - direct_effect_ablated_self``
    (Eq 34 with l = k, negated): the direct effect that the ablation took away."""
    _check(effects)
    return effects["direct_effect"] - effects["direct_effect_ablated_self"]


def identity_residual(effects: pd.DataFrame) -> pd.Series:
    """``TE - (dDE_self + CE + delta_de_upstream)`` per row (module doc); ~0 up to rounding.

    With dDE_self = direct_effect_ablated_self - direct_effect (Eq 34) and CE (Eq 33), every
    run's centred logit is the sum of its sites' direct effects at that run's sigma, so the
    total effect (Eq 12) splits exactly into these three terms.
    """
    _check(effects)
    d_self = effects["direct_effect_ablated_self"] - effects["direct_effect"]
    return effects["total_effect"] - (
        d_self + effects["compensatory_effect"] + effects["delta_de_upstream"]
    )


def per_layer_agreement(effects: pd.DataFrame) -> pd.DataFrame:
    """How well the direct effect (Delta_unembed, Eq 10) agrees with the ablation's effect,
    per (kind, layer) -- paper Fig 2d.

    The paper's expectation (Section 2.5) is that ablating a layer removes at least its direct
    effect, i.e. that the *drop* of the target logit, ``drop = -TE`` (clean minus ablated; TE
    is Eq 12, ablated minus clean), is at least DE; "Delta_unembed > Delta_ablate for most
    prompts" is that expectation failing. So the comparison is of DE with the drop:

    Columns: kind, layer, n, mean_direct_effect, mean_total_effect (Eq 12 sign), mean_drop,
    corr_direct_drop (Pearson r of DE and -TE over prompts), frac_direct_gt_drop (the fraction
    of prompts with DE > -TE: the ablation removed less than the direct effect).
    """

    def stats(g: pd.DataFrame) -> dict[str, float]:
        de, te = g["direct_effect"].to_numpy(), g["total_effect"].to_numpy()
        return {
            "mean_direct_effect": float(de.mean()),
            "mean_total_effect": float(te.mean()),
            "mean_drop": float(-te.mean()),
            "corr_direct_drop": pearson(de, -te),
            "frac_direct_gt_drop": float((de > -te).mean()),
        }

    return _per_layer(effects, stats)


def compensation_regression(effects: pd.DataFrame) -> pd.DataFrame:
    """Regression of the compensatory effect (Eq 33) on the ablated site's direct effect, per
    (kind, layer) -- paper Fig 7 (a, b, d).

    Columns: kind, layer, n; ``slope``, ``intercept``, ``r2`` of ``CE = slope * DE + intercept``
    (the paper's axes, x = direct_effect); ``restoration_slope``, ``restoration_intercept``,
    ``restoration_r2`` of ``CE = restoration_slope * removed + intercept`` with
    ``removed = direct_effect - direct_effect_ablated_self`` (= -Delta_DE of the ablated site,
    Eq 34): the fraction of the removed direct effect that downstream sites restore (0.7 = 70 %).
    Sign convention in the module docstring.
    """

    def stats(g: pd.DataFrame) -> dict[str, float]:
        ce = g["compensatory_effect"].to_numpy()
        paper = linear_fit(g["direct_effect"].to_numpy(), ce)
        restore = linear_fit((g["direct_effect"] - g["direct_effect_ablated_self"]).to_numpy(), ce)
        return {
            "slope": paper.slope,
            "intercept": paper.intercept,
            "r2": paper.r2,
            "restoration_slope": restore.slope,
            "restoration_intercept": restore.intercept,
            "restoration_r2": restore.r2,
        }

    return _per_layer(effects, stats)


def peak_r2_layer(regression: pd.DataFrame, kind: str) -> int | None:
    """The layer of ``kind`` whose compensation regression (:func:`compensation_regression`'s
    table) has the highest r^2 -- Fig 7b, the paper's layer 23 (92 %). None when no r^2 of that
    kind is defined."""
    rows = regression[regression["kind"] == kind]
    if not rows["r2"].notna().any():
        return None
    return int(rows.loc[rows["r2"].idxmax(), "layer"])


def response_split(effects: pd.DataFrame) -> pd.DataFrame:
    """Which downstream sites carry the compensation: attention (Hydra effect) vs MLP (less
    erasure), per (kind, layer) of the ablated site -- paper Fig 8.

    Columns: kind, layer, n, mean_compensatory_attn, mean_compensatory_mlp; ``slope_attn``,
    ``r2_attn``, ``slope_mlp``, ``r2_mlp`` of each part regressed on the ablated site's direct
    effect (x = direct_effect, as :func:`compensation_regression`'s ``slope``; since OLS is
    linear in y, slope_attn + slope_mlp = slope); ``attn_share = slope_attn / (slope_attn +
    slope_mlp)``, the attention part's share of the compensation slope (NaN when the sum is 0).
    """

    def stats(g: pd.DataFrame) -> dict[str, float]:
        x = g["direct_effect"].to_numpy()
        attn = linear_fit(x, g["compensatory_attn"].to_numpy())
        mlp = linear_fit(x, g["compensatory_mlp"].to_numpy())
        total = attn.slope + mlp.slope
        return {
            "mean_compensatory_attn": float(g["compensatory_attn"].mean()),
            "mean_compensatory_mlp": float(g["compensatory_mlp"].mean()),
            "slope_attn": attn.slope,
            "r2_attn": attn.r2,
            "slope_mlp": mlp.slope,
            "r2_mlp": mlp.r2,
            "attn_share": attn.slope / total if total != 0.0 else np.nan,
        }

    return _per_layer(effects, stats)


@dataclass(frozen=True)
class Restoration:
    """:func:`fraction_restored`'s answer.

    ``per_layer``: kind, layer, n, mean_removed, rms_removed, mean_compensatory_effect,
    fraction_restored, eligible, is_peak. ``overall``: kind, n, fraction_restored (all rows of
    the kind). ``peak``: kind, layer, fraction_restored (the eligible layer where it is largest).
    """

    per_layer: pd.DataFrame
    overall: pd.DataFrame
    peak: pd.DataFrame


def _restored(removed: np.ndarray, ce: np.ndarray) -> float:
    """sum(CE * removed) / sum(removed^2): least squares of CE = f * removed through 0."""
    denom = float(removed @ removed)
    return float(ce @ removed) / denom if denom > 0.0 else np.nan


def fraction_restored(effects: pd.DataFrame, min_removed_share: float = 0.1) -> Restoration:
    """The fraction of the removed direct effect that the compensatory effect restores.

    Per row it is ``CE / removed`` with ``removed = -(Delta_DE of the ablated site)`` (module
    doc). Over a group of rows it is the least-squares fit through the origin,
    ``f = sum(CE * removed) / sum(removed^2)``, which equals CE / removed for one row, keeps
    the sign convention for rows of either sign, and weights rows by how much was removed (rows
    that removed ~nothing cannot blow it up). ``overall`` pools all layers of a kind.

    The peak layer is the one with the largest f among the layers whose RMS removed direct
    effect is at least ``min_removed_share`` times the largest RMS of that kind (``eligible``):
    layers whose ablation removes almost nothing have a meaningless fraction.
    """
    _check(effects)
    removed = removed_direct_effect(effects)
    frame = effects.assign(_removed=removed)

    def stats(g: pd.DataFrame) -> dict[str, float]:
        r, ce = g["_removed"].to_numpy(), g["compensatory_effect"].to_numpy()
        return {
            "mean_removed": float(r.mean()),
            "rms_removed": float(np.sqrt((r * r).mean())),
            "mean_compensatory_effect": float(ce.mean()),
            "fraction_restored": _restored(r, ce),
        }

    per_layer = _per_layer(frame, stats)
    largest = per_layer.groupby("kind", sort=False)["rms_removed"].transform("max")
    per_layer["eligible"] = (per_layer["rms_removed"] >= min_removed_share * largest) & (
        largest > 0
    )
    per_layer["eligible"] &= per_layer["fraction_restored"].notna()
    candidates = per_layer[per_layer["eligible"]]
    peak_index = candidates.groupby("kind", sort=False)["fraction_restored"].idxmax()
    per_layer["is_peak"] = per_layer.index.isin(peak_index.to_numpy())
    peak = per_layer.loc[per_layer["is_peak"], ["kind", "layer", "fraction_restored"]]
    overall = pd.DataFrame(
        [
            {
                "kind": kind,
                "n": len(g),
                "fraction_restored": _restored(
                    g["_removed"].to_numpy(), g["compensatory_effect"].to_numpy()
                ),
            }
            for kind, g in single_site_rows(frame).groupby("kind", sort=False)
        ]
    )
    overall = _order(overall, by_layer=False)
    return Restoration(per_layer, overall, peak.reset_index(drop=True))


def summary_table(effects: pd.DataFrame) -> pd.DataFrame:
    """One row per (kind, layer) with every statistic of this module.

    Columns: kind, layer, n, then :func:`per_layer_agreement`'s, :func:`compensation_regression`'s,
    :func:`response_split`'s and :func:`fraction_restored`'s columns, and
    ``max_abs_identity_residual`` (max over the group's rows of |:func:`identity_residual`|).
    """
    keys = ["kind", "layer", "n"]
    table = per_layer_agreement(effects)
    for part in (
        compensation_regression(effects),
        response_split(effects),
        fraction_restored(effects).per_layer,
    ):
        table = table.merge(part, on=keys, how="left", validate="one_to_one")
    singles = single_site_rows(effects)
    residual = identity_residual(singles).abs().groupby([singles["kind"], singles["layer"]]).max()
    residual = residual.rename("max_abs_identity_residual").reset_index()
    return table.merge(residual, on=["kind", "layer"], how="left", validate="one_to_one")


def single_site_rows(effects: pd.DataFrame) -> pd.DataFrame:
    """The rows of single ablated sites: every row but the sets' (kind ``"set"``)."""
    return effects[effects["kind"] != SET_KIND]


def has_single_sites(effects: pd.DataFrame) -> bool:
    """Whether any row ablates a single site (a folder may hold sets only)."""
    return bool((effects["kind"] != SET_KIND).any())


def set_table(effects: pd.DataFrame) -> pd.DataFrame:
    """:func:`summary_table`'s statistics per set of sites (rows of kind ``"set"``): one row
    per set, its own rows only (a set is no observation of a layer). Columns: site (the
    canonical ``a+b`` name), members (count), layer (the earliest member's), n, then
    :func:`summary_table`'s statistic columns (without the per-kind peak flags). Empty (with
    these columns' keys) when no row is a set."""
    _check(effects)
    sets = effects[effects["kind"] == SET_KIND]
    if sets.empty:
        return pd.DataFrame(columns=["site", "members", "layer", "n"])
    # Each set is its own group: its name stands in for the kind, so the per-(kind, layer)
    # machinery computes exactly the per-set statistics.
    table = summary_table(sets.assign(kind=sets["site"]))
    table = table.drop(columns=["eligible", "is_peak"]).rename(columns={"kind": "site"})
    table.insert(1, "members", table["site"].map(lambda s: len(str(s).split("+"))))
    return table.sort_values(["layer", "site"]).reset_index(drop=True)


# ---- helpers --------------------------------------------------------------------------------


def _check(effects: pd.DataFrame) -> None:
    if not isinstance(effects, pd.DataFrame):
        raise ResultsError(
            f"expected the effects table (a DataFrame), got {type(effects).__name__}"
        )
    missing = [c for c in _NEEDED if c not in effects.columns]
    if missing:
        raise ResultsError(f"effects table lacks columns {missing}")
    if effects.empty:
        raise ResultsError("effects table has no rows")


def _order(frame: pd.DataFrame, by_layer: bool = True) -> pd.DataFrame:
    rank = frame["kind"].map({k: i for i, k in enumerate(KIND_ORDER)}).fillna(len(KIND_ORDER))
    cols = ["_rank", "layer"] if by_layer else ["_rank"]
    return frame.assign(_rank=rank).sort_values(cols).drop(columns="_rank").reset_index(drop=True)


def _per_layer(
    effects: pd.DataFrame, stats: Callable[[pd.DataFrame], dict[str, float]]
) -> pd.DataFrame:
    """Apply ``stats(group) -> dict`` per (kind, layer) of the single-site rows (sets left
    out); columns kind, layer, n, then stats."""
    _check(effects)
    effects = single_site_rows(effects)
    if effects.empty:
        raise ResultsError(
            "effects table has only rows of sets of sites (kind 'set'): no per-layer statistic; "
            "see the per-set table (set_table, 'causalnet report')"
        )
    rows = []
    for (kind, layer), group in effects.groupby(["kind", "layer"], sort=False):
        rows.append({"kind": kind, "layer": int(layer), "n": len(group), **stats(group)})
    return _order(pd.DataFrame(rows))
