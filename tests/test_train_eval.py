"""The shared fine-tuning and evaluation loops on a tiny Flax classifier (real code paths)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bcjax import evaluate, train


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.tanh(nn.Dense(16)(x)))


MODEL = Tiny()


def predict(params, x, *unused):
    return MODEL.apply({"params": params}, x)


def loss_fn(params, batch, *unused):
    return optax.softmax_cross_entropy_with_integer_labels(predict(params, batch["x"]), batch["y"]).mean()


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((240, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1).astype(np.int32)
    params = MODEL.init(jax.random.key(0), x[:1])["params"]
    return {"x": x, "y": y}, params


CFG = train.TrainConfig(steps=40, batch_size=16, learning_rate=3e-2, weight_decay=0.0, warmup_steps=4, seed=1)


def full_loss(params, data):
    return float(loss_fn(params, data))


def test_finetune_lowers_loss_and_raises_accuracy(problem):
    data, params = problem
    res = train.finetune(loss_fn, params, data, CFG, progress=False)
    assert full_loss(res.params, data) < 0.7 * full_loss(params, data)
    assert evaluate.accuracy(predict, res.params, data["x"], data["y"]) > evaluate.accuracy(predict, params, data["x"], data["y"])
    assert len(res.losses) == CFG.steps and res.resumed_from is None


def test_resume_after_interruption_equals_uninterrupted_run(problem, tmp_path):
    data, params = problem
    cfg = train.TrainConfig(**{**CFG.__dict__, "checkpoint_every": 10})
    full = train.finetune(loss_fn, params, data, cfg, progress=False)
    ckpt = tmp_path / "ckpt"
    partial = train.finetune(loss_fn, params, data, cfg, checkpoint_dir=str(ckpt), progress=False, stop_after=25)
    assert len(partial.losses) == 25
    resumed = train.finetune(loss_fn, params, data, cfg, checkpoint_dir=str(ckpt), progress=False)
    assert resumed.resumed_from == 25  # the "crash" left a checkpoint at step 25
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # a finished run restores instantly
    again = train.finetune(loss_fn, params, data, cfg, checkpoint_dir=str(ckpt), progress=False)
    assert again.resumed_from == CFG.steps and again.losses == []


def test_data_parallel_over_8_devices_matches_one_device(problem):
    data, params = problem
    cfg = train.TrainConfig(**{**CFG.__dict__, "steps": 5})
    one = train.finetune(loss_fn, params, data, cfg, mesh=train.data_mesh(jax.devices()[:1]), progress=False)
    eight = train.finetune(loss_fn, params, data, cfg, mesh=train.data_mesh(), progress=False)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        train.finetune(loss_fn, params, data, train.TrainConfig(**{**CFG.__dict__, "batch_size": 12}), progress=False)


def test_batches_are_deterministic_and_cover_epochs():
    a = [train.batch_indices(50, 8, s, 3) for s in range(6)]
    b = [train.batch_indices(50, 8, s, 3) for s in range(6)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len(set(np.concatenate(a).tolist())) == 48  # one epoch of 6 batches, no repeats
    assert train.batch_indices(5, 8, 0, 0).shape == (8,)


def test_accuracy_of_stack_equals_per_model_accuracy(problem):
    data, params = problem
    models = [jax.tree.map(lambda p, k=k: p + 0.3 * k * jnp.ones_like(p), params) for k in range(5)]
    stacked = evaluate.stack_trees(models)
    got = evaluate.accuracy_of_stack(predict, stacked, data["x"][:101], data["y"][:101], batch_size=32, models_per_call=2)
    expect = [evaluate.accuracy(predict, m, data["x"][:101], data["y"][:101], batch_size=32) for m in models]
    np.testing.assert_allclose(got, expect)


def test_per_example_correctness_matches_argmax_and_accuracy(problem):
    data, params = problem
    x, y = data["x"][:101], data["y"][:101]
    want = np.argmax(np.asarray(predict(params, x)), -1) == y  # numpy reference
    got = evaluate.correctness(predict, params, x, y, batch_size=32)
    np.testing.assert_array_equal(got, want)
    assert got.mean() == evaluate.accuracy(predict, params, x, y, batch_size=32)
    models = [jax.tree.map(lambda p, k=k: p + 0.3 * k * jnp.ones_like(p), params) for k in range(3)]
    stack = evaluate.correctness_of_stack(predict, evaluate.stack_trees(models), x, y, batch_size=32,
                                          models_per_call=2)
    assert stack.shape == (3, 101) and stack.dtype == bool
    for k, m in enumerate(models):
        np.testing.assert_array_equal(stack[k], np.argmax(np.asarray(predict(m, x)), -1) == y)


def test_normalized_accuracy_and_errors():
    assert evaluate.normalized_accuracy({"a": 0.5}, {"a": 0.8}) == {"a": 0.625}
    with pytest.raises(ValueError, match="undefined"):
        evaluate.normalized_accuracy({"a": 0.5}, {"a": 0.0})
    with pytest.raises(ValueError, match="labels"):
        evaluate.accuracy(predict, None, np.zeros((3, 5)), np.zeros(2))
    with pytest.raises(ValueError, match="warmup"):
        train.TrainConfig(steps=5, warmup_steps=10)


def test_correct_of_stack_rows_average_to_accuracy_of_stack():
    """Per-example correctness (for bootstraps) agrees with the stacked accuracy."""
    import jax.numpy as jnp
    import numpy as np

    from bcjax.evaluate import accuracy_of_stack, correctness_of_stack

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((3, 4, 5)).astype(np.float32))  # 3 models
    x = rng.standard_normal((11, 4)).astype(np.float32)
    y = rng.integers(0, 5, 11)
    predict = lambda p, xb: xb @ p  # noqa: E731
    hits = correctness_of_stack(predict, w, x, y, batch_size=4, models_per_call=2)
    expect = np.argmax(np.einsum("nd,mdk->mnk", x, np.asarray(w)), -1) == y[None]
    np.testing.assert_array_equal(hits, expect)
    np.testing.assert_array_equal(hits.mean(1), accuracy_of_stack(predict, w, x, y, batch_size=4, models_per_call=2))
