r"""Masks over task vectors: Model Breadcrumbs (SPEC §2) and random Bernoulli masks (SPEC §3).

Breadcrumbs, per leaf, with a = |τ| flattened (length n), sorted a(0) ≤ … ≤ a(n−1):

    n_bot = ⌊β·n + 1e-6⌋,  n_top = ⌊(1 − γ)·n + 1e-6⌋
    lo = a(n_bot) if n_bot < n else +∞,   hi = a(n − n_top) if n_top ≥ 1 else +∞
    keep entry i  ⇔  lo ≤ |τ_i| < hi

lo and hi are exact order statistics (:mod:`bcjax.order_stats`), computed on float32
magnitudes whatever the leaf dtype. The mask depends on values only, so it is
permutation-equivariant and independent of layout, sharding and device count.

Hyper-parameters given as Python/NumPy numbers use the formula above in float64 exactly.
Traced values (under ``jit``/``vmap``, e.g. a grid) are float32, which cannot represent
0.9 or 0.99: their counts are computed on the host in float64 (``pure_callback``), and
β·n is snapped to the nearest integer when it lies within β's own float32 rounding
(n·ulp(β)/2) of it. The two agree except when the exact β·n lies within that distance of
an integer without being one (|β·n − k| < n·2⁻²⁵ for β in [½, 1)).
"""
from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bcjax import order_stats
from bcjax.errors import HyperparameterError
from bcjax.tree import compute_dtype, keystr, make_leaf_filter

__all__ = [
    "is_concrete",
    "check_beta_gamma",
    "check_fraction",
    "concrete_count",
    "fraction_count",
    "linear_count",
    "breadcrumbs_counts",
    "breadcrumbs_threshold_bits",
    "mask_from_counts",
    "breadcrumbs_leaf_mask",
    "breadcrumbs_row_mask",
    "breadcrumbs_mask",
    "bernoulli_leaf_mask",
    "breadcrumbs_from_mergekit",
    "breadcrumbs_from_official",
]

_EPS = 1e-6


def is_concrete(x) -> bool:
    """True for Python/NumPy numbers and concrete (non-traced) arrays."""
    if isinstance(x, jax.core.Tracer):
        return False
    return isinstance(x, (numbers.Number, np.ndarray, np.generic, jax.Array))


def _as_float(x) -> float | None:
    if not is_concrete(x) or np.ndim(x) != 0:
        return None
    return float(np.asarray(x))


def check_beta_gamma(beta, gamma) -> None:
    """Raise :class:`HyperparameterError` unless 0 ≤ β ≤ γ ≤ 1 (concrete values only;
    traced values are checked by the caller's eager entry point)."""
    b = np.asarray(beta, np.float64) if is_concrete(beta) else None
    g = np.asarray(gamma, np.float64) if is_concrete(gamma) else None
    for name, v in (("beta", b), ("gamma", g)):
        if v is not None and (not np.all(np.isfinite(v)) or np.any(v < 0) or np.any(v > 1)):
            raise HyperparameterError(f"{name} must lie in [0, 1], got {v.tolist()}")
    if b is not None and g is not None and np.any(b > g):
        raise HyperparameterError(f"need beta <= gamma (0 <= beta <= gamma <= 1), got beta={b.tolist()}, gamma={g.tolist()}")


def check_fraction(name: str, value) -> None:
    """Raise unless a concrete ``value`` lies in (0, 1] (density, keep)."""
    if is_concrete(value):
        v = np.asarray(value, np.float64)
        if not np.all(np.isfinite(v)) or np.any(v <= 0) or np.any(v > 1):
            raise HyperparameterError(f"{name} must lie in (0, 1], got {v.tolist()}")


def _snapped_floor(p: np.ndarray, tol: np.ndarray) -> np.ndarray:
    nearest = np.round(p)
    p = np.where(np.abs(p - nearest) <= tol, nearest, p)
    return np.floor(p + _EPS)


def concrete_count(n: int, const: float, terms) -> int | None:
    """⌊x·n + 1e-6⌋ clipped to [0, n] as a Python int (exact for any n) when every fᵢ of
    ``terms`` is concrete (see :func:`linear_count`); None when one is traced."""
    values = [_as_float(v) for _, v in terms]
    if any(v is None for v in values):
        return None
    x = const + sum(c * v for (c, _), v in zip(terms, values))
    return min(max(int(np.floor(x * n + _EPS)), 0), n)


def linear_count(n: int, const: float, terms) -> jax.Array:
    """⌊x·n + 1e-6⌋ as int32 with x = const + Σ coefᵢ·fᵢ, ``terms = [(coefᵢ, fᵢ)]``.

    Concrete fᵢ: evaluated in float64 exactly as SPEC §2 writes it. Traced fᵢ (float32
    under jit/vmap): evaluated on the host in float64, and x·n is snapped to the nearest
    integer when it lies within the float32 rounding of the fᵢ (n·Σ|coefᵢ|·ulp(fᵢ)/2) of
    it, so a traced 0.9 counts like the decimal 0.9 (module docstring).
    """
    count = concrete_count(n, const, terms)
    if count is not None:
        return jnp.int32(count)
    coefs = [float(c) for c, _ in terms]
    args = jnp.broadcast_arrays(*[jnp.asarray(v, jnp.float32) for _, v in terms])

    def host(*fs):
        fs = [np.asarray(f, np.float32) for f in fs]
        x = const + sum(c * f.astype(np.float64) for c, f in zip(coefs, fs))
        tol = n * sum(abs(c) * np.spacing(np.abs(f)).astype(np.float64) / 2 for c, f in zip(coefs, fs)) + _EPS
        return np.clip(_snapped_floor(x * n, tol), 0, n).astype(np.int32)

    return jax.pure_callback(host, jax.ShapeDtypeStruct(args[0].shape, jnp.int32), *args,
                             vmap_method="expand_dims")


def fraction_count(frac, n: int) -> jax.Array:
    """⌊frac·n + 1e-6⌋ (see :func:`linear_count`)."""
    return linear_count(n, 0.0, [(1.0, frac)])


def breadcrumbs_counts(n: int, beta, gamma):
    """(n_bot, n_top) = (⌊β·n + 1e-6⌋, ⌊(1 − γ)·n + 1e-6⌋) of SPEC §2 for a leaf of n entries."""
    return linear_count(n, 0.0, [(1.0, beta)]), linear_count(n, 1.0, [(-1.0, gamma)])


def _threshold_ranks(n: int, n_bot, n_top) -> jax.Array:
    """The two order-statistic ranks behind the SPEC §2 thresholds (clipped into range)."""
    return jnp.stack([jnp.clip(n_bot, 0, n - 1), jnp.clip(n - n_top, 0, n - 1)]).astype(jnp.int32)


def _thresholds_from(lo_hi, n: int, n_bot, n_top):
    """(lo, hi) from the selected order statistics; ``NO_THRESHOLD`` stands for +∞ (nothing
    dropped on that side)."""
    lo = jnp.where(n_bot < n, lo_hi[..., 0], order_stats.NO_THRESHOLD)
    hi = jnp.where(n_top >= 1, lo_hi[..., 1], order_stats.NO_THRESHOLD)
    return lo, hi


def _threshold_bits(select, n: int, n_bot, n_top):
    """(lo, hi) magnitude bits from the SPEC §2 counts, ``select(ranks)`` giving order statistics."""
    return _thresholds_from(select(_threshold_ranks(n, n_bot, n_top)), n, n_bot, n_top)


def breadcrumbs_threshold_bits(bits: jax.Array, n_bot, n_top):
    """(lo, hi) as magnitude bits for one leaf given its ``bits`` and the SPEC §2 counts;
    ``NO_THRESHOLD`` stands for +∞. One selection pass for both."""
    return _threshold_bits(lambda r: order_stats.select_bits([bits], r), bits.size, n_bot, n_top)


def mask_from_counts(tau: jax.Array, n_bot, n_top) -> jax.Array:
    """keep ⇔ lo ≤ |τ| < hi for one non-empty leaf, given its SPEC §2 counts (traceable)."""
    bits = order_stats.magnitude_bits(tau)
    lo, hi = breadcrumbs_threshold_bits(bits, n_bot, n_top)
    return (bits >= lo) & (bits < hi)


def diff_masks_from_counts(finetuned, pretrained: jax.Array, n_bot, n_top) -> list[jax.Array]:
    """:func:`mask_from_counts` of τt = finetuned[t] − pretrained for every task of one leaf,
    without writing τ to memory for the selection: the order statistics of all tasks come
    from one pass over the leaf where the native CPU kernel applies (same result everywhere).

    Leaves may come in their storage dtype: τt is taken in the compute dtype
    (:func:`bcjax.tree.compute_dtype`, float32 for 16-bit floats, SPEC §1), and bfloat16
    leaves reach the native kernel as they are (no float32 copy of the T + 1 leaves)."""
    n = pretrained.size
    ranks = jnp.broadcast_to(_threshold_ranks(n, n_bot, n_top), (len(finetuned), 2))
    selected = order_stats.select_diff_bits_leaves([pretrained], [[f] for f in finetuned], ranks)
    lo, hi = _thresholds_from(selected, n, n_bot, n_top)
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
    if tau.ndim == 0:
        tau_rows, axis = tau[None], 0
    else:
        tau_rows = tau
    axis = axis % tau_rows.ndim
    m = tau_rows.shape[axis]
    if m == 0:
        return jnp.zeros(tau.shape, bool)
    n_top = linear_count(m, 1.0, [(-1.0, gamma)])
    n_keep = linear_count(m, 0.0, [(1.0, gamma), (-1.0, beta)])
    n_bot = jnp.maximum(m - n_top - n_keep, 0)
    a = jnp.abs(jnp.moveaxis(tau_rows, axis, -1).astype(jnp.float32))
    s = jnp.sort(a, axis=-1)
    lo = jnp.where(n_bot < m, s[..., jnp.clip(n_bot, 0, m - 1)], jnp.inf)[..., None]
    hi = jnp.where(n_top >= 1, s[..., jnp.clip(m - n_top, 0, m - 1)], jnp.inf)[..., None]
    keep_mask = (a >= lo) & (a < hi)  # hi = +inf keeps every finite entry
    return jnp.moveaxis(keep_mask, -1, axis).reshape(tau.shape)


AxisSpec = int | Callable[[str, tuple], int] | None


def breadcrumbs_mask(task_vector: Any, beta, gamma, *, granularity: str = "tensor",
                     axis: AxisSpec = None, exclude=None) -> Any:
    """Model Breadcrumbs mask of a task-vector pytree (SPEC §2): a pytree of bool.

    Args:
      task_vector: pytree of arrays τ = θt − θ0 (see :func:`bcjax.task_vector`).
      beta, gamma: 0 ≤ β ≤ γ ≤ 1; β masks the smallest fraction, entries above the γ
        quantile are masked. The paper's "90% sparsity" is β=0.90, γ=0.99.
      granularity: ``"tensor"`` (per leaf, the SPEC rule) or ``"row"`` (per row along
        ``axis``, the official code's rule; Flax Dense kernels are [in, out], so the
        PyTorch last axis of a Linear weight is Flax ``axis=0``).
      axis: for ``"row"``: an int, or ``callable(path, shape) -> int`` per leaf.
      exclude: regex(es) on the '/'-joined key path, or a predicate; excluded and
        non-floating leaves get an all-False mask (they are copied from θ0 in a merge).
    """
    check_beta_gamma(beta, gamma)
    if granularity not in ("tensor", "row"):
        raise ValueError(f"granularity must be 'tensor' or 'row', got {granularity!r}")
    if granularity == "row" and axis is None:
        raise ValueError("granularity='row' needs an explicit axis (the official code ranks along the "
                         "PyTorch last axis; for Flax Dense kernels [in, out] that is axis=0)")
    keep = make_leaf_filter(exclude)

    def one(path, leaf):
        p = keystr(path)
        if not keep(p, leaf):
            return jnp.zeros(np.shape(leaf), bool)
        if granularity == "tensor":
            return breadcrumbs_leaf_mask(leaf, beta, gamma)
        ax = axis(p, tuple(np.shape(leaf))) if callable(axis) else axis
        return breadcrumbs_row_mask(leaf, beta, gamma, ax)

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
