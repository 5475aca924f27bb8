"""Hyper-parameters (bcjax.hparams, SPEC §2–3): every way a value can arrive gives the same
counts and merge; everything that is not a real number of the right shape, finite and in
range is a bcjax.errors error naming the method and the argument. Counts are checked
against a plain Fraction reference written here, for leaf sizes beyond 2**31 (counts only)."""
import decimal
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import bcjax
from bcjax import errors, grids, hparams, order_stats
from bcjax.config import ConfigError
from bcjax.experiments.settings import parse_methods
from bcjax.masks import breadcrumbs_counts, fraction_count


# ------------------------------------------------------------------ plain reference
def shortest_decimal(x) -> Fraction:
    """The shortest decimal that rounds to float32(x) (SPEC §2), by trying 1, 2, … significant
    digits (the nearest d-digit decimal round-trips if any d-digit decimal does)."""
    x32 = np.float32(x)
    if x32 == 0:
        return Fraction(0)
    for digits in range(1, 12):
        text = f"{float(x32):.{digits - 1}e}"
        if np.float32(float(text)) == x32:
            return Fraction(text)
    raise AssertionError(x)


def ref_counts(n: int, beta, gamma) -> tuple[int, int]:
    """SPEC §2: n_bot = ⌊β·n + 1e-6⌋, n_top = ⌊(1 − γ)·n + 1e-6⌋, in exact rationals."""
    eps = Fraction(1, 10 ** 6)
    b, g = shortest_decimal(beta), shortest_decimal(gamma)
    return math.floor(b * n + eps), math.floor((1 - g) * n + eps)


def as_ints(counts):
    return tuple(int(c) for c in counts)


def concrete_forms(x):
    """The ways a concrete value arrives, all meaning float32(x)."""
    x32 = np.float32(x)
    return {"python float": float(x32), "np.float32": x32, "np.float64": np.float64(x32),
            "jnp 0-d": jnp.float32(x32), "jnp element": jnp.asarray([x32, x32], jnp.float32)[1],
            "np element": np.asarray([x32], np.float64)[0], "0-d np array": np.asarray(x32),
            "decimal": decimal.Decimal(str(float(x32))), "fraction": Fraction(float(x32))}


def counts_all_forms(n, beta, gamma):
    """{form: (n_bot, n_top)} over concrete, jit-traced and vmap-traced forms."""
    out = {}
    bf, gf = concrete_forms(beta), concrete_forms(gamma)
    for k in bf:
        out[k] = as_ints(breadcrumbs_counts(n, bf[k], gf[k]))
    b32, g32 = jnp.float32(beta), jnp.float32(gamma)
    out["jit"] = as_ints(jax.jit(lambda b, g: breadcrumbs_counts(n, b, g))(b32, g32))
    vm = jax.jit(jax.vmap(lambda b, g: breadcrumbs_counts(n, b, g)))(jnp.stack([b32, b32]), jnp.stack([g32, g32]))
    out["vmap"] = as_ints(c[1] for c in vm)
    out["vmap element"] = as_ints(jax.vmap(lambda bg: breadcrumbs_counts(n, bg[0], bg[1]))(
        jnp.stack([b32, g32])[None])[i][0] for i in range(2))
    return out


# ------------------------------------------------------------------ counts: every form, exact
def test_float32_beta_gamma_keep_90_of_1000():
    """The issue's case: np.float32(0.9), np.float32(0.99) on 1,000 entries keep 90 (not 92)."""
    assert as_ints(breadcrumbs_counts(1000, np.float32(0.9), np.float32(0.99))) == (900, 10)
    tau = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    grid = jnp.asarray([[0.9, 0.99]], jnp.float32)
    for beta, gamma in [(np.float32(0.9), np.float32(0.99)), (grid[0, 0], grid[0, 1]), (0.9, 0.99)]:
        assert int(bcjax.breadcrumbs_mask({"w": tau}, beta, gamma)["w"].sum()) == 90


@pytest.mark.parametrize("n", [1000, 3072 * 768, 32000 * 4096, 2 ** 31 - 1])
@pytest.mark.parametrize("beta,gamma", [(0.9, 0.99), (0.85, 0.99), (0.85, 0.993), (0.0, 1.0), (1.0, 1.0),
                                        (0.3, 0.3), (0.007, 0.01)])
def test_counts_agree_across_forms_on_model_sizes(n, beta, gamma):
    expected = ref_counts(n, beta, gamma)
    for form, got in counts_all_forms(n, beta, gamma).items():
        assert got == expected, form


@pytest.mark.parametrize("n", [2 ** 31, 2 ** 31 + 7, 10 ** 10 + 3, 2 ** 40 + 1])
def test_counts_beyond_int32_are_exact(n):
    """Counts only (no leaf is allocated): concrete values give Python ints for any n; traced
    ones need int64 (jax_enable_x64) and otherwise raise clearly instead of overflowing."""
    expected = ref_counts(n, 0.9, 0.99)
    assert as_ints(breadcrumbs_counts(n, np.float32(0.9), jnp.float32(0.99))) == expected
    assert as_ints(breadcrumbs_counts(n, 0.9, 0.99)) == expected
    with pytest.raises(errors.HyperparameterError, match="x64"):
        jax.jit(lambda b, g: breadcrumbs_counts(n, b, g))(jnp.float32(0.9), jnp.float32(0.99))
    with jax.enable_x64(True):
        traced = jax.jit(lambda b, g: breadcrumbs_counts(n, b, g))(jnp.float32(0.9), jnp.float32(0.99))
        assert as_ints(traced) == expected and traced[0].dtype == jnp.int64


def test_traced_counts_no_longer_differ_from_eager_on_big_leaves():
    """3072×768 and 32000×4096 leaves at (0.9, 0.99): traced == eager == exact (the issue saw
    1 fewer and 4–6 more)."""
    for n in (3072 * 768, 32000 * 4096):
        eager = as_ints(breadcrumbs_counts(n, 0.9, 0.99))
        traced = as_ints(jax.jit(lambda b, g: breadcrumbs_counts(n, b, g))(0.9, 0.99))
        assert eager == traced == ref_counts(n, 0.9, 0.99) == (n * 9 // 10, n // 100)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.floats(0, 1), g=st.floats(0, 1),
       n=st.one_of(st.integers(1, 5000), st.integers(1, 2 ** 31 - 1), st.sampled_from([768 * 3072, 32000 * 4096])))
def test_property_counts_agree_across_forms(b, g, n):
    beta, gamma = min(b, g), max(b, g)
    expected = ref_counts(n, beta, gamma)
    for form, got in counts_all_forms(n, beta, gamma).items():
        assert got == expected, (form, beta, gamma, n)


@settings(max_examples=25, deadline=None)
@given(b=st.floats(0, 1), g=st.floats(0, 1), n=st.integers(2 ** 31, 2 ** 33))
def test_property_counts_beyond_int32_agree_concrete_and_traced_x64(b, g, n):
    beta, gamma = min(b, g), max(b, g)
    expected = ref_counts(n, beta, gamma)
    assert as_ints(breadcrumbs_counts(n, beta, gamma)) == expected
    assert as_ints(breadcrumbs_counts(n, np.float32(beta), jnp.float32(gamma))) == expected
    with jax.enable_x64(True):
        fn = jax.jit(jax.vmap(lambda x, y: breadcrumbs_counts(n, x, y)))
        got = fn(jnp.asarray([beta, 0.5], jnp.float32), jnp.asarray([gamma, 1.0], jnp.float32))
        assert (int(got[0][0]), int(got[1][0])) == expected


@settings(max_examples=60, deadline=None)
@given(x=st.floats(0, 1, width=32), n=st.integers(1, 2 ** 45))
def test_property_fraction_count_matches_fraction_reference(x, n):
    expected = math.floor(shortest_decimal(x) * n + Fraction(1, 10 ** 6))
    assert fraction_count(np.float32(x), n) == fraction_count(float(x), n) == expected
    assert hparams.decimal_value(np.float32(x)) == shortest_decimal(x)


@pytest.mark.parametrize("value,meaning", [
    (np.float16(0.9), shortest_decimal(np.float16(0.9))),  # its own value, 0.89990234
    (np.int64(0), Fraction(0)), (np.int64(1), Fraction(1)), (1, Fraction(1)), (0, Fraction(0)),
    (-0.0, Fraction(0)), (np.float32(-0.0), Fraction(0)), (decimal.Decimal("0.9"), Fraction(9, 10)),
    (Fraction(9, 10), Fraction(9, 10)), (jnp.int32(1), Fraction(1)), (jnp.bfloat16(0.5), Fraction(1, 2)),
    (np.float64(0.9), Fraction(9, 10)), (0.900000001, Fraction(9, 10))])  # rounds to float32(0.9)
def test_other_real_forms_mean_their_float32_decimal(value, meaning):
    """A NumPy float16, integers 0/1 (Python, NumPy, JAX), negative zero, Decimal and
    Fraction are real numbers: accepted, meaning the shortest decimal of their float32."""
    assert hparams.decimal_value(value) == meaning
    n = 12345
    assert fraction_count(value, n) == math.floor(meaning * n + Fraction(1, 10 ** 6))


def test_beta_equal_gamma_and_extremes():
    tau = {"w": np.random.default_rng(1).standard_normal((40, 30)).astype(np.float32)}
    assert int(bcjax.breadcrumbs_mask(tau, 0.3, 0.3)["w"].sum()) == 0  # β = γ keeps nothing
    assert int(bcjax.breadcrumbs_mask(tau, 1, 1)["w"].sum()) == 0  # β = 1 keeps nothing
    assert int(bcjax.breadcrumbs_mask(tau, np.int64(0), np.int64(1))["w"].sum()) == 1200  # no mask
    assert int(bcjax.breadcrumbs_mask(tau, -0.0, 1.0)["w"].sum()) == 1200  # negative zero is 0


# ------------------------------------------------------------------ merges: same result whatever the form
def models(shape=(40, 25), num_tasks=2, seed=0):
    rng = np.random.default_rng(seed)
    pre = {"w": rng.standard_normal(shape).astype(np.float32), "b": rng.standard_normal(shape[-1:]).astype(np.float32)}
    fts = [jax.tree.map(lambda x: x + rng.standard_normal(x.shape).astype(np.float32), pre) for _ in range(num_tasks)]
    return pre, fts


def test_breadcrumbs_merge_identical_for_every_form():
    pre, fts = models()
    want = bcjax.merge("breadcrumbs", pre, fts, alpha=0.5, beta=0.9, gamma=0.99)
    bf, gf, af = concrete_forms(0.9), concrete_forms(0.99), concrete_forms(0.5)
    for k in bf:
        got = bcjax.merge("breadcrumbs", pre, fts, alpha=af[k], beta=bf[k], gamma=gf[k])
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(x, y, err_msg=k)


def test_vmapped_grid_reproduces_point_merges_bit_for_bit():
    pre, fts = models((1000,))
    betas = jnp.asarray([0.9, 0.85, 0.5, 0.0], jnp.float32)
    gammas = jnp.asarray([0.99, 0.993, 0.9, 1.0], jnp.float32)
    alphas = jnp.asarray([0.3, 0.5, 1.0, 0.7], jnp.float32)
    grid = jax.jit(jax.vmap(lambda a, b, g: bcjax.merge("breadcrumbs", pre, fts, alpha=a, beta=b, gamma=g)))(
        alphas, betas, gammas)
    for i, (a, b, g) in enumerate([(0.3, 0.9, 0.99), (0.5, 0.85, 0.993), (1.0, 0.5, 0.9), (0.7, 0.0, 1.0)]):
        point = bcjax.merge("breadcrumbs", pre, fts, alpha=a, beta=b, gamma=g)
        for x, y in zip(jax.tree.leaves(grid), jax.tree.leaves(point)):
            np.testing.assert_array_equal(x[i], y)
    # the grid module with float32 axes equals the point merges with Python floats
    stacked, points = grids.breadcrumbs_grid_merge(pre, fts, [np.float32(0.3)], [np.float32(0.9)],
                                                   [np.float32(0.99)])
    assert points == [(0.3, 0.9, 0.99)]
    point = bcjax.merge("breadcrumbs", pre, fts, alpha=0.3, beta=0.9, gamma=0.99)
    for x, y in zip(jax.tree.leaves(stacked), jax.tree.leaves(point)):
        np.testing.assert_array_equal(x[0], y)


def test_vmapped_grid_on_a_clip_mlp_leaf_keeps_exactly_the_spec_count():
    """The issue's CLIP ViT-B MLP leaf (3072×768) at (0.9, 0.99): traced under jit(vmap) the
    merge keeps exactly n − ⌊0.01n⌋ − ⌊0.9n⌋ entries, like the point merge (it kept 1 fewer)."""
    rng = np.random.default_rng(0)
    pre = {"w": np.zeros((3072, 768), np.float32)}
    fts = [{"w": rng.standard_normal((3072, 768)).astype(np.float32)}]
    grid = jax.jit(jax.vmap(lambda b, g: bcjax.merge("breadcrumbs", pre, fts, alpha=1.0, beta=b, gamma=g)))(
        jnp.asarray([0.9, 0.85], jnp.float32), jnp.asarray([0.99, 0.99], jnp.float32))
    point = bcjax.merge("breadcrumbs", pre, fts, alpha=1.0, beta=0.9, gamma=0.99)
    n = 3072 * 768
    assert int((np.asarray(grid["w"][0]) != 0).sum()) == n - n // 100 - n * 9 // 10
    np.testing.assert_array_equal(grid["w"][0], point["w"])


# ------------------------------------------------------------------ rejected inputs
BAD_TYPES = ["0.9", "9e-1", b"0.9", None, True, np.bool_(False), 0.9 + 0j, np.complex64(0.5), [0.9], {"b": 0.9},
             jnp.asarray(True), np.asarray(0.5 + 1j)]


@pytest.mark.parametrize("bad", BAD_TYPES, ids=repr)
def test_beta_gamma_wrong_types_are_type_errors(bad):
    pre, fts = models()
    for kw in ({"beta": bad, "gamma": 0.99}, {"beta": 0.5, "gamma": bad}):
        name = next(k for k, v in kw.items() if v is bad)
        with pytest.raises(errors.HyperparameterError, match=rf"breadcrumbs.*{name}") as e:
            bcjax.merge("breadcrumbs", pre, fts, **kw)
        assert isinstance(e.value, (TypeError, errors.HyperparameterError))
        with pytest.raises(errors.HyperparameterError, match=rf"breadcrumbs_mask.*{name}"):
            bcjax.breadcrumbs_mask(bcjax.task_vector(fts[0], pre), kw["beta"], kw["gamma"])


@pytest.mark.parametrize("bad", ["0.9", None, True, 1j], ids=repr)
def test_type_errors_are_typeerrors(bad):
    with pytest.raises(TypeError, match="beta"):
        bcjax.breadcrumbs_mask({"w": np.ones(4, np.float32)}, bad, 0.99)


@pytest.mark.parametrize("bad", [np.asarray([0.9, 0.8, 0.7]), jnp.asarray([0.9]), np.ones((1, 1)) * 0.5])
def test_array_valued_beta_is_a_clear_error(bad):
    pre, fts = models()
    with pytest.raises(errors.HyperparameterError, match=r"breadcrumbs: beta must be a scalar.*shape"):
        bcjax.merge("breadcrumbs", pre, fts, beta=bad, gamma=0.99)


@pytest.mark.parametrize("beta,gamma", [(np.nan, 0.9), (0.5, np.inf), (-np.inf, 0.5), (1e39, 1e39), (0.5, -0.1),
                                        (np.float32(0.95), "0.9"), (0.6, np.float16(0.5)), (1.5, 2)])
def test_non_finite_and_out_of_range(beta, gamma):
    pre, fts = models()
    with pytest.raises(errors.HyperparameterError, match="beta|gamma"):
        bcjax.merge("breadcrumbs", pre, fts, beta=beta, gamma=gamma)


def test_string_beta_gamma_never_merge():
    """The issue: beta="0.95", gamma="0.9" merged although β > γ."""
    pre, fts = models()
    with pytest.raises(TypeError):
        bcjax.merge("breadcrumbs", pre, fts, beta="0.95", gamma="0.9")


def test_traced_wrong_dtype_or_shape_is_refused():
    pre, fts = models()
    with pytest.raises(errors.HyperparameterError, match="beta must be a scalar"):
        jax.jit(lambda b: bcjax.merge("breadcrumbs", pre, fts, beta=b, gamma=0.99))(jnp.asarray([0.5, 0.6]))
    with pytest.raises(TypeError, match="beta"):
        jax.jit(lambda b: bcjax.merge("breadcrumbs", pre, fts, beta=b, gamma=0.99))(jnp.asarray(True))


@pytest.mark.parametrize("method,hp,name", [
    ("dare", {"keep": "0"}, "keep"), ("random_sparse", {"keep": None}, "keep"), ("dare", {"keep": np.nan}, "keep"),
    ("ties", {"density": "5"}, "density"), ("ties", {"density": 5}, "density"), ("ties", {"density": True}, "density"),
    ("task_arithmetic", {"alpha": "0.3"}, "alpha"), ("task_arithmetic", {"alpha": None}, "alpha"),
    ("task_arithmetic", {"alpha": np.inf}, "alpha"), ("task_arithmetic", {"alpha": [1.0, np.nan]}, r"alpha\[1\]"),
    ("task_arithmetic", {"alpha": [1.0, "2"]}, r"alpha\[1\]"), ("breadcrumbs", {"alpha": 1e39}, "alpha"),
    ("weighted_average", {"weights": [1.0, np.nan]}, "weights"), ("weighted_average", {"weights": [-1, 2]}, "weights"),
    ("breadcrumbs", {"granularity": "rows"}, "granularity"), ("breadcrumbs", {"granularity": None}, "granularity")])
def test_scalar_hparams_of_every_method(method, hp, name):
    pre, fts = models()
    extra = {"key": jax.random.key(0)} if method in ("dare", "random_sparse") else {}
    with pytest.raises(errors.HyperparameterError, match=rf"{method}: {name}"):
        bcjax.merge(method, pre, fts, **extra, **hp)


@pytest.mark.parametrize("key", [0, 7, np.int64(0), 0.0, "0", jnp.asarray([1, 2, 3], jnp.uint32),
                                 jax.random.split(jax.random.key(0), 2)], ids=repr)
def test_dare_key_must_be_a_prng_key(key):
    """Decision: an integer is not a key (``key=0`` is an error, not a seed); configs give
    ``seed`` and the runner makes ``jax.random.key(seed)``."""
    pre, fts = models()
    with pytest.raises(errors.HyperparameterError, match=r"dare: key.*jax\.random\.key|dare: key must be a single"):
        bcjax.merge("dare", pre, fts, keep=0.5, key=key)


def test_dare_accepts_typed_and_legacy_keys():
    pre, fts = models()
    a = bcjax.merge("dare", pre, fts, keep=0.5, key=jax.random.key(3))
    b = bcjax.merge("dare", pre, fts, keep=np.float32(0.5), key=jax.random.PRNGKey(3))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def ties_reference(pre, fts, density, lambdas):
    """Plain NumPy TIES with one λt per task: θ0 + Σt λt e_t / #{t : e_t ≠ 0} per entry."""
    taus = [{k: f[k] - pre[k] for k in pre} for f in fts]
    out = {}
    flat = [np.concatenate([np.abs(t[k]).ravel() for k in sorted(pre)]) for t in taus]
    n = flat[0].size
    keep = max(1, math.floor(Fraction(str(density)) * n + Fraction(1, 10 ** 6)))
    thr = [np.sort(f)[n - keep] for f in flat]
    for k in pre:
        trimmed = [np.where(np.abs(t[k]) >= th, t[k], 0) for t, th in zip(taus, thr)]
        sign = np.where(sum(trimmed) >= 0, 1.0, -1.0)
        elected = [np.where((np.sign(tr) == sign) & (tr != 0), tr, 0) for tr in trimmed]
        cnt = sum((e != 0).astype(np.float32) for e in elected)
        num = sum(lam * e for lam, e in zip(lambdas, elected))
        out[k] = pre[k] + np.where(cnt > 0, num / np.maximum(cnt, 1), 0)
    return out


def test_ties_alpha_per_task():
    pre, fts = models((6, 3), num_tasks=3)
    with pytest.raises(errors.HyperparameterError, match="ties: alpha.*one value per task"):
        bcjax.merge("ties", pre, fts, alpha=[0.5, 1.0])
    with pytest.raises(errors.HyperparameterError, match="ties: alpha.*one value per task"):
        bcjax.merge("ties", pre, fts, alpha=[0.5, 1.0, 2.0, 3.0])
    lambdas = [0.5, 1.0, 2.0]  # T = 3 = the leaf's last axis: must not broadcast along it
    out = bcjax.merge("ties", pre, fts, density=0.5, alpha=lambdas)
    want = ties_reference(pre, fts, 0.5, lambdas)
    for k in pre:
        np.testing.assert_allclose(out[k], want[k], rtol=1e-5, atol=1e-6)
    # layout independence: transposing every leaf transposes the result
    tr = lambda t: {k: v.T for k, v in t.items()}  # noqa: E731
    out_t = bcjax.merge("ties", tr(pre), [tr(f) for f in fts], density=0.5, alpha=lambdas)
    np.testing.assert_allclose(out_t["w"].T, out["w"], rtol=1e-6, atol=1e-6)
    # equal λ per task = the scalar λ
    same = bcjax.merge("ties", pre, fts, density=0.5, alpha=[0.7] * 3)
    scalar = bcjax.merge("ties", pre, fts, density=0.5, alpha=0.7)
    for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(scalar)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("axis", [5, 2, -3, -100])
def test_row_axis_out_of_range_names_key_path(axis):
    pre, fts = models()  # "w" is 2-D
    with pytest.raises(errors.HyperparameterError, match=rf"axis.*{axis}.*key path 'w'"):
        bcjax.merge("breadcrumbs", {"w": pre["w"]}, [{"w": f["w"]} for f in fts], granularity="row", axis=axis)
    with pytest.raises(errors.HyperparameterError, match=r"axis.*key path 'w'"):
        bcjax.breadcrumbs_mask({"w": pre["w"]}, 0.5, 0.9, granularity="row", axis=axis)


@pytest.mark.parametrize("axis", [True, 1.0, "0", None])
def test_row_axis_wrong_type(axis):
    pre, fts = models()
    with pytest.raises(errors.HyperparameterError, match="axis"):
        bcjax.merge("breadcrumbs", pre, fts, granularity="row", axis=axis)


def test_row_axis_negative_in_range_still_works():
    pre, fts = models()
    a = bcjax.merge("breadcrumbs", pre, fts, granularity="row", axis=-1)
    b = bcjax.merge("breadcrumbs", pre, fts, granularity="row", axis=lambda p, s: len(s) - 1)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def fishers(pre, t=2):
    return [jax.tree.map(lambda x: np.full(x.shape, 1.0 + i, np.float32), pre) for i in range(t)]


@pytest.mark.parametrize("hp,name", [({"weights": [1.0, np.nan]}, "weights"), ({"weights": [np.inf, 1.0]}, "weights"),
                                     ({"weights": np.nan}, "weights"), ({"weights": [-1.0, 1.0]}, "weights"),
                                     ({"weights": [1.0, 1.0, 1.0]}, "weights"), ({"eps": np.inf}, "eps"),
                                     ({"eps": np.nan}, "eps"), ({"eps": -1e-6}, "eps"), ({"eps": "1e-6"}, "eps")])
def test_fisher_hparams(hp, name):
    pre, fts = models()
    with pytest.raises(errors.HyperparameterError, match=rf"fisher: {name}"):
        bcjax.merge("fisher", pre, fts, fishers=fishers(pre), **hp)


def test_fisher_eps_zero_is_allowed():
    """SPEC §3 reproduces FusionBench with eps = 0, so eps ∈ [0, ∞)."""
    pre, fts = models()
    out = bcjax.merge("fisher", pre, fts, fishers=fishers(pre), eps=0)
    np.testing.assert_allclose(out["w"], (fts[0]["w"] + 2 * fts[1]["w"]) / 3, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes", [[np.inf, 1.0], [np.nan, 1.0], [-5, 10], "10", [10, None]], ids=repr)
def test_gradient_matching_dataset_sizes(sizes):
    pre, fts = models()
    with pytest.raises(errors.HyperparameterError, match="gradient_matching: dataset_sizes"):
        bcjax.merge("gradient_matching", pre, fts, fishers=fishers(pre), dataset_sizes=sizes)


def test_gradient_matching_h0():
    pre, fts = models()
    neg = jax.tree.map(lambda x: np.ones_like(x), pre)
    neg["b"] = -neg["b"]
    with pytest.raises(errors.HyperparameterError, match=r"h0.*key path 'b'.*negative"):
        bcjax.merge("gradient_matching", pre, fts, fishers=fishers(pre), h0=neg)
    for bad in (None, "1.0", -1.0, np.nan, True):
        with pytest.raises(errors.HyperparameterError, match="gradient_matching: h0"):
            bcjax.merge("gradient_matching", pre, fts, fishers=fishers(pre), h0=bad)
    tree = jax.tree.map(lambda x: np.full(x.shape, 2.0, np.float32), pre)
    a = bcjax.merge("gradient_matching", pre, fts, fishers=fishers(pre), h0=tree)
    b = bcjax.merge("gradient_matching", pre, fts, fishers=fishers(pre), h0=np.float32(2.0))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6)


def test_converters_and_grids_use_the_same_checks():
    with pytest.raises(errors.HyperparameterError, match="mergekit"):
        bcjax.breadcrumbs_from_mergekit(0.5, 0.6)
    with pytest.raises(errors.HyperparameterError, match=r"grid: betas\[1\]"):
        grids.beta_gamma_pairs([0.5, "0.9"], [0.99])
    with pytest.raises(errors.HyperparameterError, match=r"grid: gammas\[0\]"):
        grids.beta_gamma_pairs([0.5], [np.nan])
    with pytest.raises(errors.HyperparameterError, match=r"grid: alphas\[0\]"):
        grids.grid_points([None], [(0.5, 0.9)])
    assert grids.beta_gamma_pairs(jnp.asarray([0.9, 0.85], jnp.float32), [np.float32(0.99)]) == \
        [(0.9, 0.99), (0.85, 0.99)]


# ------------------------------------------------------------------ config layer
@pytest.mark.parametrize("entry,where", [
    ({"name": "breadcrumbs", "beta": "9e-1"}, r"methods\[0\]\.beta"),
    ({"name": "breadcrumbs", "beta": 0.95, "gamma": 0.9}, r"methods\[0\].*beta <= gamma"),
    ({"name": "breadcrumbs", "grid": {"beta": [0.5, 0.995]}}, r"methods\[0\].*beta <= gamma"),
    ({"name": "breadcrumbs", "grid": {"alpha": [0.3, ".nan"]}}, r"methods\[0\]\.grid\.alpha\[1\]"),
    ({"name": "dare", "keep": 0, "seed": 0}, r"methods\[0\]\.keep"),
    ({"name": "dare", "keep": 0.1, "seed": "0"}, r"methods\[0\]\.seed"),
    ({"name": "ties", "density": None}, r"methods\[0\]\.density"),
    ({"name": "fisher", "eps": float("inf")}, r"methods\[0\]\.eps")])
def test_config_hparams_checked_before_any_work(entry, where):
    config = {"_source": "configs/x.yaml", "methods": [entry]}
    with pytest.raises(ConfigError, match=rf"configs/x\.yaml: {where}"):
        parse_methods(config)


def test_clip_eval_merges_checked_before_setup():
    from bcjax.pipelines.clip import _check_merge_entries

    config = {"_source": "configs/clip.yaml", "eval": {"merges": [{"method": "breadcrumbs", "beta": 0.9},
                                                                  {"method": "breadcrumbs", "gamma": "9.9e-1"}]}}
    with pytest.raises(ConfigError, match=r"configs/clip\.yaml: eval\.merges\[1\]\.gamma"):
        _check_merge_entries(config)
    with pytest.raises(ConfigError, match=r"eval\.merges\[0\].*unknown merge method"):
        _check_merge_entries({"eval": {"merges": [{"method": "breadcrumb"}]}})
    _check_merge_entries({"eval": {"merges": [{"method": "dare", "keep": 0.1, "seed": 3, "label": "x"}]}})


def test_config_valid_entries_parse():
    config = {"methods": [{"name": "breadcrumbs", "beta": 0.9, "gamma": 0.99, "grid": {"alpha": [0.3, 0.5]}},
                          {"name": "dare", "keep": 0.1, "seed": 0}, {"name": "weighted_average", "weights": None}]}
    assert [m.name for m in parse_methods(config)] == ["breadcrumbs", "dare", "weighted_average"]


# ------------------------------------------------------------------ grad through the native selection
def test_grad_through_breadcrumbs_on_native_path_equals_portable_rule():
    """d merge / d θt = α · mt (the mask is piecewise constant: zero derivative through the
    selection), on a leaf large enough for the native CPU kernel (> 2048 entries)."""
    pre, fts = models((64, 50))
    alpha = 0.7

    def loss(ft0):
        out = bcjax.merge("breadcrumbs", pre, [ft0, fts[1]], alpha=alpha, beta=0.8, gamma=0.99)
        return jnp.sum(out["w"] ** 2) + jnp.sum(out["b"] ** 2)

    ft0 = jax.tree.map(jnp.asarray, fts[0])
    grad = jax.grad(loss)(ft0)
    out = bcjax.merge("breadcrumbs", pre, fts, alpha=alpha, beta=0.8, gamma=0.99)
    mask = bcjax.breadcrumbs_mask(bcjax.task_vector(fts[0], pre), 0.8, 0.99)
    for k in ("w", "b"):
        np.testing.assert_allclose(grad[k], 2 * np.asarray(out[k]) * alpha * np.asarray(mask[k]), rtol=1e-5, atol=1e-6)


def test_grad_native_selection_equals_portable_selection():
    """The native FFI selection and the portable histogram selection have the same (zero)
    derivative rule, so grads of a function thresholding at the selected order statistic agree."""
    rng = np.random.default_rng(3)
    p = jnp.asarray(rng.standard_normal(4096), jnp.float32)
    f0 = jnp.asarray(rng.standard_normal(4096), jnp.float32)
    ranks = jnp.asarray([[3000]], jnp.int32)

    def loss(f, select):
        thr = select(f)
        return jnp.sum(jnp.where(order_stats.magnitude_bits(f - p) >= thr, f ** 2, 0.0))

    native = jax.grad(loss)(f0, lambda f: order_stats.select_diff_bits_multi(p, [f], ranks)[0, 0])
    portable = jax.grad(loss)(f0, lambda f: order_stats._histogram_select(
        order_stats.magnitude_bits(f - p), ranks=ranks[0])[0])
    np.testing.assert_array_equal(native, portable)
    assert int((native != 0).sum()) == 4096 - 3000
