"""The results folder of a Hydra sweep: written as it goes, atomically, resumable after SIGKILL.

Layout of a results folder::

    run.json                the run's arguments and bookkeeping (below)
    shards/                 one small parquet file per finished prompt and table:
        <key>.patches.parquet     (only for prompts whose per-patch rows were given)
        <key>.patch_effects.parquet   (per-patch effects, when given)
        <key>.readouts.parquet
        <key>.effects.parquet     written last: its presence marks the prompt complete
    effects.parquet         consolidated tables (:meth:`ResultsStore.consolidate`)
    readouts.parquet
    patches.parquet         (when any prompt kept its per-patch rows)
    patch_effects.parquet   (when any prompt kept its per-patch effects)

The tables' columns and the ``<key>`` encoding of prompt ids: :mod:`causalnet.hydra.tables`; the
shard files on disk: :mod:`causalnet.hydra.shards`.

**Kill safety.** Every file is written to a hidden temporary file in its final folder and then
``os.replace``-d into place, which is atomic on POSIX: a process killed at any instant leaves
each file either complete or absent (plus perhaps a stray ``.*.tmp``, removed at the next
:meth:`~ResultsStore.open`). A prompt counts as completed once its effects shard exists, and the
effects shard is written after the prompt's other shards, so a kill between them leaves orphan
readouts/patches shards that the next open removes and the resumed sweep writes again. The
folder is guarded by an OS lock on ``.lock`` (``filelock.FileLock``: ``flock`` on POSIX,
``msvcrt.locking`` on Windows; released by the kernel when the process dies, even by SIGKILL),
so two processes never write one folder; within one process, opening a folder again closes the
earlier store object (which can then no longer write).

**Whose folder.** :meth:`~ResultsStore.open` writes nothing until the folder passes
:func:`~causalnet.hydra.folder.check_out_folder`: absent, empty, or holding a ``run.json`` this
library wrote. A non-empty folder of other files (``--out .``) is refused untouched; so are a
file and a read-only place. The readers refuse a folder without our ``run.json``.

Durability against power loss (fsync) is not attempted; a corrupt shard is reported by name at
consolidation.

**Determinism.** Rows are validated, cast to fixed column types (:data:`EFFECTS_SCHEMA`, ...)
and sorted when a shard is written (sites in residual order, :func:`site_sort_key`);
consolidation streams the shards in sorted prompt-id order (ints numerically, strings by code
point) into fixed-size row groups. The final files therefore depend only on the set of rows,
not on the order or the number of sessions that wrote them: a killed-and-resumed run yields the
same bytes as an uninterrupted one.

**run.json**::

    {"format": 1,
     "args": {...},                 # the sweep's arguments, as given to open()
     "created_at": "...",           # UTC, ISO 8601
     "sessions": [{"started_at", "library_version", "completed_before", "ignored_args"}, ...],
     "finalized_at": "...", "n_prompts": n, "info": {...}}   # set by finalize()

On resume, ``args`` must equal the stored ones except for the keys in
:data:`IGNORED_ARG_KEYS` (software versions and timing), whose values are recorded per session
in ``sessions`` instead; any other difference raises :class:`ResultsError` listing the keys.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from .. import __version__
from ..errors import ResultsError
from .folder import (
    IGNORED_ARG_KEYS,
    RUN_FORMAT,
    FolderLock,
    check_out_folder,
    check_results_folder,
    compare_args,
    normalise_args,
)
from .reader import ResultsReader
from .shards import (
    atomic_write,
    clean_leftovers,
    iter_shards,
    read_schema,
    scan_completed,
    shard_path,
    shard_schema,
    write_consolidated,
    write_parquet,
)
from .tables import (
    EFFECTS_SCHEMA,
    PATCH_EFFECTS_SCHEMA,
    PATCHES_SCHEMA,
    READOUTS_SCHEMA,
    REPAIR_COLUMNS,
    TABLES,
    PromptId,
    decode_prompt_id,
    encode_prompt_id,
    site_sort_key,
    to_arrow,
)

__all__ = [
    "EFFECTS_SCHEMA",
    "IGNORED_ARG_KEYS",
    "PATCH_EFFECTS_SCHEMA",
    "PATCHES_SCHEMA",
    "READOUTS_SCHEMA",
    "REPAIR_COLUMNS",
    "PromptId",
    "ResultsStore",
    "decode_prompt_id",
    "encode_prompt_id",
    "site_sort_key",
]

_FINALIZE_KEYS = ("finalized_at", "n_prompts", "info")

#: The store object of this process that holds each folder's lock (by resolved path).
_HELD: dict[Path, ResultsStore] = {}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


class ResultsStore(ResultsReader):
    """A results folder (see the module docstring for the layout and the guarantees).

    Writing: ``open(args)``, then ``write_prompt(...)`` per finished prompt (skipping
    ``completed_ids()``), then ``finalize(info)``. Reading: ``load_effects()``,
    ``load_readouts()``, ``load_patches()``, ``load_run()`` (no ``open`` needed). Also a context
    manager that releases the folder's lock on exit.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        self._lock = FolderLock(self.path)
        self._done: set[PromptId] = set()
        self._id_type: type | None = None
        self._may_be_consolidated = True  # consolidated files may exist and match the shards
        self._legacy: bool | None = None  # effects without the repair columns (older folders)

    # ---- writing ---------------------------------------------------------------------------
    def open(self, args: dict[str, Any], resume: bool = True) -> ResultsStore:
        """Start or resume writing; returns self.

        A new (or empty) folder gets ``run.json`` with ``args``. A folder that already holds a
        run is resumed when ``resume`` is true and its stored arguments equal ``args`` (except
        :data:`IGNORED_ARG_KEYS`); otherwise ResultsError. Leftover temporary files and orphan
        shards of an interrupted prompt are removed. Nothing is written before :meth:`check`
        passes, so a folder that is not a results folder (``--out .``), a file, or a
        read-only place is refused untouched.
        """
        norm = normalise_args(args)
        self.check(norm, resume)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ResultsError(f"cannot create the results folder {self.path}: {err}") from err
        self._acquire_lock()
        try:
            run = self._open_run(norm, resume)
            clean_leftovers(self.path, self.shards)
            self._done = set(self._scan_completed())
            run["sessions"].append(
                {
                    "started_at": _now(),
                    "library_version": __version__,
                    "completed_before": len(self._done),
                    "ignored_args": {k: norm[k] for k in sorted(norm) if k in IGNORED_ARG_KEYS},
                }
            )
            _write_json(self.run_path, run)
        except OSError as err:
            self.close()
            raise ResultsError(f"cannot write the results folder {self.path}: {err}") from err
        except BaseException:
            self.close()
            raise
        self._may_be_consolidated = True
        return self

    def check(self, args: dict[str, Any], resume: bool = True) -> None:
        """What :meth:`open` checks before writing, writing nothing (call it early, before
        loading a model): the folder is absent, empty or a results folder
        (:func:`~causalnet.hydra.folder.check_out_folder`), and a run already there is resumed
        with equal arguments. Raises ResultsError naming the folder and what is wrong."""
        norm = normalise_args(args)
        if check_out_folder(self.path):
            if not resume:
                raise ResultsError(
                    f"{self.path} already holds a run (run.json); resume it or use another folder"
                )
            compare_args(self.path, self.load_run()["args"], norm)

    def _open_run(self, args: dict[str, Any], resume: bool) -> dict[str, Any]:
        """Under the lock: check again (another process may have written meanwhile)."""
        self.check(args, resume)
        if not self.run_path.exists():
            if self.shards.exists() and any(self.shards.iterdir()):
                raise ResultsError(
                    f"{self.path} has shards/ but no run.json; it is not a results folder this "
                    "library can resume"
                )
            self.shards.mkdir(exist_ok=True)
            return {"format": RUN_FORMAT, "args": args, "created_at": _now(), "sessions": []}
        run = self.load_run()
        has_consolidated = any((self.path / f"{t}.parquet").exists() for t in TABLES)
        if has_consolidated and not self.shards.is_dir():
            raise ResultsError(
                f"{self.path}: shards/ was removed after consolidation; the run cannot be resumed"
            )
        self.shards.mkdir(exist_ok=True)
        return run

    def _acquire_lock(self) -> None:
        """Take the folder's OS lock (:class:`~causalnet.hydra.folder.FolderLock`). Another
        process holding it is an error; an earlier store object of this process (e.g. left open
        by an exception) is closed and replaced."""
        if self._lock.held:
            return
        key = self.path.resolve()
        earlier = _HELD.get(key)
        if earlier is not None and earlier is not self:
            earlier.close()
        self._lock.acquire()
        _HELD[key] = self

    def close(self) -> None:
        """Release the folder's lock (idempotent). Nothing is lost: shards are already on disk."""
        if self._lock.held:
            self._lock.release()
            key = self.path.resolve()
            if _HELD.get(key) is self:
                del _HELD[key]

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self) -> None:
        if not self._lock.held:
            raise ResultsError(f"{self.path}: call open(args) before writing")

    def _scan_completed(self) -> list[PromptId]:
        ids = scan_completed(self.shards)
        if ids:
            self._id_type = type(ids[0])
        return ids

    def completed_ids(self) -> frozenset[PromptId]:
        """Ids of the prompts whose rows are on disk (read from shard names when not open)."""
        if not self._lock.held:
            return frozenset(self._scan_completed()) if self.shards.is_dir() else frozenset()
        return frozenset(self._done)

    def write_prompt(
        self,
        prompt_id: PromptId,
        effects_rows: pd.DataFrame,
        readouts_rows: pd.DataFrame,
        patches_rows: pd.DataFrame | None = None,
        patch_effects_rows: pd.DataFrame | None = None,
    ) -> None:
        """Write one finished prompt's rows atomically (see the module doc for kill safety).

        Each frame has exactly the columns of its table (``prompt_id`` may be left out; when
        present it must equal ``prompt_id``). Rows are validated (site names, kinds consistent
        with ``site``, finite floats, no duplicate keys), cast to the table's column types and
        sorted. ``patches_rows`` (per-patch readouts, Figure 1) is optional: give it for the
        prompts whose patches should be kept; so is ``patch_effects_rows`` (per-patch effects).
        Effects rows without the five repair columns are written in the older effects schema,
        only into a folder that holds no effects with them (and the other way round); a folder
        never mixes the two. ``sources`` may be a list per row (joined with
        ","); ``source_id`` is stored as a string. Raises ResultsError if the prompt is already
        complete or the rows are malformed.
        """
        self._require_open()
        if isinstance(prompt_id, np.integer):
            prompt_id = int(prompt_id)
        encode_prompt_id(prompt_id)  # ResultsError now for an id that cannot name a shard
        if self._id_type is not None and not isinstance(prompt_id, self._id_type):
            raise ResultsError(
                f"prompt id {prompt_id!r} is a {type(prompt_id).__name__}, but this folder's ids "
                f"are {self._id_type.__name__}s"
            )
        if prompt_id in self._done:
            raise ResultsError(f"{self.path}: prompt {prompt_id!r} is already complete")
        tables = {
            "effects": effects_rows,
            "readouts": readouts_rows,
            "patches": patches_rows,
            "patch_effects": patch_effects_rows,
        }
        arrow = {
            name: to_arrow(TABLES[name], frame, prompt_id)
            for name, frame in tables.items()
            if frame is not None
        }
        self._check_variant(arrow["effects"], type(prompt_id))
        if self._may_be_consolidated:
            self._invalidate_consolidated()
        for name in ("patches", "patch_effects", "readouts", "effects"):  # effects: the mark
            if name in arrow:
                shard = shard_path(self.shards, prompt_id, name)
                atomic_write(shard, lambda tmp, t=arrow[name]: write_parquet(t, tmp))
        self._done.add(prompt_id)
        self._id_type = type(prompt_id)

    def _check_variant(self, effects: pa.Table, id_type: type) -> None:
        """ResultsError unless ``effects`` has the same columns (with or without the repair
        split) as the effects already in the folder."""
        table = TABLES["effects"]
        legacy = table.is_legacy(effects.schema, id_type)
        if self._legacy is None and self._done:
            pid = next(iter(self._done))
            stored = read_schema(shard_path(self.shards, pid, "effects"))
            self._legacy = table.is_legacy(stored, type(pid))
        if self._legacy is not None and legacy != self._legacy:
            raise ResultsError(
                f"{self.path} holds effects "
                + ("without" if self._legacy else "with")
                + " the repair columns (written by "
                + ("an older" if self._legacy else "a newer")
                + " causalnet); its results cannot be mixed with these: start a new --out folder"
            )
        self._legacy = legacy

    def _invalidate_consolidated(self) -> None:
        """Before the first new shard after a consolidation: remove the consolidated tables
        (they would miss the new prompt) and the finalize record of run.json."""
        for name in TABLES:
            (self.path / f"{name}.parquet").unlink(missing_ok=True)
        run = self.load_run()
        if any(k in run for k in _FINALIZE_KEYS):
            _write_json(self.run_path, {k: v for k, v in run.items() if k not in _FINALIZE_KEYS})
        self._may_be_consolidated = False

    def consolidate(self) -> dict[str, Path]:
        """Write ``effects.parquet``, ``readouts.parquet`` (and ``patches.parquet`` when any
        prompt kept patches) from the shards, atomically; returns the paths written.

        Works on demand: without :meth:`open`, it takes the folder's lock for its duration
        (ResultsError while a sweep is writing the folder). Raises ResultsError when there are
        no completed prompts, when a shard is unreadable or holds another prompt's rows, or when
        rows are duplicated.
        """
        if not self._lock.held:
            check_results_folder(self.path)
            self._acquire_lock()
            try:
                return self._consolidate()
            finally:
                self.close()
        written = self._consolidate()
        self._may_be_consolidated = True
        return written

    def _consolidate(self) -> dict[str, Path]:
        ids = self._sorted_ids()
        written = {}
        for name, table in TABLES.items():
            target = self.path / f"{name}.parquet"
            present = [i for i in ids if shard_path(self.shards, i, name).exists()]
            if table.optional and not present:
                target.unlink(missing_ok=True)
                continue
            schema = shard_schema(self.shards, present[0] if present else ids[0], name)
            write_consolidated(target, schema, iter_shards(self.shards, ids, name))
            written[name] = target
        return written

    def finalize(self, extra_run_info: dict[str, Any] | None = None) -> dict[str, Path]:
        """Consolidate the shards, record ``finalized_at``, ``n_prompts`` and ``extra_run_info``
        (timings, counts) in run.json (atomically), and release the lock. Returns the paths of
        the consolidated tables. Shards are kept, so a later resume or re-finalize works."""
        self._require_open()
        try:
            written = self.consolidate()
            run = self.load_run()
            run["finalized_at"] = _now()
            run["n_prompts"] = len(self._done)
            run["info"] = normalise_args(dict(extra_run_info or {}))
            _write_json(self.run_path, run)
        finally:
            self.close()
        return written
