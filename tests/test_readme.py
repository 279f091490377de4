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


MODULE_DIRS = ("causalnet", "adapters", "benchmarks", "examples")


def _layout_rows() -> list[tuple[str, str]]:
    """The README's "## Layout" table as (where, what) pairs: where is the backticked path."""
    section = README.read_text(encoding="utf-8").split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        match = re.match(r"^\| `([^`]+)` \|(.*)\|\s*$", line)
        if match:
            rows.append((match.group(1), match.group(2)))
    return rows


def _modules() -> list[str]:
    root = README.parent
    return sorted(
        p.relative_to(root).as_posix()
        for d in MODULE_DIRS
        for p in (root / d).rglob("*.py")
        if "__pycache__" not in p.parts
    )


def _listed(module: str, rows: list[tuple[str, str]]) -> bool:
    """Named by its own row, or by its basename (in backticks) in its folder's row; a package's
    ``__init__.py`` is listed by its folder's row."""
    folder, name = module.rsplit("/", 1)
    for where, what in rows:
        if where == module:
            return True
        if where == folder + "/" and (name == "__init__.py" or f"`{name}`" in what):
            return True
    return False


def test_readme_layout_table_lists_every_module():
    rows = _layout_rows()
    assert len(rows) >= 8, "the layout table was found"
    assert _listed("adapters/base.py", rows), "a folder row lists its files"
    assert not _listed("adapters/nonexistent.py", rows)
    assert [m for m in _modules() if not _listed(m, rows)] == []


def test_readme_layout_table_names_only_files_that_exist():
    root = README.parent
    stale = []
    for where, what in _layout_rows():
        if not (root / where).exists():
            stale.append(where)
        elif where.endswith("/"):
            stale += [where + f for f in re.findall(r"`([\w.]+\.py)`", what)]
            stale = [s for s in stale if not (root / s).exists()]
    assert stale == []
