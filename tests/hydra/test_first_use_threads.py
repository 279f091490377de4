"""The first linear layers a process runs, reached by two prompt threads at once, compute what a
single thread computes (a first-use race in the oneDNN kernels once shifted a pool by 1.7e-3)."""

import subprocess
import sys
from pathlib import Path

from tiny_lm import save_tiny_llama, write_prompts

SCRIPT = """
import json, sys, torch
from causalnet.adapters import load
from causalnet.hydra.parallel import map_in_threads
adapter = load(sys.argv[1])
tokens = [adapter.encode(json.loads(line)["prompt"]) for line in open(sys.argv[2])]
chunks = [tokens[:32], tokens[32:]]
threaded = torch.cat(list(map_in_threads(lambda c: adapter.final_values(c), chunks, 2)))
serial = torch.cat([adapter.final_values(c) for c in chunks])
print(float((threaded - serial).abs().max()))
"""


def test_a_fresh_process_threads_first_linear_calls_agree_with_one_thread(tmp_path: Path):
    model = save_tiny_llama(tmp_path / "model")
    prompts = write_prompts(tmp_path / "prompts.jsonl", 60)
    for _ in range(2):  # each run is a fresh process: the first use happens in the threads
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(model), str(prompts)],
            check=True,
            capture_output=True,
            text=True,
        )
        assert float(out.stdout.strip().splitlines()[-1]) == 0.0
