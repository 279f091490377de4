"""The results store: atomic per-prompt shards, resume after a kill, identical final files."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from causalnet.errors import ResultsError
from causalnet.hydra.store import (
    IGNORED_ARG_KEYS,
    ResultsStore,
    decode_prompt_id,
    encode_prompt_id,
    site_sort_key,
)

ARGS = {
    "model": "smollm2-135m",
    "prompts": "known_1000",
    "ablation": "resample",
    "k": 3,
    "seed": 0,
    "granularity": "layer",
    "sites": None,
    "limit": 5,
    "dtype": "float32",
    "library_version": "0.1.0",
}
FINAL = ("effects.parquet", "readouts.parquet", "patches.parquet")


@pytest.fixture(scope="module")
def prompts(synth):
    return synth.prompts(n_prompts=5, n_layers=3, n_patches=2, seed=1)


def _write(store, prompts, ids, patches_for=(0,)):
    for pid in ids:
        t = prompts[pid]
        store.write_prompt(
            pid, t["effects"], t["readouts"], t["patches"] if pid in patches_for else None
        )


def _final_bytes(folder):
    return {name: (folder / name).read_bytes() for name in FINAL if (folder / name).exists()}


@pytest.fixture(scope="module")
def reference(prompts, tmp_path_factory):
    """An uninterrupted run's final files."""
    folder = tmp_path_factory.mktemp("ref")
    store = ResultsStore(folder).open(ARGS)
    _write(store, prompts, list(prompts))
    store.finalize({"time_total_s": 1.0})
    return folder


def test_round_trip_keeps_values_sorted_rows_and_column_types(prompts, reference):
    store = ResultsStore(reference)
    effects = store.load_effects()
    assert len(effects) == 5 * 7 and effects["prompt_id"].dtype == np.int64
    assert list(effects["site"][:7]) == [
        "embed",
        "attn.0",
        "mlp.0",
        "attn.1",
        "mlp.1",
        "attn.2",
        "mlp.2",
    ]
    assert effects["target_is_true"].dtype == bool and effects["layer"].dtype == np.int64
    expected = pd.concat([prompts[i]["effects"] for i in range(5)], ignore_index=True)
    pd.testing.assert_frame_equal(effects, expected, check_dtype=False)
    readouts = store.load_readouts()
    assert len(readouts) == 5 * 7 * 7
    assert not readouts.duplicated(["prompt_id", "ablated_site", "readout_site"]).any()
    patches = store.load_patches()
    assert set(patches["prompt_id"]) == {0} and len(patches) == 7 * 2 * 7
    assert patches["source_id"].tolist()[:1] == ["1"]
    assert set(store.load_readouts([3, 1])["prompt_id"]) == {1, 3}
    assert store.load_patches([2]).empty and len(store.load_patches([0, 2])) == len(patches)
    assert store.load_readouts([]).empty
    run = store.load_run()
    assert run["args"] == ARGS and run["n_prompts"] == 5
    assert run["info"] == {"time_total_s": 1.0} and run["finalized_at"]
    assert store.completed_ids() == frozenset(range(5))


def test_shards_sorted_at_write_whatever_order_the_rows_come_in(prompts, tmp_path):
    store = ResultsStore(tmp_path).open(ARGS)
    t = prompts[3]
    shuffled = {k: v.sample(frac=1.0, random_state=0) for k, v in t.items()}
    store.write_prompt(3, shuffled["effects"].drop(columns="prompt_id"), shuffled["readouts"])
    store.finalize()
    pd.testing.assert_frame_equal(store.load_effects(), t["effects"], check_dtype=False)
    assert "patches.parquet" not in os.listdir(tmp_path)
    assert store.load_patches().empty and list(store.load_patches().columns)[0] == "prompt_id"


def test_resumed_run_in_another_order_gives_identical_final_files(prompts, reference, tmp_path):
    store = ResultsStore(tmp_path).open(ARGS)
    _write(store, prompts, [4, 1])
    store.close()  # the process dies here; nothing else happens
    resumed = ResultsStore(tmp_path).open({**ARGS, "library_version": "0.2.0"})
    assert resumed.completed_ids() == {1, 4}
    _write(resumed, prompts, [i for i in range(5) if i not in resumed.completed_ids()])
    resumed.finalize()
    assert _final_bytes(tmp_path) == _final_bytes(reference)
    sessions = resumed.load_run()["sessions"]
    assert [s["completed_before"] for s in sessions] == [0, 2]
    assert sessions[1]["ignored_args"] == {"library_version": "0.2.0"}


def test_leftover_temp_files_and_orphan_shards_are_cleaned_on_resume(prompts, reference, tmp_path):
    store = ResultsStore(tmp_path).open(ARGS)
    _write(store, prompts, [0, 1])
    store.close()
    shards = tmp_path / "shards"
    # a kill while prompt 2 was being written: its readouts shard landed, its effects shard
    # was still a temporary file, and a consolidated file was half written
    t = prompts[2]
    half = ResultsStore(tmp_path).open(ARGS)
    half.write_prompt(2, t["effects"], t["readouts"])
    half.close()
    (shards / "i2.effects.parquet").rename(shards / ".i2.effects.parquet.999.deadbeef.tmp")
    (tmp_path / ".effects.parquet.999.cafe.tmp").write_bytes(b"PAR1 truncated")
    resumed = ResultsStore(tmp_path).open(ARGS)
    assert resumed.completed_ids() == {0, 1}
    assert not list(shards.glob(".*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    assert not (shards / "i2.readouts.parquet").exists()  # the orphan went
    _write(resumed, prompts, [2, 3, 4])
    resumed.finalize()
    assert _final_bytes(tmp_path) == _final_bytes(reference)


_CHILD = textwrap.dedent(
    """
    import os, pickle, signal, sys
    import causalnet.hydra.store as store_mod
    folder, data, args, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    prompts = pickle.load(open(data, "rb"))
    calls = 0
    real_replace = os.replace
    def replace(src, dst):  # SIGKILL ourselves right before the kill_at-th rename
        global calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
    store_mod.os.replace = replace
    store = store_mod.ResultsStore(folder).open(pickle.load(open(args, "rb")))
    for pid, t in prompts.items():
        store.write_prompt(pid, t["effects"], t["readouts"], t["patches"] if pid == 0 else None)
    store.finalize({"time_total_s": 1.0})
    """
)


KILL_POINTS = (2, 4, 7, 14, 16)


def test_sigkilled_writers_resume_to_identical_final_files(prompts, reference, tmp_path):
    """Real processes SIGKILLed just before their kill_at-th atomic rename. Renames: 1 run.json;
    prompt 0: 2 patches, 3 readouts, 4 effects (its completion mark); prompts 1-4: readouts then
    effects (5-12); finalize: 13-15 the consolidated tables, 16 run.json. The writers run in
    parallel (each pays the interpreter's start-up)."""
    data, args = tmp_path / "prompts.pkl", tmp_path / "args.pkl"
    data.write_bytes(pickle.dumps(prompts))
    args.write_bytes(pickle.dumps(ARGS))
    children = {
        kill_at: subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CHILD,
                str(tmp_path / f"run{kill_at}"),
                str(data),
                str(args),
                str(kill_at),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for kill_at in KILL_POINTS
    }
    for kill_at, child in children.items():
        _, stderr = child.communicate(timeout=120)
        assert child.returncode == -signal.SIGKILL, (kill_at, stderr)
    for kill_at in KILL_POINTS:
        folder = tmp_path / f"run{kill_at}"
        assert list((folder / "shards").glob(".*.tmp")) or list(folder.glob(".*.tmp")), kill_at
        store = ResultsStore(folder).open(ARGS)
        done = store.completed_ids()
        assert done == set(range(sum(mark < kill_at for mark in (4, 6, 8, 10, 12)))), kill_at
        _write(store, prompts, [i for i in range(5) if i not in done])
        store.finalize()
        assert _final_bytes(folder) == _final_bytes(reference), kill_at


def test_different_arguments_raise_listing_the_keys(tmp_path):
    ResultsStore(tmp_path).open(ARGS).close()
    changed = {**ARGS, "k": 15, "seed": 1, "dtype": "float32"}
    del changed["limit"]
    with pytest.raises(
        ResultsError,
        match=r"different arguments \(k: stored 3, now 15; "
        r"limit: stored 5, now '<absent>'; seed: stored 0, now 1\)",
    ):
        ResultsStore(tmp_path).open(changed)
    with pytest.raises(ResultsError, match="already holds a run"):
        ResultsStore(tmp_path).open(ARGS, resume=False)
    assert "library_version" in IGNORED_ARG_KEYS
    ResultsStore(tmp_path).open({**ARGS, "library_version": "9"}).close()  # ignored key


def test_a_folder_is_written_by_one_process_at_a_time(tmp_path, prompts):
    with subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path), json.dumps(ARGS)],
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        try:
            assert holder.stdout.readline().strip() == "open"
            with pytest.raises(ResultsError, match="being written by another process"):
                ResultsStore(tmp_path).open(ARGS)
            with pytest.raises(ResultsError, match="being written by another process"):
                ResultsStore(tmp_path).consolidate()
        finally:
            holder.kill()  # SIGKILL: the kernel releases the lock
    first = ResultsStore(tmp_path).open(ARGS)
    # the same process opening again (say after an exception) takes the folder over
    with ResultsStore(tmp_path).open(ARGS) as again:
        with pytest.raises(ResultsError, match="call open"):
            _write(first, prompts, [0])
        _write(again, prompts, [0])
        assert again.completed_ids() == {0}
    assert ResultsStore(tmp_path).completed_ids() == {0}
    written = ResultsStore(tmp_path).consolidate()  # on demand, no open() needed
    assert sorted(written) == ["effects", "patches", "readouts"]
    assert ResultsStore(tmp_path).load_effects()["prompt_id"].unique().tolist() == [0]


_HOLDER = textwrap.dedent(
    """
    import json, sys, time
    from causalnet.hydra.store import ResultsStore
    store = ResultsStore(sys.argv[1]).open(json.loads(sys.argv[2]))
    print("open", flush=True)
    time.sleep(120)
    """
)


def test_duplicate_rows_are_rejected_at_write_and_at_consolidation(prompts, tmp_path):
    store = ResultsStore(tmp_path).open(ARGS)
    t = prompts[0]
    doubled = pd.concat([t["readouts"], t["readouts"].iloc[:2]])
    with pytest.raises(ResultsError, match=r"prompt 0, readouts rows: 4 duplicate readouts"):
        store.write_prompt(0, t["effects"], doubled)
    _write(store, prompts, [0, 1])
    with pytest.raises(ResultsError, match="prompt 1 is already complete"):
        _write(store, prompts, [1])
    shards = tmp_path / "shards"
    for table in ("effects", "readouts"):  # a copied shard: prompt 0's rows under id 7
        shutil.copy(shards / f"i0.{table}.parquet", shards / f"i7.{table}.parquet")
    with pytest.raises(ResultsError, match=r"i7\.effects\.parquet holds rows of prompt\(s\) \[0\]"):
        store.consolidate()
    with pytest.raises(ResultsError, match="holds rows of prompt"):
        ResultsStore(tmp_path).load_effects()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: e.drop(columns="sources"), r"missing columns \['sources'\]"),
        (lambda e: e.assign(extra=1), r"unexpected columns \['extra'\]"),
        (lambda e: e.assign(kind="mlp"), r"site 'embed' has kind/layer/head 'mlp'"),
        (lambda e: e.assign(site="resid.3"), "'resid.3' is not a site name"),
        (lambda e: e.assign(prompt_id=9), r"column prompt_id holds \[9\]"),
        (lambda e: e.assign(total_effect=np.nan), "column total_effect is not finite at site="),
        (lambda e: e.assign(target_token="x"), "values do not fit the column types"),
        (lambda e: e.iloc[:0], "no rows"),
    ],
)
def test_malformed_rows_raise_results_error_naming_the_prompt(prompts, tmp_path, mutate, message):
    store = ResultsStore(tmp_path).open(ARGS)
    t = prompts[0]
    with pytest.raises(ResultsError, match=message):
        store.write_prompt(0, mutate(t["effects"]), t["readouts"])
    assert store.completed_ids() == frozenset() and not list((tmp_path / "shards").iterdir())


def test_string_ids_keep_a_string_column_and_cannot_mix_with_ints(tmp_path, synth):
    prompts = synth.prompts(n_prompts=3, n_layers=2, n_heads=2, n_patches=2, str_ids=True)
    store = ResultsStore(tmp_path).open(ARGS)
    for pid, t in prompts.items():
        store.write_prompt(pid, t["effects"], t["readouts"], t["patches"])
    with pytest.raises(ResultsError, match="this folder's ids are strs"):
        store.write_prompt(5, prompts["rel/0"]["effects"], prompts["rel/0"]["readouts"])
    store.finalize()
    effects = ResultsStore(tmp_path).load_effects()
    assert effects["prompt_id"].tolist()[0] == "rel/0" and effects["prompt_id"].dtype == "str"
    assert effects["site"].tolist()[:4] == ["embed", "attn.0.h0", "attn.0.h1", "mlp.0"]
    assert ResultsStore(tmp_path).completed_ids() == {"rel/0", "rel/1", "rel/2"}


def test_reading_before_finalize_and_stale_consolidated_files(prompts, tmp_path):
    store = ResultsStore(tmp_path).open(ARGS)
    with pytest.raises(ResultsError, match="no completed prompts"):
        store.load_effects()
    _write(store, prompts, [0, 2])
    assert sorted(ResultsStore(tmp_path).load_effects()["prompt_id"].unique()) == [0, 2]
    assert set(ResultsStore(tmp_path).load_readouts([2, 4])["prompt_id"]) == {2}
    assert ResultsStore(tmp_path).load_patches([2]).empty
    store.finalize()
    resumed = ResultsStore(tmp_path).open(ARGS)
    assert (tmp_path / "effects.parquet").exists()
    assert resumed.load_run()["n_prompts"] == 2
    _write(resumed, prompts, [1])
    assert not (tmp_path / "effects.parquet").exists()  # stale: removed by the new write
    assert "finalized_at" not in resumed.load_run() and "n_prompts" not in resumed.load_run()
    assert sorted(resumed.load_effects()["prompt_id"].unique()) == [0, 1, 2]
    with pytest.raises(ResultsError, match="not found: not a results folder"):
        ResultsStore(tmp_path / "nothing").load_run()


def test_run_json_is_valid_json_after_every_step(tmp_path, prompts):
    store = ResultsStore(tmp_path).open(ARGS)
    assert json.loads((tmp_path / "run.json").read_text())["args"] == ARGS
    _write(store, prompts, [0])
    store.finalize({"n": 1})
    assert json.loads((tmp_path / "run.json").read_text())["info"] == {"n": 1}
    with pytest.raises(ResultsError, match="not JSON-serialisable"):
        ResultsStore(tmp_path / "other").open({"model": object()})


@given(st.one_of(st.integers(-(2**62), 2**62), st.text(min_size=1, max_size=60)))
def test_prompt_ids_round_trip_through_shard_names(pid):
    key = encode_prompt_id(pid)
    assert "/" not in key and not key.startswith(".")
    assert decode_prompt_id(key) == pid


def test_site_sort_key_is_residual_order():
    names = ["mlp.10", "attn.2.h1", "mlp.2", "attn.10", "embed", "attn.2", "attn.2.h0"]
    assert sorted(names, key=site_sort_key) == [
        "embed",
        "attn.2",
        "attn.2.h0",
        "attn.2.h1",
        "mlp.2",
        "attn.10",
        "mlp.10",
    ]
