"""Reading a results folder's tables: the consolidated files if present, else the shards.

:class:`ResultsReader` loads ``run.json`` and the four tables of a results folder (columns:
:mod:`causalnet.hydra.tables`) without taking its lock (only completed prompts are read).
:class:`~causalnet.hydra.store.ResultsStore` is a reader that also writes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ResultsError
from .folder import check_results_folder, read_run_json
from .shards import iter_shards, scan_completed, shard_path, shard_schema, to_frame
from .tables import PromptId


class ResultsReader:
    """The tables of the results folder ``path``: ``load_effects()``, ``load_readouts()``,
    ``load_patches()``, ``load_patch_effects()``, ``load_run()``. Reading needs no lock."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.run_path = self.path / "run.json"
        self.shards = self.path / "shards"

    def load_run(self) -> dict[str, Any]:
        """The contents of run.json (ResultsError when absent or not written by causalnet)."""
        return read_run_json(self.run_path)

    def load_effects(self) -> pd.DataFrame:
        """The effects table: one row per prompt and ablated site (columns: :mod:`.tables`)."""
        return self._load("effects", None)

    def load_readouts(self, prompt_ids: Iterable[PromptId] | None = None) -> pd.DataFrame:
        """The readouts table: one row per prompt, ablated site and readout site; only the
        rows of ``prompt_ids`` when given (read selectively: the full table can be large)."""
        return self._load("readouts", prompt_ids)

    def load_patch_effects(self, prompt_ids: Iterable[PromptId] | None = None) -> pd.DataFrame:
        """The per-patch effects (one row per prompt, ablated site and patch) of the prompts
        that kept them (possibly no rows: folders written before the repair split have none);
        only the rows of ``prompt_ids`` when given."""
        return self._load("patch_effects", prompt_ids)

    def load_patches(self, prompt_ids: Iterable[PromptId] | None = None) -> pd.DataFrame:
        """The per-patch readouts of the prompts that kept them (possibly no rows); only the
        rows of ``prompt_ids`` when given."""
        return self._load("patches", prompt_ids)

    def patch_prompt_ids(self) -> list[PromptId]:
        """The sorted ids of the prompts that kept per-patch rows (Figure 1)."""
        check_results_folder(self.path)
        path = self.path / "patches.parquet"
        if path.exists():
            try:
                column = pq.read_table(path, columns=["prompt_id"]).column("prompt_id")
            except (OSError, pa.ArrowException) as err:
                raise ResultsError(f"{path} is unreadable: {err}") from err
            return sorted(set(column.to_pylist()))
        if (self.path / "effects.parquet").exists() and not self.shards.is_dir():
            return []
        return [i for i in self._sorted_ids() if shard_path(self.shards, i, "patches").exists()]

    def _load(self, name: str, prompt_ids: Iterable[PromptId] | None) -> pd.DataFrame:
        """The consolidated file if present, else the shards consolidated in memory."""
        check_results_folder(self.path)
        wanted = None if prompt_ids is None else set(prompt_ids)
        path = self.path / f"{name}.parquet"
        if path.exists():
            filters = None if not wanted else [("prompt_id", "in", sorted(wanted, key=str))]
            try:
                table = pq.read_table(path, filters=filters)
            except (OSError, pa.ArrowException) as err:
                raise ResultsError(f"{path} is unreadable: {err}") from err
            return to_frame(table.schema.empty_table() if wanted == set() else table)
        ids = self._sorted_ids()
        schema = shard_schema(self.shards, ids[0], name)
        if wanted is not None:
            ids = [i for i in ids if i in wanted]
        tables = list(iter_shards(self.shards, ids, name))
        return to_frame(pa.concat_tables(tables) if tables else schema.empty_table())

    # ---- shards ----------------------------------------------------------------------------
    def _sorted_ids(self) -> list[PromptId]:
        if not self.shards.is_dir():
            raise ResultsError(f"{self.path}: no results (no shards/ folder)")
        ids = sorted(self._scan_completed())
        if not ids:
            raise ResultsError(f"{self.path}: no completed prompts yet")
        return ids

    def _scan_completed(self) -> list[PromptId]:
        """The completed prompts' ids (a store also remembers their type)."""
        return scan_completed(self.shards)
