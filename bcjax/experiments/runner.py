"""``bcjax sweep``: run the experiment a config names on the suite it names, write
``results.jsonl`` (every evaluated point; reruns resume from it), ``summary.json``, PNGs and the
experiment's report files (e.g. ``report.json`` / ``report.md`` of ``fusionbench``)."""
from __future__ import annotations

import json
import os
from typing import Mapping

from bcjax.config import ConfigError, get
from bcjax.experiments.engine import jsonable
from bcjax.experiments.registry import experiments
from bcjax.experiments.settings import parse_section, sweep_mesh, where
from bcjax.experiments.suite import ModelSuite, model_suite

__all__ = ["run_sweep", "EXPERIMENTS"]


def _load_builtin() -> None:
    # each module registers its experiment on import
    from bcjax.experiments import (class_split, cosine, fusionbench, generalization, grid,  # noqa: F401
                                   robustness, scaling, select, subsets, target_task, validation_free)


_load_builtin()

#: Registered experiment names (built-in ones; see :func:`bcjax.experiments.experiments`).
EXPERIMENTS = tuple(experiments())


def run_sweep(config: Mapping, *, out_dir: str, progress: bool = True, suite: ModelSuite | None = None) -> dict:
    """Run the experiment named by ``config["experiment"]`` on the suite named by
    ``config["suite"]`` (or the given ``suite``); write ``results.jsonl``, ``summary.json``
    and PNG plots to ``out_dir``; return the JSON-serializable summary. The experiment's
    typed settings are parsed first, so a misspelt key fails before any model is loaded."""
    from bcjax.results_store import ResultsStore

    if "train" in config:  # a sweep's models are fine-tuned by its suite, configured under suite.train
        raise ConfigError(f"{where(config)}: unknown key 'train' in a sweep config; training settings of the "
                          "suite's fine-tunes go under suite.train (e.g. --set suite.train.steps=100)")
    kind = get(config, "experiment", types=str)
    registered = experiments()
    if kind not in registered:
        raise ConfigError(f"{where(config)}: unknown experiment {kind!r}; known: {tuple(registered)}")
    exp = registered[kind]
    settings = parse_section(exp.settings, config)
    mesh = sweep_mesh(config)
    chunk = get(config, "models_per_call", None, types=(int, type(None)))
    results = get(config, "results", os.path.join(out_dir, "results.jsonl"), types=str)
    suite = suite or model_suite(config, progress=progress)  # a suite builder checks its keys before loading
    os.makedirs(out_dir, exist_ok=True)
    store = ResultsStore(results)
    res = exp.run(suite, store, settings, chunk=chunk, mesh=mesh, progress=progress)
    plots = {}
    for name, (filename, fig) in exp.figures(res, suite).items():
        fig.savefig(os.path.join(out_dir, filename), dpi=120)
        plots[name] = filename
    summary = jsonable({"experiment": kind, "suite": suite.name, "tasks": list(suite.tasks), **res,
                        "plots": plots, "results_file": store.path, "points_stored": len(store)})
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for filename, text in exp.report(summary, plots).items():
        with open(os.path.join(out_dir, filename), "w") as f:
            f.write(text)
    return summary
