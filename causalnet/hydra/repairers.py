"""Who repairs: the compensation map and the replacement heads (issue 13, §3).

Pure functions of a sweep's ``readouts`` table (:mod:`causalnet.hydra.store`: one row per
prompt u, ablated site k and readout site l, with ``delta_de`` = Delta_DE(l) after ablating k,
Eq 34, mean over patches). Only the sites downstream of k (Eq 33's rule,
:func:`causalnet.sites.is_downstream`) can compensate; their Delta_DE summed is the
compensatory effect CE (attention part: the Hydra effect; MLP part: less erasure).

- :func:`compensation_map`: mean Delta_DE of every downstream head (or attention layer) and
  MLP for each ablated site, over prompts -- the map of who compensates for whom;
  :func:`compensation_matrix` pivots it (ablated sites x readout sites, NaN where a readout is
  not downstream) for the heatmap (:mod:`causalnet.hydra.compensation_figures`).
- :func:`replacement_heads`: for each ablated head and prompt, the k downstream heads that
  repair most -- ranked by ``repair = Delta_DE(l) * sign(removed)``, with ``removed =
  -Delta_DE(k)`` the direct effect the ablation took away, so a head that moves the target logit
  back towards its clean value ranks high whatever the sign of what was removed -- and how
  consistent that set is across prompts: the mean pairwise Jaccard overlap of the top-k sets
  (against its chance level for k heads drawn at random from the same candidates) and the mean
  pairwise Spearman correlation of the candidates' repair over prompts. High overlap and rank
  correlation mean the same heads compensate in every context (the paper's question).

A set of sites ablated together (``attn.1+attn.2``, docs/conventions.md "Sets of sites") is
one ablated site of the map: its downstream readouts are those downstream of its earliest
member that are not members (Eq 33 as the sweep applies it). The replacement heads are per
ablated head; sets are left out of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

import numpy as np
import pandas as pd

from ..errors import ResultsError
from ..sites import Site, SiteSet, is_downstream, parse_site, parse_unit
from .store import site_sort_key

_READOUTS = ("prompt_id", "ablated_site", "readout_site", "delta_de")


def _check(readouts: pd.DataFrame) -> None:
    if not isinstance(readouts, pd.DataFrame):
        raise ResultsError(f"expected the readouts table, got {type(readouts).__name__}")
    missing = [c for c in _READOUTS if c not in readouts.columns]
    if missing:
        raise ResultsError(f"the readouts table lacks columns {missing}")
    if readouts.empty:
        raise ResultsError("the readouts table has no rows")


def infer_parallel_residual(effects: pd.DataFrame, readouts: pd.DataFrame) -> bool:
    """Whether the sweep's model had a parallel residual, read off its own tables: for ablated
    attention sites, ``compensatory_mlp`` (Eq 33) includes the MLP of the ablated layer in a
    sequential model and excludes it in a parallel one. False when no attention site was
    ablated (then the two rules agree)."""
    _check(readouts)
    rows = effects[effects["kind"].isin(["attn", "head"])]
    if rows.empty:
        return False
    frame = readouts.merge(
        rows[["prompt_id", "site", "layer", "compensatory_mlp"]],
        left_on=["prompt_id", "ablated_site"],
        right_on=["prompt_id", "site"],
    )
    r_layer = frame["readout_site"].map(lambda s: parse_site(s).layer)
    is_mlp = frame["readout_site"].str.startswith("mlp.")
    keys = ["prompt_id", "ablated_site"]
    misfit = {}
    for parallel in (False, True):
        same_layer = (r_layer == frame["layer"]) & (not parallel)
        down = is_mlp & ((r_layer > frame["layer"]) | same_layer)
        sums = frame["delta_de"].where(down, 0.0).groupby([frame[k] for k in keys]).sum()
        given = frame.groupby(keys)["compensatory_mlp"].first()
        misfit[parallel] = float((sums - given).abs().max())
    return misfit[True] < misfit[False]


def is_downstream_of(readout: Site, ablated: Site | SiteSet, parallel_residual: bool) -> bool:
    """Eq 33 for a single ablated site or a set: a set's downstream sites are those downstream
    of its earliest member that are not members."""
    if isinstance(ablated, SiteSet):
        if readout in ablated.members:
            return False
        return is_downstream(readout, ablated.first, parallel_residual)
    return is_downstream(readout, ablated, parallel_residual)


def compensation_map(readouts: pd.DataFrame, parallel_residual: bool = False) -> pd.DataFrame:
    """Mean Delta_DE (Eq 34) of every downstream readout site per ablated site, over prompts.

    Columns: ablated_site, readout_site, readout_kind (attn, head or mlp), n (prompts),
    mean_delta_de, std_delta_de (over prompts). Rows in residual order of the ablated, then
    the readout site. Non-downstream readouts (upstream, the site itself, sibling heads) are
    left out: their Delta_DE moves only through sigma.
    """
    _check(readouts)
    pairs = readouts[["ablated_site", "readout_site"]].drop_duplicates()
    parsed = {s: parse_unit(s) for s in pd.unique(pairs.values.ravel())}
    down = [
        is_downstream_of(parsed[r], parsed[a], parallel_residual)
        for a, r in zip(pairs["ablated_site"], pairs["readout_site"], strict=True)
    ]
    kept = pairs[down]
    frame = readouts.merge(kept, on=["ablated_site", "readout_site"])
    if frame.empty:
        raise ResultsError("no ablated site of these readouts has a downstream site")
    grouped = frame.groupby(["ablated_site", "readout_site"], sort=False)["delta_de"]
    table = grouped.agg(n="size", mean_delta_de="mean", std_delta_de="std").reset_index()
    table.insert(2, "readout_kind", table["readout_site"].map(lambda s: parsed[s].kind))
    order = table["ablated_site"].map(site_sort_key).tolist()
    r_order = table["readout_site"].map(site_sort_key).tolist()
    table = table.assign(_a=order, _r=r_order).sort_values(["_a", "_r"])
    return table.drop(columns=["_a", "_r"]).reset_index(drop=True)


def compensation_matrix(cmap: pd.DataFrame, value: str = "mean_delta_de") -> pd.DataFrame:
    """:func:`compensation_map` as a matrix: rows ablated sites, columns readout sites (both in
    residual order), NaN where the readout is not downstream."""
    matrix = cmap.pivot(index="ablated_site", columns="readout_site", values=value)
    rows = sorted(matrix.index, key=site_sort_key)
    cols = sorted(matrix.columns, key=site_sort_key)
    return matrix.loc[rows, cols]


def chance_jaccard(k: int, n: int) -> float:
    """Expected Jaccard overlap of two independent uniformly random k-subsets of n items:
    sum_i P(|A & B| = i) * i / (2k - i), the intersection hypergeometric."""
    if not 0 < k <= n:
        raise ResultsError(f"need 0 < k <= n candidates, got k={k}, n={n}")
    if k == n:
        return 1.0
    total = comb(n, k)
    return sum(comb(k, i) * comb(n - k, k - i) / total * i / (2 * k - i) for i in range(k + 1))


@dataclass(frozen=True)
class ReplacementHeads:
    """:func:`replacement_heads`' answer.

    ``per_prompt``: prompt_id, ablated_site, rank (1 = repairs most), readout_site, delta_de,
    repair. ``consistency``: per ablated head -- n_prompts, n_candidates (its downstream
    heads), k, mean_jaccard, chance_jaccard, mean_spearman, mean_removed, and ``frequent``:
    the k heads most often in the top k (ties: the larger mean repair first), each with the
    share of prompts it is there in.
    """

    per_prompt: pd.DataFrame
    consistency: pd.DataFrame


def replacement_heads(
    readouts: pd.DataFrame, k: int = 5, parallel_residual: bool = False
) -> ReplacementHeads:
    """The downstream heads that repair most after each ablated head, and how consistently
    across prompts (module doc). Needs a head-granularity sweep's readouts."""
    _check(readouts)
    if k < 1:
        raise ResultsError(f"k must be >= 1, got {k}")
    heads = readouts[readouts["ablated_site"].map(lambda s: parse_unit(s).kind == "head")]
    if heads.empty:
        raise ResultsError(
            "no head was ablated in these readouts: run the sweep with --granularity head"
        )
    per_prompt, consistency = [], []
    for ablated, group in heads.groupby("ablated_site", sort=False):
        a = parse_site(ablated)
        matrix = group.pivot(index="prompt_id", columns="readout_site", values="delta_de")
        if ablated not in matrix.columns:
            raise ResultsError(f"the readouts of {ablated!r} lack its own readout row")
        removed = -matrix[ablated]
        candidates = [
            c
            for c in matrix.columns
            if parse_site(c).kind == "head" and is_downstream(parse_site(c), a, parallel_residual)
        ]
        if not candidates:
            continue
        candidates.sort(key=site_sort_key)
        sign = np.where(removed.to_numpy() < 0, -1.0, 1.0)[:, None]
        repair = matrix[candidates].to_numpy() * sign  # [prompts, candidates]
        top = min(k, len(candidates))
        order = np.argsort(-repair, axis=1, kind="stable")[:, :top]
        for row, pid in enumerate(matrix.index):
            for rank, col in enumerate(order[row], start=1):
                site = candidates[col]
                per_prompt.append(
                    {
                        "prompt_id": pid,
                        "ablated_site": ablated,
                        "rank": rank,
                        "readout_site": site,
                        "delta_de": float(matrix.iloc[row][site]),
                        "repair": float(repair[row, col]),
                    }
                )
        member = np.zeros_like(repair, dtype=bool)
        np.put_along_axis(member, order, True, axis=1)
        counts = member.sum(0)
        best = np.lexsort((-repair.mean(0), -counts))[:top]  # most often, then most repair
        consistency.append(
            {
                "ablated_site": ablated,
                "n_prompts": len(matrix),
                "n_candidates": len(candidates),
                "k": top,
                "mean_jaccard": _mean_pairwise_jaccard(member),
                "chance_jaccard": chance_jaccard(top, len(candidates)),
                "mean_spearman": _mean_pairwise_spearman(repair),
                "mean_removed": float(removed.mean()),
                "frequent": ", ".join(
                    f"{candidates[j]} ({counts[j] / len(matrix):.2f})" for j in best
                ),
            }
        )
    if not consistency:
        raise ResultsError("no ablated head has a downstream head (only last-layer heads?)")
    return ReplacementHeads(pd.DataFrame(per_prompt), pd.DataFrame(consistency))


def _mean_pairwise_jaccard(member: np.ndarray) -> float:
    """Mean Jaccard overlap of the rows' sets over all pairs of distinct rows; NaN for < 2."""
    n = member.shape[0]
    if n < 2:
        return np.nan
    m = member.astype(np.float64)
    inter = m @ m.T
    sizes = m.sum(1)
    union = sizes[:, None] + sizes[None, :] - inter
    jac = np.divide(inter, union, out=np.ones_like(inter), where=union > 0)
    return float(jac[np.triu_indices(n, 1)].mean())


def _mean_pairwise_spearman(values: np.ndarray) -> float:
    """Mean Spearman correlation of the rows over all pairs of distinct rows (rows that are
    constant are left out); NaN with fewer than two candidates or usable rows."""
    if values.shape[1] < 2:
        return np.nan
    ranks = pd.DataFrame(values).rank(axis=1).to_numpy()
    ranks = ranks[ranks.std(1) > 0]
    if ranks.shape[0] < 2:
        return np.nan
    corr = np.corrcoef(ranks)
    return float(corr[np.triu_indices(ranks.shape[0], 1)].mean())


def top_compensators(cmap: pd.DataFrame, n: int = 3) -> pd.DataFrame:
    """Per ablated site, the ``n`` readouts with the largest |mean Delta_DE|: ablated_site,
    readout_site, mean_delta_de, and ``share`` = that mean over the sum of |mean Delta_DE| of
    all its downstream sites (in [-1, 1]; the sum of the means, the mean CE of Eq 33, can be
    near 0 when compensators cancel)."""
    out = []
    for ablated, group in cmap.groupby("ablated_site", sort=False):
        total = group["mean_delta_de"].abs().sum()
        best = group.reindex(group["mean_delta_de"].abs().sort_values(ascending=False).index)
        for row in best.head(n).itertuples():
            out.append(
                {
                    "ablated_site": ablated,
                    "readout_site": row.readout_site,
                    "mean_delta_de": row.mean_delta_de,
                    "share": row.mean_delta_de / total if total != 0 else np.nan,
                }
            )
    return pd.DataFrame(out)
