"""Select on validation, then test (SPEC §4): per method, every point of its grid merges all
tasks and is scored on ``val``; the best (highest average normalized accuracy) is scored on
``test``. Runs any registered method: what a method requires (PRNG key, Fishers, ...) comes
from the suite (:func:`bcjax.experiments.engine.method_inputs`)."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from bcjax.experiments.engine import (evaluate_correctness, evaluate_models, jsonable, lazy_builder, normalized,
                                     reference_accuracy, reference_correctness, state_dir)
from bcjax.experiments.registry import register_experiment
from bcjax.experiments.settings import MethodSpec
from bcjax.experiments.subsets import DEFAULT_METHODS

__all__ = ["SelectSettings", "select_and_test"]


@dataclasses.dataclass(frozen=True)
class SelectSettings:
    methods: list[MethodSpec] = dataclasses.field(default_factory=lambda: list(DEFAULT_METHODS))
    select_split: str = "val"
    test_split: str = "test"
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0

    def check(self):
        if self.select_split == self.test_split:
            raise ValueError(f"select_split and test_split must differ, both are {self.test_split!r}")


def select_and_test(suite, store, *, methods: Sequence[MethodSpec], select_split: str = "val",
                    test_split: str = "test", progress: bool = True, bootstrap_resamples: int = 1000,
                    bootstrap_seed: int = 0) -> dict:
    """Per method: its grid (:meth:`MethodSpec.points`) scored on ``select_split`` with all
    tasks merged, the best point scored on ``test_split``. Returns ``methods`` (per method:
    hparams, acc, normalized_acc, avg_normalized_acc, avg_acc, val_avg_normalized_acc — the
    demo's results.json schema) and ``validation_grid``.

    When the suite provides per-example correctness (``suite.correctness``) the test scores
    are derived from it (one evaluation pass) and SPEC §4 "Uncertainty" is added
    (:func:`uncertainty`): per method ``avg_normalized_acc_ci95``, ``normalized_acc_ci95``,
    ``avg_acc_ci95`` and ``delta_vs_task_arithmetic`` (when task arithmetic is among the
    methods), ``references`` (pretrained θ0 and fine-tuned θk with the same fields),
    ``test_examples_per_task`` and ``bootstrap`` (its settings)."""
    ref_val = reference_accuracy(suite, store, select_split)
    ref_test = reference_accuracy(suite, store, test_split)
    everything = np.ones((1, len(suite.tasks)), bool)
    tasks = [list(suite.tasks)]

    per_example = suite.correctness is not None
    correct = {}

    def scored(name, hp, split):
        key = dict(kind="select", suite=suite.fingerprint, split=split, method=name, hparams=jsonable(hp))
        # the core merge itself; a method's saved state (e.g. AdaMerging's learned λ) is kept under the run's
        # folder, so the chosen point is not re-learned when it is scored on test
        build = lazy_builder(suite, name, hp, everything, contract=False, work_dir=state_dir(store))
        if per_example and split == test_split:
            accs, hits = evaluate_correctness(suite, store, [key], tasks, build, split, chunk=1, progress=False)
            correct[name] = hits[0]
            return accs[0]
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
    out = {"select_split": select_split, "test_split": test_split, "finetuned_acc": ref_test,
           "finetuned_val_acc": ref_val, "methods": methods_out, "validation_grid": grid_out}
    if per_example:
        refs = reference_correctness(suite, store, test_split)
        out.update(uncertainty(methods_out, correct, refs, num_resamples=bootstrap_resamples, seed=bootstrap_seed))
    return out


def uncertainty(methods_out: dict, correct: dict, refs: dict, *, num_resamples: int = 1000, seed: int = 0) -> dict:
    """Bootstrap intervals (:func:`bcjax.stats.method_intervals`, paired over the test
    examples, the fine-tuned normalizer resampled too) added in place to ``methods_out`` and
    returned for the references: ``{"references", "test_examples_per_task", "bootstrap"}``.

    ``correct``: ``{method: {task: bool[n_t]}}`` of each method's chosen merge; ``refs``:
    :func:`bcjax.experiments.engine.reference_correctness`. The fine-tuned reference's
    normalized accuracy is 1 by definition (interval [1, 1]); its raw ``acc`` / ``avg_acc``
    (and ``avg_acc_ci95``) carry its information."""
    from bcjax import stats

    ft = refs["finetuned"]
    tasks = list(ft)
    everyone = {m: {t: hits[t] for t in tasks}  # one task order for all (the store's JSON sorts keys)
                for m, hits in [*((m, correct[m]) for m in methods_out), ("pretrained", refs["pretrained"]),
                                ("finetuned", ft)]}
    baseline = "task_arithmetic" if "task_arithmetic" in methods_out else None
    norm = stats.method_intervals(everyone, ft, baseline=baseline, num_resamples=num_resamples, seed=seed)
    raw = stats.method_intervals(everyone, None, num_resamples=num_resamples, seed=seed)

    def fields(name):
        f = {"avg_normalized_acc_ci95": norm[name]["avg"]["ci95"],
             "normalized_acc_ci95": {t: v["ci95"] for t, v in norm[name]["per_task"].items()},
             "avg_acc_ci95": raw[name]["avg"]["ci95"]}
        if baseline is not None:
            f["delta_vs_task_arithmetic"] = norm[name]["delta_vs_task_arithmetic"]
        return f

    for m in methods_out:
        methods_out[m].update(fields(m))
    references = {}
    for name, hits in (("pretrained", refs["pretrained"]), ("finetuned", ft)):
        acc = {t: float(np.count_nonzero(hits[t]) / hits[t].size) for t in tasks}
        references[name] = {"acc": acc, "normalized_acc": {t: v["mean"] for t, v in norm[name]["per_task"].items()},
                            "avg_normalized_acc": norm[name]["avg"]["mean"],
                            "avg_acc": float(np.mean(list(acc.values()))), **fields(name)}
    references["finetuned"]["note"] = ("normalized accuracy is 1 by definition (each task's own fine-tuned model "
                                       "is the normalizer); acc / avg_acc are its raw accuracies")
    return {"references": references, "test_examples_per_task": {t: int(ft[t].size) for t in tasks},
            "bootstrap": {"resamples": int(num_resamples), "seed": int(seed), "level": 0.95,
                          "method": "percentile bootstrap over test examples, paired across models; the fine-tuned "
                                    "normalizer is resampled with the numerator (bcjax.stats)"}}


def _figures(res: dict, suite) -> dict:
    from bcjax import plots

    intervals = {m: r["normalized_acc_ci95"] for m, r in res["methods"].items() if "normalized_acc_ci95" in r}
    return {"per_task": ("normalized_accuracy.png", plots.per_task_bars(
        {m: r["normalized_acc"] for m, r in res["methods"].items()}, list(suite.tasks), None,
        intervals=intervals or None))}


@register_experiment("select", settings=SelectSettings, figures=_figures)
def run(suite, store, s: SelectSettings, *, chunk=None, mesh=None, progress=True) -> dict:
    """Select each method's hyper-parameters on val, report test."""
    return select_and_test(suite, store, methods=s.methods, select_split=s.select_split, test_split=s.test_split,
                           progress=progress, bootstrap_resamples=s.bootstrap_resamples,
                           bootstrap_seed=s.bootstrap_seed)
