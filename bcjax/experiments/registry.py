"""Experiments registered by name: ``bcjax sweep`` runs the one named by ``experiment:``.

An experiment is a typed settings dataclass (its config section, parsed by
:func:`bcjax.experiments.settings.parse_section`), ``run(suite, store, settings, *, chunk,
mesh, progress) -> dict`` (JSON-serializable results), ``figures(results, suite) ->
{name: (filename, matplotlib Figure)}`` (drawn by :mod:`bcjax.plots`, saved by the runner) and,
optionally, ``report(summary, plots) -> {filename: text}`` (extra files the runner writes, e.g.
``report.json`` / ``report.md``; ``plots`` maps figure names to their file names).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

__all__ = ["Experiment", "register_experiment", "experiments", "get_experiment"]


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    settings: type
    run: Callable[..., dict]
    figures: Callable[[dict, Any], dict] = lambda results, suite: {}
    summary: str = ""
    report: Callable[[dict, dict], dict] = lambda summary, plots: {}


_EXPERIMENTS: dict[str, Experiment] = {}


def register_experiment(name: str, *, settings: type, figures: Callable[[dict, Any], dict] | None = None,
                        report: Callable[[dict, dict], dict] | None = None):
    """Decorator registering ``run(suite, store, settings, *, chunk, mesh, progress) -> dict``."""

    def deco(run):
        doc = (run.__doc__ or "").strip().split("\n")[0]
        _EXPERIMENTS[name] = Experiment(name, settings, run, figures or (lambda results, suite: {}), doc,
                                        report or (lambda summary, plots: {}))
        return run

    return deco


def experiments() -> dict[str, Experiment]:
    return dict(_EXPERIMENTS)


def get_experiment(name: str) -> Experiment | None:
    return _EXPERIMENTS.get(name)
