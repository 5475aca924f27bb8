"""notebooks/clip_8tasks.ipynb executes end to end in its offline tiny mode (BCJAX_TINY=1)."""
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "clip_8tasks.ipynb"


@pytest.mark.slow
def test_clip_notebook_executes_in_tiny_mode(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("BCJAX_TINY", "1")
    monkeypatch.setenv("BCJAX_CLIP_OUT", str(tmp_path / "out"))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    cache = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.environ.get("BCJAX_TEST_JAX_CACHE", str(cache)))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "tiny offline mode" in text and "breadcrumbs" in text and "fine-tuned" in text
    assert (tmp_path / "out" / "clip_8tasks.png").exists() and (tmp_path / "out" / "summary_eval.json").exists()
