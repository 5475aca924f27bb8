"""Shared tiny offline T5 assets for the tests/test_t5*.py files (built once per session:
``tiny_assets`` is idempotent in the session's base temp folder)."""
import pytest

from bcjax.testing.t5_offline import tiny_assets


@pytest.fixture(scope="session")
def t5_tiny(tmp_path_factory):
    """``{"model": folder with a random tiny Flax T5 + locally trained tokenizer,
    "data_dir": tfds folder with synthetic glue/<task> data}``."""
    return tiny_assets(str(tmp_path_factory.getbasetemp() / "t5_tiny"))


@pytest.fixture(scope="session")
def t5_loaded(t5_tiny):
    from bcjax.models.t5 import load_t5, load_tokenizer

    model, params = load_t5(t5_tiny["model"])
    return model, params, load_tokenizer(t5_tiny["model"])
