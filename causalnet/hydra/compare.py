"""``causalnet compare``: the paper's findings judged side by side on several results folders.

How the comparison is shown; what is measured and the verdict rules are in
:mod:`causalnet.hydra.findings`. Each folder's findings are judged on all its prompts and on the
prompts whose target is / is not the true attribute.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..errors import ResultsError
from .findings import CLAIMS, findings_table
from .store import ResultsStore

__all__ = ["compare_folders", "compare_report", "read_verdicts", "side_by_side_markdown"]


def side_by_side_markdown(tables: dict[str, pd.DataFrame]) -> str:
    """A Markdown table: one row per finding; per model a cell "verdict: measure" on all
    prompts, followed by the verdicts on prompts whose target is / is not the true attribute;
    a last column saying whether the models' verdicts on all prompts agree."""
    models = list(tables)
    header = ["paper's finding", *models, "models agree?"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, claim in CLAIMS.items():
        cells, verdicts = [claim], []
        for model in models:
            t = tables[model]
            rows = t[t["finding"] == key].set_index("subset")
            if "all prompts" not in rows.index:
                cells.append("--")
                continue
            main = rows.loc["all prompts"]
            verdicts.append(main["verdict"])
            split = "; ".join(
                f"{name}: {rows.loc[name, 'verdict']}"
                for name in ("target true", "target not true")
                if name in rows.index
            )
            cell = f"**{main['verdict']}**: {main['measure']} ({split})"
            cells.append(cell.replace("|", "\\|"))
        agree = "yes" if len(verdicts) == len(models) and len(set(verdicts)) == 1 else "**no**"
        cells.append(agree)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_folders(
    folders: Sequence[str | Path], names: Sequence[str] | None = None
) -> dict[str, pd.DataFrame]:
    """:func:`~causalnet.hydra.findings.findings_table` of each folder, keyed by its name (the
    given ``names``, else the model of its ``run.json``)."""
    if names is not None and len(names) != len(folders):
        raise ResultsError(f"--names gives {len(names)} names for {len(folders)} folders")
    tables: dict[str, pd.DataFrame] = {}
    for i, folder in enumerate(folders):
        store = ResultsStore(folder)
        name = names[i] if names is not None else str(store.load_run()["args"]["model"])
        if name in tables:
            raise ResultsError(f"{folder}: the name {name!r} is taken; give --names")
        tables[name] = findings_table(store.load_effects(), store.load_readouts(), name)
    return tables


def compare_report(
    folders: Sequence[str | Path],
    names: Sequence[str] | None = None,
    csv: str | None = None,
) -> str:
    """The side-by-side Markdown table with a line of prompt counts per folder; ``csv`` also
    gets every (model, finding, subset) row."""
    if csv is not None and not Path(csv).parent.is_dir():
        raise ResultsError(f"--csv {csv}: the folder {Path(csv).parent} does not exist")
    tables = compare_folders(folders, names)
    lines = []
    for (name, table), folder in zip(tables.items(), folders, strict=True):
        n_prompts = table.groupby("subset")["n_prompts"].first()  # a subset's prompt count
        lines.append(
            f"- {name}: {n_prompts['all prompts']} prompts, the top token is the true attribute "
            f"on {n_prompts.get('target true', 0)} ({folder})"
        )
    if csv is not None:
        pd.concat(list(tables.values()), ignore_index=True).to_csv(csv, index=False)
    return "\n".join(lines) + "\n\n" + side_by_side_markdown(tables)


def read_verdicts(csv: str | Path) -> dict[str, pd.DataFrame]:
    """The tables of a ``--csv`` file written by :func:`compare_report`, keyed by model in the
    file's order (so the side-by-side table can be re-made without the results folders)."""
    path = Path(csv)
    if not path.is_file():
        raise ResultsError(f"{csv}: no such verdicts file")
    frame = pd.read_csv(path)
    missing = {"model", "finding", "subset", "verdict", "measure"} - set(frame.columns)
    if missing:
        raise ResultsError(f"{csv}: not a verdicts file (no column {', '.join(sorted(missing))})")
    frame["model"] = frame["model"].astype(str)
    return {str(m): g.reset_index(drop=True) for m, g in frame.groupby("model", sort=False)}
