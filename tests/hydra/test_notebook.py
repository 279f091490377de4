"""examples/self_repair.ipynb runs as written on the bundled model (slow tier), so it never
rots: executed top to bottom with nbclient; any cell that raises fails the test (the notebook
asserts its own identities: direct effects sum to the centred logit, the repair split)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "self_repair.ipynb"


@pytest.mark.slow
def test_self_repair_notebook_executes_on_the_bundled_model():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "target: ' Europe'" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, "the compensation map was drawn"


def test_self_repair_notebook_is_a_valid_notebook_without_stored_outputs():
    """Stored clean: no outputs or execution counts in the repository (they come from the run)."""
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert len(code) >= 8
    assert all(not c.outputs and c.execution_count is None for c in code)
