"""The default path's fast paths (issue 16, items 3–4): finiteness checked inside the merge's
own pass, NumPy inputs, and TIES's model-wide native selection. Each is compared against
the plain definition: the separate finiteness check's error, the JAX-input merge, a numpy
sort of the concatenated |τ| and the portable histogram path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bcjax
from bcjax import _native, errors, merging, order_stats
from bcjax.tree import check_finite

# ≥ SORT_BELOW entries in one leaf, so the selection methods take their streaming paths
SHAPES = {"enc/kernel": (64, 80), "enc/bias": (80,), "head/w": (33, 70), "scalar": ()}
NAMES = ["pretrained model", "fine-tuned model 0", "fine-tuned model 1", "fine-tuned model 2"]
METHODS = {"task_arithmetic": dict(alpha=0.4), "breadcrumbs": dict(alpha=0.3, beta=0.6, gamma=0.95),
           "ties": dict(density=0.3, alpha=1.0), "simple_average": {},
           "dare": dict(keep=0.5, alpha=0.3, key=jax.random.key(1)),
           "breadcrumbs_row": dict(alpha=0.3, beta=0.6, gamma=0.95, granularity="row", axis=0)}


def models(seed=0, dtype=np.float32, num_tasks=3):
    rng = np.random.default_rng(seed)
    pre = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
    pre["step"] = np.int32(3)
    fts = []
    for t in range(num_tasks):
        ft = {k: (v.astype(np.float32) + 0.1 * rng.standard_normal(np.shape(v)).astype(np.float32)).astype(dtype)
              for k, v in pre.items() if k != "step"}
        ft["step"] = np.int32(4 + t)
        fts.append(ft)
    return pre, fts


def run(method, pre, fts, **kw):
    name = "breadcrumbs" if method == "breadcrumbs_row" else method
    return bcjax.merge(name, pre, fts, **METHODS[method], **kw)


def expected_message(trees):
    with pytest.raises(errors.NonFiniteError) as info:
        check_finite(trees, NAMES[:len(trees)])
    return str(info.value)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_fused_check_names_model_and_key_path_like_the_separate_check(method, bad):
    for model in range(4):  # θ0, then each θt
        for key, index in (("enc/kernel", (5, 77)), ("scalar", ()), ("head/w", (32, 0))):
            pre, fts = models()
            trees = [pre, *fts]
            trees[model][key] = np.array(trees[model][key], copy=True)
            trees[model][key][index] = bad
            want = expected_message(trees)
            assert f"{NAMES[model]}, key path '{key}'" in want
            with pytest.raises(errors.NonFiniteError) as info:
                run(method, trees[0], trees[1:])
            assert str(info.value) == want


def test_fused_check_reports_the_first_model_like_the_separate_check():
    pre, fts = models()
    fts[2]["enc/bias"] = np.array(fts[2]["enc/bias"], copy=True)
    fts[2]["enc/bias"][3] = np.nan
    fts[0]["head/w"] = np.array(fts[0]["head/w"], copy=True)
    fts[0]["head/w"][1, 1] = np.inf
    with pytest.raises(errors.NonFiniteError, match=r"^fine-tuned model 0, key path 'head/w'"):
        bcjax.merge("ties", pre, fts)


@pytest.mark.parametrize("method", ["task_arithmetic", "breadcrumbs", "ties"])
def test_excluded_leaves_are_still_checked(method):
    pre, fts = models()
    fts[1]["head/w"] = np.array(fts[1]["head/w"], copy=True)
    fts[1]["head/w"][0, 0] = np.nan  # excluded: copied from θ0, never in the output
    with pytest.raises(errors.NonFiniteError, match=r"fine-tuned model 1, key path 'head/w'"):
        run(method, pre, fts, exclude="^head/")
    out = run(method, pre, fts, exclude="^head/", validate=False)
    np.testing.assert_array_equal(np.asarray(out["head/w"]), pre["head/w"])


def test_finite_inputs_that_overflow_are_rescued_or_named_never_mistaken_for_a_nan_input():
    """SPEC §1 (issue 11): nothing silently non-finite. τ = −6e38 overflows float32 in the
    kernel, but θ0 + α Στ is computed with an exact power-of-two rescale, so a representable
    result is returned; an unrepresentable one is an OverflowMergeError naming the key path
    (not a NonFiniteError blaming a model: every input is finite)."""
    pre, fts = models()
    pre["enc/bias"] = np.full(80, 3e38, np.float32)
    for ft in fts:
        ft["enc/bias"] = np.full(80, -3e38, np.float32)  # τ = −6e38 overflows to −inf
    with pytest.raises(errors.OverflowMergeError, match=r"key path 'enc/bias'"):
        bcjax.merge("task_arithmetic", pre, fts, alpha=1.0)  # θ* = 3e38 − T·6e38: not a float32
    out = bcjax.merge("task_arithmetic", pre, fts, alpha=1.0 / len(fts))  # θ* = −3e38: representable
    np.testing.assert_allclose(np.asarray(out["enc/bias"]), -3e38, rtol=1e-6)


def test_a_method_without_the_fused_check_gets_the_separate_check():
    @bcjax.register_method("_test_copy_theta0")
    def copy_theta0(pretrained, finetuned, flags):
        """Returns θ0: a NaN in θt never reaches the output."""
        return pretrained

    try:
        pre, fts = models()
        fts[1]["enc/kernel"] = np.array(fts[1]["enc/kernel"], copy=True)
        fts[1]["enc/kernel"][0, 0] = np.nan
        with pytest.raises(errors.NonFiniteError, match=r"fine-tuned model 1, key path 'enc/kernel'"):
            bcjax.merge("_test_copy_theta0", pre, fts)
    finally:
        merging._REGISTRY.pop("_test_copy_theta0")


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_numpy_and_jax_inputs_merge_identically(method, dtype):
    pre, fts = models(seed=3, dtype=dtype)
    on_device = lambda tree: jax.tree.map(jnp.asarray, tree)  # noqa: E731
    a = run(method, pre, fts)
    b = run(method, on_device(pre), [on_device(f) for f in fts])
    c = run(method, pre, fts, validate=False)
    for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(c)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        np.testing.assert_array_equal(np.asarray(x), np.asarray(z))


# ------------------------------------------------------------------ TIES's model-wide selection
def _leaf_list(rng, sizes, dtype, kind, num_tasks):
    p0 = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    fts = []
    for _ in range(num_tasks):
        task = []
        for p in p0:
            tau = rng.standard_t(3, p.size).astype(np.float32) * np.float32(0.01)
            if kind == "ties":  # few distinct magnitudes: many ties at every threshold
                tau = np.round(tau * 200) / 200
            task.append(p + tau)
        fts.append(task)
    cast = lambda x: np.asarray(jnp.asarray(x, dtype))  # noqa: E731
    return [cast(p) for p in p0], [[cast(f) for f in task] for task in fts]


def _reference_bits(p0, fts, ranks):
    """numpy: sort the concatenated |θt − θ0| (float32 bits) over all leaves."""
    out = []
    for t, task in enumerate(fts):
        d = np.concatenate([(np.asarray(f, np.float32) - np.asarray(p, np.float32)).ravel()
                            for f, p in zip(task, p0)])
        out.append(np.sort(np.abs(d).view(np.int32))[ranks[t]])
    return np.stack(out)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("sizes", [(7, 3000, 1, 40_000, 512), (1500,), (2_300_000, 9, 2_000_001)])
def test_model_wide_selection_native_portable_and_sort_agree(dtype, kind, sizes, monkeypatch):
    rng = np.random.default_rng(sum(sizes))
    p0, fts = _leaf_list(rng, sizes, dtype, kind, num_tasks=3)
    n = sum(sizes)
    ranks = np.array([[0, n // 2, n - 1], [n - 1 - n // 5, 3, n - 2], [n // 3, n // 3, n - 1 - n // 100]],
                     np.int32)
    want = _reference_bits(p0, fts, ranks)
    jp0, jfts = [jnp.asarray(p) for p in p0], [[jnp.asarray(f) for f in task] for task in fts]
    native = np.asarray(jax.jit(order_stats.select_diff_bits_leaves)(jp0, jfts, ranks))
    np.testing.assert_array_equal(native, want)
    if n > order_stats.SORT_BELOW:  # the kernel itself, its exact fallback and > 4 ranks per task
        direct = jax.jit(_native.select_diff_bits_leaves, static_argnames="sigmas")
        np.testing.assert_array_equal(np.asarray(direct(jp0, jfts, ranks, sigmas=0.0)), want)
        wide = np.concatenate([ranks, ranks[:, ::-1]], axis=1)
        np.testing.assert_array_equal(np.asarray(direct(jp0, jfts, wide)), np.concatenate([want, want[:, ::-1]], 1))
    monkeypatch.setattr(_native, "available", lambda: False)
    portable = np.asarray(order_stats.select_diff_bits_leaves(jp0, jfts, ranks))
    np.testing.assert_array_equal(portable, want)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_ties_native_and_portable_merges_identical_with_ties_at_the_threshold(dtype, monkeypatch):
    rng = np.random.default_rng(11)
    pre = {"a": rng.standard_normal((70, 90)).astype(np.float32), "b": rng.standard_normal(300).astype(np.float32)}
    fts = []
    for _ in range(3):  # τ on a coarse grid: the threshold magnitude occurs many times
        fts.append({k: (v + np.round(rng.standard_normal(v.shape) * 4).astype(np.float32) / 64) for k, v in pre.items()})
    pre = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, dtype)), pre)
    fts = [jax.tree.map(lambda x: np.asarray(jnp.asarray(x, dtype)), f) for f in fts]
    jax.clear_caches()
    native = bcjax.merge("ties", pre, fts, density=0.3)
    monkeypatch.setattr(_native, "available", lambda: False)
    jax.clear_caches()
    portable = bcjax.merge("ties", pre, fts, density=0.3)
    monkeypatch.undo()
    jax.clear_caches()
    for x, y in zip(jax.tree.leaves(native), jax.tree.leaves(portable)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # ties at the threshold are kept: each task keeps at least ⌊density·N⌋ entries
    n = sum(np.size(v) for v in pre.values())
    tau = np.concatenate([np.abs(np.asarray(f[k], np.float32) - np.asarray(pre[k], np.float32)).ravel()
                          for f in fts[:1] for k in sorted(pre)])
    thr = np.sort(tau)[n - int(0.3 * n)]
    assert (tau >= thr).sum() > int(0.3 * n)  # the grid really produced ties at the threshold
