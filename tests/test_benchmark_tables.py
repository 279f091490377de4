"""The README's benchmark tables are the benchmark scripts' own rendering of the recorded
results (a number in the README is one that ran)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench_generic():
    path = ROOT / "benchmarks" / "bench_generic.py"
    spec = importlib.util.spec_from_file_location("bench_generic_for_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # it imports bench_sweep and machine beside it
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def test_readme_generic_speed_table_is_rendered_from_the_recorded_result():
    readme = (ROOT / "README.md").read_text()
    block = re.search(
        r"<!-- bench_generic:start -->\n(.*?)<!-- bench_generic:end -->", readme, re.S
    )
    assert block is not None, "the README has no bench_generic table"
    cited = re.search(r"--summary (benchmarks/results/[\w.-]+\.json)", readme)
    assert cited is not None
    result = json.loads((ROOT / cited.group(1)).read_text())
    assert block.group(1) == _bench_generic().summary_table(result)
