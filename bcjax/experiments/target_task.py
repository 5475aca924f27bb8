"""Target-task merging (paper Table 2, SPEC §4): a target fine-tune plus auxiliary task vectors,
hyper-parameters picked on validation per seed, test reported as mean ± standard error.
Model-agnostic: the model enters only through ``score(params, split) -> float``."""
from __future__ import annotations

import itertools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.errors import BcjaxError
from bcjax.merging import merge
from bcjax.tree import apply_task_vector, task_vector

__all__ = ["target_task_merge", "target_task_experiment", "mean_and_stderr"]


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
                           progress: Callable[[str], None] | None = None) -> dict:
    """Paper Table 2 for one target task: for each seed's target model and each method,
    pick the hyper-parameters maximizing ``score(params, "val")`` over the grid,
    then report ``score(params, "test")``; aggregated over seeds as mean ± standard error.

    ``targets`` are the target fine-tunes (one per seed), ``auxiliary`` the auxiliary
    fine-tunes of the same base. The fine-tuned target itself is the reference row.
    """
    rows: dict[str, dict] = {"finetuned": {"test": [], "val": []}}
    for m in grids:
        rows[m] = {"test": [], "val": [], "chosen": []}
    for s, target in enumerate(targets):
        rows["finetuned"]["val"].append(score(target, "val"))
        rows["finetuned"]["test"].append(score(target, "test"))
        for m, spec in grids.items():
            best = None
            for hp in _grid(spec):
                merged = target_task_merge(target, base, auxiliary, m, **hp)
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
