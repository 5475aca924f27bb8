"""Ensemble references (SPEC §3) on tiny models, against NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax.ensembles import MaxModel, SimpleEnsemble, WeightedEnsemble
from bcjax.errors import HyperparameterError
from bcjax.evaluate import accuracy, stack_trees


def predict(params, x, head):
    return jnp.tanh(x @ params["w"]) @ head


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def models():
    rng = np.random.default_rng(0)
    fts = [{"w": rng.standard_normal((5, 6)).astype(np.float32)} for _ in range(3)]
    head = rng.standard_normal((6, 4)).astype(np.float32)
    x = rng.standard_normal((30, 5)).astype(np.float32)
    probs = np.stack([_softmax(np.tanh(x @ f["w"]) @ head) for f in fts])  # [T, B, C]
    return fts, head, x, probs


def test_simple_and_weighted_ensembles_match_numpy(models):
    fts, head, x, probs = models
    stacked = stack_trees(fts)
    got = np.exp(np.asarray(SimpleEnsemble(predict)(stacked, x, head)))
    np.testing.assert_allclose(got, probs.mean(0), rtol=1e-5, atol=1e-6)
    w = (0.2, 1.0, 3.0)
    got_w = np.exp(np.asarray(WeightedEnsemble(predict, w)(stacked, x, head)))
    np.testing.assert_allclose(got_w, np.einsum("t,tbc->bc", np.array(w), probs) / sum(w), rtol=1e-5, atol=1e-6)
    # one-hot weights select one model; equal weights are the simple ensemble
    np.testing.assert_allclose(np.exp(np.asarray(WeightedEnsemble(predict, (0, 1, 0))(stacked, x, head))), probs[1],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(HyperparameterError):
        WeightedEnsemble(predict, (0, 0, 0))
    with pytest.raises(HyperparameterError):
        WeightedEnsemble(predict, (1, 1))(stacked, x, head)


def test_ensembles_plug_into_accuracy(models):
    fts, head, x, probs = models
    y = probs.mean(0).argmax(-1)
    y[:7] = (y[:7] + 1) % 4  # 7 of 30 wrong
    stacked = stack_trees(fts)
    got = accuracy(SimpleEnsemble(predict), stacked, x, y, batch_size=8, predict_args=(head,))
    assert got == pytest.approx(23 / 30)
    for k in range(3):
        ref = np.mean(probs[k].argmax(-1) == y)
        got = accuracy(MaxModel(predict, k), stacked, x, y, batch_size=8, predict_args=(head,))
        assert got == pytest.approx(ref)
    assert SimpleEnsemble(predict) == SimpleEnsemble(predict)  # hashable by value: one compilation
