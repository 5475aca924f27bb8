"""Test-session setup: 8 fake CPU devices (sharding tests) and a persistent compile cache.

Both must be configured before JAX initialises its backends, hence at import time here.
"""
import os

import jax

jax.config.update("jax_num_cpu_devices", 8)
_CACHE = os.environ.get("BCJAX_TEST_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """One cold bcjax cache shared by the demo test and the notebook test (the notebook then
    reuses the quick demo's fine-tunes). ``bash run.sh test`` runs them in separate pytest
    processes and passes one fresh folder to both as ``BCJAX_TEST_DEMO_CACHE``."""
    shared = os.environ.get("BCJAX_TEST_DEMO_CACHE")
    return shared if shared else str(tmp_path_factory.mktemp("bcjax_cache"))
