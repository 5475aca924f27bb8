"""Issue 11 part B: nothing silently non-finite (overflow rescued or named), validated public
helpers, complex leaves and device mismatches named, self-healing caches (native kernel,
fine-tune checkpoints, results store), config keys checked before any work, ``--out`` errors."""
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bcjax
from bcjax import merging
from bcjax.errors import (BcjaxError, CacheWarning, ComplexLeafWarning, DeviceMismatchError, HyperparameterError,
                          NonFiniteError, OverflowMergeError)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = np.float32(3e38)


# ----------------------------------------------------------------------------- fine-tune checkpoints
def _tiny_problem():
    import flax.linen as nn
    import optax

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(x)

    model = Tiny()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    params = model.init(jax.random.key(0), x[:1])["params"]

    def loss_fn(p, batch, *unused):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, batch["x"]), batch["y"]).mean()

    return loss_fn, params, {"x": x, "y": y}


def _largest_file(folder):
    files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f != "bcjax_manifest.json"]
    return max(files, key=os.path.getsize)


def _flip_bit(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _remove_metadata(folder):
    victims = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if "metadata" in f.lower()]
    assert victims, os.listdir(folder)
    os.unlink(victims[0])


@pytest.mark.parametrize("damage", [_flip_bit, _truncate, "metadata"], ids=["bit_flip", "truncated", "metadata"])
def test_corrupt_finetune_checkpoint_is_rebuilt_with_a_warning(tmp_path, damage):
    from bcjax import train

    loss_fn, params, data = _tiny_problem()
    cfg = train.TrainConfig(steps=6, batch_size=8, learning_rate=1e-2, weight_decay=0.0, warmup_steps=1, seed=0)
    ckpt = tmp_path / "ckpt"
    first = train.finetune(loss_fn, params, data, cfg, checkpoint_dir=str(ckpt), progress=False)
    step_dir = ckpt / "6"
    assert json.loads((step_dir / "bcjax_manifest.json").read_text())["files"]  # written after the save
    assert train.verify_manifest(str(step_dir)) is None
    again = train.finetune(loss_fn, params, data, cfg, checkpoint_dir=str(ckpt), progress=False)
    assert again.resumed_from == 6 and again.losses == []  # a sound checkpoint is restored
    if damage == "metadata":
        _remove_metadata(str(step_dir))
    else:
        damage(_largest_file(str(step_dir)))
    assert train.verify_manifest(str(step_dir)) is not None
    with pytest.warns(CacheWarning, match=r"fine-tune checkpoint .*ckpt/6 .*rebuilding"):
        rebuilt = train.finetune(loss_fn, params, data, cfg, checkpoint_dir=str(ckpt), progress=False)
    assert rebuilt.resumed_from is None and len(rebuilt.losses) == 6  # retrained from scratch
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(rebuilt.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert train.verify_manifest(str(step_dir)) is None  # and saved again, verified


# ----------------------------------------------------------------------------- overflow (SPEC §1)
def _pair(dtype=np.float32, lo=-BIG, hi=BIG, n=6):
    return {"w": np.full(n, lo, dtype)}, {"w": np.full(n, hi, dtype)}


def _ref(p0, fts, alphas):
    """θ0 + Σ αt (θt − θ0) in float64 (the "wider type" of SPEC §1)."""
    p = np.asarray(p0, np.float64)
    return p + sum(a * (np.asarray(f, np.float64) - p) for a, f in zip(alphas, fts))


def test_simple_average_of_huge_float32_leaves_is_finite_and_exact():
    big = {"w": np.array([BIG, -BIG, 3.3e38, 1.0], np.float32)}
    other = {"w": np.array([BIG, -BIG, 3.1e38, 3.0], np.float32)}
    out = np.asarray(bcjax.merge("simple_average", big, [big, other])["w"])
    ref = (np.asarray(big["w"], np.float64) + np.asarray(other["w"], np.float64)) / 2
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("method,hp,coef", [
    ("task_arithmetic", dict(alpha=0.25), 0.25),
    ("breadcrumbs", dict(alpha=0.25, beta=0.0, gamma=1.0), 0.25),
    ("breadcrumbs", dict(alpha=0.25, beta=0.0, gamma=1.0, granularity="row", axis=0), 0.25),
    ("ties", dict(density=1.0, alpha=0.25), 0.25),
    ("dare", dict(keep=1.0, alpha=0.25, key=jax.random.key(0)), 0.25),
    ("random_sparse", dict(keep=1.0, alpha=0.25, key=jax.random.key(0)), 0.25),
    ("weighted_average", dict(weights=[1.0, 3.0]), None),
])
def test_intermediate_overflow_of_finite_inputs_is_rescued(method, hp, coef):
    """θt − θ0 = 3e38 − (−3e38) overflows float32 although θ* is representable."""
    p0, ft = _pair()
    fts = [ft, ft] if method == "weighted_average" else [ft]
    out = np.asarray(bcjax.merge(method, p0, fts, **hp)["w"], np.float64)
    ref = np.full(6, float(BIG)) if coef is None else _ref(p0["w"], [ft["w"]], [coef])
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e32)
    assert np.isfinite(out).all()


@contextlib.contextmanager
def _x64(on: bool):
    """64-bit JAX types process-wide for the block (``jax.enable_x64`` is thread-local, and
    merges run leaves on a thread pool)."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", on or before)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


def _bits(x):
    """The bit patterns of an array (NaN payloads included): bit-identity, not equality."""
    a = np.asarray(x)
    return a.view(f"u{a.dtype.itemsize}")


def _ties_always_rescued(p0, fts, alpha, density):
    """TIES leaf by leaf with the overflow rescue compiled in (the one-program form traced
    merges use), from the same model-wide thresholds."""
    flags = (True,) * len(jax.tree.leaves(p0))
    thresholds = merging.ties_thresholds(p0, fts, flags, density)
    alphas = jnp.asarray(alpha, jnp.float32)
    return jax.tree.map(lambda p, *fs: merging._ties_leaf_program(p, fs, thresholds, alphas, rescue=True), p0, *fts)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float16, np.float64])
@pytest.mark.parametrize("alpha", [0.5, [0.25, 1.5, 0.75]])
def test_ties_rescues_the_leaf_that_overflows_and_only_checks_the_others(dtype, alpha):
    """A leaf whose τt = θt − θ0 overflows is rescued while the ordinary leaves are merged
    without the rescue: every leaf bit-identical to the always-rescued kernel, NaN inputs
    still NaN (validate=False), and the plain kernel really overflows on the big leaf. 16-bit
    leaves go through the XLA leaf kernel; float32 (and float64 host) leaves through the native
    host kernel, so for those the XLA leaf kernel is also checked directly."""
    with _x64(dtype == np.float64):  # float64 leaves stay float64
        top = float(jnp.finfo(dtype).max) * 0.9
        rng = np.random.default_rng(3)
        p0 = {"big": np.full(5, -top, dtype), "small": rng.standard_normal((7, 3)).astype(dtype),
              "nan": rng.standard_normal(4).astype(dtype)}
        fts = [{"big": np.array([top, top, -top, top * 0.5, 1.0], dtype),
                "small": rng.standard_normal((7, 3)).astype(dtype), "nan": rng.standard_normal(4).astype(dtype)}
               for _ in range(3)]
        fts[1]["nan"][2] = np.nan
        out = bcjax.merge("ties", p0, fts, density=1.0, alpha=alpha, validate=False)
        want = _ties_always_rescued(p0, fts, alpha, 1.0)
        for key in p0:
            np.testing.assert_array_equal(_bits(out[key]), _bits(want[key]), err_msg=key)
            assert out[key].dtype == jnp.dtype(dtype)
        assert np.isnan(np.asarray(out["nan"], np.float64)[2]) and np.isfinite(np.asarray(out["small"], np.float64)).all()
        if dtype in (np.float32, np.float64):  # τt = 1.8·max overflows the compute dtype; θ* is representable
            thresholds = merging.ties_thresholds(p0, fts, (True,) * 3, 1.0)
            plain = merging._ties_leaf_program(p0["big"], tuple(f["big"] for f in fts), thresholds,
                                               jnp.asarray(alpha, jnp.float32), rescue=False)
            assert not np.isfinite(np.asarray(plain)).all()
            leaf = merging._ties_leaf(jnp.asarray(p0["big"]), tuple(jnp.asarray(f["big"]) for f in fts), thresholds,
                                      jnp.asarray(alpha, jnp.float32))  # the XLA leaf kernel (float32: not native)
            np.testing.assert_array_equal(_bits(leaf), _bits(want["big"]))
            assert np.isfinite(np.asarray(out["big"])).all()
        jitted = jax.jit(lambda a, b: bcjax.merge("ties", a, b, density=1.0, alpha=alpha, validate=False))(p0, fts)
        on_device = bcjax.merge("ties", jax.device_put(p0), jax.device_put(fts), density=1.0, alpha=alpha,
                                validate=False)
        for key in p0:
            np.testing.assert_array_equal(_bits(jitted[key]), _bits(want[key]), err_msg=key)
            np.testing.assert_array_equal(_bits(on_device[key]), _bits(want[key]), err_msg=key)


def test_fisher_and_gradient_matching_with_huge_fishers_and_values():
    p0, ft = _pair()
    big_f = {"w": np.full(6, BIG, np.float32)}
    fisher = np.asarray(bcjax.merge("fisher", p0, [ft, ft], fishers=[big_f, big_f])["w"])
    np.testing.assert_allclose(fisher, float(BIG), rtol=1e-6)
    gm = np.asarray(bcjax.merge("gradient_matching", p0, [ft], fishers=[big_f], alpha=1.0, h0=1.0,
                                dataset_sizes=[2])["w"], np.float64)
    # H0 = 1 ≪ Ht: coefficient (H0 + Ht)/(H0 + Ht) = 1 → θ* = θt
    np.testing.assert_allclose(gm, float(BIG), rtol=1e-6)


def test_rescue_leaves_ordinary_results_bit_identical():
    rng = np.random.default_rng(1)
    p0 = {"w": rng.standard_normal(257).astype(np.float32)}
    fts = [{"w": rng.standard_normal(257).astype(np.float32)} for _ in range(3)]
    out = np.asarray(bcjax.merge("task_arithmetic", p0, fts, alpha=0.3)["w"])


    @jax.jit
    def plain(p, fs):  # the kernel's formula and order without the rescue
        acc = jnp.zeros_like(p)
        for f in fs:
            acc = acc + jnp.float32(0.3) * (f - p)
        return p + acc

    np.testing.assert_array_equal(out, np.asarray(plain(p0["w"], [f["w"] for f in fts])))


@pytest.mark.parametrize("dtype,top", [(np.float16, 65504.0), (jnp.bfloat16, 3.3e38)])
def test_result_inside_a_16_bit_range_is_returned_outside_is_a_named_error(dtype, top):
    near = np.float64(top) * 0.95
    p0 = {"enc": {"w": np.full(4, near, dtype)}}
    ft = {"enc": {"w": np.full(4, near, dtype)}}
    ft_up = {"enc": {"w": np.full(4, np.float64(top) * 0.99, dtype)}}
    # θ0 + Σ τt = 0.95 + 2·0.04 = 1.03 · top: outside the dtype, although every input is finite
    with pytest.raises(OverflowMergeError, match=r"task_arithmetic.*key path 'enc/w'.*overflows"):
        bcjax.merge("task_arithmetic", p0, [ft_up, ft_up], alpha=1.0)
    # inside the range (fp16: 62240 + 2·0.3·(64864−62240)·… computed in float32 and cast back)
    out = bcjax.merge("task_arithmetic", p0, [ft_up, ft_up], alpha=0.3)["enc"]["w"]
    assert out.dtype == jnp.dtype(dtype) and np.isfinite(np.asarray(out, np.float32)).all()
    ref = _ref(np.asarray(p0["enc"]["w"], np.float32), [np.asarray(ft_up["enc"]["w"], np.float32)] * 2, [0.3, 0.3])
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=1e-2)


def test_nonfinite_input_is_still_named_by_model_not_called_overflow():
    p0, ft = _pair(lo=0.0, hi=1.0)
    bad = {"w": ft["w"].copy()}
    bad["w"][2] = np.inf
    with pytest.raises(NonFiniteError, match=r"fine-tuned model 1, key path 'w'") as e:
        bcjax.merge("task_arithmetic", p0, [ft, bad])
    assert not isinstance(e.value, OverflowMergeError)


def test_overflow_under_jit_is_not_checked_but_rescued():
    p0, ft = _pair()
    out = jax.jit(lambda a, b: bcjax.merge("task_arithmetic", a, [b], alpha=0.5))(p0, ft)
    np.testing.assert_allclose(np.asarray(out["w"]), 0.0, atol=1e32)


# ----------------------------------------------------------------------------- public helpers
@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -np.inf, "0.3", None, True, np.array([0.1, 0.2]),
                                   [0.3], 1 + 2j])
def test_apply_task_vector_refuses_non_finite_or_non_real_alpha(alpha):
    with pytest.raises(HyperparameterError, match="alpha"):
        bcjax.apply_task_vector({"w": np.ones(3, np.float32)}, {"w": np.ones(3, np.float32)}, alpha=alpha)


def test_task_vector_helpers_validate_like_merge():
    p0 = {"a": np.zeros(3, np.float32), "b": {"c": np.ones(2, np.float32)}}
    bad = {"a": np.zeros(3, np.float32), "b": {"c": np.array([1.0, np.nan], np.float32)}}
    with pytest.raises(NonFiniteError, match=r"finetuned, key path 'b/c'"):
        bcjax.task_vector(bad, p0)
    with pytest.raises(NonFiniteError, match=r"task vector, key path 'b/c'"):
        bcjax.apply_task_vector(p0, bad)
    with pytest.raises(OverflowMergeError, match="'a'"):
        bcjax.task_vector({"a": np.full(3, BIG), "b": p0["b"]}, {"a": np.full(3, -BIG), "b": p0["b"]})
    tv = bcjax.task_vector({"a": np.full(3, 2.0, np.float32), "b": p0["b"]}, p0)
    out = bcjax.apply_task_vector(p0, tv, alpha=np.float32(0.5))
    np.testing.assert_array_equal(np.asarray(out["a"]), np.full(3, 1.0, np.float32))
    assert jax.jit(lambda a: bcjax.apply_task_vector(p0, tv, alpha=a))(0.5)["a"].dtype == jnp.float32


def test_breadcrumbs_mask_refuses_nan_in_the_task_vector():
    tau = {"enc": {"k": np.array([0.1, np.nan, 0.3, 0.2], np.float32)}}
    with pytest.raises(NonFiniteError, match=r"task vector, key path 'enc/k'"):
        bcjax.breadcrumbs_mask(tau, 0.1, 0.9)


# ----------------------------------------------------------------------------- complex leaves, devices
def test_complex_leaves_warn_naming_their_key_paths_and_are_copied():
    p0 = {"z": np.zeros(2, np.complex64), "w": np.zeros(2, np.float32)}
    ft = {"z": np.ones(2, np.complex64), "w": np.ones(2, np.float32)}
    with pytest.warns(ComplexLeafWarning, match=r"\['z'\]"):
        out = bcjax.merge("task_arithmetic", p0, [ft], alpha=1.0)
    np.testing.assert_array_equal(np.asarray(out["z"]), p0["z"])
    np.testing.assert_array_equal(np.asarray(out["w"]), ft["w"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ComplexLeafWarning)
        bcjax.merge("task_arithmetic", p0, [ft], alpha=1.0, exclude="^z$")  # excluded knowingly: quiet


def test_models_committed_to_different_devices_name_the_model():
    devices = jax.devices()
    assert len(devices) >= 2  # tests/conftest.py sets jax_num_cpu_devices = 8
    p0 = {"a": {"w": jax.device_put(jnp.ones(8), devices[0])}}
    same = {"a": {"w": jax.device_put(jnp.ones(8), devices[0])}}
    other = {"a": {"w": jax.device_put(jnp.ones(8), devices[1])}}
    with pytest.raises(DeviceMismatchError, match=r"fine-tuned model 1, key path 'a/w'.*devices \[1\]"):
        bcjax.merge("task_arithmetic", p0, [same, other])
    loose = {"a": {"w": jnp.ones(8)}}  # uncommitted: follows the others
    bcjax.merge("task_arithmetic", p0, [same, loose])
    with pytest.raises(DeviceMismatchError):
        bcjax.task_vector(other, p0)


# ----------------------------------------------------------------------------- native kernel cache
_NATIVE_PROBE = textwrap.dedent("""
    import warnings
    warnings.simplefilter("always")
    import jax.numpy as jnp
    from bcjax import _native
    print("available", _native.available())
    print("select", _native.select_bits(jnp.arange(10, dtype=jnp.int32)[::-1], jnp.array([0, 9], jnp.int32)).tolist())
""")


def _probe_native(cache):
    env = {**os.environ, "BCJAX_CACHE": str(cache), "BCJAX_NATIVE": "1", "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-c", _NATIVE_PROBE], env=env, capture_output=True, text=True, timeout=300)


def test_truncated_native_kernel_is_rebuilt_with_one_warning(tmp_path):
    from bcjax import _native

    if not _native.available():
        pytest.skip(f"native kernel unavailable here: {_native.unavailable_reason()}")
    cache = tmp_path / "cache"
    first = _probe_native(cache)
    assert first.returncode == 0 and "available True" in first.stdout, first.stderr
    (lib,) = (cache / "native").glob("*.so")
    sidecar = json.loads(lib.with_name(lib.name + ".sha256.json").read_text())
    assert sidecar["size"] == lib.stat().st_size
    with open(lib, "r+b") as f:  # a cut-off copy: loading it used to kill the process with SIGBUS
        f.truncate(lib.stat().st_size // 3)
    healed = _probe_native(cache)
    assert healed.returncode == 0, healed.stderr[-2000:]
    assert "available True" in healed.stdout and "select [0, 9]" in healed.stdout
    warned = [line for line in healed.stderr.splitlines() if "CacheWarning" in line]
    assert len(warned) == 1 and str(lib) in warned[0] and "rebuilding" in warned[0]
    assert lib.stat().st_size == sidecar["size"]
    quiet = _probe_native(cache)  # healed for good: no warning the next time
    assert quiet.returncode == 0 and "CacheWarning" not in quiet.stderr


# ----------------------------------------------------------------------------- results store
@pytest.mark.parametrize("value", ['null', 'NaN', 'Infinity', '{"a": null}', '{"a": NaN}', '"0.5"', '[]', '{}', 'true',
                                  '{"a": [1, null]}'])
def test_results_lines_without_finite_values_are_skipped_naming_file_and_line(tmp_path, value):
    from bcjax.results_store import ResultsStore

    path = tmp_path / "results.jsonl"
    good = ResultsStore(path)
    good.put({"p": 1}, {"a": 0.5})
    key = json.loads(path.read_text())["key"]
    with open(path, "a") as f:
        f.write(f'{{"key": "{key[:-1]}x", "config": {{"p": 2}}, "value": {value}}}\n')
    with pytest.warns(CacheWarning, match=rf"{path.name}:2: corrupt results line skipped"):
        store = ResultsStore(path)
    assert store.skipped_lines == 1 and len(store) == 1 and store.get({"p": 1}) == {"a": 0.5}


@pytest.mark.parametrize("value", [None, float("nan"), {"a": float("inf")}, "x", {}])
def test_results_store_refuses_to_store_non_finite_values(value):
    from bcjax.results_store import ResultsStore

    with pytest.raises(BcjaxError, match="refusing to store"):
        ResultsStore(None).put({"p": 1}, value)


def test_values_of_the_wrong_shape_are_recomputed_with_a_warning(tmp_path):
    """A valid number where the evaluation loop expects ``{task: accuracy}`` (or a mapping that
    lacks a task) is dropped, naming file and line, and recomputed — no AttributeError."""
    from bcjax.experiments.engine import evaluate_models
    from bcjax.results_store import ResultsStore, config_key

    path = tmp_path / "results.jsonl"
    keys = [{"kind": "m", "i": 0}, {"kind": "m", "i": 1}, {"kind": "m", "i": 2}]
    rows = [0.5, {"a": 0.25}, {"a": 0.75, "b": 0.5}]
    with open(path, "w") as f:
        for k, v in zip(keys, rows):
            f.write(json.dumps({"key": config_key(k), "config": k, "value": v}) + "\n")
    store = ResultsStore(path)

    class Suite:
        tasks = ("a", "b")

        @staticmethod
        def evaluate(stacked, task, split):
            return np.full(len(stacked), {"a": 0.1, "b": 0.2}[task])

    built = []

    def build(idx):
        built.extend(int(i) for i in idx)
        return np.asarray(idx)

    with pytest.warns(CacheWarning) as record:
        accs = evaluate_models(Suite, store, keys, [("a", "b")] * 3, build, "test", chunk=1, progress=False)
    messages = " | ".join(str(w.message) for w in record)
    assert f"{path}:1" in messages and f"{path}:2" in messages and f"{path}:3" not in messages
    assert accs == [{"a": 0.1, "b": 0.2}, {"a": 0.1, "b": 0.2}, {"a": 0.75, "b": 0.5}]
    assert sorted(set(built)) == [0, 1]


# ----------------------------------------------------------------------------- configs and the CLI
def _cli(*args):
    """``bcjax ARGS`` in this process: (exit code, stderr lines)."""
    import contextlib
    import io

    from bcjax.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, err.getvalue().strip().splitlines()


def test_cli_error_is_one_line_exit_2_in_a_fresh_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    r = subprocess.run([sys.executable, "-m", "bcjax.cli", "sweep", "--config",
                        os.path.join(REPO, "configs", "sweep_subsets.yaml"), "--set", "train.stepz=5", "--out",
                        str(tmp_path / "o")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "'train'" in r.stderr, r.stderr[-800:]


def test_unknown_sweep_keys_fail_before_any_work(tmp_path):
    cfg = os.path.join(REPO, "configs", "sweep_subsets.yaml")
    for bad, names in [("train.stepz=5", "'train'"), ("suite.train.stepz=5", "stepz"), ("suite.presett=full", "presett"),
                       ("sizez=3", "sizez")]:
        out = tmp_path / "out"
        code, line = _cli("sweep", "--config", cfg, "--set", bad, "--out", str(out), "--no-progress")
        assert code == 2 and len(line) == 1 and "sweep_subsets.yaml" in line[0] and names in line[0], line
        assert not out.exists()  # nothing was started


def test_set_suite_train_steps_takes_effect_for_sweeps():
    from bcjax.config import load_config
    from bcjax.experiments.dinov2 import demo_config

    cfg = os.path.join(REPO, "configs", "sweep_subsets.yaml")
    base = demo_config(load_config(cfg))
    changed = demo_config(load_config(cfg, ["suite.train.steps=100"]))
    assert changed.train.steps == 100 != base.train.steps
    assert changed.finetune_fingerprint() != base.finetune_fingerprint()  # the fine-tunes are redone
    from bcjax.cli import SET_EXAMPLES, build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["sweep"].format_help()
    assert SET_EXAMPLES["sweep"] in help_text.replace("\n", " ").replace("  ", " ") or "suite.train.steps" in help_text


@pytest.mark.parametrize("config,override,names", [
    ("clip_vit_b32.yaml", "train.stepz=5", "train.stepz"),
    ("clip_vit_b32.yaml", "modell.name=x", "modell"),
    ("clip_vit_b32.yaml", "eval.merges=[{method: ties, densty: 0.2}]", "densty"),
    ("clip_vit_b32.yaml", "eval.merges=[{method: tiez}]", "tiez"),
    ("t5_base_glue.yaml", "data.taskz=[rte]", "data.taskz"),
    ("t5_base_glue.yaml", "eval.predictionn=rank", "eval.predictionn"),
])
@pytest.mark.parametrize("command", ["finetune", "eval"])
def test_unknown_pipeline_keys_fail_naming_file_and_key(tmp_path, config, override, names, command):
    code, lines = _cli(command, "--config", os.path.join(REPO, "configs", config), "--set", override, "--out",
                       str(tmp_path / "o"), "--no-progress")
    assert code == 2 and len(lines) == 1 and config in lines[0] and names in lines[0], lines


def test_known_keys_of_every_shipped_pipeline_config_pass():
    from bcjax.config import load_config
    from bcjax.pipelines import get_pipeline

    for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
        cfg = load_config(os.path.join(REPO, "configs", name))
        if "pipeline" in cfg:
            get_pipeline(cfg)  # check_config passes on what we ship


@pytest.mark.parametrize("command", ["demo", "finetune", "eval", "sweep", "merge"])
@pytest.mark.parametrize("where", ["under_a_file", "read_only_dir", "is_a_file"])
def test_unwritable_out_is_one_line_exit_2(tmp_path, command, where):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    if where == "under_a_file":
        out = blocker / "out"
    elif where == "is_a_file":
        out = blocker
    else:
        if os.geteuid() == 0:
            out = "/proc/bcjax-out"  # root writes anywhere on a normal file system
        else:
            ro = tmp_path / "ro"
            ro.mkdir()
            ro.chmod(0o500)
            out = ro / "out"
    configs = {"finetune": "clip_vit_b32.yaml", "eval": "t5_base_glue.yaml", "sweep": "sweep_subsets.yaml"}
    if command == "demo":
        args = ["demo", "--quick"]
    elif command == "merge":
        merge_cfg = tmp_path / "merge.yaml"
        merge_cfg.write_text("method: task_arithmetic\npretrained: a\nfinetuned: [b]\n")
        args = ["merge", str(merge_cfg)]
    else:
        args = [command, "--config", os.path.join(REPO, "configs", configs[command])]
    code, lines = _cli(*args, "--out", str(out), "--no-progress")
    assert code == 2 and len(lines) == 1 and "--out" in lines[0], lines
    assert not os.path.exists(os.path.join(str(tmp_path), "demo_out"))
