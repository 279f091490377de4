"""A results folder never runs code: pickles planted where a folder is read stay inert.

Each planted file holds a pickle whose unpickling creates a marker file (the first test proves
the plant is live: ``pickle.loads`` does create it). The sweep is then resumed in the folder and
``causalnet report`` and ``plot`` read it; the marker must never appear, and each step either
works (the planted file is not read, or is recomputed) or fails with a named CausalNetError.
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from causalnet.cli import main
from causalnet.errors import ResultsError
from causalnet.hydra.pool import POOL_FILE, POOL_INDEX, read_pool
from causalnet.hydra.store import ResultsStore
from causalnet.hydra.sweep import SweepConfig, run_sweep
from tiny_lm import save_tiny_llama, write_prompts

ROOT = Path(__file__).resolve().parents[2]


class Plant:
    """Unpickling this creates ``marker`` (via ``open(marker, "w")``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[SweepConfig, Path]:
    """A finished sweep (6 prompts, 2 keeping per-patch rows) to copy and tamper with."""
    root = tmp_path_factory.mktemp("nopickle")
    model = save_tiny_llama(root / "model", n_layers=2)
    prompts = write_prompts(root / "prompts.jsonl", 6)
    config = SweepConfig(model=str(model), prompts=str(prompts), k=2)
    out = run_sweep(config, root / "clean", progress=False, figure_prompts=2)
    return config, out


def test_the_planted_pickle_is_live(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Plant(marker)))
    assert marker.exists()  # so a marker-free run below means the pickle was never loaded


def _pickle_bytes(marker: Path) -> bytes:
    return pickle.dumps({"ids": [0], "values": Plant(marker)})


def _torch_pickle(path: Path, marker: Path) -> None:
    torch.save({"ids": [0], "sites": ["attn.0"], "values": Plant(marker)}, path)


def _shard(folder: Path, table: str) -> Path:
    return sorted((folder / "shards").glob(f"*.{table}.parquet"))[0]


def _arrow_extension_pickle(path: Path, marker: Path) -> None:
    """Keep the parquet file readable but give a column the metadata of pyarrow's old
    pickle-based extension type (``arrow.py_extension_type``)."""
    table = pq.read_table(path)
    field = table.schema.field(1).with_metadata(
        {
            b"ARROW:extension:name": b"arrow.py_extension_type",
            b"ARROW:extension:metadata": pickle.dumps(Plant(marker)),
        }
    )
    pq.write_table(table.cast(table.schema.set(1, field)), path)


def _pandas_metadata_pickle(path: Path, marker: Path) -> None:
    """Keep the parquet file readable but fill its schema's ``pandas`` entry (which pandas reads
    to rebuild indexes and dtypes) with pickle bytes."""
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({b"pandas": _pickle_bytes(marker)}), path)


PLANTS = {
    # name: (plant(folder, marker), what a resume must do: "ok" or a ResultsError match)
    "legacy pool.pt": (lambda f, m: _torch_pickle(f / "pool.pt", m), "pool.pt"),
    "pool.safetensors is a pickle": (
        lambda f, m: _torch_pickle(f / POOL_FILE, m),
        "does not match the sha256",
    ),
    "pool.safetensors is a pickle, pool.json's sha256 updated": (
        lambda f, m: _plant_matching_pool(f, m),
        "not a readable safetensors",
    ),
    "pool.json is a pickle": (
        lambda f, m: (f / POOL_INDEX).write_bytes(_pickle_bytes(m)),
        "pool.json is unreadable",
    ),
    "run.json is a pickle": (
        lambda f, m: (f / "run.json").write_bytes(_pickle_bytes(m)),
        "run.json",
    ),
    "an effects shard is a pickle": (
        lambda f, m: _torch_pickle(_shard(f, "effects"), m),
        "unreadable",
    ),
    "a readouts shard is a pickle": (
        lambda f, m: _shard(f, "readouts").write_bytes(_pickle_bytes(m)),
        "unreadable",
    ),
    "effects.parquet is a pickle": (
        lambda f, m: (f / "effects.parquet").write_bytes(_pickle_bytes(m)),
        "ok",  # the resume consolidates the shards again, replacing it
    ),
    "readouts.parquet and patches.parquet are pickles": (
        lambda f, m: [
            (f / f"{t}.parquet").write_bytes(_pickle_bytes(m)) for t in ("readouts", "patches")
        ],
        "ok",
    ),
    "a shard column carries a pickled arrow extension type": (
        lambda f, m: _arrow_extension_pickle(_shard(f, "effects"), m),
        "ok",  # read as its plain storage type; the pickle is never loaded
    ),
    "a shard's pandas metadata is a pickle": (
        lambda f, m: _pandas_metadata_pickle(_shard(f, "readouts"), m),
        "ok",  # read from its columns alone; the metadata is never looked at
    ),
    "effects.parquet's pandas metadata is a pickle": (
        lambda f, m: _pandas_metadata_pickle(f / "effects.parquet", m),
        "ok",
    ),
    "the lock file is a pickle": (lambda f, m: (f / ".lock").write_bytes(_pickle_bytes(m)), "ok"),
}


def _plant_matching_pool(folder: Path, marker: Path) -> None:
    _torch_pickle(folder / POOL_FILE, marker)
    index = json.loads((folder / POOL_INDEX).read_text())
    import hashlib

    index["sha256"] = hashlib.sha256((folder / POOL_FILE).read_bytes()).hexdigest()
    (folder / POOL_INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("name", list(PLANTS))
def test_a_planted_pickle_never_runs_on_resume_report_or_plot(name, finished, tmp_path):
    config, clean = finished
    folder = tmp_path / "results"
    shutil.copytree(clean, folder)
    marker = tmp_path / "marker"
    plant, expected = PLANTS[name]
    plant(folder, marker)

    if expected == "ok":
        run_sweep(config, folder, progress=False, figure_prompts=2)
        pd.testing.assert_frame_equal(
            ResultsStore(folder).load_effects(), ResultsStore(clean).load_effects()
        )
    else:
        with pytest.raises(ResultsError, match=expected):
            run_sweep(config, folder, progress=False, figure_prompts=2)
    assert not marker.exists()
    for command in (["report", str(folder)], ["plot", str(folder)]):
        assert main(command) in (0, 2), command  # 2: a named CausalNetError, printed
        assert not marker.exists(), command


def test_a_legacy_pool_pt_is_refused_before_anything_is_written(finished, tmp_path):
    config, clean = finished
    folder = tmp_path / "results"
    shutil.copytree(clean, folder)
    marker = tmp_path / "marker"
    _torch_pickle(folder / "pool.pt", marker)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(ResultsError, match="never unpickles"):
        run_sweep(config, folder, progress=False, figure_prompts=2)
    after = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before and not marker.exists()


@pytest.mark.parametrize("cut", [0, 7, 100, -1])
def test_a_truncated_pool_is_a_named_error_not_a_traceback(cut, finished, tmp_path):
    folder = tmp_path / "results"
    shutil.copytree(finished[1], folder)
    data = (folder / POOL_FILE).read_bytes()
    (folder / POOL_FILE).write_bytes(data[:cut])
    with pytest.raises(ResultsError, match="pool.safetensors"):
        read_pool(folder)
    (folder / POOL_INDEX).write_text('{"format": 1, "ids": [0, 1')  # truncated JSON
    with pytest.raises(ResultsError, match="pool.json"):
        run_sweep(finished[0], folder, progress=False, figure_prompts=2)


def test_a_resume_reads_the_stored_pool_and_writes_the_same_bytes(finished, tmp_path):
    """Kill simulated by deleting prompts' shards (and consolidated tables): the resume reads
    pool.safetensors (not recomputed) and the folder ends byte-identical to the first run."""
    config, clean = finished
    folder = tmp_path / "results"
    shutil.copytree(clean, folder)
    for table in ("effects", "readouts", "patches"):
        (folder / f"{table}.parquet").unlink()
        for shard in sorted((folder / "shards").glob(f"*.{table}.parquet"))[:3]:
            shard.unlink()
    pool_before = (folder / POOL_FILE).stat().st_mtime_ns
    run_sweep(config, folder, progress=False, figure_prompts=2)
    assert (folder / POOL_FILE).stat().st_mtime_ns == pool_before  # read, not rewritten
    for table in ("effects", "readouts", "patches"):
        assert (folder / f"{table}.parquet").read_bytes() == (
            clean / f"{table}.parquet"
        ).read_bytes()


def test_a_pool_whose_index_never_landed_is_recomputed(finished, tmp_path):
    """A kill between pool.safetensors and pool.json: the pool is computed again, equal."""
    config, clean = finished
    folder = tmp_path / "results"
    shutil.copytree(clean, folder)
    (folder / POOL_INDEX).unlink()
    (folder / POOL_FILE).write_bytes(b"half a file")
    assert read_pool(folder) is None
    run_sweep(config, folder, progress=False, figure_prompts=2)
    stored, original = read_pool(folder), read_pool(clean)
    assert stored is not None and original is not None
    assert torch.equal(stored.values, original.values) and stored.ids == original.ids


# ---- no pickle-capable load anywhere in the library -------------------------------------------

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve"}


def _pickle_loads(path: Path) -> list[str]:
    """Calls in ``path`` that can unpickle: pickle-family loads/imports, torch.load without
    weights_only=True, np.load(allow_pickle=True), read_pickle, joblib.load, Unpickler."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names]
            module = node.module if isinstance(node, ast.ImportFrom) else None
            if {module, *names} & PICKLE_MODULES or "joblib" in {module, *names}:
                found.append(f"{where}: imports {module or names}")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
        kwargs = {k.arg: k.value for k in node.keywords}

        def is_true(key: str, kwargs: dict = kwargs) -> bool:
            value = kwargs.get(key)
            return isinstance(value, ast.Constant) and value.value is True

        if name in ("read_pickle", "Unpickler"):
            found.append(f"{where}: {name}")
        elif name == "load" and owner == "torch" and not is_true("weights_only"):
            found.append(f"{where}: torch.load without weights_only=True")
        elif name == "load" and owner in ("np", "numpy") and "allow_pickle" in kwargs:
            value = kwargs["allow_pickle"]
            if not (isinstance(value, ast.Constant) and value.value is False):
                found.append(f"{where}: np.load(allow_pickle=...)")
    return found


def test_the_library_has_no_pickle_capable_load():
    files = [p for d in ("causalnet", "adapters", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 20
    found = [hit for path in files for hit in _pickle_loads(path)]
    assert not found, found


def test_the_pickle_scan_finds_what_it_looks_for(tmp_path):
    """The scan above can fail: it flags each pickle-capable load in a sample file."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import pickle\nimport torch\nimport numpy as np\nimport pandas as pd\n"
        "torch.load('a')\ntorch.load('b', weights_only=False)\n"
        "torch.load('c', weights_only=True)\nnp.load('d', allow_pickle=True)\n"
        "pd.read_pickle('e')\n"
    )
    found = _pickle_loads(sample)
    assert len(found) == 5, found  # import pickle, torch.load x2, np.load, read_pickle
