"""What a cheap estimate misses: attribution patching against the protocol's exact effects.

Pure functions of two tables on the same prompts, sites and patches: the ``effects`` table of a
sweep (:mod:`causalnet.hydra.store`; exact total effects, Eq 12, and compensatory effects,
Eq 33) and :func:`causalnet.hydra.attribution.attribution_table` (first-order estimates).
Per row ``error = atp_total_effect - total_effect``.

- :func:`per_layer`: per (kind, layer) the Pearson and Spearman correlation of the estimate
  with the exact total effect over prompts (heads pooled per layer), the mean absolute and RMS
  error, the RMS error relative to the RMS exact effect, and the share of rows whose sign agrees.
  A set of sites ablated together (kind ``"set"``) is its own group, one row per set.
- :func:`disagreements`: the rows where they disagree most, with each row's compensation and
  its rank.
- :func:`compensation_link`: whether those are the rows with the largest compensation: the
  Spearman correlation of |error| with |CE| over all rows, and the share of the top-q rows by
  |error| that are among the top-q rows by |CE| (q = 10 % by default; chance level is q).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import ResultsError
from .analysis import KIND_ORDER, SET_KIND, pearson

_EXACT = (
    "prompt_id",
    "site",
    "kind",
    "layer",
    "target_token",
    "total_effect",
    "compensatory_effect",
    "direct_effect",
    "direct_effect_ablated_self",
)
_ATP = ("prompt_id", "site", "target_token", "atp_total_effect")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when n < 2 or a side is constant."""
    x = pd.Series(np.asarray(x, dtype=np.float64)).rank().to_numpy()
    y = pd.Series(np.asarray(y, dtype=np.float64)).rank().to_numpy()
    return pearson(x, y)


def joined(atp: pd.DataFrame, effects: pd.DataFrame) -> pd.DataFrame:
    """The effects rows that have an estimate, with ``atp_total_effect``, ``error``,
    ``abs_error``, ``removed`` (direct_effect - direct_effect_ablated_self) and
    ``abs_compensation``. ResultsError when a row has no partner or the targets differ."""
    for name, frame, cols in (("attribution", atp, _ATP), ("effects", effects, _EXACT)):
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise ResultsError(f"the {name} table lacks columns {missing}")
        if frame.empty:
            raise ResultsError(f"the {name} table has no rows")
    for name, frame in (("attribution", atp), ("effects", effects)):
        if frame.duplicated(["prompt_id", "site"]).any():
            raise ResultsError(f"the {name} table has more than one row per (prompt_id, site)")
    left = atp[list(_ATP)].rename(columns={"target_token": "atp_target"})
    merged = effects.merge(left, on=["prompt_id", "site"], how="inner", validate="one_to_one")
    if len(merged) != len(atp):
        extra = len(atp) - len(merged)
        raise ResultsError(
            f"{extra} attribution row(s) have no (prompt_id, site) row in the effects table: "
            "estimate the sweep's own prompts and sites"
        )
    bad = merged[merged["atp_target"] != merged["target_token"]]
    if len(bad):
        first = bad.iloc[0]
        raise ResultsError(
            f"{len(bad)} row(s) estimate another target than the sweep's (prompt "
            f"{first['prompt_id']!r}: {first['atp_target']} vs {first['target_token']}): "
            "different model or prompt"
        )
    merged = merged.drop(columns="atp_target")
    merged["error"] = merged["atp_total_effect"] - merged["total_effect"]
    merged["abs_error"] = merged["error"].abs()
    merged["removed"] = merged["direct_effect"] - merged["direct_effect_ablated_self"]
    merged["abs_compensation"] = merged["compensatory_effect"].abs()
    return merged


def per_layer(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (kind, layer) of the ablated site, from :func:`joined`'s rows -- a set of sites
    (kind ``"set"``) per set, named in ``site`` ("" for a layer's row): n, mean_exact, mean_atp,
    pearson, spearman, mean_abs_error, rms_error, rms_exact, relative_rms_error
    (rms_error / rms_exact), sign_agreement, mean_abs_compensation."""
    out = []
    rows = rows.assign(_set=rows["site"].where(rows["kind"] == SET_KIND, ""))
    for (kind, layer, site), g in rows.groupby(["kind", "layer", "_set"], sort=False):
        exact, atp = g["total_effect"].to_numpy(), g["atp_total_effect"].to_numpy()
        err = atp - exact
        rms_exact = float(np.sqrt(np.mean(exact**2)))
        rms_error = float(np.sqrt(np.mean(err**2)))
        out.append(
            {
                "kind": kind,
                "layer": int(layer),
                "site": site,
                "n": len(g),
                "mean_exact": float(exact.mean()),
                "mean_atp": float(atp.mean()),
                "pearson": pearson(exact, atp),
                "spearman": spearman(exact, atp),
                "mean_abs_error": float(np.abs(err).mean()),
                "rms_error": rms_error,
                "rms_exact": rms_exact,
                "relative_rms_error": rms_error / rms_exact if rms_exact > 0 else np.nan,
                "sign_agreement": float((np.sign(exact) == np.sign(atp)).mean()),
                "mean_abs_compensation": float(g["abs_compensation"].mean()),
            }
        )
    table = pd.DataFrame(out)
    rank = table["kind"].map({k: i for i, k in enumerate(KIND_ORDER)}).fillna(len(KIND_ORDER))
    return (
        table.assign(_rank=rank)
        .sort_values(["_rank", "layer", "site"])
        .drop(columns="_rank")
        .reset_index(drop=True)
    )


def disagreements(rows: pd.DataFrame, top: int = 10) -> pd.DataFrame:
    """The ``top`` rows with the largest |error|: prompt_id, site, total_effect,
    atp_total_effect, error, compensatory_effect, removed, and ``compensation_rank`` (1 = the
    largest |CE| of all rows)."""
    ranked = rows.assign(
        compensation_rank=rows["abs_compensation"].rank(ascending=False, method="min").astype(int)
    )
    cols = [
        "prompt_id",
        "site",
        "total_effect",
        "atp_total_effect",
        "error",
        "compensatory_effect",
        "removed",
        "compensation_rank",
    ]
    return ranked.nlargest(top, "abs_error")[cols].reset_index(drop=True)


@dataclass(frozen=True)
class CompensationLink:
    """Whether AtP's largest errors sit where the compensation is largest (module doc)."""

    n: int
    spearman_error_compensation: float
    quantile: float
    top_overlap: float  # share of the top-q |error| rows among the top-q |CE| rows
    chance_overlap: float  # = quantile
    mean_abs_compensation_top_error: float
    mean_abs_compensation_all: float


def compensation_link(rows: pd.DataFrame, quantile: float = 0.1) -> CompensationLink:
    """:class:`CompensationLink` of :func:`joined`'s rows (module doc)."""
    if not 0 < quantile <= 1:
        raise ResultsError(f"quantile must be in (0, 1], got {quantile}")
    n = len(rows)
    m = max(1, int(round(quantile * n)))
    top_err = set(rows["abs_error"].nlargest(m).index)
    top_ce = set(rows["abs_compensation"].nlargest(m).index)
    return CompensationLink(
        n=n,
        spearman_error_compensation=spearman(rows["abs_error"], rows["abs_compensation"]),
        quantile=quantile,
        top_overlap=len(top_err & top_ce) / m,
        chance_overlap=m / n,
        mean_abs_compensation_top_error=float(rows.loc[list(top_err), "abs_compensation"].mean()),
        mean_abs_compensation_all=float(rows["abs_compensation"].mean()),
    )
