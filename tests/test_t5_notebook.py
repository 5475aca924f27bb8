"""The T5 target-task notebook executes end to end in tiny offline mode (BCJAX_TINY=1)."""
import os
import pathlib

import nbformat
from nbclient import NotebookClient
from t5_fixtures import t5_tiny  # noqa: F401  (fixture)

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "t5_target_task.ipynb"


def test_t5_notebook_executes_in_tiny_mode(t5_tiny, tmp_path, monkeypatch):  # noqa: F811
    nb = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("BCJAX_TINY", "1")
    monkeypatch.setenv("BCJAX_T5_TINY_ROOT", str(pathlib.Path(t5_tiny["model"]).parent))
    monkeypatch.setenv("BCJAX_T5_OUT", str(tmp_path / "out"))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    cache = os.environ.get("BCJAX_TEST_JAX_CACHE", str(NOTEBOOK.parent.parent / ".jax_cache"))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.path.abspath(cache))  # the kernel shares the tests' cache
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "prediction: rank" in text
    for method in ("finetuned", "task_arithmetic", "breadcrumbs"):
        assert f"mrpc   {method}" in text
    assert (tmp_path / "out" / "eval.json").exists()
