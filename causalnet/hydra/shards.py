"""The shards of a results folder on disk: atomic writes, names, scans, checked reads, row groups.

Each finished prompt has one small parquet file per table in ``<folder>/shards/``, named
``<key>.<table>.parquet`` (``<key>``: :func:`~causalnet.hydra.tables.encode_prompt_id`); its
effects shard, written last, marks the prompt complete. Every file is written to a hidden
temporary file beside its final path and ``os.replace``-d into place (:func:`atomic_write`), so
a killed process leaves each file complete or absent. :func:`iter_shards` reads the shards back
checked (schema, one prompt per shard, no duplicate rows) for consolidation and loading;
:func:`write_consolidated` streams them into one file in fixed-size row groups.
:class:`~causalnet.hydra.store.ResultsStore` is the only writer.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ResultsError
from .tables import TABLES, PromptId, check_duplicates, decode_prompt_id, encode_prompt_id

ROW_GROUP_ROWS = 1 << 17
COMPRESSION = "zstd"

#: The temporary files :func:`atomic_write` makes: ``.<name>.<pid>.<hex>.tmp``.
TMP_NAME = re.compile(r"^\..+\.\d+\.[0-9a-f]+\.tmp$")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a hidden temporary file beside ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write one shard (not atomically: give it :func:`atomic_write`'s temporary path)."""
    pq.write_table(table, path, compression=COMPRESSION)


def read_schema(path: Path) -> pa.Schema:
    """The schema of the parquet file ``path``; ResultsError naming it when unreadable."""
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as err:
        raise ResultsError(f"{path} is unreadable: {err}") from err


def shard_path(shards: Path, prompt_id: PromptId, name: str) -> Path:
    """The shard of table ``name`` for ``prompt_id`` in the folder ``shards``."""
    return shards / f"{encode_prompt_id(prompt_id)}.{name}.parquet"


def scan_completed(shards: Path) -> list[PromptId]:
    """The ids of the completed prompts (those with an effects shard), from file names alone;
    ResultsError when int and str ids are mixed."""
    ids = [
        decode_prompt_id(p.name.split(".")[0])
        for p in shards.glob("*.effects.parquet")
        if not p.name.startswith(".")
    ]
    if len({type(i) for i in ids}) > 1:
        raise ResultsError(f"{shards} mixes int and str prompt ids")
    return ids


def clean_leftovers(folder: Path, shards: Path) -> None:
    """Remove the temporary files of killed writes and the shards of incomplete prompts."""
    for place in (folder, shards):
        for tmp in place.glob(".*.tmp"):
            if TMP_NAME.match(tmp.name):
                tmp.unlink()
    complete = {p.name.split(".")[0] for p in shards.glob("*.effects.parquet")}
    for table in ("readouts", "patches", "patch_effects"):
        for shard in shards.glob(f"*.{table}.parquet"):
            if shard.name.split(".")[0] not in complete:
                shard.unlink()


def shard_schema(shards: Path, prompt_id: PromptId, name: str) -> pa.Schema:
    """The schema of table ``name`` in this folder: the current one, or the older one when
    the shard of ``prompt_id`` has it (checked again for every shard read)."""
    table, path = TABLES[name], shard_path(shards, prompt_id, name)
    if not table.legacy or not path.exists():
        return table.schema(type(prompt_id))
    return table.schema(type(prompt_id), table.is_legacy(read_schema(path), type(prompt_id)))


def iter_shards(shards: Path, ids: list[PromptId], name: str) -> Iterator[pa.Table]:
    """Each completed prompt's shard of table ``name``, checked, in the order of ``ids``.

    Every completed prompt has effects and readouts shards; patches and patch_effects
    shards are optional. All shards must have one schema (an effects table with or without
    the repair columns, never both).
    """
    table = TABLES[name]
    expected: pa.Schema | None = None
    for pid in ids:
        path = shard_path(shards, pid, name)
        if table.optional and not path.exists():
            continue
        try:
            shard = pq.read_table(path)
        except FileNotFoundError as err:
            raise ResultsError(f"{path} is missing although prompt {pid!r} is complete") from err
        except (OSError, pa.ArrowException) as err:
            raise ResultsError(
                f"{path} is unreadable ({err}); delete it and "
                f"{path.name.split('.')[0]}.effects.parquet, then resume"
            ) from err
        if expected is None:
            try:
                expected = table.schema(type(pid), table.is_legacy(shard.schema, type(pid)))
            except ResultsError as err:
                raise ResultsError(f"{path}: {err}") from err
        if not shard.schema.equals(expected):
            raise ResultsError(
                f"{path}: columns {shard.schema} are not the {name} table's, or not those "
                "of this folder's other shards (with and without the repair columns)"
            )
        ids_in = set(shard.column("prompt_id").to_pylist())
        if ids_in != {pid}:
            raise ResultsError(
                f"{path} holds rows of prompt(s) {sorted(ids_in, key=str)[:5]}, expected "
                f"only {pid!r}: duplicated or misplaced rows"
            )
        check_duplicates(table, to_frame(shard), str(path))
        yield shard


def row_groups(tables: Iterable[pa.Table]) -> Iterator[pa.Table]:
    """Concatenate consecutive tables into chunks of at least ROW_GROUP_ROWS rows."""
    pending: list[pa.Table] = []
    rows = 0
    for t in tables:
        pending.append(t)
        rows += t.num_rows
        if rows >= ROW_GROUP_ROWS:
            yield pa.concat_tables(pending)
            pending, rows = [], 0
    if pending:
        yield pa.concat_tables(pending)


def write_consolidated(target: Path, schema: pa.Schema, tables: Iterable[pa.Table]) -> None:
    """Stream ``tables`` (one schema) into ``target`` atomically, in ROW_GROUP_ROWS row groups."""

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, schema, compression=COMPRESSION) as writer:
            for chunk in row_groups(tables):
                writer.write_table(chunk, row_group_size=ROW_GROUP_ROWS)

    atomic_write(target, write)


def to_frame(table: pa.Table) -> pd.DataFrame:
    """A table's columns as a pandas frame, its schema-level metadata ignored.

    pandas rebuilds indexes and dtypes from a ``b"pandas"`` metadata entry when one is present;
    causalnet writes none (its tables have fixed schemas, :mod:`.tables`), so a file whose entry
    was filled by someone else is read from its columns alone rather than trusted.
    """
    return table.replace_schema_metadata(None).to_pandas()
