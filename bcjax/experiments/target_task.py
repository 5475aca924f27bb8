"""Target-task merging (paper Table 2, SPEC §4): a target fine-tune plus auxiliary task vectors,
hyper-parameters picked on validation per seed, test reported as mean ± standard error.
Model-agnostic: the model enters only through ``score(params, split) -> float``.

Registered as the engine experiment ``target_task`` (:class:`TargetTaskSettings`; ``bcjax
sweep`` with ``configs/target_task.yaml``): on a model suite, each target task's fine-tune
plus the task vectors of the other tasks, scored by the suite's accuracy on the target."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.errors import BcjaxError
from bcjax.experiments.registry import register_experiment
from bcjax.experiments.settings import MethodSpec
from bcjax.merging import merge
from bcjax.tree import apply_task_vector, task_vector

__all__ = ["TargetTaskSettings", "target_task_merge", "target_task_experiment", "mean_and_stderr"]


def target_task_merge(target: Any, base: Any, auxiliary: Sequence[Any], method: str, **hparams) -> Any:
    """θ* = θ_target + Σ_aux (method's masked, scaled τ_aux), τ_aux = θ_aux − θ_base (SPEC §4,
    paper Table 2). Generic over pytrees: the auxiliary task vectors are merged with
    :func:`bcjax.merge` around a zero tree — so ``breadcrumbs`` gives α Σ m_t ⊙ τ_t and
    ``task_arithmetic`` α Σ τ_t exactly — and the result is added to the target. With α = 0
    the target is returned unchanged (bit for bit)."""
    if not auxiliary:
        raise BcjaxError("target-task merge needs at least one auxiliary model")
    taus = [task_vector(a, base) for a in auxiliary]  # validates trees against θ_base
    zero = jax.tree.map(jnp.zeros_like, taus[0])
    delta = merge(method, zero, taus, **hparams)
    return apply_task_vector(target, delta, 1.0)


def _grid(spec: Mapping[str, Sequence]) -> list[dict]:
    keys = sorted(spec)
    return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*(list(spec[k]) for k in keys))]


def mean_and_stderr(values: Sequence[float]) -> dict:
    """Mean and standard error (sample std / √n; 0 for one value)."""
    v = np.asarray(values, np.float64)
    se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "stderr": se, "n": int(v.size), "values": [float(x) for x in v]}


def target_task_experiment(base: Any, targets: Sequence[Any], auxiliary: Sequence[Any],
                           score: Callable[[Any, str], float], grids: Mapping[str, Mapping[str, Sequence]],
                           progress: Callable[[str], None] | None = None,
                           merge_inputs: Callable[[str, dict], dict] | None = None) -> dict:
    """Paper Table 2 for one target task: for each seed's target model and each method,
    pick the hyper-parameters maximizing ``score(params, "val")`` over the grid,
    then report ``score(params, "test")``; aggregated over seeds as mean ± standard error.

    ``targets`` are the target fine-tunes (one per seed), ``auxiliary`` the auxiliary
    fine-tunes of the same base. The fine-tuned target itself is the reference row.
    ``merge_inputs(method, hparams)``: the keyword arguments of the merge (default: the
    hyper-parameters; the engine adds what the method requires, e.g. a PRNG key).
    """
    merge_inputs = merge_inputs or (lambda m, hp: hp)
    rows: dict[str, dict] = {"finetuned": {"test": [], "val": []}}
    for m in grids:
        rows[m] = {"test": [], "val": [], "chosen": []}
    for s, target in enumerate(targets):
        rows["finetuned"]["val"].append(score(target, "val"))
        rows["finetuned"]["test"].append(score(target, "test"))
        for m, spec in grids.items():
            best = None
            for hp in _grid(spec):
                merged = target_task_merge(target, base, auxiliary, m, **merge_inputs(m, dict(hp)))
                v = score(merged, "val")
                if progress:
                    progress(f"seed {s} {m} {hp}: validation {v:.2f}")
                if best is None or v > best[0]:
                    best = (v, hp, merged)
            rows[m]["val"].append(best[0])
            rows[m]["chosen"].append(best[1])
            rows[m]["test"].append(score(best[2], "test"))
    out = {}
    for m, r in rows.items():
        out[m] = {"test": mean_and_stderr(r["test"]), "val": mean_and_stderr(r["val"])}
        if "chosen" in r:
            out[m]["chosen"] = r["chosen"]
    return out


def _default_methods() -> list[MethodSpec]:
    return [MethodSpec("breadcrumbs", {"beta": 0.9, "gamma": 0.99}, {"alpha": [0.0, 0.1, 0.3, 0.5]}),
            MethodSpec("task_arithmetic", {}, {"alpha": [0.0, 0.1, 0.3, 0.5]})]


@dataclasses.dataclass(frozen=True)
class TargetTaskSettings:
    """Config of the ``target_task`` experiment: ``targets`` (default: every task of the
    suite, each in turn), ``auxiliary`` (default: every other task; a target is never its own
    auxiliary) and ``methods`` (each a grid; α = 0 in the grid keeps the target as a candidate)."""

    targets: list[str] | None = None
    auxiliary: list[str] | None = None
    methods: list[MethodSpec] = dataclasses.field(default_factory=_default_methods)

    def check(self):
        if not self.methods:
            raise ValueError("methods is empty")


def _grid_of(spec: MethodSpec) -> dict[str, list]:
    return {**{k: [v] for k, v in spec.hparams.items()}, **{k: list(v) for k, v in spec.grid.items()}}


@register_experiment("target_task", settings=TargetTaskSettings)
def run(suite, store, s: TargetTaskSettings, *, chunk=None, mesh=None, progress=True) -> dict:
    """Table 2: a target fine-tune plus auxiliary task vectors, chosen on val, reported on test."""
    from bcjax.config import ConfigError
    from bcjax.evaluate import stack_trees
    from bcjax.experiments.engine import method_inputs

    tasks = list(suite.tasks)
    for what, names in (("targets", s.targets), ("auxiliary", s.auxiliary)):
        unknown = sorted(set(names or ()) - set(tasks))
        if unknown:
            raise ConfigError(f"target_task: {what} {unknown} are not tasks of the suite {suite.name!r} ({tasks})")
    ft = dict(zip(tasks, suite.finetuned, strict=True))
    out = {}
    for target in s.targets or tasks:
        aux = [t for t in (s.auxiliary or tasks) if t != target]
        if not aux:
            raise ConfigError(f"target_task: target {target!r} has no auxiliary task")

        def score(params, split, target=target):
            return float(suite.evaluate(stack_trees([params]), target, split)[0])

        res = target_task_experiment(suite.pretrained, [ft[target]], [ft[t] for t in aux], score,
                                     {m.name: _grid_of(m) for m in s.methods},
                                     merge_inputs=lambda m, hp, aux=aux: method_inputs(suite, m, hp, aux))
        out[target] = {"auxiliary": aux, "metric": "accuracy", **res}
    return {"targets": out}
