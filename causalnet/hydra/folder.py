"""Guards of a results folder: what may be written into, read as, and locked as one.

:class:`~causalnet.hydra.store.ResultsStore` calls these before it touches a folder:

- :func:`check_out_folder` (before writing): the folder is absent, empty, or a causalnet results
  folder (its ``run.json`` written by this library); its nearest existing ancestor is a folder
  the process may write. A folder holding anything else (``--out .``, a home folder, another
  tool's output) is refused, so a sweep never deletes or overwrites files it did not write.
- :func:`check_results_folder` (before reading): the folder exists and holds our ``run.json``.
- :func:`compare_args` (before resuming): the run's arguments equal those stored in its
  ``run.json``, but for :data:`IGNORED_ARG_KEYS` (software versions and timing).
- :class:`FolderLock`: the folder's exclusive lock, ``filelock.FileLock`` on ``<folder>/.lock``:
  an OS lock (``flock`` on POSIX, ``LockFileEx`` via ``msvcrt.locking`` on Windows) that the
  kernel releases when the holding process dies, even by SIGKILL, so a killed sweep never
  blocks the next run. ``filelock.SoftFileLock`` (a marker file) is never used: a killed
  holder would leave its marker behind. On a filesystem without OS locks the store refuses to
  write rather than write unguarded.

Every refusal is a :class:`~causalnet.errors.ResultsError` naming the folder and the reason.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path
from typing import Any

import filelock

from ..errors import ResultsError

#: The ``format`` value of the run.json files this library writes.
RUN_FORMAT = 1

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

#: Entries a first :meth:`ResultsStore.open` leaves when killed before run.json lands: the
#: lock file, the empty shards folder, and run.json's temporary file.
_FIRST_OPEN_LEFTOVERS = re.compile(r"^(\.lock|shards|\.run\.json\.\d+\.[0-9a-f]+\.tmp)$")

#: filelock >= 4 falls back to a marker file on filesystems without flock unless told not to.
_NO_SOFT_FALLBACK = (
    {"fallback_to_soft": False}
    if "fallback_to_soft" in inspect.signature(filelock.FileLock.__init__).parameters
    else {}
)


def _entries(path: Path, limit: int = 5) -> str:
    names = sorted(os.listdir(path))
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def read_run_json(run_path: Path) -> dict[str, Any]:
    """The contents of a results folder's run.json; ResultsError when absent or not ours."""
    try:
        data = json.loads(run_path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ResultsError(f"{run_path} not found: not a results folder") from err
    except (OSError, ValueError) as err:
        raise ResultsError(f"{run_path} is unreadable: {err}") from err
    if not isinstance(data, dict):
        raise ResultsError(f"{run_path} does not hold a JSON object")
    if data.get("format") != RUN_FORMAT or not isinstance(data.get("args"), dict):
        raise ResultsError(
            f"{run_path} was not written by causalnet (expected a JSON object with "
            f'"format": {RUN_FORMAT} and an "args" object): not a results folder'
        )
    return data


def check_results_folder(path: Path) -> None:
    """Raise ResultsError unless ``path`` is a results folder this library wrote."""
    if not path.exists():
        raise ResultsError(f"{path}: no such results folder")
    if not path.is_dir():
        raise ResultsError(f"{path} is a file, not a results folder")
    if not (path / "run.json").exists():
        content = _entries(path) or "nothing"
        raise ResultsError(
            f"{path} is not a causalnet results folder (no run.json); it holds {content}"
        )
    read_run_json(path / "run.json")


def check_out_folder(path: Path) -> bool:
    """Check, writing nothing, that a sweep may write into ``path``; return whether it holds a
    run (our run.json) already.

    Allowed: an absent folder whose nearest existing ancestor is a writable folder, an empty
    writable folder, a writable results folder, or the leftovers of a first open killed before
    its run.json landed. Anything else raises ResultsError naming the folder and its content.
    """
    if not path.exists():
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise ResultsError(f"cannot create the results folder {path}: {ancestor} is a file")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ResultsError(
                f"cannot create the results folder {path}: {ancestor} is not writable"
            )
        return False
    if not path.is_dir():
        raise ResultsError(f"{path} is a file, not a results folder; give a folder")
    has_run = (path / "run.json").exists()
    if has_run:
        read_run_json(path / "run.json")
    else:
        foreign = [n for n in os.listdir(path) if not _FIRST_OPEN_LEFTOVERS.match(n)]
        if foreign:
            raise ResultsError(
                f"{path} is not empty and not a causalnet results folder (no run.json); it "
                f"holds {_entries(path)}. Give a new or empty folder: a sweep would delete and "
                "overwrite files there"
            )
    if not os.access(path, os.W_OK | os.X_OK):
        raise ResultsError(f"results folder {path} is not writable")
    return has_run


class FolderLock:
    """The exclusive OS lock on ``<folder>/.lock`` (see the module doc); not re-entrant."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".lock"
        self._lock: filelock.BaseFileLock | None = None

    @property
    def held(self) -> bool:
        return self._lock is not None

    def acquire(self) -> None:
        """Take the lock without waiting; ResultsError when another holder has it."""
        if self._lock is not None:
            return
        if not issubclass(filelock.FileLock, filelock.UnixFileLock | filelock.WindowsFileLock):
            raise ResultsError(
                f"{self.path}: this platform has no OS file lock (filelock offers only a "
                "marker-file lock, which a killed process would leave behind)"
            )
        # thread_local=False: the lock belongs to the store object, whichever thread releases
        lock = filelock.FileLock(str(self.path), thread_local=False, **_NO_SOFT_FALLBACK)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout as err:
            raise ResultsError(
                f"{self.path.parent} is being written by another process (lock {self.path})"
            ) from err
        except (OSError, NotImplementedError) as err:  # no flock on this filesystem, EACCES
            raise ResultsError(f"cannot lock the results folder ({self.path}): {err}") from err
        self._lock = lock

    def release(self) -> None:
        """Release the lock (idempotent). The lock file stays: waiters share its inode."""
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.release(force=True)


def normalise_args(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` as JSON will store it (a fresh copy); ResultsError unless JSON-serialisable."""
    if not isinstance(args, dict):
        raise ResultsError(f"run arguments must be a dict, got {type(args).__name__}")
    try:
        return json.loads(json.dumps(args, sort_keys=True))
    except (TypeError, ValueError) as err:
        raise ResultsError(f"run arguments are not JSON-serialisable: {err}") from err


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def compare_args(path: Path, stored: dict[str, Any], args: dict[str, Any]) -> None:
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
