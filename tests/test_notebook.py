"""The notebook executes end to end in quick mode (it reuses the quick demo's cache)."""
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "breadcrumbs_demo.ipynb"


@pytest.mark.slow
def test_notebook_executes_in_quick_mode(demo_cache, tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("BCJAX_CACHE", demo_cache)
    monkeypatch.setenv("BCJAX_NOTEBOOK_MODE", "quick")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "avg normalized accuracy" in text and "fine-tuned" in text
    assert (tmp_path / "subsets.png").exists() and (tmp_path / "cosine.png").exists()
