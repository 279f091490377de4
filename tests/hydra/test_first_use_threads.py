"""The first linear layers a process runs compute what a single thread computes, however many
threads share the work: oneDNN's first calls, made by two threads at once, once shifted a pool by
up to 2e-3 (5 of 16 fresh processes), so threaded work starts with one item alone
(causalnet.hydra.parallel.SERIAL_FIRST)."""

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from causalnet.adapters import load
from causalnet.hydra.parallel import map_in_threads
from causalnet.hydra.sweep import SweepConfig, plan_sweep
from causalnet.hydra.threads import compute_in_threads
from tiny_lm import save_tiny_llama, write_prompts

SCRIPT = """
import json, sys, torch
from causalnet.adapters import load
from causalnet.hydra.parallel import map_in_threads
adapter = load(sys.argv[1])
tokens = [adapter.encode(json.loads(line)["prompt"]) for line in open(sys.argv[2])]
chunks = [tokens[i : i + 8] for i in range(0, len(tokens), 8)]
threaded = torch.cat(list(map_in_threads(lambda c: adapter.final_values(c), chunks, 2)))
serial = torch.cat([adapter.final_values(c) for c in chunks])
print(float((threaded - serial).abs().max()))
"""


def test_a_fresh_process_threads_first_linear_calls_agree_with_one_thread(tmp_path: Path):
    model = save_tiny_llama(tmp_path / "model")
    prompts = write_prompts(tmp_path / "prompts.jsonl", 60)
    for _ in range(3):  # each run is a fresh process: the first use happens in the threads
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(model), str(prompts)],
            check=True,
            capture_output=True,
            text=True,
        )
        assert float(out.stdout.strip().splitlines()[-1]) == 0.0


def test_threaded_work_computes_its_first_item_alone_in_the_calling_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    caller = threading.get_ident()
    seen: list[tuple[int, int, int]] = []  # (item, thread, threads busy when it started)
    busy = [0]
    lock = threading.Lock()

    def fn(item: int) -> int:
        with lock:
            busy[0] += 1
            seen.append((item, threading.get_ident(), busy[0]))
        with lock:
            busy[0] -= 1
        return item * 2

    assert list(map_in_threads(fn, list(range(6)), 3)) == [0, 2, 4, 6, 8, 10]
    first = [s for s in seen if s[0] == 0][0]
    assert first[1] == caller and first[2] == 1
    assert seen[0][0] == 0  # nothing started before it

    model = save_tiny_llama(tmp_path / "model")
    prompts = write_prompts(tmp_path / "prompts.jsonl", 5)
    adapter = load(str(model))
    plan = plan_sweep(SweepConfig(model=str(model), prompts=str(prompts), k=2), adapter)
    import causalnet.hydra.threads as threads_module

    real = threads_module.compute_prompt
    where: dict[int, int] = {}

    def recording(adapter, plan, i, keep_patches):
        where[i] = threading.get_ident()
        return real(adapter, plan, i, keep_patches)

    monkeypatch.setattr(threads_module, "compute_prompt", recording)
    written: list[int] = []
    compute_in_threads(adapter, plan, [3, 0, 1, 2, 4], lambda r: written.append(r.index), 2)
    assert written == [3, 0, 1, 2, 4]
    assert where[3] == caller and any(where[i] != caller for i in (0, 1, 2, 4))
