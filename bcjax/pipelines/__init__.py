"""Config-driven pipelines behind ``bcjax finetune`` / ``bcjax eval``.

A pipeline module (``bcjax.pipelines.<name>``) wires one model adapter (``bcjax.models``)
and its data (``bcjax.data``) to the shared model-agnostic loops in ``bcjax.train`` and
``bcjax.evaluate``. Each defines::

    finetune(config: dict, *, out_dir: str, progress: bool = True) -> dict
    evaluate(config: dict, *, out_dir: str, progress: bool = True) -> dict

and returns a JSON-serializable summary, and may define ``check_config(config)``, which
:func:`get_pipeline` calls so that an unknown key fails before any work. A config selects
its pipeline with the top-level key ``pipeline:``.
"""
from __future__ import annotations

import importlib

from bcjax.config import ConfigError, get

__all__ = ["PIPELINES", "get_pipeline"]

#: name → module implementing ``finetune`` / ``evaluate``
PIPELINES = {
    "clip": "bcjax.pipelines.clip",
    "t5": "bcjax.pipelines.t5",
}


def get_pipeline(config: dict):
    """The pipeline module named by ``config["pipeline"]``."""
    name = get(config, "pipeline", types=str)
    if name not in PIPELINES:
        raise ConfigError(f"{config.get('_source', '<config>')}: unknown pipeline {name!r}; "
                          f"known: {sorted(PIPELINES)}")
    module = importlib.import_module(PIPELINES[name])
    if hasattr(module, "check_config"):  # unknown keys fail here, before any work
        module.check_config(config)
    return module
