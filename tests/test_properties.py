"""Property tests (hypothesis) of the invariants SPEC §2–3 promise for every method."""
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import bcjax
import reference as ref
from bcjax import order_stats

# few distinct sizes keep compilation bounded; 2049+ exercises the histogram path
SIZES = st.sampled_from([1, 2, 7, 64, 2049, 3001])
FINITE = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
FRACTIONS = st.sampled_from([0.0, 0.1, 0.5, 0.85, 0.9, 0.99, 0.993, 1.0])
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def arrays(draw, with_ties=True):
    n = draw(SIZES)
    if with_ties and draw(st.booleans()):
        # heavy ties: few distinct magnitudes, both signs, zeros and subnormals
        pool = draw(st.lists(st.sampled_from([0.0, -0.0, 1e-40, -1e-40, 0.5, -0.5, 1.0, 3.0, -3.0, 7e5]),
                             min_size=1, max_size=5))
        idx = draw(hnp.arrays(np.int64, n, elements=st.integers(0, len(pool) - 1)))
        return np.asarray(pool, np.float32)[idx]
    return draw(hnp.arrays(np.float32, n, elements=FINITE))


@st.composite
def beta_gamma(draw):
    a, b = draw(FRACTIONS), draw(FRACTIONS)
    return min(a, b), max(a, b)


@SETTINGS
@given(x=arrays(), k=st.integers(0, 10**6), data=st.data())
def test_select_bits_equals_sorting(x, k, data):
    ks = np.unique(np.array([k % x.size, data.draw(st.integers(0, x.size - 1)), x.size - 1, 0]))
    got = np.asarray(order_stats.kth_smallest_magnitude(jnp.asarray(x), ks))
    np.testing.assert_array_equal(got, np.sort(np.abs(x))[ks])


@SETTINGS
@given(x=arrays(), bg=beta_gamma())
def test_mask_equals_numpy_reference(x, bg):
    m = bcjax.breadcrumbs_mask({"x": x}, *bg)["x"]
    np.testing.assert_array_equal(np.asarray(m), ref.breadcrumbs_mask(x, *bg))


@SETTINGS
@given(x=arrays(), bg=beta_gamma(), seed=st.integers(0, 2**31))
def test_mask_is_permutation_equivariant(x, bg, seed):
    perm = np.random.default_rng(seed).permutation(x.size)
    m = np.asarray(bcjax.breadcrumbs_mask({"x": x}, *bg)["x"])
    mp = np.asarray(bcjax.breadcrumbs_mask({"x": x[perm]}, *bg)["x"])
    np.testing.assert_array_equal(mp, m[perm])


@SETTINGS
@given(n=SIZES, bg=beta_gamma(), seed=st.integers(0, 2**31))
def test_without_ties_kept_count_is_exact(n, bg, seed):
    x = np.random.default_rng(seed).permutation(np.arange(1, n + 1)).astype(np.float32)
    x *= np.where(np.arange(n) % 2 == 0, 1, -1).astype(np.float32)  # signs must not matter
    n_bot, n_top = ref.counts(n, *bg)
    m = np.asarray(bcjax.breadcrumbs_mask({"x": x}, *bg)["x"])
    assert m.sum() == max(n - n_bot - n_top, 0)


def _models(seed, num_tasks, n=64):
    rng = np.random.default_rng(seed)
    pre = {"w": rng.standard_normal((n, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    fts = [jax.tree.map(lambda x: x + rng.standard_normal(x.shape).astype(np.float32), pre) for _ in range(num_tasks)]
    return pre, fts


def _delta(tree, pre):
    return jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), tree, pre)


def _close(a, b, tol=1e-4):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


@SETTINGS
@given(seed=st.integers(0, 10**6), a1=st.floats(-2, 2), a2=st.floats(-2, 2), split=st.integers(1, 3))
def test_task_arithmetic_is_linear_in_alpha_and_task_set(seed, a1, a2, split):
    pre, fts = _models(seed, 4)
    ta = lambda ms, a: _delta(bcjax.merge("task_arithmetic", pre, ms, alpha=a), pre)  # noqa: E731
    _close(ta(fts, a1 + a2), jax.tree.map(np.add, ta(fts, a1), ta(fts, a2)))
    _close(ta(fts, a1), jax.tree.map(np.add, ta(fts[:split], a1), ta(fts[split:], a1)))


@SETTINGS
@given(seed=st.integers(0, 10**6), alpha=st.floats(0.05, 2))
def test_ties_one_task_density_one_equals_task_arithmetic(seed, alpha):
    pre, fts = _models(seed, 1)
    _close(bcjax.merge("ties", pre, fts, density=1.0, alpha=alpha),
           bcjax.merge("task_arithmetic", pre, fts, alpha=alpha), tol=1e-5)


@SETTINGS
@given(seed=st.integers(0, 10**6), t=st.integers(1, 4), h0=st.floats(1e-3, 10), data=st.data())
def test_gradient_matching_with_zero_fishers_is_task_arithmetic(seed, t, h0, data):
    pre, fts = _models(seed, t)
    alphas = data.draw(st.lists(st.floats(0.0, 2.0), min_size=t, max_size=t))
    zeros = [jax.tree.map(np.zeros_like, pre) for _ in range(t)]
    _close(bcjax.merge("gradient_matching", pre, fts, fishers=zeros, alpha=alphas, h0=h0),
           bcjax.merge("task_arithmetic", pre, fts, alpha=alphas), tol=1e-5)


@SETTINGS
@given(seed=st.integers(0, 10**6), t=st.integers(1, 4), scale=st.floats(1e-3, 1e3))
def test_fisher_with_equal_fishers_is_simple_average(seed, t, scale):
    pre, fts = _models(seed, t)
    f = jax.tree.map(lambda x: np.random.default_rng(seed).random(x.shape).astype(np.float32) * scale, pre)
    _close(bcjax.merge("fisher", pre, fts, fishers=[f] * t), bcjax.merge("simple_average", pre, fts), tol=1e-4)


@SETTINGS
@given(seed=st.integers(0, 10**6), keep=st.sampled_from([0.05, 0.3, 0.5, 0.9, 1.0]), method=st.sampled_from(["dare", "random_sparse"]))
def test_random_masks_reproducible_and_keep_fraction(seed, keep, method):
    pre, fts = _models(seed, 1, n=3000)
    a = bcjax.merge(method, pre, fts, keep=keep, alpha=1.0, key=jax.random.key(seed))
    b = bcjax.merge(method, pre, fts, keep=keep, alpha=1.0, key=jax.random.key(seed))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    kept = np.mean(np.asarray(a["w"]) != pre["w"])
    assert abs(kept - keep) < 5 * np.sqrt(keep * (1 - keep) / a["w"].size) + 1e-9
