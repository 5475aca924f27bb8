"""Prototype heads and the diagonal Fisher against plain numpy / per-example references."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax.fisher import diagonal_fisher
from bcjax.models import heads


def test_prototype_head_matches_numpy_and_padding_masks_classes():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((30, 8)).astype(np.float32)
    y = np.arange(30) % 3
    w = heads.prototype_head(f, y, 3)
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    expect = np.stack([fn[y == c].mean(0) for c in range(3)])
    expect /= np.linalg.norm(expect, axis=1, keepdims=True)
    np.testing.assert_allclose(w, expect, rtol=1e-5, atol=1e-6)
    wp, valid = heads.pad_head(w, 5)
    assert wp.shape == (5, 8) and valid.tolist() == [True] * 3 + [False] * 2
    logits = np.asarray(heads.cosine_logits(jnp.asarray(f), wp, valid, 10.0))
    np.testing.assert_allclose(logits[:, :3], 10 * fn @ expect.T, rtol=1e-4, atol=1e-4)
    assert (logits[:, 3:] < -1e8).all() and (logits.argmax(1) < 3).all()
    with pytest.raises(ValueError, match="more than the padded"):
        heads.pad_head(w, 2)


def test_k_shot_indices():
    y = np.array([0, 0, 0, 1, 1, 2])
    idx = heads.k_shot_indices(y, 3, 2, seed=1)
    assert np.bincount(y[idx]).tolist() == [2, 2, 1]
    assert np.array_equal(idx, heads.k_shot_indices(y, 3, 2, seed=1))
    with pytest.raises(ValueError, match="class 3 has no training example"):
        heads.k_shot_indices(y, 4, 2)


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.tanh(nn.Dense(6)(x)))


def predict(params, x):
    return Tiny().apply({"params": params}, x)


def test_diagonal_fisher_equals_per_example_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((11, 3)).astype(np.float32)
    params = Tiny().init(jax.random.key(0), x[:1])["params"]
    key = jax.random.key(5)
    got = diagonal_fisher(predict, params, x, key, batch_size=4)
    # reference: same sampled labels (same key derivation), one example at a time
    total = jax.tree.map(jnp.zeros_like, params)
    for s in range(0, 11, 4):
        keys = jax.random.split(jax.random.fold_in(key, s), 4)
        for j in range(min(4, 11 - s)):
            xi = x[s + j]
            yhat = jax.random.categorical(keys[j], predict(params, xi[None])[0])
            g = jax.grad(lambda p: jax.nn.log_softmax(predict(p, xi[None])[0])[yhat])(params)
            total = jax.tree.map(lambda t, gi: t + gi ** 2, total, g)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(total)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b) / 11, rtol=1e-4, atol=1e-7)
    assert all((np.asarray(a) >= 0).all() for a in jax.tree.leaves(got))
    with pytest.raises(ValueError, match="at least one"):
        diagonal_fisher(predict, params, x[:0], key)
