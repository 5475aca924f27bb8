"""RegMean and weighted average (SPEC §3), and the Flax Gram collector, against NumPy references."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import bcjax
from bcjax.errors import HyperparameterError, SingularGramError, TreeMismatchError
from bcjax.models.grams import collect_grams


def _linear_tasks(rng, num_tasks=3, din=5, dout=4, n=40):
    xs = [rng.standard_normal((n, din)) * rng.uniform(0.5, 2.0, din) for _ in range(num_tasks)]
    ws = [rng.standard_normal((din, dout)) for _ in range(num_tasks)]
    pre = {"dense": {"kernel": np.zeros((din, dout), np.float32), "bias": np.zeros(dout, np.float32)}}
    fts = [{"dense": {"kernel": w.astype(np.float32), "bias": rng.standard_normal(dout).astype(np.float32)}}
           for w in ws]
    grams = [{"dense/kernel": (x.T @ x / len(x)).astype(np.float32)} for x in xs]
    return pre, fts, xs, ws, grams


def test_nondiag_one_is_joint_least_squares():
    rng = np.random.default_rng(0)
    pre, fts, xs, ws, grams = _linear_tasks(rng)
    got = bcjax.merge("regmean", pre, fts, grams=grams, nondiag=1.0)
    # each task's data reweighted by 1/sqrt(N_t) (Gt = Xtᵀ Xt / Nt), targets Xt Wt
    x_all = np.concatenate([x / np.sqrt(len(x)) for x in xs])
    y_all = np.concatenate([x @ w / np.sqrt(len(x)) for x, w in zip(xs, ws)])
    ref = np.linalg.lstsq(x_all, y_all, rcond=None)[0]
    np.testing.assert_allclose(got["dense"]["kernel"], ref, rtol=1e-4, atol=1e-4)
    # other leaves: the simple average
    np.testing.assert_allclose(got["dense"]["bias"], np.mean([f["dense"]["bias"] for f in fts], 0), rtol=1e-6)
    assert got["dense"]["kernel"].dtype == np.float32


def test_badly_scaled_features_keep_full_accuracy():
    # a nearly dead input feature (scale 1e-4, Gram diagonal ~1e-8 of the others): Jacobi
    # scaling keeps the float32 solve at least-squares accuracy
    rng = np.random.default_rng(8)
    pre, fts, xs, ws, _ = _linear_tasks(rng)
    xs = [x * np.array([1, 1, 1e-4, 1, 1]) for x in xs]
    grams = [{"dense/kernel": (x.T @ x / len(x)).astype(np.float32)} for x in xs]
    got = np.asarray(bcjax.merge("regmean", pre, fts, grams=grams, nondiag=1.0)["dense"]["kernel"])
    x_all = np.concatenate([x / np.sqrt(len(x)) for x in xs])
    y_all = np.concatenate([x @ w / np.sqrt(len(x)) for x, w in zip(xs, ws)])
    ref = np.linalg.lstsq(x_all, y_all, rcond=None)[0]
    np.testing.assert_allclose(got * [[1], [1], [1e-4], [1], [1]], ref * [[1], [1], [1e-4], [1], [1]],
                               rtol=1e-4, atol=1e-4)  # compare the fitted maps' rows in input units
    np.testing.assert_allclose(got[2], ref[2], rtol=1e-3)  # and the tiny feature's row itself


def test_nondiag_zero_is_per_feature_weighted_average():
    rng = np.random.default_rng(1)
    pre, fts, xs, ws, grams = _linear_tasks(rng)
    got = np.asarray(bcjax.merge("regmean", pre, fts, grams=grams, nondiag=0.0)["dense"]["kernel"])
    d = np.stack([np.diag(g["dense/kernel"]) for g in grams])  # [T, in]
    ref = np.einsum("ti,tio->io", d, np.stack(ws)) / d.sum(0)[:, None]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_default_nondiag_matches_numpy_solve():
    rng = np.random.default_rng(2)
    pre, fts, xs, ws, grams = _linear_tasks(rng)
    got = np.asarray(bcjax.merge("regmean", pre, fts, grams=grams)["dense"]["kernel"])
    shrunk = [g["dense/kernel"] * 0.95 + np.diag(np.diag(g["dense/kernel"])) * 0.05 for g in grams]
    ref = np.linalg.solve(sum(shrunk), sum(g @ w for g, w in zip(shrunk, ws)))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 1.0))
def test_equal_grams_give_simple_average(seed, nondiag):
    rng = np.random.default_rng(seed)
    pre, fts, xs, ws, grams = _linear_tasks(rng, n=30)
    same = [{"dense/kernel": grams[0]["dense/kernel"]} for _ in fts]
    got = bcjax.merge("regmean", pre, fts, grams=same, nondiag=nondiag)
    ref = bcjax.merge("simple_average", pre, fts)
    np.testing.assert_allclose(got["dense"]["kernel"], ref["dense"]["kernel"], rtol=1e-4, atol=1e-4)


def test_singular_system_is_an_error_naming_the_key_path_and_jitter_regularises():
    rng = np.random.default_rng(3)
    pre, fts, xs, ws, grams = _linear_tasks(rng, n=3)  # 3 examples per task, 3 tasks, ... one dead feature:
    dead = [{"dense/kernel": g["dense/kernel"].copy()} for g in grams]
    for g in dead:
        g["dense/kernel"][2, :] = 0
        g["dense/kernel"][:, 2] = 0
    with pytest.raises(SingularGramError, match="dense/kernel"):
        bcjax.merge("regmean", pre, fts, grams=dead, nondiag=0.5)
    got = bcjax.merge("regmean", pre, fts, grams=dead, nondiag=0.5, jitter=1e-4)
    assert np.all(np.isfinite(got["dense"]["kernel"]))
    # exact least squares with fewer examples (3 tasks × 1) than inputs (5): rank-deficient
    few = [{"dense/kernel": np.outer(x[0], x[0]).astype(np.float32)} for x in xs]
    with pytest.raises(SingularGramError, match="dense/kernel"):
        bcjax.merge("regmean", pre, fts, grams=few, nondiag=1.0)
    bcjax.merge("regmean", pre, fts, grams=few, nondiag=0.9)  # shrunk off-diagonals: positive definite


def test_gram_validation_errors():
    rng = np.random.default_rng(4)
    pre, fts, xs, ws, grams = _linear_tasks(rng)
    with pytest.raises(HyperparameterError, match="grams"):
        bcjax.merge("regmean", pre, fts)
    with pytest.raises(TreeMismatchError, match="dense/nope"):
        bcjax.merge("regmean", pre, fts, grams=[{"dense/nope": g["dense/kernel"]} for g in grams])
    with pytest.raises(TreeMismatchError, match="shape"):
        bcjax.merge("regmean", pre, fts, grams=[{"dense/kernel": np.eye(3)} for _ in grams])
    with pytest.raises(TreeMismatchError, match="Gram dicts"):
        bcjax.merge("regmean", pre, fts, grams=grams[:2])
    with pytest.raises(TreeMismatchError, match="2-D"):
        bcjax.merge("regmean", pre, fts, grams=[{"dense/bias": np.eye(4)} for _ in grams])
    with pytest.raises(HyperparameterError, match="nondiag"):
        bcjax.merge("regmean", pre, fts, grams=grams, nondiag=1.5)
    # an excluded kernel is copied from θ0 even with a Gram
    got = bcjax.merge("regmean", pre, fts, grams=grams, exclude="kernel")
    np.testing.assert_array_equal(got["dense"]["kernel"], pre["dense"]["kernel"])


def test_weighted_average():
    rng = np.random.default_rng(5)
    pre, fts, *_ = _linear_tasks(rng)
    w = np.array([1.0, 3.0, 0.5])
    got = bcjax.merge("weighted_average", pre, fts, weights=w)
    for key in ("kernel", "bias"):
        ref = np.einsum("t,t...->...", w, np.stack([f["dense"][key] for f in fts])) / w.sum()
        np.testing.assert_allclose(got["dense"][key], ref, rtol=1e-6, atol=1e-6)
    plain = bcjax.merge("weighted_average", pre, fts)
    np.testing.assert_allclose(plain["dense"]["kernel"], bcjax.merge("simple_average", pre, fts)["dense"]["kernel"],
                               rtol=1e-6)
    with pytest.raises(HyperparameterError):
        bcjax.merge("weighted_average", pre, fts, weights=[0.0, 0.0, 0.0])
    with pytest.raises(HyperparameterError):
        bcjax.merge("weighted_average", pre, fts, weights=[1.0, -1.0, 1.0])


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(6, name="hidden")(x))
        h = nn.LayerNorm(name="norm")(h)  # not linear: no Gram
        return nn.Dense(3, name="out")(h)


def _apply_mlp(params, x):
    return _MLP().apply({"params": params}, x)


def test_collector_matches_numpy_gram_per_layer():
    x = np.random.default_rng(6).standard_normal((13, 4)).astype(np.float32)
    params = jax.tree.map(np.asarray, _MLP().init(jax.random.key(0), x[:1])["params"])
    grams = collect_grams(_apply_mlp, params, x, batch_size=5)  # 13 = 5 + 5 + 3 (last batch padded)
    assert sorted(grams) == ["hidden/kernel", "out/kernel"]
    h = np.maximum(x @ params["hidden"]["kernel"] + params["hidden"]["bias"], 0)
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mu) / np.sqrt(var + 1e-6) * params["norm"]["scale"] + params["norm"]["bias"]
    np.testing.assert_allclose(grams["hidden/kernel"], x.T @ x / len(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grams["out/kernel"], h.T @ h / len(x), rtol=1e-4, atol=1e-4)
    # keys are the merge's key paths: RegMean runs on them directly
    fts = [jax.tree.map(lambda a, s=s: a + 0.1 * s, params) for s in (1.0, -1.0)]
    merged = bcjax.merge("regmean", params, fts, grams=[grams, grams])
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert collect_grams(_apply_mlp, params, x, prefix="params").keys() == {"params/hidden/kernel",
                                                                            "params/out/kernel"}


class _TokenDense(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: [B, L, D]
        return nn.Dense(2, name="proj")(x)


def test_collector_flattens_sequence_axes_and_masks_padding():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 5, 3)).astype(np.float32)
    mask = rng.random((6, 5)) > 0.3
    params = _TokenDense().init(jax.random.key(0), x[:1])["params"]

    def apply(p, xb):
        return _TokenDense().apply({"params": p}, xb)

    g = collect_grams(apply, params, x, mask=mask, batch_size=4)["proj/kernel"]
    flat, m = x.reshape(-1, 3), mask.reshape(-1)
    np.testing.assert_allclose(g, (flat[m].T @ flat[m]) / 6, rtol=1e-5, atol=1e-5)
