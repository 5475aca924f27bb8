r"""Masks over task vectors: Model Breadcrumbs (SPEC §2) and random Bernoulli masks (SPEC §3).

Breadcrumbs, per leaf, with a = |τ| flattened (length n), sorted a(0) ≤ … ≤ a(n−1):

    n_bot = ⌊β·n + 1e-6⌋,  n_top = ⌊(1 − γ)·n + 1e-6⌋
    lo = a(n_bot) if n_bot < n else +∞,   hi = a(n − n_top) if n_top ≥ 1 else +∞
    keep entry i  ⇔  lo ≤ |τ_i| < hi

lo and hi are exact order statistics (:mod:`bcjax.order_stats`), computed on float32
magnitudes whatever the leaf dtype. The mask depends on values only, so it is
permutation-equivariant and independent of layout, sharding and device count.

β and γ are read by :mod:`bcjax.hparams` (SPEC §2): however they arrive (Python float,
NumPy/JAX scalar, array element, traced under ``jit``/``vmap``) they mean the shortest
decimal that rounds to the same float32, and the counts are computed from that decimal in
exact rational arithmetic (on the host via ``pure_callback`` for traced values), so every
form gives the same mask for every leaf size.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bcjax import hparams, order_stats
from bcjax.errors import HyperparameterError
from bcjax.tree import check_finite, compute_dtype, keystr, make_leaf_filter

__all__ = [
    "is_concrete",
    "check_beta_gamma",
    "check_fraction",
    "fraction_count",
    "linear_count",
    "breadcrumbs_counts",
    "breadcrumbs_threshold_bits",
    "threshold_ranks",
    "thresholds_from",
    "mask_from_counts",
    "breadcrumbs_leaf_mask",
    "breadcrumbs_row_mask",
    "breadcrumbs_mask",
    "bernoulli_leaf_mask",
    "breadcrumbs_from_mergekit",
    "breadcrumbs_from_official",
]

def is_concrete(x) -> bool:
    """True for Python/NumPy numbers and concrete (non-traced) arrays."""
    if isinstance(x, jax.core.Tracer):
        return False
    return isinstance(x, (numbers.Number, np.ndarray, np.generic, jax.Array))


def check_beta_gamma(beta, gamma, *, method: str | None = "breadcrumbs") -> None:
    """Raise :class:`HyperparameterError` unless β, γ are real scalars with 0 ≤ β ≤ γ ≤ 1
    (:func:`bcjax.hparams.beta_gamma`; traced values: type and shape only)."""
    hparams.beta_gamma(beta, gamma, method=method)


def check_fraction(name: str, value, *, method: str | None = None) -> None:
    """Raise unless ``value`` is a real scalar in (0, 1] (density, keep)."""
    hparams.real(value, name, method=method, low=0.0, high=1.0, low_open=True)


def linear_count(n: int, const: float, terms):
    """⌊x·n + 1e-6⌋ clipped to [0, n], x = const + Σ coefᵢ·fᵢ, ``terms = [(coefᵢ, fᵢ)]``, each
    fᵢ read as the shortest decimal of its float32 (SPEC §2), in exact rational arithmetic:
    a Python int for concrete fᵢ, an int32 array for traced ones
    (:func:`bcjax.hparams.count`)."""
    return hparams.count(n, const, terms)


def fraction_count(frac, n: int):
    """⌊frac·n + 1e-6⌋ (see :func:`linear_count`)."""
    return linear_count(n, 0, [(1, frac)])


def breadcrumbs_counts(n: int, beta, gamma):
    """(n_bot, n_top) = (⌊β·n + 1e-6⌋, ⌊(1 − γ)·n + 1e-6⌋) of SPEC §2 for a leaf of n entries."""
    return linear_count(n, 0, [(1, beta)]), linear_count(n, 1, [(-1, gamma)])


def threshold_ranks(n: int, n_bot, n_top, xp=jnp) -> jax.Array:
    """The two order-statistic ranks behind the SPEC §2 thresholds (clipped into range);
    ``xp=np`` for concrete counts (the native host merge, no XLA program)."""
    return xp.stack([xp.clip(n_bot, 0, n - 1), xp.clip(n - n_top, 0, n - 1)]).astype(xp.int32)


def thresholds_from(lo_hi, n: int, n_bot, n_top, xp=jnp):
    """(lo, hi) from the selected order statistics; ``NO_THRESHOLD`` stands for +∞ (nothing
    dropped on that side)."""
    lo = xp.where(n_bot < n, lo_hi[..., 0], order_stats.NO_THRESHOLD)
    hi = xp.where(n_top >= 1, lo_hi[..., 1], order_stats.NO_THRESHOLD)
    return lo, hi


def _threshold_bits(select, n: int, n_bot, n_top):
    """(lo, hi) magnitude bits from the SPEC §2 counts, ``select(ranks)`` giving order statistics."""
    return thresholds_from(select(threshold_ranks(n, n_bot, n_top)), n, n_bot, n_top)


def breadcrumbs_threshold_bits(bits: jax.Array, n_bot, n_top):
    """(lo, hi) as magnitude bits for one leaf given its ``bits`` and the SPEC §2 counts;
    ``NO_THRESHOLD`` stands for +∞. One selection pass for both."""
    return _threshold_bits(lambda r: order_stats.select_bits([bits], r), bits.size, n_bot, n_top)


def mask_from_counts(tau: jax.Array, n_bot, n_top) -> jax.Array:
    """keep ⇔ lo ≤ |τ| < hi for one non-empty leaf, given its SPEC §2 counts (traceable)."""
    bits = order_stats.magnitude_bits(tau)
    lo, hi = breadcrumbs_threshold_bits(bits, n_bot, n_top)
    return (bits >= lo) & (bits < hi)


def diff_masks_from_counts(finetuned, pretrained: jax.Array, n_bot, n_top, *, select=None) -> list[jax.Array]:
    """:func:`mask_from_counts` of τt = finetuned[t] − pretrained for every task of one leaf,
    without writing τ to memory for the selection: the order statistics of all tasks come
    from one pass over the leaf where the native CPU kernel applies (same result everywhere).
    ``select(ranks[T, K]) -> bits[T, K]`` replaces that selection (same contract as
    :func:`order_stats.select_diff_bits_multi`; e.g. one reading the inputs where they lie).

    Leaves may come in their storage dtype: τt is taken in the compute dtype
    (:func:`bcjax.tree.compute_dtype`, float32 for 16-bit floats, SPEC §1), and bfloat16
    leaves reach the native kernel as they are (no float32 copy of the T + 1 leaves)."""
    n = pretrained.size
    ranks = jnp.broadcast_to(threshold_ranks(n, n_bot, n_top), (len(finetuned), 2))
    select = select or (lambda r: order_stats.select_diff_bits_leaves([pretrained], [[f] for f in finetuned], r))
    lo, hi = thresholds_from(select(ranks), n, n_bot, n_top)
    dt = compute_dtype(pretrained.dtype)
    p = pretrained.astype(dt)
    masks = []
    for t, ft in enumerate(finetuned):
        bits = order_stats.magnitude_bits(ft.astype(dt) - p)
        masks.append((bits >= lo[t]) & (bits < hi[t]))
    return masks


def breadcrumbs_leaf_mask(tau: jax.Array, beta, gamma) -> jax.Array:
    """Boolean mask of one leaf (``granularity="tensor"``, SPEC §2)."""
    tau = jnp.asarray(tau)
    if tau.size == 0:
        return jnp.zeros(tau.shape, bool)
    n_bot, n_top = breadcrumbs_counts(tau.size, beta, gamma)
    return _jit_mask_from_counts(tau, n_bot, n_top)


def breadcrumbs_row_mask(tau: jax.Array, beta, gamma, axis: int) -> jax.Array:
    """Per-row mask reproducing the paper's official code (SPEC §2): along ``axis`` (rows of
    length m), drop the top ⌊(1−γ)m⌋ entries by |τ|, keep the top ⌊(γ−β)m⌋ of the rest.

    Counts follow the official code (remove r = 1 − γ, keep k = γ − β, each ⌊·m + 1e-6⌋),
    thresholds are value-based like the tensor mask (identical to the official top-k
    without ties; with ties all equal magnitudes are treated alike).
    """
    tau = jnp.asarray(tau)
    axis = hparams.leaf_axis(axis, tau.ndim, method="breadcrumbs_row_mask")
    tau_rows = tau[None] if tau.ndim == 0 else tau
    m = tau_rows.shape[axis]
    if m == 0:
        return jnp.zeros(tau.shape, bool)
    n_top = linear_count(m, 1, [(-1, gamma)])
    n_keep = linear_count(m, 0, [(1, gamma), (-1, beta)])
    n_bot = jnp.maximum(m - n_top - n_keep, 0)
    a = jnp.abs(jnp.moveaxis(tau_rows, axis, -1).astype(jnp.float32))
    s = jnp.sort(a, axis=-1)
    lo = jnp.where(n_bot < m, s[..., jnp.clip(n_bot, 0, m - 1)], jnp.inf)[..., None]
    hi = jnp.where(n_top >= 1, s[..., jnp.clip(m - n_top, 0, m - 1)], jnp.inf)[..., None]
    # n_top = 0 removes nothing from the top: also not a |τ| that overflowed float32 (finite inputs)
    keep_mask = (a >= lo) & ((a < hi) | (n_top < 1))
    return jnp.moveaxis(keep_mask, -1, axis).reshape(tau.shape)


AxisSpec = int | Callable[[str, tuple], int] | None
#: Breadcrumbs' ``granularity`` (SPEC §2): per leaf, or per row along an explicit axis.
GRANULARITY = hparams.Choice(("tensor", "row"))


def breadcrumbs_mask(task_vector: Any, beta, gamma, *, granularity: str = "tensor",
                     axis: AxisSpec = None, exclude=None) -> Any:
    """Model Breadcrumbs mask of a task-vector pytree (SPEC §2): a pytree of bool.

    Args:
      task_vector: pytree of arrays τ = θt − θ0 (see :func:`bcjax.task_vector`).
      beta, gamma: real scalars, 0 ≤ β ≤ γ ≤ 1; β masks the smallest fraction, entries above
        the γ quantile are masked. The paper's "90% sparsity" is β=0.90, γ=0.99. Read as the
        shortest decimal of their float32 (:mod:`bcjax.hparams`): strings, None, bools,
        arrays and NaN are errors.
      granularity: ``"tensor"`` (per leaf, the SPEC rule) or ``"row"`` (per row along
        ``axis``, the official code's rule; Flax Dense kernels are [in, out], so the
        PyTorch last axis of a Linear weight is Flax ``axis=0``).
      axis: for ``"row"``: an int, or ``callable(path, shape) -> int`` per leaf; it must lie
        in [−ndim, ndim) of each leaf (an error naming the key path, never wrapped).
      exclude: regex(es) on the '/'-joined key path, or a predicate; excluded and
        non-floating leaves get an all-False mask (they are copied from θ0 in a merge).

    NaN/Inf in a floating leaf of ``task_vector`` raises :class:`bcjax.errors.NonFiniteError`
    naming the key path (SPEC §1; a NaN has no rank), checked when values are concrete.
    """
    beta, gamma = hparams.beta_gamma(beta, gamma, method="breadcrumbs_mask")
    hparams.normalize("breadcrumbs_mask", {"granularity": GRANULARITY}, {"granularity": granularity})
    check_finite([task_vector], ["task vector"])
    if granularity == "row" and axis is None:
        raise HyperparameterError("breadcrumbs_mask: granularity='row' needs an explicit axis (the official code "
                                  "ranks along the PyTorch last axis; for Flax Dense kernels [in, out] that is axis=0)")
    keep = make_leaf_filter(exclude)

    def one(path, leaf):
        p = keystr(path)
        if not keep(p, leaf):
            return jnp.zeros(np.shape(leaf), bool)
        if granularity == "tensor":
            return breadcrumbs_leaf_mask(leaf, beta, gamma)
        ax = axis(p, tuple(np.shape(leaf))) if callable(axis) else axis
        return breadcrumbs_row_mask(leaf, beta, gamma, hparams.leaf_axis(ax, np.ndim(leaf), method="breadcrumbs_mask",
                                                                         path=p))

    return jax.tree_util.tree_map_with_path(one, task_vector)


_jit_mask_from_counts = jax.jit(mask_from_counts)


def bernoulli_leaf_mask(key, keep, shape) -> jax.Array:
    """i.i.d. Bernoulli(keep) mask for one leaf (random-sparsified TA and DARE, SPEC §3)."""
    return jax.random.bernoulli(key, jnp.asarray(keep, jnp.float32), shape)


def breadcrumbs_from_mergekit(density: float, gamma: float) -> tuple[float, float]:
    """mergekit ``breadcrumbs(density=d, gamma=g)`` → (β, γ) = (1 − d − g, 1 − g) (SPEC §2).

    mergekit ranks the whole tensor like bcjax; unlike mergekit, bcjax does not zero the
    whole tensor when g·n < 1.
    """
    beta, gam = 1.0 - density - gamma, 1.0 - gamma
    beta = 0.0 if abs(beta) < 1e-12 else beta
    _check_converted(beta, gam, f"mergekit density={density}, gamma={gamma}")
    return beta, gam


def breadcrumbs_from_official(keep: float, remove: float) -> tuple[float, float]:
    """The paper's official code (flags ``beta`` = keep fraction k, ``gamma`` = remove
    fraction r, per row) → (β, γ) = (1 − r − k, 1 − r). Use with ``granularity="row"``
    to reproduce its per-row ranking exactly (SPEC §2)."""
    beta, gam = 1.0 - remove - keep, 1.0 - remove
    beta = 0.0 if abs(beta) < 1e-12 else beta
    _check_converted(beta, gam, f"official keep={keep}, remove={remove}")
    return beta, gam


def _check_converted(beta, gamma, what):
    try:
        check_beta_gamma(beta, gamma)
    except HyperparameterError as e:
        raise HyperparameterError(f"{what} gives no valid (beta, gamma): {e}") from None
