"""AdaMerging (SPEC §3): entropy minimisation over merging coefficients, on a tiny MLP."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import bcjax
from bcjax.adamerging import adamerging, load_coefficients, mean_entropy, merged_params, stacked_vectors
from bcjax.errors import DataAccessError, HyperparameterError

T, D, H, C = 3, 4, 8, 3


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    pre = {"l1": {"kernel": (rng.standard_normal((D, H)) / 2).astype(np.float32), "bias": np.zeros(H, np.float32)},
           "l2": {"kernel": (rng.standard_normal((H, H)) / 3).astype(np.float32), "bias": np.zeros(H, np.float32)}}
    fts = [jax.tree.map(lambda a: (a + 0.5 * rng.standard_normal(a.shape)).astype(np.float32), pre) for _ in range(T)]
    heads = jnp.asarray(rng.standard_normal((T, H, C)).astype(np.float32))
    pools = [rng.standard_normal((24, D)).astype(np.float32) for _ in range(T)]
    return pre, fts, heads, pools


PRE, FTS, HEADS, POOLS = _problem()


def logits_fn(params, task, x):
    h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"])
    h = jnp.tanh(h @ params["l2"]["kernel"] + params["l2"]["bias"])
    return h @ HEADS[task]


def _close(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **{"rtol": 1e-6, "atol": 1e-6, **kw})


def _run(**kw):
    args = dict(granularity="layer", steps=8, learning_rate=0.05, progress=False, batch_size=6)
    args.update(kw)
    return adamerging(logits_fn, PRE, FTS, POOLS, **args)


def test_zero_steps_is_task_arithmetic_at_init():
    merged, lam = _run(steps=0, init=0.3)
    assert lam.shape == (T, 4) and np.all(lam == np.float32(0.3))
    _close(merged, bcjax.merge("task_arithmetic", PRE, FTS, alpha=0.3))
    merged_t, lam_t = _run(steps=0, init=0.3, granularity="task")
    assert lam_t.shape == (T,)
    _close(merged_t, merged)


def test_zero_steps_breadcrumbs_vectors_is_the_breadcrumbs_merge():
    hp = dict(beta=0.5, gamma=0.9)
    merged, _ = _run(steps=0, init=0.4, vectors="breadcrumbs", vector_hparams=hp)
    _close(merged, bcjax.merge("breadcrumbs", PRE, FTS, alpha=0.4, **hp))


def test_ties_vectors_match_numpy_reference():
    density = 0.3
    got = stacked_vectors(PRE, FTS, [True] * 4, "ties", {"density": density})
    taus = [np.concatenate([np.ravel(f - p) for f, p in zip(jax.tree.leaves(ft), jax.tree.leaves(PRE))]) for ft in FTS]
    trimmed = []
    for tau in taus:
        k = max(1, int(np.floor(density * tau.size + 1e-6)))
        thr = np.sort(np.abs(tau))[::-1][k - 1]
        trimmed.append(np.where(np.abs(tau) >= thr, tau, 0))
    sign = np.where(np.sum(trimmed, 0) >= 0, 1, -1)
    ref = np.stack([np.where((np.sign(t) == sign) & (t != 0), t, 0) for t in trimmed])
    flat = np.concatenate([np.asarray(g).reshape(T, -1) for g in jax.tree.leaves(got)], 1)
    np.testing.assert_allclose(flat, ref, rtol=1e-6, atol=1e-7)


def test_layer_wise_with_tied_coefficients_equals_task_wise():
    flags = [True] * 4
    deltas = stacked_vectors(PRE, FTS, flags, "raw")
    merged = tuple(range(4))
    lam_task = jnp.asarray([0.2, 0.5, -0.1])
    lam_layer = jnp.tile(lam_task[:, None], (1, 4))
    _close(merged_params(PRE, deltas, lam_task, merged), merged_params(PRE, deltas, lam_layer, merged))

    def loss(lam):
        p = merged_params(PRE, deltas, lam, merged)
        return sum(mean_entropy(logits_fn(p, t, POOLS[t])) for t in range(T)) / T

    np.testing.assert_allclose(loss(lam_task), loss(lam_layer), rtol=1e-6)
    # chain rule: the task-wise gradient is the layer-wise gradient summed over leaves
    np.testing.assert_allclose(jax.grad(loss)(lam_task), jax.grad(loss)(lam_layer).sum(1), rtol=1e-5, atol=1e-6)
    # end to end: with one merged leaf, layer-wise training is task-wise training
    one = "l1/bias|l2"  # exclude all but l1/kernel
    _, lt = _run(granularity="task", exclude=one)
    _, ll = _run(granularity="layer", exclude=one)
    assert ll.shape == (T, 1)
    np.testing.assert_allclose(ll[:, 0], lt, rtol=1e-6)


def test_entropy_decreases_and_runs_are_deterministic(tmp_path):
    _, lam = _run(steps=40, out_dir=str(tmp_path / "a"))
    loss = np.asarray(load_coefficients(str(tmp_path / "a"))[1]["loss"])
    assert len(loss) == 40
    assert loss[-5:].mean() < loss[:5].mean() - 0.05
    assert not np.allclose(lam, 0.3)
    _, again = _run(steps=40)
    np.testing.assert_array_equal(lam, again)
    _, other = _run(steps=40, seed=1)
    assert not np.array_equal(lam, other)


def test_clamp_keeps_coefficients_in_range():
    _, lam = _run(steps=20, learning_rate=0.5, clamp=True)
    assert lam.min() >= 0 and lam.max() <= 1


def test_resume_equals_uninterrupted_run(tmp_path):
    full_merged, full = _run(steps=6, granularity="task")
    seen = []

    def batches(step):
        seen.append(step)
        return [p[np.sort(np.random.default_rng([0, step, t]).choice(24, 6, replace=False))]
                for t, p in enumerate(POOLS)]

    ref_merged, ref = adamerging(logits_fn, PRE, FTS, batches, granularity="task", steps=6, learning_rate=0.05,
                                 progress=False)
    out = str(tmp_path / "run")
    adamerging(logits_fn, PRE, FTS, batches, granularity="task", steps=4, learning_rate=0.05, progress=False,
               out_dir=out, checkpoint_every=2)
    seen.clear()
    merged, lam = adamerging(logits_fn, PRE, FTS, batches, granularity="task", steps=6, learning_rate=0.05,
                             progress=False, out_dir=out, checkpoint_every=2)
    assert seen == [4, 5]  # resumed from the step-4 checkpoint
    np.testing.assert_array_equal(lam, ref)
    _close(merged, ref_merged, rtol=0, atol=0)
    assert len(load_coefficients(out)[1]["loss"]) == 6
    np.testing.assert_array_equal(full, ref)  # pools are sampled as documented: rng([seed, step, t])
    _close(full_merged, ref_merged, rtol=0, atol=0)


def test_saved_coefficients_reload_and_registered_method(tmp_path):
    out = str(tmp_path / "c")
    merged, lam = _run(steps=5, out_dir=out, vectors="breadcrumbs", vector_hparams={"beta": 0.5, "gamma": 0.9})
    loaded, meta = load_coefficients(out)
    np.testing.assert_array_equal(loaded, lam)
    assert meta["vectors"] == "breadcrumbs" and len(meta["leaf_paths"]) == 4
    _close(bcjax.merge("adamerging", PRE, FTS, coefficients=out), merged)
    with pytest.raises(HyperparameterError, match="model_fn"):
        bcjax.merge("adamerging", PRE, FTS)
    with pytest.raises(HyperparameterError, match="shape"):
        bcjax.merge("adamerging", PRE, FTS, coefficients=np.zeros((T, 3)))


def test_registered_method_takes_the_requirements_protocol():
    """bcjax.merge("adamerging") takes per-task `model_fn` (params, inputs) -> logits and
    per-task `unlabeled_batches` (REQUIREMENTS) and equals bcjax.adamerging with
    logits_fn(params, t, x) = model_fn[t](params, x)."""
    assert bcjax.methods()["adamerging"].requires == ("model_fn", "unlabeled_batches", "work_dir")
    model_fn = [lambda p, x, t=t: logits_fn(p, t, x) for t in range(T)]
    for granularity in ("layer", "task"):
        via_registry = bcjax.merge("adamerging", PRE, FTS, model_fn=model_fn, unlabeled_batches=POOLS, steps=8,
                                   learning_rate=0.05, batch_size=6, granularity=granularity)
        _close(via_registry, _run(granularity=granularity)[0], rtol=0, atol=0)
    with pytest.raises(HyperparameterError, match="2 `model_fn` entries for 3"):
        bcjax.merge("adamerging", PRE, FTS, model_fn=model_fn[:2], unlabeled_batches=POOLS, steps=1)
    with pytest.raises(HyperparameterError, match="2 `unlabeled_batches` entries for 3"):
        bcjax.merge("adamerging", PRE, FTS, model_fn=model_fn, unlabeled_batches=POOLS[:2], steps=1)
    labeled = [{"x": p, "label": np.zeros(len(p), np.int32)} for p in POOLS]
    reads_label = [lambda p, b: logits_fn(p, 0, b["x"]) + b["label"][:, None] for _ in range(T)]
    with pytest.raises(DataAccessError):
        bcjax.merge("adamerging", PRE, FTS, model_fn=reads_label, unlabeled_batches=labeled, steps=1)


def test_labels_are_never_read():
    labeled = [{"x": p, "label": np.zeros(len(p), np.int32)} for p in POOLS]

    def reads_inputs(params, task, batch):
        return logits_fn(params, task, batch["x"])

    def reads_labels(params, task, batch):
        return logits_fn(params, task, batch["x"]) + batch["label"][:, None]

    _, lam = adamerging(reads_inputs, PRE, FTS, labeled, steps=3, learning_rate=0.05, progress=False, batch_size=6)
    _, ref = _run(steps=3)
    np.testing.assert_array_equal(lam, ref)  # the same batches: labels were dropped, not used
    with pytest.raises(DataAccessError, match="label"):
        adamerging(reads_labels, PRE, FTS, labeled, steps=1, progress=False)
    with pytest.raises(DataAccessError, match="labels"):
        adamerging(logits_fn, PRE, FTS, [(p, np.zeros(len(p), np.int32)) for p in POOLS], steps=1, progress=False)


def test_sharded_vectors_on_eight_devices_match_unsharded():
    devices = jax.devices()
    if len(devices) < 8:  # conftest configures 8 CPU devices before JAX starts
        pytest.fail(f"expected 8 fake CPU devices, got {len(devices)}")
    mesh = Mesh(np.asarray(devices[:8]), ("model",))
    merged, lam = _run(steps=4, mesh=mesh, mesh_axis="model")
    ref_merged, ref = _run(steps=4)
    np.testing.assert_allclose(lam, ref, rtol=1e-5, atol=1e-6)
    _close(merged, ref_merged, rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(HyperparameterError, match="granularity"):
        _run(granularity="row")
    with pytest.raises(HyperparameterError, match="vectors"):
        _run(vectors="dare")
    with pytest.raises(HyperparameterError, match="pools"):
        adamerging(logits_fn, PRE, FTS, POOLS[:2], steps=1, progress=False)


def test_one_compilation_for_all_steps(monkeypatch):
    import importlib

    am = importlib.import_module("bcjax.adamerging")  # `bcjax.adamerging` is the function

    made = []
    original = am._make_step

    def spy(*args, **kwargs):
        step, loss = original(*args, **kwargs)
        made.append(step)
        return step, loss

    monkeypatch.setattr(am, "_make_step", spy)
    _run(steps=5)
    assert len(made) == 1 and made[0]._cache_size() == 1


def test_batched_tasks_equal_unrolled_tasks():
    def stacked_heads_logits(params, task, x):  # task may be traced: index the stacked heads
        h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"])
        h = jnp.tanh(h @ params["l2"]["kernel"] + params["l2"]["bias"])
        return h @ jnp.take(HEADS, task, axis=0)

    merged, lam = adamerging(stacked_heads_logits, PRE, FTS, POOLS, steps=8, learning_rate=0.05, progress=False,
                             batch_size=6, batch_tasks=True)
    ref_merged, ref = _run()
    np.testing.assert_allclose(lam, ref, rtol=1e-5, atol=1e-6)
    _close(merged, ref_merged, rtol=1e-5, atol=1e-6)


def test_checkpoint_of_another_run_is_not_resumed(tmp_path):
    out = str(tmp_path / "r")
    _run(steps=4, granularity="task", out_dir=out, checkpoint_every=2)
    other = [p + 1.0 for p in POOLS]  # different inputs: start over
    _, lam = adamerging(logits_fn, PRE, FTS, other, granularity="task", steps=6, learning_rate=0.05,
                        progress=False, batch_size=6, out_dir=out, checkpoint_every=2)
    _, ref = adamerging(logits_fn, PRE, FTS, other, granularity="task", steps=6, learning_rate=0.05,
                        progress=False, batch_size=6)
    np.testing.assert_array_equal(lam, ref)
