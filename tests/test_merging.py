"""Differential tests of every merge method against the numpy reference (tests/reference.py),
SPEC §1–2 edge cases, bad input, the registry, converters, and jit/vmap compatibility."""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bcjax
import reference as ref
from bcjax import errors
from bcjax.masks import breadcrumbs_counts, fraction_count


def make_models(num_tasks=3, seed=0, shapes=None, dtype=np.float32):
    rng = np.random.default_rng(seed)
    shapes = shapes or {"dense/kernel": (48, 40), "dense/bias": (40,), "ln/scale": (7,), "scalar": ()}
    pre = {"params": {k.replace("/", "_"): rng.standard_normal(s).astype(dtype) for k, s in shapes.items()},
           "step": np.int32(7), "flag": np.bool_(True)}
    fts = []
    for t in range(num_tasks):
        ft = jax.tree.map(lambda x: x, pre)
        ft["params"] = {k: (v.astype(np.float32) + rng.standard_normal(np.shape(v)).astype(np.float32)
                            * (1 + t)).astype(dtype) for k, v in pre["params"].items()}
        ft["step"] = np.int32(100 + t)
        ft["flag"] = np.bool_(False)
        fts.append(ft)
    return pre, fts


def leaves(tree):
    return jax.tree.leaves(tree["params"])


def assert_non_float_copied(out, pre):
    assert int(out["step"]) == 7 and bool(out["flag"]) is True


# ------------------------------------------------------------------ differential tests
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_task_arithmetic_matches_reference(alpha):
    pre, fts = make_models()
    out = bcjax.merge("task_arithmetic", pre, fts, alpha=alpha)
    for o, p, *f in zip(leaves(out), leaves(pre), *map(leaves, fts)):
        np.testing.assert_allclose(o, ref.task_arithmetic(p, f, alpha), rtol=1e-5, atol=1e-5)
    assert_non_float_copied(out, pre)


@pytest.mark.parametrize("beta,gamma", [(0.9, 0.99), (0.85, 0.99), (0.5, 0.9), (0.0, 1.0), (0.3, 0.3), (0.0, 0.95), (0.8, 1.0)])
def test_breadcrumbs_matches_reference(beta, gamma):
    pre, fts = make_models()
    out = bcjax.merge("breadcrumbs", pre, fts, alpha=0.5, beta=beta, gamma=gamma)
    for o, p, *f in zip(leaves(out), leaves(pre), *map(leaves, fts)):
        np.testing.assert_allclose(o, ref.breadcrumbs(p, f, 0.5, beta, gamma), rtol=1e-5, atol=1e-5)
    assert_non_float_copied(out, pre)


def test_breadcrumbs_mask_matches_reference_on_large_leaf_with_ties():
    # large enough for the histogram path (not the small-input sort), with many ties
    rng = np.random.default_rng(1)
    tau = {"w": np.round(rng.standard_normal((300, 70)) * 4).astype(np.float32) / 4,
           "v": rng.standard_normal(5000).astype(np.float32) * 1e-3}
    for beta, gamma in [(0.9, 0.99), (0.5, 0.7), (0.0, 0.5), (0.99, 1.0)]:
        mask = bcjax.breadcrumbs_mask(tau, beta, gamma)
        for k in tau:
            np.testing.assert_array_equal(np.asarray(mask[k]), ref.breadcrumbs_mask(tau[k], beta, gamma))


def test_simple_average_matches_reference():
    pre, fts = make_models()
    out = bcjax.merge("simple_average", pre, fts)
    for o, *f in zip(leaves(out), *map(leaves, fts)):
        np.testing.assert_allclose(o, ref.simple_average(f), rtol=1e-6, atol=1e-6)
    assert_non_float_copied(out, pre)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0, 1e-4])
def test_ties_matches_reference(density):
    pre, fts = make_models(num_tasks=4)
    out = bcjax.merge("ties", pre, fts, density=density, alpha=0.7)
    expect = ref.ties(leaves(pre), [leaves(f) for f in fts], density, 0.7)
    for o, e in zip(leaves(out), expect):
        np.testing.assert_allclose(o, e, rtol=1e-5, atol=1e-5)


def test_ties_global_threshold_over_large_leaves():
    # > SORT_BELOW elements in total: exercises the additive-histogram path across leaves
    pre, fts = make_models(num_tasks=3, shapes={"a": (200, 30), "b": (900,), "c": (3,)})
    out = bcjax.merge("ties", pre, fts, density=0.1, alpha=1.0)
    expect = ref.ties(leaves(pre), [leaves(f) for f in fts], 0.1, 1.0)
    for o, e in zip(leaves(out), expect):
        np.testing.assert_allclose(o, e, rtol=1e-5, atol=1e-5)


def fisher_trees(pre, num, seed=5, zero=False):
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda x: np.zeros(np.shape(x), np.float32) if zero else
                         rng.random(np.shape(x)).astype(np.float32) ** 3, pre) for _ in range(num)]


def test_fisher_matches_reference():
    pre, fts = make_models()
    fs = fisher_trees(pre, 3)
    w = [0.2, 0.5, 1.3]
    out = bcjax.merge("fisher", pre, fts, fishers=fs, weights=w, eps=1e-6)
    for o, *rest in zip(leaves(out), *map(leaves, fts), *[leaves(f) for f in fs]):
        f, F = rest[:3], rest[3:]
        np.testing.assert_allclose(o, ref.fisher(f, F, w, 1e-6), rtol=1e-5, atol=1e-5)
    assert_non_float_copied(out, pre)


def test_fisher_zero_weights_fall_back_to_plain_mean():
    pre, fts = make_models()
    out = bcjax.merge("fisher", pre, fts, fishers=fisher_trees(pre, 3), weights=[0.0, 0.0, 0.0])
    for o, *f in zip(leaves(out), *map(leaves, fts)):
        np.testing.assert_allclose(o, ref.simple_average(f), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("h0", [1.0, 0.0, "tree"])
def test_gradient_matching_matches_reference(h0):
    pre, fts = make_models()
    hs = fisher_trees(pre, 3)
    h0v = fisher_trees(pre, 1, seed=9)[0] if h0 == "tree" else h0
    alphas = [0.4, 0.7, 1.1]
    out = bcjax.merge("gradient_matching", pre, fts, fishers=hs, alpha=alphas, h0=h0v)
    h0_leaves = leaves(h0v) if h0 == "tree" else [h0] * len(leaves(pre))
    for o, p, hz, *rest in zip(leaves(out), leaves(pre), h0_leaves, *map(leaves, fts), *[leaves(h) for h in hs]):
        f, H = rest[:3], rest[3:]
        np.testing.assert_allclose(o, ref.gradient_matching(p, f, H, alphas, hz), rtol=1e-5, atol=1e-5)


def test_random_sparse_and_dare_match_formula_and_are_reproducible():
    pre, fts = make_models(shapes={"w": (200, 50)})
    key = jax.random.key(3)
    rs = bcjax.merge("random_sparse", pre, fts, keep=0.3, alpha=0.5, key=key)
    dare = bcjax.merge("dare", pre, fts, keep=0.3, alpha=0.5, key=key)
    rs2 = bcjax.merge("random_sparse", pre, fts, keep=0.3, alpha=0.5, key=jax.random.key(3))
    np.testing.assert_array_equal(leaves(rs)[0], leaves(rs2)[0])
    other = bcjax.merge("random_sparse", pre, fts, keep=0.3, alpha=0.5, key=jax.random.key(4))
    assert not np.array_equal(leaves(rs)[0], leaves(other)[0])
    p = np.asarray(leaves(pre)[0], np.float64)
    d_rs = (np.asarray(leaves(rs)[0], np.float64) - p) / 0.5
    d_dare = (np.asarray(leaves(dare)[0], np.float64) - p) / 0.5
    np.testing.assert_allclose(d_dare, d_rs / 0.3, rtol=1e-4, atol=1e-4)  # DARE = rescaled RS, same masks
    # with one task, the kept fraction of entries is ≈ keep (n = 10,000 → std ≈ 0.0046)
    one = bcjax.merge("random_sparse", pre, fts[:1], keep=0.3, alpha=1.0, key=key)
    kept = np.mean(np.asarray(leaves(one)[0]) != np.asarray(leaves(pre)[0]))
    assert abs(kept - 0.3) < 0.03
    # each kept entry is exactly the task vector entry
    tau = np.asarray(leaves(fts[0])[0], np.float64) - p
    diff = np.asarray(leaves(one)[0], np.float64) - p
    sel = diff != 0
    np.testing.assert_allclose(diff[sel], tau[sel], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ SPEC §1–2 edge cases
def test_edge_leaves_scalar_size1_allzero():
    pre = {"s": np.float32(1.5), "one": np.ones((1,), np.float32), "z": np.zeros((4, 5), np.float32),
           "empty": np.zeros((0, 3), np.float32)}
    ft = {"s": np.float32(2.5), "one": np.full((1,), 3.0, np.float32), "z": np.zeros((4, 5), np.float32),
          "empty": np.zeros((0, 3), np.float32)}
    tv = bcjax.task_vector(ft, pre)
    m = bcjax.breadcrumbs_mask(tv, 0.0, 1.0)  # keep everything
    assert bool(m["s"]) and bool(m["one"][0]) and np.asarray(m["z"]).all() and m["empty"].shape == (0, 3)
    m = bcjax.breadcrumbs_mask(tv, 0.9, 0.99)  # n=1: n_bot = 0, n_top = 0 → keep; n=20: n_bot=18, n_top=0
    assert bool(m["s"]) and bool(m["one"][0])
    np.testing.assert_array_equal(np.asarray(m["z"]), ref.breadcrumbs_mask(np.zeros((4, 5)), 0.9, 0.99))
    out = bcjax.merge("breadcrumbs", pre, [ft], alpha=1.0, beta=0.0, gamma=1.0)
    assert float(out["s"]) == 2.5 and float(out["one"][0]) == 3.0 and out["empty"].shape == (0, 3)


def test_beta_equals_gamma_keeps_nothing_except_ties_rule():
    tau = {"w": np.arange(1, 101, dtype=np.float32)}
    m = bcjax.breadcrumbs_mask(tau, 0.4, 0.4)  # n_bot = 40, n_top = 60: lo = a(40) = 41, hi = a(40) → empty
    assert not np.asarray(m["w"]).any()
    np.testing.assert_array_equal(np.asarray(m["w"]), ref.breadcrumbs_mask(tau["w"], 0.4, 0.4))


def test_gamma_n_below_one_masks_no_top_entries():
    tau = {"w": np.arange(1, 51, dtype=np.float32)}  # (1 − 0.99)·50 = 0.5 < 1 → n_top = 0
    m = np.asarray(bcjax.breadcrumbs_mask(tau, 0.9, 0.99)["w"])
    assert m.sum() == 5 and m[-5:].all()  # unlike mergekit, the tensor is not zeroed


def test_kept_count_exact_without_ties():
    rng = np.random.default_rng(0)
    x = rng.permutation(np.arange(1, 30001, dtype=np.float32))
    n_bot, n_top = ref.counts(x.size, 0.9, 0.99)
    m = np.asarray(bcjax.breadcrumbs_mask({"x": x}, 0.9, 0.99)["x"])
    assert m.sum() == x.size - n_bot - n_top
    kept = np.sort(x[m])
    assert kept[0] == n_bot + 1 and kept[-1] == x.size - n_top


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_upcast_and_keep_dtype(dtype):
    pre32, fts32 = make_models(shapes={"w": (64, 48), "b": (48,)})
    cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype) if np.issubdtype(np.asarray(x).dtype, np.floating) else x, t)  # noqa
    pre, fts = cast(pre32), [cast(f) for f in fts32]
    for method, hp in [("breadcrumbs", dict(alpha=0.5, beta=0.8, gamma=0.99)), ("task_arithmetic", dict(alpha=0.5)),
                       ("ties", dict(density=0.3)), ("simple_average", {})]:
        out = bcjax.merge(method, pre, fts, **hp)
        assert all(x.dtype == dtype for x in leaves(out))
    out = bcjax.merge("breadcrumbs", pre, fts, alpha=0.5, beta=0.8, gamma=0.99)
    p = [np.asarray(x, np.float32) for x in leaves(pre)]
    f = [[np.asarray(x, np.float32) for x in leaves(ft)] for ft in fts]
    for j, o in enumerate(leaves(out)):
        expect = ref.breadcrumbs(p[j], [fm[j] for fm in f], 0.5, 0.8, 0.99)
        np.testing.assert_allclose(np.asarray(o, np.float32), expect.astype(dtype).astype(np.float32),
                                   rtol=2e-2, atol=2e-2)
    tv = bcjax.task_vector(fts[0], pre)
    assert leaves(tv)[0].dtype == jnp.float32  # task vectors of 16-bit models keep precision


def test_int_and_bool_leaves_are_copied_and_excluded_leaves_too():
    pre, fts = make_models()
    out = bcjax.merge("task_arithmetic", pre, fts, alpha=1.0, exclude=r"ln_scale$")
    np.testing.assert_array_equal(out["params"]["ln_scale"], pre["params"]["ln_scale"])
    assert not np.array_equal(out["params"]["dense_kernel"], pre["params"]["dense_kernel"])
    assert_non_float_copied(out, pre)
    m = bcjax.breadcrumbs_mask(bcjax.task_vector(fts[0], pre), 0.5, 0.9, exclude=["dense_"])
    assert not np.asarray(m["params"]["dense_kernel"]).any() and np.asarray(m["params"]["ln_scale"]).any()
    assert m["step"].dtype == bool and not bool(m["step"])


def test_flat_dicts_and_jax_arrays_work():
    rng = np.random.default_rng(0)
    pre = {"a/b": jnp.asarray(rng.standard_normal((10, 3)), jnp.float32)}
    ft = {"a/b": pre["a/b"] + 1}
    out = bcjax.merge("task_arithmetic", pre, [ft, ft], alpha=0.5)
    np.testing.assert_allclose(out["a/b"], pre["a/b"] + 1, rtol=1e-6)


def test_task_vector_roundtrip():
    pre, fts = make_models()
    tv = bcjax.task_vector(fts[1], pre)
    back = bcjax.apply_task_vector(pre, tv, 1.0)
    for a, b in zip(leaves(back), leaves(fts[1])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert int(back["step"]) == 7


# ------------------------------------------------------------------ bad input
def test_structure_shape_dtype_mismatch_name_model_and_path():
    pre, fts = make_models()
    bad = jax.tree.map(lambda x: x, fts[1])
    del bad["params"]["ln_scale"]
    with pytest.raises(errors.TreeMismatchError, match=r"fine-tuned model 1.*ln_scale"):
        bcjax.merge("task_arithmetic", pre, [fts[0], bad])
    bad = jax.tree.map(lambda x: x, fts[2])
    bad["params"]["dense_bias"] = np.zeros(41, np.float32)
    with pytest.raises(errors.TreeMismatchError, match=r"fine-tuned model 1.*params/dense_bias.*shape"):
        bcjax.merge("breadcrumbs", pre, [fts[0], bad])
    bad = jax.tree.map(lambda x: x, fts[0])
    bad["params"]["dense_bias"] = bad["params"]["dense_bias"].astype(np.float16)
    with pytest.raises(errors.TreeMismatchError, match=r"fine-tuned model 0.*dense_bias.*dtype"):
        bcjax.merge("ties", pre, [bad])


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_nan_inf_raise_naming_model_and_path(bad_value):
    pre, fts = make_models()
    bad = jax.tree.map(lambda x: np.array(x, copy=True), fts[2])
    bad["params"]["dense_kernel"][3, 4] = bad_value
    with pytest.raises(errors.NonFiniteError, match=r"fine-tuned model 2.*params/dense_kernel"):
        bcjax.merge("breadcrumbs", pre, [fts[0], fts[1], bad])
    pre_bad = jax.tree.map(lambda x: np.array(x, copy=True), pre)
    pre_bad["params"]["scalar"] = np.float32(bad_value)
    with pytest.raises(errors.NonFiniteError, match=r"pretrained model.*params/scalar"):
        bcjax.merge("task_arithmetic", pre_bad, fts)


@pytest.mark.parametrize("beta,gamma", [(-0.1, 0.5), (0.6, 0.5), (0.2, 1.1), (np.nan, 0.9)])
def test_bad_beta_gamma(beta, gamma):
    pre, fts = make_models()
    with pytest.raises(errors.HyperparameterError, match="beta|gamma"):
        bcjax.merge("breadcrumbs", pre, fts, beta=beta, gamma=gamma)
    with pytest.raises(errors.HyperparameterError):
        bcjax.breadcrumbs_mask(bcjax.task_vector(fts[0], pre), beta, gamma)


@pytest.mark.parametrize("method,hp", [("ties", {"density": 0.0}), ("ties", {"density": 1.5}),
                                       ("dare", {"keep": 0.0}), ("random_sparse", {"keep": 2.0})])
def test_bad_fractions(method, hp):
    pre, fts = make_models()
    with pytest.raises(errors.HyperparameterError, match="density|keep"):
        bcjax.merge(method, pre, fts, key=jax.random.key(0), **hp) if method != "ties" else \
            bcjax.merge(method, pre, fts, **hp)


def test_empty_model_list_and_not_a_list():
    pre, _ = make_models()
    with pytest.raises(errors.EmptyModelListError):
        bcjax.merge("task_arithmetic", pre, [])
    with pytest.raises(TypeError, match="sequence"):
        bcjax.merge("task_arithmetic", pre, pre)


def test_fisher_structure_mismatch_and_missing():
    pre, fts = make_models()
    fs = fisher_trees(pre, 3)
    del fs[1]["params"]["dense_bias"]
    with pytest.raises(errors.TreeMismatchError, match=r"Fisher tree 1.*dense_bias"):
        bcjax.merge("fisher", pre, fts, fishers=fs)
    with pytest.raises(errors.TreeMismatchError, match="2 Fisher trees for 3"):
        bcjax.merge("gradient_matching", pre, fts, fishers=fisher_trees(pre, 2))
    with pytest.raises(errors.HyperparameterError, match="fishers"):
        bcjax.merge("fisher", pre, fts)
    neg = fisher_trees(pre, 3)
    neg[0]["params"]["dense_bias"] = -np.ones(40, np.float32)
    with pytest.raises(errors.HyperparameterError, match=r"Fisher tree 0.*dense_bias.*negative"):
        bcjax.merge("fisher", pre, fts, fishers=neg)


def test_unknown_method_and_hparams():
    pre, fts = make_models()
    with pytest.raises(errors.UnknownMethodError, match="breadcrumbs"):
        bcjax.merge("breadcrumb", pre, fts)
    with pytest.raises(errors.HyperparameterError, match="unknown hyper-parameter.*'bta'"):
        bcjax.merge("breadcrumbs", pre, fts, bta=0.9)
    with pytest.raises(errors.HyperparameterError, match="PRNG key"):
        bcjax.merge("dare", pre, fts, keep=0.5)
    with pytest.raises(errors.HyperparameterError, match="one value per task"):
        bcjax.merge("task_arithmetic", pre, fts, alpha=[1.0, 2.0])
    with pytest.raises(ValueError, match="axis"):
        bcjax.merge("breadcrumbs", pre, fts, granularity="row")


# ------------------------------------------------------------------ registry and converters
def test_methods_registry_lists_hparams_and_accepts_new_method():
    ms = bcjax.methods()
    assert {"task_arithmetic", "breadcrumbs", "simple_average", "ties", "random_sparse", "dare", "fisher",
            "gradient_matching"} <= set(ms)
    assert ms["breadcrumbs"].hparams["beta"] == 0.9 and ms["breadcrumbs"].hparams["gamma"] == 0.99
    assert "beta=0.9" in repr(ms["breadcrumbs"])

    @bcjax.register_method("test_scaled_copy")
    def scaled_copy(pretrained, finetuned, flags, *, scale=2.0):
        """Test method: θ0 + scale·τ0."""
        return bcjax.map_merged_leaves(lambda i, p0, fts: p0 + scale * (fts[0] - p0), pretrained, finetuned, flags)

    try:
        pre, fts = make_models()
        out = bcjax.merge("test_scaled_copy", pre, fts, scale=3.0)
        np.testing.assert_allclose(leaves(out)[0], leaves(pre)[0] + 3 * (leaves(fts[0])[0] - leaves(pre)[0]), rtol=1e-5)
        assert bcjax.methods()["test_scaled_copy"].summary.startswith("Test method")
    finally:
        assert bcjax.unregister_method("test_scaled_copy").name == "test_scaled_copy"
    assert "test_scaled_copy" not in bcjax.methods()
    with pytest.raises(errors.UnknownMethodError):
        bcjax.unregister_method("test_scaled_copy")


def test_methods_declare_requirements_and_linearity():
    ms = bcjax.methods()
    assert ms["random_sparse"].requires == ("key",) and ms["dare"].requires == ("key",)
    assert ms["fisher"].requires == ("fishers",)
    assert ms["gradient_matching"].requires == ("fishers", "dataset_sizes")
    assert {n for n, m in ms.items() if m.linear} >= {"task_arithmetic", "breadcrumbs"}
    assert not ms["ties"].linear and not ms["dare"].linear and ms["ties"].requires == ()
    assert "key" not in ms["dare"].tunable and "requires key" in repr(ms["dare"])
    with pytest.raises(ValueError, match="unknown requirement"):
        bcjax.register_method("test_bad_need", requires=("oracle",))(lambda p, f, fl, *, oracle=None: p)
    with pytest.raises(ValueError, match="keyword-only"):
        bcjax.register_method("test_bad_need", requires=("grams",))(lambda p, f, fl, *, alpha=1.0: p)
    assert "test_bad_need" not in bcjax.methods()


def test_converters():
    b, g = bcjax.breadcrumbs_from_mergekit(density=0.09, gamma=0.01)
    assert b == pytest.approx(0.90) and g == pytest.approx(0.99)
    b, g = bcjax.breadcrumbs_from_official(keep=0.09, remove=0.01)
    assert b == pytest.approx(0.90) and g == pytest.approx(0.99)
    with pytest.raises(errors.HyperparameterError, match="mergekit"):
        bcjax.breadcrumbs_from_mergekit(density=0.9, gamma=0.2)


@pytest.mark.parametrize("keep,remove,shape,axis", [(0.09, 0.01, (300, 20), 0), (0.2, 0.1, (7, 50), 1),
                                                     (0.5, 0.0, (3, 4, 30), -1), (0.15, 0.05, (64,), 0)])
def test_row_granularity_reproduces_official_rule(keep, remove, shape, axis):
    rng = np.random.default_rng(0)
    tau = rng.standard_normal(shape).astype(np.float32)
    beta, gamma = bcjax.breadcrumbs_from_official(keep=keep, remove=remove)
    m = bcjax.breadcrumbs_mask({"w": tau}, beta, gamma, granularity="row", axis=axis)["w"]
    np.testing.assert_array_equal(np.asarray(m), ref.row_mask(tau, keep, remove, axis % len(shape)))
    # and through merge
    pre = {"w": np.zeros(shape, np.float32)}
    out = bcjax.merge("breadcrumbs", pre, [{"w": tau}], alpha=1.0, beta=beta, gamma=gamma, granularity="row", axis=axis)
    np.testing.assert_allclose(out["w"], np.where(ref.row_mask(tau, keep, remove, axis % len(shape)), tau, 0))


# ------------------------------------------------------------------ jit / vmap
def test_merge_under_jit_with_traced_hparams_equals_eager():
    pre, fts = make_models()

    @jax.jit
    def f(alpha, beta, gamma):
        return bcjax.merge("breadcrumbs", pre, fts, alpha=alpha, beta=beta, gamma=gamma)

    a = f(jnp.float32(0.4), jnp.float32(0.9), jnp.float32(0.99))
    b = bcjax.merge("breadcrumbs", pre, fts, alpha=0.4, beta=0.9, gamma=0.99)
    for x, y in zip(leaves(a), leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_vmapped_grid_equals_point_by_point():
    pre, fts = make_models(shapes={"w": (64, 50), "b": (50,)})
    betas = jnp.asarray([0.5, 0.8, 0.9, 0.85], jnp.float32)
    gammas = jnp.asarray([0.9, 0.99, 0.99, 0.993], jnp.float32)
    alphas = jnp.asarray([0.3, 0.5, 1.0, 0.7], jnp.float32)
    grid = jax.jit(jax.vmap(lambda a, b, g: bcjax.merge("breadcrumbs", pre, fts, alpha=a, beta=b, gamma=g)))(
        alphas, betas, gammas)
    for i in range(4):
        point = bcjax.merge("breadcrumbs", pre, fts, alpha=float(alphas[i]), beta=float(np.float64(str(betas[i]))),
                            gamma=float(np.float64(str(gammas[i]))))
        for x, y in zip(leaves(grid), leaves(point)):
            np.testing.assert_allclose(x[i], y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n", [10, 100, 768, 1000, 2304, 3072, 50 * 768, 768 * 3072])
@pytest.mark.parametrize("frac", [0.9, 0.85, 0.99, 0.993, 0.01, 0.007, 0.5, 0.3])
def test_traced_counts_equal_float64_counts_on_paper_settings(n, frac):
    static = int(fraction_count(frac, n))
    traced = int(jax.jit(lambda f: fraction_count(f, n))(jnp.float32(frac)))
    assert static == traced == int(np.floor(frac * n + 1e-6))


def test_breadcrumbs_counts_matches_spec():
    assert [int(c) for c in breadcrumbs_counts(1000, 0.9, 0.99)] == [900, 10]
    assert [int(c) for c in breadcrumbs_counts(1000, 0.85, 0.993)] == [850, 7]


def test_merge_signature_is_documented():
    assert "SPEC" in inspect.getdoc(bcjax.merge) or "θ0" in inspect.getdoc(bcjax.merge)


@pytest.mark.parametrize("method", ["task_arithmetic", "simple_average", "breadcrumbs", "ties"])
def test_enable_x64_context_reaches_the_leaf_threads(method):
    """``with jax.enable_x64(True)`` is thread-local; concrete leaves merge on a thread pool, which
    must run under the caller's setting: float64 leaves stay float64 and exact to float64 rounding."""
    rng = np.random.default_rng(0)
    p0 = {"a": rng.normal(size=3000), "b": rng.normal(size=(70, 80))}  # two leaves: the pool runs
    fts = [jax.tree.map(lambda x: x + rng.normal(size=x.shape) * 1e-3, p0) for _ in range(2)]
    from bcjax.merging import _enable_x64  # jax.enable_x64 (jax.experimental's on older jax)

    with _enable_x64(True):
        out = bcjax.merge(method, p0, fts, **({"beta": 0.0, "gamma": 1.0, "alpha": 0.5} if method == "breadcrumbs"
                                               else {"density": 1.0} if method == "ties" else {}))
        for key in p0:
            assert out[key].dtype == np.float64, (method, key)
            taus = [f[key] - p0[key] for f in fts]
            if method == "simple_average":
                want = (fts[0][key] + fts[1][key]) / 2
            elif method == "task_arithmetic":
                want = p0[key] + taus[0] + taus[1]
            elif method == "breadcrumbs":
                want = p0[key] + 0.5 * (taus[0] + taus[1])
            else:  # TIES, density 1: elected signs, disjoint mean
                s = np.where(taus[0] + taus[1] >= 0, 1.0, -1.0)
                kept = [np.where(np.sign(t) == s, t, 0.0) for t in taus]
                cnt = sum((k != 0).astype(float) for k in kept)
                want = p0[key] + np.where(cnt > 0, sum(kept) / np.maximum(cnt, 1), 0)
            np.testing.assert_allclose(np.asarray(out[key]), want, rtol=0, atol=1e-12)
