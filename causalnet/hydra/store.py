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

**Tables** (all effects in centred logits of the target token i,
the argmax of the clean logits at the last position, Eqs 9, 10):

- ``effects`` (per prompt and ablated site k): ``prompt_id`` (int64 or string), ``site``
  (``embed``, ``attn.l``, ``mlp.l``, ``attn.l.hH``), ``kind`` (``embed|attn|head|mlp``),
  ``layer`` (int64, -1 for embed), ``head`` (int64, -1 unless a head), ``target_token``
  (int64), ``target_str``, ``target_is_true`` (bool: i is the first token of " " + the true
  attribute), ``direct_effect`` (k's clean Delta_unembed, Eq 10), ``total_effect``
  (Delta_ablate, Eq 12, mean over patches, Eq 39), ``total_effect_std`` (over patches),
  ``direct_effect_ablated_self`` (k's own direct effect in its ablated runs, Eq 13, mean),
  ``compensatory_effect`` (CE, Eq 33, mean), ``compensatory_attn``, ``compensatory_mlp`` (its
  attention and MLP parts), ``delta_de_upstream`` (sum of Delta_DE, Eq 34, over the embedding
  and the non-downstream sites), ``clean_centred_logit``, ``sources`` (the patches' source
  prompt ids joined with ","; empty without resampling); the repair split
  (``docs/conventions.md``, "The repair, split"; means over patches): ``repair_attn``,
  ``repair_mlp`` (value parts of the downstream attention / MLP sites), ``repair_norm`` (scale
  parts of every site but k), ``repair_sibling`` (value parts of k's non-downstream siblings;
  0 to rounding but under a norm after the attention), ``total_effect_sigma_clean`` (the total
  effect at the clean final scale, do(sigma = clean)). All floats float64. Folders written
  before the repair split lack these five columns (all or none; one folder never mixes the two).
- ``readouts`` (per prompt, ablated site and readout site l): ``prompt_id``, ``ablated_site``,
  ``readout_site``, ``direct_effect_clean`` (Eq 10), ``direct_effect_ablated`` (Eq 13, mean
  over patches), ``delta_de`` (Eq 34, mean over patches).
- ``patches`` (optional, per prompt, ablated site, patch and readout site): ``prompt_id``,
  ``ablated_site``, ``patch`` (int64, 0-based), ``source_id`` (string, null when none),
  ``readout_site``, ``direct_effect_ablated`` (Eq 13, that patch's run).
- ``patch_effects`` (optional, per prompt, ablated site and patch): ``prompt_id``, ``site``,
  ``patch``, ``source_id``, ``total_effect``, ``direct_effect_ablated_self``, the five repair
  columns of ``effects`` for that patch's run, ``sigma_ratio`` (sigma' / sigma).

``<key>`` encodes the prompt id reversibly: ``i<int>`` for an int id, ``s<base64url of the
UTF-8 string>`` for a str id, so the completed ids are read from file names alone.

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

import base64
import binascii
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__
from ..errors import ResultsError, UnknownNodeError
from ..sites import parse_site
from .folder import (
    RUN_FORMAT,
    FolderLock,
    check_out_folder,
    check_results_folder,
    read_run_json,
)

PromptId = int | str

#: Argument keys that may differ between the sessions of one results folder: software versions
#: and timing. Everything else in ``args`` must match exactly on resume.
IGNORED_ARG_KEYS = frozenset(
    {
        "library_version",
        "torch_version",
        "transformers_version",
        "numpy_version",
        "python_version",
        "started_at",
        "finished_at",
        "timing",
    }
)

_FLOAT = pa.float64()
_INT = pa.int64()
_STR = pa.string()


def _fields(prompt_id_type: pa.DataType, spec: list[tuple[str, pa.DataType]]) -> pa.Schema:
    return pa.schema(
        [pa.field("prompt_id", prompt_id_type, nullable=False)]
        + [pa.field(name, t, nullable=(name == "source_id")) for name, t in spec]
    )


_EFFECTS_SPEC = [
    ("site", _STR),
    ("kind", _STR),
    ("layer", _INT),
    ("head", _INT),
    ("target_token", _INT),
    ("target_str", _STR),
    ("target_is_true", pa.bool_()),
    ("direct_effect", _FLOAT),
    ("total_effect", _FLOAT),
    ("total_effect_std", _FLOAT),
    ("direct_effect_ablated_self", _FLOAT),
    ("compensatory_effect", _FLOAT),
    ("compensatory_attn", _FLOAT),
    ("compensatory_mlp", _FLOAT),
    ("delta_de_upstream", _FLOAT),
    ("clean_centred_logit", _FLOAT),
    ("sources", _STR),
]
#: The effects columns added with the repair split (absent, all five, from older folders).
REPAIR_COLUMNS = (
    "repair_attn",
    "repair_mlp",
    "repair_norm",
    "repair_sibling",
    "total_effect_sigma_clean",
)
_EFFECTS_SPEC += [(name, _FLOAT) for name in REPAIR_COLUMNS]
_READOUTS_SPEC = [
    ("ablated_site", _STR),
    ("readout_site", _STR),
    ("direct_effect_clean", _FLOAT),
    ("direct_effect_ablated", _FLOAT),
    ("delta_de", _FLOAT),
]
_PATCHES_SPEC = [
    ("ablated_site", _STR),
    ("patch", _INT),
    ("source_id", _STR),
    ("readout_site", _STR),
    ("direct_effect_ablated", _FLOAT),
]
_PATCH_EFFECTS_SPEC = [
    ("site", _STR),
    ("patch", _INT),
    ("source_id", _STR),
    ("total_effect", _FLOAT),
    ("direct_effect_ablated_self", _FLOAT),
    *[(name, _FLOAT) for name in REPAIR_COLUMNS],
    ("sigma_ratio", _FLOAT),
]

#: Column types of the three tables, for int prompt ids (str ids: ``prompt_id`` is a string).
EFFECTS_SCHEMA = _fields(_INT, _EFFECTS_SPEC)
READOUTS_SCHEMA = _fields(_INT, _READOUTS_SPEC)
PATCHES_SCHEMA = _fields(_INT, _PATCHES_SPEC)
PATCH_EFFECTS_SCHEMA = _fields(_INT, _PATCH_EFFECTS_SPEC)


@dataclass(frozen=True)
class _Table:
    name: str
    spec: list[tuple[str, pa.DataType]]
    sites: tuple[str, ...]  # columns holding site names, in sort order
    key: tuple[str, ...]  # columns that identify a row within a prompt
    optional: bool = False  # a prompt may have no shard of this table
    legacy: tuple[str, ...] = ()  # columns that older folders lack (all of them)

    def spec_of(self, legacy: bool) -> list[tuple[str, pa.DataType]]:
        return [f for f in self.spec if f[0] not in self.legacy] if legacy else self.spec

    def schema(self, id_type: type, legacy: bool = False) -> pa.Schema:
        return _fields(_INT if id_type is int else _STR, self.spec_of(legacy))

    def is_legacy(self, schema: pa.Schema, id_type: type) -> bool:
        """Whether a shard's schema is this table's older one; ResultsError if neither."""
        for legacy in (False, True) if self.legacy else (False,):
            if schema.equals(self.schema(id_type, legacy)):
                return legacy
        raise ResultsError(f"columns {schema} are not the {self.name} table's")


_TABLES = {
    "effects": _Table("effects", _EFFECTS_SPEC, ("site",), ("site",), legacy=REPAIR_COLUMNS),
    "readouts": _Table(
        "readouts",
        _READOUTS_SPEC,
        ("ablated_site", "readout_site"),
        ("ablated_site", "readout_site"),
    ),
    "patches": _Table(
        "patches",
        _PATCHES_SPEC,
        ("ablated_site", "readout_site"),
        ("ablated_site", "patch", "readout_site"),
        optional=True,
    ),
    "patch_effects": _Table(
        "patch_effects", _PATCH_EFFECTS_SPEC, ("site",), ("site", "patch"), optional=True
    ),
}

_ROW_GROUP_ROWS = 1 << 17
_COMPRESSION = "zstd"

_FINALIZE_KEYS = ("finalized_at", "n_prompts", "info")

#: The temporary files :func:`_atomic_write` makes: ``.<name>.<pid>.<hex>.tmp``.
_TMP_NAME = re.compile(r"^\..+\.\d+\.[0-9a-f]+\.tmp$")

_INT64 = (-(2**63), 2**63 - 1)

#: The store object of this process that holds each folder's lock (by resolved path).
_HELD: dict[Path, ResultsStore] = {}


def site_sort_key(name: str) -> tuple[int, int, int]:
    """Residual order of a site: ``embed``, then per layer ``attn.l``, its heads, ``mlp.l``."""
    site = parse_site(name)
    rank = {"embed": 0, "attn": 0, "head": 1, "mlp": 2}[site.kind]
    return (site.layer, rank, site.head)


def encode_prompt_id(prompt_id: PromptId) -> str:
    """The file-name key of a prompt id (``i<int>`` or ``s<base64url>``); see the module doc."""
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, int | str):
        raise ResultsError(f"prompt id {prompt_id!r} must be an int or a str")
    if isinstance(prompt_id, int):
        if not _INT64[0] <= prompt_id <= _INT64[1]:
            raise ResultsError(f"prompt id {prompt_id} does not fit the int64 prompt_id column")
        return f"i{prompt_id}"
    try:
        raw = prompt_id.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ResultsError(
            f"prompt id {prompt_id!r} is not valid Unicode text (a lone surrogate at "
            f"character {err.start}); it cannot be stored"
        ) from err
    key = "s" + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")
    if len(key) > 200:
        raise ResultsError(f"prompt id {prompt_id[:40]!r}... is too long for a shard file name")
    return key


def decode_prompt_id(key: str) -> PromptId:
    """Inverse of :func:`encode_prompt_id`; ResultsError for a key it did not write."""
    try:
        if key.startswith("i"):
            return int(key[1:])
        if key.startswith("s"):
            raw = key[1:] + "=" * (-len(key[1:]) % 4)
            return base64.urlsafe_b64decode(raw.encode("ascii")).decode("utf-8")
    except (ValueError, binascii.Error, UnicodeError) as err:
        raise ResultsError(f"shard key {key!r} does not encode a prompt id: {err}") from err
    raise ResultsError(f"shard key {key!r} does not encode a prompt id")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _compare_args(path: Path, stored: dict[str, Any], args: dict[str, Any]) -> None:
    """ResultsError listing every key (outside IGNORED_ARG_KEYS) whose value differs."""
    keys = sorted((set(stored) | set(args)) - IGNORED_ARG_KEYS)
    differ = [k for k in keys if stored.get(k, "<absent>") != args.get(k, "<absent>")]
    if not differ:
        return
    detail = "; ".join(
        f"{k}: stored {_short(stored.get(k, '<absent>'))}, now {_short(args.get(k, '<absent>'))}"
        for k in differ
    )
    changed = [k for k in differ if k.endswith("_fingerprint")]
    inputs = (
        f" The inputs behind {', '.join(changed)} changed since the folder was written."
        if changed
        else ""
    )
    raise ResultsError(
        f"{path} was written with different arguments ({detail}).{inputs} Its results cannot "
        "be mixed with this run's: resume with the arguments and inputs it was written with, "
        "or write this run to a new results folder (another --out)"
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a hidden temporary file beside ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _normalise_args(args: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(args, dict):
        raise ResultsError(f"run arguments must be a dict, got {type(args).__name__}")
    try:
        return json.loads(json.dumps(args, sort_keys=True))
    except (TypeError, ValueError) as err:
        raise ResultsError(f"run arguments are not JSON-serialisable: {err}") from err


class ResultsStore:
    """A results folder (see the module docstring for the layout and the guarantees).

    Writing: ``open(args)``, then ``write_prompt(...)`` per finished prompt (skipping
    ``completed_ids()``), then ``finalize(info)``. Reading: ``load_effects()``,
    ``load_readouts()``, ``load_patches()``, ``load_run()`` (no ``open`` needed). Also a context
    manager that releases the folder's lock on exit.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.run_path = self.path / "run.json"
        self.shards = self.path / "shards"
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
        norm = _normalise_args(args)
        self.check(norm, resume)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ResultsError(f"cannot create the results folder {self.path}: {err}") from err
        self._acquire_lock()
        try:
            run = self._open_run(norm, resume)
            self._clean_leftovers()
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
        norm = _normalise_args(args)
        if check_out_folder(self.path):
            if not resume:
                raise ResultsError(
                    f"{self.path} already holds a run (run.json); resume it or use another folder"
                )
            _compare_args(self.path, self.load_run()["args"], norm)

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
        has_consolidated = any((self.path / f"{t}.parquet").exists() for t in _TABLES)
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

    def _clean_leftovers(self) -> None:
        for folder in (self.path, self.shards):
            for tmp in folder.glob(".*.tmp"):
                if _TMP_NAME.match(tmp.name):
                    tmp.unlink()
        complete = {p.name.split(".")[0] for p in self.shards.glob("*.effects.parquet")}
        for table in ("readouts", "patches", "patch_effects"):
            for shard in self.shards.glob(f"*.{table}.parquet"):
                if shard.name.split(".")[0] not in complete:
                    shard.unlink()

    def _scan_completed(self) -> list[PromptId]:
        ids = [
            decode_prompt_id(p.name.split(".")[0])
            for p in self.shards.glob("*.effects.parquet")
            if not p.name.startswith(".")
        ]
        types = {type(i) for i in ids}
        if len(types) > 1:
            raise ResultsError(f"{self.shards} mixes int and str prompt ids")
        self._id_type = types.pop() if types else self._id_type
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
        key = encode_prompt_id(prompt_id)
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
            name: _to_arrow(_TABLES[name], frame, prompt_id)
            for name, frame in tables.items()
            if frame is not None
        }
        self._check_variant(arrow["effects"], type(prompt_id))
        if self._may_be_consolidated:
            self._invalidate_consolidated()
        for name in ("patches", "patch_effects", "readouts", "effects"):  # effects: the mark
            if name in arrow:
                shard = self.shards / f"{key}.{name}.parquet"
                _atomic_write(shard, lambda tmp, t=arrow[name]: _write_parquet(t, tmp))
        self._done.add(prompt_id)
        self._id_type = type(prompt_id)

    def _check_variant(self, effects: pa.Table, id_type: type) -> None:
        """ResultsError unless ``effects`` has the same columns (with or without the repair
        split) as the effects already in the folder."""
        table = _TABLES["effects"]
        legacy = table.is_legacy(effects.schema, id_type)
        if self._legacy is None and self._done:
            pid = next(iter(self._done))
            try:
                stored = pq.read_schema(self._shard(pid, "effects"))
            except (OSError, pa.ArrowException) as err:
                raise ResultsError(f"{self._shard(pid, 'effects')} is unreadable: {err}") from err
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
        for name in _TABLES:
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
        for name, table in _TABLES.items():
            target = self.path / f"{name}.parquet"
            present = [i for i in ids if self._shard(i, name).exists()]
            if table.optional and not present:
                target.unlink(missing_ok=True)
                continue
            schema = self._shard_schema(present[0] if present else ids[0], name)

            def write(tmp: Path, name: str = name, schema: pa.Schema = schema) -> None:
                with pq.ParquetWriter(tmp, schema, compression=_COMPRESSION) as writer:
                    for chunk in _row_groups(self._iter_shards(ids, name)):
                        writer.write_table(chunk, row_group_size=_ROW_GROUP_ROWS)

            _atomic_write(target, write)
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
            run["info"] = _normalise_args(dict(extra_run_info or {}))
            _write_json(self.run_path, run)
        finally:
            self.close()
        return written

    # ---- reading ---------------------------------------------------------------------------
    def load_run(self) -> dict[str, Any]:
        """The contents of run.json (ResultsError when absent or not written by causalnet)."""
        return read_run_json(self.run_path)

    def load_effects(self) -> pd.DataFrame:
        """The effects table: one row per prompt and ablated site (module doc for columns)."""
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
        return [i for i in self._sorted_ids() if self._shard(i, "patches").exists()]

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
            return (table.schema.empty_table() if wanted == set() else table).to_pandas()
        ids = self._sorted_ids()
        schema = self._shard_schema(ids[0], name)
        if wanted is not None:
            ids = [i for i in ids if i in wanted]
        tables = list(self._iter_shards(ids, name))
        return pa.concat_tables(tables).to_pandas() if tables else schema.empty_table().to_pandas()

    # ---- shards ----------------------------------------------------------------------------
    def _sorted_ids(self) -> list[PromptId]:
        if not self.shards.is_dir():
            raise ResultsError(f"{self.path}: no results (no shards/ folder)")
        ids = sorted(self._scan_completed())
        if not ids:
            raise ResultsError(f"{self.path}: no completed prompts yet")
        return ids

    def _shard(self, prompt_id: PromptId, name: str) -> Path:
        return self.shards / f"{encode_prompt_id(prompt_id)}.{name}.parquet"

    def _shard_schema(self, prompt_id: PromptId, name: str) -> pa.Schema:
        """The schema of table ``name`` in this folder: the current one, or the older one when
        the shard of ``prompt_id`` has it (checked again for every shard read)."""
        table, path = _TABLES[name], self._shard(prompt_id, name)
        if not table.legacy or not path.exists():
            return table.schema(type(prompt_id))
        try:
            stored = pq.read_schema(path)
        except (OSError, pa.ArrowException) as err:
            raise ResultsError(f"{path} is unreadable: {err}") from err
        return table.schema(type(prompt_id), table.is_legacy(stored, type(prompt_id)))

    def _iter_shards(self, ids: list[PromptId], name: str) -> Iterator[pa.Table]:
        """Each completed prompt's shard of table ``name``, checked, in sorted-id order.

        Every completed prompt has effects and readouts shards; patches and patch_effects
        shards are optional. All shards must have one schema (an effects table with or without
        the repair columns, never both).
        """
        table = _TABLES[name]
        expected: pa.Schema | None = None
        for pid in ids:
            path = self._shard(pid, name)
            if table.optional and not path.exists():
                continue
            try:
                shard = pq.read_table(path)
            except FileNotFoundError as err:
                raise ResultsError(
                    f"{path} is missing although prompt {pid!r} is complete"
                ) from err
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
            _check_duplicates(table, shard.to_pandas(), str(path))
            yield shard


# ---- rows ---------------------------------------------------------------------------------


def _to_arrow(table: _Table, frame: pd.DataFrame, prompt_id: PromptId) -> pa.Table:
    """Validate one prompt's rows of ``table``, sort them, and cast them to the table's schema."""
    where = f"prompt {prompt_id!r}, {table.name} rows"
    if not isinstance(frame, pd.DataFrame):
        raise ResultsError(f"{where}: expected a pandas DataFrame, got {type(frame).__name__}")
    if len(frame) == 0:
        raise ResultsError(f"{where}: no rows")
    frame = frame.reset_index(drop=True)
    if "prompt_id" in frame.columns:
        ids = pd.unique(frame["prompt_id"])
        if len(ids) != 1 or ids[0] != prompt_id or isinstance(ids[0], bool | np.bool_):
            raise ResultsError(
                f"{where}: column prompt_id holds {pd.Series(ids).tolist()[:5]}, not {prompt_id!r}"
            )
    legacy = bool(table.legacy) and not any(c in frame.columns for c in table.legacy)
    spec = table.spec_of(legacy)
    wanted = [name for name, _ in spec]
    missing = [c for c in wanted if c not in frame.columns]
    extra = [c for c in frame.columns if c not in wanted and c != "prompt_id"]
    if missing or extra:
        raise ResultsError(f"{where}: missing columns {missing}, unexpected columns {extra}")
    frame = frame[wanted].copy()
    frame.insert(0, "prompt_id", [prompt_id] * len(frame))
    for col in table.sites:
        for name in pd.unique(frame[col]):
            if not isinstance(name, str):
                raise ResultsError(f"{where}: column {col} holds {name!r}, not a site name")
            try:
                parse_site(name)
            except UnknownNodeError as err:
                raise ResultsError(f"{where}: column {col}: {err}") from err
    if table.name == "effects":
        _check_effects_sites(frame, where)
        frame["sources"] = [
            ",".join(str(s) for s in v) if isinstance(v, list | tuple | np.ndarray) else v
            for v in frame["sources"]
        ]
    if table.name in ("patches", "patch_effects"):
        frame["source_id"] = [None if _is_missing(v) else str(v) for v in frame["source_id"]]
    _check_duplicates(table, frame, where)
    sort_cols = []
    for col in table.key:
        if col in table.sites:
            order = {s: site_sort_key(s) for s in pd.unique(frame[col])}
            ranked = sorted(order, key=order.__getitem__)
            frame[f"_{col}_rank"] = frame[col].map({s: i for i, s in enumerate(ranked)})
            sort_cols.append(f"_{col}_rank")
        else:
            sort_cols.append(col)
    frame = frame.sort_values(sort_cols, kind="stable").drop(
        columns=[c for c in sort_cols if c.startswith("_")]
    )
    for name, dtype in spec:
        if dtype == _FLOAT:
            try:
                values = np.asarray(frame[name], dtype=np.float64)
            except (TypeError, ValueError) as err:
                raise ResultsError(f"{where}: column {name} is not numeric: {err}") from err
            if not np.isfinite(values).all():
                bad = frame.iloc[int(np.flatnonzero(~np.isfinite(values))[0])]
                raise ResultsError(
                    f"{where}: column {name} is not finite at "
                    + ", ".join(f"{c}={bad[c]!r}" for c in table.key)
                )
    schema = table.schema(type(prompt_id), legacy)
    try:
        arrow = pa.Table.from_pandas(frame, schema=schema, preserve_index=False, safe=True)
    except (pa.ArrowException, TypeError, ValueError) as err:
        raise ResultsError(f"{where}: values do not fit the column types: {err}") from err
    arrow = arrow.replace_schema_metadata(None)
    return arrow


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA


def _check_effects_sites(frame: pd.DataFrame, where: str) -> None:
    for row in frame[["site", "kind", "layer", "head"]].drop_duplicates().itertuples():
        site = parse_site(row.site)
        if (row.kind, row.layer, row.head) != (site.kind, site.layer, site.head):
            raise ResultsError(
                f"{where}: site {row.site!r} has kind/layer/head {row.kind!r}/{row.layer}/"
                f"{row.head}, expected {site.kind!r}/{site.layer}/{site.head}"
            )


def _check_duplicates(table: _Table, frame: pd.DataFrame, where: str) -> None:
    dup = frame.duplicated(list(table.key), keep=False)
    if dup.any():
        first = frame.loc[dup, list(table.key)].iloc[0].to_dict()
        raise ResultsError(f"{where}: {int(dup.sum())} duplicate {table.name} rows, e.g. {first}")


def _write_parquet(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression=_COMPRESSION)


def _row_groups(tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """Concatenate consecutive tables into chunks of at least _ROW_GROUP_ROWS rows."""
    pending: list[pa.Table] = []
    rows = 0
    for t in tables:
        pending.append(t)
        rows += t.num_rows
        if rows >= _ROW_GROUP_ROWS:
            yield pa.concat_tables(pending)
            pending, rows = [], 0
    if pending:
        yield pa.concat_tables(pending)
