"""Fig. 3: tune on validation over small subsets, freeze, report test for larger ones (SPEC §4)."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from bcjax.experiments.engine import (evaluate_models, grid_builder, mean_normalized, members, normalized,
                                      reference_accuracy)
from bcjax.experiments.registry import register_experiment
from bcjax.experiments.suite import ModelSuite, guard_splits

__all__ = ["ValidationFreeSettings", "tune_validation_free", "validation_free_experiment"]

VARIANT_KEYS = ("alphas", "betas", "gammas")


@dataclasses.dataclass(frozen=True)
class ValidationFreeSettings:
    alphas: list[float] = dataclasses.field(default_factory=lambda: [0.3, 0.5, 1.0])
    variants: dict[str, Any] = dataclasses.field(default_factory=lambda: {
        "breadcrumbs": {"betas": [0.85, 0.9], "gammas": [0.99]},
        "task_arithmetic": {"betas": [0.0], "gammas": [1.0]}})
    tune_size: int = 2
    protocol: str = "observed"

    def check(self):
        for name, v in self.variants.items():
            bad = sorted(set(v) - set(VARIANT_KEYS)) if isinstance(v, Mapping) else ["<not a mapping>"]
            if bad:
                raise ValueError(f"variants.{name}: unknown key {bad[0]!r}; accepted: {list(VARIANT_KEYS)}")
        if self.protocol not in ("observed", "all"):
            raise ValueError(f"protocol must be 'observed' or 'all', got {self.protocol!r}")


def tune_validation_free(suite: ModelSuite, store, *, tune_size: int, alphas, betas, gammas,
                         protocol: str = "observed", chunk: int | None = None, progress: bool = True,
                         mesh=None) -> dict:
    """Fig. 3, tuning half: the (α, β, γ) maximizing mean normalized *validation* accuracy over
    all subsets of size ``tune_size``. Evaluation is guarded to the val split: any test
    access raises :class:`SplitAccessError` (SPEC §4: never tune on test)."""
    from bcjax import grids, sweeps

    guarded = suite.with_evaluate(guard_splits(suite.evaluate, ("val",), "validation-free tuning"))
    pairs = grids.beta_gamma_pairs(betas, gammas)
    points = grids.grid_points(alphas, pairs)
    ind = sweeps.all_subsets(len(suite.tasks), [tune_size])
    ref = reference_accuracy(guarded, store, "val")
    n_p, n_s = len(points), len(ind)
    point_of = np.repeat(np.arange(n_p), n_s)
    rows = np.tile(ind, (n_p, 1))
    keys = [dict(kind="vf_tune", suite=suite.fingerprint, split="val", alpha=points[p][0], beta=points[p][1],
                 gamma=points[p][2], subset=[int(v) for v in r]) for p, r in zip(point_of, rows, strict=True)]
    tasks_of = [(members(suite, r) if protocol == "observed" else list(suite.tasks)) for r in rows]
    build = grid_builder(guarded, pairs, points, rows, point_of, mesh)
    accs = evaluate_models(guarded, store, keys, tasks_of, build, "val", chunk=chunk or suite.models_per_call,
                           progress=progress, desc=f"tune on val (size {tune_size})")
    score = np.array([mean_normalized(a, ref) for a in accs]).reshape(n_p, n_s).mean(1)
    b = int(np.argmax(score))
    a, beta, gamma = points[b]
    return {"alpha": a, "beta": beta, "gamma": gamma, "val_score": float(score[b]),
            "grid": [dict(alpha=p[0], beta=p[1], gamma=p[2], val_score=float(s))
                     for p, s in zip(points, score, strict=True)]}


def validation_free_experiment(suite: ModelSuite, store, *, tune_size: int, variants: Mapping[str, Mapping],
                               alphas, protocol: str = "observed", chunk: int | None = None,
                               progress: bool = True, mesh=None) -> dict:
    """Fig. 3: per variant (e.g. Breadcrumbs, task arithmetic = β 0, γ 1) tune on val over
    subsets of size ``tune_size``, freeze, then report test for sizes ``tune_size`` … T.
    All tuning finishes before the first test access."""
    from bcjax import grids, sweeps

    T = len(suite.tasks)
    if not 1 <= tune_size <= T:
        raise ValueError(f"tune_size must lie in [1, {T}], got {tune_size}")
    tuned = {name: tune_validation_free(suite, store, tune_size=tune_size, alphas=v.get("alphas", alphas),
                                        betas=v.get("betas", [0.0]), gammas=v.get("gammas", [1.0]),
                                        protocol=protocol, chunk=chunk, progress=progress, mesh=mesh)
             for name, v in variants.items()}
    ref = reference_accuracy(suite, store, "test")
    ind = sweeps.all_subsets(T, range(tune_size, T + 1))
    out = {}
    for name, hp in tuned.items():
        point = (hp["alpha"], hp["beta"], hp["gamma"])
        keys = [dict(kind="vf_test", suite=suite.fingerprint, split="test", alpha=point[0], beta=point[1],
                     gamma=point[2], subset=[int(v) for v in r]) for r in ind]
        tasks_of = [(members(suite, r) if protocol == "observed" else list(suite.tasks)) for r in ind]
        build = grid_builder(suite, [point[1:]], [point], ind, np.zeros(len(ind), int), mesh)
        accs = evaluate_models(suite, store, keys, tasks_of, build, "test", chunk=chunk or suite.models_per_call,
                               progress=progress, desc=f"test {name}")
        scores = {i: normalized(a, ref) for i, a in enumerate(accs)}
        curve = {}
        for i, r in enumerate(ind):
            curve.setdefault(int(r.sum()), []).append(float(np.mean(list(scores[i].values()))))
        out[name] = {"hparams": {k: hp[k] for k in ("alpha", "beta", "gamma")}, "val_score": hp["val_score"],
                     "variant": grids.masking_variant(hp["beta"], hp["gamma"]),
                     "test_curve": {k: float(np.mean(v)) for k, v in sorted(curve.items())}, "val_grid": hp["grid"]}
    return {"tune_size": tune_size, "protocol": protocol, "finetuned_test_acc": ref, "variants": out}


def _figures(res: dict, suite) -> dict:
    from bcjax import plots

    return {"test_curves": ("validation_free.png", plots.subset_curves(
        {k: v["test_curve"] for k, v in res["variants"].items()}, None,
        title=f"tuned on val at size {res['tune_size']}, test"))}


@register_experiment("validation_free", settings=ValidationFreeSettings, figures=_figures)
def run(suite, store, s: ValidationFreeSettings, *, chunk=None, mesh=None, progress=True) -> dict:
    """Fig. 3: tuned on val at one subset size, tested at larger sizes."""
    return validation_free_experiment(suite, store, tune_size=s.tune_size, variants=s.variants, alphas=s.alphas,
                                      protocol=s.protocol, chunk=chunk, progress=progress, mesh=mesh)
