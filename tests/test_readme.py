"""The README's Python blocks run as written (the real-model block in the slow tier)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_engine_block_runs_and_its_commented_values_hold():
    block = next(b for b in _python_blocks() if "from causalnet import SCM" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    scm, ctx = namespace["scm"], namespace["ctx"]
    y = scm.run(ctx)["y"]
    assert y.tolist() == [6.0, 20.0, 42.0]
    x, m = scm.run(ctx)["x"], scm.run(ctx)["m"]
    assert scm.total_effect("x", "y", ctx, value=0.0).tolist() == (-y).tolist()
    assert scm.direct_effect("x", "y", ctx, value=0.0).tolist() == (-x).tolist()
    assert scm.indirect_effect("x", "y", ctx, value=0.0).tolist() == (-m).tolist()


@pytest.mark.slow
def test_readme_adapter_block_runs_on_the_bundled_model():
    block = next(b for b in _python_blocks() if "causalnet.adapters" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    clean, run, te = namespace["clean"], namespace["run"], namespace["te"]
    assert namespace["adapter"].tokenizer.decode([clean.target]) == " Europe"
    final = te[0, -1]  # the SCM's total effect on the last position's logits
    centred = (final[clean.target] - final.mean()).detach()
    assert float(centred) == pytest.approx(float(run.total_effect[0, 0]), abs=1e-4)
