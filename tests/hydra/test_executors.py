"""One way to execute a sweep: the executor interface, its three implementations, and an
import graph of causalnet.hydra without circles (the per-prompt core imports no executor)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import networkx as nx
import pytest

from causalnet.adapters import load
from causalnet.hydra.executors import Executor, SerialExecutor
from causalnet.hydra.plan import compute_prompt
from causalnet.hydra.store import ResultsStore
from causalnet.hydra.sweep import SweepConfig, choose_executor, run_sweep
from causalnet.hydra.threads import ThreadExecutor
from tiny_lm import save_tiny_llama, write_prompts

HYDRA = Path(__file__).resolve().parents[2] / "causalnet" / "hydra"
EXECUTORS = {"executors", "threads", "distributed", "sweep"}


def hydra_imports(source: str, module: str) -> set[str]:
    """The causalnet.hydra modules that ``source`` (module ``module`` of the package) imports,
    anywhere in it: at the top, inside functions, under TYPE_CHECKING."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(a.name for a in node.names)
            elif node.level == 0 and (node.module or "").startswith("causalnet.hydra."):
                found.add(node.module.split(".")[2])
            elif node.level == 0 and node.module == "causalnet.hydra":
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("causalnet.hydra."):
                    found.add(alias.name.split(".")[2])
    return found - {module}


def hydra_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for path in sorted(HYDRA.glob("*.py")):
        graph.add_node(path.stem)
        for target in hydra_imports(path.read_text(encoding="utf-8"), path.stem):
            graph.add_edge(path.stem, target)
    return graph


def test_the_import_scan_sees_relative_absolute_and_function_level_imports():
    source = (
        "from .plan import x\nfrom . import pool\nimport causalnet.hydra.store\n"
        "def f():\n    from .threads import y\n"
        "from causalnet.hydra.data import z\nfrom ..errors import E\n"
    )
    assert hydra_imports(source, "sweep") == {"plan", "pool", "store", "threads", "data"}
    cyclic = nx.DiGraph([("sweep", "threads"), ("threads", "sweep")])
    assert not nx.is_directed_acyclic_graph(cyclic)  # what the next test would report


def test_every_hydra_module_imports_and_the_import_graph_has_no_circle():
    graph = hydra_graph()
    assert {"sweep", "plan", "pool", "threads", "distributed", "executors"} <= set(graph)
    for module in graph:
        if module == "distributed":
            pytest.importorskip("ray")
        importlib.import_module(f"causalnet.hydra.{module}")
    assert nx.is_directed_acyclic_graph(graph), list(nx.simple_cycles(graph))


def test_the_per_prompt_core_imports_no_executor():
    graph = hydra_graph()
    for core in ("plan", "pool", "config", "fingerprints", "parallel", "protocol"):
        reached = nx.descendants(graph, core)
        assert not reached & EXECUTORS, (core, reached & EXECUTORS)
    assert "sweep" not in nx.descendants(graph, "threads") | nx.descendants(graph, "distributed")


def test_hydra_modules_stay_short():
    mine = ["sweep", "plan", "pool", "config", "fingerprints", "executors", "parallel", "threads"]
    lengths = {m: len((HYDRA / f"{m}.py").read_text().splitlines()) for m in mine}
    assert max(lengths.values()) <= 400, lengths


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SweepConfig:
    root = tmp_path_factory.mktemp("executors")
    model = save_tiny_llama(root / "model", n_layers=2)
    prompts = write_prompts(root / "prompts.jsonl", 8)
    return SweepConfig(model=str(model), prompts=str(prompts), k=3)


def test_serial_threads_and_ray_are_executors(tiny):
    adapter = load(tiny.model)
    assert isinstance(SerialExecutor(adapter), Executor)
    assert isinstance(ThreadExecutor(adapter, 2), Executor)
    assert not isinstance(object(), Executor)
    ray = pytest.importorskip("ray")
    from causalnet.hydra.distributed import RayExecutor

    assert isinstance(RayExecutor(workers=2), Executor) and not ray.is_initialized()


def test_the_executor_is_chosen_by_workers_threads_and_work(tiny, monkeypatch):
    adapter = load(tiny.model)
    monkeypatch.setenv("CAUSALNET_PROMPT_THREADS", "3")
    chosen = choose_executor(adapter, tiny, [0, 1])
    assert isinstance(chosen, ThreadExecutor) and chosen.prompt_threads == 3
    assert isinstance(choose_executor(adapter, tiny, []), SerialExecutor)  # nothing to do
    monkeypatch.setenv("CAUSALNET_PROMPT_THREADS", "1")
    assert isinstance(choose_executor(adapter, tiny, [0]), SerialExecutor)
    given = SerialExecutor(adapter)
    assert choose_executor(adapter, tiny, [0], workers=4, executor=given) is given


class Backwards:
    """A user's executor: the prompts in reverse order, one at a time."""

    workers = 1
    prompt_threads = 1

    def __init__(self, adapter) -> None:
        self.adapter = adapter
        self.seen: list[int] = []

    def run(self, plan, todo, write, figure_prompts=1, progress=True) -> None:
        for i in reversed(todo):
            self.seen.append(i)
            write(compute_prompt(self.adapter, plan, i, keep_patches=i < figure_prompts))


def test_any_executor_leaves_the_same_folder_as_one_prompt_at_a_time(tiny, tmp_path, monkeypatch):
    """Through the interface, a different order of computation writes the same bytes."""
    monkeypatch.setenv("CAUSALNET_PROMPT_THREADS", "1")
    serial = run_sweep(tiny, tmp_path / "serial", progress=False, figure_prompts=2)
    backwards = Backwards(load(tiny.model))
    other = run_sweep(
        tiny, tmp_path / "other", progress=False, figure_prompts=2, executor=backwards
    )
    assert backwards.seen == list(range(7, -1, -1))
    for table in ("effects", "readouts", "patches"):
        assert (other / f"{table}.parquet").read_bytes() == (
            serial / f"{table}.parquet"
        ).read_bytes()
    assert ResultsStore(other).load_run()["info"]["workers"] == 1


def test_an_object_that_is_not_an_executor_is_refused_before_writing(tiny, tmp_path):
    from causalnet.errors import CausalNetError

    with pytest.raises(CausalNetError, match="not an executor"):
        run_sweep(tiny, tmp_path / "r", progress=False, executor=object())
    assert not (tmp_path / "r").exists()
