"""Robustness (SPEC §4, FusionBench Table 6): every method merged once over all tasks, scored on
the clean test sets and on the test sets under each corruption of Hendrycks & Dietterich
(:data:`bcjax.data.corruptions.CORRUPTIONS`) at one severity (default 3), deterministic per
image; the pretrained model θ0 and each task's own fine-tuned model θk as reference rows.

The merges are made once, on clean data: AdaMerging adapts its coefficients on the clean
unlabeled test inputs and is then scored under each corruption like every other method.
Corrupted inputs come from ``suite.corrupt`` (image suites: :func:`bcjax.data.corruptions.corrupt`).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from bcjax.experiments.engine import jsonable, state_dir
from bcjax.experiments.registry import register_experiment
from bcjax.experiments.rows import labelled, merged_model, needs, row_of_tree, score_rows, stored_row
from bcjax.experiments.settings import MethodSpec
from bcjax.experiments.subsets import DEFAULT_METHODS

__all__ = ["RobustnessSettings", "robustness_experiment", "check_corruptions", "CLEAN"]

#: The key of the uncorrupted test sets in the results.
CLEAN = "clean"


def _all_corruptions() -> list[str]:
    from bcjax.data.corruptions import CORRUPTIONS

    return list(CORRUPTIONS)


@dataclasses.dataclass(frozen=True)
class RobustnessSettings:
    methods: list[MethodSpec] = dataclasses.field(default_factory=lambda: list(DEFAULT_METHODS))
    corruptions: list[str] = dataclasses.field(default_factory=_all_corruptions)
    severity: int = 3
    seed: int = 0  # the corruptions' seed (image i of a test set: (seed, corruption, i))
    split: str = "test"
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0

    def check(self):
        check_corruptions(self.corruptions, self.severity)


def check_corruptions(corruptions, severity) -> None:
    """ValueError naming the key unless every corruption is known and the severity is 1..5."""
    from bcjax.data.corruptions import CORRUPTIONS, SEVERITIES

    bad = [c for c in corruptions if c not in CORRUPTIONS]
    if bad:
        raise ValueError(f"corruptions: unknown {bad}; known: {list(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be in {list(SEVERITIES)}, got {severity}")


def robustness_experiment(suite, store, *, methods: Sequence[MethodSpec], corruptions: Sequence[str],
                          severity: int = 3, seed: int = 0, split: str = "test", bootstrap_resamples: int = 1000,
                          bootstrap_seed: int = 0, progress: bool = True, merged: Mapping | None = None,
                          labels: Sequence[str] | None = None) -> dict:
    """Per condition (``"clean"`` and each corruption): the rows of every method (one fixed
    hyper-parameter point each) and of ``pretrained`` / ``finetuned`` (θk on task k), as
    :func:`bcjax.experiments.rows.score_rows` (per-task accuracy, average with its 95% interval,
    normalized average: each condition normalized by θk on the same corrupted examples).
    ``merged``: already-built ``{label: stacked tree}`` to reuse (else merged here); rows are
    keyed by :func:`bcjax.experiments.rows.labelled`, or by ``labels`` (one per method) when given."""
    from bcjax.evaluate import stack_trees
    from bcjax.experiments.engine import progress_bar

    needs(suite, "examples", "corrupt", what="the robustness experiment")
    tasks = list(suite.tasks)
    conditions = [CLEAN, *corruptions]
    inputs_cache: dict = {}

    def corrupted(condition):
        if condition == CLEAN:
            return None

        def inputs(t):
            if (condition, t) not in inputs_cache:
                x = suite.examples(t, split)[0]
                inputs_cache[(condition, t)] = suite.corrupt(x, condition, severity, seed)
            return inputs_cache[(condition, t)]

        return inputs

    def key(condition, model, hp=None):
        return dict(kind="robustness", suite=suite.fingerprint, split=split, condition=condition,
                    severity=None if condition == CLEAN else severity, seed=seed, model=model,
                    hparams=jsonable(hp or {}))

    specs = labelled(methods) if labels is None else [(lab, m.name, dict(m.points()[0])) for lab, m in
                                                      zip(labels, methods, strict=True)]
    rows = {c: {} for c in conditions}
    hparams = {}
    bar = progress_bar(len(specs) + 2, "robustness", progress)
    models = [("pretrained", None, lambda: stack_trees([suite.pretrained]))]
    models += [(label, hp, lambda label=label, name=name, hp=hp: merged[label] if merged and label in merged
                else merged_model(suite, name, hp, work_dir=state_dir(store))) for label, name, hp in specs]
    for name, hp, build in models:
        state = {}

        def tree(build=build, state=state):
            if "tree" not in state:
                state["tree"] = build()
            return state["tree"]

        for c in conditions:
            rows[c][name] = stored_row(store, key(c, name, hp), tasks,
                                       lambda missing, c=c: row_of_tree(suite, tree(), missing, split, corrupted(c)))
        if hp is not None:
            hparams[name] = jsonable(hp)
        if bar is not None:
            bar.update(1)
    for c in conditions:  # θk on its own task k
        rows[c]["finetuned"] = {t: stored_row(store, key(c, "finetuned", {"task": t}), [t],
                                              lambda missing, i=i, c=c: row_of_tree(
                                                  suite, stack_trees([suite.finetuned[i]]), missing, split,
                                                  corrupted(c)))[t]
                                for i, t in enumerate(tasks)}
    if bar is not None:
        bar.update(1)
        bar.close()
    out = {c: score_rows(rows[c], rows[c]["finetuned"], num_resamples=bootstrap_resamples, seed=bootstrap_seed,
                         hparams=hparams) for c in conditions}
    return {"split": split, "severity": severity, "seed": seed, "conditions": conditions, "results": out,
            "table": {c: {m: r["average"] for m, r in out[c].items()} for c in conditions},
            "note": "merged once on clean data (AdaMerging adapts on the clean unlabeled test inputs); each "
                    "condition normalized by the fine-tuned models on the same corrupted examples"}


def _figures(res: dict, suite) -> dict:
    from bcjax import plots

    table = res["table"]
    methods = [m for m in table[CLEAN]]
    return {"robustness": ("robustness.png", plots.per_task_bars(
        {m: {c: table[c][m] for c in res["conditions"]} for m in methods}, res["conditions"], None,
        ylabel=f"average accuracy (%), severity {res['severity']}"))}


@register_experiment("robustness", settings=RobustnessSettings, figures=_figures)
def run(suite, store, s: RobustnessSettings, *, chunk=None, mesh=None, progress=True) -> dict:
    """Robustness: methods on clean and corrupted test sets (FusionBench Table 6)."""
    return robustness_experiment(suite, store, methods=s.methods, corruptions=s.corruptions, severity=s.severity,
                                 seed=s.seed, split=s.split, bootstrap_resamples=s.bootstrap_resamples,
                                 bootstrap_seed=s.bootstrap_seed, progress=progress)
