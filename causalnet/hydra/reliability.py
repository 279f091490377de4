"""How reliably the repair happens (issue 13, section 2): fractions, intervals, failures.

Pure functions of the ``effects`` table (one row per prompt and ablated site, means over
patches), written with the repair split (:func:`causalnet.hydra.protocol.split_repair`).
Definitions in ``docs/conventions.md``, "Repair reliability"; per row:

- ``removed = direct_effect - direct_effect_ablated_self`` (-Delta_DE of the ablated site);
- ``repair = total_effect + removed = repair_attn + repair_mlp + repair_norm + repair_sibling``.

Per (kind, layer) group (head ablations pooled per layer, as in
:mod:`causalnet.hydra.analysis`): the repair fraction ``sum(repair * removed) / sum(removed^2)``
and its parts' fractions, the share of rows that over-correct (``repair / removed > 1``) and
that anti-repair (``repair * removed < 0``), each with a 95% percentile-bootstrap interval
whose resampling unit is the prompt (:func:`bootstrap_ratios`). :func:`top_rows` keeps, per
ablated site, the top K% of rows by |direct effect| (Rushing & Nanda 2024 report K = 2).
:func:`format_repair_table` renders a table as text or markdown (``causalnet report
--repair``).

A set of sites ablated together (kind ``"set"``) is its own group, one row per set (``site`` its
name, ``layer`` its earliest member's), never pooled with a layer nor with other sets.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd

from ..errors import ConfigError, ResultsError
from .analysis import KIND_ORDER, SET_KIND
from .store import REPAIR_COLUMNS, ResultsStore

#: The parts of the repair, as (column, short name), in the order they are reported.
PARTS = (
    ("repair_attn", "attn"),
    ("repair_mlp", "mlp"),
    ("repair_norm", "norm"),
    ("repair_sibling", "sibling"),
)
_NEEDED = ("prompt_id", "site", "kind", "layer", "direct_effect", "total_effect")
_NEEDED += ("direct_effect_ablated_self",)


def repair_rows(effects: pd.DataFrame) -> pd.DataFrame:
    """``effects`` with ``removed`` and ``repair`` added (module doc); ResultsError when the
    table lacks the repair columns (a folder written before the repair split)."""
    if not isinstance(effects, pd.DataFrame):
        raise ResultsError(f"expected the effects table (a DataFrame), got {type(effects)}")
    missing = [c for c in (*_NEEDED, *REPAIR_COLUMNS) if c not in effects.columns]
    if missing:
        older = set(missing) <= set(REPAIR_COLUMNS)
        raise ResultsError(
            f"the effects table lacks columns {missing}"
            + (
                ": it was written before the repair split; rerun the sweep into a new "
                "--out folder to get it"
                if older
                else ""
            )
        )
    if effects.empty:
        raise ResultsError("the effects table has no rows")
    removed = effects["direct_effect"] - effects["direct_effect_ablated_self"]
    return effects.assign(removed=removed, repair=effects["total_effect"] + removed)


def top_rows(effects: pd.DataFrame, percent: float) -> pd.DataFrame:
    """Per ablated site, its rows with the largest |direct_effect|: the ceil(percent * n / 100)
    largest of its n rows (at least one; ties kept in row order). ConfigError unless
    0 < percent <= 100."""
    if isinstance(percent, bool) or not isinstance(percent, int | float):
        raise ConfigError(f"top percent must be a number, got {percent!r}")
    if not 0 < percent <= 100:
        raise ConfigError(f"top percent must be in (0, 100], got {percent}")
    keep = []
    for _, group in effects.groupby("site", sort=False):
        count = max(1, math.ceil(percent * len(group) / 100 - 1e-9))
        order = np.argsort(-group["direct_effect"].abs().to_numpy(), kind="stable")
        keep.append(group.index.to_numpy()[order[:count]])
    return effects.loc[np.sort(np.concatenate(keep))]


def bootstrap_ratios(
    numerators: np.ndarray,
    denominators: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ratios of per-prompt sums and their percentile-bootstrap intervals over prompts.

    ``numerators`` [n_prompts, m] and ``denominators`` [n_prompts, m] (or [n_prompts]) hold
    each prompt's sums. The statistic is ``num.sum(0) / den.sum(0)``; each of ``n_boot``
    replicates draws n prompts with replacement (``numpy.random.default_rng(seed)``, counts
    from a multinomial) and recomputes it; returns (statistic, low, high) [m] with low and high
    the (1 - level) / 2 and (1 + level) / 2 percentiles of the defined replicates (NaN where
    none is defined).
    """
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if num.ndim == 1:
        num = num[:, None]
    if den.ndim == 1 and len(den) == len(num):
        den = np.broadcast_to(den[:, None], num.shape)
    n = num.shape[0]
    if n == 0 or den.shape != num.shape:
        raise ResultsError(f"bootstrap needs [n, m] sums, got {num.shape} and {den.shape}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ConfigError(f"the number of bootstrap replicates must be >= 1, got {n_boot!r}")
    total_den = den.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        stat = np.where(total_den != 0, num.sum(0) / total_den, np.nan)
        counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot)
        rep_den = counts @ den
        reps = np.where(rep_den != 0, (counts @ num) / rep_den, np.nan)
    tail = 100 * (1 - level) / 2
    low = np.full(num.shape[1], np.nan)
    high = np.full(num.shape[1], np.nan)
    for j in range(num.shape[1]):
        defined = reps[:, j][~np.isnan(reps[:, j])]
        if len(defined):
            low[j], high[j] = np.percentile(defined, [tail, 100 - tail])
    return stat, low, high


def repair_table(
    effects: pd.DataFrame,
    top: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    pooled: bool = False,
) -> pd.DataFrame:
    """Per (kind, layer): the repair fraction, its parts and the over-correction and
    anti-repair shares, each with its 95% prompt-bootstrap interval (module doc). With
    ``pooled``: one row per kind (all its layers, ``layer`` -1; embed stays embed). Sets
    (kind ``"set"``): one row per set (module doc), left out of the pooled rows.

    Columns: kind, layer, site (a set's name; "" for a layer's row), n_prompts, n_rows,
    rms_removed, then for each statistic X of ``repair``, ``attn``, ``mlp``, ``norm``,
    ``sibling`` (fractions), ``over`` and ``anti`` (shares): ``X``, ``X_lo``,
    ``X_hi``. ``top``: only :func:`top_rows` with that percent.
    """
    rows = repair_rows(effects)
    if top is not None:
        rows = top_rows(rows, top)
    names = ["repair", *(name for _, name in PARTS)]
    columns = ["repair", *(col for col, _ in PARTS)]
    out = []
    is_set = rows["kind"] == SET_KIND
    if pooled:
        rows = rows[~is_set].assign(layer=-1, _set="")
    else:
        rows = rows.assign(_set=rows["site"].where(is_set, ""))
    for (kind, layer, site), group in rows.groupby(["kind", "layer", "_set"], sort=False):
        removed = group["removed"].to_numpy()
        nonzero = removed != 0
        ratio = np.divide(
            group["repair"].to_numpy(), removed, where=nonzero, out=np.zeros(len(group))
        )
        frame = pd.DataFrame(
            {
                "prompt_id": group["prompt_id"].to_numpy(),
                "xx": removed * removed,
                "valid": nonzero.astype(float),
                "over": (nonzero & (ratio > 1)).astype(float),
                "anti": (nonzero & (ratio < 0)).astype(float),
                **{n: group[c].to_numpy() * removed for n, c in zip(names, columns, strict=True)},
            }
        )
        # min_count: a part that is NaN on every row (attention / MLP in a model of mixers:
        # not applicable) stays NaN, shown "n/a", instead of summing to 0
        per_prompt = frame.groupby("prompt_id", sort=True).sum(min_count=1)
        fractions = bootstrap_ratios(
            per_prompt[names].to_numpy(), per_prompt["xx"].to_numpy(), n_boot, seed
        )
        shares = bootstrap_ratios(
            per_prompt[["over", "anti"]].to_numpy(), per_prompt["valid"].to_numpy(), n_boot, seed
        )
        record = {
            "kind": kind,
            "layer": int(layer),
            "site": site,
            "n_prompts": len(per_prompt),
            "n_rows": len(group),
            "rms_removed": float(np.sqrt(np.mean(removed * removed))),
        }
        for stats, keys in ((fractions, names), (shares, ["over", "anti"])):
            for j, key in enumerate(keys):
                record[key] = stats[0][j]
                record[f"{key}_lo"] = stats[1][j]
                record[f"{key}_hi"] = stats[2][j]
        out.append(record)
    table = pd.DataFrame(out, columns=None if out else ["kind", "layer", "site"])
    rank = table["kind"].map({k: i for i, k in enumerate(KIND_ORDER)}).fillna(len(KIND_ORDER))
    return (
        table.assign(_rank=rank)
        .sort_values(["_rank", "layer", "site"])
        .drop(columns="_rank")
        .reset_index(drop=True)
    )


#: The statistics :func:`format_repair_table` shows, with their headers.
SHOWN = (
    ("repair", "repair fraction"),
    ("attn", "attn"),
    ("mlp", "mlp"),
    ("norm", "norm"),
    ("over", "over-correct"),
    ("anti", "anti-repair"),
)


def format_repair_table(table: pd.DataFrame, markdown: bool = False) -> str:
    """:func:`repair_table` as text (``value [lo, hi]`` per cell) or as a markdown table."""

    def cell(row: pd.Series, key: str) -> str:
        value, lo, hi = row[key], row[f"{key}_lo"], row[f"{key}_hi"]
        if np.isnan(value):
            return "n/a"
        return f"{value:.2f} [{lo:.2f}, {hi:.2f}]"

    header = ["site", "n", "rms removed", *(title for _, title in SHOWN)]
    lines = []
    for _, row in table.iterrows():
        site = "embed" if row["kind"] == "embed" else f"{row['kind']}.{row['layer']}"
        if row["layer"] == -1 and row["kind"] != "embed":
            site = f"all {row['kind']}"
        if row["kind"] == SET_KIND:
            site = row["site"]
        lines.append(
            [site, str(row["n_rows"]), f"{row['rms_removed']:.3f}"]
            + [cell(row, key) for key, _ in SHOWN]
        )
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=True)]
    return "\n".join(
        "  ".join(x.rjust(w) for x, w in zip(line, widths, strict=True))
        for line in [header, *lines]
    )


def print_repair_report(
    results: str | os.PathLike[str],
    top: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    markdown: bool = False,
) -> None:
    """Print :func:`repair_table` of a results folder (``causalnet report --repair``): all
    rows, then (with ``top``) the top ``top``% per site; intervals from ``n_boot`` replicates."""
    effects = ResultsStore(results).load_effects()
    n_prompts = effects["prompt_id"].nunique()
    tables: list[tuple[str, float | None]] = [("all rows", None)]
    if top is not None:
        tables.append((f"top {top:g}% of rows by |direct effect| per site", top))
    for title, percent in tables:
        table = pd.concat(
            [
                repair_table(effects, top=percent, n_boot=n_boot, seed=seed),
                repair_table(effects, top=percent, n_boot=n_boot, seed=seed, pooled=True),
            ],
            ignore_index=True,
        )
        print(
            f"\nrepair split per layer, {title} ({n_prompts} prompts; fraction = "
            f"sum(part * removed) / sum(removed^2); [95% bootstrap over prompts, {n_boot} "
            f"replicates, seed {seed}]):"
        )
        print(format_repair_table(table, markdown))
