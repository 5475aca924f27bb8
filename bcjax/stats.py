"""Uncertainty of evaluation results (SPEC §4 "Uncertainty"): seeded percentile bootstrap
over test examples, paired differences, two-level intervals for subset curves, and a
seeded class-stratified sampler for evaluation subsets.

Pure numpy; nothing here knows a model or a data set. The inputs are *per-example
correctness* arrays (``bool[n_t]`` per task, or ``bool[S, n_t]`` for S models scored on the
same examples) and, for normalization, the fine-tuned models' correctness on the same
examples.

Resampling protocol (one place, shared by every function here)
    For task ``t`` with ``n_t`` examples, resample ``b`` (of ``B``) draws ``n_t`` example
    indices uniformly with replacement; it is stored as a count vector
    ``C_t[b] ∈ ℕ^{n_t}`` with ``Σ_i C_t[b, i] = n_t`` (:func:`bootstrap_counts`). The
    generator is ``numpy.random.default_rng([seed, crc32(t)])``, so a task's resamples
    depend only on ``(seed, task, n_t, B)`` — not on the other tasks, their order, or which
    methods are scored. Every model scored on the same examples sees the same resamples:
    differences are *paired*.

    Resampled accuracy of a model on task t:  a_t[b] = C_t[b] · c_t / n_t  (c_t its 0/1
    correctness vector); one matrix product over all resamples and models.

Normalized accuracy (SPEC §4)
    n_t[b] = a_t[b] / f_t[b], where f_t[b] is the *fine-tuned* model's accuracy on the
    same resample: the denominator is resampled too (paired), because it is estimated from
    the same finite test set as the numerator; treating it as a constant would understate
    the interval. Average normalized accuracy:  A[b] = (1/T) Σ_t n_t[b].  A resample whose
    f_t[b] is 0 is undefined and dropped (``nan``, ignored by the percentiles; only
    possible when the fine-tuned accuracy is tiny).

Intervals
    95 % percentile interval: the 2.5th and 97.5th percentiles (numpy's ``linear``
    definition) of the B resampled statistics. The point estimate is the statistic on the
    original examples (not the bootstrap mean). Paired difference of method m to a
    baseline: D[b] = A_m[b] − A_base[b] on the same resamples (exactly 0 for m = base).

Subset curves (two-level bootstrap)
    A curve point is the mean, over subset models of one size k, of each model's average
    normalized accuracy (over the subset's own tasks: ``observed``; over all tasks:
    ``all``; the empty subset θ0 over all tasks in both, as :func:`bcjax.sweeps.subset_curve`).
    Resample b draws the examples as above (shared by every subset model, since they were
    all scored on the same examples) *and* draws S_k subset models with replacement among
    the S_k evaluated ones; the point of resample b is the mean over the drawn models. When
    every subset of size k was evaluated (S_k = C(T, k)) the curve point is a mean over the
    whole finite population of subsets and the subset level is skipped (no sampling error
    from the choice of subsets); pass ``resample_subsets`` to override.

Public API: :func:`bootstrap_counts`, :func:`resampled_accuracy`,
:func:`percentile_interval`, :func:`method_intervals`, :func:`subset_curve_intervals`,
:func:`stratified_sample`, :func:`seed_summary`.
"""
from __future__ import annotations

import math
import zlib
from typing import Mapping, Sequence

import numpy as np

from bcjax.errors import EvaluationDataError

__all__ = ["DEFAULT_RESAMPLES", "bootstrap_counts", "resampled_accuracy", "percentile_interval",
           "method_intervals", "subset_curve_intervals", "stratified_sample", "seed_summary"]

#: SPEC §4: at least 1,000 bootstrap resamples.
DEFAULT_RESAMPLES = 1000


def _rng(seed: int, *purpose: str) -> np.random.Generator:
    """A generator keyed by a seed and a purpose path (no dependence on Python's hash())."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise EvaluationDataError(f"seed must be an int >= 0, got {seed!r}")
    return np.random.default_rng([int(seed)] + [zlib.crc32(p.encode()) for p in purpose])


def _check_resamples(num_resamples) -> int:
    if isinstance(num_resamples, (bool, np.bool_)) or not isinstance(num_resamples, (int, np.integer)) \
            or num_resamples < 1:
        raise EvaluationDataError(f"num_resamples must be an int >= 1, got {num_resamples!r}")
    return int(num_resamples)


def _correctness(values, what: str, ndim: int) -> np.ndarray:
    """A 0/1 (bool or {0, 1}) array of the given rank with at least one example, as float64."""
    a = np.asarray(values)
    if a.ndim != ndim:
        raise EvaluationDataError(f"{what}: expected a {ndim}-d per-example correctness array, got shape {a.shape}")
    if a.shape[-1] == 0:
        raise EvaluationDataError(f"{what}: no examples")
    if a.dtype != np.bool_:
        if not (np.issubdtype(a.dtype, np.number) and np.all((a == 0) | (a == 1))):
            raise EvaluationDataError(f"{what}: correctness must be bool or 0/1, got dtype {a.dtype}")
    return a.astype(np.float64)


def bootstrap_counts(num_examples: int, num_resamples: int = DEFAULT_RESAMPLES, *, seed: int = 0,
                     key: str = "") -> np.ndarray:
    """Resample counts, float64[B, n]: row b counts how often each of the n examples is
    drawn in resample b (n draws uniformly with replacement; each row sums to n).

    Seeded by ``(seed, key)`` (``key`` is the task name in this module), so equal arguments
    give identical counts.
    """
    n = int(num_examples)
    if n < 1:
        raise EvaluationDataError(f"bootstrap of task {key!r}: no examples")
    b = _check_resamples(num_resamples)
    draws = _rng(seed, "bootstrap", key).integers(0, n, size=(b, n), dtype=np.int64)
    flat = (draws + (np.arange(b, dtype=np.int64) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def resampled_accuracy(correct: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Accuracy on every resample: ``correct`` (…, n) 0/1 and ``counts`` (B, n) →
    (…, B), ``a[…, b] = Σ_i counts[b, i] · correct[…, i] / n``."""
    return np.asarray(correct, np.float64) @ counts.T / counts.shape[1]


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> np.ndarray:
    """[lo, hi] percentile interval over the last axis (``nan`` resamples ignored)."""
    if not 0 < level < 1:
        raise EvaluationDataError(f"confidence level must lie in (0, 1), got {level}")
    tail = 50.0 * (1.0 - level)
    s = np.asarray(samples, np.float64)
    if np.isnan(s).all(axis=-1).any():
        raise EvaluationDataError("every bootstrap resample is undefined (fine-tuned accuracy 0 on all of them)")
    return np.moveaxis(np.nanpercentile(s, [tail, 100.0 - tail], axis=-1), 0, -1)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _interval_dict(point: float, samples: np.ndarray, level: float) -> dict:
    lo, hi = percentile_interval(samples, level)
    return {"mean": float(point), "ci95" if level == 0.95 else f"ci{round(100 * level)}": [float(lo), float(hi)]}


def method_intervals(correct: Mapping[str, Mapping[str, np.ndarray]], finetuned: Mapping[str, np.ndarray] | None,
                     *, baseline: str | None = None, num_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                     level: float = 0.95) -> dict[str, dict]:
    """Point estimates and percentile intervals of every method's average normalized
    accuracy, per-task normalized accuracy, and paired difference to ``baseline``.

    Args:
      correct: ``{method: {task: bool[n_t]}}``; every method covers the same tasks, with
        the same ``n_t`` per task (the same test examples, in the same order).
      finetuned: ``{task: bool[n_t]}``, the task's own fine-tuned model on those examples
        (the normalizer, resampled with the numerator); ``None`` reports plain average
        accuracy instead of normalized accuracy.
      baseline: a key of ``correct`` (e.g. ``"task_arithmetic"``); adds ``delta_vs_<baseline>``.
      num_resamples, seed, level: see the module docstring (≥ 1,000 resamples per SPEC §4).

    Returns ``{method: {"avg": {"mean", "ci95"}, "per_task": {task: {"mean", "ci95"}},
    ["delta_vs_<baseline>": {"mean", "ci95"}]}}`` with ``mean`` the point estimate on the
    original examples. Values are fractions (1.0 = the fine-tuned level).
    """
    methods = list(correct)
    if not methods:
        raise EvaluationDataError("no method to score")
    tasks = list(correct[methods[0]])
    if not tasks:
        raise EvaluationDataError(f"method {methods[0]!r} has no task")
    if baseline is not None and baseline not in correct:
        raise EvaluationDataError(f"baseline {baseline!r} is not among the methods {methods}")
    sizes = {}
    for m in methods:
        if list(correct[m]) != tasks:
            raise EvaluationDataError(f"method {m!r} covers tasks {list(correct[m])}, expected {tasks}")
        for t in tasks:
            n = np.shape(correct[m][t])[-1] if np.ndim(correct[m][t]) else 0
            if sizes.setdefault(t, n) != n:
                raise EvaluationDataError(f"method {m!r}, task {t!r}: {n} examples, other methods have {sizes[t]}")
    if finetuned is not None:
        missing = [t for t in tasks if t not in finetuned]
        if missing:
            raise EvaluationDataError(f"fine-tuned correctness missing for tasks {missing}")
    b = _check_resamples(num_resamples)
    norm_point = np.zeros((len(methods), len(tasks)))
    norm_samples = np.zeros((len(methods), len(tasks), b))
    for j, t in enumerate(tasks):
        c = np.stack([_correctness(correct[m][t], f"method {m!r}, task {t!r}", 1) for m in methods])  # (M, n)
        counts = bootstrap_counts(c.shape[1], b, seed=seed, key=t)
        acc_point, acc_samples = c.mean(axis=1), resampled_accuracy(c, counts)
        if finetuned is None:
            norm_point[:, j], norm_samples[:, j] = acc_point, acc_samples
            continue
        f = _correctness(finetuned[t], f"fine-tuned, task {t!r}", 1)
        if f.shape != c.shape[1:]:
            raise EvaluationDataError(f"fine-tuned, task {t!r}: {f.shape[0]} examples, the methods have {c.shape[1]}")
        if f.mean() == 0:
            raise EvaluationDataError(f"task {t!r}: fine-tuned accuracy is 0; normalized accuracy is undefined")
        norm_point[:, j] = acc_point / f.mean()
        norm_samples[:, j] = _ratio(acc_samples, resampled_accuracy(f, counts)[None])
    avg_point, avg_samples = norm_point.mean(axis=1), norm_samples.mean(axis=1)  # (M,), (M, B)
    out = {}
    for i, m in enumerate(methods):
        out[m] = {"avg": _interval_dict(avg_point[i], avg_samples[i], level),
                  "per_task": {t: _interval_dict(norm_point[i, j], norm_samples[i, j], level)
                               for j, t in enumerate(tasks)}}
        if baseline is not None:
            k = methods.index(baseline)
            out[m][f"delta_vs_{baseline}"] = _interval_dict(avg_point[i] - avg_point[k],
                                                            avg_samples[i] - avg_samples[k], level)
    return out


def subset_curve_intervals(indicator: np.ndarray, correct: Mapping[str, np.ndarray],
                           finetuned: Mapping[str, np.ndarray], *, protocol: str = "observed",
                           num_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95,
                           resample_subsets: bool | None = None) -> dict[int, dict]:
    """Two-level bootstrap intervals of a subset curve (module docstring).

    Args:
      indicator: bool[S, T], row s = the tasks merged into subset model s (columns in the
        order of ``correct``'s keys).
      correct: ``{task: bool[S, n_t]}``, every subset model's correctness on the *same*
        ``n_t`` examples of the task (e.g. a :func:`stratified_sample`).
      finetuned: ``{task: bool[n_t]}``, the fine-tuned model on those examples.
      protocol: ``"observed"`` or ``"all"`` (SPEC §4).
      resample_subsets: resample the subset models too; default: for every size whose
        subsets were not all evaluated.

    Returns ``{k: {"mean", "ci95", "num_subsets", "examples_per_task", "subsets_resampled"}}``
    per subset size k, ``mean`` being the curve's point (as :func:`bcjax.sweeps.subset_curve`).
    """
    if protocol not in ("observed", "all"):
        raise EvaluationDataError(f"protocol must be 'observed' or 'all', got {protocol!r}")
    ind = np.asarray(indicator)
    tasks = list(correct)
    if ind.ndim != 2 or ind.dtype != np.bool_ or ind.shape[1] != len(tasks) or ind.shape[0] == 0:
        raise EvaluationDataError(f"indicator must be bool[S, T={len(tasks)}] with S >= 1, "
                                  f"got {ind.dtype} {ind.shape}")
    b = _check_resamples(num_resamples)
    s_count, t_count = ind.shape
    norm_point = np.zeros((s_count, t_count))
    norm_samples = np.zeros((s_count, t_count, b))
    examples = {}
    for j, t in enumerate(tasks):
        c = _correctness(correct[t], f"subset models, task {t!r}", 2)
        if c.shape[0] != s_count:
            raise EvaluationDataError(f"task {t!r}: correctness of {c.shape[0]} subset models, indicator has {s_count}")
        if t not in finetuned:
            raise EvaluationDataError(f"fine-tuned correctness missing for task {t!r}")
        f = _correctness(finetuned[t], f"fine-tuned, task {t!r}", 1)
        if f.shape[0] != c.shape[1]:
            raise EvaluationDataError(f"fine-tuned, task {t!r}: {f.shape[0]} examples, subset models have {c.shape[1]}")
        if f.mean() == 0:
            raise EvaluationDataError(f"task {t!r}: fine-tuned accuracy is 0; normalized accuracy is undefined")
        counts = bootstrap_counts(c.shape[1], b, seed=seed, key=t)
        norm_point[:, j] = c.mean(axis=1) / f.mean()
        norm_samples[:, j] = _ratio(resampled_accuracy(c, counts), resampled_accuracy(f, counts)[None])
        examples[t] = int(c.shape[1])
    sizes = ind.sum(axis=1)
    scope = ind if protocol == "observed" else np.ones_like(ind)
    scope = np.where((sizes == 0)[:, None], True, scope).astype(np.float64)  # θ0: all tasks
    score_point = (norm_point * scope).sum(1) / scope.sum(1)  # (S,)
    score_samples = np.einsum("stb,st->sb", norm_samples, scope) / scope.sum(1)[:, None]  # (S, B)
    out = {}
    for k in sorted(set(int(v) for v in sizes)):
        rows = np.flatnonzero(sizes == k)
        distinct = len({r.tobytes() for r in ind[rows]})
        resample = (distinct < math.comb(t_count, k)) if resample_subsets is None else bool(resample_subsets)
        per_subset = score_samples[rows]  # (S_k, B)
        if resample:
            pick = _rng(seed, "subsets", protocol, str(k)).integers(0, len(rows), size=(b, len(rows)))
            samples = np.take_along_axis(per_subset.T, pick, axis=1).mean(axis=1)
        else:
            samples = per_subset.mean(axis=0)
        lo, hi = percentile_interval(samples, level)
        out[k] = {"mean": float(score_point[rows].mean()), "ci95": [float(lo), float(hi)],
                  "num_subsets": int(len(rows)), "examples_per_task": dict(examples),
                  "subsets_resampled": bool(resample)}
    return out


def stratified_sample(labels: np.ndarray, size: int, *, seed: int = 0, key: str = "") -> np.ndarray:
    """Sorted indices of a seeded class-stratified random sample without replacement
    ("never the first N", SPEC §4).

    Class c (with n_c of the N examples) gets ⌊size · n_c / N⌋ examples plus one more for
    the classes with the largest remainders (ties broken at random), so every class count
    is within 1 of ``size · n_c / N``; within a class the examples are a uniform random
    draw. ``size >= N`` returns every index. Seeded by ``(seed, key)``.
    """
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0 or not np.issubdtype(y.dtype, np.integer):
        raise EvaluationDataError(f"stratified sample {key!r}: labels must be a non-empty 1-d int array, "
                                  f"got {y.dtype} {y.shape}")
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)) or size < 1:
        raise EvaluationDataError(f"stratified sample {key!r}: size must be an int >= 1, got {size!r}")
    n = y.size
    if size >= n:
        return np.arange(n)
    rng = _rng(seed, "stratified", key)
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    exact = size * counts / n
    quota = np.floor(exact).astype(np.int64)
    short = size - int(quota.sum())
    if short:
        remainder = exact - quota
        order = np.lexsort((rng.random(len(classes)), -remainder))  # largest remainder, random ties
        quota[order[:short]] += 1
    picked = [rng.choice(np.flatnonzero(inverse == c), size=q, replace=False) for c, q in enumerate(quota) if q]
    return np.sort(np.concatenate(picked))


#: Student-t 0.975 quantiles for 1..30 degrees of freedom (beyond: :func:`_t975`'s expansion).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def _t975(df: int) -> float:
    """t_{0.975, df}: the table for df ≤ 30, else the Cornish-Fisher expansion around z = 1.96
    (error < 1e-4 for df > 30)."""
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def seed_summary(values: Sequence[float]) -> dict:
    """Mean ± standard error over repeated fine-tuning seeds (as the paper reports):
    ``{"mean", "se", "num_seeds", "ci95"}`` with se = s / √N, s the sample standard deviation
    (ddof = 1), and the 95 % Student-t interval mean ± t_{0.975, N−1} · se (the seeds'
    spread, not the test images'); for a single seed se is 0 and the interval is the point."""
    v = np.asarray(values, np.float64)
    if v.ndim != 1 or v.size == 0 or not np.all(np.isfinite(v)):
        raise EvaluationDataError(f"seed_summary needs a non-empty 1-d list of finite values, got {values!r}")
    mean = float(v.mean())
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0
    half = _t975(v.size - 1) * se if v.size > 1 else 0.0
    return {"mean": mean, "se": se, "num_seeds": int(v.size), "ci95": [mean - half, mean + half]}
