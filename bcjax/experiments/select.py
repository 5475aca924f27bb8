"""Select on validation, then test (SPEC §4): per method, every point of its grid merges all
tasks and is scored on ``val``; the best (highest average normalized accuracy) is scored on
``test``. Runs any registered method: what a method requires (PRNG key, Fishers, ...) comes
from the suite (:func:`bcjax.experiments.engine.method_inputs`)."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from bcjax.experiments.engine import evaluate_models, jsonable, lazy_builder, normalized, reference_accuracy
from bcjax.experiments.registry import register_experiment
from bcjax.experiments.settings import MethodSpec
from bcjax.experiments.subsets import DEFAULT_METHODS

__all__ = ["SelectSettings", "select_and_test"]


@dataclasses.dataclass(frozen=True)
class SelectSettings:
    methods: list[MethodSpec] = dataclasses.field(default_factory=lambda: list(DEFAULT_METHODS))
    select_split: str = "val"
    test_split: str = "test"

    def check(self):
        if self.select_split == self.test_split:
            raise ValueError(f"select_split and test_split must differ, both are {self.test_split!r}")


def select_and_test(suite, store, *, methods: Sequence[MethodSpec], select_split: str = "val",
                    test_split: str = "test", progress: bool = True) -> dict:
    """Per method: its grid (:meth:`MethodSpec.points`) scored on ``select_split`` with all
    tasks merged, the best point scored on ``test_split``. Returns ``methods`` (per method:
    hparams, acc, normalized_acc, avg_normalized_acc, avg_acc, val_avg_normalized_acc — the
    demo's results.json schema) and ``validation_grid``."""
    ref_val = reference_accuracy(suite, store, select_split)
    ref_test = reference_accuracy(suite, store, test_split)
    everything = np.ones((1, len(suite.tasks)), bool)
    tasks = [list(suite.tasks)]

    def scored(name, hp, split):
        key = dict(kind="select", suite=suite.fingerprint, split=split, method=name, hparams=jsonable(hp))
        build = lazy_builder(suite, name, hp, everything, contract=False)  # the core merge itself
        return evaluate_models(suite, store, [key], tasks, build, split, chunk=1, progress=False)[0]

    methods_out, grid_out = {}, {}
    for spec in methods:
        best = None
        for hp in spec.points():
            score = float(np.mean(list(normalized(scored(spec.name, hp, select_split), ref_val).values())))
            grid_out.setdefault(spec.name, []).append({"hparams": jsonable(hp), "val_avg_normalized_acc": score})
            if best is None or score > best[0]:
                best = (score, hp)
        acc = scored(spec.name, best[1], test_split)
        norm = normalized(acc, ref_test)
        methods_out[spec.name] = {"hparams": jsonable(best[1]), "acc": acc, "normalized_acc": norm,
                                  "avg_normalized_acc": float(np.mean(list(norm.values()))),
                                  "avg_acc": float(np.mean(list(acc.values()))), "val_avg_normalized_acc": best[0]}
    return {"select_split": select_split, "test_split": test_split, "finetuned_acc": ref_test,
            "finetuned_val_acc": ref_val, "methods": methods_out, "validation_grid": grid_out}


def _figures(res: dict, suite) -> dict:
    from bcjax import plots

    return {"per_task": ("normalized_accuracy.png", plots.per_task_bars(
        {m: r["normalized_acc"] for m, r in res["methods"].items()}, list(suite.tasks), None))}


@register_experiment("select", settings=SelectSettings, figures=_figures)
def run(suite, store, s: SelectSettings, *, chunk=None, mesh=None, progress=True) -> dict:
    """Select each method's hyper-parameters on val, report test."""
    return select_and_test(suite, store, methods=s.methods, select_split=s.select_split, test_split=s.test_split,
                           progress=progress)
