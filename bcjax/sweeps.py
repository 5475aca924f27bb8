"""Experiments over many merged models as compiled programs (SPEC §4).

*Subset sweeps*: for a method registered ``linear=True`` (its masks are computed per task
independently: task arithmetic, Breadcrumbs), θ*(S) = θ0 + α Σ_{t∈S} Δt with Δt = mt ⊙ τt, so the merged
parameters of every subset S come from one contraction per leaf,
``θ0 + α · (indicator[S, T] @ Δ[T, ...])``, computed a chunk of subsets at a time and
evaluated with the models vmapped (:func:`bcjax.evaluate.accuracy_of_stack`).
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.batching import pad_rows
from bcjax.merging import get_method, merge, methods
from bcjax.tree import compute_dtype, is_floating

__all__ = ["is_linear", "all_subsets", "task_deltas", "subset_merges", "iter_subset_merges",
           "subset_curve", "cosine_similarity_matrix"]


def is_linear(method: str) -> bool:
    """Whether ``method``'s merge of a subset S is θ0 + α Σ_{t∈S} Δt with Δt independent of S
    (registered with ``linear=True``, :func:`bcjax.register_method`)."""
    return get_method(method).linear


def all_subsets(num_tasks: int, sizes: Sequence[int] | None = None, *, per_size: int | None = None,
                seed: int = 0) -> np.ndarray:
    """bool[S, T] indicator rows of all subsets (of the given sizes), by size, then
    lexicographically. Size 0 (the empty subset, i.e. θ0) is included when asked for.

    ``per_size``: keep at most that many subsets of each size k — all C(T, k) when there are
    no more, else a uniform draw without replacement seeded by ``(seed, k)`` (so a size's
    sample does not depend on the other sizes), kept in lexicographic order."""
    sizes = range(num_tasks + 1) if sizes is None else sizes
    if per_size is not None and (isinstance(per_size, bool) or not isinstance(per_size, (int, np.integer))
                                 or per_size < 1):
        raise ValueError(f"per_size must be an int >= 1 or None, got {per_size!r}")
    rows = []
    for k in sizes:
        if not 0 <= k <= num_tasks:
            raise ValueError(f"subset size {k} outside [0, {num_tasks}]")
        combos = list(itertools.combinations(range(num_tasks), k))
        if per_size is not None and len(combos) > per_size:
            keep = np.sort(np.random.default_rng([seed, k]).choice(len(combos), size=per_size, replace=False))
            combos = [combos[i] for i in keep]
        for combo in combos:
            row = np.zeros(num_tasks, bool)
            row[list(combo)] = True
            rows.append(row)
    return np.stack(rows) if rows else np.zeros((0, num_tasks), bool)


def task_deltas(method: str, pretrained: Any, finetuned: Sequence[Any], **hparams) -> Any:
    """Stacked Δt (leading axis T) such that the method's merge of any subset S is
    θ0 + α Σ_{t∈S} Δt: τt for task arithmetic, mt ⊙ τt for Breadcrumbs (any method
    registered ``linear=True``). Non-merged leaves get zeros."""
    if not is_linear(method):
        linear = sorted(n for n, m in methods().items() if m.linear)
        raise ValueError(f"subset contraction needs a per-task-linear method {linear}, got {method!r}")
    hp = {k: v for k, v in hparams.items() if k != "alpha"}
    singles = [merge(method, pretrained, [ft], alpha=1.0, **hp) for ft in finetuned]

    def delta(p0, *outs):
        if not is_floating(p0):
            return jnp.zeros((len(outs),) + np.shape(p0), jnp.result_type(p0))
        dt = compute_dtype(jnp.result_type(p0))
        return jnp.stack([jnp.asarray(o, dt) - jnp.asarray(p0, dt) for o in outs])

    return jax.tree.map(delta, pretrained, *singles)


@jax.jit
def subset_merges(pretrained: Any, deltas: Any, indicator: jax.Array, alpha) -> Any:
    """Stacked merged trees (leading axis S): θ0 + α · indicator @ Δ per leaf, in θ0's dtype."""
    ind = jnp.asarray(indicator, jnp.float32)

    def leaf(p0, d):
        if not is_floating(p0):
            return jnp.broadcast_to(p0, (ind.shape[0],) + p0.shape)
        dt = compute_dtype(p0.dtype)
        mixed = jnp.tensordot(ind.astype(dt), d.astype(dt), axes=1)
        return (p0.astype(dt)[None] + jnp.asarray(alpha, dt) * mixed).astype(p0.dtype)

    return jax.tree.map(leaf, pretrained, deltas)


def iter_subset_merges(pretrained, deltas, indicator: np.ndarray, alpha, chunk: int) -> Iterator[tuple[int, Any]]:
    """Yield (start, stacked merged trees) for ``chunk`` subsets at a time (the last chunk
    is padded by repeating its last row, so one compilation serves all chunks)."""
    s = indicator.shape[0]
    for start in range(0, s, chunk):
        rows = indicator[start:start + chunk]
        if len(rows) < chunk:
            rows = pad_rows(rows, chunk)
        yield start, subset_merges(pretrained, deltas, rows, alpha)


def subset_curve(indicator: np.ndarray, scores: Mapping[int, Mapping[str, float]], tasks: Sequence[str],
                 protocol: str = "observed") -> dict[int, float]:
    """Mean over subsets of each size of the subset's average normalized accuracy.

    ``scores[i][task]`` is subset i's normalized accuracy on ``task``. Protocol
    ``observed`` averages over the subset's own tasks, ``all`` over every task (SPEC §4);
    the empty subset (θ0) is averaged over all tasks in both.
    """
    if protocol not in ("observed", "all"):
        raise ValueError(f"protocol must be 'observed' or 'all', got {protocol!r}")
    by_size: dict[int, list[float]] = {}
    for i, row in enumerate(indicator):
        k = int(row.sum())
        evaluated = [t for t, on in zip(tasks, row) if on] if (protocol == "observed" and k > 0) else list(tasks)
        by_size.setdefault(k, []).append(float(np.mean([scores[i][t] for t in evaluated])))
    return {k: float(np.mean(v)) for k, v in sorted(by_size.items())}


def cosine_similarity_matrix(vectors: Sequence[Any], *, exclude: Callable | None = None) -> np.ndarray:
    """cos(τi, τj) over all floating leaves flattened together (SPEC §4, Fig. 8)."""
    flat = []
    for v in vectors:
        leaves = [jnp.ravel(jnp.asarray(x, jnp.float32)) for x in jax.tree.leaves(v) if is_floating(x)]
        flat.append(jnp.concatenate(leaves))
    m = jnp.stack(flat)
    gram = m @ m.T
    norms = jnp.sqrt(jnp.diag(gram))
    return np.asarray(gram / jnp.maximum(norms[:, None] * norms[None, :], 1e-30))
