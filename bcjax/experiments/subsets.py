"""Fig. 2: every subset of the tasks merged and evaluated on all tasks (SPEC §4)."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from bcjax.experiments.engine import (curve_intervals, evaluate_points, jsonable, lazy_builder, members, normalized,
                                     reference_accuracy, reference_correctness)
from bcjax.experiments.registry import register_experiment
from bcjax.experiments.settings import MethodSpec

__all__ = ["SubsetsSettings", "subsets_experiment"]

DEFAULT_METHODS = (MethodSpec("task_arithmetic", {"alpha": 0.3}),
                   MethodSpec("breadcrumbs", {"alpha": 0.3, "beta": 0.9, "gamma": 0.99}))


@dataclasses.dataclass(frozen=True)
class SubsetsSettings:
    methods: list[MethodSpec] = dataclasses.field(default_factory=lambda: list(DEFAULT_METHODS))
    sizes: list[int] | None = None  # None: all 2^T subsets
    per_size: int | None = None  # None: every subset of each size; else a seeded sample of this many
    split: str = "test"
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0


def subsets_experiment(suite, store, *, methods: Sequence, sizes: Sequence[int] | None = None,
                       per_size: int | None = None, split: str = "test", chunk: int | None = None,
                       progress: bool = True, mesh=None, bootstrap_resamples: int = 1000,
                       bootstrap_seed: int = 0) -> dict:
    """Fig. 2: every subset (of the given sizes) merged — one contraction per leaf for linear
    methods — evaluated on all tasks; curves for both protocols (SPEC §4). The empty subset is
    θ0. ``per_size``: at most that many subsets of each size, a seeded sample (seed
    ``suite.seed``, :func:`bcjax.sweeps.all_subsets`); the intervals then resample the subsets
    too. ``methods``: (name, hparams) pairs or :class:`MethodSpec`. ``mesh`` shards the stacked
    task vectors and the contraction (:func:`bcjax.experiments.engine.method_builder`).

    When the suite provides per-example correctness, the models are evaluated through it (one
    pass; accuracies derived from it) and each method gains ``points``: ``{"observed" | "all":
    {k: {"mean", "ci95", "num_subsets", "examples_per_task", "subsets_resampled"}}}``, the
    two-level bootstrap intervals of :func:`bcjax.stats.subset_curve_intervals`."""
    from bcjax import sweeps

    ref = reference_accuracy(suite, store, split)
    ind = sweeps.all_subsets(len(suite.tasks), sizes, per_size=per_size, seed=suite.seed)
    chunk = chunk or suite.models_per_call
    out = {}
    for method, hp in _pairs(methods):
        keys = [dict(kind="subset", suite=suite.fingerprint, split=split, method=method, hparams=jsonable(hp),
                     subset=[int(v) for v in row]) for row in ind]
        build = lazy_builder(suite, method, hp, ind, mesh)
        accs, hits = evaluate_points(suite, store, keys, [suite.tasks] * len(ind), build, split, chunk=chunk,
                                     progress=progress, desc=f"subsets {method}")
        scores = {i: normalized(a, ref) for i, a in enumerate(accs)}
        out[method] = {"observed": sweeps.subset_curve(ind, scores, suite.tasks, "observed"),
                       "all": sweeps.subset_curve(ind, scores, suite.tasks, "all"),
                       "per_subset": [{"subset": members(suite, row), "avg_normalized_acc_observed":
                                       float(np.mean([scores[i][t] for t in (members(suite, row) or suite.tasks)]))}
                                      for i, row in enumerate(ind)]}
        if hits is not None:
            ft = reference_correctness(suite, store, split)["finetuned"]
            out[method]["points"] = {proto: curve_intervals(ind, hits, ft, suite.tasks, protocol=proto,
                                                            num_resamples=bootstrap_resamples, seed=bootstrap_seed)
                                     for proto in ("observed", "all")}
    return {"split": split, "finetuned_acc": ref, "num_subsets": int(len(ind)), "methods": out}


def _pairs(methods) -> list[tuple[str, dict]]:
    return [(m.name, dict(m.hparams)) if isinstance(m, MethodSpec) else (m[0], dict(m[1])) for m in methods]


def _figures(res: dict, suite) -> dict:
    from bcjax import plots

    def bands(proto):
        out = {m: {k: p["ci95"] for k, p in r["points"][proto].items()} for m, r in res["methods"].items()
               if "points" in r}
        return out or None

    def pretrained(proto):  # the empty subset θ0, the same for every method
        return next((r["points"][proto][0]["mean"] for r in res["methods"].values()
                     if "points" in r and 0 in r["points"][proto]), None)

    figs = {proto: (f"subsets_{proto}.png", plots.subset_curves({m: r[proto] for m, r in res["methods"].items()},
                                                                 None, title=f"{proto}-task protocol",
                                                                 intervals=bands(proto), reference=pretrained(proto)))
            for proto in ("observed", "all")}
    figs["violins"] = ("subsets_violins.png", plots.violins(
        {m: [p["avg_normalized_acc_observed"] for p in r["per_subset"] if p["subset"]]
         for m, r in res["methods"].items()}, None, title="over all non-empty subsets"))
    return figs


@register_experiment("subsets", settings=SubsetsSettings, figures=_figures)
def run(suite, store, s: SubsetsSettings, *, chunk=None, mesh=None, progress=True) -> dict:
    """Fig. 2: every subset merged, both protocols."""
    return subsets_experiment(suite, store, methods=s.methods, sizes=s.sizes, per_size=s.per_size, split=s.split,
                              chunk=chunk,
                              progress=progress, mesh=mesh, bootstrap_resamples=s.bootstrap_resamples,
                              bootstrap_seed=s.bootstrap_seed)
