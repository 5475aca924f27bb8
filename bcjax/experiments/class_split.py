"""Fig. 4: one data set's classes split into tasks; merge tasks 0 … i after each new task (SPEC §4)."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from bcjax.experiments.engine import (evaluate_points, jsonable, lazy_builder, mean_normalized, members,
                                     reference_accuracy, reference_correctness)
from bcjax.experiments.registry import register_experiment
from bcjax.experiments.settings import MethodSpec
from bcjax.experiments.subsets import DEFAULT_METHODS, _pairs

__all__ = ["ClassSplitSettings", "class_split_experiment", "split_classes", "class_subset", "prefix_indicator"]


@dataclasses.dataclass(frozen=True)
class ClassSplitSettings:
    methods: list[MethodSpec] = dataclasses.field(default_factory=lambda: list(DEFAULT_METHODS))
    split: str = "test"
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0


def split_classes(num_classes: int, classes_per_task: int, order: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """Split classes ``0 … C−1`` (in ``order``, default ascending) into consecutive tasks of
    ``classes_per_task`` classes (SPEC §4, class-split sequences). C must divide evenly."""
    order = list(range(num_classes)) if order is None else [int(c) for c in order]
    if sorted(order) != list(range(num_classes)):
        raise ValueError(f"class order must be a permutation of 0..{num_classes - 1}, got {order}")
    if classes_per_task < 1 or num_classes % classes_per_task:
        raise ValueError(f"{num_classes} classes cannot be split into tasks of {classes_per_task} classes")
    return [tuple(order[i:i + classes_per_task]) for i in range(0, num_classes, classes_per_task)]


def class_subset(x: np.ndarray, y: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The examples of ``classes``, relabelled 0 … k−1 in the order of ``classes``."""
    classes = [int(c) for c in classes]
    lut = np.full(int(max(int(np.max(y, initial=0)), max(classes))) + 1, -1, np.int32)
    lut[classes] = np.arange(len(classes), dtype=np.int32)
    keep = np.isin(y, classes)
    return x[keep], lut[y[keep]]


def prefix_indicator(num_tasks: int) -> np.ndarray:
    """bool[T, T]: row i merges tasks 0 … i (the class-split sequence's i-th step)."""
    return np.tril(np.ones((num_tasks, num_tasks), bool))


def class_split_experiment(suite, store, *, methods: Sequence, split: str = "test", chunk: int | None = None,
                           progress: bool = True, mesh=None, bootstrap_resamples: int = 1000,
                           bootstrap_seed: int = 0) -> dict:
    """Fig. 4: after each new task i, merge tasks 0 … i and evaluate on all of them (each
    with its own head). Linear methods use one contraction per leaf for all steps. With
    per-example correctness each step carries ``avg_acc_ci95`` and ``avg_normalized_acc_ci95``
    (percentile bootstrap over the test examples, :func:`bcjax.stats.method_intervals`)."""
    ref = reference_accuracy(suite, store, split)
    ind = prefix_indicator(len(suite.tasks))
    out = {}
    for method, hp in _pairs(methods):
        keys = [dict(kind="class_split", suite=suite.fingerprint, split=split, method=method, hparams=jsonable(hp),
                     subset=[int(v) for v in row]) for row in ind]
        tasks_of = [members(suite, row) for row in ind]
        build = lazy_builder(suite, method, hp, ind, mesh)
        accs, hits = evaluate_points(suite, store, keys, tasks_of, build, split,
                                     chunk=chunk or suite.models_per_call, progress=progress,
                                     desc=f"class split {method}")
        out[method] = {"steps": [{"tasks_seen": len(a), "acc": a, "avg_acc": float(np.mean(list(a.values()))),
                                  "avg_normalized_acc": mean_normalized(a, ref)} for a in accs]}
        if hits is not None:  # SPEC §4 "Uncertainty": 95% bootstrap intervals of every step
            from bcjax.stats import method_intervals

            ft = reference_correctness(suite, store, split)["finetuned"]
            for step, h in zip(out[method]["steps"], hits, strict=True):
                norm = method_intervals({"step": h}, {t: ft[t] for t in h}, num_resamples=bootstrap_resamples,
                                        seed=bootstrap_seed)["step"]["avg"]
                raw = method_intervals({"step": h}, None, num_resamples=bootstrap_resamples,
                                       seed=bootstrap_seed)["step"]["avg"]
                step.update(avg_acc_ci95=raw["ci95"], avg_normalized_acc_ci95=norm["ci95"])
    return {"split": split, "tasks": list(suite.tasks), "finetuned_acc": ref, "methods": out}


def _figures(res: dict, suite) -> dict:
    from bcjax import plots

    return {"steps": ("class_split.png", plots.subset_curves(
        {m: {s["tasks_seen"]: s["avg_acc"] for s in r["steps"]} for m, r in res["methods"].items()}, None,
        title="class-split sequence: all tasks seen", ylabel="avg accuracy (%)"))}


@register_experiment("class_split", settings=ClassSplitSettings, figures=_figures)
def run(suite, store, s: ClassSplitSettings, *, chunk=None, mesh=None, progress=True) -> dict:
    """Fig. 4: class-split sequence, merged after each new task."""
    return class_split_experiment(suite, store, methods=s.methods, split=s.split, chunk=chunk, progress=progress,
                                  mesh=mesh, bootstrap_resamples=s.bootstrap_resamples,
                                  bootstrap_seed=s.bootstrap_seed)
