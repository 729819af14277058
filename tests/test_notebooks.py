"""Every notebook executes top to bottom, and is committed with its outputs.

The test runs each notebook at its default sizes except where ``SMALLER`` names a parameter assignment to
shrink (the committed outputs show the default sizes): the same cells run, on less work.
"""

from __future__ import annotations

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))

# notebook -> (assignment as written in the notebook, the one the test runs instead): each must occur exactly
# once, so that an edit of the notebook that drops a parameter fails here rather than silently running big.
SMALLER = {
    "dlm.ipynb": [("STEPS = 250", "STEPS = 20")],
    "real_attention.ipynb": [("LENGTH, BLOCK, SPARSITY = 1024, 64, 0.8", "LENGTH, BLOCK, SPARSITY = 512, 64, 0.8")],
    "quickstart.ipynb": [("LENGTH, BLOCK = 1024, 64", "LENGTH, BLOCK = 512, 64")],
    "attention_maps.ipynb": [("LENGTH, BLOCK, SPARSITY = 1024, 64, 0.75", "LENGTH, BLOCK, SPARSITY = 512, 64, 0.75")],
}


def with_smaller_sizes(nb, name):
    for old, new in SMALLER.get(name, []):
        cells = [c for c in nb.cells if c.cell_type == "code" and old in c.source]
        assert len(cells) == 1 and cells[0].source.count(old) == 1, f"{name}: expected {old!r} once"
        cells[0].source = cells[0].source.replace(old, new)
    return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    nb = with_smaller_sizes(nbformat.read(path, as_version=4), path.name)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, "\n".join(f"{e.ename}: {e.evalue}" for e in errors)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_executed(path):
    """Readers see the results without running anything: every code cell ran, in order, without an error."""
    code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "execute the notebook top to bottom and save it"
    assert not any(o.output_type == "error" for c in code for o in c.outputs)
