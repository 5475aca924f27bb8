"""Scaling-factor robustness (SPEC §4, Daheim et al. Fig. 2): accuracy of the all-task merge
against the scaling factor α, for task arithmetic and gradient matching by default (any method
with an ``alpha`` hyper-parameter), on the same α grid, with the pretrained model's line."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from bcjax.experiments.engine import jsonable, state_dir
from bcjax.experiments.registry import register_experiment
from bcjax.experiments.rows import merged_model, row_of_tree, score_rows, stored_row
from bcjax.experiments.settings import MethodSpec

__all__ = ["ScalingSettings", "scaling_experiment", "DEFAULT_ALPHAS"]

DEFAULT_ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def _default_methods() -> list[MethodSpec]:
    return [MethodSpec("task_arithmetic", {}), MethodSpec("gradient_matching", {"h0": 1.0})]


@dataclasses.dataclass(frozen=True)
class ScalingSettings:
    methods: list[MethodSpec] = dataclasses.field(default_factory=_default_methods)
    alphas: list[float] = dataclasses.field(default_factory=lambda: list(DEFAULT_ALPHAS))
    split: str = "test"
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0

    def check(self):
        if not self.alphas:
            raise ValueError("alphas must not be empty")


def scaling_experiment(suite, store, *, methods: Sequence[MethodSpec], alphas: Sequence[float], split: str = "test",
                       bootstrap_resamples: int = 1000, bootstrap_seed: int = 0, progress: bool = True) -> dict:
    """Per method and α: the all-task merge with ``alpha = α`` (other hyper-parameters from the
    method's entry) scored on every task; ``curves[method][α]`` = average accuracy, ``results``
    the rows of :func:`bcjax.experiments.rows.score_rows` (``"<method>@<α>"``), ``pretrained`` θ0's
    average accuracy (the horizontal line)."""
    from bcjax.evaluate import stack_trees
    from bcjax.experiments.engine import progress_bar
    from bcjax.merging import get_method

    for m in methods:
        if "alpha" not in get_method(m.name).tunable:
            raise ValueError(f"scaling: method {m.name!r} has no hyper-parameter 'alpha'")
    tasks = list(suite.tasks)
    points = [(m.name, {**dict(m.hparams), "alpha": float(a)}) for m in methods for a in alphas]

    def key(model, hp):
        return dict(kind="scaling", suite=suite.fingerprint, split=split, model=model, hparams=jsonable(hp))

    rows = {"pretrained": stored_row(store, key("pretrained", {}), tasks, lambda missing: row_of_tree(
        suite, stack_trees([suite.pretrained]), missing, split))}
    finetuned = {t: stored_row(store, key("finetuned", {"task": t}), [t], lambda missing, i=i: row_of_tree(
        suite, stack_trees([suite.finetuned[i]]), missing, split))[t] for i, t in enumerate(tasks)}
    bar = progress_bar(len(points), "scaling", progress)
    for name, hp in points:
        rows[f"{name}@{hp['alpha']:g}"] = stored_row(store, key(name, hp), tasks, lambda missing, name=name, hp=hp:
                                                     row_of_tree(suite, merged_model(suite, name, hp, work_dir=state_dir(store)), missing, split))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    scored = score_rows(rows, finetuned, num_resamples=bootstrap_resamples, seed=bootstrap_seed)
    curves = {m.name: {f"{a:g}": scored[f"{m.name}@{float(a):g}"]["average"] for a in alphas} for m in methods}
    bands = {m.name: {f"{a:g}": scored[f"{m.name}@{float(a):g}"]["average_ci95"] for a in alphas} for m in methods}
    best = {m: max(c, key=c.get) for m, c in curves.items()}
    return {"split": split, "alphas": [float(a) for a in alphas], "curves": curves, "curves_ci95": bands,
            "best_alpha": best, "pretrained": scored["pretrained"]["average"], "results": scored,
            "finetuned_average": float(np.mean([np.mean(finetuned[t]) for t in tasks]))}


def _figures(res: dict, suite) -> dict:
    from bcjax import plots

    return {"scaling": ("scaling.png", plots.scaling_curves(
        res["curves"], None, intervals=res["curves_ci95"],
        references={"pretrained": res["pretrained"], "fine-tuned (own task)": res["finetuned_average"]}))}


@register_experiment("scaling", settings=ScalingSettings, figures=_figures)
def run(suite, store, s: ScalingSettings, *, chunk=None, mesh=None, progress=True) -> dict:
    """Scaling-factor robustness: accuracy against α (Daheim et al. Fig. 2)."""
    return scaling_experiment(suite, store, methods=s.methods, alphas=s.alphas, split=s.split,
                              bootstrap_resamples=s.bootstrap_resamples, bootstrap_seed=s.bootstrap_seed,
                              progress=progress)
