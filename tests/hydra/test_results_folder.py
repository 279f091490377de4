"""Whose folder a sweep may write: the OS lock, foreign folders, files and read-only places.

Every refusal is a ResultsError naming the folder; a refused folder is left byte-for-byte as it
was (no .lock, no run.json, no shards/ added, nothing deleted).
"""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from causalnet.cli import main
from causalnet.errors import ResultsError
from causalnet.hydra.store import ResultsStore

ARGS = {"model": "tiny", "prompts": "p.json", "k": 2, "seed": 0, "library_version": "0.1.0"}


@pytest.fixture(scope="module")
def prompts(synth):
    return synth.prompts(n_prompts=4, n_layers=2, n_patches=2, seed=3)


def _write(store, prompts, ids):
    for pid in ids:
        store.write_prompt(pid, prompts[pid]["effects"], prompts[pid]["readouts"])


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under folder (hidden ones too): file bytes, None for a folder."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


# ---- the lock -------------------------------------------------------------------------------

_HOLDER = textwrap.dedent(
    """
    import json, sys, time
    from causalnet.hydra.store import ResultsStore
    from tests.hydra.conftest import synthetic_prompts
    prompts = synthetic_prompts(n_prompts=4, n_layers=2, n_patches=2, seed=3)
    store = ResultsStore(sys.argv[1]).open(json.loads(sys.argv[2]))
    for pid in (0, 1):
        store.write_prompt(pid, prompts[pid]["effects"], prompts[pid]["readouts"])
    print("holding", flush=True)
    time.sleep(120)
    """
)


def _assert_os_locked(lock_file: Path) -> None:
    """The holder's lock is a kernel lock on the file (flock), not a marker file's existence."""
    fcntl = pytest.importorskip("fcntl")
    fd = os.open(lock_file, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_a_second_writer_is_refused_and_a_sigkilled_holder_does_not_block_the_resume(
    tmp_path, prompts
):
    """The lock is an OS lock: refused while the holder lives; once it is SIGKILLed (no chance
    to clean up) its .lock file is still there, yet the next open succeeds and resumes."""
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder), json.dumps(ARGS)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        _assert_os_locked(folder / ".lock")
        with pytest.raises(ResultsError, match=f"{folder} is being written by another process"):
            ResultsStore(folder).open(ARGS)
        with pytest.raises(ResultsError, match="being written by another process"):
            ResultsStore(folder).consolidate()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    assert (folder / ".lock").exists()  # left behind, yet it blocks nobody: the kernel let go
    with ResultsStore(folder).open(ARGS) as resumed:
        assert resumed.completed_ids() == {0, 1}
        _write(resumed, prompts, [2, 3])
        resumed.finalize()
    assert sorted(ResultsStore(folder).load_effects()["prompt_id"].unique()) == [0, 1, 2, 3]


def test_the_store_imports_without_fcntl_and_refuses_a_marker_file_lock(tmp_path):
    """As on Windows, where fcntl does not exist: the protocol imports. Without fcntl on a
    non-Windows platform filelock offers only SoftFileLock, which the store refuses to use."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["fcntl"] = None  # import fcntl now raises ImportError
        import warnings
        warnings.simplefilter("ignore")
        from causalnet.errors import ResultsError
        from causalnet.hydra.store import ResultsStore
        import causalnet.hydra.sweep, causalnet.hydra.figures, causalnet.cli
        try:
            ResultsStore(sys.argv[1]).open({"a": 1})
        except ResultsError as err:
            print("refused:", err)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout and "no OS file lock" in out.stdout
    assert not (tmp_path / "r" / "run.json").exists()


def test_no_module_of_the_library_imports_fcntl():
    root = Path(__file__).resolve().parents[2]
    offenders = [
        str(p.relative_to(root))
        for folder in ("causalnet", "adapters")
        for p in (root / folder).rglob("*.py")
        if "import fcntl" in p.read_text(encoding="utf-8")
    ]
    assert offenders == []


# ---- foreign folders ------------------------------------------------------------------------


def _foreign_folder(path: Path) -> Path:
    """A folder a user keeps other files in, with names a sweep writes or cleans up."""
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n")
    (path / ".draft.tmp").write_text("an editor's temporary file\n")
    (path / ".x.123.abcdef01.tmp").write_text("looks like ours, is not\n")
    (path / "effects.parquet").write_bytes(b"someone else's table")
    (path / "readouts.parquet").write_bytes(b"another table")
    (path / "figures").mkdir()
    (path / "figures" / "fig2.png").write_bytes(b"\x89PNG not ours")
    return path


def test_out_at_a_folder_of_other_files_is_refused_and_left_untouched(tmp_path, prompts):
    folder = _foreign_folder(tmp_path / "home")
    before = _snapshot(folder)
    with pytest.raises(ResultsError) as err:
        ResultsStore(folder).open(ARGS)
    message = str(err.value)
    assert f"{folder} is not empty and not a causalnet results folder" in message
    assert "'effects.parquet'" in message and "'figures'" in message
    assert _snapshot(folder) == before
    with pytest.raises(ResultsError, match="is not empty and not a causalnet results folder"):
        ResultsStore(folder).check(ARGS)


def test_a_run_json_not_written_by_causalnet_is_refused_untouched(tmp_path):
    folder = tmp_path / "other-tool"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"name": "wandb run", "args": {}}))
    (folder / "effects.parquet").write_bytes(b"theirs")
    before = _snapshot(folder)
    with pytest.raises(ResultsError, match=r"run\.json was not written by causalnet"):
        ResultsStore(folder).open(ARGS)
    with pytest.raises(ResultsError, match=r"run\.json was not written by causalnet"):
        ResultsStore(folder).load_effects()
    assert _snapshot(folder) == before


def test_absent_empty_and_killed_first_open_folders_are_accepted(tmp_path, prompts):
    ResultsStore(tmp_path / "a" / "b" / "new").open(ARGS).close()
    (tmp_path / "empty").mkdir()
    ResultsStore(tmp_path / "empty").open(ARGS).close()
    # a first open SIGKILLed after taking the lock, before run.json landed
    killed = tmp_path / "killed"
    (killed / "shards").mkdir(parents=True)
    (killed / ".lock").touch()
    (killed / ".run.json.4242.0123abcd.tmp").write_text('{"half')
    with ResultsStore(killed).open(ARGS) as store:
        _write(store, prompts, [0])
    assert not list(killed.glob(".*.tmp"))
    assert ResultsStore(killed).completed_ids() == {0}


def test_readers_refuse_a_folder_that_is_not_a_results_folder(tmp_path):
    folder = _foreign_folder(tmp_path / "home")
    before = _snapshot(folder)
    for read in (
        lambda s: s.load_effects(),
        lambda s: s.load_readouts(),
        lambda s: s.load_patches(),
        lambda s: s.patch_prompt_ids(),
        lambda s: s.consolidate(),
    ):
        with pytest.raises(ResultsError, match=f"{folder} is not a causalnet results folder"):
            read(ResultsStore(folder))
    with pytest.raises(ResultsError, match="no such results folder"):
        ResultsStore(tmp_path / "missing").load_effects()
    assert _snapshot(folder) == before  # consolidate() did not even create .lock


# ---- files and read-only places -------------------------------------------------------------


def test_out_naming_a_file_or_a_path_under_a_file_is_a_named_error(tmp_path):
    afile = tmp_path / "results.txt"
    afile.write_text("not a folder")
    with pytest.raises(ResultsError, match=f"{afile} is a file, not a results folder"):
        ResultsStore(afile).open(ARGS)
    with pytest.raises(ResultsError, match=f"cannot create the results folder .*: {afile} is a"):
        ResultsStore(afile / "sub" / "run").open(ARGS)
    assert afile.read_text() == "not a folder"


def _chmod_binds() -> bool:
    """Whether permissions bind this process (they do not for root, which os.access shows)."""
    return os.geteuid() != 0 if hasattr(os, "geteuid") else True


@pytest.mark.skipif(
    not _chmod_binds(),
    reason="running as root: chmod does not bind root, a read-only folder stays writable; the "
    "os.access, path-under-a-file and failed-write tests cover the named errors",
)
def test_out_in_a_read_only_folder_or_under_a_read_only_parent_is_a_named_error(tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert not os.access(locked, os.W_OK)
        with pytest.raises(ResultsError, match=f"results folder {locked} is not writable"):
            ResultsStore(locked).open(ARGS)
        with pytest.raises(ResultsError, match=f"{locked} is not writable"):
            ResultsStore(locked / "run").open(ARGS)
        assert os.listdir(locked) == []
    finally:
        locked.chmod(stat.S_IRWXU)


def test_a_folder_the_os_reports_read_only_is_refused_before_writing(tmp_path, monkeypatch):
    """Root's view of permissions cannot be changed by chmod, so here os.access (what the
    check asks, and what reports a read-only mount to root too) is made to answer no."""
    import causalnet.hydra.folder as folder_mod

    locked = tmp_path / "ro"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        folder_mod.os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode)
    )
    with pytest.raises(ResultsError, match=f"results folder {locked} is not writable"):
        ResultsStore(locked).open(ARGS)
    with pytest.raises(ResultsError, match=f"cannot create .*{locked} is not writable"):
        ResultsStore(locked / "a" / "run").open(ARGS)
    assert os.listdir(locked) == []


def test_a_write_that_fails_while_opening_is_a_named_error_and_frees_the_lock(
    tmp_path, monkeypatch
):
    """What a read-only filesystem does to root too: the OSError of the first write."""
    import causalnet.hydra.store as store_mod

    def refuse(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(store_mod, "_write_json", refuse)
    with pytest.raises(ResultsError, match=f"cannot write the results folder {tmp_path / 'r'}"):
        ResultsStore(tmp_path / "r").open(ARGS)
    monkeypatch.undo()
    ResultsStore(tmp_path / "r").open(ARGS).close()  # the lock was released


# ---- resume with changed inputs -------------------------------------------------------------


def test_changed_fingerprints_are_named_and_the_advice_is_a_new_folder(tmp_path, prompts):
    args = {**ARGS, "prompts_fingerprint": "sha256:" + "a" * 64, "model_fingerprint": "m1"}
    with ResultsStore(tmp_path).open(args) as store:
        _write(store, prompts, [0, 1])
    before = _snapshot(tmp_path)
    edited = {**args, "prompts_fingerprint": "sha256:" + "b" * 64}
    with pytest.raises(ResultsError) as err:
        ResultsStore(tmp_path).open(edited)
    message = str(err.value)
    assert "different arguments (prompts_fingerprint: stored 'sha256:aaaa" in message
    assert "now 'sha256:bbbb" in message and "model_fingerprint" not in message.split(")")[0]
    assert "The inputs behind prompts_fingerprint changed since the folder was written" in message
    assert "new results folder (another --out)" in message
    assert "remove" not in message and "delete" not in message
    both = {**edited, "model_fingerprint": "m2"}
    with pytest.raises(ResultsError, match="behind model_fingerprint, prompts_fingerprint"):
        ResultsStore(tmp_path).check(both)
    assert _snapshot(tmp_path) == before  # nothing written, nothing lost


# ---- the command line -----------------------------------------------------------------------


@pytest.fixture
def results(tmp_path, prompts):
    with ResultsStore(tmp_path / "res").open(ARGS) as store:
        _write(store, prompts, list(prompts))
        store.finalize()
    return tmp_path / "res"


def test_report_csv_into_a_missing_folder_is_a_named_error(results, tmp_path, capsys):
    target = tmp_path / "no" / "such" / "table.csv"
    assert main(["report", str(results), "--csv", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"--csv {target}: the folder {target.parent} does not exist" in err
    assert not target.parent.exists()
    assert main(["report", str(results), "--csv", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["report", str(results), "--csv", str(tmp_path / "t.csv")]) == 0
    assert (tmp_path / "t.csv").read_text().startswith("kind,layer")


def test_report_and_plot_on_a_folder_that_is_not_a_results_folder(tmp_path, capsys):
    folder = _foreign_folder(tmp_path / "home")
    before = _snapshot(folder)
    for command in ("report", "plot"):
        assert main([command, str(folder)]) == 2
        err = capsys.readouterr().err
        assert f"causalnet: error: {folder} is not a causalnet results folder" in err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such results folder" in capsys.readouterr().err
    assert _snapshot(folder) == before
