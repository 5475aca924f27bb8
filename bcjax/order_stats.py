r"""Exact order statistics of magnitudes by radix selection on the float32 bit pattern.

SPEC §2 needs *exact* order statistics of |τ| per leaf (not interpolated quantiles), and
TIES (SPEC §3) needs one over all leaves of a model together. XLA's sort and top-k are slow
on CPU (hundreds of ns per element), while a scatter-add histogram costs a few ns. So:

For x ≥ 0 (finite), the int32 bit pattern of float32(x) is monotone in x. A value's bits
split into a *coarse* part ``bits >> 15`` (2^16 bins) and a *fine* part ``bits & 0x7fff``
(2^15 bins). To find the k-th smallest element (0-indexed):

1. coarse histogram h1 over all elements, cumulative c1; the target's coarse bin is
   b = #{j : c1[j] ≤ k}, and ``below = c1[b] − h1[b]`` elements lie in lower bins;
2. fine histogram h2 of the elements whose coarse part is b, cumulative c2; the fine part is
   f = #{j : c2[j] ≤ k − below}; the answer's bits are ``(b << 15) | f``.

Two passes, no sort, exact for every input (ties included), deterministic, and the
histograms are *additive*: the histogram of a union of arrays (all leaves of a model, or
the shards of one leaf on a device mesh) is the sum of theirs. Several ranks share one
coarse pass and one fine pass (K rows), which is how a (β, γ) grid reuses a single pass per
leaf. Device counts are int32: one histogram covers at most 2^31 − 1 elements; larger
selections (TIES over a model of more than 2^31 − 1 merged entries) sum per-chunk histograms
on the host in int64 (:func:`accumulate_histograms`) and resolve them there
(:func:`locate_coarse` / :func:`resolve_fine` on NumPy arrays).

Tiny inputs (≤ ``SORT_BELOW`` elements) are sorted instead; the result is identical.

On the CPU backend a single array is selected by a native kernel instead
(:mod:`bcjax._native`: one vectorised streaming pass, sample → bracket → count → select,
about 10× faster than XLA:CPU's element-at-a-time scatter), with identical results. The
choice is made per backend at lowering time (``lax.platform_dependent``), so the same
jitted program runs the histogram path on GPU/TPU. Set ``BCJAX_NATIVE=0`` to force the
portable path everywhere.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bcjax import _native

__all__ = [
    "magnitude_bits",
    "bits_to_float",
    "coarse_histogram",
    "locate_coarse",
    "fine_histogram",
    "resolve_fine",
    "accumulate_histograms",
    "select_bits",
    "select_diff_bits_multi",
    "select_diff_bits_leaves",
    "kth_smallest_magnitude",
    "MAX_COUNT",
    "NO_THRESHOLD",
    "SORT_BELOW",
]

_FINE_BITS = 15
N_COARSE = 1 << 16  # bins of bits >> 15 for bits in [0, 2^31)
N_FINE = 1 << _FINE_BITS
#: A threshold above every finite magnitude's bits (and above +inf's): "no bound".
NO_THRESHOLD = jnp.iinfo(jnp.int32).max
#: Inputs with at most this many elements are sorted instead of histogrammed.
SORT_BELOW = 2048
#: The most elements one device (int32-counted) selection covers.
MAX_COUNT = int(jnp.iinfo(jnp.int32).max)


def magnitude_bits(x: jax.Array) -> jax.Array:
    """int32 bit pattern of float32(|x|); order-preserving for finite x (−0 maps to +0)."""
    return lax.bitcast_convert_type(jnp.abs(jnp.asarray(x).astype(jnp.float32)), jnp.int32)


def bits_to_float(bits: jax.Array) -> jax.Array:
    """Inverse of :func:`magnitude_bits` for selected values; ``NO_THRESHOLD`` maps to +inf."""
    bits = jnp.asarray(bits, jnp.int32)
    return jnp.where(bits == NO_THRESHOLD, jnp.inf, lax.bitcast_convert_type(bits, jnp.float32))


def coarse_histogram(bits: jax.Array) -> jax.Array:
    """int32[2^16] counts of ``bits >> 15`` (pass 1 of the selection)."""
    return jnp.zeros(N_COARSE, jnp.int32).at[jnp.ravel(bits) >> _FINE_BITS].add(1, mode="drop")


def _count_leq(cumulative, values):
    """For each v in ``values``: #{j : cumulative[j] ≤ v} (cumulative is non-decreasing)."""
    if isinstance(cumulative, np.ndarray):
        return np.searchsorted(cumulative, values, side="right")
    return jnp.searchsorted(cumulative, values, side="right", method="compare_all").astype(jnp.int32)


def _on_host(hist) -> bool:
    """Histograms summed on the host (NumPy int64 counts) are resolved in NumPy int64, so a
    selection may cover more than 2^31 − 1 elements (device histograms count in int32)."""
    return isinstance(hist, np.ndarray)


def locate_coarse(hist1, ranks):
    """Coarse bin of each rank, elements below that bin, and for each rank the first rank
    sharing its bin (so the fine pass builds one histogram row per distinct bin).

    ``hist1`` is a device int32 histogram, or a NumPy int64 one accumulated on the host
    (:func:`accumulate_histograms`): then everything is computed in NumPy int64 and ranks
    may exceed 2^31 − 1."""
    xp = np if _on_host(hist1) else jnp
    ranks = xp.asarray(ranks, np.int64 if xp is np else jnp.int32)
    c1 = xp.cumsum(hist1)
    bins = xp.minimum(_count_leq(c1, ranks), N_COARSE - 1)
    below = c1[bins] - hist1[bins]
    same = bins[:, None] == bins[None, :]
    rep = xp.argmax(same, axis=1).astype(xp.int32)  # first index with the same bin
    return (bins.astype(np.int32) if xp is np else bins), below, rep


def fine_histogram(bits: jax.Array, bins: jax.Array) -> jax.Array:
    """int32[K, 2^15]: row i counts the fine parts of the elements whose coarse part is
    ``bins[i]``; an element lands in the first row whose bin matches (pass 2)."""
    k = bins.shape[0]
    bits = jnp.ravel(bits)
    coarse = bits >> _FINE_BITS
    row = jnp.full(bits.shape, k, jnp.int32)
    for i in reversed(range(k)):
        row = jnp.where(coarse == bins[i], i, row)
    index = row * N_FINE + (bits & (N_FINE - 1))
    flat = jnp.zeros(k * N_FINE, jnp.int32).at[index].add(1, mode="drop")
    return flat.reshape(k, N_FINE)


def resolve_fine(hist2, bins, below, rep, ranks):
    """Bits of each rank's order statistic from the fine histogram rows (int32 bits; NumPy
    int64 counts and ranks when ``hist2`` was accumulated on the host)."""
    if _on_host(hist2):
        ranks = np.asarray(ranks, np.int64)
        c2 = np.cumsum(hist2[np.asarray(rep)], axis=1)
        fine = np.array([_count_leq(c, r) for c, r in zip(c2, ranks - below)], np.int64).reshape(ranks.shape)
        return ((np.asarray(bins, np.int64) << _FINE_BITS) | np.minimum(fine, N_FINE - 1)).astype(np.int32)
    ranks = jnp.asarray(ranks, jnp.int32)
    c2 = jnp.cumsum(hist2[rep], axis=1)
    fine = jax.vmap(lambda c, r: _count_leq(c, r[None])[0])(c2, ranks - below)
    return (bins << _FINE_BITS) | jnp.minimum(fine, N_FINE - 1)


def accumulate_histograms(total, histograms):
    """``total + Σ histograms`` in NumPy int64 on the host (``total`` None or a previous
    sum): additive histograms of many arrays or chunks, each counted in int32 on its
    device, summed without the int32 limit of 2^31 − 1 elements per selection."""
    for h in histograms:
        h = np.asarray(h, np.int64)
        total = h if total is None else total + h
    return total


def select_bits(arrays: Sequence[jax.Array], ranks: jax.Array) -> jax.Array:
    """Bits of the k-th smallest element (0-indexed, for each k in ``ranks``) of the
    multiset union of ``arrays`` (int32 bit patterns from :func:`magnitude_bits`).

    Every rank must lie in [0, total size); clip beforehand and mask the result where a
    rank is out of range (as the Breadcrumbs thresholds do).
    """
    arrays = [jnp.ravel(a) for a in arrays]
    ranks = jnp.atleast_1d(jnp.asarray(ranks, jnp.int32))
    total = sum(a.size for a in arrays)
    if total == 0:
        raise ValueError("select_bits: no elements to select from")
    if total > MAX_COUNT:
        raise ValueError(f"select_bits: {total} elements exceed the int32 count limit {MAX_COUNT}")
    if total <= SORT_BELOW:
        return jnp.sort(jnp.concatenate(arrays))[ranks]
    if len(arrays) == 1 and _native.available():  # integer bits: no derivative to define
        return lax.platform_dependent(lax.stop_gradient(arrays[0]), ranks, cpu=_native.select_bits,
                                      default=lambda a, r: _histogram_select(a, ranks=r))
    return _histogram_select(*arrays, ranks=ranks)


def select_diff_bits_multi(pretrained: jax.Array, finetuned: Sequence[jax.Array], ranks: jax.Array) -> jax.Array:
    """int32[T, K]: row t is ``select_bits([magnitude_bits(finetuned[t] − pretrained)], ranks[t])``
    without materializing the differences where the native kernel applies. On the
    CPU backend (float32 leaves) one cache-blocked native pass serves all T tasks and reads
    θ0 once; identical results everywhere."""
    p0 = jnp.asarray(pretrained)
    fts = [jnp.asarray(f) for f in finetuned]
    ranks = jnp.asarray(ranks, jnp.int32)
    if ranks.ndim != 2 or ranks.shape[0] != len(fts):
        raise ValueError(f"select_diff_bits_multi: ranks must have shape ({len(fts)}, K), got {ranks.shape}")
    if any(f.shape != p0.shape for f in fts):
        raise ValueError("select_diff_bits_multi: every fine-tuned array must have the pretrained shape")
    if any(x.dtype not in (jnp.float32, jnp.float64) for x in (p0, *fts)):  # 16-bit: differences in that dtype
        return jnp.stack([select_bits([magnitude_bits(f - p0)], ranks[t]) for t, f in enumerate(fts)])
    return select_diff_bits_leaves([p0], [[f] for f in fts], ranks)


def select_diff_bits_leaves(pretrained: Sequence[jax.Array], finetuned: Sequence[Sequence[jax.Array]],
                            ranks: jax.Array) -> jax.Array:
    """int32[T, K]: row t is ``select_bits([magnitude_bits(f − p) for p, f in zip(pretrained,
    finetuned[t])], ranks[t])`` — the order statistics of |τt| over the union of several
    leaves (TIES's model-wide threshold, SPEC §3), without concatenating them or writing τ.

    ``pretrained`` is θ0's L leaves, ``finetuned[t]`` task t's L leaves (same shapes).
    Differences are taken in :func:`magnitude_bits`'s float32 after an upcast of 16-bit
    leaves. On the CPU backend (leaves of at most 32 bits) one native cache-blocked pass
    serves all T tasks and all leaves, reading θ0 once; elsewhere the additive histograms
    run over the leaves. Identical results everywhere.
    """
    p0 = [jnp.asarray(p) for p in pretrained]
    fts = [[jnp.asarray(f) for f in task] for task in finetuned]
    ranks = jnp.asarray(ranks, jnp.int32)
    if ranks.ndim != 2 or ranks.shape[0] != len(fts):
        raise ValueError(f"select_diff_bits_leaves: ranks must have shape ({len(fts)}, K), got {ranks.shape}")
    if any(len(task) != len(p0) or any(f.shape != p.shape for f, p in zip(task, p0)) for task in fts):
        raise ValueError("select_diff_bits_leaves: every task must have θ0's leaves and shapes")
    total = sum(p.size for p in p0)
    if total == 0:
        raise ValueError("select_diff_bits_leaves: no elements to select from")
    if total > MAX_COUNT:
        raise ValueError(f"select_diff_bits_leaves: {total} elements exceed the int32 count limit {MAX_COUNT}")
    num_leaves, num_tasks = len(p0), len(fts)

    def joined(leaves):
        dt = functools.reduce(jnp.promote_types, [x.dtype for x in leaves], jnp.float32)
        flat = [lax.convert_element_type(lax.reshape(x, (x.size,)), dt) for x in leaves]
        return lax.concatenate(flat, 0) if len(flat) > 1 else flat[0]

    def portable(r, *flat):  # one concatenation per task: T selections to trace, not T·L histograms
        p = joined(flat[:num_leaves])
        return jnp.stack([_select_diff_flat(joined(flat[num_leaves * (t + 1): num_leaves * (t + 2)]), p, r[t])
                          for t in range(num_tasks)])

    # Selection is piecewise constant in the data: zero derivative (as the portable path's
    # integer bits have), so grad through a merge never differentiates the native FFI call.
    flat = [lax.stop_gradient(x) for x in (*p0, *(f for task in fts for f in task))]
    narrow = all(jnp.promote_types(x.dtype, jnp.float32) == jnp.float32 for x in flat)
    if total > SORT_BELOW and narrow and _native.available():
        def native(r, *xs):
            return _native.select_diff_bits_leaves(
                xs[:num_leaves], [xs[num_leaves * (t + 1): num_leaves * (t + 2)] for t in range(num_tasks)], r)

        return lax.platform_dependent(ranks, *flat, cpu=native, default=portable)
    return portable(ranks, *flat)


@jax.jit
def _select_diff_flat(f, p, ranks):
    """select_bits of |f − p| (1-D): traced once for all tasks of :func:`select_diff_bits_leaves`."""
    return select_bits([magnitude_bits(f - p)], ranks)


def _histogram_select(*arrays: jax.Array, ranks: jax.Array) -> jax.Array:
    """The portable path: one coarse and one fine additive histogram pass."""
    hist1 = sum(coarse_histogram(a) for a in arrays)
    bins, below, rep = locate_coarse(hist1, ranks)
    hist2 = sum(fine_histogram(a, bins) for a in arrays)
    return resolve_fine(hist2, bins, below, rep, ranks)


def kth_smallest_magnitude(x: jax.Array, ranks) -> jax.Array:
    """float32 k-th smallest of |x| for each k in ``ranks`` (convenience wrapper)."""
    return bits_to_float(select_bits([magnitude_bits(x)], ranks))
