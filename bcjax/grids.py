r"""(α, β, γ) grids of Model Breadcrumbs and many-model merges as compiled programs (SPEC §2, §4).

**One order-statistics pass per leaf × task for a whole (β, γ) grid.** The Breadcrumbs
thresholds of grid point g are the order statistics of ranks n_bot(g) and n − n_top(g) of
|τ| (SPEC §2). All 2·G ranks of a grid (deduplicated) go to ONE
:func:`bcjax.order_stats.select_bits` call per leaf and task — one coarse and one fine
histogram pass — instead of G separate mask computations.

**Many merged models per compiled call.** Every merged model here has the form

    θ*(m) = θ0 + Σ_t  W[m, t] · m_t^{g(m)} ⊙ τ_t        (sum over t in task order)

with ``W[m, t]`` = α(m) for the tasks in model m's subset and 0 elsewhere, and g(m) its
(β, γ) grid point. :func:`weighted_masked_merges` evaluates it per leaf for M models at
once (vmapped over m), accumulating over tasks in the same order and dtype as
:func:`bcjax.merge` ``("breadcrumbs", ...)``, so grid points equal point-by-point merges
exactly. For one (β, γ) and many subsets, the per-leaf contraction
:func:`bcjax.sweeps.subset_merges` (indicator × stacked Δ) is cheaper; :func:`grid_deltas`
gives its Δ for any grid point from the same thresholds.

**Sharding.** :func:`sharded` wraps any kernel here in ``jax.jit`` with caller-given
``in_shardings``/``out_shardings`` (nothing is hard-coded); :func:`leaf_shardings` builds
the usual "split each leaf's first divisible axis over a mesh axis" pytree of shardings.
All kernels are elementwise or additive histograms, so results are bit-identical for any
device count.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bcjax import hparams, order_stats
from bcjax.batching import pad_rows
from bcjax.masks import breadcrumbs_counts
from bcjax.tree import compute_dtype, merged_leaf_flags, validate_models

__all__ = ["GridPoint", "grid_axis", "grid_points", "beta_gamma_pairs", "masking_variant", "stack_task_vectors",
           "grid_threshold_bits",
           "grid_masks", "grid_deltas", "weighted_masked_merges", "breadcrumbs_grid_merge", "iter_grid_merges",
           "sharded", "leaf_shardings", "subset_merge_kernel"]

GridPoint = tuple  # (alpha, beta, gamma)


def grid_axis(values: Sequence, name: str) -> list[float]:
    """One grid axis read by :mod:`bcjax.hparams` (each a real in [0, 1] meaning the shortest
    decimal of its float32 — SPEC §2), as Python floats of those decimals."""
    if isinstance(values, (str, bytes)) or np.ndim(values) != 1:
        raise hparams.HyperparameterTypeError(f"grid: {name} must be a 1-D sequence of numbers, got {values!r}")
    return [hparams.real(v, f"{name}[{i}]", method="grid", low=0.0, high=1.0) for i, v in enumerate(values)]


def beta_gamma_pairs(betas: Sequence[float], gammas: Sequence[float]) -> list[tuple[float, float]]:
    """All (β, γ) with β ≤ γ from two axes, β-major (the grid's g index); each value is
    read as SPEC §2 says (:mod:`bcjax.hparams`), so a grid point equals the point merge."""
    bs, gs = grid_axis(betas, "betas"), grid_axis(gammas, "gammas")
    pairs = [(b, g) for b, g in itertools.product(bs, gs) if b <= g]
    if not pairs:
        raise hparams.HyperparameterError(f"grid: no (beta, gamma) pair with beta <= gamma in betas={list(betas)}, "
                                          f"gammas={list(gammas)}")
    return pairs


def masking_variant(beta: float, gamma: float) -> str:
    """Fig. 7's masking variants: ``no mask`` (β=0, γ=1), ``bottom-only`` (γ=1),
    ``top-only`` (β=0), else ``breadcrumbs`` (SPEC §2, ablations)."""
    if beta == 0 and gamma == 1:
        return "no mask"
    if gamma == 1:
        return "bottom-only"
    if beta == 0:
        return "top-only"
    return "breadcrumbs"


@jax.jit
def _stack_tau(p0, fts):
    dt = compute_dtype(p0.dtype)
    p = p0.astype(dt)
    return jnp.stack([f.astype(dt) - p for f in fts])


def stack_task_vectors(pretrained: Any, finetuned: Sequence[Any], *, exclude=None) -> Any:
    """τ stacked over tasks (leading axis T) in the compute dtype, for merged leaves; ``None``
    for leaves copied from θ0 (excluded, non-floating or empty)."""
    finetuned = list(finetuned)
    validate_models(pretrained, finetuned)
    flags = merged_leaf_flags(pretrained, exclude)
    leaves0, treedef = jax.tree.flatten(pretrained)
    per_model = [jax.tree.leaves(f) for f in finetuned]
    out = []
    for i, (p0, flag) in enumerate(zip(leaves0, flags, strict=True)):
        if not flag or np.size(p0) == 0:
            out.append(None)
        else:
            out.append(_stack_tau(jnp.asarray(p0), tuple(jnp.asarray(m[i]) for m in per_model)))
    return jax.tree.unflatten(treedef, out)


def _leaf_ranks(n: int, pairs: Sequence[tuple[float, float]]):
    """Host-side: unique ranks for the grid, and per point the index of its lo/hi rank and
    whether each bound exists (n_bot < n, n_top ≥ 1) — SPEC §2's counts in float64."""
    counts = [tuple(int(c) for c in breadcrumbs_counts(n, b, g)) for b, g in pairs]
    lo_r = np.array([min(max(nb, 0), n - 1) for nb, _ in counts])
    hi_r = np.array([min(max(n - nt, 0), n - 1) for _, nt in counts])
    ranks, inv = np.unique(np.concatenate([lo_r, hi_r]), return_inverse=True)
    g = len(pairs)
    has_lo = np.array([nb < n for nb, _ in counts])
    has_hi = np.array([nt >= 1 for _, nt in counts])
    return ranks.astype(np.int32), inv[:g].astype(np.int32), inv[g:].astype(np.int32), has_lo, has_hi


@jax.jit
def _thresholds(taus, ranks, lo_idx, hi_idx, has_lo, has_hi):
    """int32[T, G] lo and hi bits: ONE select_bits call (all ranks) per task."""
    los, his = [], []
    for t in range(taus.shape[0]):
        sel = order_stats.select_bits([order_stats.magnitude_bits(taus[t])], ranks)
        los.append(jnp.where(has_lo, sel[lo_idx], order_stats.NO_THRESHOLD))
        his.append(jnp.where(has_hi, sel[hi_idx], order_stats.NO_THRESHOLD))
    return jnp.stack(los), jnp.stack(his)


def grid_threshold_bits(taus: Any, pairs: Sequence[tuple[float, float]]) -> Any:
    """Per merged leaf, ``(lo, hi)`` int32[T, G] magnitude bits of every task's Breadcrumbs
    thresholds at every (β, γ) in ``pairs`` (``NO_THRESHOLD`` = +∞); ``None`` elsewhere.
    ``taus`` is :func:`stack_task_vectors`' output."""
    pairs = [hparams.beta_gamma(b, g, method="grid") for b, g in pairs]

    def leaf(tau):
        if tau is None:
            return None
        ranks, lo_idx, hi_idx, has_lo, has_hi = _leaf_ranks(int(np.prod(tau.shape[1:])), pairs)
        return _thresholds(tau, ranks, lo_idx, hi_idx, has_lo, has_hi)

    return jax.tree.map(leaf, taus, is_leaf=lambda x: x is None)


def _masks(tau, lo, hi):
    bits = order_stats.magnitude_bits(tau)
    shape = (-1,) + (1,) * (tau.ndim - 1)
    return (bits >= lo.reshape(shape)) & (bits < hi.reshape(shape))


def grid_masks(taus: Any, thresholds: Any, g: int) -> Any:
    """bool[T, ...] Breadcrumbs masks of every task at grid point ``g`` (``None`` for leaves
    not merged)."""
    return jax.tree.map(lambda tau, th: None if tau is None else _masks(tau, th[0][:, g], th[1][:, g]),
                        taus, thresholds, is_leaf=lambda x: x is None)


@jax.jit
def _delta(tau, lo, hi):
    return jnp.where(_masks(tau, lo, hi), tau, 0)


def grid_deltas(pretrained: Any, taus: Any, thresholds: Any, g: int) -> Any:
    """Stacked Δt = m_t ⊙ τt at grid point ``g`` for :func:`bcjax.sweeps.subset_merges`
    (zeros for leaves copied from θ0), like :func:`bcjax.sweeps.task_deltas`."""
    t = next(x.shape[0] for x in jax.tree.leaves(taus))

    def leaf(p0, tau, th):
        if tau is None:
            return jnp.zeros((t,) + np.shape(p0), jnp.result_type(p0))
        return _delta(tau, th[0][:, g], th[1][:, g])

    return jax.tree.map(leaf, pretrained, taus, thresholds, is_leaf=lambda x: x is None)


def _merge_leaf(p0, tau, lo, hi, weights, gidx):
    """[M, ...]: θ0 + Σ_t W[m, t] · where(mask_t^{g(m)}, τ_t, 0), tasks accumulated in order
    exactly as :func:`bcjax.merge` ("breadcrumbs") does."""
    dt = compute_dtype(p0.dtype)
    p = p0.astype(dt)
    bits = order_stats.magnitude_bits(tau)

    def one(w, g):
        acc = jnp.zeros_like(p)
        for t in range(tau.shape[0]):
            keep = (bits[t] >= lo[t, g]) & (bits[t] < hi[t, g])
            acc = acc + jnp.where(keep, w[t].astype(dt) * tau[t], 0)
        return (p + acc).astype(p0.dtype)

    return jax.vmap(one)(weights, gidx)


def _merges_impl(pretrained, taus, thresholds, weights, gidx):
    m = weights.shape[0]

    def leaf(p0, tau, th):
        if tau is None:
            return jnp.broadcast_to(p0, (m,) + jnp.shape(p0))
        return _merge_leaf(p0, tau, th[0], th[1], weights, gidx)

    return jax.tree.map(leaf, pretrained, taus, thresholds, is_leaf=lambda x: x is None)


_merges_jit = jax.jit(_merges_impl)


def weighted_masked_merges(pretrained: Any, taus: Any, thresholds: Any, weights, gidx, *,
                           kernel: Callable | None = None) -> Any:
    """Stacked merged trees (leading axis M): model m is θ0 + Σ_t weights[m, t] ·
    m_t^{gidx[m]} ⊙ τ_t (module docstring). ``weights`` float32[M, T], ``gidx`` int32[M].
    ``kernel``: a :func:`sharded` version of this computation (default: plain ``jax.jit``)."""
    weights = jnp.asarray(weights, jnp.float32)
    gidx = jnp.asarray(gidx, jnp.int32)
    return (kernel or _merges_jit)(jax.tree.map(jnp.asarray, pretrained), taus, thresholds, weights, gidx)


def grid_points(alphas: Sequence, pairs: Sequence[tuple[float, float]]) -> list[GridPoint]:
    """(α, β, γ) points, β-major then α, each α read by :mod:`bcjax.hparams` (finite real)."""
    alphas = [hparams.real(a, f"alphas[{i}]", method="grid") for i, a in enumerate(alphas)]
    return [(a, b, g) for (b, g) in pairs for a in alphas]


def breadcrumbs_grid_merge(pretrained: Any, finetuned: Sequence[Any], alphas: Sequence[float],
                           betas: Sequence[float], gammas: Sequence[float], *, exclude=None,
                           subset: Sequence[bool] | None = None) -> tuple[Any, list[GridPoint]]:
    """Breadcrumbs merges of ``finetuned`` (or of the tasks in ``subset``) at every grid
    point (α, β, γ) with β ≤ γ; returns (stacked trees with leading axis G·A, the points in
    that order: β-major, then γ, then α). One order-statistics pass per leaf × task.

    Holds every merged model at once; for big models iterate :func:`iter_grid_merges`.
    """
    merged, points = None, []
    for _, stacked, pts in iter_grid_merges(pretrained, finetuned, alphas, betas, gammas, exclude=exclude,
                                            subset=subset, chunk=None):
        merged, points = stacked, pts
    return merged, points


def iter_grid_merges(pretrained, finetuned, alphas, betas, gammas, *, exclude=None, subset=None,
                     chunk: int | None = 8, kernel: Callable | None = None) -> Iterator[tuple[int, Any, list]]:
    """Yield (start, stacked merged trees, their points) ``chunk`` grid points at a time (the
    last chunk padded by repeating its last point; ``chunk=None``: all at once)."""
    finetuned = list(finetuned)
    pairs = beta_gamma_pairs(betas, gammas)
    points = grid_points(alphas, pairs)
    taus = stack_task_vectors(pretrained, finetuned, exclude=exclude)
    thresholds = grid_threshold_bits(taus, pairs)
    on = np.ones(len(finetuned), bool) if subset is None else np.asarray(subset, bool)
    if on.shape != (len(finetuned),):
        raise ValueError(f"subset must have one flag per fine-tuned model ({len(finetuned)}), got shape {on.shape}")
    weights = np.array([[a * float(v) for v in on] for a, _, _ in points], np.float32)
    gidx = np.array([pairs.index((b, g)) for _, b, g in points], np.int32)
    size = len(points) if chunk is None else chunk
    for start in range(0, len(points), size):
        w, gi = weights[start:start + size], gidx[start:start + size]
        n = len(w)
        w, gi = pad_rows(w, size), pad_rows(gi, size)
        yield start, weighted_masked_merges(pretrained, taus, thresholds, w, gi, kernel=kernel), \
            points[start:start + n]


# ----------------------------------------------------------------------------- sharding
def sharded(fn: Callable, *, in_shardings=None, out_shardings=None, **jit_kwargs) -> Callable:
    """``jax.jit(fn, in_shardings=..., out_shardings=...)`` — shardings come from the caller
    (a pytree matching the arguments/outputs, or ``None`` to let XLA choose)."""
    kw = dict(jit_kwargs)
    if in_shardings is not None:
        kw["in_shardings"] = in_shardings
    if out_shardings is not None:
        kw["out_shardings"] = out_shardings
    return jax.jit(fn, **kw)


def leaf_shardings(tree: Any, mesh, axis_name: str, *, skip_leading: int = 0) -> Any:
    """NamedSharding per leaf: the first axis after ``skip_leading`` stacked axes whose size
    the mesh axis divides is split over ``axis_name``; other leaves are replicated."""
    size = mesh.shape[axis_name]

    def one(x):
        if x is None:
            return None
        shape = np.shape(x)
        spec = [None] * len(shape)
        for ax in range(skip_leading, len(shape)):
            if shape[ax] % size == 0 and shape[ax] >= size:
                spec[ax] = axis_name
                break
        return NamedSharding(mesh, P(*spec))

    return jax.tree.map(one, tree, is_leaf=lambda x: x is None)


def subset_merge_kernel(*, in_shardings=None, out_shardings=None) -> Callable:
    """The subset contraction of :func:`bcjax.sweeps.subset_merges` (θ0 + α · indicator @ Δ
    per leaf) jitted with the given shardings: ``kernel(pretrained, deltas, indicator, alpha)``."""
    from bcjax.sweeps import subset_merges

    return sharded(subset_merges, in_shardings=in_shardings, out_shardings=out_shardings)


def merges_kernel(*, in_shardings=None, out_shardings=None) -> Callable:
    """:func:`weighted_masked_merges`' computation jitted with the given shardings:
    ``kernel(pretrained, taus, thresholds, weights, gidx)``."""
    return sharded(_merges_impl, in_shardings=in_shardings, out_shardings=out_shardings)
